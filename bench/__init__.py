"""Benchmarks for watibot: `python -m bench` (see README, Performance)."""
