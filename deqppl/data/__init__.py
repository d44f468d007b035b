"""deqppl.data."""
