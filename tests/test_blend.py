"""Blended datasets across epochs: every block of every dataset is reached in proportion to its
weight, the order is a function of the seeds, and resuming mid-epoch continues the same sequence."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from retromae_ds.data.indexed import BlendedDataset
from retromae_ds.data.sampler import GlobalBatchSampler, micro_batch_indices, seeded_permutation
from retromae_ds.errors import UserError


class Blocks:
    """A dataset of ``n`` blocks named (name, i) whose sizes are known without reading them."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n
        self.sizes = (np.arange(n) * 7919 % 61 + 1).astype(np.int32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.name, i)


def small_and_large(seed: int = 0) -> BlendedDataset:
    return BlendedDataset([Blocks("small", 100), Blocks("large", 900)], [0.5, 0.5], seed=seed)


def drawn(blend, sampler, epochs: int, batch: int = 96) -> list:
    """(name, block) of every sample the sampler hands out over ``epochs`` epochs, in order."""
    total = epochs * sampler.num_samples
    ids = np.concatenate([sampler.next_global_batch(batch) for _ in range(-(-total // batch))])[:total]
    return [blend[int(i)] for i in ids]


def test_every_block_is_reached_in_proportion_to_its_weight():
    blend = small_and_large()
    sampler = GlobalBatchSampler.for_dataset(blend, seed=3)
    assert sampler.num_samples == blend.samples_per_epoch == 1000
    items = drawn(blend, sampler, epochs=9)
    for epoch in range(9):
        names = collections.Counter(name for name, _ in items[epoch * 1000:(epoch + 1) * 1000])
        assert names == {"small": 500, "large": 500}  # the weights, exactly, in every epoch
    large_first_two = {i for name, i in items[:2000] if name == "large"}
    assert large_first_two == set(range(900))  # 500 + 500 draws walk on: all 900 blocks by epoch 2
    # Over 9 epochs each dataset's draws are spread evenly over its blocks: 4500 / 900 and 4500 / 100.
    per_block = collections.Counter(items)
    assert {per_block[("large", i)] for i in range(900)} == {5}
    assert {per_block[("small", i)] for i in range(100)} == {45}


def test_each_epoch_brings_other_blocks_of_a_down_sampled_dataset():
    blend = small_and_large()
    first, second = (set(blend.epoch_samples(e).tolist()) for e in (0, 1))
    large = set(range(100, 1000))  # ids of the large dataset's blocks
    assert len(first & large) == len(second & large) == 500
    assert len((first | second) & large) == 900


def test_ids_read_the_blocks_whose_sizes_the_trainer_counts():
    blend = small_and_large()
    ids = GlobalBatchSampler.for_dataset(blend, seed=0).next_global_batch(3000)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < len(blend)
    expected = [blend.datasets[0 if name == "small" else 1].sizes[i] for name, i in (blend[int(j)] for j in ids)]
    assert blend.sizes[ids].tolist() == expected


def test_order_is_a_function_of_the_seeds():
    a = drawn(small_and_large(seed=1), GlobalBatchSampler.for_dataset(small_and_large(seed=1), seed=5), 2)
    b = drawn(small_and_large(seed=1), GlobalBatchSampler.for_dataset(small_and_large(seed=1), seed=5), 2, batch=250)
    assert a == b
    other_sampler = drawn(small_and_large(seed=1), GlobalBatchSampler.for_dataset(small_and_large(seed=1), seed=6), 2)
    other_blend = drawn(small_and_large(seed=2), GlobalBatchSampler.for_dataset(small_and_large(seed=2), seed=5), 2)
    assert other_sampler != a and other_blend != a
    assert collections.Counter(other_sampler) == collections.Counter(a)  # the sampler seed only reorders


@pytest.mark.parametrize("resume_world_size", [1, 3])
def test_resume_mid_epoch_continues_the_same_sequence(resume_world_size):
    reference = GlobalBatchSampler.for_dataset(small_and_large(), seed=9)
    expected = np.concatenate([reference.next_global_batch(48) for _ in range(50)])  # 2.4 epochs

    first = GlobalBatchSampler.for_dataset(small_and_large(), seed=9)
    before = np.concatenate([first.next_global_batch(48) for _ in range(27)])  # ends mid epoch 1
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 1 and state["consumed_in_epoch"] == 296

    resumed = GlobalBatchSampler.for_dataset(small_and_large(), seed=9)  # a new process: rebuilt blend
    resumed.load_state_dict(state)
    after = []
    for _ in range(23):
        batch = resumed.next_global_batch(48)
        micro = 48 // (2 * resume_world_size)  # 2 accumulation steps on this many ranks
        after.append(np.concatenate([micro_batch_indices(batch, micro, resume_world_size, r, a)
                                     for a in range(2) for r in range(resume_world_size)]))
    assert np.concatenate([before, *after]).tolist() == expected.tolist()


def test_resume_refuses_a_changed_blend():
    state = GlobalBatchSampler.for_dataset(small_and_large(), seed=0).state_dict()
    reweighted = BlendedDataset([Blocks("small", 100), Blocks("large", 900)], [0.3, 0.7], seed=0)
    with pytest.raises(UserError, match="--data-weights"):
        GlobalBatchSampler.for_dataset(reweighted, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="single dataset"):
        GlobalBatchSampler(1000, seed=0).load_state_dict(state)
    plain_state = GlobalBatchSampler(1000, seed=0).state_dict()
    with pytest.raises(UserError, match="blend"):
        GlobalBatchSampler.for_dataset(small_and_large(), seed=0).load_state_dict(plain_state)
    legacy = {k: v for k, v in plain_state.items() if k != "blend"}  # saved before blends were epoch-aware
    GlobalBatchSampler(1000, seed=0).load_state_dict(legacy)


def test_a_single_dataset_keeps_the_plain_order():
    dataset = Blocks("only", 37)
    via_dataset = GlobalBatchSampler.for_dataset(dataset, seed=5)
    plain = GlobalBatchSampler(37, seed=5)
    assert via_dataset.blend is None
    assert via_dataset.next_global_batch(80).tolist() == plain.next_global_batch(80).tolist()


@pytest.mark.parametrize("n", [1, 2, 1000, 70_001])
def test_int32_permutation_is_numpys_permutation(n):
    ours = seeded_permutation([7, 3], n)
    assert ours.dtype == np.int32
    assert ours.tolist() == np.random.default_rng([7, 3]).permutation(n).tolist()
