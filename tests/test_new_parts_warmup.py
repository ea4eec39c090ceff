"""`--new-parts-warmup-steps N` (retromae_ds/engine/new_parts.py): continuing from an encoder that ships no MLM
head (a tiny BertModel saved with save_pretrained, MiniLM's tokenizer), the first N optimizer steps train
only the fresh head and decoder. Checked on real 1-rank runs: the encoder is bit for bit the starting one
after the phase (ZeRO-1, 2, 3) while the head and decoder moved, it trains after the phase, a resume from
inside the phase continues bit for bit, a resume whose flag would change the steps already done is
refused; from random init the flag does nothing and says so. The resume rules and the part bookkeeping
are also checked directly (`plan`, `from_pretrained().new_parts`, the parameter groups)."""

from __future__ import annotations

import shutil

import pytest
import torch

from retromae_ds.engine import checkpoint as ck
from retromae_ds.engine.new_parts import NEW_PART_KEY, NewPartsWarmup, param_groups_by_part, plan
from retromae_ds.errors import UserError
from tests.helpers import engine_runs as R
from tests.helpers.corpora import lee_articles
from tests.helpers.tiny_run import minilm_path, prepare_lee_corpus, tiny_run

NEW = ("lm.cls.", "c_head.")  # what a plain encoder folder lacks: the MLM head and the decoder
PHASE, STEPS, LR = 4, 6, 1e-3  # checkpoints at 2 (inside the phase), 4 (its end) and 6
COMMON = ["--micro-batch-size", "4", "--log-interval", "1", "--lr", str(LR), "--warmup", "0", "--save-interval", "2",
          "--keep-last", "5", "--eval-heldout-docs", "10", "--eval-max-length", "32", "--seed", "5", "--no-export",
          "--max-steps", str(STEPS)]


