"""Micro-benchmarks: each prints one JSON object with ratios against a baseline run in the same process.

Run from the repository root as modules, e.g. `python -m bench.bench_data --help`; the index is
bench/README.md. Not part of the package: the wheel ships `retromae_ds` only.
"""
