"""DeepPEDEncoder: its fixed point is the joint MAP of the hierarchical Pyro model (SPEC §3)."""

import pytest
import torch

from deqppl.encoders import AbstractMAPEncoder, DeepPEDEncoder, PEDEncoder, default_rtol
from deqppl.expfam import gaussian, identity, relu, smooth_relu
from deqppl.inference import fit_map
from deqppl.optim import LBFGS
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA

N = 10
SR = smooth_relu(0.5)

# (id, widths, nonlinearities, precisions). Globals are drawn from the model with
# param_scale = 0.5, where the posteriors of these smooth-ReLU stacks are unimodal (the
# Hessian at the MAP is asserted PD below); with param_scale = 1, L = 3 has several local minima.
CASES = [
    ("L1-identity", (6, 3), (identity(),), (2.0, 0.5)),
    ("L1-smooth_relu", (6, 3), (SR,), (2.0, 2.0)),
    ("L2-identity", (6, 4, 2), (identity(), identity()), (2.0, 1.5, 0.7)),
    ("L2-smooth_relu", (6, 4, 2), (SR, SR), (2.0, 1.5, 0.7)),
    ("L3-mixed", (7, 4, 3, 2), (SR, identity(), smooth_relu(1.0)), (2.0, 1.5, 1.5, 1.3)),
]


def _setup(widths, nls, precs, *, n=N, seed=0):
    model = HierarchicalExpFamPCA(widths=widths, nonlinearities=nls, precisions=precs,
                                  param_scale=0.5)
    sim = model.simulate(n, seed=seed, dtype=torch.float64)
    globals_ = {k: sim.truth[k] for k in model.global_sites}
    return model, sim.data["y"], globals_


def _locals(zs):
    return {f"z{l}": z for l, z in enumerate(zs, start=1)}


def _grad_and_hessian(model, y, globals_, zeta, widths):
    """Per-row gradient ``(n, D)`` and Hessian ``(n, D, D)`` of -log joint w.r.t. zeta."""
    def neg(z):
        return -model.log_joint({"y": y}, {**globals_, **_locals(torch.split(z, widths, dim=1))})

    z = zeta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(neg(z), z)
    H = torch.autograd.functional.hessian(neg, zeta.detach())
    n = zeta.shape[0]
    return g, torch.stack([H[i, :, i, :] for i in range(n)])


