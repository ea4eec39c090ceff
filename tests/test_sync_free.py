"""The training step never makes the host wait for the device, outside logging (issue 9).

On a GPU each host-device sync drains the queue, so the host's Python stops running ahead of the
device. The trainer is run for a few steps with scripts/sync_watch.py recording every operation that
would sync on a GPU (on the CPU via torch's dispatcher; on a GPU also torch's own sync detector), per
step, with the code that called it. Asserted:

- steps that do not log: no sync from retromae_ds, transformers or anything else of ours; only
  DeepSpeed's optimizer step (its overflow and gradient-norm checks: a fixed number per optimizer step,
  not per micro-batch), the same number in every step;
- log steps: the trainer's agreed flags and loss sums, nothing else of ours.

It covers the accelerator path of every part: the mask draw's fixed greedy rounds, the heads' static
row selection (padded and full batches), the ready-made encoder padding mask, the bf16 overflow check,
for RetroMAE and DupMAE. The GPU variant runs the same on CUDA (skipped without one;
bench/gpu_check.sh runs it on the device).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.helpers import engine_runs as R
from tests.helpers.tiny_run import tiny_run

pytestmark = pytest.mark.distributed

WATCHED = 8      # steps recorded
LOG_EVERY = 4    # so steps 4 and 8 log


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("syncs"), n_docs=80, max_seq_len=64)


def watched_run(corpus, name: str, extra: list[str]) -> list[dict]:
    root = corpus["root"]
    probe = root / f"{name}.probe"
    args = [*corpus["base"], "--micro-batch-size", "4", "--grad-accum", "2", "--max-steps", str(WATCHED + 2),
            "--log-interval", str(LOG_EVERY), "--save-interval", "0", "--eval-heldout-docs", "0", "--no-export",
            "--deepspeed", "zero2", "--output-dir", str(root / name), *extra]
    env = R.probe_env(probe)
    env["RETROMAE_TEST_SYNCS"] = str(WATCHED)
    res = R.run("python", 1, args, root / f"{name}.log", timeout=300, env=env, script=R.PROBE)
    assert res.returncode == 0, res.stdout[-4000:]
    return R.probe(probe)["syncs"]


def check_steps(records: list[dict]) -> None:
    by_step = {s: [r for r in records if r["window"] == s] for s in range(1, WATCHED + 1)}
    ours = {s: Counter(f"{r['package']} {r['op']} @ {r['where']}" for r in recs if r["package"] != "deepspeed")
            for s, recs in by_step.items()}
    for step in range(1, WATCHED + 1):
        if step % LOG_EVERY:
            assert not ours[step], f"step {step} (no logging) syncs: {dict(ours[step])}"
        else:
            assert ours[step] and all(k.startswith("retromae_ds ") for k in ours[step]), dict(ours[step])
            where = {r["where"].split(":")[0] for r in by_step[step] if r["package"] == "retromae_ds"}
            assert where <= {"trainer.py", "distributed.py"}, where
    deepspeed = [sum(r["package"] == "deepspeed" for r in by_step[s]) for s in by_step]
    assert len(set(deepspeed)) == 1, deepspeed        # a fixed cost per optimizer step
    assert deepspeed[0] <= 8, [r for r in by_step[1] if r["package"] == "deepspeed"]


@pytest.mark.parametrize("objective", ["retromae", pytest.param("dupmae", marks=pytest.mark.full)])
def test_no_sync_outside_log_steps_cpu(corpus, objective):
    records = watched_run(corpus, f"cpu-{objective}", ["--precision", "bf16", "--objective", objective])
    check_steps(records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
def test_no_sync_outside_log_steps_cuda(corpus):
    records = watched_run(corpus, "cuda", ["--precision", "bf16"])
    check_steps(records)
