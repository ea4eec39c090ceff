"""Process-group start-up that works the same under `deepspeed`, `torchrun`, `srun` and plain `python`.

Why: DeepSpeed's own discovery tries MPI when RANK/WORLD_SIZE are missing (it fails without mpi4py),
and SLURM tasks only carry SLURM_* variables. We normalise everything to the torch.distributed
environment variables first, then let DeepSpeed pick the backend (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: "object"  # torch.device
    device_type: str  # "cuda" | "cpu" | ...

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def normalise_env(local_rank_arg: int | None = None) -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from SLURM or defaults for a single process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "RANK" not in env:  # plain `python launch/pretrain.py`: a world of one
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_RANK" not in env and local_rank_arg is not None:
        env["LOCAL_RANK"] = str(local_rank_arg)
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")


# Where the node-wide task index goes when LOCAL_RANK is rewritten to the device index (see below).
NODE_LOCAL_RANK_ENV = "RETROMAE_NODE_LOCAL_RANK"


def _skip_inference_shm_op(deepspeed, accel) -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op when the process group starts on a CPU.

    DeepSpeed 0.19 JIT-builds `deepspeed_shm_comm` at every `init_distributed` on a CPU accelerator: 45 s
    the first time in an environment on an idle 2-core machine (minutes on a busy one), then loaded from
    TORCH_EXTENSIONS_DIR. Only DeepSpeed-Inference's tensor-parallel layers call it (`inference_all_reduce`);
    training's collectives (ZeRO's all-gathers and reduce-scatters, our all-reduces) go through
    torch.distributed. So it is marked unavailable, as DeepSpeed itself marks it on a machine that cannot
    build it, and DeepSpeed then leaves it out."""
    builder = accel.create_op_builder("ShareMemCommBuilder")
    compatible = getattr(getattr(deepspeed, "ops", None), "__compatible_ops__", None)
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


def init_distributed(local_rank_arg: int | None = None,
                     timeout: datetime.timedelta | float | None = None) -> DistInfo:
    """Start the process group and bind this rank to its accelerator.

    `timeout`: how long any collective may wait (a timedelta, or seconds); None keeps DeepSpeed's default
    (10 minutes, or DEEPSPEED_TIMEOUT). The trainer passes --dist-timeout: rank 0 alone reads whole
    checkpoints (verification, consolidation, export) while the other ranks wait in a collective.
    Once per process: on accelerators it rewrites LOCAL_RANK to the device index (see
    `_point_local_rank_at_device`)."""
    normalise_env(local_rank_arg)
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "0")) or 0)
    if not local_world:
        local_world = max(1, int(os.environ["WORLD_SIZE"]) // max(1, int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1)))
    accel = get_accelerator()
    device_type = accel.device_name()
    local_rank = int(os.environ["LOCAL_RANK"])  # node-wide task index (DistInfo.local_rank)
    if device_type == "cpu":
        # The deepspeed launcher does not set OMP_NUM_THREADS: N ranks x all cores thrash.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, min(local_world, int(os.environ["WORLD_SIZE"])))))
        device = torch.device("cpu")
        _skip_inference_shm_op(deepspeed, accel)
    else:
        index = device_index(local_rank, accel.device_count())
        accel.set_device(index)
        device = torch.device(accel.device_name(index))
        _point_local_rank_at_device(local_rank, index)
    quiet_libraries()
    kwargs = {}
    if timeout is not None:
        kwargs["timeout"] = timeout if isinstance(timeout, datetime.timedelta) else datetime.timedelta(seconds=float(timeout))
    deepspeed.init_distributed(dist_init_required=True, verbose=False, **kwargs)
    if "timeout" in kwargs:
        _default_timeout_for_new_groups(kwargs["timeout"])
    import torch.distributed as dist

    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    local_world_size=local_world, device=device, device_type=device_type)