def _save_encoder_without_head(folder, tokenizer_dir, seed: int = 0) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)  # no MLM head, as sentence-transformers ship
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A plain encoder folder (no MLM head, no decoder) and 60 Lee articles prepared at 32 tokens."""
    root = tmp_path_factory.mktemp("new_parts")
    _save_encoder_without_head(root / "encoder", minilm_path())
    prefix = prepare_lee_corpus(root, lee_articles(60), "lee", max_seq_len=32)
    return {"root": root, "args": ["--data", prefix, "--model", str(root / "encoder")] + COMMON}


def _train(corpus, name: str, extra: list[str], probe: bool = False):
    out = corpus["root"] / name
    env = R.probe_env(out / "probe", save_init=True) if probe else None
    res = R.run("python", 1, corpus["args"] + ["--output-dir", str(out)] + extra, corpus["root"] / f"{name}.log",
                timeout=300, env=env, script=R.PROBE if probe else R.PRETRAIN)
    return out, res


@pytest.fixture(scope="module")
def phase_run(corpus):
    out, res = _train(corpus, "phase", ["--new-parts-warmup-steps", str(PHASE), "--deepspeed", "zero2"], probe=True)
    assert res.returncode == 0, res.stdout[-4000:]
    return {"out": out, "stdout": res.stdout, "init": torch.load(out / "probe" / "init_state.pt")}


def _weights(out, step: int) -> dict:
    return ck.consolidated_fp32_state(ck.checkpoint_root(out) / ck.tag_for(step))


def _split(state: dict, init: dict) -> tuple[list, list, list, list]:
    """(encoder tensors equal to init, encoder tensors changed, new-part tensors equal, new-part tensors changed)."""
    enc_same, enc_moved, new_same, new_moved = [], [], [], []
    for name, value in state.items():
        if name not in init:
            continue
        same = torch.equal(value, init[name].float())
        if name.startswith(NEW):
            (new_same if same else new_moved).append(name)
        else:
            (enc_same if same else enc_moved).append(name)
    return enc_same, enc_moved, new_same, new_moved


def test_the_encoder_is_bit_identical_through_the_phase_the_head_and_decoder_train(phase_run):
    init, out = phase_run["init"], phase_run["out"]
    assert "new-parts warm-up: steps 1-4 train only lm.cls, c_head" in phase_run["stdout"]
    for step in (2, PHASE):
        enc_same, enc_moved, new_same, new_moved = _split(_weights(out, step), init)
        assert enc_moved == [] and len(enc_same) > 30, (step, enc_moved)
        # every head and decoder tensor moved, except the head's output projection: the tied word embeddings
        assert new_same == ["lm.cls.predictions.decoder.weight"] and len(new_moved) > 20, (step, new_same)
    enc_same, enc_moved, _, _ = _split(_weights(out, STEPS), init)  # after the phase the encoder trains
    assert enc_same == [] and len(enc_moved) > 30, enc_same


def test_the_encoder_lr_is_logged_zero_during_the_phase_then_the_schedule(phase_run):
    rows = R.metrics(phase_run["out"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["lr_encoder"] == (0.0 if r["step"] <= PHASE else r["lr"]) and r["lr"] > 0, r
    marker = ck.read_marker(ck.checkpoint_root(phase_run["out"]) / ck.tag_for(2))
    assert marker["client_state"]["new_parts_warmup"] == {"steps": PHASE, "encoder_lr_ratio": 0.0,
                                                          "parts": ["lm.cls", "c_head"]}


@pytest.mark.full  # the default tier resumes from inside the phase in the next test (another global batch)
def test_a_resume_from_inside_the_phase_continues_bit_for_bit(phase_run, corpus):
    out = corpus["root"] / "resumed"
    shutil.copytree(ck.checkpoint_root(phase_run["out"]) / ck.tag_for(2), ck.checkpoint_root(out) / ck.tag_for(2))
    out, res = _train(corpus, "resumed", ["--new-parts-warmup-steps", str(PHASE), "--deepspeed", "zero2"])
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-3000:]
    assert "new-parts warm-up: steps 1-4" in res.stdout  # still inside it: said again
    a, b = R.metrics(phase_run["out"]), R.metrics(out)
    for key in ("loss", "lr", "lr_encoder", "grad_norm"):
        assert {r["step"]: r[key] for r in b} == {r["step"]: r[key] for r in a if r["step"] > 2}, key
    for step in (PHASE, STEPS):
        first, again = _weights(phase_run["out"], step), _weights(out, step)
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first), step


def test_the_phase_is_counted_in_samples_across_a_resume_with_another_global_batch(phase_run, corpus):
    """Like the schedule, the phase is a number of samples (steps x the run's first global batch): resumed
    at step 2 with half the batch, its 4 x 4 samples end after resumed step 6, not at step 4."""
    out = corpus["root"] / "half_batch"
    shutil.copytree(ck.checkpoint_root(phase_run["out"]) / ck.tag_for(2), ck.checkpoint_root(out) / ck.tag_for(2))
    out, res = _train(corpus, "half_batch", ["--new-parts-warmup-steps", str(PHASE), "--deepspeed", "zero2",
                                             "--micro-batch-size", "2", "--save-interval", "0"])
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-3000:]
    # the resume says what the new batch does, and the start-up line shows the run as it is now
    assert "global batch 4 -> 2 (ranks x micro-batch x accumulation: 1 x 4 x 1 -> 1 x 2 x 1)" in res.stdout
    assert "8 steps of 2 samples remain, so the run now ends at step 10" in res.stdout
    assert "Adam's moments) continues as saved" in res.stdout
    assert "world 1 x micro 2 x accum 1 = 2/step | 10 steps" in res.stdout, res.stdout[-3000:]
    rows = R.metrics(out)
    assert [r["step"] for r in rows] == list(range(3, 11))  # 24 samples in all: 8 done, 8 steps of 2 left
    held = [r["step"] for r in rows if r["lr_encoder"] == 0.0]
    assert held == [3, 4, 5, 6], rows
    assert all(r["lr_encoder"] == r["lr"] > 0 for r in rows if r["step"] > 6)


def test_a_resume_whose_flag_would_change_the_steps_already_done_is_refused(phase_run, corpus):
    out = corpus["root"] / "changed"
    shutil.copytree(ck.checkpoint_root(phase_run["out"]) / ck.tag_for(2), ck.checkpoint_root(out) / ck.tag_for(2))
    out, res = _train(corpus, "changed", ["--new-parts-warmup-steps", "1", "--deepspeed", "zero2"])
    assert res.returncode == 2, res.stdout[-3000:]
    assert "held the encoder at 0 x the LR for steps 1-4" in res.stdout
    assert "Resume with --new-parts-warmup-steps 4" in res.stdout
    assert "to end the phase now, --new-parts-warmup-steps 2" in res.stdout
    assert [p.name for p in ck.complete_checkpoints(out)] == [ck.tag_for(2)]  # nothing trained, nothing saved


@pytest.mark.full
@pytest.mark.parametrize("ds", ["zero1", "zero3"])
def test_the_encoder_stays_bit_identical_under_zero1_and_zero3(corpus, ds):
    out, res = _train(corpus, f"phase_{ds}", ["--new-parts-warmup-steps", "2", "--max-steps", "3", "--deepspeed", ds],
                      probe=True)
    assert res.returncode == 0, res.stdout[-4000:]
    init = torch.load(out / "probe" / "init_state.pt")
    enc_same, enc_moved, _, new_moved = _split(_weights(out, 2), init)
    assert enc_moved == [] and len(enc_same) > 30 and len(new_moved) > 20, enc_moved
    assert _split(_weights(out, 3), init)[0] == []  # step 3: the encoder trains


@pytest.mark.full
def test_from_random_init_the_flag_does_nothing_and_says_so(tmp_path):
    run = tiny_run(tmp_path, n_docs=40, max_seq_len=32)
    out = tmp_path / "run"
    args = run["base"] + COMMON + ["--max-steps", "2", "--new-parts-warmup-steps", "5", "--output-dir", str(out)]
    res = R.run("python", 1, args, tmp_path / "run.log", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "--new-parts-warmup-steps 5 does nothing here: from random init every part is new" in res.stdout
    rows = R.metrics(out)
    assert rows and all("lr_encoder" not in r for r in rows)
    assert ck.read_marker(ck.complete_checkpoints(out)[-1])["client_state"]["new_parts_warmup"]["steps"] == 0


# ------------------------------------------------------------------------------------------------
# the bookkeeping, in-process
# ------------------------------------------------------------------------------------------------

def test_from_pretrained_records_which_parts_start_random(tmp_path, minilm_tokenizer_dir):
    from transformers import BertConfig, BertForMaskedLM

    from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining

    _save_encoder_without_head(tmp_path / "plain", minilm_tokenizer_dir)
    plain = RetroMAEForPretraining.from_pretrained(tmp_path / "plain")
    assert plain.new_parts == ("lm.cls", "c_head")
    small = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(small).save_pretrained(tmp_path / "mlm")  # a masked-LM checkpoint: the head is there
    assert RetroMAEForPretraining.from_pretrained(tmp_path / "mlm").new_parts == ("c_head",)
    plain.save_pretrained(tmp_path / "retromae")  # a RetroMAE folder: everything continues
    assert RetroMAEForPretraining.from_pretrained(tmp_path / "retromae").new_parts == ()
    assert RetroMAEForPretraining(BertForMaskedLM(small), RetroMAEConfig()).new_parts is None  # random init


def test_the_groups_split_by_part_and_keep_their_settings(tmp_path, minilm_tokenizer_dir):
    from retromae_ds.engine.build import param_groups
    from retromae_ds.model.retromae import RetroMAEForPretraining

    _save_encoder_without_head(tmp_path / "plain", minilm_tokenizer_dir)
    model = RetroMAEForPretraining.from_pretrained(tmp_path / "plain")
    groups = param_groups_by_part(param_groups(model, 0.01), model, model.new_parts)
    assert [(g[NEW_PART_KEY], g["weight_decay"]) for g in groups] == [(False, 0.01), (False, 0.0), (True, 0.01),
                                                                      (True, 0.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        assert all(names[id(p)].startswith(NEW) == g[NEW_PART_KEY] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # the tied word embeddings (the head's output projection) count as the encoder's
    encoder_ids = {id(p) for g in groups if not g[NEW_PART_KEY] for p in g["params"]}
    assert id(model.lm.cls.predictions.decoder.weight) in encoder_ids


class _Model:
    """What plan() reads of a model: its new parts and named parameters."""

    def __init__(self, parts):
        self.new_parts = parts

    def named_parameters(self):
        p = torch.nn.Parameter(torch.zeros(1))
        return [("lm.bert.x", p), ("lm.cls.y", p), ("c_head.z", p)]


PARTS = ("lm.cls", "c_head")


def _record(steps, ratio=0.0):
    return NewPartsWarmup(steps, ratio, PARTS).to_dict()


def test_plan_fresh_starts_and_the_notes():
    assert plan(10, 0.0, _Model(PARTS), None, None) == (NewPartsWarmup(10, 0.0, PARTS), None)
    assert plan(0, 0.0, _Model(PARTS), None, None) == (NewPartsWarmup(0, 0.0, PARTS), None)
    phase, note = plan(10, 0.0, _Model(None), None, None)
    assert phase.steps == 0 and not phase.splits_groups() and "from random init every part is new" in note
    phase, note = plan(10, 0.0, _Model(()), None, None)
    assert phase.steps == 0 and "nothing is freshly initialised" in note
    assert [NewPartsWarmup(3, 0.1, PARTS).encoder_factor(s) for s in (0, 2, 3, 9)] == [0.1, 0.1, 1.0, 1.0]


@pytest.mark.parametrize("old, new, step, steps_after, says", [
    (10, 10, 5, 10, None),                                   # unchanged
    (10, 20, 5, 20, "now ends at step 20"),                  # a phase under way, lengthened
    (10, 5, 5, 5, "now ends at step 5"),                     # ... or ended now
    (10, 0, 30, 10, "nothing changes from here"),            # over under both: the record stays
    (10, 4, 30, 10, "nothing changes from here"),
    (0, 0, 30, 0, None),
])
def test_plan_resumes_that_keep_the_past(old, new, step, steps_after, says):
    phase, note = plan(new, 0.0, _Model(PARTS), _record(old), step)
    assert phase.steps == steps_after and (note is None if says is None else says in note), note
    assert phase.splits_groups() == (old > 0)  # the checkpoint's parameter groups, whatever the flag says


@pytest.mark.parametrize("old, new, ratio, step", [
    (10, 4, 0.0, 5),    # steps 5.. would not have been frozen
    (10, 30, 0.0, 20),  # steps 11-20 would have been frozen
    (0, 10, 0.0, 5),    # the checkpoint trained the encoder from step 1
    (10, 10, 0.5, 5),   # another ratio during steps already done
])
def test_plan_refuses_resumes_that_would_change_the_past(old, new, ratio, step):
    with pytest.raises(UserError, match="would have trained steps"):
        plan(new, ratio, _Model(PARTS), _record(old), step)


def test_plan_treats_a_checkpoint_from_before_the_option_as_no_phase():
    assert plan(0, 0.0, _Model(PARTS), None, 7) == (NewPartsWarmup(0, 0.0, ()), None)
    phase, note = plan(5, 0.0, _Model(PARTS), {}, 7)  # phase over under both: nothing to do
    assert phase.steps == 0 and "was off" in note
    with pytest.raises(UserError, match="no new-parts warm-up"):
        plan(9, 0.0, _Model(PARTS), {}, 7)


# ------------------------------------------------------------------------------------------------
# experiments/compare_sweeps.py: the with/without comparison, on fabricated sweeps (no training)
# ------------------------------------------------------------------------------------------------

def _fake_sweep(folder, seeds, shift: int, stamp: dict):
    """OUT_DIR/retromae_seed<s>: a metrics.jsonl and a final_eval.npz whose held-out ranks are `shift` better
    than a common base (Lee cosines: the human scores plus noise)."""
    import json

    import numpy as np

    from experiments import final_eval, metric_keys

    rng = np.random.default_rng(0)
    human = rng.random((50, 50))
    human = (human + human.T) / 2
    for seed in seeds:
        run = folder / f"retromae_seed{seed}"
        run.mkdir(parents=True)
        rows = [{"step": 10, "kind": "train", "encoder_loss": 7.0 - shift / 10 + seed / 100},
                {"step": 10, "kind": "eval", **{k: 0.5 for k in metric_keys.EVAL_METRICS}}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ranks = np.maximum(1, np.random.default_rng(seed).integers(1, 40, 300) - shift)
        cos = human + np.random.default_rng(seed + 10).normal(0, 0.3, (50, 50))
        final_eval.save_items(run / "final_eval.npz", {
            "ranks": ranks, "ranks_mean": ranks, "lee_cls": cos, "lee_mean": cos, "lee_human": human,
            "ndcg10_cls": np.full(50, 0.8), "metrics": {"stamp": stamp}, "seconds": {}})
    return folder


def test_compare_sweeps_gives_paired_intervals_and_refuses_different_items(tmp_path):
    from experiments import compare_sweeps

    stamp = {"eval_seed": 0, "heldout_docs": 125, "max_length": 128}
    warm = _fake_sweep(tmp_path / "warm", [1, 2, 3], shift=8, stamp=stamp)
    cold = _fake_sweep(tmp_path / "nowarm", [1, 2, 3], shift=0, stamp=stamp)
    assert compare_sweeps.main([str(warm), str(cold), "--seeds", "1", "2", "3", "--n-boot", "200"]) == 0
    report = __import__("json").loads((warm / "compare_nowarm.json").read_text())
    table = report["intervals"]["retromae (warm) − retromae (nowarm)"]
    assert table["heldout/mrr10"]["verdict"] == "separates (retromae (warm) > retromae (nowarm))"
    assert table["lee/pearson_cls"]["diff"] == 0.0  # the same cosines in both sweeps
    assert table["encoder_loss"]["diff"] == pytest.approx(-0.8)
    other = _fake_sweep(tmp_path / "other", [1, 2, 3], shift=0, stamp={**stamp, "eval_seed": 1})
    with pytest.raises(SystemExit, match="evaluated on different items"):
        compare_sweeps.main([str(warm), str(other), "--seeds", "1", "2", "3", "--n-boot", "50"])
