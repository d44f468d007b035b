"""deqppl.harness."""
