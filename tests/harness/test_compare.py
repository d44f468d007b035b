"""The comparison harness on small simulated data: DEQ latents against L-BFGS, schema, resume."""

import math

import pandas as pd
import pytest
import torch
from dataclasses import dataclass, field

from deqppl.expfam import family
from deqppl.optim import LBFGS, SVI
from deqppl.harness import (
    COLUMNS,
    METHODS,
    AbstractMethod,
    DEQMethod,
    LBFGSMethod,
    RunStore,
    SVIMethod,
    TIMING_METRICS,
    compare,
    method,
)
from deqppl.models import ExpFamPCA

F64 = torch.float64


@pytest.fixture(scope="module")
def poisson_comparison():
    # Poisson at param_scale 0.5 keeps rates moderate (as tests/inference/test_map.py).
    model = ExpFamPCA(family=family("poisson"), obs_dim=10, latent_dim=2, param_scale=0.5)
    sim = model.simulate(100, seed=1, dtype=F64)
    labels = (sim.truth["z"][:, 0] > 0).long() + (sim.truth["z"][:, 1] > 0).long()
    methods = [
        DEQMethod(optimizer=LBFGS(max_steps=8)),
        # Few SVI steps: only the schema is checked for SVI here; the digits test checks its
        # latents at convergence.
        SVIMethod(optimizer=SVI(max_steps=150, lr=0.05)),
        LBFGSMethod(),
    ]
    result = compare(model, sim.data, methods=methods, labels=labels, progress=False)
    return model, sim, result


def test_deq_heldout_latents_match_lbfgs(poisson_comparison):
    model, _, result = poisson_comparison
    s = result.summary
    print("\n", s.T.to_string())
    # The reference is the most accurate method: the smallest certified bound.
    assert result.reference == s["certified_bound"].idxmin()
    # Both solve the same strictly convex problem (SPEC §2.3) under the shared globals. The DEQ
    # stops at relative residual 1e-8, which bounds its distance to the MAP by ~1e-8 |z|; L-BFGS
    # stops at gradient 1.5e-8 (eps^1/2), i.e. |dz| <~ 1.5e-8 / lambda_min(H) <= 1.5e-8 (H >= I):
    # 1e-6 leaves room for both.
    assert s.loc["deq", "certified_bound"] < 1e-6 and s.loc["lbfgs", "certified_bound"] < 1e-6
    assert abs(s.loc["deq", "max_abs_dz"] - s.loc["lbfgs", "max_abs_dz"]) < 1e-6
    # the triangle inequality: two methods differ by at most the sum of their bounds (per row)
    for name in ("deq", "lbfgs", "svi"):
        dz = (result.latents[name] - result.latents[result.reference]).norm(dim=1)
        assert (dz <= result.bounds[name] + result.bounds[result.reference]).all()
    # log joint gap: second order in dz times the curvature (<~ |H| 1e-12 per row): 1e-8.
    assert abs(s.loc["deq", "log_joint_gap"] - s.loc["lbfgs", "log_joint_gap"]) < 1e-8
    assert s.loc["deq", "amortization_gap"] < 1e-8
    assert s.loc["deq", "converged"] == 1.0 and s.loc["lbfgs", "converged"] == 1.0
    # The log-likelihood alone is not stationary at the MAP: its gradient is lam z (the prior's
    # negative), so it moves to first order, by at most lam * sum|z| * max|dz| (x2 for slack).
    dz = float((result.latents["deq"] - result.latents["lbfgs"]).abs().max())
    bound = 2 * model.lam * float(result.latents["lbfgs"].abs().sum()) * dz
    assert abs(s.loc["deq", "heldout_log_lik"] - s.loc["lbfgs", "heldout_log_lik"]) <= bound
    # the gaps are measured against the best method, so they are >= 0 and one of them is 0
    gaps = s.loc[["deq", "svi", "lbfgs"], "log_joint_gap"]
    assert (gaps >= 0).all() and gaps.min() == 0.0


