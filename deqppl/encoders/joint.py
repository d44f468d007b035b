r"""The structured joint fit of (globals, latents): alternating batched Newton half-steps (SPEC §2.4.1).

A model of *GLM layers* (exponential-family PCA: one layer; the hierarchical model of SPEC §3:
$L$ layers) has, for layer $l$, a response $r^{(l)}$ (the observations $y$ for $l = 1$, the
latent $z^{(l-1)}$ above), a predictor $z^{(l)}$, a likelihood row of the family table with
natural parameter $R^{(l)}(\eta^{(l)})$, $\eta^{(l)} = z^{(l)}W^{(l)\top} + b^{(l)}$, Gaussian
priors $\mathcal N(0, s^2)$ on the entries of $\theta^{(l)} = [W^{(l)}\;b^{(l)}]$ and
$z^{(L)}\sim\mathcal N(0, \lambda^{-1}I)$ on top. Its negative log joint is

$$f=\sum_l\sum_{s,i}\Big[A\big(v^{(l)}_{si}\big)-T\big(r^{(l)}_{si}\big)v^{(l)}_{si}-\log h\big(r^{(l)}_{si}\big)\Big]
+\tfrac\lambda2\lVert z^{(L)}\rVert^2+\sum_l\tfrac{1}{2s^2}\lVert\theta^{(l)}\rVert^2+\text{const},
\qquad v^{(l)} = R^{(l)}(\eta^{(l)}),$$

written with the family table's $A$, $T$, $\log h$ and the nonlinearity's $R$, $\rho$ (one source
of truth; the test suite checks $f$ against the Pyro model's log joint, constants included).

*Global half-step.* Given the latents, row $i$ of $\theta^{(l)}$ is an $(d_l+1)$-dimensional GLM
with gradient $g_i=\sum_s e_{si}\tilde z_s+\theta_i/s^2$ and Fisher information
$H_i=\sum_s w_{si}\tilde z_s\tilde z_s^\top+I/s^2$, $\tilde z_s = (z^{(l)}_s; 1)$,
$e = \partial f/\partial\eta = \sigma(\eta)-T(r)\rho(\eta)$ and $w = A''(R(\eta))\rho(\eta)^2$
(for $R$ = identity, $w = A''(\eta)$ is the exact Hessian weight and the step is Newton's).
All rows take one step at once: the $d$ Hessians are one $(d, N)\times(N, (d_l+1)^2)$ product.
The sums over data rows go through the fit's :class:`~deqppl.distributed.ShardLayout`
(:meth:`~deqppl.distributed.ShardLayout.sum`, the checked all-reduce), so the same code runs
data-parallel: each rank holds its rows and their latents, the latent half-step is local, and
every rank receives the same sums (gradients and $(d_l+1)\times(d_l+1)$ Hessians of the
global rows, objective, Anderson inner products, spectral start, balancing, stopping rule) and
so takes the same decisions.

*Latent half-step.* Given the globals the data rows decouple (the PED fixed point, SPEC §2.2):
one layer: one batched $l\times l$ Newton/Fisher step per row,
$H_s = \lambda I + W^\top\mathrm{diag}(w_s)W$; several layers with $R$ = identity: $f$ is
quadratic in $\zeta_s = (z^{(1)}_s;\dots;z^{(L)}_s)$ with one block-tridiagonal Hessian shared by
every row, so one solve is the exact conditional MAP.

Every row of a half-step halves its step until its own objective does not increase (up to the
rounding of its sum), so a sweep never increases $f$. The sweeps $x\mapsto G(x)$ are
Anderson-accelerated with DAAREM's safeguard (see :class:`~deqppl.optim.AlternatingNewton`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from deqppl.distributed import ShardLayout
from deqppl.expfam import Likelihood
from deqppl.optim import (
    AbstractStepper,
    AlternatingNewton,
    FitConvergenceError,
    Observation,
    StopRules,
    drive,
)

__all__ = ["GLMLayer", "JointStructure", "fit_alternating"]

# A row's objective may "increase" by rounding alone: its sum of N terms errs by ~log2(N) eps
# sum|terms| (pairwise summation); 64 ulps of sum|terms| covers N up to 2^64 and keeps the
# step-halving from chasing noise once the fit is at the optimum.
_ROW_NOISE_ULPS = 64.0
# Sweeps in a row without any decrease of f before the fit is declared stalled.
_STALL_SWEEPS = 5


@dataclass(frozen=True)
class GLMLayer:
    r"""One layer of a structured model: response $r^{(l)}\mid\eta^{(l)}$ from ``likelihood``.

    Attributes
    ----------
    likelihood
        Family row and nonlinearity of the response given $\eta^{(l)}$.
    weight_site, bias_site
        The model's global sites holding $W^{(l)}$ ``(d_{l-1}, d_l)`` and $b^{(l)}$
        ``(d_{l-1},)``.
    latent_width
        $d_l$, the width of the predictor $z^{(l)}$.
    param_scale
        Prior sd $s$ of the entries of $W^{(l)}, b^{(l)}$; ``None`` for a flat prior.
    """

    likelihood: Likelihood
    weight_site: str
    bias_site: str
    latent_width: int
    param_scale: float | None


@dataclass(frozen=True)
class JointStructure:
    r"""What an encoder tells the structured joint fit about its model.

    Attributes
    ----------
    layers
        The GLM layers, bottom (observed response) first; layer $l\ge2$ has the latent
        $z^{(l-1)}$ as its response, which must then be a ``gaussian`` row with $R$ = identity.
    top_precision
        $\lambda$ of the prior $z^{(L)}\sim\mathcal N(0,\lambda^{-1}I)$.

    Examples
    --------
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> s = PEDEncoder(ExpFamPCA(family=family("poisson"), obs_dim=4, latent_dim=2)).joint_structure()
    >>> [(l.weight_site, l.bias_site, l.latent_width) for l in s.layers], s.top_precision
    ([('W', 'B', 2)], 1.0)
    """

    layers: tuple[GLMLayer, ...]
    top_precision: float

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("JointStructure needs at least one layer")
        if len(self.layers) > 1:
            for l, layer in enumerate(self.layers, start=1):
                lik = layer.likelihood
                if lik.family.name != "gaussian" or not lik.nonlinearity.is_identity:
                    raise ValueError(
                        f"a structured joint fit of several layers needs a gaussian row with "
                        f"R = identity in every layer (the latent half-step is then one exact "
                        f"quadratic solve); layer {l} has {lik.describe()}. Fit this model with "
                        f"deqppl.optim.LBFGS() (profiled) or Adam()"
                    )
        if self.layers[-1].param_scale is None:
            raise ValueError(
                "with a flat prior on the top layer's loadings (param_scale=None) the joint MAP "
                "does not exist: W -> aW, Z -> Z/a leaves the likelihood unchanged and lowers "
                "the latents' prior penalty for every a > 1, so a joint fit runs off to "
                "W -> inf, Z -> 0. Give the model a param_scale, or fit with "
                "deqppl.optim.LBFGS() / Adam() and a step cap"
            )
        if self.layers[0].likelihood.nonlinearity.name == "relu":
            raise ValueError(
                "the hard ReLU makes the log joint non-differentiable at eta = 0, where MAP "
                "points sit (SPEC §2.3, Theorem 2), so Newton half-steps have no curvature to "
                "use there; fit with deqppl.optim.LBFGS() (profiled) or Adam(), or use "
                "smooth_relu(tau)"
            )


def _chol(H: torch.Tensor) -> torch.Tensor:
    """Batched Cholesky factor of symmetric positive (semi)definite ``H``, jittered where singular."""
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info > 0).any()):
        # Singular only with a flat prior and degenerate data (e.g. a latent column of zeros):
        # a relative jitter of 1e-10 of the diagonal keeps the step defined and tiny there.
        diag = H.diagonal(dim1=-2, dim2=-1)
        jitter = 1e-10 * diag.abs().amax(-1).clamp_min(1.0)
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        L, _ = torch.linalg.cholesky_ex(H + jitter[..., None, None] * eye)
    return L


def _solve(L: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """$H^{-1}g$ for batched factors ``L`` ``(B, k, k)`` and ``g`` ``(B, k)``."""
    return torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)


def _outer_rows(P: torch.Tensor) -> torch.Tensor:
    """Rows' outer products ``(N, k*k)`` of ``P`` ``(N, k)``."""
    return (P[:, :, None] * P[:, None, :]).reshape(P.shape[0], -1)


