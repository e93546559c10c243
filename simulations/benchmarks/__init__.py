"""Benchmarks: figures, never pass/fail."""
