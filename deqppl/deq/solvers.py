"""Fixed-point solvers: small frozen objects whose fields are their settings.

Every solver finds, for each sample ``b`` of a batch independently, a point with
$\\lVert f(z_b) - z_b\\rVert_2 \\le \\text{atol} + \\text{rtol}\\,\\lVert f(z_b)\\rVert_2$. Pass one to
`deqppl.deq.fixed_point`; the default is ``Anderson()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .protocol import AbstractSolver, backtracking_line_search, check_int, check_real, select_rows

__all__ = ["FixedPointIteration", "Anderson", "Broyden", "Newton"]

# Older private names, kept for modules that imported them.
_check_int, _check_real = check_int, check_real


@dataclass(frozen=True, kw_only=True)
class FixedPointIteration(AbstractSolver):
    """Plain or damped fixed-point iteration, $z \\leftarrow (1-\\beta) z + \\beta f(z)$.

    Converges (linearly) when the damped map is a contraction, e.g. when $f$ is; it diverges
    on the Gaussian PCA MAP map once $\\lambda_{\\max}(W^\\top W) \\ge \\lambda$ (SPEC 2.3). A sample
    whose residual grows to $10^{12}$ times its initial value is given up as diverged.

    Parameters
    ----------
    damping
        $\\beta \\in (0, 1]$; ``1`` is plain iteration.
    rtol, atol
        Per-sample stopping rule $\\lVert f(z)-z\\rVert \\le \\text{atol} + \\text{rtol}\\lVert f(z)\\rVert$.
    max_steps
        Largest number of iterations.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import FixedPointIteration, fixed_point
    >>> sol = fixed_point(torch.cos, torch.zeros(3, 1, dtype=torch.float64),
    ...                   solver=FixedPointIteration(rtol=1e-10))
    >>> sol.status.name, round(float(sol.value[0, 0]), 6)
    ('CONVERGED', 0.739085)
    """

    damping: float = 1.0
    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 500

    def __post_init__(self):
        self._check_common()
        _check_real("damping", self.damping, low=0.0, high=1.0, low_open=True)

    def _hint(self) -> str:
        return ("Plain iteration converges only where f is a contraction: try a damping < 1, "
                "a larger max_steps, Anderson() (the default), or Newton() for small latent "
                "dimensions.")

    # No contraction regains twelve orders of magnitude of residual growth: give such a sample up.
    divergence_ratio = 1e12

    # Every row is stepped on its own: on independent rows only the active ones are stepped.
    supports_row_compaction = True

    def init(self, problem, z0, fz0):
        return None

    def step(self, problem, state, iterate):
        return iterate.z + self.damping * iterate.residual, None, state

    def compact_state(self, state, keep):
        return state


@dataclass(frozen=True, kw_only=True)
class Anderson(AbstractSolver):
    """Safeguarded type-II Anderson acceleration, batched per sample.

    With the last ``memory`` iterates $z_i$ and residuals $g_i = f(z_i) - z_i$, and differences
    $\\Delta Z, \\Delta G$ to the current pair, the step is
    $z_+ = z + \\beta g - (\\Delta Z + \\beta \\Delta G)\\gamma$ with
    $(\\Delta G^\\top \\Delta G + \\mu I)\\gamma = \\Delta G^\\top g$ (Walker & Ni, 2011, SIAM J. Numer.
    Anal.). The ridge is *relative*, $\\mu = \\text{ridge}\\cdot\\lVert\\Delta G\\rVert_F^2/m$, so it
    does not dominate once residuals are small (SPEC 7: an absolute ridge can make Anderson slower
    than plain iteration).

    Safeguards, per sample: a singular or non-finite least-squares system falls back to the damped
    step $z + \\beta g$; a step whose residual exceeds ``safeguard`` times the best residual so far
    is rejected, the memory is cleared, $\\beta$ is halved and the damped step is taken from the
    best iterate. Because $f(z) - z = -\\nabla F(z)/\\lambda$ for MAP maps of a strongly convex
    $F$ (SPEC 2.2), the damped step is a gradient step that decreases $F$ once $\\beta$ is small,
    so this safeguarded Anderson converges on strongly convex MAP maps even where $f$ is not a
    contraction (SPEC 2.3). Converged samples are frozen.

    Parameters
    ----------
    memory
        Number of past differences $m \\ge 1$ kept. The default 10 (the papers used 5-6, SPEC 7)
        was measured on ``benchmarks/bench_solvers.py``: on a slow symmetric tanh contraction
        memory 5 needed 131 iterations, 8 needed 61 and 10 needed 56 (plain iteration: 592).
    ridge
        Relative Tikhonov regularization of the least-squares system, $\\ge 0$.
    damping
        Mixing parameter $\\beta \\in (0, 1]$.
    restart
        Clear a sample's memory every ``restart`` steps (``None``: only on rejected steps).
    safeguard
        Reject a step whose residual exceeds ``safeguard`` times the best so far (``>= 1``;
        ``None`` disables the safeguard).
    rtol, atol, max_steps
        See `FixedPointIteration`.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import Anderson, fixed_point
    >>> A = torch.tensor([[0.0, -3.0], [-3.0, 0.0]], dtype=torch.float64)  # not a contraction
    >>> b = torch.ones(4, 2, dtype=torch.float64)
    >>> sol = fixed_point(lambda z: z @ A.T + b, torch.zeros(4, 2, dtype=torch.float64),
    ...                   solver=Anderson(rtol=1e-10))
    >>> sol.status.name, sol.value[0].tolist()
    ('CONVERGED', [0.25, 0.25])
    """

    memory: int = 10
    ridge: float = 1e-4
    damping: float = 1.0
    restart: int | None = None
    safeguard: float | None = 10.0
    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 200

    def __post_init__(self):
        self._check_common()
        _check_int("memory", self.memory, minimum=1)
        _check_real("ridge", self.ridge, low=0.0)
        _check_real("damping", self.damping, low=0.0, high=1.0, low_open=True)
        if self.restart is not None:
            _check_int("restart", self.restart, minimum=1)
        if self.safeguard is not None:
            _check_real("safeguard", self.safeguard, low=1.0)

    def _hint(self) -> str:
        return ("Try a larger max_steps or memory, a damping < 1, or Newton() for small latent "
                "dimensions.")

    # The history is per row (the ring-buffer slot and the restart clock advance for every row
    # alike), so it is compacted by indexing its rows.
    supports_row_compaction = True

    def compact_state(self, state, keep):
        return _AndersonState(
            hist_z=state.hist_z.index_select(0, keep), hist_g=state.hist_g.index_select(0, keep),
            valid=state.valid.index_select(0, keep), beta=state.beta.index_select(0, keep),
            age=state.age.index_select(0, keep), slot=state.slot, eye=state.eye)

    def init(self, problem, z0, fz0):
        batch, n = z0.shape
        slots = self.memory + 1  # the current pair plus `memory` past ones
        return _AndersonState(
            hist_z=z0.new_zeros(batch, slots, n), hist_g=z0.new_zeros(batch, slots, n),
            valid=torch.zeros(batch, slots, dtype=torch.bool, device=z0.device),
            beta=torch.full((batch,), float(self.damping), dtype=z0.dtype, device=z0.device),
            age=torch.zeros(batch, dtype=torch.long, device=z0.device), slot=0,
            eye=torch.eye(slots, dtype=z0.dtype, device=z0.device))

    def step(self, problem, state, iterate):
        z, g, active, res = iterate.z, iterate.residual, iterate.active, iterate.residual_norm
        hist_z, hist_g, slot = state.hist_z, state.hist_g, state.slot
        tiny = torch.finfo(z.dtype).tiny
        if self.safeguard is not None:
            reject = active & (res > self.safeguard * iterate.best_residual_norm)
        else:
            reject = torch.zeros_like(active)
        clear = reject
        if self.restart is not None:
            clear = clear | (state.age >= self.restart)
        valid = state.valid & ~clear[:, None]
        age = torch.where(clear, torch.zeros_like(state.age), state.age)
        beta = torch.where(reject, 0.5 * state.beta, state.beta)

        hist_z[:, slot] = z
        hist_g[:, slot] = g
        valid[:, slot] = ~reject
        mask = valid.clone()
        mask[:, slot] = False
        d_g = (g[:, None, :] - hist_g) * mask[..., None]
        d_z = (z[:, None, :] - hist_z) * mask[..., None]
        gram = d_g @ d_g.transpose(1, 2)
        rhs = (d_g @ g[:, :, None]).squeeze(-1)
        count = mask.sum(-1).clamp(min=1).to(z.dtype)
        scale = torch.diagonal(gram, dim1=1, dim2=2).sum(-1) / count
        diag = torch.where(mask, (self.ridge * scale + tiny)[:, None],
                           torch.ones_like(scale)[:, None])
        gamma, info = torch.linalg.solve_ex(gram + diag[:, :, None] * state.eye, rhs)
        bad = (info != 0) | ~torch.isfinite(gamma).all(-1)
        gamma = torch.where(bad[:, None], torch.zeros_like(gamma), gamma)
        b = beta[:, None]
        z_mix = z + b * g - ((d_z + b[:, :, None] * d_g) * gamma[..., None]).sum(1)
        z_back = iterate.best_z + b * (iterate.best_fz - iterate.best_z)
        z_next = torch.where(reject[:, None], z_back, z_mix)
        state.valid, state.age, state.beta = valid, age + 1, beta
        state.slot = (slot + 1) % (self.memory + 1)
        return z_next, None, state


@dataclass(eq=False)
class _AndersonState:
    hist_z: torch.Tensor  # (B, memory + 1, n) past iterates, a ring buffer
    hist_g: torch.Tensor  # (B, memory + 1, n) their residuals f(z) - z
    valid: torch.Tensor  # (B, memory + 1) which slots hold a usable pair
    beta: torch.Tensor  # (B,) damping, halved on every rejected step
    age: torch.Tensor  # (B,) steps since the last restart
    slot: int  # ring-buffer position of the current pair
    eye: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class Broyden(AbstractSolver):
    """Limited-memory ("good") Broyden method on $g(z) = f(z) - z$, with a line search.

    Keeps a low-rank inverse-Jacobian estimate $H = -I + \\sum_i u_i v_i^\\top$ per sample
    (Broyden, 1965, Math. Comp.; the inverse form by Sherman-Morrison), steps along
    $d = -H g$ with a nonmonotone backtracking line search on $\\lVert g\\rVert$ (against the
    largest of the last 10 residuals), and clears the estimate
    (falling back to the fixed-point direction $d = g$) when the memory is full, the update is
    ill-defined, or the line search fails.

    Parameters
    ----------
    memory
        Rank-one updates kept before a restart, $\\ge 1$.
    line_search
        Backtrack on the residual norm; ``False`` always takes the full step.
    max_backtracks
        Step halvings tried before the line search gives up, $\\ge 1$.
    rtol, atol, max_steps
        See `FixedPointIteration`.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import Broyden, fixed_point
    >>> sol = fixed_point(torch.cos, torch.zeros(2, 1, dtype=torch.float64),
    ...                   solver=Broyden(rtol=1e-12))
    >>> round(float(sol.value[1, 0]), 8)
    0.73908513
    """

    memory: int = 30
    line_search: bool = True
    max_backtracks: int = 8
    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 200

    def __post_init__(self):
        self._check_common()
        _check_int("memory", self.memory, minimum=1)
        _check_int("max_backtracks", self.max_backtracks, minimum=1)
        if not isinstance(self.line_search, bool):
            raise ValueError(f"line_search must be a bool, got {self.line_search!r}")

    def _hint(self) -> str:
        return "Try a larger max_steps or memory, Anderson(), or Newton() for small dimensions."

    # The low-rank estimates and the residual window are per row; the update counter is shared
    # by all rows alike, so compaction indexes the rows and keeps it.
    supports_row_compaction = True

    def compact_state(self, state, keep):
        return _BroydenState(us=state.us.index_select(0, keep), vs=state.vs.index_select(0, keep),
                             count=state.count, recent=state.recent.index_select(0, keep))

    def init(self, problem, z0, fz0):
        batch, n = z0.shape
        # Broyden residuals are not monotone, so the line search compares with the largest of
        # the last `window` residuals (nonmonotone Armijo) rather than the current one.
        window = 10
        return _BroydenState(
            us=z0.new_zeros(batch, self.memory, n), vs=z0.new_zeros(batch, self.memory, n),
            count=0, recent=torch.full((batch, window), -math.inf, dtype=z0.dtype,
                                       device=z0.device))

    def step(self, problem, state, iterate):
        z, fz, g, active = iterate.z, iterate.fz, iterate.residual, iterate.active
        us, vs = state.us, state.vs
        eps = torch.finfo(z.dtype).eps
        window = state.recent.shape[1]
        state.recent[:, iterate.num_steps % window] = iterate.residual_norm
        direction = -_apply_h(us, vs, g)
        z_new, fz_new, failed, _ = backtracking_line_search(
            problem, z, fz, direction, active, line_search=self.line_search,
            max_backtracks=self.max_backtracks, armijo=1e-4,
            reference=state.recent.max(1).values)
        if state.count == self.memory:
            us.zero_()
            vs.zero_()
            state.count = 0
        dz = z_new - z
        dg = (fz_new - z_new) - g
        h_dg = _apply_h(us, vs, dg)
        denom = (dz * h_dg).sum(1)
        ok = (torch.isfinite(denom) & (denom.abs() > eps * torch.linalg.vector_norm(dz, dim=1)
                                       * torch.linalg.vector_norm(h_dg, dim=1))
              & active & ~failed)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        u = torch.where(ok[:, None], (dz - h_dg) / safe[:, None], torch.zeros_like(dz))
        v = torch.where(ok[:, None], _apply_ht(us, vs, dz), torch.zeros_like(dz))
        us[:, state.count] = u
        vs[:, state.count] = v
        state.count += 1
        # a failed line search means the model is poor: restart it for that sample
        reset = failed[:, None, None]
        us.masked_fill_(reset, 0.0)
        vs.masked_fill_(reset, 0.0)
        return z_new, fz_new, state


def _apply_h(us, vs, x):  # H x = -x + sum_i u_i (v_i . x)
    return -x + ((vs @ x[:, :, None]) * us).sum(1)


def _apply_ht(us, vs, x):  # H^T x = -x + sum_i v_i (u_i . x)
    return -x + ((us @ x[:, :, None]) * vs).sum(1)


@dataclass(eq=False)
class _BroydenState:
    us: torch.Tensor  # (B, memory, n): H = -I + sum_i u_i v_i^T estimates (J_f - I)^{-1}
    vs: torch.Tensor
    count: int  # rank-one updates stored since the last restart
    recent: torch.Tensor  # (B, window) last residual norms, for the nonmonotone line search


@dataclass(frozen=True, kw_only=True)
class Newton(AbstractSolver):
    """Newton's method on $r(z) = z - f(z)$ with the exact per-sample Jacobian.

    Each step solves $(I - J_f(z))\\,d = f(z) - z$ per sample (batched `torch.linalg.solve`) and
    backtracks on $\\lVert r\\rVert$. $J_f$ comes from the caller's ``jacobian`` if given to
    `fixed_point`, else from ``n`` batched vector-Jacobian products (counted in
    ``num_jac_evals``; each also costs one evaluation of ``f``). Quadratic convergence; the fast
    path for small latent dimensions (a handful to a few dozen), cost $O(n^3)$ per step.
    A singular or non-finite system falls back, for that sample, to the fixed-point step.

    Parameters
    ----------
    line_search
        Backtrack on the residual norm (Armijo); ``False`` always takes the full step.
    max_backtracks
        Step halvings tried, $\\ge 1$.
    rtol, atol, max_steps
        See `FixedPointIteration`.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import Newton, fixed_point
    >>> sol = fixed_point(torch.cos, torch.zeros(2, 1, dtype=torch.float64),
    ...                   solver=Newton(rtol=1e-12))
    >>> sol.num_steps <= 6, round(float(sol.value[0, 0]), 8)
    (True, 0.73908513)
    """

    line_search: bool = True
    max_backtracks: int = 10
    rtol: float = 1e-6
    atol: float = 1e-8
    max_steps: int = 50

    def __post_init__(self):
        self._check_common()
        _check_int("max_backtracks", self.max_backtracks, minimum=1)
        if not isinstance(self.line_search, bool):
            raise ValueError(f"line_search must be a bool, got {self.line_search!r}")

    def _hint(self) -> str:
        return ("Try a larger max_steps, or Anderson(): Newton stalls where I - J_f is singular "
                "or f is not differentiable.")

    # Rows are independent in the step; the one state, the last line-search trial's
    # linearization, may hold rows that have stopped since: compaction records which to keep.
    supports_row_compaction = True

    # With a fused problem the first Jacobian reuses the driver's evaluation at z0.
    linearizes_start = True

    def init(self, problem, z0, fz0):
        lin = problem.last_linearization
        return _NewtonState(linearization=lin if lin is not None and lin.fused and lin.z is z0
                            else None,
                            eye=torch.eye(z0.shape[1], dtype=z0.dtype, device=z0.device))

    def compact_state(self, state, keep):
        if state.keep is not None:
            keep = state.keep.index_select(0, keep)
        return _NewtonState(linearization=state.linearization, eye=state.eye, keep=keep)

    def step(self, problem, state, iterate):
        z, fz, g, active = iterate.z, iterate.fz, iterate.residual, iterate.active
        lin = state.linearization
        if lin is not None and (lin.fused or problem.jac is None):
            # the last line-search trial (or the driver's first evaluation) was exactly at this
            # point: reuse what it kept, its graph or the parts its Jacobian shares with f
            # (formed on the rows of that trial; those stopped since are dropped)
            jac = lin.jacobian(keep=state.keep)
        elif problem.jac is not None:
            jac = problem.jacobian(z)
        else:
            jac = problem.linearize(z).jacobian()
        direction, info = torch.linalg.solve_ex(state.eye - jac, g)
        bad = (info != 0) | ~torch.isfinite(direction).all(-1)
        direction = select_rows(bad, g, direction)
        last = []

        def evaluate(z_try):
            # Keep what the Jacobian needs, so the accepted point is not evaluated again.
            last[:] = [problem.linearize(z_try)]
            return last[0].fz

        z_new, fz_new, failed, last_is_final = backtracking_line_search(
            evaluate, z, fz, direction, active, line_search=self.line_search,
            max_backtracks=self.max_backtracks, armijo=1e-4,
            reference=iterate.residual_norm)  # = ||f(z) - z||, already computed by the driver
        state.linearization = last[0] if last_is_final else None
        state.keep = None
        return z_new, fz_new, state


@dataclass(eq=False)
class _NewtonState:
    linearization: object  # Linearization at the current iterate, or None
    eye: torch.Tensor
    keep: torch.Tensor | None = None  # rows of `linearization` still stepped (None: all)
