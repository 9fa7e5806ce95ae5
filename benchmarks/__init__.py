"""Reproducible benchmarks: each runs its baseline in the same process and reports a ratio."""
