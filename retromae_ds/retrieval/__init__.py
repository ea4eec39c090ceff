"""Retrieval on the user's own query-passage data: metrics, search, BM25, the fine-tune probe.

- :mod:`metrics`: nDCG@10, MRR@10, Recall@10/100 per query (trec_eval's definitions) and bootstrap intervals.
- :mod:`search`: streaming encoding and exact top-k in chunks; BM25 as the lexical reference.
- :mod:`evaluation`: one call that scores an encoder (and BM25) on a :class:`RetrievalSet`.
- :mod:`probe`: a short contrastive fine-tune with sentence-transformers, before/after, over a run's checkpoints.

The data layouts (pairs files, BEIR folders) are read by :mod:`retromae_ds.data.retrieval_sets`.
"""
