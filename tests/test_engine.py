"""The DeepSpeed engine on CPU with real processes: ZeRO-2/3 on 2 ranks vs one process, exact resume
after kill -9, SIGTERM and --time-budget, resume with another world size, non-finite steps, bf16,
activation checkpointing, export and continuing from it, dupmae / mlm, --data-weights, and the errors
for a resume on different data and a too long --max-seq-len.

Runs are shared between assertions (module-scoped, launched on first use) to keep the suite short.
Most runs go through tests/helpers/probe_pretrain.py (launch/pretrain.py plus instrumentation), so tests can
assert what the trainer really ran (the engine's precision, activation checkpointing, recomputed
forwards, the blocks it trained on, its starting weights), not only that the losses look plausible.

Runs claimed equal are compared on losses, gradient norms (before clipping, as the engine reports
them) and final weights. Clipping is off (--clip 0) in the shared settings: with clipping at 1.0
plus Adam, a wrong gradient scale changes almost nothing in the losses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import engine_runs as R
from tests.helpers.corpora import lee_articles
from tests.helpers.retrieval_data import lee_pairs, write_pairs
from tests.helpers.tiny_run import prepare_lee_corpus, tiny_run

pytestmark = pytest.mark.distributed

STEPS = 6
COMMON = ["--micro-batch-size", "4", "--max-steps", str(STEPS), "--log-interval", "1", "--save-interval", "3",
          "--lr", "1e-3", "--warmup", "2", "--eval-heldout-docs", "10", "--eval-max-length", "64",
          "--seed", "7", "--clip", "0"]
# What "equal" means between a 2-rank run and one process with the same global batch (fp32, CPU).
LOSS_TOL = dict(abs=2e-5, rel=2e-5)
NORM_TOL = dict(abs=1e-5, rel=1e-4)
WEIGHT_ATOL = 2e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny run (Lee articles 0-119 prepared with the MiniLM tokenizer at L = 64, a tiny BERT config to
    train from random init), a second corpus (articles 120-219) for blending and the different-data check,
    and query-passage pairs (articles 220-299) for --eval-pairs."""
    run = tiny_run(tmp_path_factory.mktemp("engine"), n_docs=120, max_seq_len=64)
    return {**run, "prefix2": prepare_lee_corpus(run["root"], lee_articles()[120:220], "lee_other", max_seq_len=64),
            "pairs": write_pairs(run["root"] / "pairs.jsonl", lee_pairs(220, 300))}


class Runs:
    """Launch each named run once per module; later uses reuse its output."""

    def __init__(self, setup):
        self.setup = setup
        self.done: dict[str, tuple[Path, object]] = {}

    def args(self, name, extra, ds="zero2", base=None):
        out = self.setup["root"] / name
        base = self.setup["base"] if base is None else base
        return base + COMMON + ["--deepspeed", f"ds_configs/{ds}.json", "--output-dir", str(out)] + extra

    def probe_dir(self, name) -> Path:
        return self.setup["root"] / f"{name}.probe"

    def get(self, name, launcher, nproc, extra, ds="zero2", expect_rc=0, timeout=420, base=None, save_init=False):
        if name not in self.done:
            out = self.setup["root"] / name
            res = R.run(launcher, nproc, self.args(name, extra, ds, base), self.setup["root"] / f"{name}.log",
                        timeout=timeout, script=R.PROBE, env=R.probe_env(self.probe_dir(name), save_init))
            assert res.returncode == expect_rc, f"{name}: exit {res.returncode}\n{res.stdout[-6000:]}"
            self.done[name] = (out, res)
        return self.done[name]

    def probe(self, name, rank=0) -> dict:
        assert name in self.done, name
        return R.probe(self.probe_dir(name), rank)


@pytest.fixture(scope="module")
def runs(setup):
    return Runs(setup)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from retromae_ds.engine.export import load_checkpoint_model

    model, *_ = load_checkpoint_model(out)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of one checkpoint folder, straight from DeepSpeed's files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def zero3_run(runs):
    """ZeRO-3 on 2 ranks (the deepspeed launcher); its final evaluation also scores --eval-pairs, which
    gathers the partitioned weights in every forward, so every rank must take part."""
    return runs.get("z3", "deepspeed", 2, ["--eval-pairs", runs.setup["pairs"]], ds="zero3")


def baseline(runs):
    # one process, 2 micro-batches accumulated = the same global batch as 2 ranks x 1
    return runs.get("single", "python", 1, ["--grad-accum", "2"])


