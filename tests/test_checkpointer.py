"""The trainer's checkpoint component (retromae_ds/engine/checkpointer.py) and the run state it stores.

Units: the run state's round trip through a checkpoint's client state, including one written before
RunState existed; the schedule batch of old and new checkpoints; rank 0's check of files it cannot see.
A real run: a checkpoint whose client state has the exact pre-RunState layout resumes and continues.
Faults of the component on 2 ranks (disk full, damage, a node-local folder, rank-0 errors) are in
tests/test_storage_faults.py and tests/test_cluster_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retromae_ds.engine import checkpoint as ck
from retromae_ds.engine.checkpointer import ResumePoint, _unseen_files
from retromae_ds.engine.state import RunState
from tests.helpers import engine_runs as R
from tests.helpers.tiny_run import tiny_run

# The client state of a checkpoint saved before RunState (and before the fp16 loss-scale counter): these
# keys, no more. The sampler and config entries are filled in from a real run below ("config" from today's
# "resolved_config": before the two were told apart, "config" held the resolved values).
PRE_RUNSTATE_KEYS = ("step", "skipped_steps", "tokens_seen", "sampler", "config", "data", "world_size",
                     "schedule_batch", "rewarm_from")


def test_run_state_round_trips_and_reads_a_client_state_from_before_it_existed():
    state = RunState(step=7, tokens_seen=900, skipped_steps=2, loss_scale_skips=3, rewarm_from=5,
                     first_eval={"lee_pearson": 0.5})
    client = {**state.to_client_state(), "sampler": {"epoch": 0}, "world_size": 2}
    assert RunState.from_client_state(client) == state
    old = {"step": 7, "skipped_steps": 2, "tokens_seen": 900, "rewarm_from": None, "sampler": {}, "world_size": 2}
    assert RunState.from_client_state(old) == RunState(step=7, tokens_seen=900, skipped_steps=2)


def test_the_schedule_batch_of_old_and_new_checkpoints():
    new = ResumePoint(Path("x"), {"schedule_batch": 32, "world_size": 4}, reshard=True)
    assert new.schedule_batch == 32
    old = ResumePoint(Path("x"), {"world_size": 4, "config": {"micro_batch_size": 8, "grad_accum": 2}}, reshard=False)
    assert old.schedule_batch == 64  # before the key existed: the batch it was trained with


def test_the_run_config_of_new_and_old_checkpoints():
    """New checkpoints save the parsed flags ("config") and the resolved copy the run ran with
    ("resolved_config"); readers take the resolved one, and from older checkpoints their "config", which
    then held the resolved values."""
    from retromae_ds.engine.checkpoint import run_config

    new = {"config": {"micro_batch_size": 8, "grad_accum": 1, "max_seq_len": 0},
           "resolved_config": {"micro_batch_size": 2, "grad_accum": 3, "max_seq_len": 64}}
    assert run_config(new) == new["resolved_config"]
    assert run_config({"config": {"micro_batch_size": 2}}) == {"micro_batch_size": 2}
    assert run_config({}) == {}
    # a checkpoint without schedule_batch: the batch the run ran with (2 x 3 x 2 ranks), not the flags' 8 x 1
    assert ResumePoint(Path("x"), {"world_size": 2, **new}, reshard=False).schedule_batch == 12


def test_rank_0_names_the_first_file_it_cannot_see(tmp_path):
    seen = tmp_path / "a.pt"
    seen.write_bytes(b"x")
    reports = [([], {str(seen): {}}, "node0"), ([], {str(tmp_path / "b.pt"): {}}, "node1")]
    message = _unseen_files(reports, str(tmp_path))
    assert message and "rank 1 on node1 wrote" in message and str(tmp_path / "b.pt") in message
    assert "rank 0 on node0 cannot see" in message
    assert _unseen_files(reports[:1], str(tmp_path)) is None


@pytest.mark.distributed
@pytest.mark.full
def test_a_checkpoint_with_the_pre_runstate_client_state_resumes(tmp_path):
    lee = tiny_run(tmp_path, n_docs=30, max_seq_len=32)
    out = tmp_path / "run"
    args = lee["base"] + ["--micro-batch-size", "2", "--log-interval", "1", "--save-interval", "0", "--no-export",
                          "--eval-heldout-docs", "5", "--eval-max-length", "32", "--output-dir", str(out)]
    res = R.run("python", 1, args + ["--max-steps", "2"], tmp_path / "first.log")
    assert res.returncode == 0, res.stdout[-3000:]
    path = ck.complete_checkpoints(out)[-1]
    marker = json.loads((path / ck.MARKER).read_text())
    client = marker["client_state"]
    client["config"] = client.pop("resolved_config")  # older checkpoints saved the resolved values as "config"
    marker["client_state"] = {k: client[k] for k in PRE_RUNSTATE_KEYS}
    (path / ck.MARKER).write_text(json.dumps(marker))
    tokens_at_2 = marker["client_state"]["tokens_seen"]

    res = R.run("python", 1, args + ["--max-steps", "3"], tmp_path / "second.log")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "resumed from" in res.stdout and "at step 2" in res.stdout, res.stdout[-3000:]
    rows = R.metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3], rows
    assert rows[-1]["tokens_seen"] > tokens_at_2 and rows[-1]["skipped_steps"] == 0
    assert rows[-1]["loss_scale_skips"] == 0
    assert ck.read_marker(ck.complete_checkpoints(out)[-1])["client_state"]["step"] == 3
