"""The retrieval metrics and the exact chunked search equal trec_eval (pytrec_eval) and a brute-force
ranking written here, on graded qrels with tied scores."""

from __future__ import annotations

import numpy as np
import pytest

from retromae_ds.retrieval import metrics as M
from retromae_ds.retrieval.search import bm25_top_k, memory_bound, top_k


def _fixture(seed=0, num_queries=40, num_docs=260, dim=4):
    """Small-integer embeddings (exact dot products, many ties), shuffled string ids whose string order is
    not their list order, and graded qrels with up to 12 judged documents (some grade 0)."""
    rng = np.random.default_rng(seed)
    docs = rng.integers(-1, 2, size=(num_docs, dim)).astype(np.float32)
    queries = rng.integers(-1, 2, size=(num_queries, dim)).astype(np.float32)
    doc_ids = [f"{'dx'[i % 2]}{n}" for i, n in enumerate(rng.permutation(num_docs) * 7)]
    query_ids = [f"q{i}" for i in range(num_queries)]
    qrels = {}
    for qid in query_ids:
        judged = rng.choice(num_docs, size=int(rng.integers(1, 13)), replace=False)
        grades = rng.integers(0, 4, size=len(judged))
        grades[0] = max(grades[0], 1)  # at least one relevant document per query
        qrels[qid] = {doc_ids[d]: int(g) for d, g in zip(judged, grades)}
    return queries, docs, query_ids, doc_ids, qrels


def _trec_eval(queries, docs, query_ids, doc_ids, qrels):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    scores = queries @ docs.T
    run = {qid: {doc_ids[d]: float(scores[i, d]) for d in range(len(doc_ids))} for i, qid in enumerate(query_ids)}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_10", "recall_100", "recip_rank"})
    found = evaluator.evaluate(run)
    return {
        "ndcg10": np.array([found[q]["ndcg_cut_10"] for q in query_ids]),
        # RR@10: trec_eval's reciprocal rank is 1/rank of the first relevant document; within the top 10 iff >= 0.1
        "mrr10": np.array([found[q]["recip_rank"] if found[q]["recip_rank"] >= 0.1 - 1e-12 else 0.0
                           for q in query_ids]),
        "recall10": np.array([found[q]["recall_10"] for q in query_ids]),
        "recall100": np.array([found[q]["recall_100"] for q in query_ids]),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_trec_eval_with_graded_qrels_and_ties(seed):
    queries, docs, query_ids, doc_ids, qrels = _fixture(seed)
    scores = queries @ docs.T
    assert any(len(np.unique(row)) < len(row) // 10 for row in scores)  # the fixture is full of ties
    ranked = top_k(queries, docs, order=M.tie_order(doc_ids), query_chunk=7, doc_chunk=33)
    ours = M.per_query(ranked, M.judgements(query_ids, doc_ids, qrels))
    reference = _trec_eval(queries, docs, query_ids, doc_ids, qrels)
    for name in M.METRICS:
        np.testing.assert_allclose(ours[name], reference[name], atol=1e-6, err_msg=name)


def test_chunked_search_equals_one_full_sort():
    """top_k over small blocks = a stable sort of the whole score matrix (written plainly here)."""
    queries, docs, _, doc_ids, _ = _fixture(3, num_docs=150)
    order = M.tie_order(doc_ids)
    expected = []
    for q in queries:
        s = docs[order] @ q
        best = sorted(range(len(s)), key=lambda j: (-s[j], j))[:100]
        expected.append(order[best])
    for query_chunk, doc_chunk in [(1, 1), (5, 17), (64, 1000)]:
        np.testing.assert_array_equal(top_k(queries, docs, order=order, query_chunk=query_chunk,
                                            doc_chunk=doc_chunk), np.array(expected))


def test_fewer_candidates_than_the_depth_keep_every_candidate():
    queries, docs, query_ids, doc_ids, qrels = _fixture(4, num_docs=30)
    ranked = top_k(queries, docs, order=M.tie_order(doc_ids))
    assert ranked.shape == (len(queries), 30)
    assert all(sorted(row) == list(range(30)) for row in ranked)
    values = M.per_query(ranked, M.judgements(query_ids, doc_ids, qrels))
    np.testing.assert_allclose(values["recall100"], 1.0)


def test_metrics_by_hand():
    """Two queries, written out: grades {a: 2, c: 1} and {b: 3}."""
    doc_ids = ["a", "b", "c", "d"]
    judged = M.judgements(["q1", "q2"], doc_ids, {"q1": {"a": 2, "c": 1, "d": 0}, "q2": {"b": 3}})
    ranked = np.array([[3, 2, 0, 1], [0, 2, 3, 1]])  # q1: d c a b ; q2: a c d b
    values = M.per_query(ranked, judged)
    dcg = 1 / np.log2(3) + 2 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3)
    np.testing.assert_allclose(values["ndcg10"], [dcg / idcg, (3 / np.log2(5)) / (3 / np.log2(2))])
    np.testing.assert_allclose(values["mrr10"], [1 / 2, 1 / 4])
    np.testing.assert_allclose(values["recall10"], [1.0, 1.0])


def test_relevant_beyond_ten_counts_for_recall100_only():
    doc_ids = [f"d{i:03d}" for i in range(120)]
    judged = M.judgements(["q"], doc_ids, {"q": {"d050": 1}})
    ranked = np.arange(120)[None, :100]
    values = M.per_query(ranked, judged)
    assert values["mrr10"][0] == 0 and values["recall10"][0] == 0 and values["ndcg10"][0] == 0
    assert values["recall100"][0] == 1


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(0).random(500)
    lo, hi = M.bootstrap_interval(values, seed=3)
    assert (lo, hi) == M.bootstrap_interval(values, seed=3)
    assert lo < values.mean() < hi
    # the interval of a mean shrinks like 1/sqrt(n): 4x the queries, about half the width
    lo4, hi4 = M.bootstrap_interval(np.tile(values, 4), seed=3)
    assert 0.35 < (hi4 - lo4) / (hi - lo) < 0.65


def test_bm25_ranks_the_passage_sharing_the_rare_words_first():
    docs = ["the cat sat on the mat", "dogs chase cats in the park", "a treatise on quantum chromodynamics",
            "stock markets fell sharply today"]
    ranked = bm25_top_k(["quantum chromodynamics lecture", "markets today", "zzz"], docs,
                        order=M.tie_order(["d0", "d1", "d2", "d3"]))
    assert ranked.shape == (3, 4)
    assert ranked[0, 0] == 2 and ranked[1, 0] == 3
    assert list(ranked[2]) == [3, 2, 1, 0]  # no word matches: all tie at 0, in descending id order


def test_memory_bound_grows_with_the_collection_not_its_square():
    small = memory_bound(10_000, 1_000, 384)
    large = memory_bound(1_000_000, 100_000, 384)
    assert large < 101 * small  # linear in the collection (a score matrix would be 10,000x)
