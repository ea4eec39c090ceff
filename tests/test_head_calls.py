"""How often the MLM head is called, and on how many rows (issue 27, item 1).

--ce-chunk-size bounds the vocabulary logits that exist at once by projecting at most that many rows per
head call. Two things follow, checked here on a tiny in-process model:

- the bound holds in evaluation too (`cls_gain` runs the heads under no_grad): no head call ever gets
  more rows than the chunk, in training or in evaluation;
- with the run's bounds set (`bound_head_calls`, what the trainer does), the number of head calls per
  forward depends only on the micro-batch size, the block length and the chunk size, never on the
  batch: under ZeRO-3 each call all-gathers the vocabulary projection, a collective every rank must
  make equally often, and length-grouped batches differ in width from rank to rank. Empty trailing
  chunks change nothing: the loss and every gradient equal the unchunked ones.

The 2-rank ZeRO-3 runs of the same thing are in tests/test_zero_failures.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from retromae_ds.data.masking import collate_blocks, mask_rng
from retromae_ds.evaluate import cls_gain
from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining
from tests.helpers.masking_data import synthetic_block, synthetic_generator
from tests.helpers.tiny_models import grads, tiny_bert

CHUNK = 16
BLOCK = 40  # the run's block length (max_seq_len): the widest batch below is 22 + 2


class HeadCalls:
    """Records the rows of every call of a head module (a forward pre-hook on each part)."""

    def __init__(self, model: RetroMAEForPretraining):
        self.rows: list[int] = []
        names = model._head_names
        self.handles = [getattr(model.lm, names[0]).register_forward_pre_hook(self._record)]

    def _record(self, module, args):
        hidden = args[0]
        self.rows.append(int(hidden.reshape(-1, hidden.shape[-1]).shape[0]))

    def take(self) -> list[int]:
        rows, self.rows = self.rows, []
        return rows


def blocks_of(lengths, seed: int = 0) -> list[np.ndarray]:
    rng = random.Random(seed)
    return [np.array(synthetic_block([rng.choice([1, 1, 2]) for _ in range(n)], rng)[:n]) for n in lengths]


def masked(lengths, seed: int = 0, static: bool = False) -> dict:
    tokens, lens = collate_blocks(blocks_of(lengths, seed), 0, pad_to_multiple_of=None)
    generator = synthetic_generator()
    generator.sync_free = static
    plan = generator.plan(tokens.numpy(), lens.numpy()) if static else None
    return generator(tokens, lens, mask_rng(seed, 0, 0, "cpu"), plan=plan)


def model_for(objective: str, chunk: int | None, bounded: bool) -> RetroMAEForPretraining:
    torch.manual_seed(0)
    model = RetroMAEForPretraining(tiny_bert(), RetroMAEConfig(objective=objective, ce_chunk_size=chunk))
    if bounded:
        model.bound_head_calls(BLOCK, 0.3)
    return model


@pytest.mark.parametrize("objective", ["retromae", "dupmae"])
def test_cls_gain_never_projects_more_rows_than_the_chunk(objective):
    model = model_for(objective, CHUNK, bounded=True)
    calls = HeadCalls(model)
    blocks = blocks_of([22, 20, 18, 22, 15, 21], seed=1)
    metrics, why_not = cls_gain(model, blocks, synthetic_generator(), seed=3, batch_size=4)
    assert why_not is None and np.isfinite(metrics["cls_gain"])
    rows = calls.take()
    assert rows and max(rows) <= CHUNK, rows
    # and the number is the unchunked one
    same, _ = cls_gain(model_for(objective, None, bounded=False), blocks, synthetic_generator(), seed=3, batch_size=4)
    assert same["cls_gain"] == pytest.approx(metrics["cls_gain"], abs=1e-5)
    assert same["heldout/decoder_loss"] == pytest.approx(metrics["heldout/decoder_loss"], rel=1e-5)


@pytest.mark.parametrize("static", [False, True], ids=["cpu-rows", "static-rows"])
@pytest.mark.parametrize("objective", ["retromae", "dupmae"])
def test_head_calls_per_forward_do_not_depend_on_the_batch(objective, static):
    """Two ranks' micro-batches of one step under --group-by-length: one of short samples, one of long."""
    model = model_for(objective, CHUNK, bounded=True)
    model.train()
    calls = HeadCalls(model)
    counts = []
    for lengths in ([6, 5, 7, 6], [22, 21, 22, 20]):
        out = model(**masked(lengths, static=static))
        forward_rows = calls.take()
        out.loss.backward()  # the chunks' recomputation in backward runs as often on every rank too
        backward_rows = calls.take()
        counts.append((len(forward_rows), len(backward_rows)))
        assert max(forward_rows + backward_rows) <= CHUNK, (forward_rows, backward_rows)
    assert counts[0] == counts[1], counts
    # without the bounds the short batch needs fewer calls: what broke ZeRO-3
    free = model_for(objective, CHUNK, bounded=False)
    free_counts = []
    for lengths in ([6, 5, 7, 6], [22, 21, 22, 20]):
        calls = HeadCalls(free)
        free(**masked(lengths, static=static))
        free_counts.append(len(calls.take()))
    assert free_counts[0] < free_counts[1], free_counts


@pytest.mark.parametrize("static", [False, True], ids=["cpu-rows", "static-rows"])
@pytest.mark.parametrize("objective", ["retromae", "dupmae"])
def test_empty_trailing_chunks_change_neither_loss_nor_gradients(objective, static):
    batch = masked([9, 4, 8, 7], seed=2, static=static)
    results = []
    for chunk, bounded in ((None, False), (CHUNK, True)):
        model = model_for(objective, chunk, bounded)
        model.train()
        torch.manual_seed(5)  # dropout is 0; seeded anyway
        out = model(**batch)
        out.loss.backward()
        results.append((out, grads(model)))
    (plain, plain_grads), (chunked, chunked_grads) = results
    for key in ("loss", "encoder_loss", "decoder_loss", "bow_loss", "encoder_accuracy"):
        a, b = getattr(plain, key), getattr(chunked, key)
        if a is None:
            assert b is None
            continue
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (key, a, b)
    assert plain_grads.keys() == chunked_grads.keys()
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], chunked_grads[name], atol=1e-6, rtol=1e-4), name


def test_bounds_that_the_batch_exceeds_still_give_the_right_loss():
    """A bound below the batch (never set by the trainer) costs extra calls, never a wrong loss."""
    batch = masked([22, 21, 22, 20], seed=4)
    plain = model_for("retromae", None, bounded=False)(**batch).loss
    model = model_for("retromae", CHUNK, bounded=False)
    model.bound_head_calls(8, 0.3)
    assert torch.allclose(model(**batch).loss, plain, atol=1e-5)
