"""deqppl.report."""
