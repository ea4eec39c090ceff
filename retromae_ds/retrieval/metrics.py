"""Per-query retrieval metrics with trec_eval's definitions, and bootstrap intervals over queries.

Why written here rather than calling pytrec_eval at run time: a 100k-query evaluation would build 10M
Python dict entries (gigabytes) for trec_eval; these arrays hold the same run in 80 MB. The numbers are
trec_eval's, checked in tests/test_retrieval_metrics.py against pytrec_eval on graded qrels with ties:

- a ranking is the candidates by score, descending; equal scores are ordered by document id, descending
  (string order), as trec_eval orders them (:func:`tie_order` gives that order, the search applies it);
- nDCG@10: sum of grade / log2(rank + 1) over the top 10, divided by the same sum over the query's judged
  documents sorted by grade (``ndcg_cut_10``);
- MRR@10: 1 / the rank of the first relevant document (grade >= 1) within the top 10, else 0
  (``recip_rank`` of the run cut to 10);
- Recall@k: relevant documents in the top k / relevant documents (``recall_k``).
Every query has at least one relevant document (the loaders guarantee it), so no metric is undefined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("ndcg10", "mrr10", "recall10", "recall100")
CUTOFF = {"ndcg10": 10, "mrr10": 10, "recall10": 10, "recall100": 100}
DEPTH = max(CUTOFF.values())  # how many documents each query's ranking keeps


@dataclass
class Judgements:
    """Graded relevance as arrays: query i's judged documents are ``docs[offsets[i]:offsets[i + 1]]``
    (indices into the candidate list) with ``grades`` (all > 0)."""

    offsets: np.ndarray
    docs: np.ndarray
    grades: np.ndarray
    num_docs: int

    @property
    def num_queries(self) -> int:
        return len(self.offsets) - 1

    def relevant_counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def judgements(query_ids: list[str], doc_ids: list[str], qrels: dict[str, dict[str, int]]) -> Judgements:
    """:class:`Judgements` for queries in ``query_ids`` order; grades <= 0 are not relevant (left out)."""
    position = {doc: i for i, doc in enumerate(doc_ids)}
    offsets, docs, grades = [0], [], []
    for qid in query_ids:
        for doc, grade in qrels.get(qid, {}).items():
            if grade > 0:
                docs.append(position[doc])
                grades.append(grade)
        offsets.append(len(docs))
    return Judgements(np.asarray(offsets, np.int64), np.asarray(docs, np.int64), np.asarray(grades, np.float64),
                      len(doc_ids))


def tie_order(doc_ids: list[str]) -> np.ndarray:
    """A permutation of the candidates that puts them in descending document-id order: a search over
    candidates in this order that keeps the lower position first among equal scores ranks ties as trec_eval."""
    return np.asarray(sorted(range(len(doc_ids)), key=doc_ids.__getitem__, reverse=True), dtype=np.int64)


def _gains(ranked: np.ndarray, judged: Judgements) -> np.ndarray:
    """grade of ``ranked[q, r]`` for query q (0: not judged relevant, or padding -1)."""
    queries = np.repeat(np.arange(judged.num_queries, dtype=np.int64), judged.relevant_counts())
    keys = queries * judged.num_docs + judged.docs
    order = np.argsort(keys, kind="stable")
    keys, grades = keys[order], judged.grades[order]
    if len(keys) == 0:
        return np.zeros(ranked.shape)
    wanted = np.arange(len(ranked), dtype=np.int64)[:, None] * judged.num_docs + ranked
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where((ranked >= 0) & (keys[at] == wanted), grades[at], 0.0)


def _ideal_dcg(judged: Judgements, k: int) -> np.ndarray:
    """DCG@k of each query's judged documents sorted by grade, descending."""
    counts = judged.relevant_counts()
    queries = np.repeat(np.arange(judged.num_queries, dtype=np.int64), counts)
    order = np.lexsort((-judged.grades, queries))
    rank = np.arange(len(order)) - judged.offsets[queries[order]]
    keep = rank < k
    ideal = np.zeros(judged.num_queries)
    np.add.at(ideal, queries[order][keep], judged.grades[order][keep] / np.log2(rank[keep] + 2.0))
    return ideal


def per_query(ranked: np.ndarray, judged: Judgements) -> dict[str, np.ndarray]:
    """Each metric of :data:`METRICS` per query, from ``ranked`` [queries, depth]: candidate indices,
    best first (-1 pads rankings shorter than the depth, e.g. fewer candidates than 100)."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.shape[0] != judged.num_queries:
        raise ValueError(f"{ranked.shape[0]} rankings for {judged.num_queries} queries")
    gains = _gains(ranked, judged)
    relevant = gains > 0
    depth = ranked.shape[1]
    discounts = 1.0 / np.log2(np.arange(depth) + 2.0)
    result = {"ndcg10": (gains[:, :10] * discounts[:10]).sum(1) / _ideal_dcg(judged, 10)}
    first = np.where(relevant[:, :10].any(1), relevant[:, :10].argmax(1) + 1, 0)
    result["mrr10"] = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    total = judged.relevant_counts()
    for k in (10, 100):
        result[f"recall{k}"] = relevant[:, :k].sum(1) / total
    return result


def bootstrap_interval(values: np.ndarray, *, seed: int = 0, resamples: int = 1000,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` over ``resamples`` resamplings of the queries with
    replacement (seeded, so a report can be repeated). Resamples are drawn in slabs of ~10M indices, so
    100k queries need ~80 MB, not 800."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    slab = max(1, 10_000_000 // n)
    for start in range(0, resamples, slab):
        stop = min(resamples, start + slab)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)
