"""The held-out retrieval documents never reach training, and the held-out query set is the same in
every process (issue 14): held-out numbers are only honest if both hold."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retromae_ds.config import TrainConfig
from retromae_ds.data.indexed import IndexedDataset
from retromae_ds.data.sampler import GlobalBatchSampler
from retromae_ds.engine.build import load_data
from retromae_ds.data.heldout import heldout_blocks, heldout_queries
from tests.helpers.corpora import lee_articles
from tests.helpers.tiny_run import prepare_lee_corpus


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory) -> str:
    """Other Lee articles (130-189), for a two-dataset blend. Not 60-119: article 72 repeats
    sentences of held-out article 59 (news rewrites), so one block is genuinely in both."""
    return prepare_lee_corpus(tmp_path_factory.mktemp("second_dataset"), lee_articles(190)[130:], "more",
                              max_seq_len=64)


def _key(block) -> bytes:
    return np.asarray(block, dtype=np.int64).tobytes()


def _everything_the_sampler_returns(train, seed: int, epochs: int = 2) -> list:
    """Every block the trainer would read in `epochs` epochs: sampler ids mapped through train[i]."""
    sampler = GlobalBatchSampler.for_dataset(train, seed=seed)
    ids = np.concatenate([sampler.next_global_batch(7) for _ in range(-(-epochs * len(train) // 7))])
    assert ids.min() >= 0 and ids.max() < len(train)
    return [train[int(i)] for i in ids]


@pytest.mark.parametrize("blend", [False, True], ids=["one-dataset", "blend"])
def test_heldout_blocks_never_reach_the_training_sampler(tiny_dataset, second_dataset, minilm_tokenizer, blend):
    cfg = TrainConfig(data=[tiny_dataset] + ([second_dataset] if blend else []), eval_heldout_docs=10, seed=3)
    data = load_data(cfg, minilm_tokenizer)
    ds = IndexedDataset(tiny_dataset)
    first, expected = heldout_blocks(ds, 10)
    assert len(data.heldout) == len(expected) == len(ds) - first > 0
    for got, want in zip(data.heldout, expected):
        np.testing.assert_array_equal(got, want)
    heldout = {_key(b) for b in data.heldout}
    train_side = {_key(ds[i]) for i in range(first)}
    assert not heldout & train_side, "fixture problem: a held-out block is duplicated in the training part"
    if blend:
        other = IndexedDataset(second_dataset)
        assert not heldout & {_key(other[i]) for i in range(len(other))}, "fixture problem: shared text"
    seen = _everything_the_sampler_returns(data.train, seed=cfg.seed)
    returned = {_key(b) for b in seen}
    assert not returned & heldout, f"{len(returned & heldout)} held-out blocks reach training"
    # and training still sees all the other blocks of the first dataset
    assert train_side <= returned
    if not blend:
        assert len(data.train) == first and len(data.train_sizes) == first


_CHILD = """
import hashlib, json, sys
import numpy as np
from retromae_ds.data.indexed import IndexedDataset
from retromae_ds.data.heldout import heldout_blocks, heldout_queries
first, blocks = heldout_blocks(IndexedDataset(sys.argv[1]), int(sys.argv[2]))
queries, targets = heldout_queries(blocks, seed=int(sys.argv[3]))
h = hashlib.sha256()
for q, t in zip(queries, targets):
    h.update(np.asarray(q, dtype=np.int64).tobytes() + b"|" + np.asarray(t, dtype=np.int64).tobytes() + b";")
print(json.dumps({"first": first, "n": len(queries), "digest": h.hexdigest()}))
"""


def _digest_here(prefix: str, docs: int, seed: int) -> dict:
    first, blocks = heldout_blocks(IndexedDataset(prefix), docs)
    queries, targets = heldout_queries(blocks, seed=seed)
    h = hashlib.sha256()
    for q, t in zip(queries, targets):
        h.update(np.asarray(q, dtype=np.int64).tobytes() + b"|" + np.asarray(t, dtype=np.int64).tobytes() + b";")
    return {"first": first, "n": len(queries), "digest": h.hexdigest()}


def test_heldout_queries_are_identical_across_processes(tiny_dataset):
    """Two fresh interpreters (different hash seeds) cut the same held-out blocks into the same
    queries and targets as this process: nothing depends on process state or caches."""
    outputs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, "-c", _CHILD, tiny_dataset, "10", "7"], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        outputs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    here = _digest_here(tiny_dataset, 10, 7)
    assert outputs[0] == outputs[1] == here
    assert here["n"] > 0
    assert _digest_here(tiny_dataset, 10, 8)["digest"] != here["digest"]  # the seed does matter
