"""Checkpoint folder bookkeeping: only complete checkpoints are resumed, exported or kept."""

import pytest

from retromae_ds.engine import checkpoint as ck
from retromae_ds.errors import UserError


def make(root, step, complete=True):
    p = ck.checkpoint_root(root) / ck.tag_for(step)
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ck.write_marker(p, {"step": step, "world_size": 1})
    return p


def test_resume_picks_newest_complete(tmp_path):
    assert ck.resolve_resume("auto", tmp_path) is None
    make(tmp_path, 10)
    newest = make(tmp_path, 20)
    make(tmp_path, 30, complete=False)  # cut off mid-write
    assert ck.resolve_resume("auto", tmp_path) == newest
    assert ck.resolve_resume("none", tmp_path) is None
    assert ck.find_checkpoint(tmp_path) == newest
    assert ck.resolve_resume(str(newest), tmp_path) == newest


def test_incomplete_checkpoint_is_refused_by_path(tmp_path):
    partial = make(tmp_path, 30, complete=False)
    with pytest.raises(UserError, match="cut off"):
        ck.find_checkpoint(partial)
    with pytest.raises(UserError, match="no complete checkpoint"):
        ck.find_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no such"):
        ck.find_checkpoint(tmp_path / "nope")


def test_half_written_marker_does_not_count(tmp_path):
    p = make(tmp_path, 5, complete=False)
    (p / ck.MARKER).write_text('{"step": 5, "wor')  # truncated JSON
    assert ck.complete_checkpoints(tmp_path) == []


def test_prune_keeps_last_n_and_removes_stale_partials(tmp_path):
    stale = make(tmp_path, 5, complete=False)
    for s in (10, 20, 30):
        make(tmp_path, s)
    newer_partial = make(tmp_path, 40, complete=False)
    ck.prune(tmp_path, keep_last=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000020", "step_00000030"]
    assert not stale.exists() and newer_partial.exists()
    assert ck.remove_incomplete(tmp_path) == [newer_partial] and not newer_partial.exists()
