"""Defects that only show at scale (multi-node, days-long, bf16), each pinned by a test that fails on
the old behaviour: NaN steps and checkpoints, the schedule across a world-size change, who decides
what to resume from, bf16 numerics, precision choice, the offload optimizer, device mapping under
Slurm, signals during a save, and a wheel install outside the checkout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from retromae_ds import config as C
from retromae_ds.engine import checkpoint as ck
from retromae_ds.engine import ds_config
from retromae_ds.engine.distributed import device_index, native_bf16
from retromae_ds.engine.schedule import lr_at, plan_schedule
from retromae_ds.errors import UserError
from tests.helpers import engine_runs as R
from tests.helpers.tiny_run import tiny_run

# No --eval-max-length: the default (256) is longer than the tiny model's 128 positions, which the final
# evaluation must handle (it used to fail there, after training).
COMMON = ["--micro-batch-size", "4", "--log-interval", "1", "--lr", "1e-3", "--warmup", "2",
          "--eval-heldout-docs", "10", "--seed", "5", "--no-export", "--deepspeed", "ds_configs/zero2.json"]


# ------------------------------------------------------------------------------------------------
# configuration decisions (no processes)
# ------------------------------------------------------------------------------------------------

def _resolve(json_name: str, precision: str, **cfg_kw) -> dict:
    cfg = C.TrainConfig(**cfg_kw)
    return ds_config.resolve_deepspeed_config(ds_config.load_deepspeed_json(f"ds_configs/{json_name}"), cfg,
                                              world_size=2, precision=precision)


def test_bf16_checks_overflow_and_accumulates_and_reduces_in_fp32():
    ds = _resolve("zero2.json", "bf16")
    assert ds["bf16"]["check_grad_overflow"] is True
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    assert "data_types" not in _resolve("zero2.json", "fp32")  # fp32 runs are untouched
    raw = ds_config.load_deepspeed_json("ds_configs/zero2.json")
    raw["bf16"]["check_grad_overflow"] = False
    with pytest.raises(UserError, match="check_grad_overflow"):
        ds_config.resolve_deepspeed_config(raw, C.TrainConfig(), world_size=1, precision="bf16")
    raw = ds_config.load_deepspeed_json("ds_configs/zero2.json")
    raw["communication_data_type"] = "bf16"  # an explicit choice in the JSON is kept
    assert ds_config.resolve_deepspeed_config(raw, C.TrainConfig(), world_size=1, precision="bf16")["communication_data_type"] == "bf16"


def test_precision_auto_uses_bf16_only_where_the_hardware_has_it():
    assert not native_bf16("cuda", (7, 0)) and not native_bf16("cuda", (7, 5))  # V100, T4: emulated
    assert native_bf16("cuda", (8, 0)) and native_bf16("cuda", (9, 0))  # A100, H100
    assert not native_bf16("cpu", None)
    cfg = C.TrainConfig()
    assert ds_config.resolve_precision(cfg, "cuda", native_bf16("cuda", (7, 0))) == "fp16"
    assert ds_config.resolve_precision(cfg, "cuda", native_bf16("cuda", (8, 6))) == "bf16"


def test_offloaded_optimizer_uses_deepspeeds_cpu_adam():
    assert _resolve("zero3_offload.json", "fp32")["optimizer"]["params"]["torch_adam"] is False
    assert _resolve("zero2.json", "fp32")["optimizer"]["params"]["torch_adam"] is True
    assert _resolve("zero3.json", "fp32")["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("local_rank,count,want", [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1)])
def test_each_rank_picks_a_device_it_can_see(local_rank, count, want):
    # --gpus-per-task=1 / --gpu-bind: each task sees one GPU while LOCAL_RANK counts the node's tasks
    assert device_index(local_rank, count) == want
    with pytest.raises(RuntimeError, match="no accelerator"):
        device_index(0, 0)


def test_schedule_is_defined_in_samples_of_the_first_global_batch():
    # 10M blocks, 8 epochs, global batch 16 x 32 = 512 on 16 GPUs; resumed on 32 GPUs (global batch 1024)
    sched = plan_schedule(max_steps=0, epochs=8, warmup=0.1, num_samples=10_000_000, batch=512)
    assert sched.end_samples >= 80_000_000 and sched.end_samples - 80_000_000 < 512
    consumed = 60_000 * 512
    kw = dict(peak_lr=1e-4, total_steps=sched.total_steps, warmup=sched.warmup)
    before = lr_at(60_000 - 1, **kw)
    after = lr_at(sched.position(consumed), **kw)  # what the resumed run uses, whatever its batch
    assert after == pytest.approx(before, rel=1e-4)
    remaining = math.ceil((sched.end_samples - consumed) / 1024)
    assert (consumed + remaining * 1024) / 10_000_000 == pytest.approx(8, abs=1024 / 10_000_000)
    # unchanged world size: the position is the step, bit for bit
    assert sched.position(1234 * 512) == 1234


def test_one_object_gives_each_steps_rates_schedule_rewarm_and_new_parts_phase():
    """LearningRates: the schedule's rate at the sample position, ramped back over min(100, warm-up) steps
    after a resume on a new world size, and the encoder's rate held at the new-parts factor during the
    phase (counted in samples too). The reference is written out here."""
    from retromae_ds.engine.new_parts import NewPartsWarmup
    from retromae_ds.engine.schedule import LearningRates

    sched = plan_schedule(max_steps=1000, epochs=0, warmup=200, num_samples=10_000, batch=64)
    rates = LearningRates(sched, peak_lr=1e-3, kind="cosine", min_ratio=0.1, rewarm_from=None,
                          new_parts=NewPartsWarmup(steps=50, encoder_lr_ratio=0.25, parts=("c_head",)))

    def schedule(position):  # linear warm-up over 200 steps, cosine to 10% at step 1000
        if position < 200:
            return 1e-3 * (position + 1) / 200
        progress = (position - 200) / 800
        return 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    for step in (0, 49, 50, 199, 200, 600, 999):
        lr, encoder = rates.at(step * 64, step)
        assert lr == pytest.approx(schedule(step), rel=1e-12)
        assert encoder == pytest.approx(lr * (0.25 if step < 50 else 1.0), rel=1e-12)
    # resumed at step 300 on a new world size with a global batch of 128: re-warm over 100 steps
    rewarmed = LearningRates(sched, peak_lr=1e-3, kind="cosine", min_ratio=0.1, rewarm_from=300)
    for step, consumed in ((300, 300 * 64), (301, 300 * 64 + 128), (420, 300 * 64 + 120 * 128)):
        lr, encoder = rewarmed.at(consumed, step)
        want = schedule(consumed / 64) * min(1.0, (step - 300 + 1) / 100)
        assert lr == pytest.approx(want, rel=1e-12) and encoder == lr
    # the phase ends after 50 x 64 samples, whatever the batch now is
    assert rates.at(49 * 64 + 32, 70)[1] < rates.at(49 * 64 + 32, 70)[0]
    assert rates.at(50 * 64, 71)[1] == rates.at(50 * 64, 71)[0]


def test_every_rank_resumes_from_rank_zeros_choice_or_stops_naming_who_cannot_see_it(tmp_path):
    """Two real gloo ranks, each with its own --output-dir (what a node-local or lagging folder looks like)."""
    script = tmp_path / "agree.py"
    script.write_text(_AGREE_SCRIPT)
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    for d in dirs:
        d.mkdir()
    for step in (2, 4):
        _fake_checkpoint(dirs[0], step)
    _fake_checkpoint(dirs[1], 2)  # rank 1 lags: it has step 2 but not rank 0's step 4
    _fake_checkpoint(dirs[1], 6)  # ... and a step rank 0 never wrote
    out = _run_two_ranks(script, dirs, tmp_path, "auto")
    for rank in (0, 1):
        assert out[rank]["error"] and "rank 1 on" in out[rank]["error"] and "step_00000004" in out[rank]["error"]
    _fake_checkpoint(dirs[1], 4)
    out = _run_two_ranks(script, dirs, tmp_path, "auto")
    assert [Path(o["path"]).name for o in out] == ["step_00000004", "step_00000004"]  # not rank 1's step 6
    assert Path(out[1]["path"]).parent.parent == dirs[1]
    explicit = str(ck.checkpoint_root(dirs[0]) / "step_00000002")
    out = _run_two_ranks(script, dirs, tmp_path, explicit)
    assert [o["path"] for o in out] == [explicit, explicit]


_AGREE_SCRIPT = '''
import json, os, sys
import torch.distributed as dist
from pathlib import Path
from retromae_ds.config import TrainConfig
from retromae_ds.engine.distributed import DistInfo
from retromae_ds.engine.checkpointer import Checkpointer
from retromae_ds.errors import UserError
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
info = DistInfo(rank=rank, world_size=2, local_rank=rank, local_world_size=2, device=None, device_type="cpu")
checkpointer = Checkpointer(TrainConfig(resume=sys.argv[rank + 1]), info, Path(sys.argv[3 + rank]))
result = {"path": None, "error": None}
try:
    point = checkpointer.find_resume()
    result["path"] = str(point.path) if point else None
except UserError as err:
    result["error"] = str(err)
Path(sys.argv[5 + rank]).write_text(json.dumps(result))
dist.destroy_process_group()
'''


def _fake_checkpoint(root: Path, step: int) -> Path:
    p = ck.checkpoint_root(root) / ck.tag_for(step)
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    ck.write_marker(p, {"step": step, "world_size": 2, "files": ck.build_manifest(p, {})})
    return p


def _run_two_ranks(script: Path, dirs: list[Path], tmp: Path, resume: str) -> list[dict]:
    port = str(R.free_port())
    results = [tmp / "r0.json", tmp / "r1.json"]
    procs = []
    for rank in range(2):
        env = R.run_env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen([sys.executable, str(script), resume, resume, str(dirs[0]), str(dirs[1]),
                                       str(results[0]), str(results[1])], env=env, cwd=R.REPO))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    return [json.loads(r.read_text()) for r in results]


# ------------------------------------------------------------------------------------------------
# real runs
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("scale"), n_docs=80, max_seq_len=32)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from retromae_ds.engine.export import load_checkpoint_model

    model, *_ = load_checkpoint_model(checkpoint)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.full
def test_bf16_nan_in_one_micro_batch_is_skipped_and_never_pruned_past(setup):
    """bf16, accumulation 2, a NaN in micro-batch 0 only (the trainer used to read the last one's loss).
    Steps 3-5 are bad; saves during the bad run must not prune the good step-2 checkpoint (keep-last 1)."""
    out = setup["root"] / "bf16_nan"
    args = setup["base"] + COMMON + ["--output-dir", str(out), "--precision", "bf16", "--grad-accum", "2",
                                     "--max-steps", "12", "--save-interval", "1", "--keep-last", "1",
                                     "--max-nonfinite-steps", "3"]
    res = R.run("python", 1, args, setup["root"] / "bf16_nan.log", script=R.PROBE,
                env={"RETROMAE_TEST_NONFINITE_STEPS": "2,3,4", "RETROMAE_TEST_NONFINITE_MICRO": "0"})
    assert res.returncode == 3, res.stdout[-4000:]
    rows = {r["step"]: r for r in R.metrics(out)}
    assert rows[2]["skipped_steps"] == 0 and rows[3]["skipped_steps"] == 1 and rows[5]["skipped_steps"] == 3
    marker = ck.read_marker(ck.checkpoint_root(out) / ck.tag_for(5))
    assert marker["precision"] == "bf16" and marker["grad_accum_dtype"] == "float32"
    assert marker["communication_dtype"] == "float32"
    names = [p.name for p in ck.complete_checkpoints(out)]
    assert names == ["step_00000002", "step_00000003", "step_00000004", "step_00000005"], names
    good, last = _weights(ck.checkpoint_root(out) / ck.tag_for(2)), _weights(ck.checkpoint_root(out) / ck.tag_for(5))
    assert all(torch.isfinite(v).all() for v in last.values())
    assert all(torch.equal(good[k], last[k]) for k in good)  # skipped steps changed nothing


@pytest.mark.full
def test_epochs_run_resumed_with_another_world_size_keeps_its_schedule_and_end(setup):
    """A 2-rank --epochs run (global batch 8), resumed from its step-2 checkpoint by 1 rank (global batch
    4): it must end after the same number of samples, on the same LR curve (re-warmed after the reset)."""
    src = setup["root"] / "epochs2"
    args = setup["base"] + COMMON + ["--epochs", "0.05", "--save-interval", "2", "--keep-last", "3"]
    res = R.run("torchrun", 2, args + ["--output-dir", str(src)], setup["root"] / "epochs2.log")
    assert res.returncode == 0, res.stdout[-4000:]
    a = R.metrics(src)
    end_samples = a[-1]["samples_seen"]
    out = setup["root"] / "epochs1"
    shutil.copytree(ck.checkpoint_root(src) / ck.tag_for(2), ck.checkpoint_root(out) / ck.tag_for(2))
    res = R.run("python", 1, args + ["--output-dir", str(out)], setup["root"] / "epochs1.log")
    assert res.returncode == 0, res.stdout[-4000:]
    assert "new world size" in res.stdout
    b = R.metrics(out)
    assert b[-1]["samples_seen"] == end_samples  # the same end, in samples (epochs)
    assert [r["samples_seen"] for r in b] == list(range(16 + 4, end_samples + 1, 4))
    total_steps = math.ceil(end_samples / 8)
    for r in b:
        position = (r["samples_seen"] - 4) / 8  # samples consumed before this step, in steps of 8
        want = lr_at(position, peak_lr=1e-3, total_steps=total_steps, warmup=2)
        want *= min(1.0, (r["step"] - 2) / 2)  # re-warm over min(100, warm-up) = 2 steps
        assert r["lr"] == pytest.approx(want, rel=1e-9), (r, want)


def test_a_signal_during_a_save_stops_right_after_it(setup):
    out = setup["root"] / "sig_in_save"
    args = setup["base"] + COMMON + ["--output-dir", str(out), "--max-steps", "40", "--save-interval", "2"]
    res = R.run("python", 1, args, setup["root"] / "sig_in_save.log", script=R.PROBE,
                env={"RETROMAE_TEST_SIGTERM_AT_SAVE": "4"})
    assert res.returncode == 0, res.stdout[-4000:]
    assert "stopped on signal at step 4/40" in res.stdout
    assert [p.name for p in ck.complete_checkpoints(out)] == ["step_00000002", "step_00000004"]
    assert ck.read_marker(ck.checkpoint_root(out) / ck.tag_for(4))["reason"] == "interval"  # saved once
    assert max(r["step"] for r in R.metrics(out)) == 4


def test_a_built_wheel_runs_outside_the_checkout(tmp_path):
    """`pip install .` carries the DeepSpeed configs and the SLURM script; `retromae-ds train` finds its
    default config without a clone, and `retromae-ds init` writes editable copies."""
    src = tmp_path / "src"  # build from a copy: a build writes build/ and *.egg-info next to the sources
    skip_everywhere = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache")

    def is_env(folder):  # a venv or conda env made in the clone (`python3 -m venv venv`): GBs the wheel never needs
        return (folder / "pyvenv.cfg").is_file() or (folder / "conda-meta").is_dir()

    def ignore(folder, names):  # run outputs at the top only: retromae_ds/data is a package
        top = {".git", "runs", "data", "build"} & set(names) if Path(folder) == R.REPO else set()
        return top | {n for n in names if is_env(Path(folder, n))} | set(skip_everywhere(folder, names))

    shutil.copytree(R.REPO, src, symlinks=True, ignore=ignore)
    wheel_dir = tmp_path / "wheel"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(wheel_dir), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next(wheel_dir.glob("retromae_ds-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    # torch etc. come from the interpreter running this test. system_site_packages would show the *base*
    # interpreter's packages instead when this one is a venv or conda env. A .pth file appends this
    # interpreter's import path after the venv's own site-packages (where the wheel is), minus the checkout;
    # plain paths, so no .pth hook of an editable install of the checkout runs there. Written after the
    # install, so that pip sees a bare venv.
    res = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    outer = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != R.REPO]
    (Path(res.stdout.strip()) / "outer_interpreter.pth").write_text("".join(p + "\n" for p in outer))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = ("import retromae_ds, sys; from retromae_ds.engine.ds_config import load_deepspeed_json as l; "
             "assert 'site-packages' in retromae_ds.__file__, retromae_ds.__file__; "
             "import retromae_ds.data.loader as m; assert 'site-packages' in m.__file__, m.__file__; "
             "assert l('ds_configs/zero2.json')['zero_optimization']['stage'] == 2; "
             "assert l('zero3_offload')['zero_optimization']['offload_optimizer']['device'] == 'cpu'; "
             # the wheel in this venv, not another install; the dependencies this test runs with
             "assert all(f.startswith(sys.prefix) for f in (retromae_ds.__file__, m.__file__)), sys.path; "
             f"import torch; assert torch.__file__ == {torch.__file__!r}, torch.__file__")
    res = subprocess.run([str(py), "-c", check], capture_output=True, text=True, cwd=work, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([str(env_dir / "bin" / "retromae-ds"), "init", "mine"], capture_output=True, text=True,
                         cwd=work, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "mine" / "ds_configs" / "zero2.json").is_file() and (work / "mine" / "launch" / "slurm.sh").is_file()
    assert os.access(work / "mine" / "launch" / "slurm.sh", os.X_OK)
    res = subprocess.run([str(py), "-m", "retromae_ds.engine.trainer", "--help"], capture_output=True, text=True,
                         cwd=work, env=env)
    assert res.returncode == 0 and "--deepspeed" in res.stdout
