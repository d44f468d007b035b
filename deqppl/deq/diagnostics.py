"""Convergence diagnostics for a fixed-point map: spectral radius and Jacobian regularization."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .protocol import check_int as _check_int

__all__ = ["spectral_radius", "jacobian_regularization"]


def _flat(f, z):
    shape = z.shape
    batch = shape[0]

    def fn(zf):
        out = f(zf.reshape(shape))
        if out.shape != shape:
            raise ValueError(f"f must map shape {tuple(shape)} to itself, got {tuple(out.shape)}")
        return out.reshape(batch, -1)

    return fn, z.reshape(batch, -1)


def spectral_radius(
    f: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    num_iters: int = 50,
    seed: int = 0,
) -> torch.Tensor:
    """Per-sample estimate of the spectral radius $\\rho(J)$, $J = \\partial f/\\partial z$ at ``z``.

    Power iteration on vector-Jacobian products $v \\leftarrow J^\\top v / \\lVert J^\\top v\\rVert$
    ($J^\\top$ has the spectrum of $J$). The estimate is the geometric mean of the growth factors
    $\\lVert J^\\top v_k\\rVert$ over the second half of the iterations, which also converges when
    the dominant eigenvalues are a complex pair. $\\rho(J) < 1$ means plain iteration converges
    locally, and so does the implicit adjoint solved by plain iteration.

    Parameters
    ----------
    f
        Map ``(B, *event) -> (B, *event)`` with independent samples.
    z
        Point ``(B, *event)`` at which to linearize, typically a fixed point.
    num_iters
        Power iterations, $\\ge 2$; convergence is linear in the ratio of the two largest
        eigenvalue moduli.
    seed
        Seed of the random starting vectors (a `torch.Generator` on ``z``'s device).

    Returns
    -------
    torch.Tensor
        ``(B,)`` estimates, detached, dtype of ``z``.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import spectral_radius
    >>> A = torch.tensor([[0.5, 0.0], [0.0, -0.9]], dtype=torch.float64)
    >>> spectral_radius(lambda z: z @ A.T, torch.zeros(3, 2, dtype=torch.float64)).tolist()
    [0.9, 0.9, 0.9]
    """
    _check_int("num_iters", num_iters, minimum=2)
    fn, zf = _flat(f, z)
    generator = torch.Generator(device=z.device).manual_seed(seed)
    with torch.enable_grad():
        z_leaf = zf.detach().requires_grad_(True)
        fz = fn(z_leaf)
    if not fz.requires_grad:
        return zf.new_zeros(zf.shape[0])
    v = torch.randn(zf.shape, generator=generator, dtype=zf.dtype, device=zf.device)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    log_growth = []
    for _ in range(num_iters):
        (w,) = torch.autograd.grad(fz, z_leaf, v, retain_graph=True, allow_unused=True)
        if w is None:
            return zf.new_zeros(zf.shape[0])
        norm = torch.linalg.vector_norm(w, dim=1)
        log_growth.append(torch.log(norm))
        v = w / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
    tail = torch.stack(log_growth[num_iters // 2:])
    return torch.exp(tail.mean(0)).detach()


def jacobian_regularization(
    f: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Differentiable Hutchinson estimate of $\\lVert J\\rVert_F^2$ per sample, for training.

    $\\lVert J\\rVert_F^2 = \\mathbb E_v\\lVert J^\\top v\\rVert^2$ for $v \\sim \\mathcal N(0, I)$;
    averaged over ``num_samples`` probes. Penalizing it keeps DEQs well-conditioned (Bai, Koltun
    & Kolter, 2021, ICML). Built with ``create_graph=True`` so it can be added to a loss.

    Parameters
    ----------
    f
        Map ``(B, *event) -> (B, *event)`` with independent samples.
    z
        Point ``(B, *event)``, typically ``Solution.value``. If it does not require grad it is
        detached and made a leaf; if it does, the estimate also depends on whatever ``z``
        depends on.
    num_samples
        Number of Gaussian probes, $\\ge 1$.
    generator
        Source of the probes; ``None`` uses torch's global generator, like `torch.randn`.

    Returns
    -------
    torch.Tensor
        ``(B,)`` unbiased estimates of $\\lVert J_b\\rVert_F^2$.

    Examples
    --------
    >>> import torch
    >>> from deqppl.deq import jacobian_regularization
    >>> W = (0.5 * torch.eye(4, dtype=torch.float64)).requires_grad_()
    >>> g = torch.Generator().manual_seed(0)
    >>> est = jacobian_regularization(lambda z: z @ W.T, torch.zeros(2, 4, dtype=torch.float64),
    ...                               num_samples=2000, generator=g)
    >>> bool(abs(est.mean() - 1.0) < 0.1)  # ||W||_F^2 = 4 * 0.25; std error about 0.016
    True
    >>> est.mean().backward(); W.grad.shape
    torch.Size([4, 4])
    """
    _check_int("num_samples", num_samples, minimum=1)
    fn, zf = _flat(f, z)
    if not zf.requires_grad:
        zf = zf.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = fn(zf)
        total = zf.new_zeros(zf.shape[0])
        for _ in range(num_samples):
            v = torch.randn(zf.shape, generator=generator, dtype=zf.dtype, device=zf.device)
            (w,) = torch.autograd.grad(fz, zf, v, retain_graph=True, create_graph=True,
                                       allow_unused=True)
            if w is None:
                return total
            total = total + (w * w).sum(1)
    return total / num_samples

