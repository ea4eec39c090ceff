"""What DeepSpeed sees at process-group start: the device index in LOCAL_RANK, and our timeout.

No process group is started: the accelerator and `deepspeed.init_distributed` are replaced by fakes
that record what they were given (DeepSpeed reads LOCAL_RANK from the environment during the call).
"""

import argparse
import datetime
import os

import pytest

from retromae_ds import config as C
from retromae_ds.engine import distributed as D
from retromae_ds.errors import UserError


class FakeCudaAccelerator:
    def __init__(self, count: int):
        self.count, self.set_devices = count, []

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.set_devices.append(index)


@pytest.fixture
def fake_start(monkeypatch):
    """start(count, env, **kw) -> (DistInfo, accelerator, what deepspeed.init_distributed saw)."""
    import deepspeed
    import deepspeed.accelerator
    import torch.distributed

    def start(count: int, env: dict, **kwargs):
        for name in ("RETROMAE_NODE_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_SIZE", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)  # restored (or removed again) after the test
        for name, value in {"MASTER_ADDR": "127.0.0.1", **env}.items():
            monkeypatch.setenv(name, value)
        accel = FakeCudaAccelerator(count)
        seen = {}

        def fake_init_distributed(**kw):
            seen["LOCAL_RANK"] = os.environ["LOCAL_RANK"]
            seen["OMPI_COMM_WORLD_LOCAL_RANK"] = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
            seen["kwargs"] = kw

        monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accel)
        monkeypatch.setattr(deepspeed, "init_distributed", fake_init_distributed)
        monkeypatch.setattr(D, "quiet_libraries", lambda: None)
        import torch.distributed.distributed_c10d as c10d
        for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # init_distributed sets them: restored
            monkeypatch.setattr(c10d, name, getattr(c10d, name, None), raising=False)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: int(env["RANK"]))
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: int(env["WORLD_SIZE"]))
        return D.init_distributed(**kwargs), accel, seen

    return start


SLURM_TASK_3_OF_8 = {"LOCAL_RANK": "3", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}


def test_one_visible_gpu_per_task_deepspeed_sees_device_0(fake_start):
    # srun --gpus-per-task=1: task 3 of the node sees one GPU, index 0; DeepSpeed's
    # init_process_group(device_id=LOCAL_RANK) and engine set_device(LOCAL_RANK) must get 0, not 3.
    info, accel, seen = fake_start(1, SLURM_TASK_3_OF_8)
    assert accel.set_devices == [0]
    assert seen["LOCAL_RANK"] == "0"
    assert os.environ["LOCAL_RANK"] == "0"  # also for deepspeed.initialize later in the process
    assert os.environ["RETROMAE_NODE_LOCAL_RANK"] == "3"
    assert info.local_rank == 3 and info.local_world_size == 8  # still the node-wide index
    assert (info.rank, info.world_size, str(info.device)) == (3, 8, "cuda:0")


def test_all_gpus_visible_local_rank_is_unchanged(fake_start):
    info, accel, seen = fake_start(8, SLURM_TASK_3_OF_8)
    assert accel.set_devices == [3] and seen["LOCAL_RANK"] == "3" and os.environ["LOCAL_RANK"] == "3"
    assert info.local_rank == 3 and str(info.device) == "cuda:3"


def test_mpirun_local_rank_follows(fake_start):
    # DeepSpeed's engine asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK when the latter is set.
    _, _, seen = fake_start(1, {**SLURM_TASK_3_OF_8, "OMPI_COMM_WORLD_LOCAL_RANK": "3"})
    assert seen["LOCAL_RANK"] == seen["OMPI_COMM_WORLD_LOCAL_RANK"] == "0"


def test_timeout_reaches_deepspeed(fake_start):
    _, _, seen = fake_start(8, SLURM_TASK_3_OF_8, timeout=C.parse_dist_timeout("90m"))
    assert seen["kwargs"]["timeout"] == datetime.timedelta(minutes=90)
    _, _, seen = fake_start(8, SLURM_TASK_3_OF_8, timeout=datetime.timedelta(hours=2))
    assert seen["kwargs"]["timeout"] == datetime.timedelta(hours=2)
    _, _, seen = fake_start(8, SLURM_TASK_3_OF_8)  # None: DeepSpeed's own default
    assert "timeout" not in seen["kwargs"]


def test_timeout_reaches_the_groups_deepspeed_creates(tmp_path):
    """DeepSpeed builds its groups with a bare new_group(ranks), which takes torch's backend default
    (30 min for gloo, 10 min for NCCL): with --dist-timeout those groups must wait as long as the world
    group. A real one-process gloo world in a fresh interpreter (it changes torch's module defaults).
    The same start compiles nothing: DeepSpeed's CPU shm op (inference only) is left out, so an empty
    extension cache stays empty."""
    import subprocess
    import sys

    from tests.helpers.engine_runs import REPO, free_port, run_env

    code = (
        "import datetime, torch, torch.distributed as dist\n"
        "from retromae_ds.engine.distributed import init_distributed\n"
        "init_distributed(timeout=datetime.timedelta(seconds=77))\n"
        "cpu = torch.device('cpu')\n"
        "group = dist.new_group([0])\n"
        "print('timeouts', dist.distributed_c10d._get_default_group()._get_backend(cpu).options._timeout,"
        " group._get_backend(cpu).options._timeout)\n"
        "from deepspeed.comm import comm\n"
        "print('shm op', comm.cdb.shm_comm_op)\n")
    env = run_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(free_port()), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")})
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("timeouts"))
    assert line.split()[1:] == ["0:01:17", "0:01:17"], line
    assert "shm op None" in res.stdout and not (tmp_path / "extensions").exists(), res.stdout[-2000:]


def parse(*argv):
    p = argparse.ArgumentParser()
    C.add_arguments(p)
    return C.config_from_args(p.parse_args(list(argv)))


def test_dist_timeout_flag():
    assert C.parse_dist_timeout(parse().dist_timeout) == 3600.0  # default 60m
    assert C.parse_dist_timeout(parse("--dist-timeout", "2h").dist_timeout) == 7200.0
    assert C.parse_dist_timeout("5400") == 5400.0 and C.parse_dist_timeout("1h30m") == 5400.0
    for bad in ("0", "0m", "", "soon", "-5", "60 minutes"):
        with pytest.raises(UserError, match=r"--dist-timeout .*> 0"):
            C.parse_dist_timeout(bad)
    with pytest.raises(UserError, match="--dist-timeout"):
        parse("--dist-timeout", "0")


def test_dist_timeout_from_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("dist_timeout: 3600\n")  # a YAML number: seconds, like a bare number on the CLI
    cfg = parse("--config", str(y))
    assert cfg.dist_timeout == "3600" and C.parse_dist_timeout(cfg.dist_timeout) == 3600.0
