r"""AutoDEQ: the amortised MAP encoder derived from any Pyro model with a data plate.

Pyro derives a MAP *guide* from any model (``AutoDelta``); :class:`AutoDEQ` derives a MAP
*encoder*. For a model of the protocol (:mod:`deqppl.protocols`) whose local sites all live in
the data plate, row $s$ of the data has the negative log posterior

$$F_s(u_s) = -\log p\big(y_s, T(u_s)\mid\theta\big),$$

taken from the model's Pyro trace (:func:`deqppl.inference.log_joint` with ``per_datum=True``),
where $u_s$ stacks every local site of row $s$ in *unconstrained* coordinates and $T$ applies
each site's ``biject_to(support)`` (so positive, bounded or simplex-valued latents work). As in
``AutoDelta`` and :func:`~deqppl.inference.fit_map`, no log-Jacobian of $T$ enters: the
stationary points of $F_s$ in $u$ are exactly those of the log joint in the constrained
values. The MAP condition $\nabla F_s(u_s) = 0$ is the fixed point of the map

$$f(u) = u - \nabla F(u),$$

the layer of the encoder; its Jacobian is $I - H$ with $H$ the per-row Hessian of $F$, so the
implicit adjoint solves $H v = g$ (SPEC §7) and, for the encoder's own joint objective, the
implicit term vanishes (the envelope theorem, SPEC §2.4).

Solving. The rows are independent problems, solved batched by a descent method on each
$F_s$ (settings objects :class:`SafeguardedNewton` and :class:`SafeguardedLBFGS`): a solver
that sees only $f$ (the fixed-point protocol) cannot tell a minimum from a saddle, while a
descent method with an Armijo backtracking on $F_s$ cannot step uphill. Per-row gradients and
Hessians come from autograd on the trace: one reverse pass gives every row's gradient (rows do
not interact), and the per-row Hessians are the vector-Jacobian products of that gradient with
the $D$ coordinate directions, each set in every row at once, batched by ``vmap`` inside
autograd (``is_grads_batched``). Inside :mod:`torch.func` transforms, and for the adjoint, the
same quantities come from ``torch.func`` (``grad``, ``vjp``, ``vmap``), which compose with
them (plain autograd is used elsewhere because it was measured 3-6x faster: torch.func
decomposes fused kernels such as Bernoulli's ``binary_cross_entropy_with_logits``). Rows that have
converged drop out of the batch. The result is then handed to
:func:`~deqppl.deq.fixed_point`, which checks the per-sample stopping rule on $f$ and attaches
the adjoint, so the encoder returns the same :class:`~deqppl.deq.Solution` as every other.

What it cannot do, said plainly, and refused before any solve with an error naming the site:
models without a data plate (a kernel GLM couples its points), discrete local sites, local
sites outside the plate, undeclared latent sites, globals missing or of the wrong shape.
Posteriors that are not locally convex at the solution are reported, not hidden:
:meth:`AutoDEQ.curvature` gives each row's smallest Hessian eigenvalue and whether the
stationary point is a strict minimum.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from torch import nn
from torch.distributions import biject_to

from deqppl.deq import (
    AbstractAdjoint,
    AbstractSolver,
    ConvergenceError,
    Newton,
    Solution,
    fixed_point,
)
from deqppl.inference.log_joint import latent_sites, log_joint
from deqppl.optim import (
    LBFGS,
    AbstractStepper,
    Adam,
    FitConvergenceError,
    LBFGSStepper,
    Observation,
    StopRules,
    drive,
    lbfgs_rules,
)
from deqppl.validation import as_tensor, check_finite, check_shape

from .base import AbstractMAPEncoder, default_adjoint, default_rtol
from .fit import EncoderFitResult

__all__ = [
    "AutoDEQ",
    "CurvatureReport",
    "NotAMinimumError",
    "SafeguardedLBFGS",
    "SafeguardedNewton",
    "NEWTON_MAX_DIM",
    "fit_autodeq",
]

#: Stacked latent sizes up to this use :class:`SafeguardedNewton` by default, above it
#: :class:`SafeguardedLBFGS`. A generic Hessian costs D batched backward passes through the
#: trace (the PED encoder's analytic one is a single GEMM), so Newton pays off only for a few
#: dimensions. Measured (benchmarks/bench_autodeq.py cases, CPU time, float64): Poisson PCA
#: d=50, l=5, N=10 000: Newton 545 ms, L-BFGS 861 ms; Bernoulli d=50, l=5: Newton 596 ms,
#: L-BFGS 480 ms; d=500, l=20, N=2 000: Newton 4.9 s / 13 s (Poisson / Bernoulli), L-BFGS
#: 1.4 s / 0.9 s.
NEWTON_MAX_DIM = 8


def _check_settings(obj) -> None:
    for name in ("rtol", "atol"):
        value = getattr(obj, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1e100)
            or math.isnan(value)
        ):
            raise ValueError(f"{type(obj).__name__}.{name} must be None or a finite number >= 0, got {value!r}")
    if obj.rtol == 0 and obj.atol == 0:
        raise ValueError(f"{type(obj).__name__}: rtol and atol cannot both be 0")
    for name in ("max_steps", "max_backtracks"):
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be an integer >= 1, got {value!r}")
    if isinstance(obj.armijo, bool) or not (0 < obj.armijo < 0.5):
        raise ValueError(f"{type(obj).__name__}.armijo must lie in (0, 0.5), got {obj.armijo!r}")


@dataclass(frozen=True, kw_only=True)
class SafeguardedNewton:
    r"""Newton's method on every row's $F_s$, with an Armijo backtracking on $F_s$.

    Each step solves $H_s d_s = -\nabla F_s$ by Cholesky; where $H_s$ is not positive definite
    (a non-convex region) the step uses $|H_s|$ instead (eigenvalues replaced by their absolute
    values, floored at ``1e-8`` times the largest: a descent direction that escapes saddles;
    Dauphin et al., 2014, NeurIPS). The step length halves until
    $F_s(u + t d) \le F_s(u) + c\,t\,\nabla F_s^\top d$ (Armijo, $c$ = ``armijo``). Once the
    Newton decrement $-\nabla F_s^\top d$ is below ``1e-12`` of $\max(1, |F_s|)$, values of
    $F_s$ can no longer resolve the decrease in float64 and the full step is taken (inside
    the quadratic region; Boyd & Vandenberghe, 2004, §9.5). A row whose line search fails
    stops there, reported as not converged.

    Parameters
    ----------
    rtol, atol
        Per-row stopping rule $\lVert f(u)-u\rVert \le \text{atol} + \text{rtol}\lVert f(u)\rVert$
        on the layer $f(u) = u - \nabla F(u)$, the rule :func:`~deqppl.deq.fixed_point` checks;
        ``rtol=None`` is :func:`~deqppl.encoders.default_rtol` of the data's dtype.
    max_steps
        Newton steps at most.
    max_backtracks
        Step halvings per line search. The default 40 matches the PED encoder's Newton: far
        from the MAP of an exp-type family a full step overshoots by orders of magnitude.
    armijo
        Sufficient-decrease constant $c \in (0, 1/2)$.
    refresh
        Form the exact Hessians every ``refresh`` steps (1: Newton's method) and BFGS-update
        them in between (Nocedal & Wright, 2006, §6.1), which costs no Hessian; ``None``: exact
        at the first step only (a quasi-Newton method started from the exact Hessian).

    Examples
    --------
    >>> SafeguardedNewton(max_steps=20)
    SafeguardedNewton(rtol=None, atol=0.0, max_steps=20, max_backtracks=40, armijo=0.0001, refresh=1)
    """

    rtol: float | None = None
    atol: float = 0.0
    max_steps: int = 100
    max_backtracks: int = 40
    armijo: float = 1e-4
    refresh: int | None = 1

    def __post_init__(self) -> None:
        _check_settings(self)
        if self.refresh is not None and (
            isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1
        ):
            raise ValueError(f"SafeguardedNewton.refresh must be None or an integer >= 1, got {self.refresh!r}")


@dataclass(frozen=True, kw_only=True)
class SafeguardedLBFGS:
    r"""Batched limited-memory BFGS on every row's $F_s$, Armijo backtracking on $F_s$.

    Gradient-only (no Hessian), for large stacked latents: per row the two-loop recursion over
    the last ``memory`` pairs $(s, y)$ (Nocedal, 1980, Math. Comp.), initial scaling
    $s^\top y / y^\top y$, pairs with $s^\top y \le 0$ skipped (a non-convex region) and the
    memory cleared where the direction is not a descent direction.

    Parameters
    ----------
    rtol, atol, max_steps, max_backtracks, armijo
        As :class:`SafeguardedNewton`.
    memory
        Pairs kept per row.

    Examples
    --------
    >>> SafeguardedLBFGS(memory=5).memory
    5
    """

    rtol: float | None = None
    atol: float = 0.0
    max_steps: int = 2000
    max_backtracks: int = 40
    armijo: float = 1e-4
    memory: int = 10

    def __post_init__(self) -> None:
        _check_settings(self)
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"SafeguardedLBFGS.memory must be an integer >= 1, got {self.memory!r}")


@dataclass(frozen=True)
class CurvatureReport:
    r"""Local convexity of every row's negative log posterior at its solution.

    Attributes
    ----------
    min_eigenvalue
        ``(B,)`` smallest eigenvalue of the Hessian $H_s$ of $F_s$ in unconstrained
        coordinates.
    is_minimum
        ``(B,)``: $H_s$ positive definite (Cholesky succeeds), so the stationary point is a
        strict local minimum. A row with ``False`` is a saddle or a maximum (or degenerate):
        its "MAP" is not a mode.
    """

    min_eigenvalue: torch.Tensor
    is_minimum: torch.Tensor

    @property
    def num_not_minimum(self) -> int:
        """Rows whose stationary point is not a strict local minimum."""
        return int((~self.is_minimum).sum())


@dataclass(frozen=True)
class _Site:
    name: str
    shape: tuple[int, ...]  # constrained value of one row
    ushape: tuple[int, ...]  # unconstrained value of one row
    transform: object
    offset: int
    size: int


@dataclass(frozen=True)
class _Layout:
    sites: tuple[_Site, ...]
    dim: int
    global_shapes: dict
    global_transforms: dict


def _init_value(dtype: torch.dtype):
    """Init function: every latent at the image of 0 under its support's transform.

    Improper (flat) priors cannot be sampled: their zeros take ``dtype``. Discrete sites keep
    a draw (they are refused afterwards, with their name).
    """

    def init(site: dict) -> torch.Tensor:
        fn = site["fn"]
        try:
            value = fn.sample().detach()
        except NotImplementedError:
            value = torch.zeros(fn.shape(), dtype=dtype)
        if fn.support.is_discrete:
            return value
        t = biject_to(fn.support)
        return t(torch.zeros(t.inverse_shape(value.shape), dtype=value.dtype))

    return init


#: The per-row Hessians are D batched backward passes; each direction's intermediates are about
#: (rows x data entries per row) in size, so directions are batched in chunks keeping that
#: product near 2**23 entries (64 MiB in float64 per intermediate): all 5 directions at once for
#: N = 10 000, d = 50, one at a time for d = 500, where 20 at once would hold several GiB.
_HESSIAN_CHUNK_ELEMENTS = 2**23

#: Unconstrained half-width of the initial globals, as fit_map's (inference/map.py): random, so
#: that the W = z = 0 saddle of factor models is avoided, and small.
_INIT_RADIUS = 0.5


def _prior_globals(model, names, *, seed: int, owner: str) -> dict[str, torch.Tensor]:
    """Seeded initial globals from a prior trace of the program with one row (caller's RNG kept)."""

    def init(site: dict) -> torch.Tensor:
        fn = site["fn"]
        if site["name"] not in names:  # locals and simulated observations: a prior draw
            return fn.sample().detach()
        t = biject_to(fn.support)
        try:
            value = fn.sample().detach()
        except NotImplementedError:
            value = torch.zeros(fn.shape(), dtype=torch.get_default_dtype())
        shape = t.inverse_shape(value.shape)
        return t((2.0 * torch.rand(shape, dtype=value.dtype) - 1.0) * _INIT_RADIUS).detach()

    try:
        with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
            torch.manual_seed(seed)
            trace = poutine.trace(InitMessenger(init)(model)).get_trace(num_data=1)
    except Exception as err:  # the program needs data to know its shapes (covariates, ...)
        raise ValueError(
            f"AutoDEQ could not trace {owner} without data to shape its globals ({err}); pass "
            f"values={{site: tensor}} for {list(names)}"
        ) from err
    return {n: trace.nodes[n]["value"] for n in names if n in trace.nodes}


def _in_functorch_transform() -> bool:
    """Whether we run inside a torch.func transform (as deqppl.deq's fixed_point checks)."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _rows(data: Mapping[str, torch.Tensor], idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return dict(data) if idx is None else {k: v.index_select(0, idx) for k, v in data.items()}


class AutoDEQ(AbstractMAPEncoder):
    r"""An encoder of the protocol whose layer is derived from the model's trace.

    Data: the model's data mapping (or the bare tensor for a single data name), rows along the
    first dimension; fixed point $u$ ``(n, D)``: every local site of a row, flattened and
    stacked in the order of ``model.local_sites``, in unconstrained coordinates; sites
    :meth:`to_sites` maps $u$ back through the supports' transforms; the globals are
    parameters of the encoder, one per global site, of the same name.

    Parameters
    ----------
    model
        A model of the protocol with a data plate (``plate_name`` not ``None``).
    values
        Every global site's value, e.g. ``MAPResult.values`` or a simulation's truth (extra
        keys, such as local sites, are ignored). Checked against the model's trace on the
        first data seen: a missing global or one of the wrong shape is a ``ValueError`` before
        any solve. ``None`` (to fit them, e.g. by :func:`fit_autodeq`): each global starts at
        unconstrained values uniform in $(-0.5, 0.5)$ drawn with ``seed`` (as
        :func:`~deqppl.inference.fit_map`), with the shapes of a prior trace of the program
        with one row (``model(num_data=1)``).
    solver
        :class:`SafeguardedNewton` (default for $D \le 8$, :data:`NEWTON_MAX_DIM`),
        :class:`SafeguardedLBFGS` (default above), or any :mod:`deqppl.deq` solver, which then solves $u = f(u)$ on the
        layer directly (no safeguard on $F_s$).
    adjoint
        How gradients reach the globals through $u^*$ (for downstream losses); default
        :func:`~deqppl.encoders.default_adjoint`, whose Newton solve of $(I - J^\top) v = g$
        is $H v = g$ with the exact per-row Hessian.
    throw
        Raise :class:`~deqppl.deq.ConvergenceError` when a row did not converge.
    seed
        Seed of the initial globals when ``values`` is ``None``.
    check_minimum
        After a descent solve, form the Hessians at $u^*$ and put a :class:`CurvatureReport`
        (each row's smallest eigenvalue, whether it is a strict minimum) in
        ``Solution.solver_info``; with ``throw``, a converged row that is not a strict minimum
        raises :class:`NotAMinimumError`. ``None`` (default): with :class:`SafeguardedNewton`
        only, where one more batched Hessian is cheap; for the L-BFGS path (large $D$) it
        costs $D$ backward passes, so it is asked for explicitly (or call :meth:`curvature`).

    Raises
    ------
    ValueError
        The model has no data plate, or ``values`` misses a global site or holds a non-finite
        value.
    TypeError
        ``solver``/``adjoint`` of the wrong type, or a model lacking the protocol.

    Notes
    -----
    The structural checks that need the program (discrete locals, locals outside the plate,
    undeclared latent sites, shapes of the globals) run on a trace of the model on the data
    at the first :meth:`check_data` and are cached per data shape; they raise before any
    solve. :meth:`hessian` (and hence :meth:`laplace`) is in unconstrained coordinates.

    Examples
    --------
    A model written from scratch: a positive scale per row and one global mean.

    >>> import pyro, pyro.distributions as dist, torch
    >>> from deqppl.protocols import PyroModel
    >>> def program(y=None, *, num_data=None):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y) if y is not None else num_data):
    ...         s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    ...         return pyro.sample("y", dist.Normal(mu, s), obs=y)
    >>> model = PyroModel(program, data_names=("y",), local_sites=("s",), global_sites=("mu",))
    >>> enc = AutoDEQ(model, {"mu": torch.tensor(0.5, dtype=torch.float64)})
    >>> sites, sol = enc.sites(torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64))
    >>> bool(sol.converged.all()), bool((sites["s"] > 0).all())
    (True, True)
    """

    model_kind = "a model of the protocol with a data plate (deqppl.protocols)"

    def __init__(
        self,
        model,
        values: Mapping[str, object] | None = None,
        *,
        solver: SafeguardedNewton | SafeguardedLBFGS | AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        throw: bool = True,
        seed: int = 0,
        check_minimum: bool | None = None,
    ) -> None:
        descent = isinstance(solver, (SafeguardedNewton, SafeguardedLBFGS))
        super().__init__(model, solver=None if descent else solver, adjoint=adjoint, throw=throw)
        self.solver = solver
        if check_minimum is not None and not isinstance(check_minimum, bool):
            raise TypeError(f"check_minimum must be True, False or None, got {check_minimum!r}")
        self.check_minimum = check_minimum
        name = model.describe() if hasattr(model, "describe") else type(model).__name__
        plate = getattr(model, "plate_name", None)
        if plate is None or getattr(model, "locals_coupled", False):
            raise ValueError(
                f"AutoDEQ needs a model whose local sites live in a data plate; {name} declares "
                f"plate_name=None (its locals are coupled, as in a kernel GLM, so the MAP does "
                f"not split into one problem per row). Use a hand-written encoder for it."
            )
        if not tuple(model.local_sites):
            raise ValueError(f"{name} declares no local sites: there is nothing to encode")
        names = tuple(model.global_sites)
        if values is None:
            values = _prior_globals(model, names, seed=seed, owner=name)
        if not isinstance(values, Mapping):
            raise TypeError(
                f"values must be a mapping global site -> tensor (e.g. MAPResult.values) or None, "
                f"got {type(values).__name__}"
            )
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(
                f"values must give every global site of {name} {list(names)}; missing {missing}"
            )
        dtype = None
        for n in names:
            t = as_tensor(values[n], f"values[{n!r}]", dtype=dtype)
            dtype = t.dtype
            check_finite(t, f"values[{n!r}]")
            self.register_parameter(n, nn.Parameter(t.detach().clone()))
        self._layouts: dict = {}

    @classmethod
    def from_values(cls, model, values: Mapping[str, torch.Tensor], **options) -> AutoDEQ:
        """An encoder holding the globals ``values`` (e.g. ``MAPResult.values``)."""
        return cls(model, values, **options)

    def config(self) -> dict:
        """AutoDEQ cannot be saved to a model file: always raises ``TypeError``.

        Raises
        ------
        TypeError
            Its layer is derived from the model's Pyro program, user Python code, and a model
            file holds only tensors and JSON (never pickled code).
        """
        raise TypeError(
            f"AutoDEQ cannot be saved: its fixed point is derived from the Pyro program of "
            f"{type(self.model).__name__}, user Python code, and a deqppl model file holds only "
            f"tensors and JSON, never pickled code. Keep the model's code, save the globals "
            f"(encoder.values(), e.g. with safetensors.torch.save_file) and rebuild with "
            f"AutoDEQ.from_values(model, values)"
        )

    # ------------------------------------------------------------------ structure
    @property
    def plate_name(self) -> str:
        return self.model.plate_name

    def _dtype_now(self, data: Mapping[str, torch.Tensor]) -> torch.dtype:
        ref = self._reference()
        if ref is not None:
            return ref.dtype
        floats = [v.dtype for v in data.values() if v.is_floating_point()]
        return floats[0] if floats else torch.get_default_dtype()

    def check_data(self, data: object) -> dict[str, torch.Tensor]:
        """Validate ``data`` (the model's ``validate``) and the model's structure on them.

        Raises
        ------
        TypeError, ValueError
            As the model's ``validate``; and, naming the site: a discrete local site, a local
            site outside the plate, a latent site declared neither local nor global, a global
            value whose shape is not the one the program expects.
        """
        out = super().check_data(data)  # cast to the globals' dtype; without globals, the data's
        self._layout(out)
        return out

    def _layout(self, data: Mapping[str, torch.Tensor]) -> _Layout:
        key = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(data.items()))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._inspect(data)
            self._layouts[key] = layout
        return layout

    def _inspect(self, data: Mapping[str, torch.Tensor]) -> _Layout:
        model, plate = self.model, self.plate_name
        name = model.describe() if hasattr(model, "describe") else type(model).__name__
        num = next(iter(data.values())).shape[0]
        dtype = self._dtype_now(data)
        try:
            with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
                trace = poutine.trace(InitMessenger(_init_value(dtype))(model)).get_trace(**data)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise ValueError(f"{name} cannot be traced on these data: {err}") from err
        latent = latent_sites(trace)
        local, glob = tuple(model.local_sites), tuple(model.global_sites)
        undeclared = [n for n in latent if n not in local and n not in glob]
        if undeclared:
            raise ValueError(
                f"{name} has latent sites {undeclared} declared neither in local_sites {list(local)} "
                f"nor in global_sites {list(glob)}; AutoDEQ encodes the declared locals given the "
                f"declared globals"
            )
        absent = [n for n in local + glob if n not in latent]
        if absent:
            raise ValueError(f"{name} declares sites {absent} that are not latent sample sites of its program")
        shapes, transforms = {}, {}
        for n in glob:
            transforms[n] = biject_to(trace.nodes[n]["fn"].support)
            want = tuple(trace.nodes[n]["value"].shape)
            got = tuple(getattr(self, n).shape)
            if got != want:
                raise ValueError(
                    f"global site {n!r} of {name} must have shape {want} for these data, got a "
                    f"value of shape {got}"
                )
            shapes[n] = want
        sites, offset = [], 0
        for n in local:
            node = trace.nodes[n]
            fn = node["fn"]
            if fn.support.is_discrete:
                raise ValueError(
                    f"local site {n!r} of {name} is discrete (support {fn.support}); AutoDEQ solves "
                    f"a stationarity condition and needs continuous local sites (marginalise it "
                    f"out, e.g. by enumeration in the program)"
                )
            if not any(f.name == plate for f in node["cond_indep_stack"]):
                raise ValueError(
                    f"local site {n!r} of {name} is outside the plate {plate!r}: every local site "
                    f"must have one value per data row inside the plate (a site shared by all rows "
                    f"is a global site)"
                )
            value = node["value"]
            if value.dim() == 0 or value.shape[0] != num:
                raise ValueError(
                    f"local site {n!r} of {name} must have one value per data row along its first "
                    f"dimension ({num} rows), got shape {tuple(value.shape)}"
                )
            t = biject_to(fn.support)
            ushape = tuple(t.inverse_shape(value.shape))[1:]
            size = math.prod(ushape)
            sites.append(_Site(n, tuple(value.shape[1:]), ushape, t, offset, size))
            offset += size
        return _Layout(tuple(sites), offset, shapes, transforms)

    # ------------------------------------------------------------------ the objective
    def _globals(self, *, detach: bool) -> dict[str, torch.Tensor]:
        return {n: (p.detach() if detach else p) for n, p in self.site_parameters().items()}

    def _constrained(self, u: torch.Tensor, layout: _Layout) -> dict[str, torch.Tensor]:
        n = u.shape[0]
        return {
            s.name: s.transform(u[:, s.offset : s.offset + s.size].reshape(n, *s.ushape))
            for s in layout.sites
        }

    def _neg_rows(self, u, data, layout, params) -> torch.Tensor:
        """$F_s(u_s)$ for every row, ``(n,)``; ``params`` are the globals to use."""
        values = {**params, **self._constrained(u, layout)}
        return -log_joint(self.model, data, values, per_datum=True, plate_name=self.plate_name)

    def objective(self, z: torch.Tensor, data: object, *, validated: bool = False) -> torch.Tensor:
        r"""Per-row negative log posterior $F_s(u_s)$, ``(n,)``, at unconstrained ``z`` ``(n, D)``."""
        data = self._data(data, validated)
        layout = self._layout(data)
        with pyro.validation_enabled(False):
            return self._neg_rows(z, data, layout, self._globals(detach=False))

    def _grad_fn(self, data, layout, params):
        def total(u):
            F = self._neg_rows(u, data, layout, params)
            return F.sum(), F

        return torch.func.grad(total, has_aux=True)

    def _value_and_grad(self, u, data, layout, params):
        """$F$ and $\nabla F$ per row by one autograd pass (rows do not interact)."""
        if _in_functorch_transform():  # autograd cannot run inside a torch.func transform
            with pyro.validation_enabled(False):
                g, F = self._grad_fn(data, layout, params)(u)
            return F, g
        with torch.enable_grad(), pyro.validation_enabled(False):
            uu = u.detach().requires_grad_(True)
            F = self._neg_rows(uu, data, layout, params)
            (g,) = torch.autograd.grad(F.sum(), uu, allow_unused=True)
        return F.detach(), torch.zeros_like(u) if g is None else g

    def _linearize(self, u, data, layout, params):
        """$F$, $\nabla F$ per row, and a function computing the per-row Hessians there.

        One reverse pass gives every row's gradient (rows do not interact); the Hessians are
        the vector-Jacobian products of that gradient with the $D$ coordinate directions, each
        direction set in every row at once and the directions batched by autograd's ``vmap``
        (``is_grads_batched``): ``(n, D, D)`` from $D$ batched backward passes, paid only when
        called. Plain autograd rather than ``torch.func`` here because torch.func decomposes
        fused kernels into primitives: measured, Bernoulli PCA ($N = 10^4$, $d = 50$, $l = 5$)
        gradient 9 ms against 40 ms and Hessians 38 ms against 128 ms ($d = 500$, $l = 20$:
        2.2 s against 13 s); Poisson alike. :meth:`_linearize_functional` is the composable
        variant, used for the adjoint.
        """
        n, D = u.shape
        if _in_functorch_transform():  # autograd cannot run inside a torch.func transform
            F, g = self._value_and_grad(u, data, layout, params)
            return F, g, lambda: self._hessian_functional(u, data, layout, params)
        with torch.enable_grad(), pyro.validation_enabled(False):
            uu = u.detach().requires_grad_(True)
            F = self._neg_rows(uu, data, layout, params)
            (g,) = torch.autograd.grad(F.sum(), uu, create_graph=True, allow_unused=True)
        chunk = self._hessian_chunk(n, D, data)

        def hessian() -> torch.Tensor:
            if g is None or not g.requires_grad:  # F is at most linear in u
                return u.new_zeros(n, D, D)
            eye = torch.eye(D, dtype=u.dtype, device=u.device)
            rows = []
            with torch.enable_grad(), pyro.validation_enabled(False):
                for k in range(0, D, chunk):
                    basis = eye[k : k + chunk].unsqueeze(1).expand(-1, n, D)
                    try:
                        (part,) = torch.autograd.grad(g, uu, basis, retain_graph=True,
                                                      is_grads_batched=True, allow_unused=True)
                    except RuntimeError:  # an op without a batching rule: one direction at a time
                        part = torch.stack([
                            torch.autograd.grad(g, uu, b, retain_graph=True, allow_unused=True)[0]
                            for b in basis
                        ])
                    rows.append(part)
            # rows[i, b] = e_i^T H_b: the rows of each (symmetric) per-row Hessian
            return torch.cat(rows).transpose(0, 1).detach()

        return F.detach(), torch.zeros_like(u) if g is None else g.detach(), hessian

    @staticmethod
    def _hessian_chunk(n: int, D: int, data) -> int:
        width = sum(v[:1].numel() for v in data.values())  # data entries per row
        return max(1, min(D, _HESSIAN_CHUNK_ELEMENTS // max(1, n * width)))

    def _hessian_functional(self, u, data, layout, params) -> torch.Tensor:
        """Per-row Hessians by ``torch.func`` (``vmap`` of the vjp of the gradient): composes
        with torch.func transforms of ``params``, for the implicit adjoint."""
        n, D = u.shape
        grad_fn = self._grad_fn(data, layout, params)
        with pyro.validation_enabled(False):
            _, vjp_fn, _ = torch.func.vjp(grad_fn, u, has_aux=True)
            basis = torch.eye(D, dtype=u.dtype, device=u.device).unsqueeze(1).expand(D, n, D)
            (H,) = torch.func.vmap(vjp_fn, chunk_size=self._hessian_chunk(n, D, data))(basis)
        return H.transpose(0, 1)

    # ------------------------------------------------------------------ the protocol
    def layer(self, z: torch.Tensor, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r"""$f(u) = u - \nabla F(u)$ (row-wise gradient of the negative log posterior)."""
        layout = self._layout(data)
        with pyro.validation_enabled(False):
            g, _ = self._grad_fn(data, layout, self._globals(detach=False))(z)
        return z - g

    def layer_jacobian(self, z: torch.Tensor, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r"""$\partial f/\partial u = I - H$, ``(n, D, D)``."""
        H = self.hessian(z, data)
        return torch.eye(H.shape[-1], dtype=H.dtype, device=H.device) - H

    def hessian(self, z: torch.Tensor, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r"""Per-row Hessian of $F$ in unconstrained coordinates, ``(n, D, D)`` (``torch.func``)."""
        layout = self._layout(data)
        with torch.no_grad():
            return self._linearize(z.detach(), data, layout, self._globals(detach=True))[2]()

    def latent_shape(self, data: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """``(n, D)``: rows by the stacked unconstrained size of the local sites."""
        return (next(iter(data.values())).shape[0], self._layout(data).dim)

    def initial_guess(self, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Zeros: every local site at the image of 0 under its transform (as ``fit_map``'s center)."""
        n, D = self.latent_shape(data)
        ref = next(iter(data.values()))
        return torch.zeros(n, D, dtype=self._dtype_now(data), device=ref.device)

    def to_sites(self, z: torch.Tensor, data: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The stacked unconstrained $u$ as the model's local sites (constrained values).

        ``data`` fixes the layout; it may be left out once the encoder has seen data of a
        single shape (callers written before ``to_sites(z, data)``).
        """
        if data is not None:
            return self._constrained(z, self._layout(data))
        if len(self._layouts) != 1:
            raise ValueError(
                f"to_sites(z) without data needs an encoder that has seen data of exactly one "
                f"shape (it has seen {len(self._layouts)}); pass to_sites(z, data)"
            )
        return self._constrained(z, next(iter(self._layouts.values())))

    def default_solver(self, dtype: torch.dtype) -> SafeguardedNewton | SafeguardedLBFGS:  # type: ignore[override]
        """:class:`SafeguardedNewton` (the dimension is checked in :meth:`solve`)."""
        return SafeguardedNewton()

    # ------------------------------------------------------------------ solving
    def solve(
        self,
        data: object,
        *,
        z0: torch.Tensor | None = None,
        solver: SafeguardedNewton | SafeguardedLBFGS | AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        throw: bool | None = None,
        trace: bool = False,
        validated: bool = False,
    ) -> Solution:
        """Solve every row's MAP condition; see :meth:`AbstractMAPEncoder.solve`.

        With a descent solver (the default), rows are minimised batched as in the class
        notes, then :func:`~deqppl.deq.fixed_point` checks the stopping rule on $f$ and
        attaches the adjoint; the :class:`~deqppl.deq.Solution` counts the descent's steps,
        gradient evaluations (``num_fevals``, each a batched pass over the active rows) and
        Hessians (``num_jac_evals``). ``trace`` is ignored by the descent solvers.
        """
        data = self._data(data, validated)
        layout = self._layout(data)
        solver = solver or self.solver
        if solver is None:
            solver = SafeguardedNewton() if layout.dim <= NEWTON_MAX_DIM else SafeguardedLBFGS()
        if isinstance(solver, AbstractSolver):
            return super().solve(data, z0=z0, solver=solver, adjoint=adjoint, throw=throw,
                                 trace=trace, validated=True)
        if not isinstance(solver, (SafeguardedNewton, SafeguardedLBFGS)):
            raise TypeError(
                f"solver must be SafeguardedNewton, SafeguardedLBFGS, a deqppl.deq solver or "
                f"None, got {solver!r}"
            )
        shape = (next(iter(data.values())).shape[0], layout.dim)
        if z0 is None:
            z0 = self.initial_guess(data)
        else:
            z0 = as_tensor(z0, "z0", dtype=self._dtype_now(data))
            check_shape(z0, shape, "z0")
            check_finite(z0, "z0")
        throw = self.throw if throw is None else throw
        dtype = z0.dtype
        rtol = default_rtol(dtype) if solver.rtol is None else float(solver.rtol)
        start = time.perf_counter()
        with torch.no_grad():
            run = _newton if isinstance(solver, SafeguardedNewton) else _lbfgs
            u, counts = run(self, solver, z0.detach().clone(), data, layout, rtol)
        adjoint = adjoint or self.adjoint or default_adjoint(dtype)
        # The check: zero steps where the descent met the rule; one residual-Newton step (with
        # the exact Jacobian I - H) for a row it left unconverged.
        # The globals go in as explicit arguments, so that torch.func transforms (grad, jacrev,
        # vmap) of a downstream loss reach them through the implicit adjoint.
        check = Newton(rtol=rtol, atol=float(solver.atol), max_steps=1)

        def layer(z, params):
            with pyro.validation_enabled(False):
                return z - self._grad_fn(data, layout, params)(z)[0]

        def jacobian(z, params):
            H = self._hessian_functional(z, data, layout, params)
            return torch.eye(H.shape[-1], dtype=H.dtype, device=H.device) - H

        sol = fixed_point(
            layer,
            u,
            args=(self._globals(detach=False),),
            solver=check,
            adjoint=adjoint,
            jacobian=jacobian,
            throw=False,
        )
        report = None
        check = self.check_minimum
        if check is None:
            check = isinstance(solver, SafeguardedNewton)
        if check:
            with torch.no_grad():
                report = _curvature(self.hessian(sol.value.detach(), data))
            counts["hessians"] += 1
        sol = dataclasses.replace(
            sol,
            num_steps=counts["steps"] + sol.num_steps,
            num_fevals=counts["fevals"] + sol.num_fevals,
            num_jac_evals=counts["hessians"] + sol.num_jac_evals,
            wall_time=time.perf_counter() - start,
            solver=type(solver).__name__,
            solver_info=report,
        )
        if throw and report is not None:
            bad = sol.converged & ~report.is_minimum
            if bool(bad.any()):
                raise NotAMinimumError(sol, report)
        if throw and not bool(sol.converged.all()):
            raise ConvergenceError(
                sol,
                hint=(
                    "Try a larger max_steps, a start z0 closer to the MAP (e.g. the last "
                    "solution), or check curvature(): a row without a local minimum has no MAP."
                ),
            )
        return sol

    # ------------------------------------------------------------------ diagnostics
    def curvature(self, data: object, z: torch.Tensor | None = None, *, validated: bool = False) -> CurvatureReport:
        """Smallest Hessian eigenvalue of every row at $u^*$ (solved if not given).

        Examples
        --------
        >>> import pyro, pyro.distributions as dist, torch
        >>> from deqppl.protocols import PyroModel
        >>> def program(y=None, *, num_data=None):
        ...     with pyro.plate("data", len(y) if y is not None else num_data):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         return pyro.sample("y", dist.Normal(z, 1.0), obs=y)
        >>> model = PyroModel(program, data_names=("y",), local_sites=("z",))
        >>> report = AutoDEQ(model, {}).curvature(torch.zeros(3, dtype=torch.float64))
        >>> report.min_eigenvalue.tolist(), report.num_not_minimum
        ([2.0, 2.0, 2.0], 0)
        """
        data = self._data(data, validated)
        z = self._solution(data, z)
        H = self.hessian(z, data)
        return _curvature(H)


class NotAMinimumError(RuntimeError):
    """A row's solve met the stopping rule at a point whose Hessian is not positive definite.

    Attributes
    ----------
    solution
        The :class:`~deqppl.deq.Solution` (its ``solver_info`` is the report).
    report
        The :class:`CurvatureReport`.
    """

    def __init__(self, solution: Solution, report: CurvatureReport) -> None:
        self.solution, self.report = solution, report
        bad = torch.nonzero(solution.converged & ~report.is_minimum).squeeze(-1)
        row = int(bad[0])
        super().__init__(
            f"{bad.numel()} of {report.is_minimum.numel()} rows are stationary points that are not "
            f"strict local minima of their negative log posterior (first: row {row}, smallest "
            f"Hessian eigenvalue {float(report.min_eigenvalue[row]):.3g}): their 'MAP' is a "
            f"saddle or a maximum. Start elsewhere (z0) or pass throw=False and inspect "
            f"Solution.solver_info."
        )


def _curvature(H: torch.Tensor) -> CurvatureReport:
    _, info = torch.linalg.cholesky_ex(H)
    return CurvatureReport(min_eigenvalue=torch.linalg.eigvalsh(H)[..., 0], is_minimum=info == 0)


# ---------------------------------------------------------------------------------- the solvers
def _converged(u, g, rtol, atol):
    res = torch.linalg.vector_norm(g, dim=-1)
    return res <= atol + rtol * torch.linalg.vector_norm(u - g, dim=-1)


def _descent_direction(g: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """$-H^{-1}g$ where $H$ is positive definite, $-|H|^{-1}g$ elsewhere."""
    chol, info = torch.linalg.cholesky_ex(H)
    d = -torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(d).all(-1)
    if bool(bad.any()):
        lam, V = torch.linalg.eigh(H[bad])
        mag = lam.abs()
        floor = 1e-8 * mag.max(-1, keepdim=True).values.clamp(min=torch.finfo(H.dtype).tiny)
        coef = (V.transpose(-1, -2) @ g[bad].unsqueeze(-1)).squeeze(-1) / torch.maximum(mag, floor)
        d[bad] = -(V @ coef.unsqueeze(-1)).squeeze(-1)
    return d


def _line_search(enc, solver, u, F, g, d, data, layout, params, counts, *, with_grad, first=1.0):
    """Armijo backtracking on F per row from step ``first``; accepted mask, new u, F (and g)."""
    slope = (g * d).sum(-1)
    resolution = 1e-12 * F.abs().clamp(min=1.0)
    accepted = torch.zeros_like(slope, dtype=torch.bool)
    u_new, F_new = u.clone(), F.clone()
    g_new = g.clone() if with_grad else None
    t = torch.full_like(slope, first)
    # rows whose decrease is below the resolution of F take the full step unchecked
    free = -slope <= resolution
    for _ in range(solver.max_backtracks + 1):
        todo = torch.nonzero(~accepted).squeeze(-1)
        if todo.numel() == 0:
            break
        trial = u[todo] + t[todo, None] * d[todo]
        sub = _rows(data, todo)
        counts["fevals"] += 1
        if with_grad:
            F_try, g_try = enc._value_and_grad(trial, sub, layout, params)
            finite = torch.isfinite(F_try) & torch.isfinite(g_try).all(-1)
        else:
            with pyro.validation_enabled(False):
                F_try = enc._neg_rows(trial, sub, layout, params)
            finite = torch.isfinite(F_try)
        ok = finite & (
            (F_try <= F[todo] + solver.armijo * t[todo] * slope[todo]) | free[todo]
        )
        rows = todo[ok]
        accepted[rows] = True
        u_new[rows] = trial[ok]
        F_new[rows] = F_try[ok]
        if with_grad:
            g_new[rows] = g_try[ok]
        t[todo[~ok]] *= 0.5
    return accepted, u_new, F_new, g_new


def _newton(enc, solver, u, data, layout, rtol):
    """Safeguarded Newton, batched over rows; converged and failed rows leave the batch.

    Each step linearises at the full Newton step of every active row (one pass that is also
    the next iterate's gradient where Armijo accepts it, so the common case costs one pass
    and one Hessian per step); rows that must backtrack do so on $F$ alone, then are
    linearised at the accepted point.
    """
    params = enc._globals(detach=True)
    N = u.shape[0]
    done = torch.zeros(N, dtype=torch.bool, device=u.device)
    stuck = torch.zeros_like(done)
    counts = {"steps": 0, "fevals": 1, "hessians": 0}
    atol = float(solver.atol)
    F = u.new_zeros(N)
    g = torch.zeros_like(u)
    # [rows, rows still valid, Hessian function] of each linearisation the active rows are at
    groups = []
    approx = None  # (N, D, D) BFGS approximations between exact Hessians (refresh > 1)

    def exact_at(step):
        return step == 0 or (solver.refresh is not None and step % solver.refresh == 0)

    def linearize(rows, *, trial=False, hessian=True):
        sub = _rows(data, rows)
        if hessian:
            F_r, g_r, hess = enc._linearize(u[rows], sub, layout, params)
        else:
            (F_r, g_r), hess = enc._value_and_grad(u[rows], sub, layout, params), None
        finite = torch.isfinite(F_r) & torch.isfinite(g_r).all(-1)
        F[rows], g[rows] = F_r, g_r
        if not trial:  # a non-finite trial point is a rejected step, not a failure
            stuck[rows[~finite]] = True
        groups.append([rows, finite, hess])
        return finite

    linearize(torch.arange(N, device=u.device))
    while True:
        active = ~(done | stuck)
        done |= active & _converged(u, g, rtol, atol)
        active = ~(done | stuck)
        step = counts["steps"]
        if step >= solver.max_steps or not bool(active.any()):
            break
        idx = torch.nonzero(active).squeeze(-1)
        if exact_at(step):
            # per-row Hessians of the active rows, from the linearisations they are at
            H = u.new_empty(idx.numel(), u.shape[1], u.shape[1])
            where = torch.full((N,), -1, dtype=torch.long, device=u.device)
            where[idx] = torch.arange(idx.numel(), device=u.device)
            for rows, valid, hess in groups:
                need = active[rows] & valid
                if bool(need.any()):
                    counts["hessians"] += 1
                    H[where[rows[need]]] = hess()[need]
        else:
            H = approx[idx]
        groups = []
        finite = torch.isfinite(H).flatten(1).all(-1)
        stuck[idx[~finite]] = True
        idx, H = idx[finite], H[finite]
        if idx.numel() == 0:
            break
        d = _descent_direction(g[idx], H)
        g0, F0, u0 = g[idx].clone(), F[idx].clone(), u[idx].clone()
        slope = (g0 * d).sum(-1)
        u[idx] = u0 + d
        counts["fevals"] += 1
        hessian_next = exact_at(step + 1)
        finite = linearize(idx, trial=True, hessian=hessian_next)  # the full step, with its gradient
        ok = finite & (
            (F[idx] <= F0 + solver.armijo * slope) | (-slope <= 1e-12 * F0.abs().clamp(min=1.0))
        )
        if not bool(ok.all()):
            back = ~ok
            groups[-1][1] = ok  # the full-step linearisation holds only for accepted rows
            rows = idx[back]
            u[rows], F[rows], g[rows] = u0[back], F0[back], g0[back]
            accepted, u_new, _, _ = _line_search(
                enc, solver, u0[back], F0[back], g0[back], d[back], _rows(data, rows), layout,
                params, counts, with_grad=False, first=0.5,
            )
            u[rows] = u_new
            stuck[rows[~accepted]] = True
            if bool(accepted.any()):
                counts["fevals"] += 1
                linearize(rows[accepted], hessian=hessian_next)
        if not hessian_next:
            if approx is None:
                approx = u.new_zeros(N, u.shape[1], u.shape[1])
            approx[idx] = _bfgs_update(H, u[idx] - u0, g[idx] - g0)
        counts["steps"] += 1
    return u, counts


def _bfgs_update(B: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""BFGS update of Hessian approximations ``B`` ``(n, D, D)``; skipped where $y^\top s \le 0$."""
    Bs = (B @ s.unsqueeze(-1)).squeeze(-1)
    sBs = (s * Bs).sum(-1)
    ys = (y * s).sum(-1)
    ok = (ys > 1e-10 * torch.linalg.vector_norm(s, dim=-1) * torch.linalg.vector_norm(y, dim=-1)) & (sBs > 0)
    sBs = torch.where(ok, sBs, torch.ones_like(sBs))
    ys = torch.where(ok, ys, torch.ones_like(ys))
    new = B - Bs.unsqueeze(-1) * Bs.unsqueeze(-2) / sBs[:, None, None] + y.unsqueeze(-1) * y.unsqueeze(-2) / ys[:, None, None]
    return torch.where(ok[:, None, None], new, B)


def _lbfgs(enc, solver, u, data, layout, rtol):
    params = enc._globals(detach=True)
    N, D = u.shape
    m = solver.memory
    S = u.new_zeros(N, m, D)
    Y = u.new_zeros(N, m, D)
    valid = torch.zeros(N, m, dtype=torch.bool, device=u.device)
    head = torch.zeros(N, dtype=torch.long, device=u.device)
    counts = {"steps": 0, "fevals": 1, "hessians": 0}
    F, g = enc._value_and_grad(u, data, layout, params)
    done = torch.zeros(N, dtype=torch.bool, device=u.device)
    stuck = ~(torch.isfinite(F) & torch.isfinite(g).all(-1))
    atol = float(solver.atol)
    arange = torch.arange(m, device=u.device)
    while True:
        done |= ~stuck & _converged(u, g, rtol, atol)
        idx = torch.nonzero(~(done | stuck)).squeeze(-1)
        if idx.numel() == 0 or counts["steps"] >= solver.max_steps:
            break
        q = g[idx].clone()
        s, y, ok = S[idx], Y[idx], valid[idx]
        # newest first: slot (head - 1 - k) mod m
        order = (head[idx, None] - 1 - arange[None, :]) % m
        s = s.gather(1, order[..., None].expand(-1, -1, D))
        y = y.gather(1, order[..., None].expand(-1, -1, D))
        ok = ok.gather(1, order)
        sy = (s * y).sum(-1)
        rho = torch.where(ok, 1.0 / torch.where(ok, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        alpha = torch.zeros_like(sy)
        for k in range(m):
            alpha[:, k] = rho[:, k] * (s[:, k] * q).sum(-1)
            q = q - alpha[:, k, None] * y[:, k]
        yy = (y[:, 0] * y[:, 0]).sum(-1)
        gamma = torch.where(ok[:, 0], sy[:, 0] / torch.where(ok[:, 0], yy, torch.ones_like(yy)), torch.ones_like(yy))
        r = gamma[:, None] * q
        for k in reversed(range(m)):
            beta = rho[:, k] * (y[:, k] * r).sum(-1)
            r = r + (alpha[:, k] - beta)[:, None] * s[:, k]
        d = -r
        ga = g[idx]
        bad = ~((ga * d).sum(-1) < 0) | ~torch.isfinite(d).all(-1)
        if bool(bad.any()):  # not a descent direction: forget the pairs, take the gradient
            d[bad] = -ga[bad]
            valid[idx[bad]] = False
        accepted, u_new, F_new, g_new = _line_search(
            enc, solver, u[idx], F[idx], ga, d, _rows(data, idx), layout, params, counts,
            with_grad=True,
        )
        s_new, y_new = u_new - u[idx], g_new - ga
        keep = accepted & ((s_new * y_new).sum(-1) > 1e-10 * torch.linalg.vector_norm(s_new, dim=-1)
                           * torch.linalg.vector_norm(y_new, dim=-1))
        rows = idx[keep]
        slot = head[rows]
        S[rows, slot] = s_new[keep]
        Y[rows, slot] = y_new[keep]
        valid[rows, slot] = True
        head[rows] = (slot + 1) % m
        u[idx], F[idx], g[idx] = u_new, F_new, g_new
        stuck[idx[~accepted]] = True
        counts["steps"] += 1
    return u, counts


# ---------------------------------------------------------------------------------- the joint fit
def _unconstrained_globals(enc: AutoDEQ, layout: _Layout) -> tuple[list, list[tuple[str, object, tuple]]]:
    """Transforms of the globals and their unconstrained starting values (flattened)."""
    specs, parts = [], []
    for n, value in enc.site_parameters().items():
        t = layout.global_transforms[n]
        u = t.inv(value.detach())
        specs.append((n, t, tuple(u.shape)))
        parts.append(u.reshape(-1))
    return parts, specs


def _assemble(x: torch.Tensor, specs) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, t, shape in specs:
        k = math.prod(shape)
        out[n] = t(x[i : i + k].reshape(shape))
        i += k
    return out


def fit_autodeq(
    encoder: AutoDEQ,
    data: object,
    *,
    optimizer: LBFGS | Adam | None = None,
    seed: int = 0,
    progress: bool = True,
    warm_start: bool = True,
    callback: Callable[[int, float], None] | None = None,
    throw: bool = False,
) -> EncoderFitResult:
    r"""Fit the globals of an :class:`AutoDEQ` by joint MAP through its fixed point.

    The objective is the model's negative log joint at the per-row MAP,
    $L(\theta) = -\log p(\theta) - \sum_s \log p(y_s, z_s^*(\theta)\mid\theta)$, minimised
    over the globals in unconstrained coordinates (each global through its support's
    ``biject_to``, as :func:`~deqppl.inference.fit_map`), so positive or bounded globals stay
    in their support. Because $z^*$ is a stationary point of the same objective, the implicit
    term of the gradient vanishes (envelope theorem, SPEC §2.4): every solve runs without an
    adjoint and the gradient is that of $L$ at the detached $z^*$.

    Parameters
    ----------
    encoder
        The :class:`AutoDEQ`, trained in place (its globals are its parameters).
    data
        The model's data mapping (or the bare tensor for one data name); validated once here.
    optimizer
        :class:`~deqppl.optim.LBFGS` (default): the *profiled* objective full batch, every
        evaluation one warm-started batched solve; ``gtol=None`` means $\epsilon^{1/2}$, as
        :func:`~deqppl.encoders.fit_encoder` (the profiled gradient is exact only to the
        tolerance of the solves). :class:`~deqppl.optim.Adam`: shuffled minibatches, each loss
        scaled by $N/n$ to an unbiased estimate of $L$, the full-data loss after each epoch
        for the stopping rule and the schedule.
    seed
        Seeds Adam's shuffling (a private generator).
    progress
        Show a progress bar.
    warm_start
        Start each row's solve from its last solution.
    callback
        ``callback(step, loss)`` after each step (an L-BFGS iteration or an Adam epoch).
    throw
        Raise :class:`~deqppl.optim.FitConvergenceError` unless the fit converged.

    Returns
    -------
    EncoderFitResult
        ``loss_trace`` is the full-data negative log joint at the start and after each step.

    Raises
    ------
    TypeError
        ``encoder`` is not an :class:`AutoDEQ` or ``optimizer`` not LBFGS/Adam.
    ValueError
        Bad data or model structure (as :meth:`AutoDEQ.check_data`).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> from deqppl.protocols import PyroModel
    >>> def program(y=None, *, num_data=None):
    ...     mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
    ...     with pyro.plate("data", len(y) if y is not None else num_data):
    ...         z = pyro.sample("z", dist.Normal(mu, 1.0))
    ...         return pyro.sample("y", dist.Normal(z, 1.0), obs=y)
    >>> model = PyroModel(program, data_names=("y",), local_sites=("z",), global_sites=("mu",))
    >>> y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    >>> fit = fit_autodeq(AutoDEQ(model), y, progress=False)
    >>> # joint MAP: z_s = (y_s + mu) / 2, so mu = (sum(y) / 2) / (N / 2 + 1 / 100) = 3 / 1.51
    >>> fit.status.name, round(float(fit.encoder.values()["mu"]), 6), round(3 / 1.51, 6)
    ('CONVERGED', 1.986755, 1.986755)
    """
    start = time.perf_counter()
    optimizer = LBFGS() if optimizer is None else optimizer
    if not isinstance(optimizer, (LBFGS, Adam)):
        raise TypeError(f"fit_autodeq optimizes with deqppl.optim.LBFGS(...) or Adam(...); got {optimizer!r}")
    if not isinstance(encoder, AutoDEQ):
        raise TypeError(f"fit_autodeq fits an AutoDEQ encoder, got {type(encoder).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    data = encoder.check_data(data)  # the one validation; the solves below get validated rows
    layout = encoder._layout(data)
    parts, specs = _unconstrained_globals(encoder, layout)
    if not specs:
        raise ValueError(f"{encoder.model.describe()} has no global sites: nothing to fit")
    x0 = torch.cat(parts)
    num_data = next(iter(data.values())).shape[0]
    objective = _JointObjective(encoder, data, specs, warm_start=warm_start)
    if isinstance(optimizer, LBFGS):
        settings = optimizer
        if optimizer.gtol is None:
            settings = dataclasses.replace(optimizer, gtol=math.sqrt(torch.finfo(x0.dtype).eps))
        stepper = LBFGSStepper(objective, x0, settings)
        out = drive(
            stepper,
            lbfgs_rules(settings, x0.dtype, x0.numel()),
            max_steps=int(optimizer.max_steps),
            progress=progress,
            desc="fit_autodeq (L-BFGS)",
            callback=callback,
        )
        objective.assign(stepper.x)
        grad_norm = float(stepper.g.norm())
    else:
        stepper = _AdamStepper(objective, x0, optimizer, num_data=num_data, seed=seed)
        out = drive(
            stepper,
            StopRules(rtol=float(optimizer.rtol), strict=True),
            max_steps=int(optimizer.num_epochs),
            progress=progress,
            desc="fit_autodeq (Adam)",
            callback=callback,
            unit="epoch",
        )
        objective.assign(stepper.x.detach())
        _, g = objective(stepper.x.detach())
        grad_norm = float(g.norm())
    result = EncoderFitResult(
        encoder=encoder,
        loss_trace=torch.tensor(out.trace, dtype=torch.float64),
        num_steps=out.num_steps,
        num_grad_evals=out.num_evals,
        wall_time=time.perf_counter() - start,
        status=out.status,
        criterion=out.criterion,
        grad_norm=grad_norm if math.isfinite(grad_norm) else math.nan,
        optimizer=optimizer,
        num_solves=objective.num_solves,
    )
    if throw and not result.converged:
        raise FitConvergenceError(result, "fit_autodeq")
    return result


class _JointObjective:
    r"""Unconstrained globals $x \mapsto (L, \nabla L)$ at the solved per-row MAP (envelope)."""

    def __init__(self, encoder: AutoDEQ, data, specs, *, warm_start: bool) -> None:
        self.encoder, self.data, self.specs = encoder, data, specs
        self.warm_start = warm_start
        self.z: torch.Tensor | None = None
        self.num_solves = 0

    def assign(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            for n, value in _assemble(x.detach(), self.specs).items():
                getattr(self.encoder, n).copy_(value)

    def solve(self, rows: torch.Tensor | None, z0: torch.Tensor | None) -> torch.Tensor | None:
        data = self.data if rows is None else _rows(self.data, rows)
        with torch.no_grad():
            self.num_solves += 1
            sol = self.encoder.solve(data, z0=z0, throw=False, validated=True)
            if not bool(sol.converged.all()) and z0 is not None:  # a far trial point: cold start
                self.num_solves += 1
                sol = self.encoder.solve(data, throw=False, validated=True)
        return sol.value.detach() if bool(sol.converged.all()) else None

    def loss(self, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor | None, scale: float) -> torch.Tensor:
        enc = self.encoder
        data = self.data if rows is None else _rows(self.data, rows)
        layout = enc._layout(data)
        values = {**_assemble(x, self.specs), **enc._constrained(z, layout)}
        return -log_joint(enc.model, data, values, data_scale=scale, plate_name=enc.plate_name)

    def __call__(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        nan = (math.nan, torch.full_like(x, math.nan))
        self.assign(x)
        z = self.solve(None, self.z if self.warm_start else None)
        if z is None:  # an unsolved fixed point has no profiled loss: the line search backs off
            return nan
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)
            loss = self.loss(xx, z, None, 1.0)
            if not bool(torch.isfinite(loss)):
                return nan
            (g,) = torch.autograd.grad(loss, xx)
        self.z = z
        return float(loss.detach()), g


class _AdamStepper(AbstractStepper):
    """One epoch of minibatch Adam on the unconstrained globals per step, then the full loss."""

    def __init__(self, objective: _JointObjective, x0: torch.Tensor, settings: Adam, *, num_data: int, seed: int):
        self.objective, self.settings, self.num_data = objective, settings, num_data
        self.x = x0.detach().clone().requires_grad_(True)
        self.adam = torch.optim.Adam([self.x], lr=settings.lr, betas=settings.betas)
        self.gen = torch.Generator().manual_seed(seed)
        self.cache: torch.Tensor | None = None
        self.epoch = 0
        self.num_plateaus = 0
        self.loss = math.nan

    def _full(self) -> float:
        obj = self.objective
        obj.assign(self.x.detach())
        z = obj.solve(None, self.cache if obj.warm_start else None)
        if z is None:
            return math.nan
        self.cache = z
        with torch.no_grad():
            return float(obj.loss(self.x.detach(), z, None, 1.0))

    def start(self) -> Observation:
        self.loss = self._full()
        return Observation(loss=self.loss, num_steps=0, num_evals=0)

    def step(self, budget: int) -> Observation:
        s, obj, n = self.settings, self.objective, self.num_data
        lr = s.schedule.lr(s.lr, step=self.epoch, max_steps=s.num_epochs, num_plateaus=self.num_plateaus)
        for group in self.adam.param_groups:
            group["lr"] = lr
        evals = 0
        perm = torch.randperm(n, generator=self.gen)
        for idx in perm.split(s.batch_size):
            obj.assign(self.x.detach())
            z0 = self.cache[idx] if (obj.warm_start and self.cache is not None) else None
            z = obj.solve(idx, z0)
            if z is None:
                return Observation(loss=math.nan, num_evals=evals, stalled="a minibatch solve failed")
            if self.cache is not None:
                self.cache[idx] = z
            self.adam.zero_grad()
            obj.loss(self.x, z, idx, n / idx.numel()).backward()
            self.adam.step()
            evals += 1
        self.epoch += 1
        new = self._full()
        if not new < self.loss:
            self.num_plateaus += 1
        self.loss = new
        return Observation(loss=new, num_evals=evals)