def test_table_schema(poisson_comparison):
    model, _, result = poisson_comparison
    t = result.table
    assert list(t.columns) == COLUMNS
    assert t["value"].dtype == "float64" and t["seed"].dtype == "int64"
    assert set(t["stage"]) == {"fit", "heldout"}
    assert (t["model"] == result.model_name).all()
    # one row per model x method x seed x stage x metric
    assert not t.duplicated(["model", "method", "seed", "stage", "metric"]).any()
    common = {"wall_time", "num_steps", "num_grad_evals", "converged", "log_joint", "log_joint_gap",
              "time_ratio_vs_deq"}
    for name in ("deq", "svi", "lbfgs"):
        fit = set(t[(t.method == name) & (t.stage == "fit")]["metric"])
        held = set(t[(t.method == name) & (t.stage == "heldout")]["metric"])
        assert common | {"subspace_angle"} <= fit
        assert common | {"max_abs_dz", "certified_bound", "min_hessian_eig", "heldout_log_lik",
                         "amortization_gap", "accuracy"} <= held
    deq = t[(t.method == "deq") & (t.stage == "heldout")].set_index("metric")["value"]
    assert {"spectral_radius", "spectral_radius_max", "diagnostics_wall_time"} <= set(deq.index)
    assert deq["time_ratio_vs_deq"] == 1.0
    # the angle of the shared fit's loadings to themselves is zero; angles are in [0, pi/2]
    angles = t[t.metric == "subspace_angle"].set_index("method")["value"]
    assert angles[result.globals_source[0]] == pytest.approx(0.0, abs=1e-7)
    assert ((angles >= 0) & (angles <= math.pi / 2 + 1e-12)).all()
    assert set(result.latents) == {"deq", "svi", "lbfgs"}
    assert result.latents["deq"].shape == (20, model.latent_dim)  # 20% of 100 rows held out
    assert all(tr.dim() == 1 and tr.numel() >= 1 for tr in result.traces.values())


def test_summary_shape_and_accuracy_rows(poisson_comparison):
    _, _, result = poisson_comparison
    s = result.summary
    assert list(s.index) == ["deq", "svi", "lbfgs", "pca"]
    assert s.index.name == "method"
    assert "fit_wall_time" in s.columns and "accuracy" in s.columns
    held_metrics = set(result.table[result.table.stage == "heldout"]["metric"])
    assert set(s.columns) == held_metrics | {"fit_wall_time"}
    assert s["accuracy"].between(0, 1).all()
    # the pca row carries only its accuracy
    assert s.loc["pca"].drop("accuracy").isna().all()
    # identical latents give identical predictions
    assert s.loc["deq", "accuracy"] == s.loc["lbfgs", "accuracy"]


def test_shared_globals_are_the_best_fit(poisson_comparison):
    _, _, result = poisson_comparison
    t = result.table
    fit_lj = t[(t.stage == "fit") & (t.metric == "log_joint")].set_index("method")["value"]
    assert result.globals_source[0] == fit_lj.idxmax()


