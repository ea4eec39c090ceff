"""Developer tooling: the mutation check, the sync counter, a synthetic-data writer, and the two modules
the tests share with them (the per-sample masking reference, the sync watch).

Run from the repository root as modules, e.g. `python -m scripts.mutation_check --list`; the index is
scripts/README.md. Not part of the package: the wheel ships `retromae_ds` only.
"""
