"""Micro-batches made on a background thread, one step ahead of the device.

What the host does for a micro-batch: read its blocks from the memory-mapped dataset (page faults on a
cold file), stack them into a padded array, plan the masks (`MaskGenerator.plan`, numpy) and page-lock
the result for an asynchronous copy. On a GPU, every millisecond of that spent on the training thread
is a millisecond it does not launch kernels, so the loader does it on one worker thread while the
current step runs. The training thread then only copies (non-blocking) and launches.

Which samples come next is still the trainer's decision (the sampler, on the training thread): the
loader is handed the indices of a global batch, so the sampler's position, which checkpoints store,
never counts work that was prepared ahead but not trained on. Masks are drawn on the device by the
training thread, seeded by (seed, step, micro-batch), so loading ahead changes no result.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from retromae_ds.data.masking import BatchPlan, MaskGenerator, collate_blocks
from retromae_ds.data.sampler import micro_batch_indices


@dataclass
class MicroBatch:
    tokens: torch.Tensor   # [B, Lmax] int64 block ids without specials (page-locked when pinning)
    lengths: torch.Tensor  # [B] int64
    plan: BatchPlan        # shapes and bounds of the mask draw, known on the host
    real_tokens: int       # sum(lengths + 2): the positions that hold a token ([CLS] and [SEP] included)

    @property
    def computed_tokens(self) -> int:
        """The positions the model computes: [B, Lmax + 2], padding included."""
        return self.tokens.shape[0] * (self.tokens.shape[1] + 2)

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens.to(device, non_blocking=True), self.lengths.to(device, non_blocking=True)


class MicroBatchLoader:
    """`submit(global_batch)` -> a future of this rank's micro-batches of that step, in order.

    `block_cap`: the most tokens per block (max_seq_len - 2); `static_width`: pad every batch to it
    (one shape for `torch.compile`) instead of to the longest block, with the sequence ([CLS] + block +
    [SEP]) rounded up to a multiple of `pad_multiple`: 8 on accelerators (aligned shapes for their
    matrix units), 1 on the CPU, where alignment gains nothing and each padding position costs its share.
    """

    def __init__(self, dataset, masker: MaskGenerator, pad_id: int, block_cap: int, micro_batch_size: int,
                 world_size: int, rank: int, grad_accum: int, pin: bool = False, static_width: bool = False,
                 pad_multiple: int = 8) -> None:
        self.dataset, self.masker, self.pad_id, self.block_cap = dataset, masker, pad_id, block_cap
        self.micro_batch_size, self.world_size, self.rank, self.grad_accum = micro_batch_size, world_size, rank, grad_accum
        self.pin, self.static_width, self.pad_multiple = pin, static_width, pad_multiple
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retromae-loader")

    def submit(self, global_batch: np.ndarray) -> Future:
        return self._pool.submit(self.load, global_batch)

    def load(self, global_batch: np.ndarray) -> list[MicroBatch]:
        """This rank's micro-batches of one step (what the worker runs; callable directly too)."""
        out = []
        for k in range(self.grad_accum):
            ids = micro_batch_indices(global_batch, self.micro_batch_size, self.world_size, self.rank, k)
            blocks = [self.dataset[int(i)][:self.block_cap] for i in ids]
            multiple = self.block_cap + 2 if self.static_width else self.pad_multiple
            tokens, lengths = collate_blocks(blocks, self.pad_id, pad_to_multiple_of=multiple, max_tokens=self.block_cap)
            plan = self.masker.plan(tokens.numpy(), lengths.numpy())
            real = int(lengths.sum()) + 2 * len(blocks)
            if self.pin:
                tokens, lengths = tokens.pin_memory(), lengths.pin_memory()
            out.append(MicroBatch(tokens, lengths, plan, real))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
