"""Cells of tutorial 07, "Kernel GLMs are DEQs" (issue 14); `build.py` writes the notebook.

Kept in its own file so that the kGLM tutorial can be edited without touching the others;
``python tutorials/build.py`` regenerates every notebook, this one included.
"""

FIRST_CELL = '''\
import os

import torch

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
SMALL = os.environ.get("DEQPPL_TUTORIAL_SMALL") == "1"  # set by the test suite
N = 80 if SMALL else 300
EPOCHS = 3 if SMALL else 30'''

CELLS = [
    ("md", """\
# 08 · Kernel GLMs are DEQs

A kernel GLM fits $f$ in an RKHS by penalised maximum likelihood. By the representer theorem its
fitted means $z = A'(K\\alpha)$ solve

$$z = \\sigma\\Big(-\\tfrac1\\lambda K z + \\tfrac1\\lambda K\\,T(y)\\Big),\\qquad \\sigma = A',$$

a deep equilibrium layer $z=\\sigma(Wz+Uy+b)$ with **closed-form weights** $W=-K/\\lambda$,
$U=K/\\lambda$, $b=0$ (Tsuchida, Ong et al., 2022, ICLR). So a DEQ initialised with these weights
*is* kernel ridge / logistic / Poisson regression before any training, and training fine-tunes an
unrolled classical algorithm."""),
    ("code", FIRST_CELL),
    ("md", "## Gaussian: the DEQ's fixed point is kernel ridge regression"),
    ("code", '''\
from sklearn.kernel_ridge import KernelRidge

from deqppl.encoders import solve_kglm
from deqppl.encoders.kglm import spectral_norm
from deqppl.expfam import bernoulli, gaussian
from deqppl.kernels import SquaredExponential

g = torch.Generator().manual_seed(0)
x = torch.sort(6 * torch.rand(N, generator=g) - 3).values
x_new = torch.linspace(-3, 3, 50)
y = torch.sin(2 * x) + 0.3 * torch.randn(N, generator=g)
kernel = SquaredExponential(lengthscale=0.5)
K, K_new = kernel(x), kernel(x_new, x)
lam = 0.05 * spectral_norm(K)  # Lip(sigma) ||K|| / lam = 20: plain iteration would diverge
fit = solve_kglm(gaussian(), K, y, lam=lam, K_new=K_new)
krr = KernelRidge(alpha=lam, kernel="precomputed").fit(K.numpy(), y.numpy())
gap = float((fit.prediction - torch.from_numpy(krr.predict(K_new.numpy()))).abs().max())
print(fit.solution.solver, fit.solution.num_steps, "steps; max |DEQ - KernelRidge| =", gap)'''),
    ("md", """\
## Bernoulli: the same layer with $\\sigma$ = sigmoid is kernel logistic regression

`KGLMLayer` holds the weights as trainable parameters; `Informed(kernel, s)` sets them to the
closed form with $\\lambda = s\\lVert K\\rVert_2$, `Naive()` uses a generic squared-exponential
kernel and `Random()` PyTorch's default initialisation."""),
    ("code", '''\
from deqppl.encoders import Informed, KGLMLayer, Naive, Random

labels = torch.bernoulli(torch.sigmoid(3 * torch.sin(2 * x)), generator=g)
layer = KGLMLayer(bernoulli(), x, init=Informed(kernel, s=2.0), x_new=x_new)
prob, sol = layer.predict(labels)
klr = solve_kglm(bernoulli(), K, labels, lam=2.0 * spectral_norm(K), K_new=K_new)
print("max |layer - kernel logistic regression| =", float((prob[0] - klr.prediction).abs().max()))'''),
    ("md", """\
## Training through the fixed point

All weights are trained by Adam with gradients from the implicit adjoint (no backpropagation
through the solver's steps). Here the three initialisations are trained to predict the labels'
underlying probabilities at new inputs."""),
    ("code", '''\
from deqppl.deq import Anderson

target = torch.sigmoid(3 * torch.sin(2 * x_new)).unsqueeze(0)
curves = {}
for name, init in {"informed": Informed(kernel, s=2.0), "naive": Naive(s=2.0), "random": Random()}.items():
    net = KGLMLayer(bernoulli(), x, init=init, x_new=x_new, solver=Anderson(rtol=1e-10, atol=0.0, max_steps=500))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(EPOCHS + 1):
        opt.zero_grad()
        p, s = net.predict(labels)
        loss = ((p - target) ** 2).mean()
        losses.append(float(loss))
        loss.backward()
        opt.step()
    curves[name] = losses
{k: (round(v[0], 4), round(v[-1], 4)) for k, v in curves.items()}'''),
    ("md", "## Checks"),
    ("code", '''\
assert gap < 1e-8 and fit.converged
assert float((prob[0] - klr.prediction).abs().max()) < 1e-8
assert curves["informed"][0] < curves["random"][0]  # informed starts at the kGLM fit
assert all(v[-1] <= v[0] for v in curves.values())'''),
]
