"""Storage faults: damaged checkpoints are detected and set aside, a full disk never costs a run.

Unit tests cover the manifest and the choice of checkpoint; real 2-rank DeepSpeed runs (CPU, fp32) cover
the fallback after damage and a disk that fills up during a save (a small tmpfs: CI runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from retromae_ds.engine import checkpoint as ck
from retromae_ds.errors import UserError
from tests.helpers import engine_runs as R
from tests.helpers.tiny_run import tiny_run

STEPS = 6
ARGS = ["--micro-batch-size", "4", "--max-steps", str(STEPS), "--log-interval", "1", "--save-interval", "2",
        "--keep-last", "3", "--lr", "1e-3", "--warmup", "2", "--eval-heldout-docs", "10", "--eval-max-length", "32",
        "--seed", "11", "--no-export", "--deepspeed", "ds_configs/zero2.json"]


# ------------------------------------------------------------------------------------------------
# the manifest and the choice of checkpoint (no DeepSpeed)
# ------------------------------------------------------------------------------------------------

def make(root, step, payload=b"weights" * 100):
    p = ck.checkpoint_root(root) / ck.tag_for(step)
    (p / "model_config").mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(payload + bytes([step % 256]))
    (p / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload * 3)
    (p / "model_config" / "config.json").write_text("{}")
    ck.write_marker(p, {"step": step, "world_size": 1, "files": ck.build_manifest(p, {})})
    return p


def damage(p: Path, how: str) -> Path:
    f = p / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if how == "removed":
        f.unlink()
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[:-7])
    elif how == "flipped":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    return f


@pytest.mark.parametrize("how", ["removed", "truncated", "flipped"])
def test_verify_names_the_damaged_file(tmp_path, how):
    p = make(tmp_path, 4)
    assert ck.verify(p).ok
    bad = damage(p, how)
    result = ck.verify(p)
    assert not result.ok and str(bad) in result.summary()
    # the quick check (sizes only) sees what changes a size, not a flipped byte
    assert ck.verify(p, full=False).ok == (how == "flipped")


def test_resume_auto_sets_damaged_aside_and_falls_back(tmp_path):
    older, newest = make(tmp_path, 2), make(tmp_path, 4)
    bad = damage(newest, "flipped")
    warnings = []
    assert ck.resolve_resume("auto", tmp_path, warn=warnings.append) == older
    assert not newest.exists() and newest.with_name(newest.name + ".damaged").is_dir()  # kept, not deleted
    assert len(warnings) == 1 and str(bad) in warnings[0]
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == [older.name]
    # a later run that damages the same step again does not clobber the first set-aside copy
    again = make(tmp_path, 4)
    damage(again, "removed")
    assert ck.resolve_resume("auto", tmp_path, warn=warnings.append) == older
    assert (ck.checkpoint_root(tmp_path) / "step_00000004.damaged.1").is_dir()


def test_resume_auto_with_nothing_that_verifies_is_a_clear_error(tmp_path):
    for step in (2, 4):
        damage(make(tmp_path, step), "truncated")
    with pytest.raises(UserError, match=r"no checkpoint verifies.*step_00000004.*step_00000002"):
        ck.resolve_resume("auto", tmp_path, warn=lambda m: None)


def test_resume_path_to_a_damaged_checkpoint_names_the_file_and_does_not_fall_back(tmp_path):
    make(tmp_path, 2)
    newest = make(tmp_path, 4)
    bad = damage(newest, "removed")
    with pytest.raises(UserError, match="damaged") as err:
        ck.resolve_resume(str(newest), tmp_path)
    assert str(bad) in str(err.value) and newest.is_dir()  # named, and left where it is
    with pytest.raises(UserError, match="damaged"):
        ck.find_checkpoint(tmp_path)  # export / info of a run folder: its newest, verified


def test_prune_never_removes_the_last_good_checkpoint(tmp_path):
    a, b = make(tmp_path, 2), make(tmp_path, 4)
    damage(b, "removed")  # the newest is damaged: it must not count towards --keep-last
    ck.prune(tmp_path, keep_last=1)
    assert a.exists() and b.exists()
    c = make(tmp_path, 6)
    ck.prune(tmp_path, keep_last=1)
    assert c.exists() and not a.exists() and b.exists()  # damaged ones are left for resume to set aside


def test_an_interrupted_delete_never_leaves_a_complete_looking_folder(tmp_path, monkeypatch):
    p = make(tmp_path, 2)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # the process dies before deleting files
    ck.remove_checkpoint(p)
    assert p.exists() and not ck.is_complete(p)


def test_hashing_engine_matches_the_bytes_on_disk_and_cleans_up_on_a_full_disk(tmp_path):
    class Inner:
        zipfile_serialization = True

    engine = ck.ManifestingCheckpointEngine(Inner())
    state = {"w": torch.arange(1000, dtype=torch.float32), "meta": {"step": 3}}
    target = tmp_path / "states.pt"
    engine.save(state, str(target))
    assert engine.written[str(target)] == ck.file_digest(target)
    assert torch.equal(torch.load(target)["w"], state["w"])
    full = _tmpfs(tmp_path / "full", "64k")
    engine.save({"w": torch.zeros(100_000)}, str(full / "big.pt"))
    assert engine.errors and str(full / "big.pt") == engine.errors[0][0]
    assert "No space left" in engine.errors[0][1] or "disk" in engine.errors[0][1]
    assert not (full / "big.pt").exists()


# ------------------------------------------------------------------------------------------------
# real runs
# ------------------------------------------------------------------------------------------------

def _tmpfs(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"a full disk is simulated with a tmpfs mount, which needs root: {res.stderr.strip()}")
    _MOUNTS.append(path)
    return path


_MOUNTS: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _unmount_all():
    yield
    for p in reversed(_MOUNTS):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("storage"), n_docs=80, max_seq_len=32)


def _args(setup, out: Path) -> list[str]:
    return setup["base"] + ARGS + ["--output-dir", str(out)]


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted 2-rank run every fault is compared with."""
    out = setup["root"] / "ref"
    res = R.run("torchrun", 2, _args(setup, out), setup["root"] / "ref.log")
    assert res.returncode == 0, res.stdout[-4000:]
    return out


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from retromae_ds.engine.export import load_checkpoint_model

    model, *_ = load_checkpoint_model(checkpoint)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_end(ref: Path, out: Path) -> None:
    """Two run folders: the same final weights (bitwise) and the same losses after the resume point."""
    last = ck.tag_for(STEPS)
    a, b = _weights(ref / "checkpoints" / last), _weights(out / "checkpoints" / last)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    ra, rb = R.losses(ref), R.losses(out)
    for step in range(3, STEPS + 1):
        assert rb[step] == ra[step], (step, ra, rb)


