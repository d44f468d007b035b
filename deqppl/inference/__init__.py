"""deqppl.inference."""
