"""Cells of tutorial 05, "DEQs with guarantees" (issue 18); `build.py` writes the notebook.

Kept in its own file so that the pcDEQ tutorial can be edited without touching the others;
``python tutorials/build.py`` regenerates every notebook, this one included.
"""

FIRST_CELL = '''\
import os

import torch

torch.manual_seed(0)
torch.set_num_threads(1)
SMALL = os.environ.get("DEQPPL_TUTORIAL_SMALL") == "1"  # set by the test suite
N = 200  # width of the layer in the first part (SPEC 5: N = 200)
EPOCHS = 3 if SMALL else 10
NUM_TRAIN = 600 if SMALL else None  # None: the whole training split'''

CELLS = [
    ("md", """\
# 05 · DEQs with guarantees: positive concave DEQs

A deep equilibrium layer returns the fixed point $z^* = f(z^*; x)$. For an arbitrary $f$ nothing
says that $z^*$ exists, is unique, or that a solver will find it. A **positive concave DEQ**
(pcDEQ; Gabor, Piotrowski & Cavalcante, 2024, ICML) restricts the layer to

$$z = \\sigma(Wz + b + u(x)), \\qquad W \\ge 0,\\ b \\ge 0,$$

with $\\sigma$ nondecreasing, concave and bounded on $\\mathbb R_+$ ($\\tanh$, softsign, ReLU6 with a
strictly positive injection $u = \\mathrm{softplus}_5(Ux + c)$: pcDEQ-1; the sigmoid with
$u = \\mathrm{ReLU}(Ux + c)$: pcDEQ-2). Nonlinear Perron-Frobenius theory then gives, **for every
$W \\ge 0$ whatever its norm**: a unique fixed point, reached by plain iteration from $z_0 = 0$,
monotonically and geometrically. At $z^*$, $J = \\mathrm{diag}(\\sigma')W \\ge 0$ and
$Jz^* \\le z^* - g(0) < z^*$, so $\\rho(J) < 1$: the backward pass is plain iteration too.

`deqppl.layers` checks these conditions at run time and reports them in a certificate."""),
    ("code", FIRST_CELL),
    ("md", "## A layer with a huge $W$ still has one fixed point"),
    ("code", '''\
from deqppl.deq import FixedPointIteration, fixed_point
from deqppl.layers import PCDEQLinear, SquareCone, Tanh

tight = FixedPointIteration(rtol=1e-13, atol=0.0, max_steps=500)
layer = PCDEQLinear(10, N, activation=Tanh(), cone=SquareCone(), weight_norm=False,
                    solver=tight, dtype=torch.float64)
g = torch.Generator().manual_seed(1)
W = torch.rand(N, N, generator=g, dtype=torch.float64)
layer.set_weight(40.0 * W / torch.linalg.matrix_norm(W, ord=2))  # spectral norm 40
x = torch.randn(8, 10, generator=g, dtype=torch.float64)
sol = layer.solve(x, certify=True)
sol'''),
    ("md", """\
The certificate says which conditions were verified: the cone ($W, b \\ge 0$), the activation,
a strictly positive $g(0)$, the observed contraction rate, $\\rho(J)$ by power iteration and a
rigorous Collatz-Wielandt upper bound $\\max_i (Jz^*)_i / z^*_i$. Uniqueness: plain iteration
from random nonnegative starts lands on the same point."""),
    ("code", '''\
u = layer.injection(x).detach()
starts = [scale * torch.rand(8, N, generator=g, dtype=torch.float64) for scale in (0.1, 1.0, 100.0)]
gaps = [float((fixed_point(lambda z: layer.layer(z, u), z0, solver=tight).value - sol.value.detach()).abs().max())
        for z0 in starts]
gaps'''),
    ("md", """\
## The same norm without the sign constraint

An unconstrained DEQ of the same shape with $W$ of either sign and the same spectral norm: nothing
guarantees a fixed point, and Anderson acceleration reports the samples it could not solve."""),
    ("code", '''\
from deqppl.deq import Anderson
from deqppl.layers import DEQLinear

free = DEQLinear(10, N, weight_norm=False, solver=Anderson(rtol=1e-10, max_steps=300),
                 throw=False, dtype=torch.float64)
W_free = torch.randn(N, N, generator=g, dtype=torch.float64)
free.W.set_(40.0 * W_free / torch.linalg.matrix_norm(W_free, ord=2), name="W")
free_sol = free.solve(x)
free_sol.solution'''),
    ("md", "## Iterates from zero increase monotonically"),
    ("code", '''\
import matplotlib.pyplot as plt

small = PCDEQLinear(10, N, cone=SquareCone(), weight_norm=False, dtype=torch.float64)
small.set_weight(0.4 * W / torch.linalg.matrix_norm(W, ord=2))  # a slow case: norm 0.4
u_small = small.injection(x).detach()
z, iterates = torch.zeros(8, N, dtype=torch.float64), []
with torch.no_grad():
    for _ in range(30):
        z = small.layer(z, u_small)
        iterates.append(z[0, :5].clone())
iterates = torch.stack(iterates)
plt.plot(iterates)
plt.xlabel("iteration"); plt.ylabel("first five entries of z (sample 0)")
plt.show()'''),
    ("md", """\
## Training on handwritten digits

The paper's linear architecture (implicit layer of width 80, BatchNorm, linear head) on the 8x8
digits that ship with deqppl. `fit_classifier` verifies after **every** AdamW step that every
effective weight is still nonnegative, and records solver steps and failures."""),
    ("code", '''\
from deqppl.data import load_digits
from deqppl.layers import (PCDEQFamily, evaluate_classifier, fit_classifier, linear_classifier,
                           num_parameters)

digits = load_digits(dtype=torch.float32)
images, labels = (digits.y / 16.0).reshape(-1, 1, 8, 8), digits.labels.long()
perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
train, test = perm[:1347], perm[1347:]
if NUM_TRAIN is not None:
    train = train[:NUM_TRAIN]
model = linear_classifier(PCDEQFamily(), image_size=8, in_channels=1, seed=0)
fit = fit_classifier(model, images[train], labels[train], num_epochs=EPOCHS, batch_size=32, lr=1e-2)
evaluation = evaluate_classifier(model, images[test], labels[test])
print(f"{num_parameters(model)} parameters, test accuracy {evaluation.accuracy:.3f}")
print(f"forward steps {fit.mean('forward_steps'):.1f}, backward steps {fit.mean('backward_steps'):.1f}, "
      f"failed solves {fit.forward_failed} / {fit.backward_failed}")
pcdeq = model[2]
certificate = pcdeq.solve(images[test].flatten(1), certify=True).certificate
certificate'''),
    ("md", """\
## Stress test: initial $W$ scaled by 10

Scaling $W$ changes nothing in the theory, so the pcDEQ still converges everywhere (in fewer
steps: $\\tanh$ saturates). Saturation makes the gradient tiny, not zero: `Tanh` and `Sigmoid`
differentiate as $\\mathrm{sech}^2$ and $s(t)s(-t)$, exact in float32 where torch's $1 - \\tanh^2$
rounds to 0, and Adam (scale invariant) turns those tiny gradients into full steps, so the
layer leaves saturation within a few epochs (docs/pcdeq.md has the measurements)."""),
    ("code", '''\
stressed = linear_classifier(PCDEQFamily(), image_size=8, in_channels=1, seed=0)
stressed[2].scale_weight_(10.0)
stressed_fit = fit_classifier(stressed, images[train], labels[train], num_epochs=EPOCHS, batch_size=32, lr=1e-2)
print(stressed_fit.status.name, "failed solves:", stressed_fit.forward_failed, stressed_fit.backward_failed)
print("loss per epoch:", [round(e.loss, 3) for e in stressed_fit.epochs])'''),
    ("md", """\
## The same comparison in the harness

`deqppl.harness.compare_classifiers` runs methods (layer families) x architectures x stages x
seeds and returns the harness's tidy table; every implicit layer reports its own certificate
on the test images after training (`layer.diagnose`): for the pcDEQ the cone, activation and
injection checks, the observed contraction rates, $\\rho(J)$ and its rigorous bound, the largest
slope $\\sigma'$ at $z^*$; for every implicit layer convergence and $\\rho(J)$.
`deqppl.report.classifier_tables` formats the summary (mean ± sd over seeds) and
`classifier_markdown` adds a glossary of every column."""),
    ("code", '''\
from deqppl.harness import (ClassifierMethod, ClassifierStage, ClassifierTraining, ImageSplit,
                            LinearArchitecture, compare_classifiers)
from deqppl.layers import DEQFamily
from deqppl.report import classifier_tables

split = ImageSplit(name="digits", x_train=images[train], y_train=labels[train],
                   x_test=images[test], y_test=labels[test])
training = ClassifierTraining(num_epochs=EPOCHS, batch_size=32)
result = compare_classifiers(
    [ClassifierMethod(name="pcdeq-1", family=PCDEQFamily()),
     ClassifierMethod(name="deq", family=DEQFamily(throw=False))],
    split, architectures=[LinearArchitecture()],
    stages=[ClassifierStage(name="test", training=training),
            ClassifierStage(name="stress_x10", training=training, weight_scale=10.0)],
    progress=False)
(_, accuracy_table), (_, certificate_table) = classifier_tables(result)
accuracy_table'''),
    ("code", "certificate_table"),
    ("md", "## Sanity checks"),
    ("code", '''\
assert sol.certificate.certified and bool(sol.converged.all())
# plain iteration from three other starts reaches the same point (tolerance 1e-13 relative)
assert max(gaps) < 1e-10, gaps
assert bool((iterates[1:] >= iterates[:-1] - 1e-14).all())  # monotone from zero
assert fit.status.name == "COMPLETED" and pcdeq.min_weight() >= 0
assert fit.forward_failed == 0 and fit.backward_failed == 0
assert certificate.certified
stress_row = result.summary.loc[("digits-linear", "stress_x10", "pcdeq-1")]
assert stress_row["certified"] == 1 and stress_row["unconverged_runs"] == 0
assert stressed_fit.forward_failed == 0 and stressed_fit.backward_failed == 0
# ten classes: chance is 0.1; three epochs on 600 digits (measured: 0.8-0.9) do far better
assert evaluation.accuracy > 0.5, evaluation.accuracy'''),
]