def test_checkpoints_keep_the_parsed_flags_and_the_resolved_run_apart(runs):
    """The parsed config is never changed by setup: a checkpoint's "config" is what was asked (no
    --max-seq-len: 0, the data's), its "resolved_config" what ran (64, the data's length)."""
    single, _ = baseline(runs)
    client = R.marker_of_last(single)["client_state"]
    assert client["config"]["max_seq_len"] == 0 and client["resolved_config"]["max_seq_len"] == 64
    assert client["config"]["grad_accum"] == client["resolved_config"]["grad_accum"] == 2


def assert_same_run(ref: Path, other: Path, *, exact: bool = False, steps=None):
    """Losses and gradient norms per step, and the final weights, agree (bit for bit when exact)."""
    la, lb, ga, gb = R.losses(ref), R.losses(other), R.grad_norms(ref), R.grad_norms(other)
    steps = sorted(la) if steps is None else list(steps)
    assert steps and set(steps) <= set(lb), (sorted(la), sorted(lb))
    for step in steps:
        if exact:
            assert lb[step] == la[step] and gb[step] == ga[step], (step, la, lb, ga, gb)
        else:
            assert lb[step] == pytest.approx(la[step], **LOSS_TOL), (step, la, lb)
            assert gb[step] == pytest.approx(ga[step], **NORM_TOL), (step, ga, gb)
    a, b = final_weights(ref), final_weights(other)
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            diff = (a[k] - b[k]).abs().max().item()
            assert diff <= WEIGHT_ATOL, f"{k} differs by {diff}"


def assert_ran_fp32_zero(record: dict, stage: int, out: Path | None = None):
    engine = record["engine"]
    assert engine["zero_stage"] == stage and not engine["bf16"] and not engine["fp16"], engine
    assert engine["param_dtype"] == "float32" and engine["gradient_clipping"] == 0.0, engine
    if out is not None:
        marker = R.marker_of_last(out)
        assert marker["precision"] == "fp32" and marker["zero_stage"] == stage, marker


def test_zero2_two_ranks_equal_single_process(runs):
    single, _ = baseline(runs)
    z2, res = runs.get("z2", "torchrun", 2, [])
    a = R.losses(single)
    assert sorted(a) == list(range(1, STEPS + 1))
    assert_same_run(single, z2)
    assert a[STEPS] < a[1]  # it learns
    assert_ran_fp32_zero(runs.probe("single"), 2, single)
    for rank in (0, 1):
        assert_ran_fp32_zero(runs.probe("z2", rank), 2, z2)
        # an AdamW run leaves DeepSpeed's Muon and torch's inductor unloaded (~1 s of start-up per rank)
        loaded = runs.probe("z2", rank)["loaded"]
        assert not any(loaded.values()), f"rank {rank} loaded {loaded}"
    # each rank trained on its own half of every global batch: together, the single run's blocks
    blocks = runs.probe("single")["blocks"]
    r0, r1 = runs.probe("z2", 0)["blocks"], runs.probe("z2", 1)["blocks"]
    assert len(r0) == len(r1) == len(blocks) // 2 and sorted(r0 + r1) == sorted(blocks)


def test_zero3_two_ranks_equal_single_process(runs):
    single, _ = baseline(runs)
    z3, _ = zero3_run(runs)
    assert_same_run(single, z3)
    assert_ran_fp32_zero(runs.probe("z3"), 3, z3)
    # cls_gain's decoder forwards ran on both ranks (ZeRO-3 gathers collectively), on the same masks
    gains = [R.metrics(out, kind="eval")[-1]["cls_gain"] for out in (single, z3)]
    assert gains[1] == pytest.approx(gains[0], abs=1e-4), gains


def test_zero3_eval_pairs_equal_the_export_scored_alone(runs, tmp_path):
    """--eval-pairs under ZeRO-3 on 2 ranks logs eval/pairs/* from the final weights: the numbers
    `retromae-ds eval --pairs` gives on the run's export in one process."""
    import json

    from retromae_ds.cli import main as cli

    z3, _ = zero3_run(runs)
    (logged,) = R.metrics(z3, "eval")
    out = tmp_path / "alone.json"
    assert cli(["eval", str(z3 / "export"), "--pairs", runs.setup["pairs"], "--max-length", "64", "--batch-size", "4",
                "--no-lee", "--bootstrap", "0", "--json", str(out)]) == 0
    alone = json.loads(out.read_text())["metrics"]
    keys = [k for k in alone if k.startswith("pairs/") and not k.endswith("num_passages")]
    assert len(keys) >= 10 and alone["pairs/num_queries"] > 50
    for key in keys:
        assert logged[key] == pytest.approx(alone[key], abs=1e-6), key


