"""The harness on every model of the zoo: same table columns, certified agreement, kGLM held-out."""

import math

import numpy as np
import pytest
import torch

from deqppl.encoders import DeepPEDEncoder
from deqppl.expfam import bernoulli, family, gaussian
from deqppl.optim import LBFGS, SVI
from deqppl.harness import COLUMNS, DEQMethod, LBFGSMethod, SVIMethod, compare
from deqppl.harness.accuracy import certified_bound
from deqppl.harness.sites import site_layout
from deqppl.inference import log_joint
from deqppl.kernels import SquaredExponential
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA, KernelGLM

F64 = torch.float64
#: Metrics every model's comparison reports in every stage, and in the held-out stage.
COMMON = {"wall_time", "num_steps", "num_grad_evals", "converged", "log_joint", "log_joint_gap"}
HELD = COMMON | {"certified_bound", "min_hessian_eig", "max_abs_dz", "heldout_log_lik", "amortization_gap"}


@pytest.fixture(scope="module")
def pca():
    model = ExpFamPCA(family=family("poisson"), obs_dim=8, latent_dim=2, param_scale=0.5)
    data = model.simulate(60, seed=0, dtype=F64).data
    methods = [DEQMethod(optimizer=LBFGS(max_steps=10)), SVIMethod(optimizer=SVI(max_steps=100)), LBFGSMethod()]
    return compare(model, data, methods=methods, progress=False)


@pytest.fixture(scope="module")
def hierarchical():
    model = HierarchicalExpFamPCA(widths=(6, 3, 2))
    data = model.simulate(60, seed=0, dtype=F64).data
    methods = [
        DEQMethod(encoder=DeepPEDEncoder, optimizer=LBFGS(max_steps=200)),
        SVIMethod(optimizer=SVI(max_steps=200)),
        LBFGSMethod(),
    ]
    return compare(model, data, methods=methods, progress=False)


@pytest.fixture(scope="module", params=[gaussian(), bernoulli()], ids=["gaussian", "bernoulli"])
def kglm(request):
    model = KernelGLM(request.param, SquaredExponential(lengthscale=1.0), lam=1.0)
    data = model.simulate(50, seed=0, dtype=F64).data
    return model, data, compare(model, data, methods=[SVIMethod(optimizer=SVI(max_steps=300)), LBFGSMethod()], progress=False)


def _metrics(result, stage):
    t = result.table
    return {m: set(t[(t.method == m) & (t.stage == stage)]["metric"]) for m in set(t.method)}


def test_every_model_gives_the_same_table_columns(pca, hierarchical, kglm):
    results = {"pca": pca, "hierarchical": hierarchical, "kglm": kglm[2]}
    for name, result in results.items():
        assert list(result.table.columns) == COLUMNS, name
        assert set(result.table.stage) == {"fit", "heldout"}, name
        for method, metrics in _metrics(result, "fit").items():
            assert COMMON <= metrics, (name, method)
        for method, metrics in _metrics(result, "heldout").items():
            assert HELD <= metrics, (name, method)
        assert {"svi", "lbfgs"} <= set(result.summary.index)
        assert HELD - {"wall_time"} <= set(result.summary.columns)


def test_model_specific_metrics_come_from_the_model(pca, hierarchical, kglm):
    # ExpFamPCA and the hierarchy compare loadings by principal angles (their global_metrics
    # hook); the kernel GLM has no globals and no such hook.
    for result in (pca, hierarchical):
        fit = result.table[result.table.stage == "fit"]
        angles = fit[fit.metric == "subspace_angle"].set_index("method")["value"]
        assert set(angles.index) == set(result.summary.index) - {"pca"}
        assert angles[result.globals_source[0]] == pytest.approx(0.0, abs=1e-7)
    assert "subspace_angle" not in set(kglm[2].table.metric)
    # per-site agreement for the two local sites of the hierarchy
    held = set(hierarchical.table[hierarchical.table.stage == "heldout"].metric)
    assert {"max_abs_dz[z1]", "max_abs_dz[z2]"} <= held


def test_hierarchical_deq_equals_lbfgs_within_the_certified_bounds(hierarchical):
    r = hierarchical
    assert set(r.local_values["deq"]) == {"z1", "z2"}
    assert r.latents["deq"]["z1"].shape == (12, 3)  # 20% of 60 rows
    flat = {m: torch.cat([v["z1"], v["z2"]], dim=1) for m, v in r.local_values.items()}
    # ||z_deq - z_lbfgs|| <= ||z_deq - z*|| + ||z* - z_lbfgs|| <= both bounds, row by row
    dz = (flat["deq"] - flat["lbfgs"]).norm(dim=1)
    assert (dz <= r.bounds["deq"] + r.bounds["lbfgs"]).all()
    # and the bounds certify agreement to well below the latents' scale (Newton's fixed point
    # at relative residual 1e-8, L-BFGS at gradient ~1.5e-8 with H >= the prior precision)
    assert float(r.bounds["deq"].max()) < 1e-6 and float(r.bounds["lbfgs"].max()) < 1e-6
    assert r.reference in ("deq", "lbfgs")
    s = r.summary
    assert s.loc["deq", "converged"] == 1.0 and s.loc["lbfgs", "converged"] == 1.0


