"""Learnable amortisers y -> z*(y) whose fixed points are MAP estimates."""

from .ped import LaplaceResult, PEDEncoder, UniquenessReport, default_solver

__all__ = ["LaplaceResult", "PEDEncoder", "UniquenessReport", "default_solver"]
