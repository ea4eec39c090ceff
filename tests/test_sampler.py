"""The global sample order: no sample lost or repeated across ranks and epochs, and resuming with a
different number of ranks continues the same sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retromae_ds.data.sampler import GlobalBatchSampler, micro_batch_indices
from retromae_ds.errors import UserError


def train_steps(sampler, steps, micro_batch_size, world_size, grad_accum):
    """What a job with this shape reads: per step, the micro-batches of every (rank, accum step)."""
    seen = []
    for _ in range(steps):
        batch = sampler.next_global_batch(micro_batch_size * world_size * grad_accum)
        step = [micro_batch_indices(batch, micro_batch_size, world_size, rank, accum)
                for accum in range(grad_accum) for rank in range(world_size)]
        assert sorted(np.concatenate(step).tolist()) == sorted(batch.tolist())  # ranks cover the batch
        seen.append(np.concatenate([step[a * world_size + r] for a in range(grad_accum)
                                    for r in range(world_size)]))
    return np.concatenate(seen) if seen else np.zeros(0, np.int64)


def test_each_epoch_is_a_permutation_and_batches_cross_epochs():
    sampler = GlobalBatchSampler(10, seed=3)
    drawn = np.concatenate([sampler.next_global_batch(4) for _ in range(5)])  # 20 = two epochs
    assert sorted(drawn[:10].tolist()) == list(range(10))
    assert sorted(drawn[10:].tolist()) == list(range(10))
    assert drawn[:10].tolist() != drawn[10:].tolist()  # a fresh order per epoch
    assert sampler.epoch == 2 and sampler.consumed_in_epoch == 0 and sampler.total_consumed == 20


def test_order_depends_only_on_seed_and_epoch():
    a = GlobalBatchSampler(37, seed=5)
    b = GlobalBatchSampler(37, seed=5)
    seq_a = np.concatenate([a.next_global_batch(6) for _ in range(20)])   # 120 samples
    seq_b = np.concatenate([b.next_global_batch(8) for _ in range(15)])   # same 120, other batch size
    assert seq_a.tolist() == seq_b.tolist()
    assert seq_a[:37].tolist() == np.random.default_rng([5, 0]).permutation(37).tolist()
    c = GlobalBatchSampler(37, seed=6)
    assert c.next_global_batch(37).tolist() != seq_a[:37].tolist()


def test_no_shuffle_is_the_natural_order():
    sampler = GlobalBatchSampler(5, seed=0, shuffle=False)
    assert sampler.next_global_batch(7).tolist() == [0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (2, 1), (3, 2), (1, 4)])
def test_no_sample_lost_or_repeated_across_ranks_and_epochs(world_size, grad_accum):
    num_samples, micro = 50, 2
    sampler = GlobalBatchSampler(num_samples, seed=11)
    per_step = micro * world_size * grad_accum
    steps = (3 * num_samples) // per_step + 1
    seen = train_steps(sampler, steps, micro, world_size, grad_accum)
    for epoch in range(3):
        assert sorted(seen[epoch * num_samples:(epoch + 1) * num_samples].tolist()) == list(range(num_samples))


def test_one_rank_with_accumulation_sees_what_two_ranks_see():
    batch = np.arange(100, 108)
    one = [micro_batch_indices(batch, 2, 1, 0, a).tolist() for a in range(4)]
    two = [micro_batch_indices(batch, 2, 2, r, a).tolist() for a in range(2) for r in range(2)]
    assert one == two == [[100, 101], [102, 103], [104, 105], [106, 107]]


@pytest.mark.parametrize("resume_world_size", [1, 2, 3])
def test_resume_with_a_different_number_of_ranks(resume_world_size):
    """Run 7 steps on 2 ranks, save, resume on 1/2/3 ranks: the sequence is the uninterrupted one."""
    num_samples, global_batch = 23, 6
    reference = GlobalBatchSampler(num_samples, seed=42)
    expected = train_steps(reference, 15, 3, 2, 1)

    first = GlobalBatchSampler(num_samples, seed=42)
    before = train_steps(first, 7, 3, 2, 1)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
    assert state["total_consumed"] == 42 and state["epoch"] == 1 and state["consumed_in_epoch"] == 19

    resumed = GlobalBatchSampler(num_samples, seed=42)
    resumed.load_state_dict(state)
    shape = {1: (3, 1, 2), 2: (3, 2, 1), 3: (2, 3, 1)}[resume_world_size]  # (micro, ranks, accum)
    assert shape[0] * shape[1] * shape[2] == global_batch
    after = train_steps(resumed, 8, *shape)
    assert np.concatenate([before, after]).tolist() == expected.tolist()


def test_resume_refuses_a_changed_dataset_or_seed():
    state = GlobalBatchSampler(100, seed=1).state_dict()
    with pytest.raises(UserError, match="dataset now has 99"):
        GlobalBatchSampler(99, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        GlobalBatchSampler(100, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="impossible"):
        GlobalBatchSampler(100, seed=1).load_state_dict(dict(state, consumed_in_epoch=100))


def test_micro_batch_shape_errors():
    with pytest.raises(ValueError):
        micro_batch_indices(np.arange(10), 3, 2, 0, 0)  # 10 does not split into 3 x 2
    with pytest.raises(ValueError):
        micro_batch_indices(np.arange(12), 3, 2, 2, 0)  # rank 2 of 2
    with pytest.raises(ValueError):
        micro_batch_indices(np.arange(12), 3, 2, 0, 2)  # only 2 accumulation steps


@pytest.mark.parametrize("batch", [3, 10, 25])
def test_peeking_ahead_changes_neither_the_order_nor_the_position(batch):
    """The trainer peeks at the next global batch to load it early; the batches handed out and the
    saved position must be those of a sampler that never peeked (across epoch ends, and for a batch
    larger than an epoch)."""
    plain, peeking = GlobalBatchSampler(10, seed=5), GlobalBatchSampler(10, seed=5)
    for step in range(12):
        state = peeking.state_dict()
        ahead = peeking.peek_global_batch(batch)
        assert peeking.state_dict() == state
        if step % 3 == 2:                                    # a checkpoint taken between peek and use
            resumed = GlobalBatchSampler(10, seed=5)
            resumed.load_state_dict(peeking.state_dict())
            assert np.array_equal(resumed.next_global_batch(batch), ahead)
        got, want = peeking.next_global_batch(batch), plain.next_global_batch(batch)
        assert np.array_equal(got, want) and np.array_equal(ahead, want)
        assert peeking.state_dict() == plain.state_dict()
    peeking.peek_global_batch(batch)
    assert np.array_equal(peeking.next_global_batch(batch + 1), plain.next_global_batch(batch + 1))
