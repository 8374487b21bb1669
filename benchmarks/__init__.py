"""Benchmarks for `make bench`: speed and memory figures, printed, never asserted in the test suite."""
