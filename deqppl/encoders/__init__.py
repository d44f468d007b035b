"""deqppl.encoders."""
