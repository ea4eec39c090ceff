"""Experiments: multi-run studies with statistics and plots (the RetroMAE vs MLM ablation).

Run from the repository root as modules, e.g. `python -m experiments.ablation --help`; the index is
experiments/README.md. Not part of the package: the wheel ships `retromae_ds` only.
"""
