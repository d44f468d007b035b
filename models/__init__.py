"""The deqppl model zoo (installed as ``deqppl.models``)."""

from deqppl.protocols import Simulation
from .expfam_pca import ExpFamPCA
from .hierarchical import HierarchicalExpFamPCA
from .kernel_glm import KernelGLM

__all__ = ["ExpFamPCA", "HierarchicalExpFamPCA", "KernelGLM", "Simulation"]
