"""The helpers of experiments/ablation.py (runs.py, paired_statistics.py, report.py, ...) and
experiments/plot_curves.py, on fabricated metrics.jsonl files and TensorBoard events; one small --model
sweep end to end (test_model_mode_two_seeds_two_objectives)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from experiments import (ablation, metric_keys, paired_statistics, pairing_checks, plot_curves, report, run_inputs,
                         runs)


def fake_run(folder: Path, *, init: float, final: float, enc_loss: float, steps: int = 20,
             half_written_tail: bool = False) -> Path:
    """A metrics.jsonl like the trainer's: eval at 0, 10 and `steps`; train every 10 steps.
    Every eval metric is `init` at step 0 and `final` at the end (midway: their mean)."""
    folder.mkdir(parents=True)
    rows = []
    for step in range(0, steps + 1, 10):
        if step:
            rows.append({"step": step, "kind": "train", "loss": 2 * enc_loss + step,
                         "encoder_loss": enc_loss + (steps - step), "decoder_loss": 9.0})
        value = init if step == 0 else final if step == steps else (init + final) / 2
        rows.append({"step": step, "kind": "eval", **{k: value for k in metric_keys.EVAL_METRICS}})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if half_written_tail:
        text += '{"step": 30, "kind": "ev'
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_final_metrics_reads_last_eval_init_and_last_train_window(tmp_path):
    run = fake_run(tmp_path / "retromae_seed1", init=0.1, final=0.4, enc_loss=5.0, half_written_tail=True)
    m = runs.final_metrics(run)
    assert m["step"] == 20
    assert m["lee/spearman_cls"] == 0.4 and m["heldout/recall100"] == 0.4
    assert m["init/lee/spearman_cls"] == 0.1
    assert m["encoder_loss"] == 5.0  # the step-20 record, not an earlier one
    assert runs.run_finished(run, 20) and not runs.run_finished(run, 30)


def test_final_metrics_rejects_a_run_without_records(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 0, "kind": "eval"}) + "\n")
    with pytest.raises(ValueError, match="did the run finish"):
        runs.final_metrics(tmp_path / "r")


def _results(tmp_path, finals: dict[str, list[float]], inits=(0.1, 0.2, 0.3)):
    results = {}
    for objective, values in finals.items():
        for seed, (value, init) in enumerate(zip(values, inits)):
            run = fake_run(tmp_path / f"{objective}_seed{seed}", init=init, final=value, enc_loss=3 + value)
            results.setdefault(objective, []).append(runs.final_metrics(run))
    return results


def test_summarise_mean_std_and_paired_differences(tmp_path):
    finals = {"retromae": [0.30, 0.50, 0.40], "mlm": [0.20, 0.45, 0.20]}
    summary = paired_statistics.summarise(_results(tmp_path, finals), baseline="mlm")
    s = summary["per_objective"]["retromae"]["heldout/mrr10"]
    assert s["mean"] == pytest.approx(0.4)
    assert s["std"] == pytest.approx(statistics.stdev(finals["retromae"]))  # sample std (ddof 1)
    assert (s["min"], s["max"], s["n"]) == (0.3, 0.5, 3)
    assert summary["per_objective"]["mlm"]["encoder_loss"]["mean"] == pytest.approx(3 + 0.85 / 3)
    assert summary["init"]["lee/pearson_cls"]["mean"] == pytest.approx(0.2)
    diff = summary["paired_vs_baseline"]["retromae"]["lee/spearman_cls"]
    assert diff["mean"] == pytest.approx(0.35 / 3)
    assert diff["std"] == pytest.approx(statistics.stdev([0.10, 0.05, 0.20]))
    assert "mlm" not in summary["paired_vs_baseline"]


def test_summarise_refuses_unpaired_seed_counts(tmp_path):
    results = _results(tmp_path, {"retromae": [0.3, 0.5, 0.4], "mlm": [0.2, 0.4]})
    with pytest.raises(ValueError, match="cannot pair"):
        paired_statistics.summarise(results, baseline="mlm")


def test_init_mismatches_flags_only_differing_step0(tmp_path):
    same = _results(tmp_path / "a", {"retromae": [0.3, 0.5], "mlm": [0.2, 0.4]}, inits=(0.1, 0.2))
    assert pairing_checks.init_mismatches(same) == []
    results = dict(same)
    results["dupmae"] = _results(tmp_path / "b", {"dupmae": [0.3, 0.5]}, inits=(0.1, 0.25))["dupmae"]
    problems = pairing_checks.init_mismatches(results)
    assert len(problems) == len(metric_keys.EVAL_METRICS)
    assert all(p.startswith("seed #1") and "dupmae=0.250000" in p for p in problems)


def test_markdown_tables(tmp_path):
    summary = paired_statistics.summarise(_results(tmp_path, {"retromae": [0.3, 0.5, 0.4], "mlm": [0.2, 0.45, 0.2]}),
                                 baseline="mlm")
    table = report.markdown_table(summary).splitlines()
    assert table[0] == "| metric | step 0 (init) | retromae | mlm |"
    assert len(table) == 2 + len(metric_keys.TABLE_METRICS)
    row = next(line for line in table if line.startswith("| heldout/mrr10 |"))
    assert row == f"| heldout/mrr10 | 0.200 | 0.400 ± 0.100 | 0.283 ± {statistics.stdev([0.2, 0.45, 0.2]):.3f} |"
    assert any(line.startswith("| encoder MLM loss") for line in table)
    paired = report.paired_table(summary, "mlm").splitlines()
    assert paired[0] == "| metric | retromae − mlm |"
    assert "| lee/spearman_cls | +0.117 ± 0.076 |" in paired


def test_write_model_config_is_a_loadable_bert_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = run_inputs.write_model_config(tmp_path / "cfg", hidden=64, layers=2, heads=4, intermediate=256)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.vocab_size) == ("bert", 64, 2, 4, 256, 30522)


# ------------------------------------------------------------------------------------------------
# plot_curves: TensorBoard events written the way the trainer's MetricsLogger writes them
# ------------------------------------------------------------------------------------------------

def write_events(folder: Path, scalars: dict[str, list[tuple[int, float]]]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, global_step=step)
    writer.close()
    return folder


def test_load_scalars_and_aggregate_over_common_steps(tmp_path):
    a = write_events(tmp_path / "retromae_seed1", {"train/encoder_loss": [(10, 4.0), (20, 3.0), (30, 2.0)]})
    b = write_events(tmp_path / "retromae_seed2", {"train/encoder_loss": [(10, 6.0), (20, 5.0)]})
    sa, sb = plot_curves.load_scalars(a), plot_curves.load_scalars(b)
    assert sa["train/encoder_loss"] == ([10, 20, 30], [4.0, 3.0, 2.0])
    steps, mean, low, high = plot_curves.aggregate([sa["train/encoder_loss"], sb["train/encoder_loss"]])
    assert list(steps) == [10, 20]  # step 30 only in one run: cut, not averaged over one
    assert list(mean) == [5.0, 4.0] and list(low) == [4.0, 3.0] and list(high) == [6.0, 5.0]
    assert plot_curves.aggregate([([1], [1.0]), ([2], [2.0])]) is None


def test_find_runs_groups_by_objective_and_skips_other_folders(tmp_path):
    for name in ["mlm_seed2", "mlm_seed10", "retromae_seed1"]:
        write_events(tmp_path / name, {"train/encoder_loss": [(1, 1.0)]})
    (tmp_path / "model_config").mkdir()
    (tmp_path / "dupmae_seed1").mkdir()  # no events: not a run yet
    groups = plot_curves.find_runs(tmp_path)
    assert {k: [p.name for p in v] for k, v in groups.items()} == {
        "mlm": ["mlm_seed2", "mlm_seed10"], "retromae": ["retromae_seed1"]}


def test_plot_curves_writes_png_with_the_tags_present(tmp_path):
    for objective, offset in [("retromae", 0.0), ("mlm", 0.5)]:
        for seed in (1, 2):
            write_events(tmp_path / f"{objective}_seed{seed}", {
                "train/encoder_loss": [(s, 5.0 - s / 10 + offset + seed / 10) for s in (10, 20, 30)],
                "train/decoder_loss": [(s, math.nan if objective == "mlm" else 6.0 - s / 10) for s in (10, 20, 30)],
                "eval/lee/spearman_cls": [(s, 0.1 + s / 100 - offset / 10) for s in (0, 15, 30)],
            })
    png = tmp_path / "out" / "curves.png"
    assert plot_curves.main([str(tmp_path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not list(png.parent.glob("*.tmp.png"))
    tags = plot_curves.plot_curves(plot_curves.find_runs(tmp_path), tmp_path / "b.png",
                                   reference={"eval/lee/spearman_cls": 0.2}, smooth=2)
    assert tags == ["train/encoder_loss", "train/decoder_loss", "eval/lee/spearman_cls"]
    assert plot_curves.main([str(tmp_path / "out"), "--out", str(tmp_path / "c.png")]) == 2  # no runs there


# ------------------------------------------------------------------------------------------------
# Confidence intervals: synthetic data with a known difference
# ------------------------------------------------------------------------------------------------

def _mean_fn(values, idx):
    import numpy as np

    return float(np.mean(values if idx is None else values[idx]))


def test_paired_bootstrap_separates_a_small_paired_difference_hidden_in_query_spread():
    """Queries differ a lot (sd 1), the objectives differ by +0.05 on every query (noise sd 0.02):
    the paired interval must separate; resampling the two objectives' queries independently (an
    unpaired interval, se ~ 0.04) would not."""
    import numpy as np

    rng = np.random.default_rng(0)
    query_level = rng.normal(0, 1.0, 300)
    b = [query_level + rng.normal(0, 0.02, 300) for _ in range(4)]
    a = [x + 0.05 + rng.normal(0, 0.02, 300) for x in b]
    ci = paired_statistics.paired_bootstrap(a, b, _mean_fn, 300, n_boot=1000, seed=1)
    assert ci["diff"] == pytest.approx(0.05, abs=0.01)
    assert 0 < ci["low"] < 0.05 < ci["high"] < 0.1
    assert paired_statistics.verdict(ci["low"], ci["high"], "a", "b") == "separates (a > b)"
    assert (ci["n_seeds"], ci["n_items"], len(ci["per_seed"])) == (4, 300, 4)


def test_paired_bootstrap_does_not_separate_seed_noise():
    """No true difference: per-seed offsets of +0.06, -0.02, +0.05, -0.03 (mean +0.015, what 4
    seeds of training noise look like) on a per-query difference with tiny query noise. An interval
    over queries alone would 'separate'; the seed level must keep it from doing so."""
    import numpy as np

    rng = np.random.default_rng(2)
    b = [rng.normal(0.3, 0.2, 400) for _ in range(4)]
    a = [x + off + rng.normal(0, 0.01, 400) for x, off in zip(b, (0.06, -0.02, 0.05, -0.03))]
    ci = paired_statistics.paired_bootstrap(a, b, _mean_fn, 400, n_boot=1000, seed=3)
    assert ci["diff"] == pytest.approx(0.015, abs=0.002)
    assert ci["low"] < 0 < ci["high"]
    assert paired_statistics.verdict(ci["low"], ci["high"], "a", "b") == "does not separate"
    # the mirror image is reported the other way round
    assert paired_statistics.verdict(-0.2, -0.1, "a", "b") == "separates (a < b)"


def test_lee_correlation_bootstrap_separates_less_noise_from_more():
    """Lee-style item data: cosines = human scores + noise; less noise must correlate better, and
    the document bootstrap must say so; the same noise level twice must not separate."""
    import numpy as np

    rng = np.random.default_rng(4)
    upper = np.triu(rng.uniform(0, 1, (50, 50)), 1)
    human = upper + upper.T + np.eye(50)

    def run(noise, seed):
        r = np.random.default_rng(seed)
        e = np.triu(r.normal(0, noise, (50, 50)), 1)
        cos = human + e + e.T
        return {"lee_cls": cos, "lee_mean": cos, "lee_human": human}

    good = [run(0.15, s) for s in range(3)]
    bad = [run(0.6, 10 + s) for s in range(3)]
    same = [run(0.6, 20 + s) for s in range(3)]
    fn = lambda item, idx: paired_statistics.item_metric(item, "lee/spearman_cls", idx)  # noqa: E731
    ci = paired_statistics.paired_bootstrap(good, bad, fn, 50, n_boot=300, seed=0)
    assert ci["low"] > 0.2
    ci = paired_statistics.paired_bootstrap(same, bad, fn, 50, n_boot=300, seed=0)
    assert ci["low"] < 0 < ci["high"]


def test_item_metric_on_all_items_matches_the_evaluator():
    import numpy as np

    from retromae_ds.evaluate import graded_ndcg_per_query, lee_metrics, rank_metrics

    rng = np.random.default_rng(5)
    emb = rng.normal(size=(50, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    upper = np.triu(rng.uniform(0, 1, (50, 50)), 1)
    human = upper + upper.T + np.eye(50)
    cos = emb @ emb.T
    ranks, ranks_mean = rng.integers(1, 200, 120), rng.integers(1, 200, 120)
    item = {"ranks": ranks, "ranks_mean": ranks_mean, "lee_cls": cos, "lee_mean": cos * 0.5, "lee_human": human,
            "ndcg10_cls": graded_ndcg_per_query(cos, human)}
    want = {**lee_metrics({"cls": cos, "mean": cos * 0.5}, human), **rank_metrics(ranks),
            **rank_metrics(ranks_mean, "_mean")}
    for metric in metric_keys.CI_METRICS:
        assert paired_statistics.item_metric(item, metric) == pytest.approx(want[metric]), metric
    # a resample with a repeated document pairs it with the others, never with itself
    rows, cols = paired_statistics.lee_pairs([3, 3, 7])
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(3, 7), (3, 7)]


def test_seed_t_interval_by_hand():
    ci = paired_statistics.seed_t_interval([1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0])
    half = 3.182 * statistics.stdev([1, 2, 3, 6]) / 2
    assert (ci["diff"], ci["low"], ci["high"]) == pytest.approx((3.0, 3.0 - half, 3.0 + half))


# ------------------------------------------------------------------------------------------------
# --model mode end to end: 2 seeds x 2 objectives, a few steps of a tiny pretrained encoder
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_encoder_without_head(tmp_path_factory, minilm_tokenizer_dir):
    """A 2-layer BERT saved as a plain encoder (BertModel: no MLM head) with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_encoder") / "model"
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.mark.full
def test_model_mode_two_seeds_two_objectives(tiny_encoder_without_head, tiny_dataset, tmp_path, capsys, monkeypatch):
    import numpy as np

    out = tmp_path / "runs"
    report_path = tmp_path / "report.json"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' threads: two one-thread runs at a time (--jobs 2)
    rc = ablation.main(["--model", str(tiny_encoder_without_head), "--objectives", "retromae", "mlm", "--jobs", "2",
                        "--seeds", "1", "2", "--steps", "2", "--eval-interval", "2", "--log-interval", "1",
                        "--micro-batch", "4", "--data", tiny_dataset, "--heldout-docs", "10", "--n-boot", "200",
                        "--out-dir", str(out), "--json", str(report_path), "--png", "none"])
    assert rc == 0
    report_json = json.loads(report_path.read_text())
    # step-0 evaluations agree across objectives for each seed; Lee also across seeds (one encoder;
    # the trainer's held-out spans are drawn from the run's seed, so those differ by seed)
    assert report_json["init_identical_across_objectives"] is True and report_json["init_mismatches"] == []
    per_seed = report_json["per_seed"]
    for seed in ("1", "2"):
        for metric in metric_keys.EVAL_METRICS:
            assert per_seed["retromae"][seed][f"init/{metric}"] == per_seed["mlm"][seed][f"init/{metric}"]
        assert per_seed["mlm"][seed]["init/lee/spearman_cls"] == per_seed["retromae"]["1"]["init/lee/spearman_cls"]
    # the missing MLM head: one digest per seed whatever the objective, different across seeds
    digests = report_json["mlm_head_digests"]
    assert report_json["mlm_head_identical_across_objectives"] is True
    assert digests["1"]["retromae"] == digests["1"]["mlm"] != digests["2"]["mlm"] == digests["2"]["retromae"]
    # ... and the trainer really built it that way: the pre-update step-1 encoder loss agrees per seed
    assert report_json["step1_encoder_loss_mismatches"] == []
    step1 = {(o, s): runs.read_records(out / f"{o}_seed{s}")[1] for o in ("retromae", "mlm") for s in (1, 2)}
    assert all(r["step"] == 1 and r["kind"] == "train" for r in step1.values())
    assert step1["retromae", 1]["encoder_loss"] == pytest.approx(step1["mlm", 1]["encoder_loss"], abs=1e-5)
    assert step1["retromae", 1]["encoder_loss"] != pytest.approx(step1["retromae", 2]["encoder_loss"], abs=1e-5)
    # the same held-out queries for every run, and intervals for every metric of every comparison
    n_queries = report_json["heldout"]["queries"]
    assert n_queries > 0
    for objective in ("retromae", "mlm"):
        for seed in (1, 2):
            with np.load(out / f"{objective}_seed{seed}" / "final_eval.npz") as z:
                assert len(z["ranks"]) == n_queries and z["lee_cls"].shape == (50, 50)
    assert set(report_json["intervals"]) == {"retromae − mlm", "retromae − init", "mlm − init"}
    for name, table in report_json["intervals"].items():
        expected = set(metric_keys.CI_METRICS) | ({"encoder_loss"} if "init" not in name else set())
        assert set(table) == expected, name
        for metric, ci in table.items():
            assert math.isfinite(ci["low"]) and math.isfinite(ci["high"]) and ci["low"] <= ci["high"], (name, metric)
            assert len(ci["per_seed"]) == 2
            assert ci["verdict"] in ("does not separate", f"separates ({name.split(' − ')[0]} > "
                                     f"{name.split(' − ')[1]})", f"separates ({name.split(' − ')[0]} < "
                                     f"{name.split(' − ')[1]})")
    assert "95% CI" in report_json["intervals_markdown"]
    printed = capsys.readouterr().out
    assert "MLM head identical across objectives (per seed): True" in printed


def test_moving_average_smooths_training_series_only_backwards():
    steps, values = plot_curves.moving_average(([1, 2, 3, 4, 5], [4.0, 2.0, 6.0, 0.0, 2.0]), 3)
    assert steps == [1, 2, 3, 4, 5] and values == pytest.approx([4.0, 3.0, 4.0, 8 / 3, 8 / 3])
    assert plot_curves.moving_average(([1, 2], [1.0, 5.0]), 1) == ([1, 2], [1.0, 5.0])


def test_gpu_preset_parses_and_later_flags_win():
    args = ablation.build_parser().parse_args(ablation.GPU_PRESET + ["--steps", "600"])
    assert (args.steps, args.seeds, args.objectives, args.micro_batch) == (600, [1, 2, 3], ["retromae", "mlm"], 32)
    assert args.heldout_docs == 125 and args.json.endswith("ablation_gpu.json")
