r"""What every number in a report means: one row per metric, shared by the tables and the glossary.

Each metric a report shows is looked up here for its unit, the table it belongs in and a
one-sentence definition; the report's glossary lists exactly the metrics its tables show. A metric
without a row (a new method diagnostic) is still shown, in the "Other diagnostics" table, with a
note that its description is missing, so that nothing a comparison measured is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["MODEL_METRICS", "METRICS", "Group", "MetricInfo", "describe_metric"]


class Group(Enum):
    """The table of a report a method metric is shown in, in page order."""

    AGREEMENT = "Agreement of the held-out latents"
    DATA_FIT = "Fit to the held-out data"
    TIME = "Wall time"
    CONVERGENCE = "Convergence"
    CERTIFICATE = "Certificate of the implicit layer"
    DIAGNOSTICS = "Other diagnostics"


@dataclass(frozen=True, kw_only=True)
class MetricInfo:
    """One glossary row.

    Parameters
    ----------
    unit
        Unit of the value as printed after the name, e.g. ``"s"``, ``"nats"``, ``"0/1"``.
    group
        Table the metric is shown in (method metrics; ignored for model-comparison columns).
    description
        One sentence a statistician can check the number against.
    """

    unit: str
    group: Group
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.group, Group):
            raise TypeError(f"group must be a Group, got {type(self.group).__name__}")
        if not self.description.strip():
            raise ValueError("description must not be empty")


_A, _F, _T, _C, _D = Group.AGREEMENT, Group.DATA_FIT, Group.TIME, Group.CONVERGENCE, Group.DIAGNOSTICS
_K = Group.CERTIFICATE

#: Metrics of :attr:`deqppl.harness.Comparison.table` (per method, seed and stage).
METRICS: dict[str, MetricInfo] = {
    "max_abs_dz": MetricInfo(
        unit="latent units",
        group=_A,
        description="largest absolute difference, over held-out rows and latent dimensions, "
        "between this method's conditional-MAP latents and the reference method's "
        "(0 for the reference itself; latent units: the prior is N(0, 1/lam)).",
    ),
    "certified_bound": MetricInfo(
        unit="latent units",
        group=_A,
        description="certified bound on the distance (2-norm, worst held-out row) of this "
        "method's latents to the conditional MAP under the shared globals: ||grad F|| / "
        "lambda_min(Hessian of F), F the negative log posterior of the locals (inf where F is "
        "not strongly convex); the method with the smallest bound is the reference.",
    ),
    "min_hessian_eig": MetricInfo(
        unit="1/latent units²",
        group=_A,
        description="smallest eigenvalue, over held-out rows, of the Hessian of the negative log "
        "posterior of the locals at this method's latents (> 0: strongly convex there).",
    ),
    "log_joint_gap": MetricInfo(
        unit="nats",
        group=_A,
        description="best method's log joint minus this method's, at the same globals "
        "(>= 0; 0 means this method found the highest log joint).",
    ),
    "amortization_gap": MetricInfo(
        unit="nats",
        group=_A,
        description="sum over held-out rows of the best per-row log joint over all methods minus "
        "this method's (>= 0): the log joint lost to not reaching each row's optimum.",
    ),
    "subspace_angle": MetricInfo(
        unit="rad",
        group=_A,
        description="largest principal angle between this method's loadings W and the reference "
        "method's (rotation invariant; 0 = the same subspace, pi/2 = orthogonal).",
    ),
    "log_joint": MetricInfo(
        unit="nats",
        group=_F,
        description="log p(y, latents, globals) of the Pyro model's trace at this method's "
        "estimate, summed over the rows of the stage.",
    ),
    "heldout_log_lik": MetricInfo(
        unit="nats",
        group=_F,
        description="sum over held-out rows of log p(y | latents, globals), read from the "
        "observation site of the Pyro trace at this method's latents.",
    ),
    "accuracy": MetricInfo(
        unit="fraction",
        group=_F,
        description="fraction of held-out rows whose label a multinomial logistic regression, "
        "trained on the training latents of the shared fit, predicts from this method's "
        "held-out latents (row 'pca': the same classifier on plain-PCA scores).",
    ),
    "wall_time": MetricInfo(
        unit="s",
        group=_T,
        description="wall-clock time of the stage (joint fit of the globals, or inference of the "
        "held-out latents with the globals fixed), diagnostics excluded.",
    ),
    "fit_wall_time": MetricInfo(
        unit="s",
        group=_T,
        description="wall-clock time of the joint fit of the globals on the training rows.",
    ),
    "diagnostics_wall_time": MetricInfo(
        unit="s",
        group=_T,
        description="wall-clock time of the DEQ's post-fit diagnostics (final solve, log joint, "
        "spectral radii), kept out of wall_time.",
    ),
    "time_ratio_vs_deq": MetricInfo(
        unit="×",
        group=_T,
        description="this method's wall time divided by the DEQ's in the same stage "
        "(> 1: slower than the DEQ).",
    ),
    "converged": MetricInfo(
        unit="0/1",
        group=_C,
        description="1 if the method's own stopping criterion was met, 0 if it stopped at its "
        "step budget (averaged over seeds: the fraction of seeds that converged).",
    ),
    "fraction_converged": MetricInfo(
        unit="fraction",
        group=_C,
        description="fraction of rows whose fixed-point solve met its tolerance (DEQ; implicit "
        "classifiers: of the test images, after training, worst implicit layer).",
    ),
    "num_steps": MetricInfo(
        unit="count",
        group=_C,
        description="optimiser or solver steps taken: L-BFGS iterations, Adam updates (SVI), "
        "fixed-point iterations (DEQ, held-out) or epochs (DEQ, fit).",
    ),
    "num_grad_evals": MetricInfo(
        unit="count",
        group=_C,
        description="gradient (or fixed-point map) evaluations: the work behind the steps.",
    ),
    "spectral_radius": MetricInfo(
        unit="dimensionless",
        group=_D,
        description="median over a subsample of rows of the spectral radius of the DEQ layer's "
        "Jacobian at the fixed point (> 1: plain iteration would diverge; the solver does not "
        "need it below 1).",
    ),
    "spectral_radius_max": MetricInfo(
        unit="dimensionless",
        group=_D,
        description="largest spectral radius of the DEQ layer's Jacobian over the same rows.",
    ),

    # --- implicit classifiers (deqppl.harness.compare_classifiers): one run = one seed ---
    "test_accuracy": MetricInfo(
        unit="fraction",
        group=_F,
        description="fraction of test images the trained classifier labels correctly (nan: "
        "training stopped early).",
    ),
    "test_loss": MetricInfo(
        unit="nats",
        group=_F,
        description="mean cross-entropy of the trained classifier on the test images.",
    ),
    "train_loss_first": MetricInfo(
        unit="nats",
        group=_F,
        description="mean training cross-entropy over the first epoch's batches (log 10 = 2.30 "
        "is chance for ten classes).",
    ),
    "train_loss_last": MetricInfo(
        unit="nats",
        group=_F,
        description="mean training cross-entropy over the last epoch's batches: about equal to "
        "train_loss_first when the run learned nothing.",
    ),
    "time_per_epoch": MetricInfo(
        unit="s",
        group=_T,
        description="mean wall-clock time of one training epoch (forward, adjoint and "
        "optimiser step over every batch).",
    ),
    "train_wall_time": MetricInfo(
        unit="s",
        group=_T,
        description="wall-clock time of the whole training run.",
    ),
    "forward_steps": MetricInfo(
        unit="count",
        group=_C,
        description="mean solver steps per forward solve of an implicit layer during training.",
    ),
    "backward_steps": MetricInfo(
        unit="count",
        group=_C,
        description="mean steps per adjoint (implicit-gradient) linear solve during training "
        "(0: the adjoint's starting point already met its tolerance).",
    ),
    "test_forward_steps": MetricInfo(
        unit="count",
        group=_C,
        description="mean solver steps per forward solve on the test images.",
    ),
    "forward_failed": MetricInfo(
        unit="count",
        group=_C,
        description="training samples whose forward solve missed its tolerance within the step "
        "cap, summed over batches, epochs and implicit layers.",
    ),
    "backward_failed": MetricInfo(
        unit="count",
        group=_C,
        description="adjoint solves that missed their tolerance for some sample, summed over "
        "training.",
    ),
    "skipped_steps": MetricInfo(
        unit="count",
        group=_C,
        description="optimiser steps skipped because the gradient was not finite (the DEQ core "
        "gives NaN derivatives for samples whose forward solve failed).",
    ),
    "test_forward_failed": MetricInfo(
        unit="count",
        group=_C,
        description="test images whose forward solve missed its tolerance.",
    ),
    "epochs_run": MetricInfo(
        unit="count",
        group=_C,
        description="training epochs completed (fewer than asked: training stopped on a "
        "non-finite loss or a solver error).",
    ),
    "unconverged": MetricInfo(
        unit="0/1",
        group=_C,
        description="1 if the run had a failed forward or adjoint solve, a skipped step or an "
        "early stop (averaged over seeds: the fraction of such runs).",
    ),
    "unconverged_runs": MetricInfo(
        unit="count",
        group=_C,
        description="runs (seeds) with a failed forward or adjoint solve, a skipped step or an "
        "early stop.",
    ),
    "runs": MetricInfo(
        unit="count",
        group=_C,
        description="runs (seeds) behind the row's means.",
    ),
    "num_parameters": MetricInfo(
        unit="count",
        group=_D,
        description="trainable scalars of the classifier.",
    ),
    "certified": MetricInfo(
        unit="0/1",
        group=_K,
        description="pcDEQ: 1 if every condition of the certificate held on the test images "
        "(cone, activation, injection, convergence, rho bound < 1), worst implicit layer.",
    ),
    "cone_ok": MetricInfo(
        unit="0/1",
        group=_K,
        description="pcDEQ: 1 if every effective weight, gain and bias is >= 0.",
    ),
    "activation_ok": MetricInfo(
        unit="0/1",
        group=_K,
        description="pcDEQ: 1 if the activation is nondecreasing, concave and bounded on the "
        "nonnegative orthant (declared, or checked numerically for a custom one).",
    ),
    "injection_ok": MetricInfo(
        unit="0/1",
        group=_K,
        description="pcDEQ: 1 if g(0) = sigma(b + u(x)) > 0 entrywise for every test image.",
    ),
    "min_weight": MetricInfo(
        unit="weight units",
        group=_K,
        description="pcDEQ: smallest effective entry of W, its gains and b (the cone: >= 0).",
    ),
    "g0_min": MetricInfo(
        unit="activation units",
        group=_K,
        description="pcDEQ: smallest entry of g(0) over the test images (must be > 0).",
    ),
    "rate_thompson": MetricInfo(
        unit="dimensionless",
        group=_K,
        description="pcDEQ: largest observed contraction factor of one step in Thompson's metric "
        "d_T(a, b) = max_i |log a_i - log b_i|, d_T(g(z1), z*) / d_T(z1, z*) with z1 = g(0).",
    ),
    "rate_residual": MetricInfo(
        unit="dimensionless",
        group=_K,
        description="observed geometric rate (r_K / r_0)^(1/K) of the largest residual over the "
        "K forward steps on the test images (< 1: contracting).",
    ),
    "rho_jacobian": MetricInfo(
        unit="dimensionless",
        group=_K,
        description="largest power-iteration estimate, over the test images, of the spectral "
        "radius of the layer map's Jacobian at the fixed point (> 1: plain iteration and a "
        "plain-iteration adjoint diverge; at the last iterate where the solve failed).",
    ),
    "rho_bound": MetricInfo(
        unit="dimensionless",
        group=_K,
        description="pcDEQ: largest rigorous Collatz-Wielandt bound max_i (J z*)_i / z*_i on "
        "that spectral radius (valid because J >= 0 and z* > 0; < 1 certifies the backward "
        "pass).",
    ),
    "slope_max": MetricInfo(
        unit="dimensionless",
        group=_K,
        description="pcDEQ: largest activation slope sigma'(W z* + b + u) over test images and "
        "coordinates; near 0 the layer is saturated: z* barely depends on the input or the "
        "weights and no gradient passes it.",
    ),
    "all_samples_converged": MetricInfo(
        unit="0/1",
        group=_K,
        description="1 if the forward solve met its tolerance for every test image.",
    ),
    "monotonicity_margin": MetricInfo(
        unit="dimensionless",
        group=_K,
        description="monDEQ: the margin m of W = (1 - m) I - A^T A + B - B^T, so that I - W >= "
        "m I (a unique fixed point for any A, B).",
    ),
    "measured_margin": MetricInfo(
        unit="dimensionless",
        group=_K,
        description="monDEQ: smallest eigenvalue of the symmetric part of I - W, measured on the "
        "trained weights (>= monotonicity_margin).",
    ),
    "lipschitz": MetricInfo(
        unit="dimensionless",
        group=_K,
        description="monDEQ: L = ||I - W||_2 of the trained weights; the splittings' speed "
        "degrades with L / m.",
    ),
}

#: Columns of :attr:`deqppl.harness.ModelComparison.table` shown in a report (one row per model).
MODEL_METRICS: dict[str, MetricInfo] = {
    "family": MetricInfo(
        unit="—", group=_D, description="observation family of the model (with its fixed parameters)."
    ),
    "latent_dim": MetricInfo(unit="count", group=_D, description="latent dimension l of the model."),
    "heldout_log_lik": MetricInfo(
        unit="nats",
        group=_F,
        description="sum over held-out rows of log (1/S) sum_s p(y_i | z_i^(s), globals) with "
        "z_i^(s) drawn from the Laplace approximation of the row's posterior (± its standard "
        "error over rows); reuses y_i through the draws, so it favours larger models.",
    ),
    "heldout_log_marginal": MetricInfo(
        unit="nats",
        group=_F,
        description="importance-sampling estimate, with the Laplace approximation as proposal, of "
        "the held-out evidence sum_i log p(y_i | globals) (± standard error over rows): the "
        "proper predictive score of a model for fixed globals.",
    ),
    "elpd_loo": MetricInfo(
        unit="nats",
        group=_F,
        description="PSIS-LOO expected log pointwise predictive density of the held-out rows "
        "(ArviZ, ± standard error).",
    ),
    "p_loo": MetricInfo(
        unit="count",
        group=_D,
        description="PSIS-LOO effective number of parameters.",
    ),
    "pareto_k_max": MetricInfo(
        unit="dimensionless",
        group=_D,
        description="largest Pareto k of the PSIS weights (> 0.7: that row's LOO estimate is "
        "unreliable).",
    ),
    "fit_converged": MetricInfo(
        unit="0/1",
        group=_C,
        description="1 if the joint MAP fit of the model's globals met its stopping criterion.",
    ),
    "fit_wall_time": MetricInfo(
        unit="s", group=_T, description="wall-clock time of the joint MAP fit of the model's globals."
    ),
}


def describe_metric(name: str, *, table: dict[str, MetricInfo] = METRICS) -> MetricInfo:
    """The glossary row of ``name``, or a row saying that none is registered.

    Examples
    --------
    >>> describe_metric("wall_time").unit
    's'
    >>> describe_metric("new_diagnostic").group
    <Group.DIAGNOSTICS: 'Other diagnostics'>
    """
    info = table.get(name)
    if info is not None:
        return info
    base, sep, site = name.partition("[")
    if sep and site.endswith("]") and base in table:
        # a per-site metric of a model with several local sites, e.g. max_abs_dz[z1]
        row = table[base]
        return MetricInfo(unit=row.unit, group=row.group,
                          description=f"{row.description} Local site {site[:-1]} only.")
    return MetricInfo(
        unit="",
        group=Group.DIAGNOSTICS,
        description="no description registered in deqppl.report.glossary.",
    )
