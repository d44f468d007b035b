r"""The accuracy reference: a certified bound on each method's distance to the MAP.

For the local latents $x$ with the globals held fixed, let
$F(x) = -\log p(\text{data}, x\mid\text{globals})$ be the negative log posterior (up to a
constant). Where $F$ is $\mu$-strongly convex, every point $x$ satisfies

$$\lVert x - x^*\rVert_2 \le \lVert\nabla F(x)\rVert_2 / \mu$$

(strong monotonicity of $\nabla F$: $\mu\lVert x-x^*\rVert^2\le(\nabla F(x)-\nabla F(x^*))^\top(x-x^*)
\le\lVert\nabla F(x)\rVert\lVert x-x^*\rVert$). :func:`certified_bound` evaluates it with
$\mu = \lambda_{\min}(\nabla^2F(x))$ at the method's own point, from the model's Pyro trace by
autograd (independent of every method). That is exact to first order in the distance (the
Hessian moves by $O(\lVert x-x^*\rVert)$ between $x$ and $x^*$); it is a rigorous bound whenever
$\lambda_{\min}$ along the segment is no smaller, e.g. for every model whose Hessian is bounded
below by the prior precision alone (exponential-family PCA with the identity nonlinearity,
Gaussian hierarchies, kernel GLMs: $\nabla^2F\succeq\lambda I$), where the bound with
$\mu = \lambda$ is never smaller. A non-positive $\lambda_{\min}$ gives an infinite bound: no
certificate where the posterior is not strongly convex.

* **Plate models**: given the globals the Hessian is block diagonal over rows, so all blocks
  come from $k$ Hessian-vector products ($k$ = local coordinates per row), the $j$-th with the
  unit vector $e_j$ tiled over every row, which returns column $j$ of every block at once. The
  bound is per row: ``(n,)``.
* **Coupled models** (locals outside the data plate): the full Hessian from one
  Hessian-vector product per coordinate (small $n$); one bound, shape ``(1,)``.

Examples
--------
>>> import torch
>>> from deqppl.expfam import family
>>> from deqppl.harness.sites import site_layout
>>> from deqppl.models import ExpFamPCA
>>> model = ExpFamPCA(family=family("gaussian"), obs_dim=4, latent_dim=2)
>>> sim = model.simulate(5, seed=0, dtype=torch.float64)
>>> data, W, B = sim.data, sim.truth["W"], sim.truth["B"]
>>> z_map = torch.linalg.solve(torch.eye(2, dtype=W.dtype) + W.T @ W, W.T @ (data["y"] - B).T).T
>>> z = z_map + 1e-3
>>> cb = certified_bound(model, data, {"W": W, "B": B}, {"z": z}, site_layout(model, data))
>>> bool(((z - z_map).norm(dim=1) <= cb.bound).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from deqppl.harness.sites import SiteLayout, flatten_locals, unflatten_locals
from deqppl.inference import log_joint

__all__ = ["CertifiedBound", "certified_bound"]


@dataclass(frozen=True, kw_only=True, eq=False)
class CertifiedBound:
    r"""Result of :func:`certified_bound`.

    Attributes
    ----------
    bound
        $\lVert\nabla F\rVert_2/\lambda_{\min}(\nabla^2F)$ per row ``(n,)`` (plate models) or
        ``(1,)`` (coupled models); ``inf`` where $\lambda_{\min}\le0$ or a value is not finite.
    grad_norm
        $\lVert\nabla F\rVert_2$, same shape.
    min_eig
        $\lambda_{\min}(\nabla^2F)$, same shape.
    """

    bound: torch.Tensor
    grad_norm: torch.Tensor
    min_eig: torch.Tensor

    @property
    def worst(self) -> float:
        """The largest bound (over rows)."""
        return float(self.bound.max()) if self.bound.numel() else 0.0


def certified_bound(
    model,
    data: Mapping[str, torch.Tensor],
    globals: Mapping[str, torch.Tensor],
    locals: Mapping[str, torch.Tensor],
    layout: SiteLayout,
) -> CertifiedBound:
    r"""Bound the distance of ``locals`` to the conditional MAP given ``globals`` (module notes).

    Parameters
    ----------
    model
        A model of the protocol.
    data
        Validated data the locals belong to.
    globals
        Every global site's value (held fixed).
    locals
        Every local site's value: the point to certify.
    layout
        :func:`~deqppl.harness.sites.site_layout` of ``model`` (plate or coupled).

    Returns
    -------
    CertifiedBound
    """
    fixed = {k: v.detach() for k, v in globals.items()}
    x = flatten_locals(layout, {k: v.detach() for k, v in locals.items()}).clone().requires_grad_(True)
    with torch.enable_grad():
        loss = -log_joint(model, data, {**fixed, **unflatten_locals(layout, x)})
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        width = layout.local_width
        columns = []
        for j in range(width):
            e = torch.zeros_like(x)
            if layout.coupled:
                e[j] = 1.0
            else:
                e[:, j] = 1.0  # e_j tiled over rows: column j of every diagonal block at once
            (hv,) = torch.autograd.grad(grad, x, grad_outputs=e, retain_graph=j + 1 < width)
            columns.append(hv.detach())
    grad = grad.detach()
    if layout.coupled:
        hessian = torch.stack(columns, dim=1)[None]  # (1, K, K)
        grad = grad[None]
    else:
        hessian = torch.stack(columns, dim=2)  # (n, k, k): [s, i, j] = H_s[i, j]
    hessian = 0.5 * (hessian + hessian.transpose(-1, -2))
    finite = torch.isfinite(hessian).flatten(1).all(1) & torch.isfinite(grad).all(1)
    safe = torch.where(finite[:, None, None], hessian, torch.zeros_like(hessian))
    min_eig = torch.linalg.eigvalsh(safe)[:, 0]
    min_eig = torch.where(finite, min_eig, torch.full_like(min_eig, float("nan")))
    grad_norm = grad.norm(dim=1)
    bound = torch.where(
        finite & (min_eig > 0), grad_norm / min_eig.clamp_min(torch.finfo(min_eig.dtype).tiny),
        torch.full_like(grad_norm, float("inf")),
    )
    return CertifiedBound(bound=bound, grad_norm=grad_norm, min_eig=min_eig)
