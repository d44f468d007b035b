"""Run-time certificates for pcDEQ layers: the guarantees checked on the actual weights and batch.

For $g_x(z) = \\sigma(Wz + b + u(x))$ the theory (SPEC 5) needs $W, b \\ge 0$, $\\sigma$ nondecreasing,
concave and bounded on $\\mathbb R_+$, and $g_x(0) > 0$. Then at the fixed point $J = \\mathrm{diag}
(\\sigma'(Wz^* + b + u))W \\ge 0$ and, by concavity, $Jz^* \\le g_x(z^*) - g_x(0) < z^*$; since
$z^* > 0$ the Collatz-Wielandt bound $\\rho(J) \\le \\max_i (Jz^*)_i / z^*_i < 1$ is a rigorous
upper bound on the spectral radius, computed from one Jacobian-vector product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..deq import Solution, spectral_radius

__all__ = ["Certificate", "certify", "residual_rate", "thompson_distance"]


def thompson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Thompson metric $d_T(a, b) = \\max_i |\\log a_i - \\log b_i|$ for $a, b > 0$.

    Shapes ``(B, *event)``; returns ``(B,)`` (``inf`` where an entry is not positive).

    Examples
    --------
    >>> import torch
    >>> thompson_distance(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 2.0]])).tolist()
    [0.6931471824645996]
    """
    a, b = a.flatten(1), b.flatten(1)
    positive = (a > 0).all(1) & (b > 0).all(1)
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    safe_b = torch.where(b > 0, b, torch.ones_like(b))
    d = (torch.log(safe_a) - torch.log(safe_b)).abs().amax(1)
    return torch.where(positive, d, torch.full_like(d, math.inf))


def residual_rate(trace: torch.Tensor | None) -> float:
    """Observed geometric rate $(r_K / r_0)^{1/K}$ of a residual trace $r_0, \\ldots, r_K$
    (``nan`` with fewer than two entries or $r_0 \\le 0$).

    Examples
    --------
    >>> import torch
    >>> round(residual_rate(torch.tensor([1.0, 0.5, 0.25])), 6)
    0.5
    """
    if trace is None or trace.numel() < 2 or not float(trace[0]) > 0:
        return math.nan
    return float((trace[-1] / trace[0]) ** (1.0 / (trace.numel() - 1)))


@dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class Certificate:
    """What was verified about one pcDEQ layer on one input batch.

    Attributes
    ----------
    cone
        Name of the cone parametrisation.
    min_weight
        Smallest effective entry of $W$, its gains and $b$; the cone condition is ``>= 0``.
    activation
        Name of $\\sigma$.
    activation_ok
        $\\sigma$ is nondecreasing, concave and bounded on $\\mathbb R_+$ (declared by the built-in
        activations, checked numerically for `CustomActivation`).
    injection
        Name of the injection $\\phi$.
    g0_min
        ``(B,)`` smallest entry of $g_x(0) = \\sigma(b + u(x))$ per sample; must be ``> 0``.
    rate_thompson
        ``(B,)`` observed contraction factor of one step in Thompson's metric,
        $d_T(g(z_1), g(z^*)) / d_T(z_1, z^*)$ with $z_1 = g(0)$ (0 when $z_1 = z^*$).
    rate_residual
        Observed geometric rate of the largest residual over the batch,
        $(r_K / r_0)^{1/K}$ over the $K$ forward steps (``nan`` without steps).
    spectral_radius
        ``(B,)`` power-iteration estimate of $\\rho(J)$ at $z^*$ (`deqppl.deq.spectral_radius`).
    spectral_radius_bound
        ``(B,)`` rigorous upper bound $\\max_i (Jz^*)_i / z^*_i$ on $\\rho(J)$ (``inf`` if some
        $z^*_i \\le 0$).
    converged
        ``(B,)`` per-sample convergence mask of the forward solve.
    num_steps
        Forward steps taken.
    slope_max
        ``(B,)`` largest $\\sigma'(Wz^* + b + u)$ over the coordinates of each sample: how much
        of a gradient can pass the layer. Near 0 the layer is saturated: $z^*$ barely depends
        on $x$ or the parameters, $\\rho(J)$ is near 0 too, and training cannot move it (the
        certificate still holds; it is about the fixed point, not about trainability).
    """

    cone: str
    min_weight: float
    activation: str
    activation_ok: bool
    injection: str
    g0_min: torch.Tensor
    rate_thompson: torch.Tensor
    rate_residual: float
    spectral_radius: torch.Tensor
    spectral_radius_bound: torch.Tensor
    converged: torch.Tensor
    num_steps: int
    slope_max: torch.Tensor

    @property
    def cone_ok(self) -> bool:
        return self.min_weight >= 0

    @property
    def injection_ok(self) -> bool:
        return bool((self.g0_min > 0).all())

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def stable(self) -> bool:
        """$\\rho(J) < 1$ certified by the bound for every sample."""
        return bool((self.spectral_radius_bound < 1).all())

    def failures(self) -> list[str]:
        """The conditions that do not hold, in words (empty when `certified`)."""
        out = []
        if not self.cone_ok:
            out.append(f"an effective weight is {self.min_weight:.3g} < 0")
        if not self.activation_ok:
            out.append(f"activation {self.activation} is not concave, nondecreasing and bounded")
        if not self.injection_ok:
            bad = int((self.g0_min <= 0).sum())
            out.append(f"g(0) has a zero entry for {bad} samples (injection underflow?)")
        if not self.all_converged:
            out.append(f"{int((~self.converged).sum())} samples did not converge")
        if not self.stable:
            out.append(f"rho(J) bound >= 1 for {int((self.spectral_radius_bound >= 1).sum())} "
                       f"samples")
        return out

    @property
    def certified(self) -> bool:
        """Every condition holds: unique fixed point found, and the backward pass is stable."""
        return not self.failures()

    def as_dict(self) -> dict[str, float]:
        """Batch summaries as floats, for tables (worst case over the batch)."""
        def worst(t, reduce):
            return float(reduce(t)) if t.numel() else math.nan

        return {
            "certified": float(self.certified),
            "min_weight": self.min_weight,
            "g0_min": worst(self.g0_min, torch.min),
            "rate_thompson": worst(self.rate_thompson, torch.max),
            "rate_residual": self.rate_residual,
            "spectral_radius": worst(self.spectral_radius, torch.max),
            "spectral_radius_bound": worst(self.spectral_radius_bound, torch.max),
            "converged": worst(self.converged.to(torch.float64), torch.mean),
            "slope_max": worst(self.slope_max, torch.max),
        }

    def metrics(self) -> dict[str, float]:
        """The certificate as the columns of a classifier comparison's table
        (`deqppl.harness.compare_classifiers`; glossary rows in `deqppl.report.glossary`):
        the checks as 0/1 and the worst case over the batch of every number."""
        d = self.as_dict()
        return {
            "certified": d["certified"], "cone_ok": float(self.cone_ok),
            "activation_ok": float(self.activation_ok), "injection_ok": float(self.injection_ok),
            "min_weight": d["min_weight"], "g0_min": d["g0_min"],
            "rate_thompson": d["rate_thompson"], "rate_residual": d["rate_residual"],
            "rho_jacobian": d["spectral_radius"], "rho_bound": d["spectral_radius_bound"],
            "slope_max": d["slope_max"], "all_samples_converged": float(self.all_converged),
            "fraction_converged": d["converged"],
        }

    def __repr__(self) -> str:
        d = self.as_dict()
        status = "CERTIFIED" if self.certified else "NOT CERTIFIED: " + "; ".join(self.failures())
        return (f"Certificate({status}; cone {self.cone} (min weight {d['min_weight']:.3g}), "
                f"activation {self.activation}, injection {self.injection} "
                f"(min g(0) {d['g0_min']:.3g}), converged {d['converged']:.0%} in "
                f"{self.num_steps} steps, rate {d['rate_residual']:.3g} (residual) / "
                f"{d['rate_thompson']:.3g} (Thompson), rho(J) {d['spectral_radius']:.3g} "
                f"<= bound {d['spectral_radius_bound']:.3g}, max slope {d['slope_max']:.3g})")


def certify(layer, u: torch.Tensor, solution: Solution) -> Certificate:
    """Certificate of a pcDEQ ``layer`` for the injection ``u`` and its forward ``solution``.

    Usually called through ``layer.solve(x, certify=True)``. Costs a few evaluations of the map
    and 50 vector-Jacobian products (the power iteration); no gradient is recorded.

    Parameters
    ----------
    layer
        A `PCDEQLinear` or `PCDEQConv2d`.
    u
        The injection $u(x)$, shape ``(B, *event)``.
    solution
        The forward `deqppl.deq.Solution` for this ``u`` (with ``trace`` recorded, for the
        residual rate).
    """
    z_star = solution.value.detach()
    with torch.no_grad():
        zero = torch.zeros_like(z_star)
        g0 = layer.layer(zero, u)
        g_star = layer.layer(z_star, u)
        g1 = layer.layer(g0, u)
        num = thompson_distance(g1, g_star)
        den = thompson_distance(g0, z_star)
        # one step from z1 = g(0): a factor, or 0 when z1 is already the fixed point
        rate = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                           torch.zeros_like(den))
        jz = layer.jvp(z_star, u, z_star).flatten(1)
        zf = z_star.flatten(1)
        positive = (zf > 0).all(1)
        ratio = (jz / torch.where(zf > 0, zf, torch.ones_like(zf))).amax(1)
        bound = torch.where(positive, ratio, torch.full_like(ratio, math.inf))
        slope = layer.activation.derivative(layer.pre_activation(z_star, u)).flatten(1).amax(1)
    rho = spectral_radius(lambda z: layer.layer(z, u), z_star)
    rate_res = residual_rate(solution.trace)
    act = layer.activation
    return Certificate(
        cone=layer.cone.name, min_weight=layer.min_weight(), activation=act.name,
        activation_ok=bool(act.concave_nondecreasing and act.bounded),
        injection=layer.injection_map.name, g0_min=g0.flatten(1).amin(1), rate_thompson=rate,
        rate_residual=rate_res, spectral_radius=rho, spectral_radius_bound=bound,
        converged=solution.converged.clone(), num_steps=solution.num_steps,
        slope_max=slope)
