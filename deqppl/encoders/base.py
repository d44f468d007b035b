r"""The encoder protocol: a DEQ whose fixed point is the conditional MAP of a model's locals.

An encoder of the protocol is an :class:`AbstractMAPEncoder`: an ``nn.Module`` bound to a model
of the model protocol (:mod:`deqppl.protocols`), holding the model's global sites as its
parameters (one attribute per global site, of the same name), and defining a fixed-point map
$z = f(z; \text{data})$ whose solution $z^*$ maps to the model's latent sites by
:meth:`~AbstractMAPEncoder.to_sites`. Everything else -- data checks, solving, the Laplace
approximation, spectral radii, moving globals in and out -- is written once here.

A concrete encoder implements:

* ``layer(z, data)`` -- the map $f$, ``(B, *event) -> (B, *event)``, row ``b`` depending on
  ``z[b]`` only (the batch holds independent problems);
* ``latent_shape(data)`` -- the shape of $z$ for these data;
* ``initial_guess(data)`` -- the solver's start;
* ``to_sites(z, data)`` -- $z^*$ as the model's local sites, e.g. ``{"z": z}`` (the data
  are there for maps that need them: a kernel GLM's fitted means give
  $u = L^\top(T(y) - z)/\lambda$);

and may refine ``layer_jacobian(z, data)`` (exact per-sample Jacobian ``(B, n, n)``; default:
autograd inside the solver), ``linearize(z, data) -> (layer, jacobian(keep))`` (the layer and
a function for its Jacobian sharing their common work: :func:`~deqppl.deq.fixed_point`'s
``linearize``; optional, with ``layer_jacobian``), ``hessian(z, data)`` (default: autograd Hessian of the model's
negative log joint in $z$, taken from the Pyro trace) and ``default_solver(dtype)``.

Here ``data`` is always the validated mapping returned by
:meth:`~AbstractMAPEncoder.check_data`; public methods accept a mapping of the model's data
names or, for a model with a single data name, the bare tensor.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from deqppl.deq import (
    AbstractAdjoint,
    AbstractSolver,
    Anderson,
    ImplicitAdjoint,
    Newton,
    Solution,
    fixed_point,
)
from deqppl.deq import spectral_radius as _spectral_radius
from deqppl.validation import BLOCK_ENTRIES, as_tensor, check_finite, check_shape, validated

__all__ = [
    "BLOCK_ENTRIES",
    "AbstractMAPEncoder",
    "LaplaceResult",
    "default_adjoint",
    "default_rtol",
    "gram_factors",
    "graph_free",
    "row_blocks",
    "weighted_gram",
]

#: The attributes an encoder uses from every model (the model protocol).
_PROTOCOL_ATTRIBUTES = ("data_names", "local_sites", "global_sites", "validate", "log_joint")


def default_rtol(dtype: torch.dtype) -> float:
    r"""Default relative residual tolerance of the forward solve: 1e-8 in float64, 1e-4 otherwise.

    The residual is $\lVert f(z)-z\rVert/\lVert f(z)\rVert$. For MAP maps of the form
    $f(z) = z - \Lambda^{-1}\nabla F(z)$ with $H \succeq \Lambda$ it bounds the relative distance
    to the MAP, so 1e-8 gives float64 latents within ~1e-8 of it; tighter is not attainable for
    counts in the thousands, where $T(y) - A'(\eta)$ cancels to round-off (measured floor
    ~4e-9 on simulated Poisson PCA with counts up to ~1e5). In float32 the same cancellation put
    Poisson fits with counts in the hundreds at a floor just under 1e-5 (measured), so 1e-5 --
    the deep encoder's former value -- reports such rows as failures although they are solved
    as well as float32 allows; 1e-4 sits above that floor for every encoder (the PED one's
    former value), ~800 float32 epsilons.

    Examples
    --------
    >>> default_rtol(torch.float64), default_rtol(torch.float32)
    (1e-08, 0.0001)
    """
    return 1e-8 if dtype == torch.float64 else 1e-4


def default_adjoint(dtype: torch.dtype) -> ImplicitAdjoint:
    """Implicit differentiation with an exact Newton solve of the (linear) adjoint problem.

    The adjoint system $(I - J^\\top)u = g$ is solved exactly in one Newton step; the
    tolerance only has to sit above the dtype's round-off: 1e-10 in float64, 1e-5 in float32
    (a fixed 1e-10 made every float32 backward pass fail, measured relative residual floor
    ~5e-8 in float32).
    """
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    return ImplicitAdjoint(solver=Newton(rtol=rtol, atol=0.0))


# Entries of a row block's ``(rows, d)`` temporaries in the graph-free layer evaluations
# (:func:`row_blocks`): deqppl.validation.BLOCK_ENTRIES, 2^16 float64 entries = 512 KiB, which
# stay in the L2 cache and are recycled by the allocator, where whole-batch ``(N, d)``
# temporaries are fresh memory at every call (measured ~1 900 minor page faults per 10 000 x 50
# float64 temporary). Measured on the PED layer of ``benchmarks/bench_ped.py`` (N = 10 000, one
# thread): blocks of 2^15-2^17 entries were within 10% of each other and 3-4x faster than the
# whole batch (d = 50: 4.5 -> 1.3 ms; d = 500: 75 -> 19 ms); blocks of 2^12 entries lost a
# factor 2 to per-call overhead.


def row_blocks(num_rows: int, width: int) -> list[slice]:
    """Slices of ``range(num_rows)`` of about :data:`BLOCK_ENTRIES` / ``width`` rows each.

    Examples
    --------
    >>> row_blocks(5, 2**15)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    rows = max(1, BLOCK_ENTRIES // max(1, int(width)))
    return [slice(i, min(i + rows, num_rows)) for i in range(0, num_rows, rows)]


def graph_free(*tensors: torch.Tensor) -> bool:
    """Whether an evaluation on ``tensors`` records no autograd graph and runs under no
    ``torch.func`` transform: then it may write into preallocated outputs block by block
    (:func:`row_blocks`) instead of composing differentiable whole-batch operations."""
    functorch = torch._C._functorch
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is None or any(wrapped(t) for t in tensors):
        return False
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is not None and peek() is not None:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


@functools.lru_cache(maxsize=32)
def _symmetric_index(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows and columns of the upper triangle of a ``size x size`` matrix, and for each of the
    ``size**2`` entries (row-major) its position among them."""
    rows, cols = torch.triu_indices(size, size)
    full = torch.empty(size, size, dtype=torch.long)
    pos = torch.arange(rows.shape[0])
    full[rows, cols] = pos
    full[cols, rows] = pos
    return rows, cols, full.reshape(-1)


def gram_factors(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The products $W_{ki}W_{kj}$, $i \le j$, ``(d, l(l+1)/2)``, and the index that expands them.

    $W^\top\mathrm{diag}(c)W = \sum_k c_k W_k W_k^\top$ is symmetric: ``c @ outer`` computes
    its upper triangle in one GEMM of $l(l+1)/2$ columns (about half of the $l^2$ of the full
    outer products), and ``(c @ outer)[:, index].reshape(-1, l, l)`` is the full matrix.
    """
    l = W.shape[1]
    rows, cols, index = _symmetric_index(l)
    rows, cols, index = rows.to(W.device), cols.to(W.device), index.to(W.device)
    return W[:, rows] * W[:, cols], index


def weighted_gram(W: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    r"""Batched $W^\top\mathrm{diag}(c_b)W$ for ``W`` ``(d, l)`` and ``c`` ``(B, d)``: ``(B, l, l)``.

    $W^\top\mathrm{diag}(c)W = \sum_k c_k W_k W_k^\top$: one ``(B, d) x (d, l(l+1)/2)`` matrix
    product against the products of pairs of $W$'s columns (:func:`gram_factors`; the matrix is
    symmetric, so only its upper triangle is computed), a single GEMM (measured ~4x faster than
    the equivalent ``einsum("di,nd,dj->nij")``, which materialises a ``(B, d, l)`` intermediate,
    and ~1.6x faster than the GEMM against all $l^2$ products at $l = 20$).
    """
    l = W.shape[1]
    outer, index = gram_factors(W)
    return (c @ outer)[:, index].reshape(-1, l, l)


@dataclass(frozen=True)
class LaplaceResult:
    r"""Laplace approximation $q(z\mid y)=\mathcal N(z^*, H^{-1})$ per datapoint (SPEC §2.5).

    Attributes
    ----------
    mean
        MAP fixed points $z^*$, ``(n, D)``.
    precision
        $H(z^*)$, the Hessian of the negative log joint in $z$, ``(n, D, D)``.
    covariance
        $H^{-1}$, ``(n, D, D)``.
    """

    mean: torch.Tensor
    precision: torch.Tensor
    covariance: torch.Tensor

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``(num_samples, n, D)`` latents from the Laplace approximation."""
        chol = torch.linalg.cholesky(self.covariance)
        eps = torch.randn(
            (num_samples, *self.mean.shape),
            generator=generator,
            dtype=self.mean.dtype,
            device=self.mean.device,
        )
        return self.mean + torch.einsum("nij,snj->sni", chol, eps)


class AbstractMAPEncoder(nn.Module, metaclass=abc.ABCMeta):
    r"""Base of every MAP encoder: ``data -> z^*(data)`` with $z^*$ the conditional MAP.

    Parameters
    ----------
    model
        A model of the protocol (:mod:`deqppl.protocols`) that also has the encoder's
        ``required_model_attributes``.
    solver
        Forward solver; default :meth:`default_solver` for the data's dtype.
    adjoint
        How gradients reach the parameters through $z^*$; default :func:`default_adjoint`.
    throw
        Raise :class:`~deqppl.deq.ConvergenceError` if a datapoint's solve did not converge.

    Attributes
    ----------
    model
        The model whose locals are encoded.
    required_model_attributes
        Class attribute: what the encoder needs from its model beyond the protocol.
    model_kind
        Class attribute: the kind of model, for messages (e.g. ``"an ExpFamPCA-like model"``).

    Raises
    ------
    TypeError
        If the model lacks a protocol or required attribute, or ``solver``, ``adjoint`` or
        ``throw`` has the wrong type.

    Notes
    -----
    Global site ``name`` of the model is the encoder attribute ``name`` (an ``nn.Parameter``);
    :meth:`values`, :meth:`load_values`, :meth:`from_values` and :meth:`site_parameters`
    rely on that.
    """

    required_model_attributes: ClassVar[tuple[str, ...]] = ()
    model_kind: ClassVar[str] = "a model of the protocol (deqppl.protocols)"
    #: Each row of the data is its own MAP problem (the layer of row ``i`` reads only
    #: ``z[i]`` and row ``i`` of every data tensor): :meth:`solve` then declares the rows
    #: independent (``fixed_point(..., rows_independent=True)``) and the solver evaluates the
    #: layer only on the rows still iterating. ``False`` for encoders whose rows are coupled.
    rows_independent: ClassVar[bool] = False

    def __init__(
        self,
        model,
        *,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        throw: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        needed = _PROTOCOL_ATTRIBUTES + tuple(self.required_model_attributes)
        missing = [attr for attr in needed if not hasattr(model, attr)]
        if missing:
            raise TypeError(
                f"{name} needs {self.model_kind} with the attributes {list(needed)}; got "
                f"{type(model).__name__}, which lacks {missing}"
            )
        if solver is not None and not isinstance(solver, AbstractSolver):
            raise TypeError(f"solver must be a deqppl.deq solver object or None, got {solver!r}")
        if adjoint is not None and not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(f"adjoint must be a deqppl.deq adjoint object or None, got {adjoint!r}")
        if not isinstance(throw, bool):
            raise TypeError(f"throw must be True or False, got {throw!r}")
        self.model = model
        self.solver = solver
        self.adjoint = adjoint
        self.throw = throw

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def layer(self, z: torch.Tensor, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The fixed-point map $f(z; \\text{data})$ on validated data, shape-preserving."""

    @abc.abstractmethod
    def latent_shape(self, data: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        """Shape ``(B, *event)`` of the fixed point for these (validated) data."""

    @abc.abstractmethod
    def initial_guess(self, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Starting point of the solve, of shape :meth:`latent_shape`."""

    @abc.abstractmethod
    def to_sites(self, z: torch.Tensor, data: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fixed point as the model's local sites (e.g. ``{"z": z}``); keys ``model.local_sites``."""

    def layer_jacobian(self, z: torch.Tensor, data: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Exact per-sample Jacobian ``(B, n, n)`` of :meth:`layer`, or None for autograd."""
        return None

    def linearize(self, z: torch.Tensor, data: Mapping[str, torch.Tensor]):
        """:meth:`layer` at ``z`` and ``jacobian(keep)``, :meth:`layer_jacobian` there on the
        rows ``keep`` (``None``: all), ``(k, n, n)``.

        The default shares nothing (the Jacobian is formed when asked). An encoder whose layer
        and Jacobian share work overrides it (:meth:`~deqppl.encoders.PEDEncoder.linearize`);
        :meth:`solve` then hands it to :func:`~deqppl.deq.fixed_point` as ``linearize``, which
        `Newton` uses at accepted steps.
        """
        def jacobian(keep=None):
            if keep is None:
                return self.layer_jacobian(z, data)
            return self.layer_jacobian(z.index_select(0, keep),
                                       {k: v.index_select(0, keep) for k, v in data.items()})

        return self.layer(z, data), jacobian

    def default_solver(self, dtype: torch.dtype) -> AbstractSolver:
        """The solver used when none is given: safeguarded Anderson at :func:`default_rtol`."""
        return Anderson(rtol=default_rtol(dtype), atol=0.0, max_steps=2000)

    def joint_structure(self):
        r"""How the model decomposes for the structured joint fit (:class:`~deqppl.optim.AlternatingNewton`).

        Encoders whose model is a stack of GLM layers (rows of the globals independent given
        the latents, data rows independent given the globals) return a
        :class:`~deqppl.encoders.joint.JointStructure`; the default has none.

        Raises
        ------
        TypeError
            This encoder's model has no structured joint fit (the default).
        """
        raise TypeError(
            f"{type(self).__name__} has no structured joint fit (joint_structure); fit it with "
            f"deqppl.optim.LBFGS() (profiled) or Adam()"
        )

    def default_fit_optimizer(self):
        """The optimiser :func:`~deqppl.encoders.fit_encoder` uses when none is given: ``LBFGS()``."""
        from deqppl.optim import LBFGS

        return LBFGS()

    def hessian(self, z: torch.Tensor, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r"""Per-sample Hessian of the negative log joint in $z$, ``(B, D, D)`` (D = event size).

        The default differentiates the model's log joint (the Pyro trace, at the encoder's
        globals and :meth:`to_sites` of ``z``) twice by autograd; rows are independent, so
        row ``i`` of every sample's block is one backward pass: ``D`` passes in all.
        Encoders with a closed form override it.
        """
        from deqppl.inference.log_joint import log_joint  # deferred: inference imports torch/pyro

        shape = z.shape
        with torch.enable_grad():
            zz = z.detach().clone().requires_grad_(True)
            values = {**self.values(), **self.to_sites(zz, data)}
            neg = -log_joint(self.model, dict(data), values)
            (g,) = torch.autograd.grad(neg, zz, create_graph=True)
            g = g.reshape(shape[0], -1)
            rows = [
                torch.autograd.grad(g[:, i].sum(), zz, retain_graph=True)[0].reshape(shape[0], -1)
                for i in range(g.shape[1])
            ]
        return torch.stack(rows, dim=1).detach()

    # ------------------------------------------------------------------ saved models
    def config(self) -> dict:
        """JSON-able settings for a model file (:func:`deqppl.io.save`); the saved-model protocol.

        An encoder class that can be saved overrides this, implements the classmethod
        ``from_config(model, config, tensors)`` and is registered with
        ``@deqppl.io.register(name)`` (see :mod:`deqppl.io.registry`).

        Raises
        ------
        TypeError
            Here, in the base: this encoder class does not implement the saved-model protocol.
        """
        raise TypeError(
            f"{type(self).__name__} cannot be saved: it does not implement the saved-model protocol "
            f"(config() and from_config(), registered with deqppl.io.register); save its globals "
            f"with encoder.values() and rebuild it with from_values()"
        )

    def _settings_config(self) -> dict:
        """The base settings (solver, adjoint, throw) as JSON, for subclasses' :meth:`config`."""
        from deqppl.io.registry import settings_config

        return {
            "solver": settings_config(self.solver, where="solver"),
            "adjoint": settings_config(self.adjoint, where="adjoint"),
            "throw": self.throw,
        }

    @staticmethod
    def _settings_from_config(config: Mapping) -> dict:
        from deqppl.io.registry import settings_from_config

        return {
            "solver": settings_from_config(config["solver"]),
            "adjoint": settings_from_config(config["adjoint"]),
            "throw": bool(config["throw"]),
        }

    # ------------------------------------------------------------------ data
    def _reference(self) -> torch.Tensor | None:
        return next(iter(self.parameters()), None)

    def check_data(self, data: object) -> dict[str, torch.Tensor]:
        """Validate ``data`` with the model and cast it to the encoder's dtype and device.

        Parameters
        ----------
        data
            A mapping of the model's data names, or (model with one data name) the bare
            array for it.

        Returns
        -------
        dict
            The validated data; pass it on with ``validated=True`` to skip a second check.

        Raises
        ------
        TypeError, ValueError
            As the model's ``validate``; a bare array for a model with several data names.
        """
        names = tuple(self.model.data_names)
        if not isinstance(data, Mapping):
            if len(names) != 1:
                raise TypeError(
                    f"{type(self).__name__} encodes a model with data {list(names)}: pass a mapping "
                    f"{{name: tensor}}, not a bare {type(data).__name__}"
                )
            data = {names[0]: data}
        # Data validated for this model already (ValidatedData) is not checked again.
        out = dict(validated(self.model, data))
        ref = self._reference()
        if ref is not None:
            out = {k: (v.to(dtype=ref.dtype, device=ref.device) if v.is_floating_point() else v.to(ref.device))
                   for k, v in out.items()}
        return out

    def _data(self, data: object, validated: bool) -> dict[str, torch.Tensor]:
        return dict(data) if validated else self.check_data(data)

    # ------------------------------------------------------------------ solving
    def solve(
        self,
        data: object,
        *,
        z0: torch.Tensor | None = None,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        throw: bool | None = None,
        trace: bool = False,
        validated: bool = False,
    ) -> Solution:
        """Solve the fixed point for ``data``; returns the full :class:`~deqppl.deq.Solution`.

        Parameters
        ----------
        data
            Mapping of the model's data names (or the bare tensor, one data name).
        z0
            Start, shape :meth:`latent_shape`; default :meth:`initial_guess` (pass the last
            solution to warm-start).
        solver, adjoint, throw
            Override the encoder's settings for this call.
        trace
            Record the residual per step in ``Solution.trace``.
        validated
            ``data`` is already the output of :meth:`check_data` (skips the second check).

        Raises
        ------
        ConvergenceError
            If ``throw`` and some datapoint did not converge.
        """
        data = self._data(data, validated)
        shape = tuple(self.latent_shape(data))
        if z0 is None:
            z0 = self.initial_guess(data)
        else:
            ref = self._reference()
            z0 = as_tensor(z0, "z0", dtype=ref.dtype if ref is not None else None)
            check_shape(z0, shape, "z0")
            check_finite(z0, "z0")
        dtype = z0.dtype
        solver = solver or self.solver or self.default_solver(dtype)
        adjoint = adjoint or self.adjoint or default_adjoint(dtype)
        has_jacobian = type(self).layer_jacobian is not AbstractMAPEncoder.layer_jacobian
        fused = has_jacobian and type(self).linearize is not AbstractMAPEncoder.linearize

        def rows_of(rows):
            # the data of the batch rows `rows` (every data tensor is per row: rows_independent)
            return data if rows is None else {k: v.index_select(0, rows) for k, v in data.items()}

        return fixed_point(
            lambda z, rows=None: self.layer(z, rows_of(rows)),
            z0,
            solver=solver,
            adjoint=adjoint,
            jacobian=(lambda z, rows=None: self.layer_jacobian(z, rows_of(rows))) if has_jacobian else None,
            throw=self.throw if throw is None else throw,
            trace=trace,
            rows_independent=type(self).rows_independent,
            linearize=(lambda z, rows=None: self.linearize(z, rows_of(rows))) if fused else None,
        )

    def forward(self, data: object, *, z0: torch.Tensor | None = None) -> tuple[torch.Tensor, Solution]:
        """The fixed point $z^*$ for ``data`` and its solve; differentiable in the parameters."""
        sol = self.solve(data, z0=z0)
        return sol.value, sol

    def sites(self, data: object, *, z0: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], Solution]:
        """The MAP of the model's local sites (:meth:`to_sites` of the fixed point) and the solve."""
        data = self.check_data(data)
        sol = self.solve(data, z0=z0, validated=True)
        return self.to_sites(sol.value, data), sol

    # ------------------------------------------------------------------ the model's globals
    def site_parameters(self) -> dict[str, torch.Tensor]:
        """The model's global sites as the encoder's live parameters (not copies), by site name."""
        return {name: getattr(self, name) for name in self.model.global_sites}

    def fit_parameters(self) -> list[torch.Tensor]:
        """The leaf tensors :func:`~deqppl.encoders.fit_encoder` optimises: by default the
        global sites themselves, in the order of ``model.global_sites``. An encoder holding
        constrained globals in unconstrained coordinates (``AutoDEQ``) returns those leaves;
        :meth:`site_parameters` then computes the sites from them, differentiably."""
        return list(self.site_parameters().values())

    def values(self) -> dict[str, torch.Tensor]:
        """The model's global sites (detached copies), e.g. ``{"W": ..., "B": ...}``."""
        return {name: t.detach().clone() for name, t in self.site_parameters().items()}

    def load_values(self, values: Mapping[str, torch.Tensor]) -> AbstractMAPEncoder:
        """Set the globals from ``values`` (e.g. ``MAPResult.values``; extra keys are ignored).

        The encoder moves to the dtype of the values. Returns the encoder.

        Raises
        ------
        ValueError
            If a global site is missing, has the wrong shape or a non-finite entry.
        """
        names = tuple(self.model.global_sites)
        if not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping site -> tensor, got {type(values).__name__}")
        missing = [name for name in names if name not in values]
        if missing:
            raise ValueError(f"values must give every global site {list(names)}; missing {missing}")
        if not names:
            return self
        dtype = as_tensor(values[names[0]], names[0]).dtype
        tensors = {}
        for name in names:
            t = as_tensor(values[name], name, dtype=dtype)
            check_shape(t, tuple(getattr(self, name).shape), name)
            check_finite(t, name)
            tensors[name] = t
        self.to(dtype)
        with torch.no_grad():
            for name, t in tensors.items():
                getattr(self, name).copy_(t)
        return self

    @classmethod
    def from_values(cls, model, values: Mapping[str, torch.Tensor], **options) -> AbstractMAPEncoder:
        """An encoder sharing the globals of a fitted model (e.g. ``MAPResult.values``).

        ``options`` are the encoder's keyword arguments (``solver``, ``adjoint``, ``throw``).
        """
        return cls(model, **options).load_values(values)

    # ------------------------------------------------------------------ diagnostics
    def _solution(self, data: dict[str, torch.Tensor], z: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            if z is None:
                return self.solve(data, validated=True).value.detach()
        z = as_tensor(z, "z")
        check_shape(z, tuple(self.latent_shape(data)), "z")
        return z.detach()

    def laplace(self, data: object, z: torch.Tensor | None = None, *, validated: bool = False) -> LaplaceResult:
        """Laplace approximation at the MAP (SPEC §2.5); solves for $z^*$ if not given.

        Raises
        ------
        ValueError
            If the Hessian is not positive definite at some datapoint (possible with rectified
            nonlinearities), naming the first such row.
        """
        data = self._data(data, validated)
        z = self._solution(data, z)
        with torch.no_grad():
            H = self.hessian(z, data)
        chol, info = torch.linalg.cholesky_ex(H)
        if bool((info != 0).any()):
            row = int(torch.nonzero(info)[0])
            raise ValueError(
                f"the Hessian of the negative log posterior is not positive definite at row {row}"
                f": the fixed point there is not a strict local minimum, so no Laplace "
                f"approximation exists (check the Theorem 1 condition with uniqueness())"
            )
        cov = torch.cholesky_inverse(chol)
        return LaplaceResult(mean=z, precision=H, covariance=cov)

    def spectral_radius(self, data: object, z: torch.Tensor | None = None, *, validated: bool = False) -> torch.Tensor:
        """Per-sample spectral radius of $\\partial f/\\partial z$ at $z^*$, ``(B,)``.

        Values $\\ge 1$ mean plain fixed-point iteration would not converge there.
        """
        data = self._data(data, validated)
        z = self._solution(data, z)
        return _spectral_radius(lambda u: self.layer(u, data), z)
