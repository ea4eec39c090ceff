"""Dense search that streams: texts are encoded in slabs, and every query keeps only its best 100.

Memory is bounded by what must be held, not by queries x passages: the embeddings of the passages and
the queries (float32, one array per pooling), one block of scores (``query_chunk`` x (``doc_chunk`` + 100)),
and the rankings (queries x 100). :func:`memory_bound` states that bound; `retromae-ds eval` prints it
beside the measured peak resident memory. 1M passages x 768 dims is 3 GB per pooling: the embeddings
dominate, never a 1M x 1M matrix.

BM25 (the lexical reference line) is bm25s: its default tokenizer (lower case, words of 2+ letters,
English stop words, no stemming), k1 = 1.5, b = 0.75.
"""

from __future__ import annotations

import resource
import sys
from typing import Sequence

import numpy as np

from retromae_ds.retrieval.metrics import DEPTH

SLAB = 4096  # texts tokenized at a time: tokenized ids never exist for the whole corpus at once
QUERY_CHUNK = 256
DOC_CHUNK = 16384


def encode(encoder, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int = 32, device=None,
           normalize: bool = True, desc: str | None = None) -> dict[str, np.ndarray]:
    """{"cls": [n, hidden], "mean": [n, hidden]} float32 embeddings of ``texts``, in order.

    Texts are tokenized and embedded a slab at a time (:func:`retromae_ds.evaluate.embed_texts`; its
    :func:`~retromae_ds.evaluate.embed_ids` sorts each slab by length, so batches waste little on padding).
    Deterministic: the same texts give the same batches on every rank, as ZeRO-3's collective forwards
    need. ``desc`` shows a progress bar (rank 0).
    """
    from tqdm.auto import tqdm

    from retromae_ds.evaluate import embed_texts

    out: dict[str, np.ndarray] = {}
    bar = tqdm(total=len(texts), desc=desc, unit="text", disable=desc is None, leave=False, file=sys.stderr)
    for start in range(0, len(texts), SLAB):
        chunk = list(texts[start:start + SLAB])
        emb = embed_texts(encoder, tokenizer, chunk, batch_size=batch_size, max_length=max_length, device=device,
                          normalize=normalize)
        for pooling, rows in emb.items():
            if pooling not in out:
                out[pooling] = np.empty((len(texts), rows.shape[1]), dtype=np.float32)
            out[pooling][start:start + len(chunk)] = rows
        bar.update(len(chunk))
    bar.close()
    return out


def top_k(queries: np.ndarray, docs: np.ndarray, k: int = DEPTH, *, order: np.ndarray | None = None,
          query_chunk: int = QUERY_CHUNK, doc_chunk: int = DOC_CHUNK, device=None) -> np.ndarray:
    """Indices [queries, min(k, docs)] of each query's best documents by dot product, best first.

    Exact: every score is computed, a block at a time, and merged into the running best k with a stable
    sort, so equal scores keep the candidates' order. ``order`` (a permutation of the documents, e.g.
    :func:`retromae_ds.retrieval.metrics.tie_order`) is that order; default: as given. ``device``: where
    the scores are computed (the documents' embeddings are moved there once).
    """
    import torch

    device = torch.device(device or "cpu")
    docs_t = torch.from_numpy(np.ascontiguousarray(docs if order is None else docs[order])).to(device)
    queries_t = torch.from_numpy(np.ascontiguousarray(queries))
    n_docs = docs_t.shape[0]
    keep = min(k, n_docs)
    ranked = np.empty((len(queries), keep), dtype=np.int64)
    for qs in range(0, len(queries), query_chunk):
        q = queries_t[qs:qs + query_chunk].to(device)
        best_scores = torch.empty((len(q), 0), device=device)
        best_index = torch.empty((len(q), 0), dtype=torch.long, device=device)
        for ds in range(0, n_docs, doc_chunk):
            scores = q @ docs_t[ds:ds + doc_chunk].T
            index = torch.arange(ds, ds + scores.shape[1], device=device).expand(len(q), -1)
            scores = torch.cat([best_scores, scores], 1)  # earlier candidates first: ties keep them ahead
            index = torch.cat([best_index, index], 1)
            sorted_scores, at = torch.sort(scores, dim=1, descending=True, stable=True)
            best_scores, best_index = sorted_scores[:, :keep], torch.gather(index, 1, at[:, :keep])
        ranked[qs:qs + len(q)] = best_index.cpu().numpy()
    return ranked if order is None else order[ranked]


def bm25_top_k(queries: Sequence[str], docs: Sequence[str], k: int = DEPTH, *,
               order: np.ndarray | None = None) -> np.ndarray:
    """Indices [queries, min(k, docs)] of each query's best documents by BM25 (bm25s), best first; equal
    scores in the order ``order`` gives (as :func:`top_k`). Documents that share no word with the query
    score 0 and fill the ranking after the matching ones."""
    import bm25s

    keep = min(k, len(docs))
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(docs), show_progress=False), show_progress=False)
    query_tokens = bm25s.tokenize(list(queries), return_ids=False, show_progress=False)
    found, scores = retriever.retrieve(query_tokens, k=keep, show_progress=False)
    found = np.asarray(found, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    rank_of = np.empty(len(docs), dtype=np.int64)
    rank_of[order if order is not None else np.arange(len(docs))] = np.arange(len(docs))
    resort = np.lexsort((rank_of[found], -scores), axis=1)  # score descending, then the tie order
    return np.take_along_axis(found, resort, axis=1)


def memory_bound(num_docs: int, num_queries: int, hidden: int, *, poolings: int = 2,
                 query_chunk: int = QUERY_CHUNK, doc_chunk: int = DOC_CHUNK, k: int = DEPTH) -> int:
    """Bytes the search holds at most beyond the model and the texts: embeddings (float32, per pooling), one
    block of scores and indices with its sort's outputs, and the rankings."""
    embeddings = 4 * hidden * (num_docs + num_queries) * poolings
    block = query_chunk * (min(doc_chunk, num_docs) + k) * (4 + 8) * 3
    rankings = 8 * num_queries * min(k, num_docs) * (poolings + 1)
    return embeddings + block + rankings


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kibibytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