@pytest.mark.full
def test_damaged_newest_checkpoint_falls_back_and_ends_bitwise_equal(setup, reference):
    out = setup["root"] / "damaged"
    for step in (2, 4):  # as if the run had been killed after step 4, then step 4's files got damaged
        tag = ck.tag_for(step)
        shutil.copytree(reference / "checkpoints" / tag, out / "checkpoints" / tag)
    bad = out / "checkpoints" / ck.tag_for(4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 3] ^= 0x01
    bad.write_bytes(bytes(data))
    res = R.run("torchrun", 2, _args(setup, out), setup["root"] / "damaged.log")
    assert res.returncode == 0, res.stdout[-4000:]
    assert f"{bad}: checksum mismatch" in res.stdout and "step_00000004.damaged" in res.stdout
    assert f"resumed from {out / 'checkpoints' / ck.tag_for(2)} at step 2" in res.stdout
    assert (out / "checkpoints" / "step_00000004.damaged").is_dir()
    _assert_same_end(reference, out)


def _start_ranks(setup, args: list[str], name: str) -> list[tuple[subprocess.Popen, Path]]:
    """Two ranks as separate processes, the way srun starts them: each rank's own exit code is visible
    (a launcher would report only its own)."""
    port = str(R.free_port())
    procs = []
    for rank in range(2):
        log = setup["root"] / f"{name}.rank{rank}.log"
        env = R.run_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        f = open(log, "w")
        procs.append((subprocess.Popen([os.sys.executable, R.PRETRAIN, *args], stdout=f, stderr=subprocess.STDOUT,
                                       cwd=R.REPO, env=env, start_new_session=True), log))
    return procs


