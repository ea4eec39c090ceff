"""`sbatch launch/slurm.sh` on a real Slurm cluster with 2 emulated nodes (tests/helpers/slurm_cluster.py),
and the documented DeepSpeed hostfile.

- the rank layout and environment each task gets (2 nodes x 2 tasks, a tiny entry script);
- a tiny RetroMAE model trained across both nodes: losses, checkpoints, TensorBoard events;
- the same run interrupted twice: the time-limit warning (SIGUSR1 to the batch shell, as
  --signal=B:USR1@300 delivers it; the script requeues the job) and a preemption-style requeue
  (`scontrol requeue`: SIGTERM to everything, Slurm requeues). It must end at the same step with the
  same sampler position and bitwise the same loss at every step as the uninterrupted run, every step
  logged exactly once: no repeated or lost samples.

Needs root; installs slurm-wlm + munge with apt-get when missing. Where that is impossible the tests are
skipped with the reason (and fail instead in CI, i.e. CI=true, or with RETROMAE_REQUIRE_SLURM=1).
The Slurm tests are the full tier (`--full`, tests/README.md); the hostfile test is the default tier.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from tests.helpers import engine_runs as R
from tests.helpers.slurm_cluster import FINISHED, LocalSlurm, SlurmUnavailable, ensure_slurm
from tests.helpers.tiny_run import tiny_bert_config_dir


def slurm(test):
    """A test on the local Slurm cluster: marked `slurm`, and part of the full tier (tests/README.md)."""
    return pytest.mark.full(pytest.mark.slurm(test))


STEPS = 36  # 253 training blocks / 8 per step: the runs cross an epoch boundary at step 32
JOB_TIMEOUT = 300  # seconds for a whole job (requeues included); then it is cancelled and the test fails
# 2 emulated nodes x 1 CPU-only task each; the time limit is far away (the warning is sent by hand).
SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_slurm()
    except SlurmUnavailable as err:
        if os.environ.get("RETROMAE_REQUIRE_SLURM") == "1" or os.environ.get("CI") == "true":
            pytest.fail(f"Slurm is required here (CI=true or RETROMAE_REQUIRE_SLURM=1) but cannot run: {err}")
        warnings.warn(f"Slurm tests skipped: {err}")
        pytest.skip(f"Slurm cannot run here: {err}")
    # Not under pytest's tmp dir: munged (user munge) must be able to enter the folder.
    workdir = tempfile.mkdtemp(prefix="retromae-slurm-", dir="/tmp")
    local = LocalSlurm(workdir, nodes=2)
    try:
        local.start()
        yield local
    finally:
        local.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def submit(cluster, tmp: Path, script_args: list[str], env: dict | None = None,
           sbatch: list[str] = SBATCH) -> tuple[int, Path]:
    job = cluster.sbatch([*sbatch, f"--output={tmp}/slurm-%j.out", "launch/slurm.sh", *script_args],
                         env=R.run_env({"PYTHON": sys.executable, **(env or {})}), cwd=R.REPO)
    return job, tmp / f"slurm-{job}.out"


def wait_done(cluster, job: int, log: Path, restarts: int = 0, deadline: float | None = None) -> dict:
    timeout = JOB_TIMEOUT if deadline is None else max(1.0, deadline - time.monotonic())
    try:
        rec = cluster.wait_job(job, timeout)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{read(log)[-6000:]}") from None
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", f"{rec}\n{read(log)[-6000:]}"
    assert int(rec["Restarts"]) == restarts, f"{rec}\n{read(log)[-6000:]}"
    return rec


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def train_rows(out: Path) -> list[dict]:
    """Train records of metrics.jsonl, tolerating a line being written right now."""
    rows = []
    for line in read(out / "metrics.jsonl").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind", "train") == "train":
            rows.append(row)
    return rows


def wait_until(predicate, what: str, cluster, job: int, log: Path, deadline: float) -> None:
    while not predicate():
        state = cluster.job(job).get("JobState")
        if state in FINISHED:
            raise AssertionError(f"job {job} ended ({state}) before {what}\n{read(log)[-6000:]}")
        if time.monotonic() > deadline:
            cluster.cancel(job)
            raise AssertionError(f"no {what} in time; cancelled job {job}\n{read(log)[-6000:]}")
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------------
def test_hostfile_example_parses_with_deepspeed():
    """The documented hostfile is one DeepSpeed's launcher accepts (no cluster needed)."""
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (R.REPO / "launch" / "hostfile.example").read_text().splitlines()
    assert _parse_hostfile(lines) == {"gpu-node-01": 8, "gpu-node-02": 8}