def test_kglm_heldout_scores_predictions_at_new_inputs(kglm):
    model, data, r = kglm
    assert r.coupled and r.shared_globals == {}
    # the held-out stage infers u on the training inputs (40 of 50 points)
    assert r.local_values["lbfgs"]["u"].shape == (40,)
    assert r.latents["lbfgs"].shape == (40, 1)
    assert r.bounds["lbfgs"].shape == (1,)
    held = r.heldout_data
    assert held["x"].shape == (10,)
    s = r.summary
    assert math.isfinite(s.loc["lbfgs", "heldout_log_lik"])
    # both methods' predictions agree to first order in their distance
    assert abs(s.loc["svi", "heldout_log_lik"] - s.loc["lbfgs", "heldout_log_lik"]) < 1e-3


def test_kglm_predictive_log_lik_is_kernel_ridge_at_new_inputs():
    # Oracle: scikit-learn's KernelRidge on the same jittered kernel matrix; for the Gaussian
    # family the MAP's predictions at new inputs are K_* (K_j + lam I)^{-1} y.
    from sklearn.kernel_ridge import KernelRidge

    model = KernelGLM(gaussian(), SquaredExponential(lengthscale=0.7), lam=0.5)
    sim = model.simulate(30, seed=3, dtype=F64)
    data = model.validate(sim.data)
    x, y = data["x"], data["y"]
    K = model.gram(x)
    # the MAP of u in closed form: u* = L^T (K_j + lam I)^{-1} y (module notes of kernel_glm)
    L = model.cholesky(x)
    u = L.T @ torch.linalg.solve(K + model.lam * torch.eye(30, dtype=F64), y)
    x_new = torch.linspace(-2.5, 2.5, 7, dtype=F64)
    y_new = torch.sin(x_new)
    got = model.predictive_log_lik(data, {"u": u}, {"x": x_new, "y": y_new})
    krr = KernelRidge(alpha=model.lam, kernel="precomputed").fit(K.numpy(), y.numpy())
    mean = krr.predict(model.kernel(x_new, x).numpy())
    want = -0.5 * (y_new.numpy() - mean) ** 2 - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_certified_bound_blocks_equal_the_full_hessian():
    # Oracle: torch.autograd.functional.hessian of the Pyro log joint over all locals at once;
    # the tiled-e_j products must give its diagonal blocks, and its off-diagonal blocks are 0.
    model = HierarchicalExpFamPCA(widths=(4, 3, 2))
    sim = model.simulate(5, seed=1, dtype=F64)
    data = model.validate(sim.data)
    globals_ = {k: sim.truth[k] for k in model.global_sites}
    locals_ = {k: sim.truth[k] for k in model.local_sites}
    layout = site_layout(model, data)
    cb = certified_bound(model, data, globals_, locals_, layout)

    def negative_log_joint(z1, z2):
        return -log_joint(model, data, {**globals_, "z1": z1, "z2": z2})

    z1, z2 = locals_["z1"], locals_["z2"]
    blocks = torch.autograd.functional.hessian(negative_log_joint, (z1, z2))
    n = 5
    full = torch.cat(
        [torch.cat([b.reshape(n * z.shape[1], n * w.shape[1]) for b, w in zip(row, (z1, z2))], 1)
         for row, z in zip(blocks, (z1, z2))], 0,
    )  # coordinates ordered (site, row, dim)
    grads = torch.autograd.grad(negative_log_joint(z1.requires_grad_(), z2.requires_grad_()), (z1, z2))
    for s in range(n):
        idx = [s * 3 + i for i in range(3)] + [15 + s * 2 + i for i in range(2)]
        H = full[idx][:, idx]
        want = torch.linalg.norm(torch.cat([grads[0][s], grads[1][s]])) / torch.linalg.eigvalsh(H)[0]
        assert float(cb.bound[s]) == pytest.approx(float(want), rel=1e-10)
        others = [i for i in range(25) if i not in idx]
        assert float(full[idx][:, others].abs().max()) == 0.0