def test_unknown_method_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown method 'newton'.*deq, lbfgs, svi"):
        method("newton")
    model = ExpFamPCA(family=family("bernoulli"), obs_dim=3, latent_dim=1)
    data = model.simulate(10, seed=0, dtype=F64).data
    with pytest.raises(ValueError, match="valid methods are: deq, lbfgs, svi"):
        compare(model, data, methods=["deq", "adam"], progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        compare(model, data, methods=["lbfgs", LBFGSMethod()], progress=False)
    assert set(METHODS) == {"deq", "svi", "lbfgs"}
    with pytest.raises(TypeError, match="abstract"):
        AbstractMethod()


def test_bad_labels_and_heldout_raise():
    model = ExpFamPCA(family=family("bernoulli"), obs_dim=3, latent_dim=1)
    y = model.simulate(10, seed=0, dtype=F64).data["y"]
    with pytest.raises(TypeError, match=r"data mapping .*\{'y': y\}; got Tensor"):
        compare(model, y, methods=["lbfgs"], progress=False)
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        compare(model, {"y": y}, methods=["lbfgs"], labels=torch.zeros(9), progress=False)
    with pytest.raises(ValueError, match="both labels and heldout_labels"):
        compare(model, {"y": y}, methods=["lbfgs"], heldout={"y": y[:2]}, labels=torch.zeros(10),
                progress=False)
    with pytest.raises(ValueError, match="needs 0 or 1"):
        compare(model, {"y": y}, methods=["lbfgs"], heldout={"y": y[:2] + 2}, progress=False)


# ------------------------------------------------------------------------------------ resume
@dataclass(frozen=True, kw_only=True)
class CountingMethod(AbstractMethod):
    """Wraps a method, counting calls; optionally interrupts its first infer_locals."""

    name: str
    inner: AbstractMethod
    calls: dict = field(default_factory=dict, repr=False, compare=False)
    interrupt: bool = field(default=False, repr=False, compare=False)

    def _count(self, key):
        self.calls[key] = self.calls.get(key, 0) + 1

    def fit_globals(self, model, data, *, seed, progress):
        self._count(("fit", seed))
        return self.inner.fit_globals(model, data, seed=seed, progress=progress)

    def infer_locals(self, model, data, globals, *, seed, progress):
        self._count(("heldout", seed))
        if self.interrupt and self.calls[("heldout", seed)] == 1 and seed == 1:
            raise KeyboardInterrupt
        return self.inner.infer_locals(model, data, globals, seed=seed, progress=progress)


_TIMING = set(TIMING_METRICS)


def _untimed(table):
    return table[~table.metric.isin(_TIMING)].reset_index(drop=True)


def test_interrupted_comparison_resumes_equal_without_recomputing(tmp_path):
    model = ExpFamPCA(family=family("bernoulli"), obs_dim=6, latent_dim=1)
    y = model.simulate(40, seed=2, dtype=F64).data

    def methods(interrupt=False):
        return [
            CountingMethod(name="a", inner=LBFGSMethod()),
            CountingMethod(name="b", inner=LBFGSMethod(optimizer=LBFGS(max_steps=5)), interrupt=interrupt),
        ]

    plain = compare(model, y, methods=methods(), seeds=(0, 1), progress=False)

    store = RunStore(tmp_path / "run")
    first = methods(interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        compare(model, y, methods=first, seeds=(0, 1), store=store, progress=False)
    # seed 0 done (4 units), seed 1: both fits and a's held-out unit: 7 records, no temp files
    assert len(store.units()) == 7
    assert not list((tmp_path / "run").rglob("*.tmp"))

    second = [CountingMethod(name=m.name, inner=m.inner) for m in first]
    resumed = compare(model, y, methods=second, seeds=(0, 1), store=store, progress=False)
    # only the interrupted unit ran again
    assert second[0].calls == {}
    assert second[1].calls == {("heldout", 1): 1}
    pd.testing.assert_frame_equal(_untimed(resumed.table), _untimed(plain.table))
    timed = resumed.table[resumed.table.metric.isin(_TIMING)]
    assert len(timed) == len(plain.table[plain.table.metric.isin(_TIMING)]) and timed.value.notna().all()
    for name in ("a", "b"):
        torch.testing.assert_close(resumed.latents[name], plain.latents[name], rtol=0, atol=0)
    # a store of another run (different data) is refused, not mixed in
    with pytest.raises(ValueError, match="different run"):
        compare(model, {"y": 1 - y["y"]}, methods=second, seeds=(0, 1), store=store, progress=False)


# ------------------------------------------------------------------------------ validate once
def _count_validate(monkeypatch, cls):
    calls = []
    original = cls.validate

    def counting(self, data):
        calls.append(type(self).__name__)
        return original(self, data)

    monkeypatch.setattr(cls, "validate", counting)
    return calls


@pytest.mark.parametrize("heldout", [False, True], ids=["split", "heldout-given"])
def test_compare_validates_each_data_set_once(monkeypatch, heldout):
    model = ExpFamPCA(family=family("poisson"), obs_dim=4, latent_dim=1, param_scale=0.5)
    data = model.simulate(30, seed=0, dtype=F64).data
    methods = [DEQMethod(optimizer=LBFGS(max_steps=5)), SVIMethod(optimizer=SVI(max_steps=20)),
               LBFGSMethod(optimizer=LBFGS(max_steps=20))]
    calls = _count_validate(monkeypatch, ExpFamPCA)
    if heldout:
        compare(model, {"y": data["y"][:20]}, heldout={"y": data["y"][20:]}, methods=methods, progress=False)
    else:
        compare(model, data, methods=methods, progress=False)
    # one per data mapping passed in: the rows (and the held-out rows); nothing inside re-checks
    assert calls == ["ExpFamPCA"] * (2 if heldout else 1)


def test_compare_validates_once_for_coupled_and_hierarchical_models(monkeypatch):
    from deqppl.encoders import DeepPEDEncoder
    from deqppl.expfam import gaussian
    from deqppl.kernels import SquaredExponential
    from deqppl.models import HierarchicalExpFamPCA, KernelGLM

    kglm = KernelGLM(gaussian(), SquaredExponential(), lam=1.0)
    deep = HierarchicalExpFamPCA(widths=(4, 2, 1))
    cases = [
        (kglm, [SVIMethod(optimizer=SVI(max_steps=20)), LBFGSMethod(optimizer=LBFGS(max_steps=20))]),
        (deep, [DEQMethod(encoder=DeepPEDEncoder, optimizer=LBFGS(max_steps=5)), LBFGSMethod(optimizer=LBFGS(max_steps=20))]),
    ]
    for model, methods in cases:
        data = model.simulate(20, seed=0, dtype=F64).data
        calls = _count_validate(monkeypatch, type(model))
        compare(model, data, methods=methods, progress=False)
        assert len(calls) == 1, type(model).__name__
