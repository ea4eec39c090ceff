"""`retromae-ds eval --pairs/--beir` and `retromae-ds probe`: the numbers, the layouts agreeing, the fine-tune
moving the encoder, the curve over a run's checkpoints, and bad input refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retromae_ds import cli
from retromae_ds.data.retrieval_sets import load_pairs
from retromae_ds.retrieval import metrics as M
from retromae_ds.retrieval.probe import ProbeSettings
from tests.helpers import engine_runs as R
from tests.helpers.retrieval_data import lee_pairs, tiny_encoder_dir, write_beir, write_pairs
from tests.helpers.tiny_run import minilm_path, tiny_run

EVAL = ["--no-lee", "--max-length", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    rows = lee_pairs(200, 300)[:48]
    # evaluation: MiniLM, whose embeddings tell texts apart (a random model's [CLS] cosines all round to ~1,
    # so float rounding would pick its rankings); fine-tuning: a tiny random encoder, fast to train
    return {"root": root, "encoder": minilm_path(), "tiny": tiny_encoder_dir(root),
            "pairs": write_pairs(root / "eval.jsonl", rows),
            "beir": write_beir(root / "beir", rows), "rows": rows,
            "train": write_pairs(root / "train.tsv", lee_pairs(0, 120))}


def _eval(args, tmp_path, name="out.json", batch_size=16):
    out = tmp_path / name
    assert cli.main(["eval", *args, *EVAL, "--batch-size", str(batch_size), "--json", str(out)]) == 0
    return json.loads(out.read_text())["metrics"]


def test_eval_pairs_equals_a_plain_ranking_and_the_beir_layout(files, tmp_path, capsys):
    """The CLI's numbers = a ranking by cosine written out here (all scores, stable, trec_eval's tie
    order) scored by the metrics module; the same data as a BEIR folder gives the same numbers; dot
    similarity ranks the unnormalised vectors."""
    from retromae_ds.evaluate import embed_texts, load_encoder

    pairs = _eval([files["encoder"], "--pairs", files["pairs"], "--bootstrap", "200"], tmp_path)
    printed = capsys.readouterr().out
    assert "ndcg10" in printed and "bm25" in printed and "peak resident memory" in printed
    rset = load_pairs(files["pairs"])
    encoder, tokenizer = load_encoder(files["encoder"])
    q = embed_texts(encoder, tokenizer, rset.queries, max_length=64)["cls"]
    d = embed_texts(encoder, tokenizer, rset.docs, max_length=64)["cls"]
    order = M.tie_order(rset.doc_ids)
    scores = q @ d[order].T
    ranked = order[np.argsort(-scores, axis=1, kind="stable")[:, :100]]
    expected = M.per_query(ranked, M.judgements(rset.query_ids, rset.doc_ids, rset.qrels))
    for name in ("ndcg10", "mrr10", "recall10"):
        assert pairs[f"pairs/{name}_cls"] == pytest.approx(expected[name].mean(), abs=1e-6)
        assert pairs[f"pairs/{name}_cls_lo"] <= pairs[f"pairs/{name}_cls"] <= pairs[f"pairs/{name}_cls_hi"]
    assert "pairs/recall100_cls" not in pairs  # 48 passages: every one is in the top 100
    assert pairs["pairs/num_queries"] == len(files["rows"]) and pairs["pairs/mrr10_bm25"] > 0.5
    beir = _eval([files["encoder"], "--beir", files["beir"], "--bootstrap", "0"], tmp_path, "beir.json")
    for key, value in pairs.items():
        if key.startswith("pairs/") and not key.endswith(("_lo", "_hi")):
            assert beir["beir/" + key[len("pairs/"):]] == pytest.approx(value, abs=1e-6), key
    # dot: the unnormalised vectors; mean-pooled vectors' norms differ, so their ranking changes
    dot = _eval([files["encoder"], "--pairs", files["pairs"], "--bootstrap", "0", "--no-bm25", "--similarity", "dot"],
                tmp_path, "dot.json")
    assert "pairs/ndcg10_bm25" not in dot and dot["pairs/ndcg10_mean"] != pairs["pairs/ndcg10_mean"]


@pytest.mark.parametrize("case", ["missing_field", "empty", "unknown_qrels_id", "duplicate_id", "both"])
def test_bad_input_exits_2_with_one_paragraph_and_writes_nothing(files, tmp_path, capsys, case):
    out = tmp_path / "result.json"
    if case == "missing_field":
        rows = [{"query": r["query"], "text": r["passage"]} for r in files["rows"][:3]]
        args = ["--pairs", write_pairs(tmp_path / "p.jsonl", rows, fields=("query", "text"))]
        expect = ["p.jsonl", "line 1", "--passage-field"]
    elif case == "empty":
        (tmp_path / "e.jsonl").write_text("")
        args, expect = ["--pairs", str(tmp_path / "e.jsonl")], ["e.jsonl", "no rows"]
    elif case == "unknown_qrels_id":
        beir = Path(write_beir(tmp_path / "b", files["rows"][:5]))
        with open(beir / "qrels" / "test.tsv", "a") as f:
            f.write("q1\tnot-a-doc\t1\n")
        args, expect = ["--beir", str(beir)], ["test.tsv", "line 7", "not-a-doc", "corpus.jsonl"]
    elif case == "duplicate_id":
        beir = Path(write_beir(tmp_path / "b", files["rows"][:5]))
        with open(beir / "corpus.jsonl", "a") as f:
            f.write(json.dumps({"_id": "d2", "text": "again"}) + "\n")
        args, expect = ["--beir", str(beir)], ["corpus.jsonl", "d2", "line 3", "line 6"]
    else:
        args, expect = ["--pairs", files["pairs"], "--beir", files["beir"]], ["--pairs or --beir"]
    assert cli.main(["eval", files["encoder"], *args, *EVAL, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in expect:
        assert word.lower() in err.lower(), (word, err)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


PROBE = ["--steps", "20", "--batch-size", "16", "--lr", "2e-3", "--max-length", "64", "--setting", "bge"]


def test_probe_fine_tune_beats_its_start_and_is_deterministic(files, tmp_path):
    """On its own training pairs a 20-step fine-tune must rank far better than the random start; the same
    seed gives the same numbers."""
    train_as_eval = write_pairs(tmp_path / "train_eval.jsonl", lee_pairs(0, 120)[:32])
    results = []
    for attempt in ("a", "b"):
        assert cli.main(["probe", files["tiny"], "--train-pairs", files["train"], "--pairs", train_as_eval,
                         *PROBE, "--out", str(tmp_path / attempt)]) == 0
        (path,) = (tmp_path / attempt).glob("probe-bge-*.json")
        results.append(json.loads(path.read_text()))
    before, after = results[0]["zero_shot"], results[0]["after"]
    assert after["pairs/ndcg10_cls"] > before["pairs/ndcg10_cls"] + 0.15, (before, after)
    assert after["pairs/ndcg10_cls_lo"] > before["pairs/ndcg10_cls_hi"]
    assert results[0]["after"] == results[1]["after"] and results[0]["per_query"] == results[1]["per_query"]
    assert len(results[0]["per_query"]["after"]["ndcg10"]) == after["pairs/num_queries"]


def test_the_cached_loss_trains_as_the_plain_one(files, tmp_path):
    """--mini-batch-size: the same batches of 16 through CachedMultipleNegativesRankingLoss in slices of 8
    give the plain loss's training loss and retrieval (no dropout in the tiny encoder)."""
    results = []
    for mini in ("0", "8"):
        out = tmp_path / f"mini{mini}"
        assert cli.main(["probe", files["tiny"], "--train-pairs", files["train"], "--pairs", files["pairs"], *PROBE,
                         "--steps", "4", "--mini-batch-size", mini, "--out", str(out)]) == 0
        (path,) = out.glob("probe-bge-*.json")
        results.append(json.loads(path.read_text()))
    assert results[0]["settings"]["mini_batch_size"] == 0 and results[1]["settings"]["mini_batch_size"] == 8
    assert results[1]["train_loss"] == pytest.approx(results[0]["train_loss"], rel=1e-4)
    assert results[1]["after"]["pairs/mrr10_cls"] == pytest.approx(results[0]["after"]["pairs/mrr10_cls"], abs=0.02)


