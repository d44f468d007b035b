"""Implicit classifiers in the harness: the tables carry the layers' own certificates."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from deqppl.deq import Anderson, ImplicitAdjoint
from deqppl.harness import (COLUMNS, ClassifierMethod, ClassifierStage, ClassifierTraining,
                            ImageSplit, LinearArchitecture, RunStore, SingleConvArchitecture,
                            compare_classifiers)
from deqppl.layers import (DEQFamily, ExplicitFamily, MonDEQFamily, PCDEQFamily, Sigmoid,
                           fit_classifier, implicit_layers)
from deqppl.report import classifier_markdown, classifier_tables, describe_metric

TRAINING = ClassifierTraining(num_epochs=2, batch_size=16, lr=1e-2)


def _split(n_train=48, n_test=24, size=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_train + n_test, 1, size, size, generator=g, dtype=dtype)
    y = (x[:, 0, : size // 2].mean((1, 2)) > x[:, 0, size // 2:].mean((1, 2))).long()
    return ImageSplit(name="toy", x_train=x[:n_train], y_train=y[:n_train],
                      x_test=x[n_train:], y_test=y[n_train:])


def _run(split, method, stage):
    return compare_classifiers([method], split, architectures=[LinearArchitecture(features=6)],
                               stages=[stage], progress=False)


def _metrics(result, method, stage="test", seed=0):
    t = result.table
    rows = t[(t["method"] == method) & (t["stage"] == stage) & (t["seed"] == seed)]
    return rows.set_index("metric")["value"]


def test_table_holds_the_layers_own_certificate():
    split = _split()
    family = PCDEQFamily(activation=Sigmoid())
    stage = ClassifierStage(training=TRAINING, seeds=(3,))
    result = _run(split, ClassifierMethod(name="pcdeq-2", family=family), stage)
    assert list(result.table.columns) == COLUMNS
    got = _metrics(result, "pcdeq-2", seed=3)

    # independently: build, train and certify the same network with deqppl.layers alone
    model = LinearArchitecture(features=6).build(family, split=split, seed=3)
    fit_classifier(model, split.x_train, split.y_train, num_epochs=2, batch_size=16, lr=1e-2,
                   seed=3, skip_nonfinite_steps=True)
    model.eval()
    with torch.no_grad():
        h = model[1](model[0](split.x_test))  # ImageInput, Flatten: the layer's input
    (layer,) = implicit_layers(model)
    cert = layer.solve(h, certify=True).certificate
    assert cert.certified and got["certified"] == 1
    own = cert.as_dict()
    # the same float64 computation run twice: equal to rounding
    for column, key in (("rho_jacobian", "spectral_radius"), ("rho_bound", "spectral_radius_bound"),
                        ("rate_residual", "rate_residual"), ("rate_thompson", "rate_thompson"),
                        ("g0_min", "g0_min"), ("min_weight", "min_weight"),
                        ("slope_max", "slope_max")):
        assert got[column] == pytest.approx(own[key], rel=1e-9, abs=1e-14), column
    for column in ("cone_ok", "activation_ok", "injection_ok", "all_samples_converged"):
        assert got[column] == 1, column
    assert got["fraction_converged"] == 1 and got["unconverged"] == 0
    assert 0 <= got["test_accuracy"] <= 1 and got["num_parameters"] == sum(
        p.numel() for p in model.parameters())
    # the report section shows the same numbers, and the summary is their mean over one seed
    row = result.summary.loc[("toy-linear", "test", "pcdeq-2")]
    assert row["rho_bound"] == got["rho_bound"] and row["runs"] == 1
    tables = dict(classifier_tables(result))
    cert_table = next(f for t, f in tables.items() if t.startswith("Certificate"))
    assert float(cert_table["rho_bound"][0]) == pytest.approx(got["rho_bound"], rel=1e-3)


def test_nonconvergent_unconstrained_deq_shows_as_such():
    split = _split()
    # two Anderson steps at rtol 1e-12 cannot converge: every solve fails, and the table says so
    family = DEQFamily(solver=Anderson(rtol=1e-12, max_steps=2),
                       adjoint=ImplicitAdjoint(solver=Anderson(rtol=1e-12, max_steps=2),
                                               throw=False), throw=False)
    result = _run(split, ClassifierMethod(name="deq", family=family),
                  ClassifierStage(training=TRAINING, seeds=(0,)))
    got = _metrics(result, "deq")
    assert got["unconverged"] == 1
    assert got["forward_failed"] > 0 and got["test_forward_failed"] > 0
    assert got["all_samples_converged"] == 0 and got["fraction_converged"] < 1
    assert "certified" not in got.index  # no certificate for an unconstrained layer
    assert result.summary.loc[("toy-linear", "test", "deq"), "unconverged_runs"] == 1
    assert math.isfinite(got["rho_jacobian"])


def test_mondeq_reports_its_margin_and_explicit_has_no_certificate():
    split = _split()
    methods = [ClassifierMethod(name="mon", family=MonDEQFamily(margin=0.2, throw=False)),
               ClassifierMethod(name="mlp", family=ExplicitFamily())]
    result = compare_classifiers(methods, split, architectures=[LinearArchitecture(features=6)],
                                 stages=[ClassifierStage(training=TRAINING)], progress=False)
    mon = _metrics(result, "mon")
    assert mon["monotonicity_margin"] == 0.2
    # lambda_min of the symmetric part of I - W is m + lambda_min(A^T A) >= m (rounding)
    assert mon["measured_margin"] >= 0.2 - 1e-12 and mon["lipschitz"] >= mon["measured_margin"]
    mlp = _metrics(result, "mlp")
    assert not {"rho_jacobian", "certified", "forward_steps"} & set(
        mlp[mlp.notna()].index)
    assert mlp["unconverged"] == 0 and 0 <= mlp["test_accuracy"] <= 1


def test_stress_stage_scales_the_initial_weight_and_pcdeq_stays_certified():
    split = _split()
    stage = ClassifierStage(name="stress_x10", weight_scale=10.0, training=TRAINING)
    result = _run(split, ClassifierMethod(name="pcdeq", family=PCDEQFamily()), stage)
    got = _metrics(result, "pcdeq", stage="stress_x10")
    assert got["certified"] == 1 and got["unconverged"] == 0
    # a weight-norm gain of 10 saturates tanh: tiny slopes, tiny rho(J) (docs/pcdeq.md)
    assert got["slope_max"] < 1e-2 and got["rho_jacobian"] < 1e-2


def test_store_resumes_and_refuses_other_settings(tmp_path):
    split = _split(n_train=32, n_test=16, size=3)
    method = ClassifierMethod(name="pcdeq", family=PCDEQFamily())
    stage = ClassifierStage(training=ClassifierTraining(num_epochs=1, batch_size=16))
    store = RunStore(tmp_path / "runs")
    first = compare_classifiers([method], split, architectures=[LinearArchitecture(features=4)],
                                stages=[stage], store=store, progress=False)
    again = compare_classifiers([method], split, architectures=[LinearArchitecture(features=4)],
                                stages=[stage], store=store, progress=False)
    pd.testing.assert_frame_equal(first.table, again.table)  # loaded, timings included
    other = ClassifierStage(training=ClassifierTraining(num_epochs=2, batch_size=16))
    with pytest.raises(ValueError, match="different run"):
        compare_classifiers([method], split, architectures=[LinearArchitecture(features=4)],
                            stages=[other], store=store, progress=False)


def test_every_metric_shown_has_a_glossary_row():
    split = _split(n_train=32, n_test=16, size=4)
    methods = [ClassifierMethod(name="pc", family=PCDEQFamily()),
               ClassifierMethod(name="mon", family=MonDEQFamily(throw=False)),
               ClassifierMethod(name="deq", family=DEQFamily(throw=False)),
               ClassifierMethod(name="mlp", family=ExplicitFamily())]
    result = compare_classifiers(
        methods, split, architectures=[SingleConvArchitecture(channels=2, pool=2)],
        stages=[ClassifierStage(training=ClassifierTraining(num_epochs=1, batch_size=16))],
        progress=False)
    metrics = set(result.table["metric"]) | set(result.summary.columns)
    missing = sorted(m for m in metrics if describe_metric(m).description.startswith("no description"))
    assert not missing
    text = classifier_markdown(result)
    shown = {c for _, t in classifier_tables(result) for c in t.columns} - {"model", "stage", "method"}
    glossary = text.split("Glossary")[1]
    assert all(f"| {m} |" in glossary for m in shown)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"x_train": torch.rand(4, 1, 3)}, ValueError, "x_train must be images"),
    ({"y_train": torch.rand(4)}, TypeError, "y_train must be an integer"),
    ({"y_test": torch.tensor([0, -1])}, ValueError, "y_test must be >= 0"),
    ({"x_test": torch.rand(2, 1, 3, 4, dtype=torch.float64)}, ValueError, "must agree"),
    ({"x_test": torch.rand(2, 1, 3, 3, dtype=torch.float32)}, TypeError, "one dtype"),
    ({"name": ""}, ValueError, "name must be a non-empty string"),
])
def test_bad_splits_are_named(kwargs, error, match):
    base = dict(name="t", x_train=torch.rand(4, 1, 3, 3, dtype=torch.float64),
                y_train=torch.tensor([0, 1, 0, 1]), x_test=torch.rand(2, 1, 3, 3, dtype=torch.float64),
                y_test=torch.tensor([0, 1]))
    with pytest.raises(error, match=match):
        ImageSplit(**{**base, **kwargs})


def test_bad_settings_are_named_before_training():
    split = _split(n_train=8, n_test=4, size=3)
    m = ClassifierMethod(name="a", family=ExplicitFamily())
    with pytest.raises(ValueError, match="duplicates"):
        compare_classifiers([m, m], split, progress=False)
    with pytest.raises(TypeError, match="family must be a layer family"):
        ClassifierMethod(name="a", family="pcdeq")
    with pytest.raises(ValueError, match="weight_scale"):
        ClassifierStage(weight_scale=0.0)
    with pytest.raises(ValueError, match="distinct"):
        ClassifierStage(seeds=(0, 0))
    with pytest.raises(ValueError, match="lr"):
        ClassifierTraining(lr=-1.0)
    with pytest.raises(TypeError, match="split must be an ImageSplit"):
        compare_classifiers([m], {"x": 1}, progress=False)
