"""Benchmarks of recsvc: run with ``python -m bench.<name>``; figures go to docs/benchmarks.md."""