def test_certified_bound_bounds_the_distance_to_the_map():
    # Oracle: the closed-form Gaussian-PCA MAP (SPEC §2.2); F is quadratic, so the bound holds
    # exactly at any point, and is attained when the error lies along the softest direction.
    model = ExpFamPCA(family=gaussian(), obs_dim=5, latent_dim=3, lam=0.5)
    sim = model.simulate(8, seed=2, dtype=F64)
    data = model.validate(sim.data)
    W, B = sim.truth["W"], sim.truth["B"]
    H = model.lam * torch.eye(3, dtype=F64) + W.T @ W
    z_map = torch.linalg.solve(H, W.T @ (data["y"] - B).T).T
    layout = site_layout(model, data)
    gen = torch.Generator().manual_seed(0)
    z = z_map + 0.1 * torch.randn(z_map.shape, generator=gen, dtype=F64)
    cb = certified_bound(model, data, {"W": W, "B": B}, {"z": z}, layout)
    dist = (z - z_map).norm(dim=1)
    assert (dist <= cb.bound * (1 + 1e-12)).all()
    soft = torch.linalg.eigh(H).eigenvectors[:, 0]
    cb_soft = certified_bound(model, data, {"W": W, "B": B}, {"z": z_map + 1e-3 * soft}, layout)
    torch.testing.assert_close(cb_soft.bound, torch.full((8,), 1e-3, dtype=F64), rtol=1e-8, atol=0)
    torch.testing.assert_close(cb.min_eig, torch.full((8,), float(torch.linalg.eigvalsh(H)[0]), dtype=F64))


def test_coupled_bound_uses_the_full_hessian():
    # Gaussian kGLM: F(u) = |u|^2 lam/2 + |y - L u|^2 / 2, Hessian lam I + L^T L (closed form).
    model = KernelGLM(gaussian(), SquaredExponential(lengthscale=1.0), lam=2.0)
    data = model.validate(model.simulate(12, seed=0, dtype=F64).data)
    L = model.cholesky(data["x"])
    u = torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(1))
    layout = site_layout(model, data)
    assert layout.coupled and layout.local_width == 12
    cb = certified_bound(model, data, {}, {"u": u}, layout)
    H = model.lam * torch.eye(12, dtype=F64) + L.T @ L
    grad = H @ u - L.T @ data["y"]
    want = grad.norm() / torch.linalg.eigvalsh(H)[0]
    assert cb.bound.shape == (1,)
    assert float(cb.bound[0]) == pytest.approx(float(want), rel=1e-10)


def test_coupled_models_refuse_labels():
    model = KernelGLM(bernoulli(), SquaredExponential(), lam=1.0)
    data = model.simulate(20, seed=0, dtype=F64).data
    with pytest.raises(ValueError, match="coupled across rows"):
        compare(model, data, methods=["lbfgs"], labels=torch.zeros(20), progress=False)


# ------------------------------------------------------------- a user's model and encoder
def test_a_user_model_and_encoder_add_a_row_without_touching_the_harness():
    """A Pyro program wrapped by the protocol, plus an encoder class: compare runs it."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    from deqppl.encoders import AbstractMAPEncoder
    from deqppl.protocols import PyroModel

    d, noise = 3, 0.5

    def program(y=None, *, num_data=None):
        n = y.shape[0] if y is not None else num_data
        dtype = y.dtype if y is not None else torch.get_default_dtype()
        zero = torch.zeros(d, dtype=dtype)
        mu = pyro.sample("mu", dist.Normal(zero, 1.0).to_event(1))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
            return pyro.sample("y", dist.Normal(mu + z, noise).to_event(1), obs=y)

    model = PyroModel(program, data_names=("y",), local_sites=("z",), global_sites=("mu",))

    class ShiftEncoder(AbstractMAPEncoder):
        # F(z) = |z|^2/2 + |y - mu - z|^2 / (2 noise^2); the layer is a Newton step on F
        def __init__(self, model, *, solver=None, adjoint=None, throw=True, seed=0):
            super().__init__(model, solver=solver, adjoint=adjoint, throw=throw)
            self.mu = nn.Parameter(torch.zeros(d))

        def layer(self, z, data):
            curvature = 1.0 + noise**-2
            grad = z - (data["y"] - self.mu - z) / noise**2
            return z - grad / curvature

        def latent_shape(self, data):
            return tuple(data["y"].shape)

        def initial_guess(self, data):
            return torch.zeros_like(data["y"])

        def to_sites(self, z, data):
            return {"z": z}

    data = model.simulate(40, seed=0, dtype=F64).data
    methods = [DEQMethod(name="shift", encoder=ShiftEncoder, optimizer=LBFGS(max_steps=100)), LBFGSMethod()]
    r = compare(model, data, methods=methods, progress=False)
    assert set(r.summary.index) == {"shift", "lbfgs"}
    # the closed form z* = (y - mu) / (1 + noise^2) under the shared globals
    mu = r.shared_globals["mu"]
    closed = (r.heldout_data["y"] - mu) / (1 + noise**2)
    torch.testing.assert_close(r.local_values["shift"]["z"], closed, rtol=0, atol=1e-10)
    assert float(r.bounds["shift"].max()) < 1e-10
