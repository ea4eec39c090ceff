"""Score an encoder (and BM25) on a retrieval set: the numbers `eval --pairs/--beir`, the probe and the
trainer's `--eval-pairs/--eval-beir` report.

Keys are ``PREFIX/METRIC_RANKER``: PREFIX ``pairs`` or ``beir``, METRIC one of nDCG@10, MRR@10,
Recall@10/100 (``ndcg10``, ``mrr10``, ``recall10``, ``recall100``), RANKER ``cls`` ([CLS] vector),
``mean`` (mean of the token vectors) or ``bm25``; e.g. ``pairs/ndcg10_cls``. With intervals, each also has
``..._lo`` and ``..._hi``: the 95% bootstrap interval over queries. A Recall@k whose k is not below the
number of passages is left out (every passage is in the top k: 1 by construction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from retromae_ds.retrieval import metrics as M
from retromae_ds.retrieval.search import bm25_top_k, encode, memory_bound, peak_rss_bytes, top_k

SIMILARITIES = {"cos": "cosine of the embeddings", "dot": "dot product of the embeddings (no normalisation)"}
POOLINGS = ("cls", "mean")


@dataclass
class SetScores:
    """The flat metrics (for logs and JSON), and the per-query values behind them for paired statistics:
    ``per_query[ranker][metric]`` is an array in the set's query order."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    seconds: float = 0.0
    memory_bound_bytes: int = 0


def reported_metrics(num_docs: int) -> tuple[str, ...]:
    """:data:`metrics.METRICS` less a Recall@k that every ranking reaches by construction."""
    return tuple(m for m in M.METRICS if not (m.startswith("recall") and M.CUTOFF[m] >= num_docs))


def score_set(encoder, tokenizer, rset, *, prefix: str, max_length: int, batch_size: int = 32, device=None,
              similarity: str = "cos", bm25: bool = False, resamples: int = 0, seed: int = 0,
              progress: bool = False) -> SetScores:
    """Rank every passage of ``rset`` (a :class:`retromae_ds.data.retrieval_sets.RetrievalSet`) for every
    query by [CLS] and by mean pooling, with ``similarity`` ("cos" or "dot"), and by BM25 when ``bm25``.

    Every rank of a ZeRO-3 run may call this: the forwards are the same on all of them. ``resamples`` > 0
    adds bootstrap intervals (seeded by ``seed``). ``progress`` shows bars for the encoding.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)}, not {similarity!r}")
    start = time.perf_counter()
    judged = M.judgements(rset.query_ids, rset.doc_ids, rset.qrels)
    order = M.tie_order(rset.doc_ids)
    kw = dict(max_length=max_length, batch_size=batch_size, device=device, normalize=similarity == "cos")
    doc_emb = encode(encoder, tokenizer, rset.docs, desc="passages" if progress else None, **kw)
    query_emb = encode(encoder, tokenizer, rset.queries, desc="queries" if progress else None, **kw)
    rankings = {pooling: top_k(query_emb[pooling], doc_emb[pooling], order=order, device=device)
                for pooling in POOLINGS}
    if bm25:
        rankings["bm25"] = bm25_top_k(rset.queries, rset.docs, order=order)
    scores = SetScores(memory_bound_bytes=memory_bound(len(rset.docs), len(rset.queries),
                                                       doc_emb["cls"].shape[1] if len(rset.docs) else 0))
    for ranker, ranked in rankings.items():
        _add_ranker(scores, ranker, ranked, judged, prefix, len(rset.docs), resamples, seed)
    scores.metrics[f"{prefix}/num_queries"] = len(rset.query_ids)
    scores.metrics[f"{prefix}/num_passages"] = len(rset.doc_ids)
    scores.seconds = time.perf_counter() - start
    return scores


def _add_ranker(scores: SetScores, ranker: str, ranked, judged, prefix: str, num_docs: int, resamples: int,
                seed: int) -> None:
    """The per-query values and the means (with intervals when ``resamples``) of one ranker's rankings."""
    values = M.per_query(ranked, judged)
    names = reported_metrics(num_docs)
    scores.per_query[ranker] = {name: values[name] for name in names}
    for name in names:
        key = f"{prefix}/{name}_{ranker}"
        scores.metrics[key] = float(values[name].mean())
        if resamples:
            lo, hi = M.bootstrap_interval(values[name], seed=seed, resamples=resamples)
            scores.metrics[f"{key}_lo"], scores.metrics[f"{key}_hi"] = lo, hi


def score_bm25(rset, *, prefix: str) -> dict[str, float]:
    """BM25's means alone (keys ``PREFIX/METRIC_bm25``), for a reference line computed once per set."""
    scores = SetScores()
    ranked = bm25_top_k(rset.queries, rset.docs, order=M.tie_order(rset.doc_ids))
    _add_ranker(scores, "bm25", ranked, M.judgements(rset.query_ids, rset.doc_ids, rset.qrels), prefix,
                len(rset.docs), 0, 0)
    return scores.metrics


def format_table(scores: SetScores, prefix: str) -> list[str]:
    """Rows "metric  cls [lo, hi]  mean [lo, hi]  bm25 [lo, hi]" for the console."""
    rankers = list(scores.per_query)
    names = [name for name in M.METRICS if f"{prefix}/{name}_{rankers[0]}" in scores.metrics] if rankers else []
    cells = {}
    for name in names:
        for ranker in rankers:
            key = f"{prefix}/{name}_{ranker}"
            text = f"{scores.metrics[key]:.4f}"
            if f"{key}_lo" in scores.metrics:
                text += f" [{scores.metrics[key + '_lo']:.3f}, {scores.metrics[key + '_hi']:.3f}]"
            cells[name, ranker] = text
    width = max([len(c) for c in cells.values()] + [6])
    lines = [f"{'':<10}" + "".join(f"  {ranker:<{width}}" for ranker in rankers)]
    for name in names:
        lines.append(f"{name:<10}" + "".join(f"  {cells[name, ranker]:<{width}}" for ranker in rankers))
    return lines


def memory_line(scores: SetScores) -> str:
    return (f"peak resident memory {peak_rss_bytes() / 2**20:,.0f} MiB (the search's own arrays are bounded by "
            f"{scores.memory_bound_bytes / 2**20:,.0f} MiB; the rest is the model, the texts and Python)")
