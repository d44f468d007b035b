"""What every implicit layer shares: input checks, the solve through the DEQ core, the result."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .._validation import check_finite
from ..deq import AbstractAdjoint, AbstractSolver, Solution, fixed_point, spectral_radius

__all__ = ["AbstractImplicitLayer", "LayerSolution"]


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class LayerSolution:
    """Result of an implicit layer's `solve`.

    Attributes
    ----------
    value
        The fixed point $z^*$, shape ``(B, *event)``, attached to autograd by the layer's adjoint.
    solution
        The DEQ core's `deqppl.deq.Solution` of the forward solve (per-sample residuals and
        convergence mask, status, steps, evaluations, wall time).
    certificate
        A `deqppl.layers.Certificate` (pcDEQ layers, when asked for) or ``None``.
    extra
        Layer-specific diagnostics as floats, e.g. the monotonicity margin of a monDEQ.
    """

    value: torch.Tensor
    solution: Solution
    certificate: object | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def converged(self) -> torch.Tensor:
        """``(B,)`` per-sample convergence mask of the forward solve."""
        return self.solution.converged

    def backward_solves(self) -> list[Solution]:
        """The adjoint's linear solves run so far for this forward solve (filled during
        ``backward()``; empty before, or for adjoints without a linear solve)."""
        log = self.solution.adjoint_log
        return [] if log is None else list(log.results)

    def __repr__(self) -> str:
        parts = [repr(self.solution)]
        if self.extra:
            parts.append(", ".join(f"{k}={v:.4g}" for k, v in self.extra.items()))
        if self.certificate is not None:
            parts.append(repr(self.certificate))
        return "LayerSolution(\n  " + ",\n  ".join(parts) + ")"


class AbstractImplicitLayer(nn.Module, abc.ABC):
    """An implicit layer $z^* = f(z^*; u(x))$ solved by the DEQ core; never instantiated.

    Subclasses define the injection ``u(x)`` (`injection`), the map (`layer`), the shape of the
    input (`_check_x`) and may override how the fixed point is found (`_solve`).
    """

    def __init__(self, *, solver: AbstractSolver, adjoint: AbstractAdjoint, throw: bool):
        super().__init__()
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"solver must be a solver object such as FixedPointIteration(), "
                            f"got {solver!r}")
        if not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(f"adjoint must be an adjoint object such as ImplicitAdjoint(), "
                            f"got {adjoint!r}")
        if not isinstance(throw, bool):
            raise TypeError(f"throw must be a bool, got {throw!r}")
        self.solver = solver
        self.adjoint = adjoint
        self.throw = throw
        #: The last forward `LayerSolution` (diagnostics for training loops; detached).
        self.last_solution: LayerSolution | None = None

    # -- what subclasses define --------------------------------------------------------------
    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int | None, ...]:
        """Shape of one input sample; ``None`` marks a free (spatial) size."""

    @abc.abstractmethod
    def event_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape of one sample of $z$ for the (validated) input batch ``x``."""

    @abc.abstractmethod
    def injection(self, x: torch.Tensor) -> torch.Tensor:
        """The input term $u(x)$, shape ``(B, *event)``; ``x`` already validated."""

    @abc.abstractmethod
    def layer(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """$f(z; u)$, shape ``(B, *event)``."""

    # -- shared machinery ---------------------------------------------------------------------
    def check_input(self, x: object) -> torch.Tensor:
        """Validate an input batch: a finite floating tensor of shape ``(B, *input_shape)``
        with the parameters' dtype. Raises ``TypeError``/``ValueError`` naming the problem."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        expected = self.input_shape
        shown = "(B, " + ", ".join("any" if s is None else str(s) for s in expected) + ")"
        if x.ndim != len(expected) + 1 or any(
                s is not None and x.shape[i + 1] != s for i, s in enumerate(expected)):
            raise ValueError(f"x must have shape {shown} for {type(self).__name__}, got "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the parameters of {type(self).__name__} "
                            f"are {dtype}; convert one of them (x.to({dtype}) or layer.to(...))")
        check_finite(x.detach(), "x")
        return x

    def _solve(self, u: torch.Tensor, z0: torch.Tensor, *, throw: bool,
               trace: bool) -> Solution:
        return fixed_point(lambda z: self.layer(z, u), z0, solver=self.solver,
                           adjoint=self.adjoint, throw=throw, trace=trace)

    def _extra(self) -> dict[str, float]:
        return {}

    def initial_guess(self, x: torch.Tensor) -> torch.Tensor:
        """$z_0 = 0$, shape ``(B, *event)``."""
        return x.new_zeros((x.shape[0], *self.event_shape(x)))

    def solve(self, x: torch.Tensor, *, throw: bool | None = None,
              trace: bool = False) -> LayerSolution:
        """Find $z^*(x)$; see the subclass for the map and the default solver.

        Parameters
        ----------
        x
            Input batch ``(B, *input_shape)``.
        throw
            Raise `deqppl.deq.ConvergenceError` if a sample did not converge; ``None`` uses the
            layer's ``throw``.
        trace
            Record the largest residual after every step.
        """
        result, _ = self._solve_with_injection(x, throw=throw, trace=trace)
        self.last_solution = result
        return result

    def _solve_with_injection(self, x, *, throw, trace) -> tuple[LayerSolution, torch.Tensor]:
        x = self.check_input(x)
        throw = self.throw if throw is None else throw
        u = self.injection(x)
        solution = self._solve(u, self.initial_guess(x), throw=throw, trace=trace)
        return LayerSolution(value=solution.value, solution=solution, extra=self._extra()), u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """$z^*(x)$, shape ``(B, *event)``; the full result is kept in ``last_solution``."""
        return self.solve(x).value

    def diagnose(self, x: torch.Tensor) -> dict[str, float]:
        """What can be checked about the layer on the input batch ``x``, as floats for tables.

        Solves from $z_0 = 0$ without raising and returns ``all_samples_converged`` (0/1),
        ``fraction_converged``, ``rate_residual`` (observed geometric rate of the largest
        residual, `deqppl.layers.certificate.residual_rate`) and ``rho_jacobian`` (largest
        power-iteration estimate of $\\rho(\\partial f/\\partial z)$ at the solution over the
        batch, `deqppl.deq.spectral_radius`; at the last iterate where a sample did not
        converge). Subclasses add what their theory certifies (pcDEQ: the `Certificate`;
        monDEQ: the monotonicity margin). The glossary `deqppl.report.glossary` defines every
        name.

        Examples
        --------
        >>> import torch
        >>> from deqppl.layers import DEQLinear
        >>> layer = DEQLinear(3, 4, dtype=torch.float64)
        >>> sorted(layer.diagnose(torch.randn(5, 3, dtype=torch.float64)))
        ['all_samples_converged', 'fraction_converged', 'rate_residual', 'rho_jacobian']
        """
        from .certificate import residual_rate

        result, u = self._solve_with_injection(x, throw=False, trace=True)
        self.last_solution = result
        solution, u = result.solution, u.detach()
        rho = spectral_radius(lambda z: self.layer(z, u), solution.value.detach())
        converged = solution.converged
        return {
            "all_samples_converged": float(bool(converged.all())),
            "fraction_converged": float(converged.to(torch.float64).mean()),
            "rate_residual": residual_rate(solution.trace),
            "rho_jacobian": float(rho.max()) if rho.numel() else math.nan,
        }

    def num_parameters(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_positive_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