def test_early_stopping_keeps_the_best_held_out_state(files, tmp_path):
    """--val-pairs: evaluated every 5 steps, the fine-tune stops --patience evaluations after its best one and
    ends in that best state, not its last (the held-out set is also the evaluation set here, so the final
    score must be the best held-out score); the results go to a file of their own."""
    rows = lee_pairs(0, 120)[:24]
    val = write_pairs(tmp_path / "val.jsonl", rows)
    out = tmp_path / "es"
    assert cli.main(["probe", files["tiny"], "--train-pairs", files["train"], "--pairs", val, "--val-pairs", val,
                     *PROBE, "--steps", "60", "--eval-every", "5", "--patience", "2", "--out", str(out)]) == 0
    (path,) = out.glob("probe-bge-*.json")
    result = json.loads(path.read_text())
    v = result["validation"]
    steps, scores = zip(*v["history"])
    assert steps == tuple(range(5, v["stopped_at"] + 1, 5))
    assert v["best_ndcg10"] == max(scores) and v["best_step"] == steps[scores.index(max(scores))]
    assert v["stopped_at"] == v["best_step"] + 2 * 5 < 60  # stopped early, 2 evaluations without a gain
    assert scores[-1] < v["best_ndcg10"]  # the last state is worse: the reload is what the next line sees
    assert result["after"]["pairs/ndcg10_cls"] == pytest.approx(v["best_ndcg10"], abs=1e-9)
    fixed = {**result["settings"], "val_pairs": "", "val_queries": 0, "eval_every": 0, "patience": 0}
    assert path.name == f"probe-bge-{ProbeSettings(**result['settings']).key()}.json" != \
        f"probe-bge-{ProbeSettings(**fixed).key()}.json"  # a fixed-length probe's results are not mistaken for it