def test_run_outputs_metrics_checkpoints_and_eval(runs):
    z2, res = runs.get("z2", "torchrun", 2, [])
    rows = R.metrics(z2)
    for key in ("step", "loss", "encoder_loss", "decoder_loss", "lr", "grad_norm", "tokens_per_s",
                "samples_per_s", "step_time_s"):
        assert all(key in r for r in rows), key
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    evals = R.metrics(z2, kind="eval")
    assert evals and "lee/spearman_cls" in evals[-1] and "heldout/mrr10" in evals[-1]
    assert isinstance(evals[-1]["cls_gain"], float) and f"cls_gain={evals[-1]['cls_gain']:.4f}" in res.stdout
    from retromae_ds.engine.checkpoint import complete_checkpoints

    assert [p.name for p in complete_checkpoints(z2)] == ["step_00000003", "step_00000006"]
    assert (z2 / "export" / "config.json").exists()


def _kill_then_resume(runs, setup, name, launcher, ds, uninterrupted):
    """Kill -9 the whole launcher group after the first checkpoint, rerun the same command
    (launch/pretrain.py itself here, not the probe)."""
    out = setup["root"] / name
    args = setup["base"] + COMMON + ["--deepspeed", f"ds_configs/{ds}.json", "--output-dir", str(out),
                                     "--resume", "auto"]
    R.kill9_after_checkpoint(launcher, 2, args, out, setup["root"] / f"{name}.1.log", step=3, never=STEPS)
    res = R.run(launcher, 2, args, setup["root"] / f"{name}.2.log")
    assert res.returncode == 0, res.stdout[-6000:]
    assert "resumed from" in res.stdout
    ref_out, _ = uninterrupted
    # the same weights, and the same losses and gradient norms on the steps after the resume point
    assert_same_run(ref_out, out, exact=True, steps=range(4, STEPS + 1))


def test_resume_after_kill9_is_bitwise_exact_zero2(runs, setup):
    _kill_then_resume(runs, setup, "z2_killed", "torchrun", "zero2", runs.get("z2", "torchrun", 2, []))


@pytest.mark.full
def test_resume_after_kill9_is_bitwise_exact_zero3(runs, setup):
    _kill_then_resume(runs, setup, "z3_killed", "deepspeed", "zero3",
                      zero3_run(runs))


def test_export_from_zero3_loads_with_automodel_and_sentence_transformers(runs, setup, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from retromae_ds.cli import main as cli
    from retromae_ds.engine.checkpoint import complete_checkpoints

    z3, _ = zero3_run(runs)
    target = tmp_path / "enc"
    assert cli(["export", str(z3), str(target)]) == 0
    assert cli(["export", str(z3), str(target)]) == 2  # refuses to overwrite without --overwrite
    # the weights, compared with DeepSpeed's own consolidation of the newest checkpoint
    state = checkpoint_state(complete_checkpoints(z3)[-1])
    encoder = AutoModel.from_pretrained(target).eval()
    got = encoder.state_dict()
    want = {k[len("lm.bert."):]: v for k, v in state.items() if k.startswith("lm.bert.")}
    assert want and set(want) <= set(got), set(want) - set(got)
    for k in want:
        assert torch.equal(got[k], want[k]), f"exported encoder {k} differs from the checkpoint"
    # the full RetroMAE state (encoder, MLM head, decoder) for continued pre-training
    for folder in (target, z3 / "export"):  # `retromae-ds export` and the trainer's own export
        full = load_file(str(folder / "retromae" / "model.safetensors"))
        decoder = [k for k in state if k.startswith("c_head.")]
        assert decoder and all(k in full for k in decoder), folder
        for k in state:
            if k in full:
                assert torch.equal(full[k], state[k]), f"{folder}: {k} differs from the checkpoint"
    tok = AutoTokenizer.from_pretrained(target)
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(target), device="cpu")
    emb = model.encode(["a quick test of the exported encoder"], convert_to_tensor=True, normalize_embeddings=False)
    single = tok(["a quick test of the exported encoder"], return_tensors="pt")
    with torch.no_grad():
        direct = encoder(**single).last_hidden_state[:, 0]
    assert torch.allclose(emb.cpu(), direct, atol=1e-5)


