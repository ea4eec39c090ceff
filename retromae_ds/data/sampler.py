"""Which samples each rank trains on, in an order that survives restarts with a different world size.

The order is defined globally, once, and only by (seed, epoch): epoch e is the permutation
``numpy.random.default_rng([seed, e]).permutation(num_samples)``. Training consumes that sequence
one global batch at a time; the global batch is then cut into micro-batches for the ranks and
accumulation steps (:func:`micro_batch_indices`). So the state that resumes the data is two integers,
(epoch, samples consumed in the epoch), and it means the same thing for 1, 2 or 3 ranks: a resumed job
continues exactly where the old one stopped, whatever its rank count, and no sample is repeated or
skipped. Epochs are never truncated: a global batch that runs past the end of an epoch takes the rest
from the next epoch's permutation.

A blend (:class:`retromae_ds.data.indexed.BlendedDataset`) decides which blocks make up each epoch
(its weights), so the sampler asks it for the blocks at the permuted positions of that epoch:
build the sampler with :meth:`GlobalBatchSampler.for_dataset`. The state stays (epoch, consumed).

Length grouping (``--group-by-length``, :class:`LengthGrouping`): blocks are packed per document, so a
corpus of short documents has short blocks, and a batch padded to its longest member computes mostly
padding. With grouping, each epoch's permutation is cut into windows of ``window`` global batches;
within a window the samples are sorted by length (ties keep their random order), cut into global
batches, and those batches are shuffled. So a global batch holds samples of similar length (every
rank's micro-batches of a step cost about the same: no straggler at the gradient reduce), the window's
batches come in random order, and the epoch is still a permutation defined by (seed, epoch) alone:
the state that resumes it is still (epoch, consumed). The batches are cut for ``grouping.batch``, the
run's first global batch (kept across resumes, like the LR schedule's), so a resume with another world
size continues the same order: every sample still once per epoch, batches merely cut elsewhere.

Memory: only the current epoch's permutation is held, as int32 while the count fits (4 bytes per
sample: 400 MB at 100M samples). numpy fills an int32 array with exactly the permutation it would
give as int64, so the order, and with it every saved position, is unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from retromae_ds.errors import UserError

INT32_LIMIT = 2**31 - 1
GROUPING_TAG = 0x6C656E  # a third seed word, so batch shuffles never reuse the epoch permutation's stream


@dataclass(frozen=True)
class LengthGrouping:
    """Samples grouped by length within windows of ``window`` global batches of ``batch`` samples."""

    batch: int   # the global batch the groups are cut for (the run's first)
    window: int  # global batches per window

    def __post_init__(self) -> None:
        if self.batch < 1 or self.window < 1:
            raise ValueError(f"length grouping needs a positive batch and window, got {self}")


def seeded_permutation(seed, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """``default_rng(seed).permutation(n)``, built in int32 when ``n`` allows (same values, half the memory).

    Generator.permutation(n) is arange(n) shuffled in place, and the shuffle draws the same swaps for
    any item size, so shuffling an int32 arange yields the identical permutation. ``out`` (n items)
    receives it; it is filled in chunks so that no n-sized temporary exists.
    """
    if out is None:
        out = np.empty(n, np.int32 if n <= INT32_LIMIT else np.int64)
    if len(out) != n:
        raise ValueError(f"out has {len(out)} items, the permutation {n}")
    for start in range(0, n, 1 << 22):
        stop = min(n, start + (1 << 22))
        out[start:stop] = np.arange(start, stop, dtype=out.dtype)
    np.random.default_rng(seed).shuffle(out)
    return out


def group_window(positions: np.ndarray, lengths: np.ndarray, batch: int, rng: np.random.Generator) -> None:
    """One window, in place: ``positions`` sorted by ``lengths`` (stable: equal lengths keep the
    permutation's random order), cut into batches of ``batch``, the whole batches shuffled by ``rng``; a
    final partial batch stays last (the next epoch completes it)."""
    positions[:] = positions[np.argsort(lengths, kind="stable")]
    whole = len(positions) // batch
    batches = positions[:whole * batch].reshape(whole, batch)
    positions[:whole * batch] = batches[rng.permutation(whole)].reshape(-1)


class GlobalBatchSampler:
    """Hands out the global sample order batch by batch; ``state_dict`` makes it resumable.

    ``blend``: an object with ``epoch_samples(epoch, positions)`` (a BlendedDataset) that turns the
    positions of an epoch into the ids the trainer reads; without it, positions are the ids.
    ``grouping`` (with ``sizes``, the length of every id): group each epoch's samples by length.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, blend=None,
                 grouping: LengthGrouping | None = None, sizes=None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if blend is not None and blend.samples_per_epoch != num_samples:
            raise ValueError(f"num_samples {num_samples} differs from the blend's {blend.samples_per_epoch} "
                             f"samples per epoch")
        if grouping is not None and sizes is None:
            raise ValueError("length grouping needs the sizes of the samples")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.blend = blend
        self.grouping, self.sizes = grouping, sizes
        self.epoch = 0
        self.consumed_in_epoch = 0
        self._cached_epoch = -1
        self._cached_positions = np.zeros(0, np.int32)
        self._peeked: tuple | None = None  # ((epoch, consumed, n), ids) of the last peek

    @classmethod
    def for_dataset(cls, dataset, seed: int, shuffle: bool = True,
                    grouping: LengthGrouping | None = None) -> "GlobalBatchSampler":
        """The sampler for what the trainer reads: a blend's epochs come from its weights."""
        sizes = dataset.sizes if grouping is not None else None
        if hasattr(dataset, "epoch_samples"):
            return cls(dataset.samples_per_epoch, seed, shuffle, blend=dataset, grouping=grouping, sizes=sizes)
        return cls(len(dataset), seed, shuffle, grouping=grouping, sizes=sizes)

    @property
    def total_consumed(self) -> int:
        return self.epoch * self.num_samples + self.consumed_in_epoch

    def _positions(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s permutation of positions (cached: one epoch in memory at a time)."""
        if epoch != self._cached_epoch:
            self._cached_positions = np.zeros(0, np.int32)  # free the old epoch before building the new
            if self.shuffle:
                positions = seeded_permutation([self.seed, epoch], self.num_samples)
            else:
                positions = np.arange(self.num_samples)
            if self.grouping is not None:
                positions = self._grouped(positions, epoch)
            self._cached_epoch, self._cached_positions = epoch, positions
        return self._cached_positions

    def _grouped(self, positions: np.ndarray, epoch: int) -> np.ndarray:
        """The epoch's positions grouped by length, window by window (see the module docstring).

        Windows start at the epoch's first whole global batch: the positions before it complete the
        batch that began at the end of the previous epoch, and keep their place. Lengths are looked up
        one window at a time (no epoch-sized temporary)."""
        batch, size = self.grouping.batch, self.grouping.batch * self.grouping.window
        offset = min((-epoch * self.num_samples) % batch, self.num_samples)
        for w, start in enumerate(range(offset, len(positions), size)):
            part = positions[start:start + size]
            ids = self.blend.epoch_samples(epoch, part) if self.blend is not None else part
            group_window(part, self.sizes[ids], batch, np.random.default_rng([self.seed, epoch, w, GROUPING_TAG]))
        return positions

    def _ids(self, epoch: int, start: int, stop: int) -> np.ndarray:
        positions = self._positions(epoch)[start:stop]
        if self.blend is not None:
            return self.blend.epoch_samples(epoch, positions)
        return positions.astype(np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The full sample order of one epoch (a new array of num_samples ids; for inspection)."""
        return self._ids(epoch, 0, self.num_samples)

    def peek_global_batch(self, n: int) -> np.ndarray:
        """What ``next_global_batch(n)`` will return, without consuming it: the trainer loads the next
        step's blocks ahead while the position (what a checkpoint saves) still counts trained samples only."""
        key = (self.epoch, self.consumed_in_epoch, n)
        if self._peeked is None or self._peeked[0] != key:
            epoch, consumed = self.epoch, self.consumed_in_epoch
            try:
                ids = self.next_global_batch(n)
            finally:
                self.epoch, self.consumed_in_epoch = epoch, consumed
            self._peeked = (key, ids)
        return self._peeked[1]

    def next_global_batch(self, n: int) -> np.ndarray:
        """The next ``n`` sample indices, continuing into the next epoch if this one runs out."""
        if n < 1:
            raise ValueError(f"global batch size must be positive, got {n}")
        if self._peeked is not None and self._peeked[0] == (self.epoch, self.consumed_in_epoch, n):
            ids, self._peeked = self._peeked[1], None
            self._advance(n)
            return ids
        parts = []
        while n:
            take = min(n, self.num_samples - self.consumed_in_epoch)
            parts.append(self._ids(self.epoch, self.consumed_in_epoch, self.consumed_in_epoch + take))
            self.consumed_in_epoch += take
            n -= take
            if self.consumed_in_epoch == self.num_samples:
                self.epoch += 1
                self.consumed_in_epoch = 0
        return np.concatenate(parts)

    def _advance(self, n: int) -> None:
        total = self.consumed_in_epoch + n
        self.epoch += total // self.num_samples
        self.consumed_in_epoch = total % self.num_samples

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "consumed_in_epoch": self.consumed_in_epoch,
                "total_consumed": self.total_consumed,
                "blend": self.blend.order_id if self.blend is not None else None,
                "grouping": asdict(self.grouping) if self.grouping is not None else None}

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
        current_blend = self.blend.order_id if self.blend is not None else None
        if "blend" in state and state["blend"] != current_blend:  # checkpoints before blends had no key
            raise UserError(
                f"the checkpoint's data order was saved for {_describe_blend(state['blend'])}, but this run "
                f"reads {_describe_blend(current_blend)}: the datasets, their sizes or --data-weights "
                f"changed, so resuming would repeat and skip samples. Resume with the same --data and "
                f"--data-weights, or start a new run.")
        current_grouping = asdict(self.grouping) if self.grouping is not None else None
        if state.get("grouping") != current_grouping:  # checkpoints before grouping had no key: none
            raise UserError(
                f"the checkpoint's data order was saved {_describe_grouping(state.get('grouping'))}, but this "
                f"run has {_describe_grouping(current_grouping)}: the order of the epoch would differ, so "
                f"resuming would repeat and skip samples. Resume with the checkpoint's --group-by-length and "
                f"--group-window, or start a new run.")
        epoch, consumed = int(state["epoch"]), int(state["consumed_in_epoch"])
        if epoch < 0 or not 0 <= consumed < self.num_samples:
            raise UserError(f"the checkpoint's data position (epoch {epoch}, {consumed} consumed) is "
                            f"impossible for {self.num_samples} samples; the checkpoint is damaged.")
        self.epoch, self.consumed_in_epoch = epoch, consumed
        self._peeked = None


def _describe_grouping(grouping) -> str:
    if not grouping:
        return "without length grouping"
    return (f"with length grouping (windows of {grouping['window']} global batches of {grouping['batch']} "
            f"samples)")


def _describe_blend(order_id) -> str:
    return f"the blend {order_id}" if order_id else "a single dataset (no blend)"


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