class _Point:
    """An iterate (globals, latents) with everything a sweep from it needs."""

    __slots__ = ("thetas", "zeta", "etas", "terms", "Avs", "loss", "e", "w", "gz", "dz", "Lz", "gW")

    def __init__(self, thetas, zeta):
        self.thetas = thetas
        self.zeta = zeta


class _Problem:
    """The objective and the two half-steps for a :class:`JointStructure` and validated data."""

    def __init__(self, structure: JointStructure, y: torch.Tensor, settings: AlternatingNewton,
                 layout: ShardLayout | None = None) -> None:
        self.s = structure
        # This rank's rows among all ranks' (one process: all of them).
        self.layout = ShardLayout.single(y.shape[0]) if layout is None else layout
        self.layers = structure.layers
        self.L = len(self.layers)
        self.y = y
        self.settings = settings
        self.dtype = y.dtype
        self.eps = float(torch.finfo(y.dtype).eps)
        self.widths = [layer.latent_width for layer in self.layers]
        fam = self.layers[0].likelihood.family
        with torch.no_grad():
            self.Ty = fam.T(y)
            # Constants of the log joint: log h(y), the top prior's and the globals' priors'.
            log_h = self.sum(fam.log_h(y).sum(), "the data's log h(y)")
        n_total = self.layout.num_total
        lam = structure.top_precision
        const = -float(log_h) - float(n_total) * self.widths[-1] * 0.5 * math.log(lam / (2 * math.pi))
        for layer in self.layers:
            if layer.param_scale is not None:
                k = self._num_rows_out(layer) * (layer.latent_width + 1)
                const += k * 0.5 * math.log(2 * math.pi * layer.param_scale**2)
        self.const = const
        self.num_data = int(n_total)
        # Hierarchical (several layers, all Gaussian identity): the latent Hessian is shared.
        self.quadratic_latents = self.L > 1
        self.last_LW: list[torch.Tensor] | None = None
        self.num_evals = 0
        self.num_latent_steps = 0

    def sum(self, part: torch.Tensor, where: str) -> torch.Tensor:
        """``part`` summed over ranks (checked: a rank that failed stops all); one process: ``part``."""
        return self.layout.sum(lambda: part, like=part, where=f"fit_encoder (alternating Newton): {where}")

    def any_rank(self, mask: torch.Tensor, where: str) -> bool:
        """Whether ``mask`` has a true entry on any rank (the same answer on every rank)."""
        if not self.layout.parallel:
            return bool(mask.any())
        count = mask.sum().to(torch.float64).reshape(1)
        return float(self.sum(count, where)[0]) > 0.0

    def _num_rows_out(self, layer: GLMLayer) -> int:
        i = self.layers.index(layer)
        return self.y.shape[1] if i == 0 else self.widths[i - 1]

    # ------------------------------------------------------------------ pieces of the state
    def split(self, zeta: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(zeta, self.widths, dim=1))

    def responses(self, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.y, *zs[:-1]]

    @staticmethod
    def eta(theta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.addmm(theta[:, -1], z, theta[:, :-1].T)

    def layer_terms(self, l: int, eta: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""$A(v)-T(r)v-\log h(r)$ elementwise (without $\log h(y)$ for the observed layer), and $A(v)$."""
        lik = self.layers[l].likelihood
        v = lik.natural(eta)
        fam = lik.family
        Av = fam.A(v)
        if l == 0:
            return torch.addcmul(Av, self.Ty, v, value=-1.0), Av
        return Av - fam.T(r) * v - fam.log_h(r), Av

    def derivatives(self, l: int, eta: torch.Tensor, r: torch.Tensor, Av: torch.Tensor):
        r"""$e = \partial f/\partial\eta$ and the Fisher weight $w = A''(R(\eta))\rho(\eta)^2$."""
        lik = self.layers[l].likelihood
        fam = lik.family
        if lik.nonlinearity.is_identity:
            # Rows whose A' (or A'') is A itself (Poisson: exp) reuse its values: one exp per
            # evaluation instead of three.
            mu = Av if fam.dA is fam.A else fam.dA(eta)
            w = mu if fam.d2A is fam.dA else fam.d2A(eta)
            Tr = self.Ty if l == 0 else fam.T(r)
            return mu - Tr, w
        rho = lik.nonlinearity.rho(eta)
        return -lik.drive(self.y, eta), fam.d2A(lik.natural(eta)) * rho * rho

    def prior(self, l: int, theta: torch.Tensor) -> torch.Tensor:
        """Per-row prior terms of layer ``l`` (``(d_{l-1},)``, zero for a flat prior)."""
        s = self.layers[l].param_scale
        if s is None:
            return theta.new_zeros(theta.shape[0])
        return 0.5 * (theta * theta).sum(1) / s**2

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, thetas: list[torch.Tensor], zeta: torch.Tensor, cached=None, *, full: bool = True) -> _Point:
        """The loss at (thetas, zeta) and (if ``full``) the derivatives a sweep from there needs.

        ``cached``: ``(etas, [(terms, A(v))])`` already computed at this point. A point
        evaluated with ``full=False`` is completed by :meth:`complete`.
        """
        p = _Point(thetas, zeta)
        zs = self.split(zeta)
        rs = self.responses(zs)
        if cached is None:
            etas = [self.eta(th, z) for th, z in zip(thetas, zs, strict=True)]
            pairs = [self.layer_terms(l, etas[l], rs[l]) for l in range(self.L)]
            self.num_evals += 1
        else:
            etas, pairs = cached
        p.etas, p.terms, p.Avs = etas, [t for t, _ in pairs], [a for _, a in pairs]
        local = sum(t.sum() for t in p.terms) + 0.5 * self.s.top_precision * (zs[-1] * zs[-1]).sum()
        prior = sum(self.prior(l, th).sum() for l, th in enumerate(thetas))
        p.loss = float(self.sum(local.detach(), "the log joint")) + float(prior) + self.const
        if not math.isfinite(p.loss) or not full:
            return p
        return self.complete(p)

    def complete(self, p: _Point) -> _Point:
        """Add the derivatives, the latent Newton step and the globals' gradient to ``p``."""
        zs = self.split(p.zeta)
        rs = self.responses(zs)
        thetas, etas = p.thetas, p.etas
        p.e, p.w = [], []
        for l in range(self.L):
            e, w = self.derivatives(l, etas[l], rs[l], p.Avs[l])
            p.e.append(e)
            p.w.append(w)
        self._latent_newton(p, zs, rs)
        # The globals' gradient at this point (for the stopping rule; cheap: one GEMM a layer).
        p.gW = []
        for l, (th, z) in enumerate(zip(thetas, zs, strict=True)):
            P = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
            g = self.sum(p.e[l].T @ P, "the globals' gradient")
            if self.layers[l].param_scale is not None:
                g = g + th / self.layers[l].param_scale ** 2
            p.gW.append(g)
        return p

    def _latent_newton(self, p: _Point, zs, rs) -> None:
        """The latent gradient ``gz``, Hessian factor ``Lz`` and Newton step ``dz`` at ``p``."""
        lam = self.s.top_precision
        if not self.quadratic_latents:
            W = p.thetas[0][:, :-1]
            p.gz = lam * zs[0] + p.e[0] @ W
            l = W.shape[1]
            outer = _outer_rows(W)
            H = (p.w[0] @ outer).reshape(-1, l, l) + lam * torch.eye(l, dtype=W.dtype, device=W.device)
            p.Lz = _chol(H)
            p.dz = _solve(p.Lz, p.gz)
            return
        # Several Gaussian identity layers: f is quadratic in zeta; block l of the gradient is
        # e_l W_l (z^(l) as predictor) + lam_l z^(l) - sqrt(lam_l) eta_{l+1} (as response of
        # layer l+1) or lam z^(L) on top; the Hessian is block tridiagonal and the same for
        # every row: diagonal W_l^T W_l + lam_l I, off-diagonal -sqrt(lam_l) W_{l+1}.
        D = sum(self.widths)
        offs = [0]
        for w in self.widths:
            offs.append(offs[-1] + w)
        H = zs[0].new_zeros(D, D)
        blocks = []
        for l in range(self.L):
            W = p.thetas[l][:, :-1]
            g = p.e[l] @ W
            sl = slice(offs[l], offs[l + 1])
            H[sl, sl] += W.T @ W
            if l + 1 < self.L:
                prec = self.layers[l + 1].likelihood.family.params[0][1]
                root = math.sqrt(prec)
                g = g + prec * zs[l] - root * p.etas[l + 1]
                H[sl, sl] += prec * torch.eye(self.widths[l], dtype=H.dtype, device=H.device)
                up = slice(offs[l + 1], offs[l + 2])
                Wn = p.thetas[l + 1][:, :-1]
                H[sl, up] = -root * Wn
                H[up, sl] = -root * Wn.T
            else:
                g = g + lam * zs[l]
                H[sl, sl] += lam * torch.eye(self.widths[l], dtype=H.dtype, device=H.device)
            blocks.append(g)
        p.gz = torch.cat(blocks, 1)
        p.Lz = _chol(H)
        p.dz = torch.cholesky_solve(p.gz.T, p.Lz).T

    def decrement(self, p: _Point) -> float:
        r"""$\tfrac12\sum_b g_b^\top H_b^{-1}g_b$ over latent rows and global rows at ``p``.

        The latent part is exact; the globals' part uses the Hessian factors of the last
        global half-step (one sweep old, computed at the same globals and the previous
        latents) where those exist, else fresh ones.
        """
        z_part = 0.5 * (p.gz * p.dz).sum()
        total = float(self.sum(z_part.detach(), "the latents' Newton decrement"))
        LW = self.last_LW
        if LW is None:
            LW = [self.global_hessian(l, p)[0] for l in range(self.L)]
        for l in range(self.L):
            total += 0.5 * float((p.gW[l] * _solve(LW[l], p.gW[l])).sum())
        return total

    # ------------------------------------------------------------------ half-steps
    def global_hessian(self, l: int, p: _Point, *, gradient: bool = False):
        r"""Cholesky factors ``(d_{l-1}, k, k)`` of the rows' Fisher information and the predictors.

        With ``gradient``, also the data part of the rows' gradient $\sum_s e_{si}\tilde z_s$
        ``(d_{l-1}, k)``: both sufficient statistics of the Newton step go in one sum over ranks.
        """
        z = self.split(p.zeta)[l]
        P = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
        k = P.shape[1]
        Hd = p.w[l].T @ _outer_rows(P)
        if gradient:
            both = self.sum(torch.cat([Hd, p.e[l].T @ P], 1), "the globals' Newton step")
            Hd, g = both[:, : k * k], both[:, k * k :]
        else:
            Hd = self.sum(Hd, "the globals' Hessian")
        H = Hd.reshape(-1, k, k)
        s = self.layers[l].param_scale
        if s is not None:
            H = H + torch.eye(k, dtype=H.dtype, device=H.device) / s**2
        if gradient:
            return _chol(H), P, g
        return _chol(H), P

    def latent_step(self, p: _Point) -> tuple[torch.Tensor, tuple]:
        """New latents from ``p`` (per-row step halving for one layer), with their etas and terms."""
        self.num_latent_steps += 1
        thetas = p.thetas
        if self.quadratic_latents:
            # f is quadratic in zeta: the Newton step is the exact conditional minimiser.
            zeta = p.zeta - p.dz
            zs = self.split(zeta)
            rs = self.responses(zs)
            etas = [self.eta(th, z) for th, z in zip(thetas, zs, strict=True)]
            pairs = [self.layer_terms(l, etas[l], rs[l]) for l in range(self.L)]
            self.num_evals += 1
            return zeta, (etas, pairs)
        lam = self.s.top_precision
        z0 = p.zeta
        sq = 0.5 * lam * (z0 * z0).sum(1)
        old = p.terms[0].sum(1) + sq
        noise = _ROW_NOISE_ULPS * self.eps * (p.terms[0].abs().sum(1) + sq)
        step = z0.new_ones(z0.shape[0], 1)
        for attempt in range(self.settings.max_backtracks + 1):
            z = z0 - step * p.dz
            eta = self.eta(thetas[0], z)
            pair = self.layer_terms(0, eta, self.y)
            self.num_evals += 1
            new = pair[0].sum(1) + 0.5 * lam * (z * z).sum(1)
            bad = ~(new <= old + noise)
            # one decision for all ranks (data-parallel): each makes as many trial evaluations
            # as one process would, and rows without a bad step keep theirs
            any_bad = self.any_rank(bad, "the latents' step halving")
            if not any_bad:
                break
            factor = 0.0 if attempt == self.settings.max_backtracks else 0.5
            step = torch.where(bad[:, None], factor * step, step)
        if any_bad:
            # rows that found no decrease keep their value (also where the step is not finite)
            z = torch.where(step > 0, z0 - step * p.dz, z0)
            eta = self.eta(thetas[0], z)
            pair = self.layer_terms(0, eta, self.y)
            self.num_evals += 1
        return z, ([eta], [pair])

    def global_step(self, thetas, zeta, cached) -> tuple[list[torch.Tensor], tuple]:
        """One batched Newton/Fisher step on every row of every layer's ``[W b]``, safeguarded."""
        etas, pairs = cached
        zs = self.split(zeta)
        rs = self.responses(zs)
        q = _Point(thetas, zeta)
        q.w, q.e = [], []
        for l in range(self.L):
            e, w = self.derivatives(l, etas[l], rs[l], pairs[l][1])
            q.e.append(e)
            q.w.append(w)
        new_thetas, new_etas, new_pairs, LW = [], [], [], []
        for l in range(self.L):
            th = thetas[l]
            Lh, P, g = self.global_hessian(l, q, gradient=True)
            LW.append(Lh)
            if self.layers[l].param_scale is not None:
                g = g + th / self.layers[l].param_scale ** 2
            delta = _solve(Lh, g)
            terms = pairs[l][0]
            prior_old = self.prior(l, th)
            sums = self.sum(torch.stack([terms.sum(0), terms.abs().sum(0)]), "the globals' objective")
            old = sums[0] + prior_old
            noise = _ROW_NOISE_ULPS * self.eps * (sums[1] + prior_old)
            step = th.new_ones(th.shape[0], 1)
            for attempt in range(self.settings.max_backtracks + 1):
                cand = th - step * delta
                eta = self.eta(cand, zs[l])
                pair = self.layer_terms(l, eta, rs[l])
                self.num_evals += 1
                new = self.sum(pair[0].sum(0), "the globals' step halving") + self.prior(l, cand)
                bad = ~(new <= old + noise)
                if not bool(bad.any()):
                    break
                factor = 0.0 if attempt == self.settings.max_backtracks else 0.5
                step = torch.where(bad[:, None], factor * step, step)
            if bool(bad.any()):
                # rows that found no decrease keep their value (also where the step is not finite)
                cand = torch.where(step > 0, th - step * delta, th)
                eta = self.eta(cand, zs[l])
                pair = self.layer_terms(l, eta, rs[l])
                self.num_evals += 1
            new_thetas.append(cand)
            new_etas.append(eta)
            new_pairs.append(pair)
        self.last_LW = LW
        return new_thetas, (new_etas, new_pairs)

    def balance(self, thetas: list[torch.Tensor], zeta: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        r"""Move along the likelihood's symmetries of the top layer to the lowest prior penalty.

        The top latent $z^{(L)}$ enters the likelihood only through
        $\eta^{(L)} = W^{(L)}z^{(L)}+b^{(L)}$, which is unchanged by $z\mapsto Q(z-m)$,
        $W\mapsto WQ^{-1}$, $b\mapsto b+Wm$ for any invertible $Q$ and any $m$: these are the
        flat directions of the likelihood (the "ridge" between $W$ and $Z$), along which only
        the priors $\tfrac\lambda2\lVert Z\rVert^2+\tfrac1{2s^2}(\lVert W\rVert^2+\lVert b\rVert^2)$ vary.
        Both are minimised in closed form, one after the other, so $f$ decreases and the
        slow mode of the alternation along the ridge is removed:

        * the shift: $(\lambda N I + W^\top W/s^2)\,m = \lambda\sum_s z_s - W^\top b/s^2$;
        * the linear map: with $C = \sum_s z_sz_s^\top$ and $A = W^\top W$, the minimiser of
          $\lambda\,\mathrm{tr}(QCQ^\top)+\mathrm{tr}(Q^{-\top}AQ^{-1})/s^2$ has
          $Q^\top Q = X = C^{-1/2}\big(C^{1/2}AC^{1/2}/(\lambda s^2)\big)^{1/2}C^{-1/2}$
          (stationarity: $\lambda XCX = A/s^2$); take $Q = X^{1/2}$.

        With a flat prior on the globals ($s$ = ``None``) there is no MAP along the scale (it
        runs off to $W\to\infty$, $Z\to0$), and only the shift ($m = \bar z$) is applied.
        """
        top = self.L - 1
        s = self.layers[top].param_scale
        lam = self.s.top_precision
        zs = self.split(zeta)
        z = zs[top]
        th = thetas[top]
        W, b = th[:, :-1], th[:, -1]
        k = z.shape[1]
        eye = torch.eye(k, dtype=z.dtype, device=z.device)
        zsum = self.sum(z.sum(0), "the balancing shift")
        if s is None:
            m = zsum / self.num_data
        else:
            m = torch.linalg.solve(lam * self.num_data * eye + W.T @ W / s**2, lam * zsum - W.T @ b / s**2)
        z = z - m
        b = b + W @ m
        if s is not None:
            C = self.sum(z.T @ z, "the balancing scale")
            ev, U = torch.linalg.eigh(C)
            if bool((ev > 0).all()):
                Ch = (U * ev.sqrt()) @ U.T
                Cih = (U / ev.sqrt()) @ U.T
                M = Ch @ (W.T @ W) @ Ch / (lam * s**2)
                em, V = torch.linalg.eigh(0.5 * (M + M.T))
                X = Cih @ ((V * em.clamp_min(0.0).sqrt()) @ V.T) @ Cih
                ex, Ux = torch.linalg.eigh(0.5 * (X + X.T))
                if bool((ex > 0).all()):
                    Q = (Ux * ex.sqrt()) @ Ux.T
                    Qi = (Ux / ex.sqrt()) @ Ux.T
                    z = z @ Q.T
                    W = W @ Qi
        zs[top] = z
        thetas = [*thetas[:top], torch.cat([W, b[:, None]], 1)]
        return thetas, torch.cat(zs, 1)

    def sweep(self, p: _Point) -> _Point:
        """$G$: a latent half-step, a global half-step and the balancing step, from ``p``."""
        zeta, cached = self.latent_step(p)
        thetas, cached = self.global_step(p.thetas, zeta, cached)
        thetas, zeta = self.balance(thetas, zeta)
        # The balancing leaves every eta unchanged (up to rounding): reuse them and their terms.
        return self.evaluate(thetas, zeta, cached)

    def spectral_start(self) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        r"""A start from the data: the top-$l$ principal subspace of linearised natural parameters.

        For one layer with $R$ = identity: $\hat\eta = (A')^{-1}\big((T(y)+\bar m_i)/2\big)$
        with $\bar m_i$ the column mean of $T(y)$ smoothed towards the overall mean (so that
        a column of zeros or of maxima stays inside the link's domain; the same half-way
        shrinkage as :meth:`~deqppl.encoders.PEDEncoder.initial_guess`), $B = $ the column
        means of $\hat\eta$, $W$ and $Z$ from the top-$l$ eigenvectors of the centred Gram
        matrix $\sum_s(\hat\eta_s-B)(\hat\eta_s-B)^\top$ (one all-reduced $d\times d$ sum), then
        moved to their lowest prior penalty by :meth:`balance`. ``None`` where it does not
        apply (several layers, $R \ne$ identity) or is not finite.
        """
        if self.L > 1 or not self.layers[0].likelihood.nonlinearity.is_identity:
            return None
        fam = self.layers[0].likelihood.family
        l = self.widths[0]
        n = self.num_data
        col = self.sum(self.Ty.sum(0), "the spectral start's column means")
        overall = col.sum() / (n * col.numel())
        m = (col + overall) / (n + 1)
        eta = fam.link(0.5 * (self.Ty + m))
        B = self.sum(eta.sum(0), "the spectral start's centre") / n
        C = eta - B
        gram = self.sum(C.T @ C, "the spectral start's Gram matrix")
        if not (bool(torch.isfinite(gram).all()) and bool(torch.isfinite(B).all())):
            return None
        _, V = torch.linalg.eigh(gram)
        V = V[:, -l:].flip(1)
        Z = C @ V
        thetas, zeta = self.balance([torch.cat([V, B[:, None]], 1)], Z)
        # the globals are the same on every rank; the latents are checked on all ranks' rows
        bad = self.any_rank(~torch.isfinite(zeta), "the spectral start's latents")
        if not bool(torch.isfinite(thetas[0]).all()) or bad:
            return None
        return thetas, zeta

    # ------------------------------------------------------------------ flat views for Anderson
    def flatten(self, p: _Point) -> tuple[torch.Tensor, torch.Tensor]:
        """(globals, latents) as two flat vectors: the globals are the same on every rank."""
        return torch.cat([th.reshape(-1) for th in p.thetas]), p.zeta.reshape(-1)

    def unflatten(self, g: torch.Tensor, z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        thetas, i = [], 0
        for l, layer in enumerate(self.layers):
            rows = self.y.shape[1] if l == 0 else self.widths[l - 1]
            k = rows * (layer.latent_width + 1)
            thetas.append(g[i : i + k].reshape(rows, layer.latent_width + 1))
            i += k
        return thetas, z.reshape(-1, sum(self.widths))


class _AlternatingStepper(AbstractStepper):
    """One Anderson-accelerated sweep per ``step`` (DAAREM's safeguard)."""

    def __init__(self, problem: _Problem, thetas: list[torch.Tensor], zeta: torch.Tensor) -> None:
        self.pb = problem
        self.settings = problem.settings
        self.x0 = (thetas, zeta)
        self.point: _Point | None = None
        # Anderson history: differences of residuals and of map values, globals and latents apart.
        self.dR: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dG: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.no_decrease = 0
        self.num_accepted = 0
        self.num_rejected = 0

    def _observe(self, p: _Point, evals: int, stalled: str | None = None) -> Observation:
        if not math.isfinite(p.loss):
            return Observation(loss=p.loss, num_evals=evals, stalled=stalled)
        gmax = max(float(g.abs().max()) for g in p.gW)
        return Observation(
            loss=p.loss, grad_max=gmax, decrement=self.pb.decrement(p), num_evals=evals, stalled=stalled
        )

    def start(self) -> Observation:
        before = self.pb.num_evals
        self.point = self.pb.evaluate(*self.x0)
        return self._observe(self.point, self.pb.num_evals - before)

    def _anderson(self, gx: tuple[torch.Tensor, torch.Tensor], r: tuple[torch.Tensor, torch.Tensor]):
        """Type-II Anderson point $G(x_k)-\\Delta G\\,\\gamma$ with a Tikhonov-regularised $\\gamma$."""
        m = len(self.dR)
        # The inner products of (globals, latents): the globals' parts are the same on every
        # rank, the latents' parts are summed over ranks, all of them in one sum.
        pairs = [(i, None) for i in range(m)] + [(i, j) for i in range(m) for j in range(i, m)]
        other = [r if j is None else self.dR[j] for _, j in pairs]
        glob = [(self.dR[i][0] * b[0]).sum() for (i, _), b in zip(pairs, other, strict=True)]
        lat = self.pb.sum(torch.stack([(self.dR[i][1] * b[1]).sum() for (i, _), b in zip(pairs, other, strict=True)]),
                          "the Anderson inner products")
        gram = torch.empty(m, m, dtype=gx[0].dtype)
        rhs = torch.empty(m, dtype=gx[0].dtype)
        for k, (i, j) in enumerate(pairs):
            if j is None:
                rhs[i] = glob[k] + lat[k]
            else:
                gram[i, j] = gram[j, i] = glob[k] + lat[k]
        reg = self.settings.regularization * float(gram.diagonal().max()) + 1e-300
        gamma = torch.linalg.solve(gram + reg * torch.eye(m, dtype=gram.dtype), rhs)
        if not bool(torch.isfinite(gamma).all()):
            return None
        a = gx[0].clone()
        b = gx[1].clone()
        for i in range(m):
            a.sub_(self.dG[i][0], alpha=float(gamma[i]))
            b.sub_(self.dG[i][1], alpha=float(gamma[i]))
        return a, b

    def step(self, budget: int) -> Observation:
        pb, p = self.pb, self.point
        before = pb.num_evals
        x = pb.flatten(p)
        q = pb.sweep(p)
        if not math.isfinite(q.loss):
            # A sweep is monotone on finite rows; a non-finite loss is an overflow in the data
            # scale: report it (the driver's NONFINITE rule) and keep the last finite point.
            return Observation(loss=q.loss, num_evals=pb.num_evals - before)
        gx = pb.flatten(q)
        r = (gx[0] - x[0], gx[1] - x[1])
        new = q
        if self.settings.memory > 0:
            if self.last is not None:
                (_, gprev), rprev = self.last
                self.dR.append((r[0] - rprev[0], r[1] - rprev[1]))
                self.dG.append((gx[0] - gprev[0], gx[1] - gprev[1]))
                if len(self.dR) > self.settings.memory:
                    self.dR.pop(0)
                    self.dG.pop(0)
            self.last = ((x, gx), r)
            if self.dR:
                xa = self._anderson(gx, r)
                cand = None if xa is None else pb.evaluate(*pb.unflatten(*xa), full=False)
                # DAAREM's safeguard: keep the extrapolation only if it does at least as well as
                # the plain sweep (so f never increases); otherwise restart the history.
                if cand is not None and math.isfinite(cand.loss) and cand.loss <= q.loss:
                    new = pb.complete(cand)
                    self.num_accepted += 1
                else:
                    self.dR.clear()
                    self.dG.clear()
                    self.num_rejected += 1
        self.no_decrease = self.no_decrease + 1 if not new.loss < p.loss else 0
        self.point = new
        stalled = None
        if self.no_decrease >= _STALL_SWEEPS:
            stalled = f"no decrease of the log joint in {_STALL_SWEEPS} sweeps"
        return self._observe(new, pb.num_evals - before, stalled)


@dataclass(frozen=True)
class _Outcome:
    out: object
    point: _Point
    problem: _Problem
    stepper: _AlternatingStepper


def run_alternating(
    structure: JointStructure,
    y: torch.Tensor,
    thetas: list[torch.Tensor],
    zeta: torch.Tensor,
    settings: AlternatingNewton,
    *,
    progress: bool,
    callback: Callable[[int, float], None] | None = None,
    problem: _Problem | None = None,
    layout: ShardLayout | None = None,
) -> _Outcome:
    """Run the structured fit from ``(thetas, zeta)`` on validated ``y``; see :func:`fit_alternating`."""
    with torch.no_grad():
        pb = _Problem(structure, y, settings, layout) if problem is None else problem
        stepper = _AlternatingStepper(pb, [t.detach().clone() for t in thetas], zeta.detach().clone())
        rules = StopRules(dtol=settings.resolved_dtol(y.dtype))
        out = drive(
            stepper, rules, max_steps=int(settings.max_steps), progress=progress,
            desc="fit_encoder (alternating Newton)", callback=callback, unit="sweeps",
        )
    return _Outcome(out=out, point=stepper.point, problem=pb, stepper=stepper)


def fit_alternating(
    encoder: nn.Module,
    data: Mapping[str, torch.Tensor],
    optimizer: AlternatingNewton,
    *,
    progress: bool,
    callback: Callable[[int, float], None] | None,
    throw: bool,
    start: float,
    layout: ShardLayout | None = None,
):
    r"""Joint MAP of an encoder's globals and its latents by :class:`~deqppl.optim.AlternatingNewton`.

    Called by :func:`~deqppl.encoders.fit_encoder` with validated ``data``; the encoder says
    how its model decomposes (:meth:`~deqppl.encoders.AbstractMAPEncoder.joint_structure`).
    The latents start from the encoder's :meth:`initial_guess` at its current globals and
    are refined by the sweeps; the fitted globals are written into the encoder.

    Data-parallel (``layout`` of several ranks, checked to agree by ``fit_encoder``): ``data``
    are this rank's rows, ``latents`` their latents; every sum over rows is over all ranks'
    rows, so every rank takes the same steps and returns the same globals and loss trace.

    Returns
    -------
    EncoderFitResult
        ``loss_trace`` is the negative log joint $-\log p(y, z, \theta)$ at the start and
        after each outer iteration; ``num_steps`` counts outer iterations (sweeps),
        ``num_grad_evals`` batched evaluations of all $N\times d$ natural parameters
        (trial points of the step halving included), ``num_solves`` latent half-steps;
        ``grad_norm`` is the norm of the gradient in the globals at the returned point
        (with latents at their half-step: the profiled gradient up to the latents' residual);
        ``latents`` the fitted latents ``(N, sum d_l)``.

    Examples
    --------
    >>> import torch
    >>> from deqppl.encoders import PEDEncoder, fit_encoder
    >>> from deqppl.expfam import family
    >>> from deqppl.models import ExpFamPCA
    >>> from deqppl.optim import AlternatingNewton
    >>> model = ExpFamPCA(family=family("poisson"), obs_dim=6, latent_dim=2)
    >>> y = model.simulate(50, seed=0).data["y"].double()
    >>> fit = fit_encoder(PEDEncoder(model).double(), y, optimizer=AlternatingNewton(), progress=False)
    >>> fit.status.name, bool((fit.loss_trace[1:] <= fit.loss_trace[:-1]).all())
    ('CONVERGED', True)
    """
    from deqppl.encoders.fit import EncoderFitResult

    structure = encoder.joint_structure()
    params = encoder.site_parameters()
    y = data[encoder.model.data_names[0]]
    thetas = [
        torch.cat([params[layer.weight_site].detach(), params[layer.bias_site].detach()[:, None]], 1)
        for layer in structure.layers
    ]
    with torch.no_grad():
        problem = _Problem(structure, y, optimizer, layout)
        zeta = encoder.initial_guess(data)
        if optimizer.spectral_start:
            start_point = problem.spectral_start()
            if start_point is not None:
                thetas, zeta = start_point
    run = run_alternating(structure, y, thetas, zeta, optimizer, progress=progress, callback=callback,
                          problem=problem)
    p = run.point
    values = {}
    for layer, th in zip(structure.layers, p.thetas, strict=True):
        values[layer.weight_site] = th[:, :-1]
        values[layer.bias_site] = th[:, -1]
    if math.isfinite(p.loss):
        encoder.load_values(values)
    grad = math.sqrt(sum(float((g * g).sum()) for g in p.gW)) if math.isfinite(p.loss) else math.nan
    result = EncoderFitResult(
        encoder=encoder,
        loss_trace=torch.tensor(run.out.trace, dtype=torch.float64),
        num_steps=run.out.num_steps,
        num_grad_evals=run.out.num_evals,
        wall_time=time.perf_counter() - start,
        status=run.out.status,
        criterion=run.out.criterion,
        grad_norm=grad,
        optimizer=optimizer,
        num_solves=run.problem.num_latent_steps,
        latents=p.zeta if math.isfinite(p.loss) else None,
    )
    if throw and not result.converged:
        raise FitConvergenceError(result, "fit_encoder")
    return result
