"""Architectures, the training helper and its cone invariant, and bad input."""

from __future__ import annotations

import pytest
import torch

from deqppl.layers import (CustomActivation, DEQFamily, ExpCone, ExplicitFamily, FitStatus,
                           MonDEQFamily, PCDEQFamily, PCDEQLinear, ProjectedCone, ReLU,
                           ReLUInjection, Sigmoid, SoftplusCone, SquareCone, Tanh,
                           evaluate_classifier, fit_classifier, linear_classifier,
                           multi_conv_classifier, num_parameters, single_conv_classifier)

# SPEC 5: the parameter counts of the paper's code.
PAPER_COUNTS = {
    "mnist_linear": (linear_classifier, dict(image_size=28, in_channels=1), 70_410),
    "mnist_single_conv": (single_conv_classifier, dict(image_size=28, in_channels=1,
                                                       channels=82), 69_136),
    "mnist_multi_conv": (multi_conv_classifier, dict(image_size=28, in_channels=1,
                                                     channels=(12, 24, 48)), 41_278),
    "cifar_single_conv": (single_conv_classifier, dict(image_size=32, in_channels=3,
                                                       channels=125), 164_760),
    "cifar_multi_conv": (multi_conv_classifier, dict(image_size=32, in_channels=3,
                                                     channels=(20, 50, 80)), 130_950),
    "cifar_augmented": (multi_conv_classifier, dict(image_size=32, in_channels=3,
                                                    channels=(100, 120, 140)), 661_470),
}


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_paper_parameter_counts(name):
    build, kwargs, expected = PAPER_COUNTS[name]
    assert num_parameters(build(PCDEQFamily(), **kwargs)) == expected
    # the unconstrained DEQ and the explicit baseline have exactly the same parameters
    assert num_parameters(build(DEQFamily(), **kwargs)) == expected
    assert num_parameters(build(ExplicitFamily(), **kwargs)) == expected


