"""The held-out split: which blocks training never sees, and the retrieval queries cut from them.

Why here, beside the sampler and the blocks: the split decides what the training data is (the sampler
gets only the blocks before it), and evaluation only reads what it left over. `heldout_blocks` holds out
the last documents of the first dataset; `heldout_queries` turns each held-out passage into a query (a
span of it) and its target (the rest), deterministically for a seed (retromae_ds/evaluate.py ranks them).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from retromae_ds.errors import UserError


def heldout_blocks(dataset, num_docs: int) -> tuple[int, list[np.ndarray]]:
    """Split off the LAST ``num_docs`` documents of an IndexedDataset for retrieval evaluation.

    Returns ``(train_num_blocks, heldout)``: training uses blocks ``[0, train_num_blocks)``, and
    ``heldout`` holds copies of the remaining blocks (small, and no longer tied to the memory map).
    """
    num_documents = len(dataset.doc_index) - 1
    if not 0 < num_docs < num_documents:
        raise UserError(f"cannot hold out {num_docs} documents of {getattr(dataset, 'prefix', 'the dataset')}, "
                        f"which has {num_documents}: choose between 1 and {num_documents - 1} "
                        f"(--heldout-docs / --eval-heldout-docs), or 0 to disable held-out evaluation.")
    first = int(dataset.doc_index[num_documents - num_docs])
    heldout = [np.array(dataset[i], dtype=np.int64) for i in range(first, len(dataset))]
    return first, heldout


def split_query_target(ids: np.ndarray, rng: np.random.Generator, query_fraction: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Cut a contiguous span of ``round(len * query_fraction)`` ids (at least 1) at a random start."""
    n = len(ids)
    span = min(n - 1, max(1, int(round(n * query_fraction))))
    start = int(rng.integers(0, n - span + 1))
    return ids[start:start + span], np.concatenate([ids[:start], ids[start + span:]])


_HELDOUT_SPLIT_CACHE: dict = {}


def heldout_queries(blocks: Sequence[np.ndarray], *, seed: int = 0, query_fraction: float = 0.25,
                    min_len: int = 16) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(queries, targets): per passage of at least ``min_len`` ids (in order), a span of
    ``query_fraction`` of its ids cut at a start drawn from ``numpy.random.default_rng(seed)``, and
    the passage without it. A pure function of the ids and the settings (no process state), cached
    by a digest of the ids so that repeated evaluations skip the split."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    arrays = [np.ascontiguousarray(np.asarray(ids, dtype=np.int64)) for ids in blocks]
    for ids in arrays:
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
    key = (digest.hexdigest(), int(seed), float(query_fraction), int(min_len))
    if key not in _HELDOUT_SPLIT_CACHE:
        rng = np.random.default_rng(seed)
        queries, targets = [], []
        for ids in arrays:
            if len(ids) < min_len:
                continue
            q, t = split_query_target(ids, rng, query_fraction)
            queries.append(q)
            targets.append(t)
        if len(_HELDOUT_SPLIT_CACHE) > 16:  # several datasets/seeds in one process: stay small
            _HELDOUT_SPLIT_CACHE.clear()
        _HELDOUT_SPLIT_CACHE[key] = (queries, targets)
    return _HELDOUT_SPLIT_CACHE[key]