def test_dupmae_continues_from_the_export_with_its_decoder(runs, setup):
    """`--model EXPORT/retromae` starts from exactly the exported encoder, MLM head and decoder; the
    dupmae objective trains with its bag-of-words loss on top of the RetroMAE losses."""
    from retromae_ds.engine.checkpoint import complete_checkpoints

    z3, _ = zero3_run(runs)
    base = ["--data", setup["prefix"], "--model", str(z3 / "export" / "retromae")]
    out, res = runs.get("dupmae_from_export", "python", 1,
                        ["--objective", "dupmae", "--max-steps", "3", "--no-export"], base=base, save_init=True)
    start = torch.load(runs.probe_dir("dupmae_from_export") / "init_state.pt")
    state = checkpoint_state(complete_checkpoints(z3)[-1])
    assert any(k.startswith("c_head.") for k in state)
    for k, v in state.items():
        assert torch.equal(start[k], v), f"{k}: the continued run did not start from the exported weights"
    rows = R.metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["bow_loss"] > 0 and r["decoder_loss"] > 0
        assert r["loss"] == pytest.approx(r["encoder_loss"] + r["decoder_loss"] + r["bow_loss"], rel=1e-6)
    record = runs.probe("dupmae_from_export")
    assert record["forwards"]["decoder_layer"] == record["forwards"]["encoder"] == 3
    assert "dupmae |" in res.stdout


def test_mlm_objective_trains_the_encoder_only(runs, setup):
    out, res = blend_run(runs, setup)
    rows = R.metrics(out)
    assert rows and all(r["decoder_loss"] is None and "bow_loss" not in r for r in rows)
    evals = R.metrics(out, kind="eval")  # no decoder: cls_gain does not apply, said once
    assert evals and all("cls_gain" not in r for r in evals) and res.stdout.count("cls_gain does not apply") == 1
    assert all(r["loss"] == pytest.approx(r["encoder_loss"], rel=1e-9) for r in rows)
    assert "decoder_layer" not in runs.probe("mlm_blend")["forwards"]
    start = torch.load(runs.probe_dir("mlm_blend") / "init_state.pt")
    end = final_weights(out)
    decoder = [k for k in end if k.startswith("c_head.")]
    assert decoder and all(torch.equal(end[k], start[k]) for k in decoder), "mlm changed the decoder"
    moved = [k for k in end if k.startswith("lm.") and not torch.equal(end[k], start[k])]
    assert "lm.bert.encoder.layer.0.attention.self.query.weight" in moved


def blend_run(runs, setup):
    return runs.get("mlm_blend", "python", 1,
                    ["--objective", "mlm", "--data", setup["prefix"], setup["prefix2"], "--data-weights", "1", "4",
                     "--grad-accum", "2", "--no-export"], save_init=True)


def test_data_weights_set_the_blend(runs, setup):
    """Two equally big datasets blended 1:4: about 80% of the trained blocks come from the second
    (size-proportional blending, the default without weights, would give about 50%)."""
    from retromae_ds.data.indexed import IndexedDataset

    blend_run(runs, setup)
    first, second = IndexedDataset(setup["prefix"]), IndexedDataset(setup["prefix2"])
    assert 0.8 < len(first) / len(second) < 1.25
    in_first = {tuple(int(t) for t in first[i]) for i in range(len(first))}
    in_second = {tuple(int(t) for t in second[i]) for i in range(len(second))}
    blocks = [tuple(b) for b in runs.probe("mlm_blend")["blocks"]]
    assert len(blocks) == STEPS * 4 * 2
    assert all(b in in_first or b in in_second for b in blocks)
    share = sum(b in in_second and b not in in_first for b in blocks) / len(blocks)
    assert 0.7 <= share <= 0.9, share


