"""The ablation's from-scratch preset (experiments/ablation.py --preset scratch) without training: the flags
it resolves to, the preparation it plans and caches (tokenizer, data), the runs' command; and the pieces it
added to the evaluation: held-out retrieval by mean pooling, its bootstrap intervals, the cls_gain curves."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import (ablation, final_eval, metric_keys, paired_statistics, pairing_checks, report, run_inputs,
                         runs)
from retromae_ds.data.heldout import heldout_queries
from retromae_ds.evaluate import embed_ids, heldout_retrieval, rank_metrics, retrieval_ranks
from tests.helpers.corpora import lee_articles, write_jsonl

# ------------------------------------------------------------------------------------------------
# The preset's flags and plan
# ------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """ablation.main with --threads sets OMP_NUM_THREADS and torch's threads: undone after each test."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)



def parse(argv):
    return ablation.build_parser().parse_args(ablation.expand_scratch_preset(argv))


def test_scratch_preset_flags_and_later_flags_win():
    args = parse(["--preset", "scratch"])
    assert args.preset == "scratch"
    assert (args.train_tokenizer, args.vocab_size, args.max_seq_len, args.model_config) == \
        ("wordpiece", 8000, 128, "bert-tiny")
    assert args.corpus is None and args.model is None  # the demo corpus, from random init
    assert args.objectives == ["retromae", "mlm"] and len(args.seeds) >= 3 and (args.threads, args.jobs) == (1, 2)
    assert (args.steps, args.micro_batch, args.lr, args.eval_interval) == (3600, 8, 1e-3, 400)
    assert args.out_dir.endswith("ablation_scratch") and args.json.endswith("ablation_scratch.json")
    later = parse(["--steps", "7", "--preset=scratch", "--seeds", "4", "--model-config", "bert-mini",
                   "--corpus", "a.jsonl", "b/"])
    assert (later.steps, later.seeds, later.model_config, later.corpus) == (7, [4], "bert-mini", ["a.jsonl", "b/"])
    assert later.train_tokenizer == "wordpiece" and later.preset == "scratch"


def test_plan_on_the_demo_corpus(tmp_path):
    args = parse(["--out-dir", str(tmp_path / "out")])
    steps = run_inputs.scratch_plan(args, Path(args.out_dir))
    out = (tmp_path / "out").resolve()
    assert [s.name for s in steps] == ["demo_corpus", "tokenizer", "prepare"]
    assert not any(s.cached for s in steps)
    demo = str(out / "corpus" / "demo.jsonl")
    assert steps[0].argv is None and steps[0].output == out / "corpus" / "demo.jsonl"
    tok = steps[1].argv
    assert tok[0] == "tokenizer" and tok[tok.index("--input") + 1] == demo
    assert tok[tok.index("--algorithm") + 1] == "wordpiece" and tok[tok.index("--vocab-size") + 1] == "8000"
    assert tok[tok.index("--output") + 1] == str(out / "tokenizer")
    prep = steps[2].argv
    assert prep[0] == "prepare" and prep[prep.index("--input") + 1] == demo
    assert prep[prep.index("--tokenizer") + 1] == str(out / "tokenizer")
    assert prep[prep.index("--output") + 1] == str(out / "data" / "corpus_128")
    assert prep[prep.index("--max-seq-len") + 1] == "128"
    # the runs: the preset name with the trained tokenizer, on the prepared data
    args.data = str(run_inputs.scratch_paths(Path(args.out_dir), 128)["data"])
    tokenizer = run_inputs.run_tokenizer(args)
    cmd = runs.pretrain_command(args, "retromae", 1, run_inputs.random_init_config(args, out, tokenizer),
                                    tokenizer, out / "retromae_seed1")
    assert cmd[cmd.index("--model-config") + 1] == "bert-tiny"
    assert cmd[cmd.index("--tokenizer") + 1] == str(out / "tokenizer")
    assert cmd[cmd.index("--data") + 1] == str(out / "data" / "corpus_128")


def test_refuses_meaningless_combinations(tmp_path, capsys):
    for argv in (["--preset", "scratch", "--model", "x"], ["--preset", "scratch", "--data", "p"]):
        with pytest.raises(SystemExit):
            ablation.main(argv + ["--out-dir", str(tmp_path)])
    assert "--data is a prepared dataset" in capsys.readouterr().err


