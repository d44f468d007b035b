"""Internal machinery shared by the solvers: the flattened problem, the per-sample monitor."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._solution import Status


class _Problem:
    """``f`` acting on flattened ``(B, n)`` tensors, with evaluation counters.

    Parameters
    ----------
    fn
        Callable ``(B, n) -> (B, n)``; already validated and flattened by the caller.
    jac
        Optional callable ``(B, n) -> (B, n, n)``, the exact per-sample Jacobian of ``fn``.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        jac: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.fn = fn
        self.jac = jac
        self.num_fevals = 0
        self.num_jac_evals = 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.num_fevals += 1
        with torch.no_grad():
            return self.fn(z)

    def value_and_jacobian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(z)`` and the per-sample Jacobian ``(B, n, n)``, ``J[b, i, j] = d f_i / d z_j``."""
        self.num_fevals += 1
        self.num_jac_evals += 1
        if self.jac is not None:
            with torch.no_grad():
                return self.fn(z), self.jac(z)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            fz = self.fn(zz)
            jac = batched_jacobian(fz, zz)
        return fz.detach(), jac


def batched_jacobian(fz: torch.Tensor, z: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    """Per-sample Jacobian ``(B, n, n)`` of ``fz (B, n)`` with respect to ``z (B, n)``.

    Samples are independent, so row ``i`` of every sample's Jacobian is one vector-Jacobian
    product of ``sum_b fz[b]`` with the ``i``-th basis vector: ``n`` products in all, batched
    with ``is_grads_batched`` (vmap) when the operations support it, looped otherwise.
    """
    batch, n = z.shape
    if not fz.requires_grad:
        return z.new_zeros(batch, n, n)
    basis = torch.eye(n, dtype=z.dtype, device=z.device).unsqueeze(1).expand(n, batch, n)
    try:
        with warnings.catch_warnings():
            # vmap may warn about a slow fallback for some operations; the result is still exact.
            warnings.simplefilter("ignore", UserWarning)
            (rows,) = torch.autograd.grad(
                fz, z, basis, retain_graph=True, create_graph=create_graph,
                is_grads_batched=True, allow_unused=True,
            )
    except RuntimeError:
        rows = torch.stack([
            _vjp_or_zeros(fz, z, basis[i], create_graph=create_graph) for i in range(n)
        ])
    if rows is None:
        return z.new_zeros(batch, n, n)
    return rows.transpose(0, 1)


def _vjp_or_zeros(fz, z, v, *, create_graph):
    (out,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph,
                                 allow_unused=True)
    return torch.zeros_like(z) if out is None else out


@dataclass(frozen=True)
class RawResult:
    """What a solver's ``_solve`` returns; `fixed_point` turns it into a `Solution`."""

    z: torch.Tensor
    residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    status: Status
    num_steps: int
    num_fevals: int
    num_jac_evals: int
    trace: torch.Tensor | None


