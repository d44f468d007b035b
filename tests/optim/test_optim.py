"""deqppl.optim: settings validation, the L-BFGS line search and the shared driver."""

import math

import pytest
import torch

from deqppl.optim import (
    LBFGS,
    SVI,
    AbstractFitResult,
    AbstractStepper,
    Adam,
    ConstantLR,
    CosineDecay,
    ExponentialDecay,
    FitStatus,
    Observation,
    PlateauDecay,
    StopRules,
    drive,
    minimize,
)

F64 = torch.float64

# ------------------------------------------------------------------ nonsense settings
BAD_SETTINGS = [
    (LBFGS, "max_steps", -1, "integer >= 0"),
    (LBFGS, "max_steps", 2.5, "integer >= 0"),
    (LBFGS, "max_steps", True, "integer >= 0"),
    (LBFGS, "gtol", -1e-3, r"\[0, inf\)"),
    (LBFGS, "gtol", math.nan, r"\[0, inf\)"),
    (LBFGS, "xtol", math.inf, r"\[0, inf\)"),
    (LBFGS, "rtol", -1.0, r"\[0, inf\)"),
    (LBFGS, "history_size", 0, "integer >= 1"),
    (LBFGS, "max_linesearch", 0, "integer >= 1"),
    (LBFGS, "c1", 0.0, r"\(0, 0.5\)"),
    (LBFGS, "c2", 1.0, r"\(0.0001, 1\)"),
    (SVI, "lr", 0.0, r"\(0, inf\)"),
    (SVI, "lr", -0.1, r"\(0, inf\)"),
    (SVI, "lr", math.nan, r"\(0, inf\)"),
    (SVI, "lr", math.inf, r"\(0, inf\)"),
    (SVI, "max_steps", -5, "integer >= 0"),
    (SVI, "subsample_size", 0, "integer >= 1"),
    (SVI, "window", 0, "integer >= 1"),
    (SVI, "rtol", math.nan, r"\[0, inf\)"),
    (SVI, "xtol", -1.0, r"\[0, inf\)"),
    (SVI, "betas", (0.9, 1.0), r"\[0, 1\)"),
    (Adam, "lr", 0.0, r"\(0, inf\)"),
    (Adam, "num_epochs", 0, "integer >= 1"),
    (Adam, "batch_size", 0, "integer >= 1"),
    (Adam, "batch_size", 12.0, "integer >= 1"),
    (Adam, "rtol", -1e-6, r"\[0, inf\)"),
    (PlateauDecay, "factor", 1.0, r"\(0, 1\)"),
    (PlateauDecay, "factor", 0.0, r"\(0, 1\)"),
    (ExponentialDecay, "final_factor", 0.0, r"\(0, 1\]"),
    (CosineDecay, "final_factor", 1.5, r"\[0, 1\]"),
]


@pytest.mark.parametrize(
    ("cls", "field", "value", "allowed"),
    BAD_SETTINGS,
    ids=[f"{c.__name__}.{f}={v!r}" for c, f, v, _ in BAD_SETTINGS],
)
def test_nonsense_settings_name_field_value_and_range(cls, field, value, allowed):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} = .* {field} must be .*{allowed}"):
        cls(**{field: value})


def test_schedule_must_be_an_object_and_defaults_build():
    with pytest.raises(TypeError, match="schedule"):
        SVI(schedule="plateau")
    with pytest.raises(TypeError, match="schedule"):
        Adam(schedule=0.5)
    for obj in (LBFGS(), SVI(), Adam(), PlateauDecay(), ExponentialDecay(), CosineDecay(), ConstantLR()):
        assert obj == type(obj)()  # frozen value objects: equal settings compare equal
    with pytest.raises(Exception):
        LBFGS().max_steps = 3  # frozen
    with pytest.raises(TypeError):
        LBFGS(500)  # keyword-only


def test_dtype_defaults_of_the_tolerances():
    eps64, eps32 = torch.finfo(F64).eps, torch.finfo(torch.float32).eps
    assert LBFGS().resolved_gtol(F64) == pytest.approx(eps64 ** (2 / 3))
    assert LBFGS().resolved_gtol(torch.float32) == pytest.approx(eps32 ** (2 / 3))
    assert LBFGS(gtol=1e-3).resolved_gtol(F64) == 1e-3
    assert SVI().resolved_tolerances(F64) == pytest.approx((10 * eps64, eps64**0.5, eps64**0.5))


