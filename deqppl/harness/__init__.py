"""The comparison harness: inference methods as objects, the DEQ-vs-SVI-vs-L-BFGS comparison,
a resumable run store, and model comparison across the zoo with ArviZ."""

from deqppl.harness.compare import COLUMNS, Comparison, compare, describe_model
from deqppl.harness.methods import (
    METHODS,
    AbstractMethod,
    DEQMethod,
    LBFGSMethod,
    StageResult,
    SVIMethod,
    method,
)
from deqppl.harness.model_comparison import ModelComparison, compare_models
from deqppl.harness.store import RunStore, Unit

__all__ = [
    "COLUMNS",
    "METHODS",
    "AbstractMethod",
    "Comparison",
    "DEQMethod",
    "LBFGSMethod",
    "ModelComparison",
    "RunStore",
    "SVIMethod",
    "StageResult",
    "Unit",
    "compare",
    "compare_models",
    "describe_model",
    "method",
]
