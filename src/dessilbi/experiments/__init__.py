"""Experiments built on training runs: lottery tickets, IMP, growing, timing benchmarks."""