def test_schedules():
    assert ConstantLR().lr(0.1, step=7, max_steps=10, num_plateaus=4) == 0.1
    assert PlateauDecay(factor=0.5, min_factor=0.1).lr(1.0, step=0, max_steps=1, num_plateaus=10) == 0.1
    exp = ExponentialDecay(final_factor=1e-2)
    assert exp.lr(1.0, step=0, max_steps=100, num_plateaus=0) == 1.0
    assert exp.lr(1.0, step=100, max_steps=100, num_plateaus=0) == pytest.approx(1e-2)
    cos = CosineDecay(final_factor=0.1)
    assert cos.lr(2.0, step=100, max_steps=100, num_plateaus=0) == pytest.approx(0.2)
    assert cos.lr(2.0, step=0, max_steps=100, num_plateaus=0) == pytest.approx(2.0)


def test_abstract_result_is_not_instantiated():
    with pytest.raises(TypeError, match="base class"):
        AbstractFitResult(
            loss_trace=torch.zeros(1), num_steps=0, num_grad_evals=0, wall_time=0.0,
            status=FitStatus.CONVERGED, criterion="", grad_norm=0.0, optimizer=LBFGS(),
        )


# ------------------------------------------------------------------ L-BFGS against oracles
def _spd(n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=F64)) @ Q.T


@pytest.mark.parametrize("offset", [0.0, 1e12], ids=["no-offset", "offset-1e12"])
def test_strongly_convex_quadratic_reaches_the_minimiser_to_1e10(offset):
    """With a constant offset of 1e12 the loss differences near the optimum (~1e-20) are far
    below the loss's rounding (~1e-4): only a derivative-driven line search gets there."""
    A = _spd(50, 1e3)
    b = torch.linspace(-1, 1, 50, dtype=F64)
    x_star = torch.linalg.solve(A, b)
    res = minimize(lambda x: 0.5 * x @ A @ x - b @ x + offset, torch.zeros(50, dtype=F64),
                   optimizer=LBFGS(gtol=1e-12 if offset == 0 else 1e-24))
    err = float((res.x - x_star).abs().max())
    assert err < 1e-10, (err, res)
    # the certificate of a strongly convex loss: ||x - x*|| <= ||g|| / mu, mu = 1 here
    assert (res.x - x_star).norm() <= res.grad_norm / 1.0 + 1e-15
    if offset:
        # gtol 1e-24 * |f|/n: unattainable; it ends STALLED, honestly, having reached the minimiser
        assert res.status in (FitStatus.CONVERGED, FitStatus.STALLED)
    else:
        assert res.converged, res


def test_matches_newton_on_logistic_regression():
    """Ridge logistic regression: L-BFGS equals Newton's method (quadratic convergence, run
    to a gradient of 1e-15) to 1e-10. (scipy's BFGS and L-BFGS-B, whose line searches
    compare loss values, stop here at max |grad| ~ 5e-8, 1.5e-9 away.)"""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g, dtype=F64)
    y = (torch.rand(200, generator=g, dtype=F64) < torch.sigmoid(X @ torch.ones(5, dtype=F64))).to(F64)

    def loss(w):
        eta = X @ w
        return (torch.nn.functional.softplus(eta) - y * eta).sum() + 0.5 * w @ w

    res = minimize(loss, torch.zeros(5, dtype=F64))
    w = torch.zeros(5, dtype=F64)
    for _ in range(30):
        p = torch.sigmoid(X @ w)
        H = X.T @ (X * (p * (1 - p))[:, None]) + torch.eye(5, dtype=F64)
        w = w - torch.linalg.solve(H, X.T @ (p - y) + w)
    assert res.converged, res
    # strongly convex (Hessian >= I): ||w - w*|| <= ||g||, and L-BFGS's ||g|| is ~1e-11
    assert float((res.x - w).abs().max()) < 1e-10


def test_rosenbrock():
    def rosen(x):
        return ((1 - x[:-1]) ** 2).sum() + 100 * ((x[1:] - x[:-1] ** 2) ** 2).sum()

    res = minimize(rosen, torch.full((6,), -1.2, dtype=F64), optimizer=LBFGS(max_steps=2000))
    assert res.converged, res
    assert float((res.x - 1).abs().max()) < 1e-9


def test_nonfinite_trial_points_are_backtracked():
    # f = +inf for x > 3 (a barrier the first trial step overshoots); minimiser at 2.5
    def f(x):
        v = (x - 2.5) ** 2
        return torch.where(x > 3, torch.full_like(v, math.inf), v).sum()

    res = minimize(f, torch.tensor([-10.0], dtype=F64))
    assert res.converged and abs(float(res.x) - 2.5) < 1e-10, res


def test_nonfinite_start_is_reported_not_raised():
    res = minimize(lambda x: torch.log(x).sum(), torch.tensor([-1.0], dtype=F64))
    assert res.status is FitStatus.NONFINITE and res.num_steps == 0
    assert torch.equal(res.x, torch.tensor([-1.0], dtype=F64))


def test_unbounded_below_stops_by_the_cap():
    res = minimize(lambda x: -x.sum(), torch.zeros(2, dtype=F64), optimizer=LBFGS(max_steps=5))
    assert res.status in (FitStatus.MAX_STEPS, FitStatus.NONFINITE)
    assert not res.converged


