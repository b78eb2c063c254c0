"""Checkpoints for tests and benchmarks: tiny real-format checkpoints (`tiny`) and random weights at any
config's shapes (`synthetic`)."""