class Monitor:
    """Per-sample convergence bookkeeping shared by every solver.

    A sample is *active* until it converges (``||f(z) - z|| <= atol + rtol * ||f(z)||``) or
    produces a non-finite value; inactive samples are frozen at their final iterate (see
    `freeze`) so the value returned is exactly the one whose residual is reported. For a
    sample that never converges the iterate with the smallest residual is kept.
    """

    def __init__(self, *, rtol: float, atol: float, z0: torch.Tensor, record_trace: bool,
                 divergence_ratio: float | None = None):
        batch = z0.shape[0]
        # A sample whose residual grows past `divergence_ratio` times its first residual is
        # given up as diverged (only used by solvers without a safeguard that could recover).
        self.divergence_ratio = divergence_ratio
        self.diverged = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.rtol = rtol
        self.atol = atol
        self.converged = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        self.nonfinite = torch.zeros_like(self.converged)
        self.best_res = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)
        self.best_fnorm = torch.zeros_like(self.best_res)
        self.best_z = z0.clone()
        self.best_fz = z0.clone()
        self.first_res: torch.Tensor | None = None
        self.last_res = self.best_res.clone()
        self.trace: list[torch.Tensor] | None = [] if record_trace else None

    @property
    def active(self) -> torch.Tensor:
        return ~(self.converged | self.nonfinite | self.diverged)

    def observe(self, z: torch.Tensor, fz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the iterate ``z`` and ``f(z)``; return ``g = f(z) - z`` and the active mask."""
        g = fz - z
        res = torch.linalg.vector_norm(g, dim=1)
        fnorm = torch.linalg.vector_norm(fz, dim=1)
        finite = torch.isfinite(res) & torch.isfinite(fnorm)
        was_active = self.active
        if self.first_res is None:
            self.first_res = torch.where(finite, res, torch.full_like(res, math.inf))
        new_conv = was_active & finite & (res <= self.atol + self.rtol * fnorm)
        keep = new_conv | (was_active & finite & (res < self.best_res))
        self.best_res = torch.where(keep, res, self.best_res)
        self.best_fnorm = torch.where(keep, fnorm, self.best_fnorm)
        self.best_z = torch.where(keep[:, None], z, self.best_z)
        self.best_fz = torch.where(keep[:, None], fz, self.best_fz)
        self.last_res = torch.where(was_active, res, self.last_res)
        self.converged |= new_conv
        self.nonfinite |= was_active & ~finite
        if self.divergence_ratio is not None:
            self.diverged |= was_active & finite & (res > self.divergence_ratio * self.first_res)
        if self.trace is not None:
            self.trace.append(torch.nan_to_num(self.last_res, nan=math.inf).max().detach().cpu()
                              if res.numel() else torch.tensor(0.0))
        return g, self.active

    def freeze(self, z_new: torch.Tensor) -> torch.Tensor:
        """Keep inactive samples at their final (converged or best finite) iterate."""
        return torch.where(self.active[:, None], z_new, self.best_z)

    def result(self, *, num_steps: int, problem: _Problem) -> RawResult:
        converged = self.converged
        if bool(converged.all()):
            status = Status.CONVERGED
        elif bool(self.nonfinite.any()):
            status = Status.NONFINITE
        elif bool((self.diverged | (~converged & (self.last_res > self.first_res))).any()):
            status = Status.DIVERGED
        else:
            status = Status.MAX_STEPS_REACHED
        tiny = torch.finfo(self.best_res.dtype).tiny
        trace = torch.stack(self.trace) if self.trace else None
        return RawResult(
            z=self.best_z,
            residual=self.best_res,
            rel_residual=self.best_res / (self.best_fnorm + tiny),
            converged=converged.clone(),
            status=status,
            num_steps=num_steps,
            num_fevals=problem.num_fevals,
            num_jac_evals=problem.num_jac_evals,
            trace=trace,
        )


def backtrack(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    fz: torch.Tensor,
    direction: torch.Tensor,
    active: torch.Tensor,
    *,
    line_search: bool,
    max_backtracks: int,
    armijo: float,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Per-sample backtracking line search on the residual norm ``||f(z) - z||``.

    Tries ``z + t d`` with ``t = 1, 1/2, 1/4, ...`` and accepts, per sample, the first step with
    ``||r(z + t d)|| <= (1 - armijo * t) ||r(z)||`` (the Armijo condition on $\\frac12\\lVert r
    \\rVert^2$ to first order in ``armijo``). A sample for which no step is accepted stays at
    ``z`` (``failed`` mask) so that the caller can reset its model of the Jacobian. Every trial
    evaluates ``f`` on the whole batch, with already-accepted samples held at their accepted
    point, so the last trial is always evaluated exactly at the returned point unless a sample
    failed (``last_is_final`` tells which). ``reference`` (per sample, default ``||r(z)||``)
    replaces ``||r(z)||`` on the right-hand side, e.g. by the largest of the last few residuals
    for a nonmonotone search (Grippo, Lampariello & Lucidi, 1986, SIAM J. Numer. Anal.).

    Returns
    -------
    z_new, fz_new, failed, last_is_final
    """
    res0 = torch.linalg.vector_norm(fz - z, dim=1) if reference is None else reference
    accepted = ~active
    z_acc, fz_acc = z, fz
    step = torch.ones_like(res0)
    num_trials = max_backtracks + 1 if line_search else 1
    for trial in range(num_trials):
        z_try = torch.where(accepted[:, None], z_acc, z + step[:, None] * direction)
        fz_try = evaluate(z_try)
        res = torch.linalg.vector_norm(fz_try - z_try, dim=1)
        finite = torch.isfinite(res)
        if line_search:
            ok = ~accepted & finite & (res <= (1.0 - armijo * step) * res0)
        else:
            ok = ~accepted & finite
        accepted = accepted | ok
        z_acc = torch.where(ok[:, None], z_try, z_acc)
        fz_acc = torch.where(ok[:, None], fz_try, fz_acc)
        if bool(accepted.all()):
            return z_acc, fz_acc, torch.zeros_like(accepted), True
        step = torch.where(accepted, step, 0.5 * step)
    failed = ~accepted
    return z_acc, fz_acc, failed, False