def _default_timeout_for_new_groups(timeout: datetime.timedelta) -> None:
    """Give every process group created later the world group's timeout. DeepSpeed builds its own groups
    (ZeRO's data-parallel and parameter groups, sequence and expert parallelism) with a bare
    `torch.distributed.new_group(ranks)`, which takes torch's backend default (30 min for gloo, 10 min for
    NCCL) instead of --dist-timeout: a rank waiting there while rank 0 reads a large checkpoint would fail
    after 10 minutes whatever the flag says. torch reads these module defaults at each new_group call."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


def _point_local_rank_at_device(node_rank: int, index: int) -> None:
    """Make LOCAL_RANK the device index we chose, because DeepSpeed reads it again for the device.

    DeepSpeed 0.19.8 takes the device from the LOCAL_RANK variable, not from the current device:
    - deepspeed/comm/torch.py:280-281 (TorchBackend.init_process_group, CUDA, world > 1):
      `device_id=get_accelerator().device(int(os.environ.get('LOCAL_RANK', 0)))` for init_process_group;
    - deepspeed/runtime/engine.py:1966 (`_configure_with_arguments`): `self.local_rank =
      int(os.environ['LOCAL_RANK'])`, then engine.py:1941-1944 (`_set_distributed_vars`):
      `set_device(self.local_rank)` and `self.device` from it;
    - deepspeed/runtime/zero/partition_parameters.py:1138 and zero/utils.py:85,105 (ZeRO-3) build
      `device_name(os.environ["LOCAL_RANK"])`.
    With one visible GPU per task (srun --gpus-per-task=1) every one of these is "invalid device ordinal"
    on local ranks 1-7, so the variable must hold the index of a device this process can see. The
    `--local_rank` argument of the deepspeed launcher does not matter to DeepSpeed here: it is read from
    `args` only (engine.py:1941 `args.device_rank`, 1976-1983 a check against LOCAL_RANK), and we call
    deepspeed.initialize without `args`. Under mpirun, engine.py:1959-1964 asserts LOCAL_RANK ==
    OMPI_COMM_WORLD_LOCAL_RANK, so that one follows. The node-wide index stays in DistInfo.local_rank and
    in RETROMAE_NODE_LOCAL_RANK. (DeepSpeed's `use_node_local_storage` and ZeRO-3
    `pipeline_loading_checkpoint` treat LOCAL_RANK as node-wide; our configs use neither.)"""
    os.environ[NODE_LOCAL_RANK_ENV] = str(node_rank)
    os.environ["LOCAL_RANK"] = str(index)
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)


def device_index(local_rank: int, device_count: int) -> int:
    """The accelerator a rank drives: LOCAL_RANK modulo the devices this process can see.

    Why modulo: under `srun --gpus-per-task=1`, `--gpu-bind=closest` or a site default that binds GPUs
    per task, each task sees exactly ONE device (index 0) while LOCAL_RANK still counts the tasks of the
    node; `set_device(LOCAL_RANK)` would fail with "invalid device ordinal". With all GPUs visible (the
    deepspeed/torchrun launchers) the modulo is the identity."""
    if device_count < 1:
        raise RuntimeError("no accelerator device is visible to this process (check CUDA_VISIBLE_DEVICES "
                           "and the job's GPU binding).")
    return local_rank % device_count


def native_bf16(device_type: str, capability: tuple[int, int] | None) -> bool:
    """bf16 in hardware: CUDA compute capability 8.0+ (A100, H100, RTX 30xx+). Not
    `torch.cuda.is_bf16_supported()`, which also says yes on V100/T4, where bf16 is emulated and runs
    several times slower than fp16."""
    return device_type == "cuda" and capability is not None and tuple(capability) >= (8, 0)


def quiet_libraries() -> None:
    """DeepSpeed logs every config key at INFO on every rank; users need our lines, not those."""
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger

    if os.environ.get("RETROMAE_DS_VERBOSE", "") in ("", "0"):
        ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_max(values, device) -> list[float]:
    """Agree on flags/numbers across ranks (e.g. 'a rank got SIGTERM'); `values` a list or a tensor."""
    import torch
    import torch.distributed as dist

    if isinstance(values, torch.Tensor):
        t = values.to(device)
    else:
        t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values, device) -> list[float]:
    """Sums across ranks; `values` a list or a tensor (a device tensor is reduced in place: one read)."""
    import torch
    import torch.distributed as dist

    if isinstance(values, torch.Tensor):
        t = values.to(device)
    else:
        t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's value of a small picklable object, on every rank (one rank decides, all follow)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(work, is_main: bool, failure):
    """`work()` on rank 0 alone, while the others wait: its result on rank 0 (None elsewhere), or, when it
    raises, the same UserError on every rank (`failure(reason)` words it). Raised on rank 0 only, the
    others would wait in their next collective until the process-group timeout."""
    from retromae_ds.errors import UserError

    result, error = None, None
    if is_main:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
            error = f"{err}" if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    error = broadcast_object(error)
    if error:
        raise UserError(failure(error))
    return result


def all_gather_object(obj) -> list:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
