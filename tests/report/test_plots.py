"""Every axis of every report figure is labelled, numeric axes with their unit."""

from __future__ import annotations

import pytest

from deqppl.report import (
    key_figure,
    model_comparison_frame,
    plot_latent_space,
    plot_latents,
    plot_model_comparison,
    plot_reconstructions,
    plot_timing,
    plot_traces,
    reconstruct,
)
from deqppl.report.plots import image_shape_of

#: Axis labels of categorical axes (no unit: the ticks are names).
CATEGORICAL = {"method", "model"}


def check_axes_labelled(fig) -> int:
    checked = 0
    for ax in fig.get_axes():
        if ax.get_label() == "<colorbar>":
            label = ax.get_ylabel() or ax.get_xlabel()
            assert "[" in label, f"colour bar without a unit: {label!r}"
            checked += 1
            continue
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if not len(axis.get_ticklocs()) or not ax.axison:
                continue
            shared = axis is ax.yaxis and ax.get_shared_y_axes().get_siblings(ax) != [ax] and not label
            if shared:
                continue  # a shared y axis is labelled on its first panel
            assert label, f"unlabelled axis in {ax.get_title()!r}"
            assert "[" in label or label in CATEGORICAL or "(index)" in label or label.startswith(
                ("latent dimension", "label")
            ), f"no unit in {label!r}"
            checked += 1
    return checked


def test_figures_have_units(digits_comparison, digits_models, poisson_comparison):
    c = digits_comparison
    recon = reconstruct(c)
    frame, scores = model_comparison_frame(digits_models)
    figures = [
        plot_traces(c.traces),
        plot_latents(c.latents, reference=c.reference),
        plot_latent_space(c.latents, c.heldout_labels, reference=c.reference),
        plot_timing(c.table, reference="deq"),
        plot_model_comparison(frame, scores=scores),
        plot_model_comparison(frame.iloc[:1], scores=scores),
        plot_reconstructions(recon.original, recon.means, image_shape=(8, 8)),
        plot_reconstructions(
            reconstruct(poisson_comparison).original, reconstruct(poisson_comparison).means,
            image_shape=None,
        ),
        key_figure(c),
        key_figure(poisson_comparison),
    ]
    assert all(check_axes_labelled(fig) > 0 for fig in figures)


def test_key_figure_rows(digits_comparison):
    fig = key_figure(digits_comparison)
    top, bottom = fig.subfigs
    assert len(top.get_axes()) == 3
    assert len(bottom.subfigs) == 2  # latent space by label, reconstructions


@pytest.mark.parametrize(
    ("num_values", "shape", "detect", "expected"),
    [(64, None, True, (8, 8)), (64, None, False, None), (25, None, True, None), (6, (2, 3), True, (2, 3))],
    ids=["digits", "off", "small-square", "given"],
)
def test_image_shape(num_values, shape, detect, expected):
    assert image_shape_of(num_values, image_shape=shape, detect_images=detect) == expected


def test_latent_space_checks_its_input(digits_comparison):
    with pytest.raises(ValueError, match=r"reference method 'nope' not in the latents"):
        plot_latent_space(digits_comparison.latents, digits_comparison.heldout_labels, reference="nope")
    with pytest.raises(ValueError, match=r"labels have 3 entries for 24 held-out rows"):
        plot_latent_space(digits_comparison.latents, digits_comparison.heldout_labels[:3], reference="deq")
