"""Which samples each rank trains on, in an order that survives restarts with a different world size.

The order is defined globally, once, and only by (seed, epoch): epoch e is the permutation
``numpy.random.default_rng([seed, e]).permutation(num_samples)``. Training consumes that sequence
one global batch at a time; the global batch is then cut into micro-batches for the ranks and
accumulation steps (:func:`micro_batch_indices`). So the state that resumes the data is two integers,
(epoch, samples consumed in the epoch), and it means the same thing for 1, 2 or 3 ranks: a resumed job
continues exactly where the old one stopped, whatever its rank count, and no sample is repeated or
skipped. Epochs are never truncated: a global batch that runs past the end of an epoch takes the rest
from the next epoch's permutation.
"""

from __future__ import annotations

import numpy as np

from retromae_ds.errors import UserError


class GlobalBatchSampler:
    """Hands out the global sample order batch by batch; ``state_dict`` makes it resumable."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.consumed_in_epoch = 0
        self._cached_epoch = -1
        self._cached_order = np.zeros(0, np.int64)

    @property
    def total_consumed(self) -> int:
        return self.epoch * self.num_samples + self.consumed_in_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The full sample order of one epoch (cached: one permutation in memory at a time)."""
        if epoch != self._cached_epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._cached_epoch, self._cached_order = epoch, order.astype(np.int64)
        return self._cached_order

    def next_global_batch(self, n: int) -> np.ndarray:
        """The next ``n`` sample indices, continuing into the next epoch if this one runs out."""
        if n < 1:
            raise ValueError(f"global batch size must be positive, got {n}")
        parts = []
        while n:
            take = min(n, self.num_samples - self.consumed_in_epoch)
            order = self.epoch_order(self.epoch)
            parts.append(order[self.consumed_in_epoch:self.consumed_in_epoch + take])
            self.consumed_in_epoch += take
            n -= take
            if self.consumed_in_epoch == self.num_samples:
                self.epoch += 1
                self.consumed_in_epoch = 0
        return np.concatenate(parts)

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "consumed_in_epoch": self.consumed_in_epoch,
                "total_consumed": self.total_consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the sample order must be the one that was saved."""
        if int(state["num_samples"]) != self.num_samples:
            raise UserError(
                f"the checkpoint's data position was saved for a dataset of {state['num_samples']} "
                f"training samples, but the dataset now has {self.num_samples}: the sample order would "
                f"differ, so resuming would repeat and skip samples. Resume with the same prepared dataset "
                f"and the same evaluation hold-out, or start a new run.")
        for key, current in (("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != current:
                raise UserError(
                    f"the checkpoint's data order used {key}={state[key]!r} but this run has "
                    f"{key}={current!r}; set it back to {state[key]!r} to resume, or start a new run.")
        epoch, consumed = int(state["epoch"]), int(state["consumed_in_epoch"])
        if epoch < 0 or not 0 <= consumed < self.num_samples:
            raise UserError(f"the checkpoint's data position (epoch {epoch}, {consumed} consumed) is "
                            f"impossible for {self.num_samples} samples; the checkpoint is damaged.")
        self.epoch, self.consumed_in_epoch = epoch, consumed


def micro_batch_indices(global_batch: np.ndarray, micro_batch_size: int, world_size: int, rank: int,
                        accum_step: int) -> np.ndarray:
    """The slice of a global batch that ``rank`` trains on at accumulation step ``accum_step``.

    The global batch is cut into ``world_size * grad_accum`` consecutive micro-batches; number
    ``accum_step * world_size + rank`` belongs to (rank, accum_step). So 1 rank x 2 accumulation
    steps and 2 ranks x 1 step see the same micro-batches.
    """
    per_step = micro_batch_size * world_size
    if micro_batch_size < 1 or world_size < 1 or len(global_batch) % per_step:
        raise ValueError(f"a global batch of {len(global_batch)} does not split into micro-batches of "
                         f"{micro_batch_size} on {world_size} ranks")
    grad_accum = len(global_batch) // per_step
    if not 0 <= rank < world_size or not 0 <= accum_step < grad_accum:
        raise ValueError(f"rank {rank} / accumulation step {accum_step} outside {world_size} ranks x "
                         f"{grad_accum} steps")
    m = accum_step * world_size + rank
    return global_batch[m * micro_batch_size:(m + 1) * micro_batch_size]
