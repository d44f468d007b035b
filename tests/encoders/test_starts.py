"""Starts of the encoder solve (deqppl.encoders.starts): they change the cost, never the fixed point."""

import dataclasses
import itertools
import json

import pytest
import torch

from deqppl.encoders import (
    AbstractStart,
    DeepPEDEncoder,
    LearnedStart,
    PEDEncoder,
    RidgeStart,
    ZeroStart,
    load_start,
)
from deqppl.encoders.base import row_blocks
from deqppl.encoders.starts import _num_features, _polynomial, _polynomial_t
from deqppl.expfam import bernoulli, gaussian, identity, poisson, relu
from deqppl.inference import fit_map
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA

from test_ped import THEOREM1, _grad_log_joint, _setup  # noqa: E402

#: Every (family, nonlinearity) pair of the PED table with a unique fixed point
#: (tests/encoders/test_ped.py: scales of W where Theorem 1 holds). The hard ReLU, whose
#: posterior can have several local minima, is tested on its own below.
CASES = [c[:5] for c in THEOREM1]

#: Forward tolerance of these tests: Newton's last step is quadratic, so a relative residual
#: of 1e-12 is reached in about one more step than the default 1e-8; with H >= mu I the
#: distance of each answer to z* is at most its residual / mu, far below the 1e-10 asserted.
TIGHT_RTOL = 1e-12


def _tight(enc):
    enc.solver = dataclasses.replace(enc.default_solver(torch.float64), rtol=TIGHT_RTOL)
    return enc


def _case(fam, nl, lam, scale):
    model, y, W, B = _setup(fam, nl, lam, scale, n=12, seed=0)
    y_train = _setup(fam, nl, lam, scale, n=60, seed=3)[1]
    if nl == relu():
        y, y_train = y.abs(), y_train.abs()  # see test_relu_gaussian_fixed_point_is_local_map
    return model, y, y_train, W, B