def test_probe_refuses_bad_input_before_training(files, tmp_path, capsys):
    few = write_pairs(tmp_path / "few.jsonl", files["rows"][:4])
    cases = [(["--train-pairs", few, "--pairs", files["pairs"]], ["few.jsonl", "--batch-size"]),
             (["--train-pairs", files["train"]], ["--pairs", "--beir"]),
             (["--train-pairs", files["train"], "--pairs", files["pairs"], "--steps", "0"], ["--steps"]),
             (["--train-pairs", files["train"], "--pairs", files["pairs"], "--patience", "3"], ["--val-pairs"]),
             (["--train-pairs", files["train"], "--pairs", files["pairs"], "--val-pairs", few, "--patience", "0"],
              ["--patience"])]
    for args, expect in cases:
        assert cli.main(["probe", files["tiny"], *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in expect), err
    assert cli.main(["probe", str(tmp_path), "--train-pairs", files["train"], "--pairs", files["pairs"]]) == 2
    assert "neither an encoder folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_with_eval_pairs_and_its_probe_curve(files, tmp_path, capsys):
    """A 6-step run saving 3 checkpoints logs eval/pairs/* in its final evaluation (the numbers
    `retromae-ds eval` gives on its export); the probe scores the 3 checkpoints, draws the curve, and a
    second call probes nothing again."""
    run = tiny_run(tmp_path, n_docs=60, max_seq_len=64)
    out = tmp_path / "run"
    args = run["base"] + ["--micro-batch-size", "4", "--max-steps", "6", "--save-interval", "2", "--keep-last", "3",
                          "--eval-heldout-docs", "0", "--eval-max-length", "64",
                          "--eval-pairs", files["pairs"], "--output-dir", str(out), "--deepspeed",
                          "ds_configs/zero2.json"]
    res = R.run("python", 1, args, tmp_path / "run.log", timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]
    evals = R.metrics(out, "eval")
    assert [e["step"] for e in evals] == [6]
    assert 0 < evals[-1]["pairs/ndcg10_cls"] <= 1 and evals[-1]["pairs/ndcg10_bm25"] > 0.5
    # the trainer's batches (--micro-batch-size 4): a random model's cosines differ in the last bits only
    exported = _eval([str(out / "export"), "--pairs", files["pairs"], "--bootstrap", "0", "--no-bm25"], tmp_path,
                     batch_size=4)
    for key in ("pairs/ndcg10_cls", "pairs/mrr10_mean"):
        assert exported[key] == pytest.approx(evals[-1][key], abs=1e-5), key

    probe = ["probe", str(out), "--train-pairs", files["train"], "--pairs", files["pairs"], *PROBE, "--steps", "4"]
    assert cli.main(probe) == 0
    (path,) = (out / "probe").glob("probe-bge-*.json")
    results = json.loads(path.read_text())
    assert [e["step"] for e in results["checkpoints"]] == [2, 4, 6]
    assert path.with_suffix(".png").stat().st_size > 10_000
    assert results["bm25"]["pairs/ndcg10_bm25"] == pytest.approx(evals[0]["pairs/ndcg10_bm25"], abs=1e-9)
    # the checkpoint exported on the fly is the run's last state (scored in the probe's batches of 32)
    alone = _eval([str(out / "export"), "--pairs", files["pairs"], "--bootstrap", "0", "--no-bm25"], tmp_path,
                  "alone32.json", batch_size=32)
    assert results["checkpoints"][-1]["zero_shot"]["pairs/ndcg10_cls"] == pytest.approx(
        alone["pairs/ndcg10_cls"], abs=1e-9)
    assert not list((out / "probe").glob(".probe-export-*"))
    capsys.readouterr()
    assert cli.main(probe) == 0
    assert "probing 0 of 3 checkpoints" in capsys.readouterr().out
    assert json.loads(path.read_text()) == results
