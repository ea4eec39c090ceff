"""`cls_gain` (retromae_ds.evaluate.cls_gain): the decoder's loss with another sample's [CLS] vector minus
its loss with its own, in nats per token, on a tiny in-process RetroMAE model over the synthetic vocabulary.

A model whose [CLS] vector is the same for every passage reads 0; a randomly initialised decoder reads
about 0; one trained on a few passages (so that its decoder learns to read the sentence vector) reads well
above 0. The number is deterministic (fixed masks, eval mode), the model's train/eval modes survive the
call, and `decoder_loss` is forward()'s decoder path. The trainer's logging of `cls_gain` is checked on
the real runs of tests/test_engine.py (metrics.jsonl, the final line, mlm's note).
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from retromae_ds.data.masking import collate_blocks, mask_rng
from retromae_ds.evaluate import cls_gain
from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining
from tests.helpers.masking_data import synthetic_block, synthetic_generator
from tests.helpers.tiny_models import tiny_bert

TRAIN_STEPS = 120


def passages(n: int = 8, length: int = 24, seed: int = 0) -> list[np.ndarray]:
    rng = random.Random(seed)
    return [np.array(synthetic_block([rng.choice([1, 1, 2]) for _ in range(length)], rng)[:length])
            for _ in range(n)]


def train(model: RetroMAEForPretraining, blocks, steps: int = TRAIN_STEPS, lr: float = 1e-2) -> None:
    """Fresh masks every step on a few fixed passages: the decoder learns that [CLS] names the passage."""
    generator = synthetic_generator()
    tokens, lengths = collate_blocks(blocks, 0, pad_to_multiple_of=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only wait on each other on a busy machine
    try:
        for step in range(steps):
            loss = model(**generator(tokens, lengths, mask_rng(0, step, 0, "cpu"))).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)


def gain(model, blocks, **kw) -> float:
    metrics, why_not = cls_gain(model, blocks, synthetic_generator(), **{"seed": 3, "batch_size": 4, **kw})
    assert why_not is None, why_not
    return metrics["cls_gain"]


@pytest.fixture(scope="module")
def models():
    """{"untrained", "trained"}: the same tiny model (dropout 0.1) before and after TRAIN_STEPS steps."""
    torch.manual_seed(0)
    model = RetroMAEForPretraining(tiny_bert(dropout=0.1))
    untrained = copy.deepcopy(model)
    train(model, passages())
    return {"untrained": untrained, "trained": model}


def test_trained_decoder_reads_the_cls_vector(models):
    blocks = passages()
    before, after = gain(models["untrained"], blocks), gain(models["trained"], blocks)
    print(f"cls_gain untrained {before:.6f}, after {TRAIN_STEPS} steps {after:.4f} nats/token")
    assert abs(before) < 0.01, before  # a random decoder layer hardly uses [CLS]
    assert after > 0.5, after          # measured 2.35 nats/token after 120 steps (CPU)


def test_a_cls_vector_that_is_the_same_for_every_passage_gains_nothing(models):
    """The trained decoder, fed an encoder whose last LayerNorm has zero weight: every [CLS] vector is its
    bias, the same for every passage, so swapping them changes nothing (the bottleneck carries nothing)."""
    model = copy.deepcopy(models["trained"])
    with torch.no_grad():
        model.lm.bert.encoder.layer[-1].output.LayerNorm.weight.zero_()
    assert abs(gain(model, passages())) < 1e-6


def test_same_weights_same_number_and_modes_restored(models):
    model = copy.deepcopy(models["trained"]).train()  # dropout 0.1: a call in train mode would vary
    model.c_head.eval()                               # a mixed state, to see that each module's mode survives
    blocks = passages()
    first = gain(model, blocks)
    assert gain(model, blocks) == first
    assert model.training and model.lm.training and not model.c_head.training
    assert all(not m.training for m in model.c_head.modules())
    # the masks depend on the seed (and only on it): another seed draws other masks
    assert gain(model, blocks, seed=4) != first


def test_batches_of_one_are_never_scored(models):
    """Rolling within a batch of one gives a sample its own [CLS]: a last batch of one joins the one before,
    and batch_size 1 is raised to 2."""
    model = copy.deepcopy(models["trained"])
    sizes = []
    original = model.decoder_loss

    def recording(**inputs):
        sizes.append(inputs["decoder_input_ids"].shape[0])
        return original(**inputs)

    model.decoder_loss = recording
    gain(model, passages(5), batch_size=2)
    assert sizes == [2, 3]
    sizes.clear()
    assert gain(model, passages(3), batch_size=1) > 0.5
    assert sizes == [3]
    sizes.clear()
    gain(model, passages(), max_blocks=6)  # at most max_blocks blocks
    assert sorted(sizes) == [2, 4]


def test_gain_is_per_decoder_token_over_all_batches(models):
    """(summed loss with the neighbour's [CLS] - with its own) / decoder tokens, summed over every batch
    (batches of unequal token counts: not a mean of per-batch means)."""
    model = copy.deepcopy(models["trained"])
    seen = []
    original = model.decoder_loss

    def recording(**inputs):
        sums, count = original(**inputs)
        seen.append((sums.tolist(), int(count)))
        return sums, count

    model.decoder_loss = recording
    blocks = [block[:length] for block, length in zip(passages(), (24, 5, 20, 7, 24, 3, 11, 16))]
    value = gain(model, blocks, batch_size=3)
    assert len(seen) == 3 and len({count for _, count in seen}) > 1
    own, rolled = (sum(sums[k] for sums, _ in seen) for k in (0, 1))
    assert value == pytest.approx((rolled - own) / sum(count for _, count in seen), rel=1e-9)


def test_does_not_apply_without_a_decoder_or_a_second_block():
    mlm = RetroMAEForPretraining(tiny_bert(), RetroMAEConfig(objective="mlm"))
    metrics, why_not = cls_gain(mlm, passages(), synthetic_generator())
    assert metrics == {} and "mlm" in why_not
    retromae = RetroMAEForPretraining(tiny_bert())
    metrics, why_not = cls_gain(retromae, passages(1), synthetic_generator())
    assert metrics == {} and "at least 2" in why_not
    dupmae = RetroMAEForPretraining(tiny_bert(), RetroMAEConfig(objective="dupmae"))
    metrics, why_not = cls_gain(dupmae, passages(), synthetic_generator())
    assert why_not is None and np.isfinite(metrics["cls_gain"])


@pytest.mark.parametrize("fast_heads", [True, False])
def test_decoder_loss_is_forwards_decoder_path(models, fast_heads):
    """roll_cls 0 is forward()'s decoder loss (times its tokens); roll_cls 1 is forward() on a batch whose
    sample i has sample i + 1's encoder input (so its decoder gets i + 1's [CLS]); the batch size is a turn.
    On the trained model, whose decoder reads [CLS], so that each pairing gives its own loss."""
    model = copy.deepcopy(models["trained"]).eval()
    model.config.fast_heads = fast_heads
    tokens, lengths = collate_blocks(passages()[:3] + [passages()[3][:13]], 0, pad_to_multiple_of=None)
    batch = synthetic_generator()(tokens, lengths, mask_rng(0, 0, 0, "cpu"))
    swapped = {**batch, **{k: batch[k].roll(-1, dims=0)
                           for k in ("encoder_input_ids", "encoder_attention_mask", "encoder_labels")}}
    with torch.no_grad():
        own, other = model(**batch), model(**swapped)
        sums, count = model.decoder_loss(**batch, roll_cls=(0, 1, 4, 3))
    assert int(count) == int(own.decoder_tokens) == int(lengths.sum())
    assert (sums[0] / count).item() == pytest.approx(own.decoder_loss.item(), rel=1e-6)
    assert (sums[1] / count).item() == pytest.approx(other.decoder_loss.item(), rel=1e-6)
    assert sums[2].item() == pytest.approx(sums[0].item(), rel=1e-6)
    assert abs(sums[3].item() - sums[1].item()) > 0.01 * sums[1].item()  # -1 is another pairing than +1
