"""Benchmarks: the mapper micro-benchmark and the end-to-end A/B suite."""
