"""Data checked once by a model (re-exported from :mod:`deqppl.validation`)."""

from deqppl.validation import ValidatedData, validated

__all__ = ["ValidatedData", "validated"]
