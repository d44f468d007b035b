"""The deqppl model zoo (installed as ``deqppl.models``)."""
