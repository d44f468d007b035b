"""The comparison harness: inference methods as objects, the DEQ-vs-SVI-vs-L-BFGS comparison,
a resumable run store, model comparison across the zoo with ArviZ, and implicit classifiers
(pcDEQ, monDEQ, unconstrained DEQ, explicit) with their certificates."""

from deqppl.harness.accuracy import CertifiedBound, certified_bound
from deqppl.harness.classifiers import (
    AbstractArchitecture,
    ClassifierComparison,
    ClassifierMethod,
    ClassifierStage,
    ClassifierTraining,
    ImageSplit,
    LinearArchitecture,
    MultiConvArchitecture,
    SingleConvArchitecture,
    compare_classifiers,
)
from deqppl.harness.compare import COLUMNS, TIMING_METRICS, Comparison, compare, describe_model
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
from deqppl.harness.validated import ValidatedData, validated

__all__ = [
    "AbstractArchitecture",
    "ClassifierComparison",
    "ClassifierMethod",
    "ClassifierStage",
    "ClassifierTraining",
    "ImageSplit",
    "LinearArchitecture",
    "MultiConvArchitecture",
    "SingleConvArchitecture",
    "compare_classifiers",
    "COLUMNS",
    "METHODS",
    "TIMING_METRICS",
    "AbstractMethod",
    "CertifiedBound",
    "Comparison",
    "DEQMethod",
    "LBFGSMethod",
    "ModelComparison",
    "RunStore",
    "SVIMethod",
    "StageResult",
    "Unit",
    "ValidatedData",
    "certified_bound",
    "compare",
    "compare_models",
    "describe_model",
    "method",
    "validated",
]