def test_disk_full_during_a_save_stops_every_rank_then_resumes_exactly(setup, reference):
    step2 = ck.checkpoint_bytes(reference / "checkpoints" / ck.tag_for(2))
    out = _tmpfs(setup["root"] / "full", str(int(step2 * 1.5)))  # room for one checkpoint, not two
    procs = _start_ranks(setup, _args(setup, out), "full")
    codes = []
    try:
        R.wait_for(lambda: (out / "checkpoints" / ck.tag_for(2) / ck.MARKER).exists(), 300, procs[0][0])
        t0 = time.monotonic()
        for proc, _ in procs:
            codes.append(proc.wait(timeout=120))
        took = time.monotonic() - t0
    finally:
        for proc, _ in procs:
            R.kill_group(proc)
    logs = [log.read_text() for _, log in procs]
    assert codes == [4, 4], (codes, logs[0][-3000:], logs[1][-3000:])
    assert took < 60, took  # no rank waits in a collective for the other
    assert not any("Traceback" in text for text in logs)
    msg = [line for line in logs[0].splitlines() if line.startswith("pretrain: error: saving the checkpoint")]
    assert msg, logs[0][-4000:]
    assert str(out / "checkpoints" / ck.tag_for(4)) in msg[0] and "are free on that filesystem" in msg[0]
    assert f"{ck.checkpoint_bytes(out / 'checkpoints' / ck.tag_for(2)):,} bytes" in msg[0]  # the last one's size
    assert not (out / "checkpoints" / ck.tag_for(4)).exists()  # the partial folder is gone
    assert ck.verify(out / "checkpoints" / ck.tag_for(2)).ok  # the earlier one is intact
    # free space, run the same command: it resumes from step 2 and ends where the uninterrupted run ended
    subprocess.run(["mount", "-o", f"remount,size={step2 * 6}", str(out)], check=True)
    res = R.run("torchrun", 2, _args(setup, out), setup["root"] / "full2.log")
    assert res.returncode == 0, res.stdout[-4000:]
    assert "resumed from" in res.stdout and "at step 2" in res.stdout
    _assert_same_end(reference, out)


def test_export_and_info_on_full_and_damaged_checkpoints(setup, reference, tmp_path):
    from retromae_ds.cli import main as cli

    newest = reference / "checkpoints" / ck.tag_for(STEPS)
    assert cli(["info", str(newest)]) == 0
    full = _tmpfs(tmp_path / "small", "256k")
    env = R.run_env()
    res = subprocess.run([os.sys.executable, "-m", "retromae_ds.cli", "export", str(reference), str(full / "enc")],
                         capture_output=True, text=True, env=env, cwd=R.REPO)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and str(full / "enc") in res.stderr and "bytes are free" in res.stderr
    assert list(full.iterdir()) == []  # nothing that looks valid, no temporary folder
    copy = tmp_path / "copy"
    shutil.copytree(newest, copy)
    (copy / "mp_rank_00_model_states.pt").unlink()
    res = subprocess.run([os.sys.executable, "-m", "retromae_ds.cli", "export", str(copy), str(tmp_path / "enc")],
                         capture_output=True, text=True, env=env, cwd=R.REPO)
    assert res.returncode == 2 and "mp_rank_00_model_states.pt: missing" in res.stderr, res.stderr[-3000:]
    res = subprocess.run([os.sys.executable, "-m", "retromae_ds.cli", "info", str(copy)],
                         capture_output=True, text=True, env=env, cwd=R.REPO)
    assert res.returncode == 1 and json.loads(res.stdout)["verification"]["ok"] is False