def test_minimize_rejects_other_optimizers():
    with pytest.raises(TypeError, match="LBFGS"):
        minimize(lambda x: x.sum(), torch.zeros(1, dtype=F64), optimizer=SVI())


# ------------------------------------------------------------------ the driver
class _Scripted(AbstractStepper):
    """Replays observations, to test the driver's rules in isolation."""

    def __init__(self, observations):
        self.obs = list(observations)

    def start(self):
        return self.obs.pop(0)

    def step(self, budget):
        return self.obs.pop(0)


def _run(obs, rules, max_steps=10):
    return drive(_Scripted(obs), rules, max_steps=max_steps, progress=False, desc="t")


def test_driver_rules_and_their_order():
    rules = StopRules(gtol=1e-3, num_coords=1, rtol=1e-8, xtol=1e-6)
    out = _run([Observation(loss=1.0, grad_max=1.0), Observation(loss=0.5, grad_max=1e-4)], rules)
    assert out.status is FitStatus.CONVERGED and "max |grad|" in out.criterion
    assert out.num_steps == 1 and out.trace == [1.0, 0.5]
    out = _run([Observation(loss=1.0, grad_max=1.0), Observation(loss=math.inf, grad_max=1e-9)], rules)
    assert out.status is FitStatus.NONFINITE  # non-finite comes first, even with a tiny gradient
    out = _run([Observation(loss=1.0), Observation(loss=1.0 + 1e-12)], rules)
    assert out.status is FitStatus.CONVERGED and "relative loss change" in out.criterion
    out = _run([Observation(loss=1.0), Observation(loss=2.0, step_max=1e-7)], rules)
    assert out.status is FitStatus.CONVERGED and "max |step|" in out.criterion
    out = _run([Observation(loss=1.0, grad_max=1.0), Observation(loss=0.9, grad_max=0.5, stalled="stuck")], rules)
    assert out.status is FitStatus.STALLED and "stuck" in out.criterion
    out = _run([Observation(loss=float(k)) for k in range(4, 0, -1)], StopRules(), max_steps=3)
    assert out.status is FitStatus.MAX_STEPS and "cap 3" in out.criterion and out.num_steps == 3


def test_gradient_rule_is_relative_to_the_loss_per_coordinate():
    rules = StopRules(gtol=1e-6, num_coords=10)
    assert rules.gradient_threshold(0.5) == 1e-6  # floor max(1, .)
    assert rules.gradient_threshold(-1e4) == pytest.approx(1e-3)  # |f| / n = 1000
    assert rules.gradient_threshold(-1e4, start_loss=-10.0) == 1e-6  # the smaller magnitude


def test_gradient_rule_also_needs_a_small_model_decrement():
    rules = StopRules(gtol=1e-6, num_coords=10)
    # the gradient bound holds (1e-4 <= 1e-6 * 1e6 / 10) but the model still expects the loss
    # to fall by 10 > 1e-6 * 1e6: not converged
    far = Observation(loss=1e6, grad_max=1e-4, decrement=10.0)
    assert rules.check(far, prev_loss=None) is None
    near = Observation(loss=1e6, grad_max=1e-4, decrement=0.5)
    status, text = rules.check(near, prev_loss=None)
    assert status is FitStatus.CONVERGED and "model decrement 0.5" in text


def test_a_loss_dominated_by_its_data_is_not_stopped_at_the_start():
    """0.5 |x - c|^2 with c = 1e12: at x = 0 the gradient (1e12) is tiny against |f|/n (5e23),
    so the gradient rule alone declared the start converged; the model decrement (the loss can
    still fall by all of itself) keeps the fit going to the minimiser."""
    c = torch.full((5,), 1e12, dtype=F64)
    res = minimize(lambda x: 0.5 * ((x - c) ** 2).sum(), torch.zeros(5, dtype=F64))
    assert res.converged and res.num_steps >= 1, res
    assert float((res.x - c).abs().max()) <= 1e-3 * 1e12 * 1e-9, res  # relative 1e-12


def test_driver_callback_and_multi_update_steps():
    seen = []
    obs = [Observation(loss=3.0, num_steps=0)] + [
        Observation(loss=2.0, losses=(2.5, 2.0), num_steps=2, num_evals=2),
        Observation(loss=1.0, losses=(1.5, 1.0), num_steps=2, num_evals=2),
    ]
    out = drive(_Scripted(obs), StopRules(), max_steps=4, progress=False, desc="t",
                callback=lambda k, f: seen.append((k, f)))
    assert seen == [(2, 2.0), (4, 1.0)]
    assert out.trace == [3.0, 2.5, 2.0, 1.5, 1.0] and out.num_evals == 5
