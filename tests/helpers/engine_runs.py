"""Helpers for tests that launch real training processes (python / torchrun / deepspeed launcher): start and
wait, read metrics.jsonl, the probe's records, checkpoint markers. The run's data and model: tiny_run.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tests/helpers/ -> the repository root
PRETRAIN = str(REPO / "launch" / "pretrain.py")
# launch/pretrain.py plus instrumentation (engine state, forward counts, fetched blocks): see its docstring
PROBE = str(REPO / "tests" / "helpers" / "probe_pretrain.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def command(launcher: str, nproc: int, args: list[str], script: str = PRETRAIN) -> list[str]:
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(free_port()), script, *args]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]
    raise ValueError(launcher)


def start(launcher: str, nproc: int, args: list[str], log: Path, env: dict | None = None,
          script: str = PRETRAIN) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(command(launcher, nproc, args, script), stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                            env=run_env(env), start_new_session=True)


def run(launcher: str, nproc: int, args: list[str], log: Path, timeout: float = 420,
        env: dict | None = None, script: str = PRETRAIN) -> subprocess.CompletedProcess:
    proc = start(launcher, nproc, args, log, env, script)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"run timed out after {timeout}s; log:\n{log.read_text()[-4000:]}")
    return subprocess.CompletedProcess(proc.args, rc, log.read_text(), "")


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def metrics(out_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind", "train") == kind]


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir)}


def grad_norms(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in metrics(out_dir)}


def probe_env(probe_dir: Path, save_init: bool = False, sigterm_after: int = 0) -> dict:
    """Environment for a run launched with script=PROBE (see tests/helpers/probe_pretrain.py)."""
    env = {"RETROMAE_TEST_PROBE": str(probe_dir)}
    if save_init:
        env["RETROMAE_TEST_PROBE_INIT"] = "1"
    if sigterm_after:
        env["RETROMAE_TEST_SIGTERM_AFTER"] = str(sigterm_after)
    return env


def probe(probe_dir: Path, rank: int = 0) -> dict:
    """What a PROBE run recorded; checks that this checkout's package is the one that ran."""
    record = json.loads((Path(probe_dir) / f"probe_rank{rank}.json").read_text())
    assert Path(record["module"]).resolve().is_relative_to(REPO), (record["module"], REPO)
    return record


def marker_of_last(out_dir: Path) -> dict | None:
    """The COMPLETE marker (JSON) of a run's newest complete checkpoint; None when there is none."""
    from retromae_ds.engine.checkpoint import complete_checkpoints, read_marker

    done = complete_checkpoints(out_dir)
    return read_marker(done[-1]) if done else None


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before the condition held")
        time.sleep(poll)
    raise AssertionError("timed out waiting")



def kill9_after_checkpoint(launcher: str, nproc: int, args: list[str], out: Path, log: Path, step: int,
                           never: int, timeout: float = 300) -> None:
    """Start the run, kill -9 its whole process group once checkpoint `step` is complete, and check the
    kill came before checkpoint `never` (the run did not simply finish)."""
    import time

    proc = start(launcher, nproc, args, log)
    try:
        wait_for(lambda: (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists(), timeout, proc)
        time.sleep(0.3)
    finally:
        kill_group(proc)
    assert not (out / "checkpoints" / f"step_{never:08d}" / "COMPLETE").exists(), "run finished before the kill"