def test_resume_refuses_a_checkpoint_trained_on_different_data(runs, setup):
    single, _ = baseline(runs)
    out = setup["root"] / "other_data"
    src = single / "checkpoints" / "step_00000006"
    shutil.copytree(src, out / "checkpoints" / src.name)
    args = ["--data", setup["prefix2"]] + setup["model"] + COMMON + [
        "--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out), "--grad-accum", "2"]
    res = R.run("python", 1, args, setup["root"] / "other_data.log")
    assert res.returncode == 2, res.stdout[-4000:]
    assert "trained on different data" in res.stdout and setup["prefix"] in res.stdout
    assert not (out / "metrics.jsonl").exists() or not R.metrics(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [src.name]


def test_max_seq_len_beyond_the_data_and_the_model_positions_is_a_clear_error(setup):
    """The data (prepared at 64) is checked first, before DeepSpeed starts; the model's 128 positions are
    checked after (tests/test_model.py: resolve_max_seq_len)."""
    out = setup["root"] / "too_long"
    args = setup["base"] + COMMON + ["--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out),
                                     "--max-seq-len", "200"]
    res = R.run("python", 1, args, setup["root"] / "too_long.log")
    assert res.returncode == 2, res.stdout[-4000:]
    assert "--max-seq-len 200 is longer than the data" in res.stdout and "max_seq_len 64" in res.stdout
    assert "Traceback" not in res.stdout and not out.exists()


@pytest.fixture(scope="module")
def interrupted(runs, setup):
    """The single-process baseline's command, stopped twice and continued: (1) --time-budget 0.001
    stops it after step 1; (2) the same command without the budget resumes and gets SIGTERM during its
    first step (step 2); (3) the same command again finishes the run; (4) once more, on the finished run:
    it evaluates again (printed) and logs nothing twice."""
    baseline(runs)
    name = "interrupted"
    out = setup["root"] / name
    args = runs.args(name, ["--grad-accum", "2"])
    logs = [setup["root"] / f"{name}.{i}.log" for i in (1, 2, 3, 4)]
    probe = runs.probe_dir(name)
    budget = R.run("python", 1, args + ["--time-budget", "0.001"], logs[0])
    budget_marker = R.marker_of_last(out)
    term = R.run("python", 1, args, logs[1], script=R.PROBE, env=R.probe_env(probe, sigterm_after=1))
    term_marker = R.marker_of_last(out)
    rest = R.run("python", 1, args, logs[2])
    records = (out / "metrics.jsonl").read_text()
    again = R.run("python", 1, args, logs[3])
    return {"out": out, "budget": (budget, budget_marker), "term": (term, term_marker), "rest": rest,
            "again": (again, records)}


def test_time_budget_stops_with_a_checkpoint_and_exit_0(interrupted):
    res, marker = interrupted["budget"]
    assert res.returncode == 0, res.stdout[-4000:]
    assert marker is not None and marker["reason"] == "time-budget" and marker["step"] == 1, marker
    assert "stopped on time-budget at step 1/6" in res.stdout
    # the next start continues from that checkpoint
    assert "at step 1" in interrupted["term"][0].stdout and "resumed from" in interrupted["term"][0].stdout


def test_sigterm_saves_and_exits_zero_then_the_same_command_continues_bit_for_bit(runs, interrupted):
    res, marker = interrupted["term"]
    assert res.returncode == 0, res.stdout[-4000:]
    assert marker["reason"] == "signal" and marker["step"] == 2, marker
    rest = interrupted["rest"]
    assert rest.returncode == 0, rest.stdout[-4000:]
    assert "resumed from" in rest.stdout and "at step 2" in rest.stdout
    single, _ = baseline(runs)
    # every step (1 before the budget stop, 2 before SIGTERM, 3-6 after) and the final weights
    assert_same_run(single, interrupted["out"], exact=True)


def test_running_a_finished_run_again_evaluates_it_and_logs_nothing_twice(interrupted):
    rest = interrupted["rest"]
    again, records = interrupted["again"]
    assert again.returncode == 0, again.stdout[-4000:]
    final = [line for line in rest.stdout.splitlines() if line.startswith("[retromae-ds] eval at step 6: ")]
    assert final and "heldout/mrr10" in final[0], rest.stdout[-3000:]  # one console line per evaluation
    assert final[0] in again.stdout  # evaluated again, the same numbers
    assert (interrupted["out"] / "metrics.jsonl").read_text() == records  # ... and not logged a second time
    evals = [(r["step"]) for r in R.metrics(interrupted["out"], kind="eval")]
    assert len(evals) == len(set(evals)), evals


@pytest.mark.full
def test_nonfinite_steps_are_skipped_and_stop_the_run(setup):
    out = setup["root"] / "nan"
    args = setup["base"] + COMMON + ["--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out),
                                     "--max-steps", "20", "--max-nonfinite-steps", "3", "--save-interval", "1"]
    res = R.run("python", 1, args, setup["root"] / "nan.log", script=R.PROBE,
                env={"RETROMAE_TEST_NONFINITE_STEPS": "1,4,5,6"})
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


def test_activation_checkpointing_recomputes_and_gives_the_same_run(runs):
    single, _ = baseline(runs)
    ac, _ = runs.get("single_ac", "python", 1, ["--grad-accum", "2", "--activation-checkpointing"])
    with_ac, without = runs.probe("single_ac"), runs.probe("single")
    assert with_ac["engine"]["activation_checkpointing"] and with_ac["engine"]["hf_gradient_checkpointing"]
    assert not without["engine"]["activation_checkpointing"]
    micro_batches = STEPS * 2
    # without: every layer runs once per micro-batch; with: once more in backward (recomputation)
    f = without["forwards"]
    assert f["encoder"] == f["encoder_layer0"] == f["decoder_layer"] == micro_batches, f
    f = with_ac["forwards"]
    assert f["encoder"] == micro_batches and f["encoder_layer0"] == f["decoder_layer"] == 2 * micro_batches, f
    # what the trainer records in the checkpoint marker
    assert R.marker_of_last(ac)["activation_checkpointing"] is True
    assert R.marker_of_last(single)["activation_checkpointing"] is False
    assert_same_run(single, ac)


@pytest.mark.full
def test_bf16_runs_in_bf16_with_falling_loss(runs):
    out, res = runs.get("bf16", "python", 1, ["--precision", "bf16", "--max-steps", "12", "--lr", "2e-3",
                                              "--clip", "1.0"])
    engine = runs.probe("bf16")["engine"]
    assert engine["bf16"] and not engine["fp16"] and engine["param_dtype"] == "bfloat16", engine
    assert engine["gradient_clipping"] == 1.0
    assert "ZeRO-2 bf16 |" in res.stdout
    assert R.marker_of_last(out)["precision"] == "bf16"
    loss = R.losses(out)
    first = sum(loss[s] for s in (1, 2, 3)) / 3
    last = sum(loss[s] for s in (10, 11, 12)) / 3
    assert last < first, loss


@pytest.mark.full
def test_zero3_offload_equals_single_process(runs):
    single, _ = baseline(runs)
    # the first offload run JIT-builds DeepSpeed's CPU Adam (~80 s idle, minutes on a busy machine)
    off, _ = runs.get("z3_offload", "python", 1, ["--grad-accum", "2", "--no-export"], ds="zero3_offload",
                      timeout=1200)
    assert_same_run(single, off)
    assert_ran_fp32_zero(runs.probe("z3_offload"), 3, off)
    assert R.marker_of_last(off)["optimizer"] == "DeepSpeedCPUAdam"  # not torch's AdamW on the host


def test_resume_with_a_different_world_size_continues_the_weights_and_the_data(runs, setup):
    """A 2-rank checkpoint resumed by 1 rank (x accum 2, same global batch): the starting weights are
    the checkpoint's consolidated fp32 weights, so the first step after the resume has the source
    run's loss and gradient norm; the data continues where it stopped (same sampler state at the end)."""
    from retromae_ds.engine.checkpoint import complete_checkpoints, read_marker

    z2, _ = runs.get("z2", "torchrun", 2, [])
    out = setup["root"] / "reshard"
    src = z2 / "checkpoints" / "step_00000003"
    shutil.copytree(src, out / "checkpoints" / src.name)
    args = setup["base"] + COMMON + ["--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out),
                                     "--grad-accum", "2", "--no-export"]
    probe = setup["root"] / "reshard.probe"
    res = R.run("python", 1, args, setup["root"] / "reshard.log", script=R.PROBE,
                env=R.probe_env(probe, save_init=True))
    assert res.returncode == 0, res.stdout[-4000:]
    assert "new world size" in res.stdout
    start = torch.load(probe / "init_state.pt")
    for k, v in checkpoint_state(src).items():
        assert torch.equal(start[k], v), f"{k} was not restored from the checkpoint"
    assert sorted(R.losses(out)) == [4, 5, 6]
    # step 4's loss is computed before its update: the checkpoint's weights on the same batch
    assert R.losses(out)[4] == pytest.approx(R.losses(z2)[4], **LOSS_TOL)
    assert R.grad_norms(out)[4] == pytest.approx(R.grad_norms(z2)[4], **NORM_TOL)
    want = read_marker(complete_checkpoints(z2)[-1])["client_state"]
    got = read_marker(complete_checkpoints(out)[-1])["client_state"]
    assert got["step"] == want["step"] == STEPS
    assert got["sampler"] == want["sampler"] and got["tokens_seen"] == want["tokens_seen"]
    assert got["world_size"] == 1 and want["world_size"] == 2
