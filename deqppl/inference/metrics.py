"""Comparisons of fitted and true quantities that are invariant to the latent rotation."""

from __future__ import annotations

import torch

__all__ = ["principal_angles"]


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    r"""Principal angles between the column spaces of ``A`` $(d, k)$ and ``B`` $(d, m)$.

    With orthonormal bases $Q_A, Q_B$ (QR), the cosines of the angles are the singular values of
    $Q_A^\top Q_B$ (Björck & Golub, 1973, Math. Comp.). Small angles are computed from the
    sines (singular values of $Q_B - Q_A Q_A^\top Q_B$), which stay accurate near 0 where
    $\arccos$ loses half the digits (as ``scipy.linalg.subspace_angles``).

    Returns
    -------
    Tensor
        ``(min(k, m),)`` angles in radians, in decreasing order (as scipy).

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> B = torch.tensor([[1.0], [0.0], [1.0]])
    >>> principal_angles(A, B)
    tensor([0.7854])
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(
            f"A and B must be matrices with the same number of rows, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    dtype = torch.promote_types(A.dtype, B.dtype)
    QA = torch.linalg.qr(A.to(dtype)).Q
    QB = torch.linalg.qr(B.to(dtype)).Q
    if QA.shape[1] < QB.shape[1]:
        QA, QB = QB, QA
    cos = torch.linalg.svdvals(QA.T @ QB).clamp(max=1.0)
    residual = QB - QA @ (QA.T @ QB)
    sin = torch.linalg.svdvals(residual).clamp(max=1.0)  # decreasing
    # Angles from sines where small (< pi/4), from cosines otherwise; both lists are sorted so
    # that entry i describes the i-th largest angle.
    from_cos = torch.sort(torch.arccos(cos), descending=True).values
    from_sin = torch.sort(torch.arcsin(sin), descending=True).values
    return torch.where(from_cos < torch.pi / 4, from_sin, from_cos)