# ------------------------------------------------------------------------- the answer is unchanged
@pytest.mark.parametrize("fam, nl, lam, scale", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_start_never_changes_the_fixed_point(fam, nl, lam, scale):
    model, y, y_train, W, B = _case(fam, nl, lam, scale)
    enc = _tight(PEDEncoder(model, W=W, B=B))
    learned = LearnedStart(degree=2).fit(enc, y_train)
    answers = {}
    for name, start in (("ridge", RidgeStart()), ("zero", ZeroStart()), ("learned", learned),
                        ("learned+fallback", dataclasses.replace(learned, fallback=RidgeStart()))):
        enc.start = start
        with torch.no_grad():
            z, sol = enc(y)
        assert bool(sol.converged.all()), name
        answers[name] = z
    for name, z in answers.items():
        assert torch.allclose(z, answers["ridge"], rtol=0, atol=1e-10), name
    # independent oracle: the Pyro log joint is stationary there (||grad|| = lam * residual)
    g = _grad_log_joint(model, y, W, B, answers["learned"])
    assert float(g.norm(dim=1).max()) <= lam * TIGHT_RTOL * float(answers["learned"].norm(dim=1).max()) + 1e-11


def test_hard_relu_start_picks_one_of_the_local_maps():
    # Theorem 2 (Tsuchida & Ong, 2023) allows up to 2^d stationary points, all local minima; a
    # start -- zero, ridge (= zero for R != identity) or learned -- selects one. Measured here:
    # the learned start reaches another local minimum than zero on some rows. Each answer is a
    # converged fixed point and a strict local minimum of the Pyro log joint.
    model, y, y_train, W, B = _case(gaussian(), relu(), 1.0, 0.3)
    enc = _tight(PEDEncoder(model, W=W, B=B))
    assert enc.uniqueness().theorem == "theorem 2"
    enc.start = LearnedStart(degree=2).fit(enc, y_train)
    with torch.no_grad():
        z, sol = enc(y)
    assert bool(sol.converged.all())
    g = _grad_log_joint(model, y, W, B, z)
    assert float(g.norm(dim=1).max()) <= TIGHT_RTOL * float(z.norm(dim=1).max()) + 1e-11
    eta = z @ W.T + B
    # independent form of SPEC §2.2 for the hard ReLU: z = W^T (Theta(eta) (y - eta)) / lam
    assert torch.allclose(z, ((eta > 0).double() * (y - eta)) @ W, rtol=0, atol=1e-10)
    # strict local minimum: H = lam I + W^T diag(Theta(eta)) W on the active pattern
    H = torch.eye(2, dtype=W.dtype) + torch.einsum("di,nd,dj->nij", W, (eta > 0).double(), W)
    assert bool((torch.linalg.eigvalsh(H) > 0).all())


def test_deep_encoder_learned_start_keeps_the_fixed_point():
    model = HierarchicalExpFamPCA(widths=(6, 3, 2))
    sim = model.simulate(80, seed=0, dtype=torch.float64)
    enc = DeepPEDEncoder(model, sim.truth)
    enc.solver = dataclasses.replace(enc.default_solver(torch.float64), rtol=TIGHT_RTOL)
    y_train, y = sim.data["y"][:60], sim.data["y"][60:]
    assert isinstance(enc.start, ZeroStart)
    with torch.no_grad():
        (z1, z2), _ = enc(y)
        enc.start = LearnedStart(degree=2).fit(enc, y_train)
        (w1, w2), sol = enc(y)
    assert bool(sol.converged.all())
    assert torch.allclose(torch.cat([w1, w2], 1), torch.cat([z1, z2], 1), rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match="RidgeStart needs a PED encoder"):
        enc.start = RidgeStart()
    with pytest.raises(TypeError, match="objective"):
        enc.start = LearnedStart(fallback=ZeroStart())


def test_start_fitted_for_other_globals_still_gives_the_fixed_point():
    model, y, y_train, W, B = _case(poisson(), THEOREM1[4][2], 1.0, 0.5)
    enc = _tight(PEDEncoder(model, W=W, B=B))
    stale = LearnedStart(degree=3).fit(enc, torch.cat([y_train, y_train]))
    gen = torch.Generator().manual_seed(7)
    enc.load_values({"W": W + 0.3 * torch.randn(W.shape, generator=gen, dtype=W.dtype), "B": -B})
    with torch.no_grad():
        z_ridge = enc(y)[0]
        enc.start = stale
        z_stale, sol = enc(y)
    assert bool(sol.converged.all())
    assert torch.allclose(z_stale, z_ridge, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------- the cost drops
def test_learned_start_reduces_newton_steps_on_a_fitted_model():
    model = ExpFamPCA(family=bernoulli(), obs_dim=12, latent_dim=2, param_scale=0.8)
    sim = model.simulate(400, seed=0, dtype=torch.float64)
    y_train, y_new = sim.data["y"][:300], sim.data["y"][300:]
    fit = fit_map(model, {"y": y_train}, progress=False)  # the globals of a fitted model
    enc = PEDEncoder.from_values(model, fit.values)
    learned = LearnedStart(degree=3).fit(enc, y_train)

    def steps(start):
        # one solve per row: the count of Newton steps that row needs (a batch steps until
        # its slowest row converges)
        enc.start = start
        with torch.no_grad():
            return torch.tensor([enc.solve(y_new[i:i + 1]).num_steps for i in range(len(y_new))],
                                dtype=torch.float64)

    ridge, mine = steps(RidgeStart()), steps(learned)
    assert float(mine.mean()) < float(ridge.mean()) - 1.0, (mine.mean(), ridge.mean())
    assert float(mine.max()) <= float(ridge.max())


def test_network_fits_what_the_polynomial_leaves():
    model = ExpFamPCA(family=poisson(), obs_dim=10, latent_dim=2, param_scale=0.5)
    sim = model.simulate(200, seed=0, dtype=torch.float64)
    enc = PEDEncoder.from_values(model, sim.truth)
    y = sim.data["y"]
    poly = LearnedStart(degree=2).fit(enc, y)
    net = LearnedStart(degree=2, hidden=(8,), max_steps=200).fit(enc, y)
    assert net.train_rmse < poly.train_rmse
    # the output layer starts at zero: the network can only improve on the least-squares fit
    assert [tuple(t.shape) for t in net.network] == [(8, 2), (8,), (2, 8), (2,)]


def test_start_is_clipped_to_the_range_of_the_training_fixed_points():
    model, y, y_train, W, B = _case(*THEOREM1[-1][1:])  # exponential: heavy-tailed rows
    enc = PEDEncoder(model, W=W, B=B)
    start = LearnedStart(degree=2).fit(enc, y_train)
    with torch.no_grad():
        z_train = enc(y_train)[0]
    assert torch.equal(start.z_low, z_train.min(0).values)
    z0 = start(enc, y * 1e3)  # rows far outside the training data
    margin = 0.25 * (start.z_high - start.z_low)  # starts._CLIP_MARGIN
    assert bool(((z0 >= start.z_low - margin) & (z0 <= start.z_high + margin)).all())
    assert bool(((z0 < start.z_low) | (z0 > start.z_high)).any())  # the margin is used


def test_polynomial_features_are_all_monomials():
    u = torch.randn(5, 3, dtype=torch.float64)
    feats = _polynomial(u, 3)
    ref = torch.stack([u[:, list(c)].prod(-1) for deg in (1, 2, 3)
                       for c in itertools.combinations_with_replacement(range(3), deg)], 1)
    assert feats.shape == (5, _num_features(3, 3)) == ref.shape
    assert torch.allclose(feats.sort(1).values, ref.sort(1).values, rtol=0, atol=1e-14)


def test_polynomial_of_rows_is_the_transposed_columns():
    u = torch.randn(7, 4, dtype=torch.float64)
    assert torch.equal(_polynomial_t(u.T.contiguous(), 3), _polynomial(u, 3).T)
    naive = torch.stack([u[:, list(c)].prod(-1) for deg in (1, 2, 3)
                         for c in itertools.combinations_with_replacement(range(4), deg)], 1)
    # the same set of monomials, each once (its order is _monomial_prefixes')
    torch.testing.assert_close(_polynomial(u, 3).sort(1).values, naive.sort(1).values,
                               rtol=0, atol=1e-14)


def test_blocked_start_is_the_whole_batch_regression():
    """LearnedStart evaluates its features in row blocks: the start of 20 000 rows (several
    blocks, a partial last one) is the regression z0 = phi(u) C + c, clipped, of the whole batch."""
    model, _, y_train, W, B = _case(bernoulli(), identity(), 1.0, 1.0)
    enc = PEDEncoder(model, W=W, B=B)
    start = LearnedStart(degree=3).fit(enc, y_train)
    y = model.simulate(20_000, seed=5, dtype=torch.float64).data["y"]
    assert len(row_blocks(len(y), start.coef.shape[0])) > 2
    u = (enc.summary(y) - start.mean) / start.scale
    whole = _polynomial(u, 3) @ start.coef + start.intercept
    margin = 0.25 * (start.z_high - start.z_low)  # starts._CLIP_MARGIN
    whole = torch.minimum(torch.maximum(whole, start.z_low - margin), start.z_high + margin)
    torch.testing.assert_close(start(enc, enc.check_data(y)), whole, rtol=0, atol=1e-12)
    ridge = RidgeStart()(enc, enc.check_data(y))  # blocked too: the closed form of its docstring
    eta_hat = model.family.link(0.5 * (y + model.family.dA(B)))
    want = torch.linalg.solve(torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W, W.T @ (eta_hat - B).T).T
    torch.testing.assert_close(ridge, want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- state
def test_state_round_trips_as_plain_tensors_and_json():
    model, y, y_train, W, B = _case(poisson(), THEOREM1[4][2], 1.0, 0.5)
    enc = PEDEncoder(model, W=W, B=B)
    for start in (LearnedStart(degree=2, fallback=RidgeStart()).fit(enc, y_train),
                  LearnedStart(degree=1, hidden=(4,), max_steps=20).fit(enc, y_train),
                  ZeroStart(), RidgeStart()):
        config, tensors = json.loads(json.dumps(start.config())), start.state_dict()
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
        again = load_start(config, tensors)
        assert type(again) is type(start)
        assert torch.equal(again(enc, y), start(enc, y))


# ------------------------------------------------------------------------- bad input
def test_bad_starts_raise_clearly():
    model, y, y_train, W, B = _case(poisson(), THEOREM1[4][2], 1.0, 0.5)
    enc = PEDEncoder(model, W=W, B=B)
    with pytest.raises(ValueError, match="not fitted"):
        LearnedStart()(enc, y)
    enc.start = LearnedStart()  # accepted as a setting, refused when it would run
    with pytest.raises(ValueError, match="not fitted"):
        enc(y)
    enc.start = RidgeStart()
    with pytest.raises(TypeError, match="start must be a deqppl.encoders start object"):
        PEDEncoder(model, W=W, B=B, start="ridge")
    with pytest.raises(ValueError, match="degree must be an integer >= 1"):
        LearnedStart(degree=0)
    with pytest.raises(ValueError, match="hidden must be a tuple"):
        LearnedStart(hidden=[8])
    with pytest.raises(TypeError, match="fallback must be a start object"):
        LearnedStart(fallback="ridge")
    with pytest.raises(ValueError, match="needs at least that many training rows, got 12"):
        LearnedStart(degree=4).fit(enc, y)  # 14 monomials + 1 coefficients > 12 rows
    fitted = LearnedStart(degree=2).fit(enc, y_train)
    with pytest.raises(ValueError, match=r"z must have shape \(60, 2\)"):
        LearnedStart(degree=2).fit(enc, y_train, z=torch.zeros(60, 3, dtype=torch.float64))
    # fitted for another encoder: summary width and latent size are checked before any work
    other = PEDEncoder(ExpFamPCA(family=poisson(), obs_dim=W.shape[0], latent_dim=3), seed=1).double()
    with pytest.raises(ValueError, match="fitted on summaries of width 2.*width 3"):
        fitted(other, y)
    with pytest.raises(ValueError, match="state is incomplete"):
        LearnedStart(mean=fitted.mean)
    state = fitted.state_dict()
    del state["coef"]
    with pytest.raises(ValueError, match=r"tensors \['coef'\] missing"):
        load_start(fitted.config(), state)
    with pytest.raises(ValueError, match="names no start"):
        load_start({"start": "Newton"})


def test_abstract_start_is_abstract():
    with pytest.raises(TypeError):
        AbstractStart()