class PlanDone(Exception):
    pass


@pytest.fixture
def small_corpus(tmp_path):
    return write_jsonl(tmp_path / "lee.jsonl", [{"text": t} for t in lee_articles(40)])


def _main_until_training(monkeypatch, argv) -> dict:
    """ablation.main up to its first training run: what it ran to prepare, and that run's command."""
    seen = {"cli": []}
    real_cli = __import__("retromae_ds.cli", fromlist=["main"]).main

    def spy_cli(argv_):
        seen["cli"].append(argv_[0])
        return real_cli(argv_)

    def fake_run_one(args, objective, seed, model_cfg, tokenizer):
        seen.update(reuse=args.reuse, data=args.data, tokenizer=tokenizer, model_cfg=model_cfg,
                    command=runs.pretrain_command(args, objective, seed, model_cfg, tokenizer, Path("x")))
        raise PlanDone

    monkeypatch.setattr("retromae_ds.cli.main", spy_cli)
    monkeypatch.setattr(runs, "run_one", fake_run_one)
    with pytest.raises(PlanDone):
        ablation.main(argv)
    return seen


def test_preparation_is_cached_with_reuse_and_redone_when_the_corpus_changes(tmp_path, small_corpus, monkeypatch):
    out = tmp_path / "out"
    argv = ["--preset", "scratch", "--corpus", small_corpus, "--vocab-size", "400", "--max-seq-len", "64",
            "--heldout-docs", "8", "--out-dir", str(out), "--png", "none"]
    first = _main_until_training(monkeypatch, argv)
    assert first["cli"] == ["tokenizer", "prepare"]  # no demo corpus: --corpus is the input
    data = str((out / "data" / "corpus_64").resolve())
    assert first["data"] == data and Path(data + ".idx").exists()
    meta = json.loads(Path(data + ".json").read_text())
    assert meta["tokenizer"]["vocab_size"] == 400 and meta["max_seq_len"] == 64
    assert first["command"][first["command"].index("--model-config") + 1] == "bert-tiny"
    assert os.environ["OMP_NUM_THREADS"] == "1"  # --threads 1 reaches the runs (run_one passes the environment)

    # --reuse: both steps skipped, and finished runs may be reused
    again = _main_until_training(monkeypatch, argv + ["--reuse"])
    assert again["cli"] == [] and again["reuse"] is True
    # without --reuse everything is redone
    assert _main_until_training(monkeypatch, argv)["cli"] == ["tokenizer", "prepare"]
    # the corpus changed: both steps run again, and no run is reused (its data changed)
    with open(small_corpus, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": lee_articles(41)[-1]}) + "\n")
    changed = _main_until_training(monkeypatch, argv + ["--reuse"])
    assert changed["cli"] == ["tokenizer", "prepare"] and changed["reuse"] is False
    # other settings: a different vocabulary size retrains the tokenizer, so prepare runs too
    assert _main_until_training(monkeypatch, argv + ["--reuse", "--vocab-size", "420"])["cli"] == \
        ["tokenizer", "prepare"]
    # a step whose output vanished runs again, and so does every step after it
    assert _main_until_training(monkeypatch, argv + ["--reuse", "--vocab-size", "420"])["cli"] == []
    os.remove(data + ".idx")
    assert _main_until_training(monkeypatch, argv + ["--reuse", "--vocab-size", "420"])["cli"] == ["prepare"]
    # the evaluation's length follows the blocks (the preset's model has 64 positions for them); a longer one
    # is refused before any training, naming the fix
    assert first["command"][first["command"].index("--eval-max-length") + 1] == "64"
    with pytest.raises(SystemExit, match="--eval-max-length 128 is longer than the random-init model's 64 positions"):
        _main_until_training(monkeypatch, argv + ["--reuse", "--vocab-size", "420", "--eval-max-length", "128"])


def test_custom_size_gets_the_trained_vocabulary(tmp_path, small_corpus, monkeypatch):
    seen = _main_until_training(monkeypatch, [
        "--preset", "scratch", "--corpus", small_corpus, "--vocab-size", "400", "--max-seq-len", "64",
        "--heldout-docs", "8", "--out-dir", str(tmp_path / "out"), "--png", "none", "--model-config", "",
        "--hidden", "32", "--layers", "1", "--heads", "2"])
    cfg = json.loads((Path(seen["model_cfg"]) / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["pad_token_id"], cfg["hidden_size"]) == (400, 0, 32)


# ------------------------------------------------------------------------------------------------
# Held-out retrieval by mean pooling
# ------------------------------------------------------------------------------------------------

class _Output:
    def __init__(self, hidden):
        self.last_hidden_state = hidden


class MeanOnlyEncoder(torch.nn.Module):
    """Position 0 ([CLS]) is all zeros; every other non-special position is the one-hot of its id. So the
    [CLS] embedding says nothing (every score ties at 0: each query's target ranks last, pessimistically),
    while the mean-pooled one is the passage's bag of ids (perfect for passages over disjoint ids)."""

    def __init__(self, vocab_size: int, specials=(0, 1, 2)):
        super().__init__()
        self.vocab_size, self.specials = vocab_size, specials
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        hidden = torch.nn.functional.one_hot(input_ids, self.vocab_size).float()
        for s in self.specials:
            hidden[input_ids == s] = 0.0
        hidden[:, 0] = 0.0
        return _Output(hidden)


def disjoint_passages(n, length=40, ids_per_passage=50, first_id=10, seed=0):
    rng = np.random.default_rng(seed)
    return [first_id + k * ids_per_passage + rng.integers(0, ids_per_passage, length) for k in range(n)]


def test_mean_pooling_retrieval_where_cls_knows_nothing():
    n = 30
    got = heldout_retrieval(MeanOnlyEncoder(vocab_size=10 + 50 * n), disjoint_passages(n), 0, 1, 2, seed=1,
                            per_query=True)
    assert got["heldout/ranks"] == [n] * n  # [CLS]: all ties, counted against the query
    assert got["heldout/ranks_mean"] == [1] * n
    assert {k: got[k] for k in ("heldout/mrr10", "heldout/recall1", "heldout/recall10")} == \
        {"heldout/mrr10": 0.0, "heldout/recall1": 0.0, "heldout/recall10": 0.0}
    mean_keys = [k for k in metric_keys.HELDOUT_MEAN_METRICS if "recall100" not in k]  # 30 candidates: no Recall@100
    assert {k: got[k] for k in mean_keys} == {k: 1.0 for k in mean_keys}
    assert "heldout/recall100" not in got and "heldout/recall100_mean" not in got
    assert got["heldout/num_queries"] == n


def test_mean_pooling_ranks_match_a_direct_forward():
    """A real (random) BERT: the mean-pooling ranks are those of the masked mean of its hidden states over
    [CLS] ids [SEP] (no padding), computed here row by row."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)).eval()
    rng = np.random.default_rng(3)
    blocks = [rng.integers(5, 600, int(rng.integers(16, 50))) for _ in range(25)]  # uneven: batches pad
    got = heldout_retrieval(encoder, blocks, 1, 2, 0, seed=4, max_length=64, batch_size=4, per_query=True)
    queries, targets = heldout_queries(blocks, seed=4)

    def mean_embeddings(rows):
        out = []
        with torch.no_grad():
            for ids in rows:
                x = torch.tensor([[1, *ids[:62].tolist(), 2]])
                out.append(encoder(input_ids=x).last_hidden_state[0].mean(0).numpy())
        out = np.stack(out)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    want = retrieval_ranks(mean_embeddings(queries), mean_embeddings(targets))
    assert got["heldout/ranks_mean"] == want.tolist()
    want_metrics = rank_metrics(want, "_mean", candidates=len(targets))  # 25 candidates: no Recall@100
    assert {k: got[k] for k in want_metrics} == pytest.approx(want_metrics)
    assert set(want_metrics) == set(metric_keys.HELDOUT_MEAN_METRICS) - {"heldout/recall100_mean"} <= set(got)
    # ... and it is not the [CLS] ranking under another name
    cls = embed_ids(encoder, queries, 1, 2, 0)["cls"], embed_ids(encoder, targets, 1, 2, 0)["cls"]
    assert got["heldout/ranks"] == retrieval_ranks(*cls).tolist() != got["heldout/ranks_mean"]


# ------------------------------------------------------------------------------------------------
# The ablation's per-query evaluation and intervals with mean pooling; cls_gain over training
# ------------------------------------------------------------------------------------------------

def _items(ranks, ranks_mean, seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(50, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    upper = np.triu(rng.uniform(0, 1, (50, 50)), 1)
    return {"ranks": np.asarray(ranks), "ranks_mean": np.asarray(ranks_mean), "lee_cls": emb @ emb.T,
            "lee_mean": emb @ emb.T, "lee_human": upper + upper.T + np.eye(50), "ndcg10_cls": rng.uniform(0, 1, 50)}


def test_intervals_cover_mean_pooling_from_its_own_ranks():
    """Objective a retrieves better than b by mean pooling on every query and identically by [CLS]: the
    mean-pooling intervals separate, the [CLS] ones do not (they would if they read the wrong ranks)."""
    rng = np.random.default_rng(0)
    a, b = [], []
    for seed in range(3):
        cls = rng.integers(1, 60, 200)
        worse = rng.integers(5, 60, 200)
        a.append(_items(cls, np.maximum(1, worse - 4), seed))
        b.append(_items(cls, worse, seed))
    ivals = paired_statistics.intervals({"a": a, "b": b}, {}, [("a", "b")], n_boot=200)["a − b"]
    assert set(metric_keys.HELDOUT_MEAN_METRICS) <= set(ivals)
    for metric in ("heldout/mrr10_mean", "heldout/recall10_mean"):
        assert ivals[metric]["low"] > 0 and ivals[metric]["verdict"] == "separates (a > b)", metric
    for metric in metric_keys.RETRIEVAL_METRICS:
        assert ivals[metric]["diff"] == 0 and ivals[metric]["verdict"] == "does not separate", metric
    want = np.mean([rank_metrics(x["ranks_mean"], "_mean")["heldout/mrr10_mean"] for x in a])
    assert np.mean([paired_statistics.item_metric(x, "heldout/mrr10_mean") for x in a]) == pytest.approx(want)
    assert "heldout/mrr10_mean" in report.final_eval_table({"a": a, "b": b}, ["a", "b"])


def test_items_file_keeps_the_mean_ranks_and_an_old_file_is_recomputed(tmp_path):
    item = _items([1, 2, 3], [3, 2, 1], 0)
    item.update(metrics={"stamp": {"x": 1}}, seconds={"total": 1.0})
    final_eval.save_items(tmp_path / "final_eval.npz", item)
    back = final_eval.load_items(tmp_path / "final_eval.npz")
    assert back["ranks_mean"].tolist() == [3, 2, 1] and back["ranks"].tolist() == [1, 2, 3]
    np.savez(tmp_path / "old.npz", **{k: v for k, v in item.items() if k in ("ranks", "lee_cls", "lee_mean",
                                                                              "lee_human", "ndcg10_cls")},
             meta=json.dumps({"metrics": item["metrics"], "seconds": item["seconds"]}))
    old = final_eval.load_items(tmp_path / "old.npz")
    assert "ranks_mean" not in old  # final_items evaluates it again
    # compare_sweeps reads such files as they are: their intervals leave mean pooling out
    ivals = paired_statistics.intervals({"a": [old], "b": [old]}, {}, [("a", "b")], n_boot=20)["a − b"]
    assert set(ivals) == set(metric_keys.CI_METRICS) - set(metric_keys.HELDOUT_MEAN_METRICS)
    assert "heldout/mrr10_mean" not in report.final_eval_table({"a": [old]}, ["a"])


def _fake_run(folder: Path, gains: dict[int, float] | None, mrr: float) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for step in (0, 10, 20):
        if step:
            rows.append({"step": step, "kind": "train", "encoder_loss": 5.0 - step / 10})
        row = {"step": step, "kind": "eval", **{k: mrr if step else 0.05 for k in metric_keys.EVAL_METRICS}}
        if gains is not None:
            row.update({"cls_gain": gains[step], "heldout/decoder_loss": 7.0 - step / 10})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_cls_gain_curves_tables_and_summary(tmp_path):
    run_dirs = {"retromae": [_fake_run(tmp_path / f"retromae_seed{s}", {0: 0.0, 10: 0.1 * s, 20: 0.3 * s}, 0.2)
                             for s in (1, 2)],
                "mlm": [_fake_run(tmp_path / f"mlm_seed{s}", None, 0.1) for s in (1, 2)]}
    curves = report.eval_curves(run_dirs)
    gain = curves["retromae"]["cls_gain"]
    assert gain["steps"] == [0, 10, 20] and gain["per_seed"] == [[0.0, 0.1, 0.3], [0.0, 0.2, 0.6]]
    assert gain["mean"] == pytest.approx([0.0, 0.15, 0.45]) and gain["max"] == [0.0, 0.2, 0.6]
    assert "cls_gain" not in curves["mlm"] and curves["mlm"]["heldout/mrr10_mean"]["mean"] == [0.05, 0.1, 0.1]
    table = report.curve_table(curves, "cls_gain").splitlines()
    assert table[0] == "| step | retromae |" and table[-1] == "| 20 | 0.450 [0.300, 0.600] |"
    assert report.curve_table({"mlm": curves["mlm"]}, "cls_gain") == ""

    results = {o: [runs.final_metrics(d) for d in dirs] for o, dirs in run_dirs.items()}
    summary = paired_statistics.summarise(results, baseline="mlm")
    assert summary["per_objective"]["retromae"]["cls_gain"]["mean"] == pytest.approx(0.45)
    assert math.isnan(summary["per_objective"]["mlm"]["cls_gain"]["mean"])
    assert summary["init"]["cls_gain"]["mean"] == 0.0
    assert summary["paired_vs_baseline"]["retromae"]["heldout/mrr10_mean"]["mean"] == pytest.approx(0.1)
    assert pairing_checks.init_mismatches(results) == []  # the decoder's numbers are not part of the encoder check
    rows = {line.split(" | ")[0]: line for line in report.markdown_table(summary).splitlines()}
    assert rows["| cls_gain"] == "| cls_gain | 0.000 | 0.450 ± 0.212 | — |"
    paired = report.paired_table(summary, "mlm")
    assert "| cls_gain | — |" in paired and "| heldout/mrr10_mean | +0.100 ± 0.000 |" in paired


# ------------------------------------------------------------------------------------------------
# --jobs: runs side by side, results in sweep order
# ------------------------------------------------------------------------------------------------

def test_jobs_run_side_by_side_and_report_in_sweep_order(monkeypatch):
    import threading
    import time

    lock, running, peak, started = threading.Lock(), [0], [0], []

    def fake_run_one(args, objective, seed, model_cfg, tokenizer):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            started.append((seed, objective))
        time.sleep(0.3 if (seed, objective) == (1, "retromae") else 0.01)  # later runs finish first
        with lock:
            running[0] -= 1
        if (seed, objective) == (1, "mlm") and args.fail:
            raise SystemExit("mlm seed 1 failed")
        return Path(f"{objective}_seed{seed}"), 1.0

    monkeypatch.setattr(runs, "run_one", fake_run_one)
    order = [(s, o) for s in (1, 2, 3) for o in ("retromae", "mlm")]
    for jobs in (1, 2, 3):
        args = parse(["--seeds", "1", "2", "3", "--objectives", "retromae", "mlm", "--jobs", str(jobs)])
        args.fail = False
        peak[0] = 0
        got = [(s, o, out.name) for s, o, (out, _) in runs.run_all(args, None, "tok")]
        assert got == [(s, o, f"{o}_seed{s}") for s, o in order]
        assert peak[0] == jobs  # never more at once than asked, and as many as asked

    # a failed run stops the sweep while an earlier run still trains: queued runs never start
    args = parse(["--seeds", "1", "2", "3", "--objectives", "retromae", "mlm", "--jobs", "2"])
    args.fail = True
    started.clear()
    with pytest.raises(SystemExit, match="mlm seed 1 failed"):
        list(runs.run_all(args, None, "tok"))
    assert len(started) <= 3, started  # seed 1's two runs, and at most the one its free worker took


def test_jobs_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--jobs", "0", "--png", "none"])
    assert "--jobs must be >= 1" in capsys.readouterr().err
