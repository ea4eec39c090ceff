"""Evaluation: embeddings, rank metrics, Lee similarity (reproduces published numbers), held-out retrieval, CLI."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from retromae_ds import cli
from retromae_ds.errors import UserError
from retromae_ds.data.heldout import heldout_blocks, heldout_queries, split_query_target
from retromae_ds.evaluate import (average_ranks, embed_ids, embed_texts, graded_ndcg_at_k, heldout_retrieval,
                                  lee_ids, lee_similarity, pearson, rank_metrics, spearman)


@pytest.fixture(scope="module")
def minilm(minilm_tokenizer_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    return BertModel(cfg).eval()


class _Output:
    def __init__(self, hidden):
        self.last_hidden_state = hidden


class BagOfIdsEncoder(torch.nn.Module):
    """Test double: position 0 holds the counts of the row's non-special ids (a perfect passage identity
    when passages use disjoint id ranges); other positions are zero."""

    def __init__(self, vocab_size: int, specials=(0, 1, 2)):
        super().__init__()
        self.vocab_size, self.specials = vocab_size, specials
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        hidden = torch.zeros(*input_ids.shape, self.vocab_size)
        keep = attention_mask.bool()
        for s in self.specials:
            keep &= input_ids != s
        for b in range(len(input_ids)):
            hidden[b, 0] = torch.bincount(input_ids[b][keep[b]], minlength=self.vocab_size).float()
        return _Output(hidden)


class NoiseEncoder(torch.nn.Module):
    """Test double: embeddings that ignore the input entirely (chance-level retrieval)."""

    def __init__(self, hidden=64):
        super().__init__()
        self.hidden = hidden
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.gen = torch.Generator().manual_seed(123)

    def forward(self, input_ids, attention_mask):
        return _Output(torch.randn(*input_ids.shape, self.hidden, generator=self.gen))


def disjoint_passages(n=60, length=40, ids_per_passage=50, first_id=10, seed=0):
    rng = np.random.default_rng(seed)
    return [first_id + k * ids_per_passage + rng.integers(0, ids_per_passage, length) for k in range(n)]


# ---------------------------------------------------------------------------------------------- metrics

def test_average_ranks_and_spearman_by_hand():
    assert average_ranks(np.array([10, 20, 20, 30])).tolist() == [1, 2.5, 2.5, 4]
    assert average_ranks(np.array([3.0, 1.0, 2.0])).tolist() == [3, 1, 2]
    assert average_ranks(np.array([5, 5, 5])).tolist() == [2, 2, 2]
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> cov 4.5, var 4.5 and 5
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # monotone transform leaves Spearman at 1 but not Pearson
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.4])
    assert spearman(x, np.exp(10 * x)) == pytest.approx(1.0)
    assert pearson(x, np.exp(10 * x)) < 0.99
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0)


def test_graded_ndcg_by_hand():
    gains = np.array([[1.0, 1.0, 0.5], [1.0, 1.0, 0.2], [0.5, 0.2, 1.0]])
    scores = np.array([[9, 0.1, 0.9],    # query 0 ranks item 2 (gain 0.5) above item 1 (gain 1): imperfect
                       [9, 9, 0.1],      # query 1: item 0 (1.0) then 2 (0.2): perfect
                       [0.9, 0.1, 9]])   # query 2: item 0 (0.5) then 1 (0.2): perfect
    d = 1 / math.log2(3)
    q0 = (0.5 + 1.0 * d) / (1.0 + 0.5 * d)
    assert graded_ndcg_at_k(scores, gains, k=10) == pytest.approx((q0 + 1 + 1) / 3)
    assert graded_ndcg_at_k(scores, gains, k=1) == pytest.approx((0.5 + 1 + 1) / 3)
    assert graded_ndcg_at_k(gains, gains, k=10) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- embeddings

def test_embed_ids_matches_a_direct_forward_and_restores_mode(tiny_bert):
    cls_id, sep_id, pad_id = 101, 102, 0
    rng = np.random.default_rng(0)
    lists = [rng.integers(1000, 2000, n) for n in (5, 17, 3, 30, 11)]
    tiny_bert.train()
    out = embed_ids(tiny_bert, lists, cls_id, sep_id, pad_id, batch_size=2, max_length=20)
    assert tiny_bert.training  # previous mode restored
    tiny_bert.eval()
    assert out["cls"].shape == (5, 32) and out["mean"].shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(out["cls"], axis=1), 1, atol=1e-5)
    for i, ids in enumerate(lists):
        row = torch.tensor([[cls_id, *ids[:18].tolist(), sep_id]])  # truncated to max_length 20
        with torch.no_grad():
            hidden = tiny_bert(input_ids=row).last_hidden_state[0]
        cls = hidden[0] / hidden[0].norm()
        mean = hidden.mean(0) / hidden.mean(0).norm()
        np.testing.assert_allclose(out["cls"][i], cls.numpy(), atol=1e-5)
        np.testing.assert_allclose(out["mean"][i], mean.numpy(), atol=1e-5)


def test_embed_texts_equals_tokenizer_with_specials(tiny_bert, minilm_tokenizer):
    texts = ["The cat sat on the mat.", "A much longer sentence about markets, stocks and the weather today."]
    out = embed_texts(tiny_bert, minilm_tokenizer, texts, max_length=64)
    for i, text in enumerate(texts):
        enc = minilm_tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            cls = tiny_bert(**enc).last_hidden_state[0, 0]
        np.testing.assert_allclose(out["cls"][i], (cls / cls.norm()).numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------- Lee

@pytest.fixture(scope="module")
def minilm_lee(minilm, minilm_tokenizer):
    return lee_similarity(minilm, minilm_tokenizer, max_length=256)


def test_lee_minilm_reproduces_published_numbers(minilm_lee):
    got = minilm_lee
    assert set(got) == {"lee/pearson_cls", "lee/spearman_cls", "lee/pearson_mean", "lee/spearman_mean",
                        "lee/ndcg10_cls", "lee/ndcg10_mean"}
    assert got["lee/pearson_cls"] == pytest.approx(0.609, abs=0.005)
    assert got["lee/spearman_cls"] == pytest.approx(0.474, abs=0.005)
    assert got["lee/pearson_mean"] == pytest.approx(0.656, abs=0.005)
    assert got["lee/spearman_mean"] == pytest.approx(0.508, abs=0.005)
    assert 0.75 < got["lee/ndcg10_cls"] <= 1


def test_lee_random_init_scores_far_lower(minilm, minilm_tokenizer, minilm_lee):
    from transformers import BertModel

    torch.manual_seed(0)
    random_model = BertModel(minilm.config)
    got = lee_similarity(random_model, minilm_tokenizer, max_length=256)
    trained = minilm_lee
    assert got["lee/pearson_cls"] < 0.3 and got["lee/spearman_cls"] < 0.25
    assert got["lee/pearson_cls"] < trained["lee/pearson_cls"] - 0.3
    assert got["lee/ndcg10_cls"] < trained["lee/ndcg10_cls"] - 0.1


def test_lee_without_gensim_is_a_user_error(tiny_bert, minilm_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim", None)  # makes `import gensim` raise ImportError
    with pytest.raises(UserError, match="pip install gensim"):
        lee_similarity(tiny_bert, minilm_tokenizer)


# ---------------------------------------------------------------------------------------------- held-out retrieval

def test_heldout_blocks_takes_the_last_documents(tiny_dataset):
    from retromae_ds.data.indexed import IndexedDataset

    ds = IndexedDataset(tiny_dataset)
    train_blocks, heldout = heldout_blocks(ds, 10)
    assert train_blocks == int(ds.doc_index[ds.num_documents - 10])
    assert len(heldout) == len(ds) - train_blocks > 0
    for i, block in enumerate(heldout):
        np.testing.assert_array_equal(block, ds[train_blocks + i])
    assert np.concatenate(heldout).tolist() == np.concatenate(
        [ds.document(k) for k in range(ds.num_documents - 10, ds.num_documents)]).tolist()
    with pytest.raises(UserError, match="hold out"):
        heldout_blocks(ds, ds.num_documents)


def test_split_query_target_is_a_contiguous_cut():
    ids = np.arange(100, 140)
    q, t = split_query_target(ids, np.random.default_rng(5), 0.25)
    assert len(q) == 10 and len(t) == 30
    start = int(q[0] - 100)
    assert q.tolist() == list(range(100 + start, 110 + start))
    assert sorted(q.tolist() + t.tolist()) == ids.tolist()


def test_heldout_perfect_identity_scores_one_and_noise_scores_low():
    blocks = disjoint_passages(n=60) + [np.array([5, 6, 7])]  # a too-short passage is skipped
    perfect = heldout_retrieval(BagOfIdsEncoder(vocab_size=3100), blocks, 0, 1, 2, seed=0)
    cls_keys = ("heldout/mrr10", "heldout/recall1", "heldout/recall10")  # no recall100: only 60 candidates
    # mean pooling sees the counts / length: the same direction, so it is perfect too
    assert perfect == {**{k: 1.0 for k in cls_keys}, **{f"{k}_mean": 1.0 for k in cls_keys},
                       "heldout/num_queries": 60}
    noise = heldout_retrieval(NoiseEncoder(), blocks, 0, 1, 2, seed=0)
    assert noise["heldout/mrr10"] < 0.2 and noise["heldout/recall1"] < 0.15
    assert "heldout/recall100" not in noise  # it would be 1.0 by construction with 60 candidates


def test_heldout_is_deterministic_per_seed(minilm, tiny_dataset):
    from retromae_ds.data.indexed import IndexedDataset

    _, blocks = heldout_blocks(IndexedDataset(tiny_dataset), 10)
    a = heldout_retrieval(minilm, blocks, 101, 102, 0, seed=3, max_length=64)
    b = heldout_retrieval(minilm, blocks, 101, 102, 0, seed=3, max_length=64)
    assert a == b
    assert a["heldout/num_queries"] == sum(len(x) >= 16 for x in blocks)
    # the real encoder finds the rest of its passage far above chance (MRR@10 = H(10) / n for random order)
    chance = sum(1 / r for r in range(1, 11)) / a["heldout/num_queries"]
    assert a["heldout/mrr10"] > 3 * chance
    # spans depend on the seed
    q3 = [split_query_target(x, np.random.default_rng(3), 0.25)[0].tolist() for x in blocks[:1]]
    q4 = [split_query_target(x, np.random.default_rng(4), 0.25)[0].tolist() for x in blocks[:1]]
    assert q3 != q4


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_eval_writes_json(minilm_tokenizer_dir, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", minilm_tokenizer_dir, "--data", tiny_dataset, "--heldout-docs", "10",
                   "--max-length", "256", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "lee/spearman_cls" in printed and "heldout/mrr10" in printed
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["lee/pearson_cls"] == pytest.approx(0.609, abs=0.005)
    assert metrics["heldout/num_queries"] > 0 and 0 < metrics["heldout/mrr10"] <= 1
    assert not list(tmp_path.glob("*.partial"))


def test_cli_eval_bad_model_dir(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_average_ranks_vectorised_matches_a_loop_on_random_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, 500).astype(float)
    want = np.empty(len(x))
    for i, v in enumerate(x):
        below, equal = (x < v).sum(), (x == v).sum()
        want[i] = below + (equal + 1) / 2
    np.testing.assert_allclose(average_ranks(x), want)


def test_heldout_per_query_ranks_give_the_aggregates_and_the_split_is_cached():
    blocks = disjoint_passages(n=40)
    encoder = NoiseEncoder()
    got = heldout_retrieval(encoder, blocks, 0, 1, 2, seed=5, per_query=True)
    ranks = np.array(got["heldout/ranks"])
    assert len(ranks) == got["heldout/num_queries"] == 40 and ranks.min() >= 1 and ranks.max() <= 40
    want = rank_metrics(ranks, candidates=len(ranks))  # 40 candidates: no Recall@100
    assert {k: got[k] for k in want} == want and "heldout/recall100" not in want
    assert "heldout/ranks" not in heldout_retrieval(encoder, blocks, 0, 1, 2, seed=5)
    # the split is a function of ids + seed: copies of the blocks hit the same cache entry
    first = heldout_queries(blocks, seed=5)
    assert heldout_queries([b.copy() for b in blocks], seed=5) is first
    assert heldout_queries(blocks, seed=6)[0][0].tolist() != first[0][0].tolist() or \
        heldout_queries(blocks, seed=6)[0][1].tolist() != first[0][1].tolist()


def test_lee_ids_are_tokenized_once(minilm_tokenizer, monkeypatch):
    first = lee_ids(minilm_tokenizer, 128)
    assert len(first) == 50 and all(len(x) <= 126 for x in first)
    calls = []
    monkeypatch.setattr(type(minilm_tokenizer), "__call__",
                        lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    assert lee_ids(minilm_tokenizer, 128) is first and not calls
