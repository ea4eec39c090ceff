"""`--schedule wsd` (warm-up, stable, decay) and `--decay-fraction`: the LR curve as a pure function of the
position, its decay start under a resume with another global batch, the resume note and the kept warm-up
when a resume changes the run's length, the `keep` mark that --keep-last never prunes, and one real 1-rank run
(shared by the assertions) with a resume from the middle and a new decay branched from the kept checkpoint."""

from __future__ import annotations

import math
import shutil

import pytest

from retromae_ds.config import TrainConfig, validate
from retromae_ds.engine import checkpoint as ck
from retromae_ds.engine.schedule import RunSchedule, decay_start_step, lr_at, plan_schedule, resume_note
from retromae_ds.errors import UserError
from tests.helpers import engine_runs as R
from tests.helpers.tiny_run import tiny_run

PEAK = 1e-3


def wsd(step, total=100, warmup=10, decay_start=80, min_ratio=0.0):
    return lr_at(step, peak_lr=PEAK, total_steps=total, warmup=warmup, schedule="wsd", min_ratio=min_ratio,
                 decay_start=decay_start)


def test_wsd_warms_up_stays_flat_then_decays_as_one_minus_sqrt():
    assert decay_start_step(100, 10, 0.2) == 80
    assert [wsd(s) for s in (0, 4, 9)] == pytest.approx([PEAK / 10, PEAK / 2, PEAK])  # the usual warm-up
    assert all(wsd(s) == PEAK for s in range(10, 81))  # stable, through the first step of the decay
    assert wsd(81) < PEAK
    assert wsd(85) == pytest.approx(PEAK * (1 - math.sqrt(5 / 20)))  # 1-sqrt, not linear (0.75)
    assert wsd(90) == pytest.approx(PEAK * (1 - math.sqrt(0.5)))
    decay = [wsd(s) for s in range(80, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert wsd(100) == pytest.approx(0.0) and wsd(150) == pytest.approx(0.0)
    assert wsd(100, min_ratio=0.1) == pytest.approx(0.1 * PEAK)
    assert wsd(90, min_ratio=0.1) == pytest.approx(PEAK * (0.1 + 0.9 * (1 - math.sqrt(0.5))))
    assert wsd(50, min_ratio=0.1) == PEAK  # the floor does not touch the stable phase
    with pytest.raises(ValueError):
        lr_at(50, peak_lr=PEAK, total_steps=100, warmup=10, schedule="wsd")


def test_the_decay_start_is_the_last_fraction_of_the_run_never_inside_the_warm_up():
    assert decay_start_step(1000, 100, 0.1) == 900
    assert decay_start_step(100, 90, 0.2) == 90  # a warm-up longer than the stable phase: decay right after it
    assert decay_start_step(100, 10, 0.0) == 100  # no decay: stable to the end (a decay can branch later)
    assert decay_start_step(100, 10, 1.0) == 10
    assert plan_schedule(max_steps=100, epochs=0, warmup=0.1, num_samples=1, batch=8, schedule="wsd",
                         decay_fraction=0.2) == RunSchedule(batch=8, total_steps=100, warmup=10, decay_start=80)
    assert plan_schedule(max_steps=100, epochs=0, warmup=0.1, num_samples=1, batch=8).decay_start is None
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="--decay-fraction"):
            validate(TrainConfig(decay_fraction=bad))
    validate(TrainConfig(schedule="wsd", decay_fraction=0.0))


@pytest.mark.parametrize("new_batch", [8, 4, 16, 12])
def test_a_resume_with_another_global_batch_stays_on_the_curve_and_finds_the_decay_start(new_batch):
    """The schedule is defined in steps of the first global batch (8); a resumed run at another batch reads
    its position from the samples consumed, so its LR is the uninterrupted run's at the same sample, and the
    checkpoint it keeps is the first one at or past the decay start."""
    sched = plan_schedule(max_steps=100, epochs=0, warmup=10, num_samples=1, batch=8, schedule="wsd",
                          decay_fraction=0.2)
    kw = dict(peak_lr=PEAK, total_steps=100, warmup=10, schedule="wsd", decay_start=sched.decay_start)
    consumed, hits = 40 * 8, []  # resumed at step 40 of the first segment
    while consumed < sched.end_samples:
        position = sched.position(consumed)
        assert lr_at(position, **kw) == lr_at(consumed / 8, **kw)
        if new_batch == 8:
            assert lr_at(position, **kw) == wsd(int(position))  # the same steps: the same LRs, bit for bit
        consumed += new_batch
        if sched.reaches_decay_start(consumed, new_batch):
            hits.append(consumed)
    assert len(hits) == 1  # exactly one kept checkpoint
    assert hits[0] - new_batch < 80 * 8 <= hits[0]  # the first state at or past the decay start
    assert all(lr_at((c - new_batch) / 8, **kw) == PEAK for c in range(40 * 8 + new_batch, hits[0] + 1, new_batch))
    if new_batch == 8:
        assert hits == [80 * 8]  # the same world size: exactly step 80


def test_a_resume_that_changes_the_length_keeps_the_wsd_warm_up_and_says_what_changes():
    first = plan_schedule(max_steps=100, epochs=0, warmup=0.1, num_samples=1, batch=8, schedule="wsd",
                          decay_fraction=0.2)
    branch = plan_schedule(max_steps=300, epochs=0, warmup=0.1, num_samples=1, batch=8, schedule="wsd",
                           decay_fraction=0.2, previous=first.to_dict())
    assert branch == RunSchedule(batch=8, total_steps=300, warmup=10, decay_start=240)  # not 30 steps of warm-up
    lr_kw = dict(peak_lr=PEAK, schedule="wsd", min_ratio=0.0)
    note = resume_note(first.to_dict(), branch, 80, lr_kw)
    assert "from step 240 to 300" in note and "warm-up kept at 10" in note and "past the old decay" not in note
    late = resume_note(first.to_dict(), branch, 100, lr_kw)  # from the end of the first decay: the LR climbs back
    assert "past the old decay start (step 80)" in late
    assert resume_note(first.to_dict(), first, 50, lr_kw) is None  # nothing changed: nothing to say
    # other schedules: re-derived from the current flags, as before (with a note)
    linear = plan_schedule(max_steps=100, epochs=0, warmup=0.1, num_samples=1, batch=8)
    longer = plan_schedule(max_steps=300, epochs=0, warmup=0.1, num_samples=1, batch=8, previous=linear.to_dict())
    assert longer == RunSchedule(batch=8, total_steps=300, warmup=30)
    assert "re-derived" in resume_note(linear.to_dict(), longer, 50, dict(peak_lr=PEAK, schedule="linear"))
    # a run that started linear and resumes as wsd with another length: no old wsd curve to compare with
    switched = plan_schedule(max_steps=300, epochs=0, warmup=0.1, num_samples=1, batch=8, schedule="wsd",
                             previous=linear.to_dict())
    assert "decay now runs from step 240 to 300" in resume_note(linear.to_dict(), switched, 50, lr_kw)


def _fake_checkpoint(root, step: int, keep: bool = False):
    p = ck.checkpoint_root(root) / ck.tag_for(step)
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    ck.write_marker(p, {"step": step, "world_size": 1, "files": ck.build_manifest(p, {}), **({"keep": True} if keep else {})})
    return p


def test_prune_never_removes_a_kept_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step, keep=step == 4)
    ck.prune(tmp_path, keep_last=1)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000008"]
    _fake_checkpoint(tmp_path, 10)
    ck.prune(tmp_path, keep_last=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000008", "step_00000010"]


# ------------------------------------------------------------------------------------------------
# one real run (1 rank, 10 steps), a resume from its middle, and a new decay branched from its kept checkpoint
# ------------------------------------------------------------------------------------------------

# --warmup 0.3 is 3 steps of the 10-step run; re-derived for the 30-step branch it would be 9, which a branch from
# step 7 must not get (it would send the LR back into warm-up)
STEPS, WARMUP, FRACTION, BRANCH = 10, 3, 0.3, 30  # decay from step 7; the branch's from step 21
COMMON = ["--micro-batch-size", "4", "--log-interval", "1", "--lr", str(PEAK), "--warmup", "0.3",
          "--schedule", "wsd", "--decay-fraction", str(FRACTION), "--min-lr-ratio", "0.1", "--save-interval", "4",
          "--keep-last", "1", "--eval-heldout-docs", "10", "--eval-max-length", "32", "--seed", "11", "--no-export",
          "--deepspeed", "ds_configs/zero2.json"]


@pytest.fixture(scope="module")
def wsd_run(tmp_path_factory):
    run = tiny_run(tmp_path_factory.mktemp("wsd"), n_docs=60, max_seq_len=32)
    args = run["base"] + COMMON
    out = run["root"] / "run"
    res = R.run("python", 1, args + ["--output-dir", str(out), "--max-steps", str(STEPS)], run["root"] / "run.log",
                timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]
    return {**run, "args": args, "out": out}


def _want_lr(step: int, total: int, decay_start: int) -> float:
    """The LR of optimizer step `step` (1-based, as metrics.jsonl numbers them)."""
    return lr_at(step - 1, peak_lr=PEAK, total_steps=total, warmup=WARMUP, schedule="wsd", min_ratio=0.1,
                 decay_start=decay_start)


def test_the_run_follows_the_curve_and_keeps_its_decay_start_checkpoint_past_keep_last_1(wsd_run):
    out = wsd_run["out"]
    lrs = {r["step"]: r["lr"] for r in R.metrics(out)}
    assert sorted(lrs) == list(range(1, STEPS + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(_want_lr(step, STEPS, 7), rel=1e-12), (step, lrs)
    assert [lrs[s] for s in (3, 7, 8)] == [PEAK] * 3 and lrs[9] < PEAK  # step 8 = 0-based step 7, the first decay step
    # saved at 4 (interval), 7 (decay start, kept), 8 (interval), 10 (end); --keep-last 1 pruned 4 and 8 only
    assert [p.name for p in ck.complete_checkpoints(out)] == [ck.tag_for(7), ck.tag_for(STEPS)]
    kept = ck.read_marker(ck.checkpoint_root(out) / ck.tag_for(7))
    assert kept["keep"] is True and kept["reason"] == "decay-start"
    assert kept["client_state"]["schedule"] == {"batch": 4, "total_steps": STEPS, "warmup": WARMUP, "decay_start": 7}
    assert not ck.read_marker(ck.checkpoint_root(out) / ck.tag_for(STEPS)).get("keep")


@pytest.mark.full
def test_a_resume_from_the_kept_checkpoint_with_the_same_length_continues_bit_for_bit(wsd_run):
    out = wsd_run["root"] / "resumed"
    shutil.copytree(ck.checkpoint_root(wsd_run["out"]) / ck.tag_for(7), ck.checkpoint_root(out) / ck.tag_for(7))
    res = R.run("python", 1, wsd_run["args"] + ["--output-dir", str(out), "--max-steps", str(STEPS)],
                wsd_run["root"] / "resumed.log")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-3000:]
    assert "run of" not in res.stdout  # the same length: no schedule note
    a, b = R.metrics(wsd_run["out"]), R.metrics(out)
    assert {r["step"]: r["lr"] for r in b} == {r["step"]: r["lr"] for r in a if r["step"] > 7}
    assert {r["step"]: r["loss"] for r in b} == {r["step"]: r["loss"] for r in a if r["step"] > 7}  # fp32: exact
    assert [p.name for p in ck.complete_checkpoints(out)] == [ck.tag_for(7), ck.tag_for(STEPS)]


@pytest.mark.full
def test_a_new_decay_branches_from_the_kept_checkpoint_with_a_longer_run(wsd_run):
    kept = ck.checkpoint_root(wsd_run["out"]) / ck.tag_for(7)
    out = wsd_run["root"] / "branch"
    res = R.run("python", 1, wsd_run["args"] + ["--output-dir", str(out), "--max-steps", str(BRANCH),
                                                 "--resume", str(kept)], wsd_run["root"] / "branch.log")
    assert res.returncode == 0, res.stdout[-4000:]
    assert f"wsd decay now runs from step 21 to {BRANCH} (warm-up kept at 3 steps)" in res.stdout
    lrs = {r["step"]: r["lr"] for r in R.metrics(out)}
    assert sorted(lrs) == list(range(8, BRANCH + 1))
    for step, lr in lrs.items():
        assert lr == pytest.approx(_want_lr(step, BRANCH, 21), rel=1e-12), (step, lrs)
    assert all(lrs[s] == PEAK for s in range(8, 22))  # the stable phase goes on where the first decay began
    assert [p.name for p in ck.complete_checkpoints(out)] == [ck.tag_for(21), ck.tag_for(BRANCH)]
    assert ck.read_marker(ck.checkpoint_root(out) / ck.tag_for(21))["keep"] is True
