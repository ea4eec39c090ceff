"""Faults a multi-node GPU run meets, reproduced on 2 CPU ranks through the probe's injections
(tests/helpers/probe_pretrain.py): every one must end with a clear error and a non-zero exit on every rank,
never a hang in a collective, and never a checkpoint that only looks complete.

- a node-local --output-dir (a rank's files invisible to rank 0): fails at the first save;
- fp16's loss-scale search (overflow skips while the scale settles) is not a run of NaN/inf steps;
- an exception on rank 0 while exporting, or while consolidating weights for a new world size;
- a full disk while DeepSpeed copies zero_to_fp32.py into the checkpoint (rank 0 only).

Plus unit tests of the pieces: the BF16_Optimizer state label, the finite check over its masters.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import engine_runs as R
from tests.helpers.tiny_run import tiny_run

ARGS = ["--micro-batch-size", "2", "--log-interval", "1", "--lr", "1e-3", "--warmup", "0",
        "--eval-heldout-docs", "10", "--eval-max-length", "32", "--seed", "5", "--deepspeed", "zero2"]
# every run here must end well inside this: a hang in a collective would wait for the process-group timeout
NO_HANG = 240


@pytest.fixture(scope="module")
def lee(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("faults"), n_docs=40, max_seq_len=32)


def exit_codes(res) -> set[int]:
    """The ranks' exit codes: torchrun itself exits 1 when a rank fails and lists each failed rank's code
    in its report ("exitcode  : N"). A rank still exiting when the first one is gone may be stopped by
    torchrun's SIGTERM (-15) instead: not counted, as the run ending at all shows no rank hung."""
    if res.returncode == 0 or "ChildFailedError" not in res.stdout:
        return {res.returncode}
    return {int(code) for code in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", res.stdout, re.M)} - {-15}


def rank_tracebacks(log: str) -> list[str]:
    """Tracebacks printed by the training ranks (torchrun's own report of a failed child is not one)."""
    return [line for line in log.splitlines() if line.startswith("[rank") and "Traceback" in line]


def launch(lee, name, nproc, extra, env=None):
    root = lee["root"]
    out = root / name
    launcher = "python" if nproc == 1 else "torchrun"
    res = R.run(launcher, nproc, lee["base"] + ARGS + ["--output-dir", str(out)] + extra, root / f"{name}.log",
                timeout=NO_HANG, script=R.PROBE, env={**R.probe_env(root / f"{name}.probe"), **(env or {})})
    return out, res


@pytest.mark.distributed
def test_a_node_local_output_dir_fails_at_the_first_save_naming_host_and_path(lee):
    out, res = launch(lee, "unshared", 2, ["--max-steps", "3", "--save-interval", "1", "--no-export"],
                      env={"RETROMAE_TEST_HIDE_SAVED_FILES_RANK": "1"})
    assert exit_codes(res) == {2}, res.stdout[-3000:]
    assert "is not shared by all ranks: rank 1 on" in res.stdout, res.stdout[-3000:]
    assert "optim_states.pt" in res.stdout and not rank_tracebacks(res.stdout), res.stdout[-3000:]
    metrics = R.metrics(out)
    assert [m["step"] for m in metrics] == [1], metrics  # stopped at the first save, trained no further
    assert R.marker_of_last(out) is None  # nothing that looks complete was left behind
    assert not (out / "checkpoints").exists(), list((out / "checkpoints").iterdir())  # nor DeepSpeed's script


@pytest.mark.distributed
def test_fp16_loss_scale_search_is_not_a_nonfinite_stop_but_nan_losses_are(lee, tmp_path):
    # A loss scale of 2^40 overflows every fp16 gradient: DeepSpeed skips steps while it halves the scale.
    ds = json.loads((R.REPO / "ds_configs" / "zero2.json").read_text())
    ds["fp16"]["initial_scale_power"] = 40
    config = tmp_path / "fp16_high_scale.json"
    config.write_text(json.dumps(ds))
    steps, nan_from = 7, 5
    out, res = launch(lee, "fp16_search", 2,
                      ["--deepspeed", str(config), "--precision", "fp16", "--max-steps", str(steps),
                       "--max-nonfinite-steps", "3", "--save-interval", "0", "--no-export"],
                      env={"RETROMAE_TEST_FP16_ON_CPU": "1",
                           "RETROMAE_TEST_NONFINITE_STEPS": ",".join(str(s) for s in range(nan_from - 1, steps))})
    rows = {m["step"]: m for m in R.metrics(out)}
    # the first 4 steps were overflow skips (finite losses): counted apart, they stop nothing
    assert rows[nan_from - 1]["loss_scale_skips"] == nan_from - 1 and rows[nan_from - 1]["skipped_steps"] == 0, rows
    # then 3 NaN losses in a row (steps 5-7 in the log's 1-based numbering): that is the non-finite stop
    assert exit_codes(res) == {3}, res.stdout[-3000:]
    assert f"3 consecutive steps had a NaN/inf loss" in res.stdout and f"(last at step {steps})" in res.stdout, \
        res.stdout[-3000:]
    assert rows[steps]["skipped_steps"] == 3, rows


@pytest.mark.distributed
def test_an_export_failure_on_rank_0_ends_every_rank_with_the_error(lee):
    out, res = launch(lee, "export_fails", 2, ["--max-steps", "1", "--save-interval", "0"],
                      env={"RETROMAE_TEST_FAIL_ON_RANK0": "export"})
    assert exit_codes(res) == {2}, res.stdout[-3000:]
    assert "failed on rank 0: RuntimeError: injected failure on rank 0" in res.stdout, res.stdout[-3000:]
    assert not rank_tracebacks(res.stdout), res.stdout[-3000:]
    assert "retromae-ds export" in res.stdout  # says how to export the complete checkpoint afterwards
    assert R.marker_of_last(out)["step"] == 1


@pytest.mark.distributed
@pytest.mark.full
def test_a_consolidation_failure_on_rank_0_ends_every_rank_with_the_error(lee):
    out, res = launch(lee, "reshard_fails", 1, ["--max-steps", "1", "--save-interval", "0", "--no-export"])
    assert res.returncode == 0, res.stdout[-3000:]
    _, res = launch(lee, "reshard_fails", 2, ["--max-steps", "2", "--save-interval", "0", "--no-export"],
                    env={"RETROMAE_TEST_FAIL_ON_RANK0": "consolidate"})
    assert exit_codes(res) == {2}, res.stdout[-3000:]
    assert "consolidating the fp32 weights for a resume with a new world size failed on rank 0" in res.stdout, \
        res.stdout[-3000:]
    assert R.marker_of_last(out)["step"] == 1  # the checkpoint it tried is untouched


@pytest.mark.distributed
@pytest.mark.full
def test_a_full_disk_while_deepspeed_copies_its_recovery_script_is_a_save_failure_on_every_rank(lee):
    out, res = launch(lee, "recovery_copy", 2, ["--max-steps", "2", "--save-interval", "1", "--no-export"],
                      env={"RETROMAE_TEST_RECOVERY_COPY_FAILS": "1"})
    assert exit_codes(res) == {4}, res.stdout[-3000:]
    assert "zero_to_fp32.py" in res.stdout and "No space left on device" in res.stdout, res.stdout[-3000:]
    assert not rank_tracebacks(res.stdout), res.stdout[-3000:]
    assert R.marker_of_last(out) is None


# ------------------------------------------------------------------------------------------------
# units
# ------------------------------------------------------------------------------------------------

def test_the_bf16_optimizer_state_is_labelled_as_stage_1_and_nothing_else_is():
    from retromae_ds.engine.checkpoint import _tag_bf16_optimizer_state

    bf16 = {"optimizer_state_dict": {"single_partition_of_fp32_groups": [torch.zeros(4)], "partition_count": [2]}}
    _tag_bf16_optimizer_state(bf16)
    assert bf16["optimizer_state_dict"]["zero_stage"] == 1
    zero2 = {"optimizer_state_dict": {"single_partition_of_fp32_groups": [], "zero_stage": 2}}
    _tag_bf16_optimizer_state(zero2)
    assert zero2["optimizer_state_dict"]["zero_stage"] == 2
    model_states = {"module": {}, "param_shapes": []}
    _tag_bf16_optimizer_state(model_states)
    assert "optimizer_state_dict" not in model_states


class _Engine:
    def __init__(self, optimizer, params):
        self.optimizer, self._params = optimizer, params
        self.module = self

    def parameters(self):
        return iter(self._params)


@pytest.mark.parametrize("masters", ["single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                                     "fp32_groups_flat_partition"])
def test_the_finite_check_reads_every_kind_of_fp32_master(masters):
    from retromae_ds.engine.checkpointer import _weights_finite

    class Opt:
        pass

    opt = Opt()
    setattr(opt, masters, [torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not _weights_finite(_Engine(opt, [torch.ones(2)]))
    setattr(opt, masters, [torch.ones(3)])
    assert _weights_finite(_Engine(opt, [torch.ones(2)]))


def test_the_recovery_script_guard_records_a_full_disk_and_passes_results_through(tmp_path):
    import errno

    from retromae_ds.engine.checkpoint import ManifestingCheckpointEngine

    saver = ManifestingCheckpointEngine(object())
    saver.start()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "zero_to_fp32.py"))

    saver.guard(full, "zero_to_fp32.py")(str(tmp_path))
    assert saver.errors == [(str(tmp_path / "zero_to_fp32.py"), "No space left on device")]
    assert saver.guard(lambda path: path * 2, "twice")("ab") == "abab"
    with pytest.raises(subprocess.SubprocessError):  # only write errors are recorded
        saver.guard(lambda path: (_ for _ in ()).throw(subprocess.SubprocessError()), "x")("x")
