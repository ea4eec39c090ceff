"""How much of a batch is real tokens: the padding efficiency a dataset will train at, known before training.

A micro-batch is padded to its longest block (plus [CLS] and [SEP]), rounded up to a multiple of
`pad_multiple` (8 on accelerators, 1 on the CPU; see `loader.MicroBatchLoader`). Its efficiency is real
positions / computed positions = sum(n_i + 2) / (B * (width + 2)). This module replays the trainer's own
sampler (random or length-grouped order) over a dataset's block sizes, so `retromae-ds info PREFIX`
reports the figure the run's `padding_efficiency` metric will show.
"""

from __future__ import annotations

import numpy as np

from retromae_ds.data.masking import padded_width
from retromae_ds.data.sampler import GlobalBatchSampler, LengthGrouping


def batch_positions(lengths: np.ndarray, pad_multiple: int = 1, max_tokens: int | None = None) -> tuple[int, int]:
    """(real, computed) token positions of one micro-batch of blocks of `lengths` (specials excluded),
    padded as `collate_blocks` pads it (`max_tokens`: its cap on the rounding)."""
    width = padded_width(int(lengths.max()), pad_multiple, max_tokens) + 2
    return int(lengths.sum()) + 2 * len(lengths), len(lengths) * width


def expected_efficiency(sizes: np.ndarray, micro_batch_size: int, block_cap: int, *, global_batch: int | None = None,
                        group_window: int = 0, pad_multiple: int = 1, seed: int = 42,
                        max_global_batches: int = 4000) -> float:
    """Padding efficiency over the first `max_global_batches` global batches of the sampler's order.

    `global_batch`: samples per optimizer step (micro-batch x ranks x accumulation; default one
    micro-batch); `group_window` > 0: length-grouped order with windows of that many global batches
    (`--group-by-length --group-window N`), else today's random order. Batches are padded as
    `collate_blocks` pads them (rounding to `pad_multiple` capped at the block capacity).
    """
    sizes = np.minimum(np.asarray(sizes), block_cap)
    global_batch = global_batch or micro_batch_size
    if global_batch % micro_batch_size:
        raise ValueError(f"a global batch of {global_batch} does not split into micro-batches of {micro_batch_size}")
    grouping = LengthGrouping(batch=global_batch, window=group_window) if group_window > 0 else None
    sampler = GlobalBatchSampler(len(sizes), seed, grouping=grouping, sizes=sizes if grouping else None)
    steps = max(1, min(max_global_batches, -(-len(sizes) // global_batch)))
    real = computed = 0
    for _ in range(steps):
        batch = sizes[sampler.next_global_batch(global_batch)]
        for micro in batch.reshape(-1, micro_batch_size):
            r, c = batch_positions(micro, pad_multiple, max_tokens=block_cap)
            real, computed = real + r, computed + c
    return real / computed
