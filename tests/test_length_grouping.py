"""Length-grouped batches (--group-by-length): every sample once per epoch, the same order after any
resume (same or another world size, kill -9), batches of similar lengths, and the padding efficiency
that `retromae-ds info` predicts and the trainer logs.

The sampler tests are in-process; the engine tests share one grouped 2-rank run on a ragged corpus
(Lee articles cut to 5-200 words, so blocks range from a few tokens to full) and resume it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retromae_ds.data.padding import batch_positions, expected_efficiency
from retromae_ds.data.sampler import GlobalBatchSampler, LengthGrouping, micro_batch_indices
from retromae_ds.errors import UserError
from tests.helpers import engine_runs as R
from tests.helpers.corpora import lee_articles
from tests.helpers.tiny_run import prepare_lee_corpus, tiny_run


def ragged_sizes(n: int, seed: int = 0) -> np.ndarray:
    """Passage-like block lengths: a log-normal body around 70 tokens and 5% full 510-token blocks."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(np.log(70), 0.5, n), 5, 510).astype(np.int32)
    sizes[rng.random(n) < 0.05] = 510
    return sizes


def drain(sampler: GlobalBatchSampler, batch: int, samples: int) -> np.ndarray:
    return np.concatenate([sampler.next_global_batch(batch) for _ in range(samples // batch)])


# --- the sampler ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch, window", [(1003, 16, 8), (100, 24, 2), (50, 64, 4)])
def test_every_sample_once_per_epoch_across_epochs_that_end_mid_batch(n, batch, window):
    sizes = ragged_sizes(n)
    sampler = GlobalBatchSampler(n, seed=3, grouping=LengthGrouping(batch, window), sizes=sizes)
    drawn = drain(sampler, batch, 3 * n - (3 * n) % batch)
    for epoch in range(len(drawn) // n):
        assert sorted(drawn[epoch * n:(epoch + 1) * n].tolist()) == list(range(n)), epoch


def test_a_global_batch_holds_similar_lengths_and_windows_are_shuffled():
    n, batch, window = 4096, 32, 16
    sizes = ragged_sizes(n)
    grouped = GlobalBatchSampler(n, seed=1, grouping=LengthGrouping(batch, window), sizes=sizes)
    plain = GlobalBatchSampler(n, seed=1)
    g_batches = [sizes[grouped.next_global_batch(batch)] for _ in range(n // batch)]
    p_batches = [sizes[plain.next_global_batch(batch)] for _ in range(n // batch)]
    spread = lambda bs: np.median([b.max() / b.min() for b in bs])  # noqa: E731
    assert spread(g_batches) < 1.25 < 2.0 < spread(p_batches)
    # within a window the batches come in random order, not sorted by length
    means = [b.mean() for b in g_batches[:window]]
    assert means != sorted(means) and means != sorted(means, reverse=True)
    # the ranks' micro-batches of one step cost about the same (no straggler at the reduce)
    straggle = lambda bs: np.median([max(w := [b[i:i + 8].max() for i in range(0, batch, 8)]) / min(w)  # noqa: E731
                                     for b in bs])
    assert straggle(g_batches) < 1.1 < 1.5 < straggle(p_batches)


def test_the_order_depends_on_seed_and_epoch_only():
    sizes = ragged_sizes(500)
    make = lambda seed: GlobalBatchSampler(500, seed=seed, grouping=LengthGrouping(20, 5), sizes=sizes)  # noqa: E731
    a, b, c = make(4), make(4), make(5)
    assert np.array_equal(a.epoch_order(2), b.epoch_order(2))
    assert not np.array_equal(a.epoch_order(2), a.epoch_order(3))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))


@pytest.mark.parametrize("new_batch", [24, 12, 48])
def test_resume_continues_the_same_order_with_the_same_or_another_global_batch(new_batch):
    """A checkpoint's (epoch, consumed) resumes the same order; with another world size the batches
    are cut elsewhere (the groups stay those of the first global batch), and no sample is lost."""
    n, batch = 301, 24
    sizes = ragged_sizes(n)
    grouping = LengthGrouping(batch, 3)
    ref = GlobalBatchSampler(n, seed=9, grouping=grouping, sizes=sizes)
    expected = np.concatenate([ref.epoch_order(0), ref.epoch_order(1), ref.epoch_order(2)])
    first = GlobalBatchSampler(n, seed=9, grouping=grouping, sizes=sizes)
    got = [drain(first, batch, 10 * batch)]
    resumed = GlobalBatchSampler(n, seed=9, grouping=grouping, sizes=sizes)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got.append(drain(resumed, new_batch, 2 * n - 10 * batch - (2 * n - 10 * batch) % new_batch))
    got = np.concatenate(got)
    assert np.array_equal(got, expected[:len(got)])


def test_a_checkpoint_resumes_only_with_its_grouping():
    sizes = ragged_sizes(200)
    grouped = GlobalBatchSampler(200, seed=0, grouping=LengthGrouping(16, 4), sizes=sizes)
    grouped.next_global_batch(16)
    state = grouped.state_dict()
    for other in (GlobalBatchSampler(200, seed=0),
                  GlobalBatchSampler(200, seed=0, grouping=LengthGrouping(16, 8), sizes=sizes),
                  GlobalBatchSampler(200, seed=0, grouping=LengthGrouping(32, 4), sizes=sizes)):
        with pytest.raises(UserError, match="--group-by-length"):
            other.load_state_dict(state)
    plain_state = GlobalBatchSampler(200, seed=0).state_dict()
    with pytest.raises(UserError, match="without length grouping"):
        GlobalBatchSampler(200, seed=0, grouping=LengthGrouping(16, 4), sizes=sizes).load_state_dict(plain_state)
    plain_state.pop("grouping")  # a checkpoint from before grouping existed: an ungrouped order
    GlobalBatchSampler(200, seed=0).load_state_dict(plain_state)


def test_a_blend_is_grouped_by_the_lengths_of_its_blocks():
    from retromae_ds.data.indexed import BlendedDataset

    class Sized:
        def __init__(self, sizes):
            self.sizes = sizes

        def __len__(self):
            return len(self.sizes)

    short, long = Sized(np.full(300, 20, np.int32)), Sized(np.full(100, 400, np.int32))
    blend = BlendedDataset([short, long], [0.5, 0.5], seed=0)
    sampler = GlobalBatchSampler.for_dataset(blend, seed=0, grouping=LengthGrouping(20, 10))
    epoch = drain(sampler, 20, blend.samples_per_epoch)
    assert sorted(np.bincount(epoch, minlength=len(blend)).tolist()[300:]) == [2] * 100  # long blocks twice
    batches = blend.sizes[epoch].reshape(-1, 20)
    assert (batches.min(1) == batches.max(1)).mean() >= 0.9  # nearly every batch one kind


# --- the padding estimate ---------------------------------------------------------------------------

def test_expected_efficiency_is_what_the_batches_of_that_order_compute():
    sizes = ragged_sizes(640)
    for window in (0, 8):
        grouping = LengthGrouping(16, window) if window else None
        sampler = GlobalBatchSampler(640, seed=42, grouping=grouping, sizes=sizes if window else None)
        real = computed = 0
        for _ in range(40):
            batch = sampler.next_global_batch(16)
            for rank in range(2):
                r, c = batch_positions(sizes[micro_batch_indices(batch, 8, 2, rank, 0)], pad_multiple=8)
                real, computed = real + r, computed + c
        got = expected_efficiency(sizes, 8, 510, global_batch=16, group_window=window, pad_multiple=8,
                                  max_global_batches=40)
        assert got == pytest.approx(real / computed)
    assert expected_efficiency(sizes, 8, 510, global_batch=16) < 0.6 < 0.95 < \
        expected_efficiency(sizes, 8, 510, global_batch=16, group_window=40, pad_multiple=1)


def test_info_reports_the_expected_padding_efficiency(tmp_path, capsys):
    from retromae_ds.cli import main as cli

    prefix = prepare_lee_corpus(tmp_path, ragged_texts(40), "ragged", max_seq_len=64)
    assert cli(["info", prefix, "--micro-batch-size", "4"]) == 0
    report = json.loads(capsys.readouterr().out)["padding_efficiency"]
    assert report["micro_batch_size"] == 4 and report["max_seq_len"] == 64
    assert report["random_cpu"] < report["grouped_cpu"] and report["grouped_cpu"] >= 0.95
    assert report["grouped_accelerator"] <= report["grouped_cpu"]


# --- the trainer ------------------------------------------------------------------------------------

def ragged_texts(n: int) -> list[str]:
    """The first `n` Lee articles cut to 5-200 words: blocks from a few tokens to full at L = 64."""
    cuts = [5, 12, 30, 60, 200]
    return [" ".join(a.split()[:cuts[i % len(cuts)]]) for i, a in enumerate(lee_articles(n))]


STEPS = 6
GROUPED = ["--micro-batch-size", "4", "--max-steps", str(STEPS), "--log-interval", "1", "--save-interval", "3",
           "--lr", "1e-3", "--warmup", "2", "--eval-heldout-docs", "0", "--eval-max-length", "64", "--seed", "7",
           "--clip", "0", "--no-export", "--group-by-length", "--group-window", "8",
           "--deepspeed", "ds_configs/zero2.json"]


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    """The tiny BERT on the ragged corpus, grouped, 2 ranks x micro-batch 4: 6 steps with a checkpoint at 3."""
    run = tiny_run(tmp_path_factory.mktemp("grouping"), n_docs=1, max_seq_len=64)
    prefix = prepare_lee_corpus(run["root"], ragged_texts(60), "ragged", max_seq_len=64)
    base = ["--data", prefix, *run["model"]] + GROUPED
    out = run["root"] / "grouped"
    res = R.run("torchrun", 2, base + ["--output-dir", str(out)], run["root"] / "grouped.log", script=R.PROBE,
                env=R.probe_env(run["root"] / "grouped.probe"))
    assert res.returncode == 0, res.stdout[-6000:]
    return {**run, "prefix": prefix, "base": base, "out": out}


@pytest.mark.distributed
def test_grouped_run_trains_the_grouped_order_with_little_padding(grouped_run):
    from retromae_ds.data.indexed import IndexedDataset

    ds = IndexedDataset(grouped_run["prefix"])
    sampler = GlobalBatchSampler(len(ds), seed=7, grouping=LengthGrouping(8, 8), sizes=ds.sizes)
    batches = [sampler.next_global_batch(8) for _ in range(STEPS)]
    for rank in range(2):
        got = R.probe(grouped_run["root"] / "grouped.probe", rank)["blocks"]
        want = [ds[int(i)].tolist() for b in batches for i in micro_batch_indices(b, 4, 2, rank, 0)]
        assert got == want, rank
    logged = [r["padding_efficiency"] for r in R.metrics(grouped_run["out"])]
    assert len(logged) == STEPS and np.mean(logged) >= 0.9
    real = sum(batch_positions(ds.sizes[micro_batch_indices(b, 4, 2, r, 0)])[0] for b in batches for r in range(2))
    computed = sum(batch_positions(ds.sizes[micro_batch_indices(b, 4, 2, r, 0)])[1] for b in batches for r in range(2))
    assert np.mean(logged) == pytest.approx(real / computed, rel=0.05)
    ungrouped = expected_efficiency(ds.sizes, 4, 62, global_batch=8)
    assert ungrouped < 0.85 < real / computed


@pytest.mark.distributed
@pytest.mark.full
def test_grouped_run_resumes_bit_for_bit_after_kill9(grouped_run):
    out = grouped_run["root"] / "grouped_killed"
    args = grouped_run["base"] + ["--output-dir", str(out), "--resume", "auto"]
    R.kill9_after_checkpoint("torchrun", 2, args, out, grouped_run["root"] / "killed.1.log", step=3, never=STEPS)
    res = R.run("torchrun", 2, args, grouped_run["root"] / "killed.2.log")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-6000:]
    want, got = R.losses(grouped_run["out"]), R.losses(out)
    assert all(got[s] == want[s] for s in range(4, STEPS + 1)), (want, got)
    assert R.marker_of_last(out)["client_state"]["sampler"] == R.marker_of_last(grouped_run["out"])["client_state"]["sampler"]


@pytest.mark.distributed
def test_grouped_run_resumes_on_another_world_size_with_the_same_order(grouped_run):
    """The 2-rank checkpoint resumed by 1 rank with a global batch of 4 instead of 8: the groups stay
    those of the first global batch, so the blocks come in the same order, cut into smaller batches."""
    out = grouped_run["root"] / "grouped_reshard"
    src = grouped_run["out"] / "checkpoints" / "step_00000003"
    shutil.copytree(src, out / "checkpoints" / src.name)
    probe = grouped_run["root"] / "reshard.probe"
    res = R.run("python", 1, grouped_run["base"] + ["--output-dir", str(out)], grouped_run["root"] / "reshard.log",
                script=R.PROBE, env=R.probe_env(probe))
    assert res.returncode == 0 and "new world size" in res.stdout, res.stdout[-6000:]
    # steps 4-6 of the 2-rank run: each step rank 0's micro-batch, then rank 1's
    ref = [R.probe(grouped_run["root"] / "grouped.probe", r)["blocks"][12:] for r in range(2)]
    want = [block for step in range(3) for r in range(2) for block in ref[r][4 * step:4 * step + 4]]
    assert R.probe(probe, 0)["blocks"] == want
    assert R.marker_of_last(out)["client_state"]["sampler"] == R.marker_of_last(grouped_run["out"])["client_state"]["sampler"]


# --- the objective of a grouped step ----------------------------------------------------------------

@pytest.mark.parametrize("objective", ["retromae", "dupmae", "mlm"])
def test_a_grouped_step_optimizes_and_logs_the_token_weighted_objective(objective):
    """Two micro-batches of one grouped step, one of short samples and one of long: each token counts the
    same in the encoder and decoder means, DupMAE's bag-of-words loss (a per-sample mean; both hold 4
    samples) counts once per micro-batch, and the logged parts average to what was optimized."""
    import torch

    from retromae_ds.engine.trainer import micro_batch_objective
    from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining
    from tests.helpers.masking_data import synthetic_batch
    from tests.helpers.tiny_models import tiny_bert

    torch.manual_seed(0)
    bow_weight = 0.7
    model = RetroMAEForPretraining(tiny_bert(), RetroMAEConfig(objective=objective, bow_loss_weight=bow_weight))
    batches = [synthetic_batch(1, lengths=(5, 4, 6, 5)), synthetic_batch(2, lengths=(22, 20, 21, 22))]
    outs = [model(**b) for b in batches]
    real = [int((b["decoder_labels"] != -100).sum()) + 2 * 4 for b in batches]  # tokens with [CLS]/[SEP]
    weights = [r * len(batches) / sum(real) for r in real]  # as the trainer computes them
    assert weights[0] < 0.5 < 1.5 < weights[1]
    done = [micro_batch_objective(o, w, bow_weight) for o, w in zip(outs, weights)]
    # the reference, written out: token-weighted means of the encoder and decoder losses, plain mean of bow
    share = [r / sum(real) for r in real]
    want = sum(s * (o.encoder_loss + (o.decoder_loss if o.decoder_loss is not None else 0)) for s, o in zip(share, outs))
    if objective == "dupmae":
        want = want + bow_weight * sum(o.bow_loss for o in outs) / len(outs)
    optimized = sum(objective_k for objective_k, _ in done) / len(done)  # DeepSpeed averages micro-batches
    assert torch.allclose(optimized, want, rtol=1e-6), (optimized, want)
    logged = sum(parts[0] for _, parts in done) / len(done)
    assert torch.allclose(logged, want, rtol=1e-6)
    encoder_logged = sum(parts[1] for _, parts in done) / len(done)
    assert torch.allclose(encoder_logged, sum(s * o.encoder_loss for s, o in zip(share, outs)), rtol=1e-6)
    # ungrouped (weight 1): the model's own loss, the very tensor
    objective_1, parts_1 = micro_batch_objective(outs[0], 1.0, bow_weight)
    assert objective_1 is outs[0].loss and parts_1[0] is outs[0].loss
