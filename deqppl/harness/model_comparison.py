r"""Model comparison across the zoo by held-out log-likelihood and PSIS-LOO.

For each :class:`~deqppl.models.ExpFamPCA` (e.g. Gaussian vs Poisson vs Binomial(16) PCA, or
different latent sizes), :func:`compare_models`

1. fits the globals $(W, B)$ by joint MAP on the training rows (a comparison method,
   :class:`~deqppl.harness.methods.LBFGSMethod` by default);
2. draws $z^{(s)}_i\sim\mathcal N(z^*_i, H_i^{-1})$, $s=1..S$, from the Laplace approximation of
   each held-out latent with the globals fixed (SPEC §2.5, :meth:`PEDEncoder.laplace`);
3. takes the pointwise log-likelihood $\log p(y_i\mid z^{(s)}_i, W, B)$ of every draw from the
   observation site ``"y"`` of the Pyro model's trace;
4. builds an ArviZ ``InferenceData`` (``posterior``: ``z``; ``log_likelihood``: ``y``, one chain)
   for ``az.loo`` / ``az.compare`` (:mod:`deqppl.report.arviz_adapter`).

The table's ``heldout_log_lik`` is $\sum_i\log\frac1S\sum_s p(y_i\mid z_i^{(s)}, W, B)$ with its
standard error $\sqrt{n}\,\mathrm{sd}_i$ of the per-row terms. ``heldout_log_marginal`` is the
importance-sampling estimate of the held-out evidence
$\sum_i\log\frac1S\sum_s p(y_i\mid z^{(s)}_i)p(z^{(s)}_i)/q(z^{(s)}_i)$ with the Laplace
proposal $q$: unlike the former it does not reuse $y_i$ through the posterior draws, so it is the
proper predictive score of a model (for fixed globals).

Densities of different supports are not comparable: a Gaussian density on counts and a Binomial
probability mass differ in their base measure, so only compare models of discrete counts with
each other (or treat the Gaussian row as a reference only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from deqppl._progress import progress as _progress
from deqppl.encoders import PEDEncoder
from deqppl.harness.compare import describe_model
from deqppl.harness.methods import AbstractMethod, LBFGSMethod
from deqppl.harness.metrics import log_mean_exp
from deqppl.harness.sites import observed_log_lik
from deqppl.harness.validated import validated
from deqppl.report import arviz_adapter

__all__ = ["ModelComparison", "compare_models", "pointwise_log_lik"]


@dataclass(frozen=True, kw_only=True, eq=False)
class ModelComparison:
    """Result of :func:`compare_models`.

    Attributes
    ----------
    table
        One row per model: ``model``, ``description``, ``family``, ``latent_dim``,
        ``heldout_log_lik``, ``heldout_log_lik_se``, ``heldout_log_marginal``,
        ``heldout_log_marginal_se``, ``elpd_loo``, ``elpd_loo_se``, ``p_loo``, ``pareto_k_max``,
        ``train_log_joint``, ``fit_converged``, ``fit_wall_time``, ``num_draws``.
    idata
        Model name -> ArviZ ``InferenceData`` (``posterior``: ``z`` (chain, draw, obs, latent);
        ``log_likelihood``: ``y`` (chain, draw, obs)).
    loo
        ``arviz.compare`` ranking (best first); empty with fewer than two models.
    """

    table: pd.DataFrame
    idata: dict[str, object]
    loo: pd.DataFrame

    def __repr__(self) -> str:
        return f"ModelComparison(models={list(self.idata)}, rows={len(self.table)})"


def pointwise_log_lik(
    model, data: Mapping[str, torch.Tensor], globals: Mapping[str, torch.Tensor], z_draws: torch.Tensor
) -> torch.Tensor:
    r"""$\log p(y_i\mid z^{(s)}_i, W, B)$ for each draw: ``(S, n)`` from ``z_draws`` ``(S, n, l)``.

    Read from the observed sites of the Pyro model's trace, one trace per draw; ``data`` is
    validated (not checked again).
    """
    (site,) = model.local_sites
    return torch.stack(
        [observed_log_lik(model, data, {**globals, site: z}) for z in z_draws.unbind(0)]
    )


def _mvn_log_prob(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    # log N(x; mean, precision^{-1}) for x (S, n, l), mean (n, l), precision (n, l, l).
    l = mean.shape[-1]
    chol = torch.linalg.cholesky(precision)
    d = x - mean
    quad = torch.einsum("sni,nij,snj->sn", d, precision, d)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return 0.5 * (logdet - quad - l * math.log(2 * math.pi))


def compare_models(
    models: Mapping[str, object],
    train: Mapping[str, torch.Tensor],
    test: Mapping[str, torch.Tensor],
    *,
    num_draws: int = 200,
    seed: int = 0,
    progress: bool = True,
    method: AbstractMethod | None = None,
) -> ModelComparison:
    """Compare models by held-out log-likelihood of Laplace draws and PSIS-LOO.

    Parameters
    ----------
    models
        Name -> :class:`~deqppl.models.ExpFamPCA` (each validates the data).
    train, test
        Data mappings ``{"y": (N, d)}`` of the training rows (for the globals) and of the
        held-out rows ``{"y": (n, d)}`` (scored); each model validates them once.
    num_draws
        Laplace draws $S$ per held-out latent.
    seed
        Seeds the fits and the draws.
    progress
        Show progress bars.
    method
        How the globals are fitted (its ``fit_globals``); default ``LBFGSMethod()``.

    Returns
    -------
    ModelComparison

    Raises
    ------
    ValueError
        Empty ``models``, non-positive ``num_draws``, data outside a model's support.

    Examples
    --------
    >>> import torch
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> truth = ExpFamPCA(family=family("poisson"), obs_dim=5, latent_dim=1)
    >>> y = truth.simulate(40, seed=0, dtype=torch.float64).data["y"]
    >>> models = {"l1": truth, "l2": ExpFamPCA(family=family("poisson"), obs_dim=5, latent_dim=2)}
    >>> mc = compare_models(models, {"y": y[:30]}, {"y": y[30:]}, num_draws=20, progress=False)
    >>> list(mc.table["model"]), dict(mc.idata["l1"].log_likelihood.sizes)
    (['l1', 'l2'], {'chain': 1, 'draw': 20, 'obs': 10})
    """
    if not models:
        raise ValueError("models is empty; pass at least one {name: model}")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")
    method = LBFGSMethod() if method is None else method
    rows = []
    idata = {}
    gen = torch.Generator().manual_seed(seed)
    for name, model in _progress(models.items(), enable=progress, desc="compare_models"):
        train_data = validated(model, train)
        test_data = validated(model, test)
        start = time.perf_counter()
        fit = method.fit_globals(model, train_data, seed=seed, progress=progress)
        fit_time = time.perf_counter() - start
        globals_ = {k: fit.values[k] for k in model.global_sites}
        encoder = PEDEncoder.from_values(model, globals_, throw=False)
        laplace = encoder.laplace(test_data["y"])
        draws = laplace.sample(num_draws, generator=gen)  # (S, n, l)
        loglik = pointwise_log_lik(model, test_data, globals_, draws)  # (S, n)
        # Importance weights p(z) / q(z) for the held-out evidence, z ~ q = Laplace.
        zero = torch.zeros((), dtype=draws.dtype)  # tensor parameters keep the draws' dtype
        prior = torch.distributions.Normal(zero, zero + model.lam**-0.5).log_prob(draws).sum(-1)
        log_q = _mvn_log_prob(draws, laplace.mean, laplace.precision)
        per_row = log_mean_exp(loglik, dim=0)
        per_row_marginal = log_mean_exp(loglik + prior - log_q, dim=0)
        n = test_data["y"].shape[0]
        data = arviz_adapter.to_inference_data(
            {"z": draws},
            {"y": loglik},
            dims={"z": ["obs", "latent"], "y": ["obs"]},
            coords={"obs": range(n), "latent": range(model.latent_dim)},
            attrs={"model": describe_model(model)},
        )
        elpd = arviz_adapter.loo(data)
        idata[name] = data
        rows.append(
            {
                "model": name,
                "description": describe_model(model),
                "family": model.family.describe(),
                "latent_dim": int(model.latent_dim),
                "heldout_log_lik": float(per_row.sum()),
                "heldout_log_lik_se": float(per_row.std() * math.sqrt(n)) if n > 1 else math.nan,
                "heldout_log_marginal": float(per_row_marginal.sum()),
                "heldout_log_marginal_se": (
                    float(per_row_marginal.std() * math.sqrt(n)) if n > 1 else math.nan
                ),
                "elpd_loo": float(elpd["elpd_loo"]),
                "elpd_loo_se": float(elpd["se"]),
                "p_loo": float(elpd["p_loo"]),
                "pareto_k_max": float(elpd["pareto_k"].max()),
                "train_log_joint": float(fit.log_joint),
                "fit_converged": bool(fit.converged),
                "fit_wall_time": float(fit_time),
                "num_draws": int(num_draws),
            }
        )
    table = pd.DataFrame(rows)
    ranking = arviz_adapter.compare(idata) if len(idata) > 1 else pd.DataFrame()
    return ModelComparison(table=table, idata=idata, loo=ranking)