def _digit_like(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    return x, labels


CONES = {"softplus": SoftplusCone(), "exp": ExpCone(), "square": SquareCone(),
         "projected": ProjectedCone()}


@pytest.mark.parametrize("cone", list(CONES.values()), ids=list(CONES))
def test_weights_stay_nonnegative_under_large_learning_rates(cone):
    x, labels = _digit_like()
    model = linear_classifier(PCDEQFamily(cone=cone), image_size=8, in_channels=1, features=16,
                              num_classes=2, dtype=torch.float64)
    layer = model[2]
    start = layer.weight().detach().clone()
    # lr = 5 is ~1000x the usual AdamW step: each step moves every raw entry by ~5, so a
    # projected weight certainly goes negative before the projection
    fit = fit_classifier(model, x, labels, num_epochs=2, batch_size=16, lr=5.0)
    assert fit.status is FitStatus.COMPLETED, fit.message
    assert not torch.allclose(layer.weight(), start)  # the weights did move
    assert layer.min_weight() >= 0
    assert bool((layer.weight() >= 0).all()) and bool((layer.bias() >= 0).all())
    assert all(e.min_weight >= 0 for e in fit.epochs)
    cert = layer.solve(x.flatten(1), certify=True).certificate
    assert cert.cone_ok and cert.all_converged, cert


def test_projection_is_what_keeps_projected_weights_in_the_cone():
    """Without the helper's projection a large step leaves the cone: the invariant check bites."""
    layer = PCDEQLinear(4, 6, cone=ProjectedCone(), dtype=torch.float64)
    with torch.no_grad():
        layer.W.raw.sub_(1.0)  # what an unprojected gradient step can do
    assert layer.min_weight() < 0
    with pytest.raises(RuntimeError, match="nonnegativity invariant"):
        layer.check_cone()
    layer.project_()
    layer.check_cone()


@pytest.mark.parametrize("family", [PCDEQFamily(), PCDEQFamily(activation=Sigmoid()),
                                    MonDEQFamily(), DEQFamily(), ExplicitFamily()],
                         ids=["pcdeq1", "pcdeq2", "mondeq", "deq", "explicit"])
def test_every_family_trains_and_reports_costs(family):
    x, labels = _digit_like()
    model = single_conv_classifier(family, image_size=8, in_channels=1, channels=4, pool=4,
                                   num_classes=2, dtype=torch.float64)
    fit = fit_classifier(model, x, labels, num_epochs=1, batch_size=24, lr=1e-2)
    assert fit.status is FitStatus.COMPLETED, fit.message
    ev = evaluate_classifier(model, x, labels)
    assert 0 <= ev.accuracy <= 1 and ev.num_samples == 48
    if isinstance(family, ExplicitFamily):
        assert fit.epochs[0].forward_steps != fit.epochs[0].forward_steps  # nan: no solves
    else:
        assert fit.epochs[0].forward_steps >= 1 and fit.epochs[0].backward_steps >= 1
        assert fit.forward_failed == 0 and fit.backward_failed == 0


# -- bad input ---------------------------------------------------------------------------------

def test_negative_weight_is_rejected_naming_the_entry():
    layer = PCDEQLinear(3, 3, cone=SquareCone(), weight_norm=False)
    w = torch.rand(3, 3)
    w[1, 2] = -0.25
    with pytest.raises(ValueError, match=r"W has a negative entry -0.25 at row 1, column 2"):
        layer.set_weight(w)
    with pytest.raises(ValueError, match="exact zero"):
        PCDEQLinear(3, 3, cone=SoftplusCone(), weight_norm=False).set_weight(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="shape"):
        layer.set_weight(torch.rand(2, 3))


@pytest.mark.parametrize("fn, message", [
    (torch.exp, "not concave"),
    (lambda t: t * t, "not concave"),
    (lambda t: -torch.tanh(t), "not nondecreasing"),
    (torch.sin, "not nondecreasing"),
], ids=["exp", "square", "decreasing", "sin"])
def test_activation_that_is_not_concave_nondecreasing_is_rejected(fn, message):
    with pytest.raises(ValueError, match=message):
        CustomActivation(fn=fn, label="f", bounded=True)


def test_activation_and_injection_combinations_are_checked():
    with pytest.raises(TypeError, match="activation must be an activation object"):
        PCDEQLinear(2, 2, activation=torch.tanh)
    with pytest.raises(ValueError, match="unbounded"):
        PCDEQLinear(2, 2, activation=ReLU())
    with pytest.raises(ValueError, match="strictly positive injection"):
        PCDEQLinear(2, 2, activation=Tanh(), injection=ReLUInjection())
    with pytest.raises(ValueError, match="sigma\\(0\\) = -1 < 0"):
        PCDEQLinear(2, 2, activation=CustomActivation(fn=lambda t: torch.tanh(t) - 1,
                                                      label="tanh-1", bounded=True))
    with pytest.raises(ValueError, match="strictly positive injection"):
        PCDEQFamily(injection=ReLUInjection())  # validated when the family is made
    PCDEQLinear(2, 2, activation=Sigmoid(), injection=ReLUInjection())  # pcDEQ-2: fine


def test_wrong_image_shape_is_rejected_before_training():
    x, labels = _digit_like()
    model = linear_classifier(PCDEQFamily(), image_size=8, in_channels=1, features=4,
                              num_classes=2, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 8, 8\)"):
        fit_classifier(model, x[:, :, :7, :], labels, num_epochs=1)
    with pytest.raises(ValueError, match=r"labels must have shape \(48,\)"):
        fit_classifier(model, x, labels[:10], num_epochs=1)
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        model[2](x.flatten(1).float())
    bad = x.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fit_classifier(model, bad, labels, num_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nonfinite_gradients_stop_training_or_are_skipped_and_counted():
    """The DEQ core gives NaN derivatives for samples whose forward solve failed: training
    stops, saying why, unless asked to skip (and count) such steps."""
    from deqppl.deq import Anderson

    x, labels = _digit_like()

    def model():
        family = DEQFamily(solver=Anderson(rtol=1e-12, max_steps=2), throw=False)
        return linear_classifier(family, image_size=8, in_channels=1, features=6, num_classes=2,
                                 dtype=torch.float64)

    stopped = fit_classifier(model(), x, labels, num_epochs=1, batch_size=16)
    assert stopped.status is FitStatus.NONFINITE and "skip_nonfinite_steps" in stopped.message
    skipped = fit_classifier(model(), x, labels, num_epochs=1, batch_size=16,
                             skip_nonfinite_steps=True)
    assert skipped.status is FitStatus.COMPLETED
    assert skipped.skipped_steps == 3 and skipped.forward_failed > 0  # every batch failed