@slurm
def test_rank_layout_and_environment(cluster, tmp_path):
    """2 nodes x 2 tasks: block placement, local ranks, one rendezvous address, flags passed verbatim."""
    entry = tmp_path / "show_rank.py"
    entry.write_text(
        "import json, os, sys\n"
        "keys = ['RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',\n"
        "        'OMP_NUM_THREADS', 'SLURMD_NODENAME']\n"
        "print('ENV ' + json.dumps({**{k: os.environ.get(k) for k in keys}, 'argv': sys.argv[1:]}), flush=True)\n")
    args = ["--output-dir", "a dir with spaces", "--note=it's \"quoted\"", "--deepspeed", "ds_configs/zero3.json"]
    two_per_node = [a.replace("--ntasks-per-node=1", "--ntasks-per-node=2") for a in SBATCH]
    job, log = submit(cluster, tmp_path, args, sbatch=two_per_node,
                      env={"RETROMAE_ENTRY": str(entry), "RANK": "99"})  # a stale RANK must not leak in
    wait_done(cluster, job, log)
    text = read(log)
    ranks = sorted((json.loads(line[4:]) for line in text.splitlines() if line.startswith("ENV ")),
                   key=lambda r: int(r["RANK"]))
    assert [r["RANK"] for r in ranks] == ["0", "1", "2", "3"], text
    assert [r["SLURMD_NODENAME"] for r in ranks] == ["node1", "node1", "node2", "node2"]
    assert [r["LOCAL_RANK"] for r in ranks] == ["0", "1", "0", "1"]
    for r in ranks:
        assert r["WORLD_SIZE"] == "4" and r["LOCAL_WORLD_SIZE"] == "2"
        assert r["MASTER_ADDR"] == "node1" and r["MASTER_PORT"] == str(10000 + job % 20000)
        assert r["OMP_NUM_THREADS"] == "1"
        assert r["argv"] == args
    assert f"job {job} (restart 0) | 2 nodes | world size 4 | master node1:" in text
    assert "node node1: ranks 0-1" in text and "node node2: ranks 2-3" in text
    for rank, node in enumerate(["node1", "node1", "node2", "node2"]):
        assert f"rank {rank} of 4 (local rank {rank % 2}) on {node}" in text


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training(tiny_dataset, minilm_tokenizer_dir, tmp_path_factory):
    """Pretrain flags for a tiny BERT on the tiny Lee dataset (as tests/test_engine.py uses)."""
    root = tmp_path_factory.mktemp("slurm_training")
    model = tiny_bert_config_dir(root)
    flags = ["--data", tiny_dataset, "--model-config", str(model), "--tokenizer", minilm_tokenizer_dir,
             "--deepspeed", "ds_configs/zero2.json", "--micro-batch-size", "4", "--max-steps", str(STEPS),
             "--log-interval", "1", "--lr", "1e-3", "--warmup", "2", "--eval-heldout-docs", "10",
             "--eval-max-length", "64", "--seed", "7"]
    return {"root": root, "flags": flags}


@pytest.fixture(scope="module")
def uninterrupted(cluster, training):
    """One uninterrupted 2-node run: the reference for the interrupted one."""
    root = training["root"]
    out = root / "uninterrupted"
    job, log = submit(cluster, root, training["flags"] + ["--output-dir", str(out), "--save-interval", "10"])
    wait_done(cluster, job, log)
    return out, read(log)


def final_marker(out: Path) -> dict:
    from retromae_ds.engine.checkpoint import complete_checkpoints, read_marker

    done = complete_checkpoints(out)
    assert done, f"no complete checkpoint in {out}"
    return read_marker(done[-1])


@slurm
def test_two_node_job_trains_and_writes_checkpoints_and_tensorboard(uninterrupted):
    out, text = uninterrupted
    assert "| 2 nodes | world size 2 |" in text
    assert "node node1: rank 0" in text and "node node2: rank 1" in text
    assert "rank 0 of 2 (local rank 0) on node1" in text and "rank 1 of 2 (local rank 0) on node2" in text
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), text[-4000:]
    assert all(math.isfinite(r["loss"]) for r in rows)
    marker = final_marker(out)
    assert marker["step"] == STEPS and marker["world_size"] == 2 and marker["reason"] == "finished"
    from retromae_ds.engine.checkpoint import complete_checkpoints

    assert [p.name for p in complete_checkpoints(out)][-2:] == ["step_00000030", "step_00000036"]
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(p.stat().st_size > 0 for p in events)
    assert (out / "export" / "config.json").exists()


@slurm
def test_time_limit_warning_and_preemption_resume_exactly(cluster, training, uninterrupted):
    ref_out, _ = uninterrupted
    root = training["root"]
    out = root / "interrupted"
    job, log = submit(cluster, root, training["flags"] + ["--output-dir", str(out), "--save-interval", "0",
                                                          "--keep-last", "10"])
    deadline = time.monotonic() + JOB_TIMEOUT
    steps_logged = lambda n: (lambda: len(train_rows(out)) >= n)  # noqa: E731

    # 1) the time-limit warning: what --signal=B:USR1@300 sends to the batch shell
    wait_until(steps_logged(3), "3 logged steps", cluster, job, log, deadline)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    wait_until(lambda: "resumed from" in read(log), "a resumed run", cluster, job, log, deadline)
    first_stop = int(re.search(r"stopped on signal at step (\d+)/", read(log)).group(1))

    # 2) preemption-style: `scontrol requeue` sends SIGTERM to every process, Slurm requeues the job
    wait_until(steps_logged(first_stop + 3), f"{first_stop + 3} logged steps", cluster, job, log, deadline)
    cluster.run("scontrol", "requeue", str(job))
    wait_done(cluster, job, log, restarts=2, deadline=deadline)
    text = read(log)

    stops = [int(s) for s in re.findall(r"stopped on signal at step (\d+)/" + str(STEPS), text)]
    resumes = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert len(stops) == 2 and stops == resumes and 0 < stops[0] < stops[1] < STEPS, text[-6000:]
    assert "SIGUSR1 (time limit near)" in text and f"requeued job {job}" in text
    assert "SIGTERM (preemption" in text and "(restart 2)" in text

    from retromae_ds.engine.checkpoint import complete_checkpoints, read_marker

    markers = {read_marker(p)["step"]: read_marker(p) for p in complete_checkpoints(out)}
    assert [markers[s]["reason"] for s in stops] == ["signal", "signal"]
    final, ref = final_marker(out), final_marker(ref_out)
    assert final["step"] == ref["step"] == STEPS and final["reason"] == "finished"
    assert final["client_state"]["sampler"] == ref["client_state"]["sampler"]
    assert final["client_state"]["tokens_seen"] == ref["client_state"]["tokens_seen"]

    rows, ref_rows = train_rows(out), train_rows(ref_out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step once: none repeated or lost
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # the same samples, bitwise