@pytest.mark.parametrize("widths, nls, precs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fixed_point_is_map_of_hierarchical_model(widths, nls, precs):
    model, y, globals_ = _setup(widths, nls, precs)
    enc = DeepPEDEncoder.from_values(model, globals_)
    with torch.no_grad():
        zs, sol = enc(y)
    assert bool(sol.converged.all())
    assert [z.shape for z in zs] == [(N, w) for w in widths[1:]]
    fit = fit_map(model, {"y": y}, optimizer=LBFGS(), fixed=globals_, progress=False)
    assert fit.converged
    lj_enc = model.log_joint({"y": y}, {**globals_, **_locals(zs)})
    lj_fit = fit.log_joint
    assert abs(float(lj_enc - lj_fit)) <= 1e-6 * abs(float(lj_fit))
    assert float(lj_enc) >= float(lj_fit) - 1e-12 * abs(float(lj_fit))

    # Both answers are near-stationary; the Hessian at the encoder's point is PD (a strict
    # local minimum). State tolerance: to first order ||z - z'|| <= (||g|| + ||g'||) / mu with
    # mu the smallest Hessian eigenvalue; the factor 2 allows for the Hessian varying between
    # the two points (they are ~1e-6 apart, where it changes by ~1e-6 relative).
    zeta = sol.value
    zeta_fit = torch.cat([fit.values[f"z{l}"] for l in range(1, len(widths))], dim=1)
    g, H = _grad_and_hessian(model, y, globals_, zeta, list(widths[1:]))
    g_fit, _ = _grad_and_hessian(model, y, globals_, zeta_fit, list(widths[1:]))
    mu = torch.linalg.eigvalsh(H)[:, 0]
    assert bool((mu > 0).all())
    dist = (zeta - zeta_fit).norm(dim=1)
    assert bool((dist <= 2 * (g.norm(dim=1) + g_fit.norm(dim=1)) / mu + 1e-12).all())
    # Stationarity of the Pyro log joint at the fixed point: G(zeta) - zeta = -Lambda^{-1} grad F,
    # so ||grad F|| <= max(lambda) * residual <= max(lambda) * 1e-8 ||zeta|| (solver rtol).
    bound = max(precs[1:]) * 1e-8 * zeta.norm(dim=1) + 1e-12
    assert bool((g.norm(dim=1) <= bound).all()), (g.norm(dim=1), bound)
    # The analytic Hessian is the autograd Hessian of the Pyro log joint.
    assert torch.allclose(enc.hessian(zeta, y), H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("widths, nls, precs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_layer_jacobian_is_autograd_and_block_tridiagonal(widths, nls, precs):
    model, y, globals_ = _setup(widths, nls, precs, n=3)
    enc = DeepPEDEncoder(model, globals_)
    zeta = torch.randn(3, enc.latent_dim, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: enc.layer(z, y), zeta)
    blocks = torch.stack([J[i, :, i, :] for i in range(3)])
    analytic = enc.layer_jacobian(zeta, y).detach()
    assert torch.allclose(analytic, blocks, rtol=1e-10, atol=1e-12)
    # blocks more than one layer apart are zero
    edges = [0]
    for w in widths[1:]:
        edges.append(edges[-1] + w)
    for a in range(len(widths) - 1):
        for b in range(len(widths) - 1):
            if abs(a - b) > 1:
                assert analytic[:, edges[a]:edges[a + 1], edges[b]:edges[b + 1]].abs().max() == 0


def test_layer_is_spec_section3_formula():
    # L = 2, identity R: G1 = z2-term / sqrt(lam1) + W1^T (sqrt(lam0) y - eta1) / lam1,
    # G2 = W2^T (sqrt(lam1) z1 - eta2) / lam2, written out independently.
    lam0, lam1, lam2 = 2.0, 1.5, 0.7
    model, y, g = _setup((5, 3, 2), (identity(), identity()), (lam0, lam1, lam2), n=4)
    enc = DeepPEDEncoder(model, g)
    z1 = torch.randn(4, 3, dtype=torch.float64)
    z2 = torch.randn(4, 2, dtype=torch.float64)
    eta1 = z1 @ g["W1"].T + g["b1"]
    eta2 = z2 @ g["W2"].T + g["b2"]
    G1 = eta2 / lam1**0.5 + (lam0**0.5 * y - eta1) @ g["W1"] / lam1
    G2 = (lam1**0.5 * z1 - eta2) @ g["W2"] / lam2
    out = enc.layer(torch.cat([z1, z2], 1), y)
    assert torch.allclose(out, torch.cat([G1, G2], 1), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("nl", [identity(), SR], ids=["identity", "smooth_relu"])
def test_one_layer_reduces_to_ped_encoder(nl):
    # HierarchicalExpFamPCA with L = 1 is ExpFamPCA with family gaussian(lambda^(0)),
    # lam = lambda^(1), W = W1, B = b1.
    lam0, lam1 = 2.0, 2.0  # lam1 large enough for Theorem 1 with smooth ReLU
    model, y, g = _setup((6, 3), (nl,), (lam0, lam1))
    deep = DeepPEDEncoder(model, g)
    flat = PEDEncoder(ExpFamPCA(family=gaussian(lam0), obs_dim=6, latent_dim=3,
                                nonlinearity=nl, lam=lam1), W=g["W1"], B=g["b1"])
    with torch.no_grad():
        (z1,), _ = deep(y)
        z, _ = flat(y)
        zeta = torch.randn(N, 3, dtype=torch.float64)
    assert torch.allclose(z1, z, rtol=0, atol=1e-9)  # both solved to rtol 1e-8, H >= lam1 I
    assert torch.allclose(deep.layer(zeta, y), flat.layer(zeta, y), rtol=1e-13, atol=1e-14)


def test_gradients_through_the_wide_fixed_point():
    from deqppl.deq import Newton

    model, y, g = _setup((5, 3, 2), (identity(), SR), (2.0, 1.5, 0.7), n=3)
    # gradcheck's central differences divide the forward error by eps = 1e-6: solve to
    # round-off (Newton converges here; the L2 posterior is unimodal at this scale).
    enc = DeepPEDEncoder(model, g, solver=Newton(rtol=1e-13, atol=0.0, max_steps=100))
    names = list(model.global_sites)

    def f(*params):
        zs, _ = torch.func.functional_call(enc, dict(zip(names, params)), (y,))
        return torch.cat(zs, 1)

    inputs = tuple(g[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(f, inputs)


def test_values_and_input_checks():
    model, y, g = _setup((6, 4, 2), (SR, SR), (2.0, 1.5, 0.7))
    enc = DeepPEDEncoder(model, g)
    vals = enc.values()
    assert set(vals) == set(model.global_sites)
    assert all(torch.equal(vals[k], g[k]) for k in vals)
    assert {name for name, _ in enc.named_parameters()} == set(model.global_sites)
    with pytest.raises(ValueError, match="missing"):
        DeepPEDEncoder(model, {"W1": g["W1"]})
    with pytest.raises(ValueError, match="W2"):
        DeepPEDEncoder(model, {**g, "W2": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="6"):
        enc(torch.zeros(2, 5, dtype=torch.float64))
    bad = y.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"(?s)row 1.*column 2|\(1, 2\)"):
        enc(bad)


def test_default_solver_choice():
    from deqppl.deq import Anderson, Newton

    lin, _, g = _setup((6, 4, 2), (identity(), identity()), (1.0, 1.0, 1.0))
    sr, _, g2 = _setup((6, 4, 2), (SR, SR), (1.0, 1.0, 1.0))
    assert isinstance(DeepPEDEncoder(lin, g).default_solver(torch.float64), Newton)
    assert isinstance(DeepPEDEncoder(sr, g2).default_solver(torch.float64), Anderson)


# ------------------------------------------------------------------------- the encoder protocol
def test_deep_implements_the_encoder_protocol():
    widths, nls, precs = CASES[3][1:]
    model, y, globals_ = _setup(widths, nls, precs)
    enc = DeepPEDEncoder.from_values(model, globals_)
    assert isinstance(enc, AbstractMAPEncoder)
    sites, sol = enc.sites({"y": y})
    assert list(sites) == list(model.local_sites)
    assert [sites[k].shape for k in model.local_sites] == [(N, w) for w in widths[1:]]
    assert torch.equal(torch.cat(list(sites.values()), dim=1), sol.value)
    assert enc.values().keys() == set(model.global_sites)
    # the stacked start is z0 (formerly zeta0), warm start converges at once
    again = enc.solve(y, z0=sol.value)
    assert again.num_steps <= 1
    with pytest.raises(ValueError, match=r"z0 must have shape \(10, 6\)"):
        enc.solve(y, z0=sol.value[:, :-1])


@pytest.mark.parametrize("widths, nls, precs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_deep_hessian_and_laplace_from_the_protocol(widths, nls, precs):
    # The analytic H = Lambda (I - J_G) against the base class's autograd Hessian of the Pyro
    # log joint, and the Laplace approximation the protocol now gives the deep encoder.
    model, y, globals_ = _setup(widths, nls, precs)
    enc = DeepPEDEncoder.from_values(model, globals_)
    data = enc.check_data(y)
    zeta = enc.solve(data, validated=True).value
    torch.testing.assert_close(enc.hessian(zeta, data), AbstractMAPEncoder.hessian(enc, zeta, data),
                               rtol=1e-10, atol=1e-12)
    lap = enc.laplace(y, zeta)
    _, H = _grad_and_hessian(model, y, globals_, zeta, list(widths[1:]))
    torch.testing.assert_close(lap.precision, H, rtol=1e-10, atol=1e-12)
    eye = torch.eye(zeta.shape[1], dtype=torch.float64).expand_as(H)
    torch.testing.assert_close(lap.precision @ lap.covariance, eye, rtol=0, atol=1e-9)
    assert bool((enc.spectral_radius(y, zeta) >= 0).all())


def test_deep_float32_uses_the_shared_tolerance():
    widths, nls, precs = CASES[3][1:]
    model, y, globals_ = _setup(widths, nls, precs)
    enc = DeepPEDEncoder.from_values(model, {k: v.float() for k, v in globals_.items()})
    assert enc.default_solver(torch.float32).rtol == default_rtol(torch.float32) == 1e-4
    with torch.no_grad():
        zs, sol = enc(y.float())
    assert bool(sol.converged.all()) and zs[0].dtype == torch.float32
    # What the tolerance promises, recomputed in float64 with the float64 encoder: the relative
    # residual of the float32 fixed point is within 1e-4 plus float32 rounding of the iterate
    # (~1e-7 relative), so 2e-4.
    enc64 = DeepPEDEncoder.from_values(model, globals_)
    with torch.no_grad():
        z = sol.value.double()
        g = enc64.layer(z, y)
        rel = torch.linalg.vector_norm(g - z, dim=1) / torch.linalg.vector_norm(g, dim=1)
    assert float(rel.max()) <= 2e-4


def test_hard_relu_zero_start_is_not_a_spurious_fixed_point():
    # With the mask Theta(0) = 0, zeta = 0 with b = 0 (the default start and initialisation)
    # was a fixed point of the wide layer for every y (all pre-activations on the kink), so the
    # deep rectified encoder returned zeros (Figure 7's L = 2 column). Now G(0) != 0 and a
    # solve from 0 moves to a point with a higher Pyro log joint (the independent oracle).
    model = HierarchicalExpFamPCA(widths=(6, 3, 2), nonlinearities=(relu(), relu()))
    enc = DeepPEDEncoder(model, seed=1, throw=False).double()
    y = torch.rand(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    zeta0 = torch.zeros(5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert float((enc.layer(zeta0, y) - zeta0).norm()) > 1e-3
        zeta = enc.solve(y).value
    assert float(zeta.abs().max()) > 1e-3
    globals_ = {k: v.detach() for k, v in enc.site_parameters().items()}
    per = lambda zz: model.log_joint({"y": y}, {**globals_, **enc.to_sites(zz)}, per_datum=True)
    assert bool((per(zeta) > per(zeta0)).all())
