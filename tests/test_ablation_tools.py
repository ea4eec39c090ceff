"""The table and plot helpers of bench/ablation.py and bench/plot_curves.py, on fabricated
metrics.jsonl files and TensorBoard events (no training here: the ablation itself is a bench run)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _load("ablation")
plot_curves = _load("plot_curves")


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
        rows.append({"step": step, "kind": "eval", **{k: value for k in ablation.EVAL_METRICS}})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if half_written_tail:
        text += '{"step": 30, "kind": "ev'
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_final_metrics_reads_last_eval_init_and_last_train_window(tmp_path):
    run = fake_run(tmp_path / "retromae_seed1", init=0.1, final=0.4, enc_loss=5.0, half_written_tail=True)
    m = ablation.final_metrics(run)
    assert m["step"] == 20
    assert m["lee/spearman_cls"] == 0.4 and m["heldout/recall100"] == 0.4
    assert m["init/lee/spearman_cls"] == 0.1
    assert m["encoder_loss"] == 5.0  # the step-20 record, not an earlier one
    assert ablation.run_finished(run, 20) and not ablation.run_finished(run, 30)


def test_final_metrics_rejects_a_run_without_records(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 0, "kind": "eval"}) + "\n")
    with pytest.raises(ValueError, match="did the run finish"):
        ablation.final_metrics(tmp_path / "r")


def _results(tmp_path, finals: dict[str, list[float]], inits=(0.1, 0.2, 0.3)):
    results = {}
    for objective, values in finals.items():
        for seed, (value, init) in enumerate(zip(values, inits)):
            run = fake_run(tmp_path / f"{objective}_seed{seed}", init=init, final=value, enc_loss=3 + value)
            results.setdefault(objective, []).append(ablation.final_metrics(run))
    return results


def test_summarise_mean_std_and_paired_differences(tmp_path):
    finals = {"retromae": [0.30, 0.50, 0.40], "mlm": [0.20, 0.45, 0.20]}
    summary = ablation.summarise(_results(tmp_path, finals), baseline="mlm")
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
        ablation.summarise(results, baseline="mlm")


def test_init_mismatches_flags_only_differing_step0(tmp_path):
    same = _results(tmp_path / "a", {"retromae": [0.3, 0.5], "mlm": [0.2, 0.4]}, inits=(0.1, 0.2))
    assert ablation.init_mismatches(same) == []
    results = dict(same)
    results["dupmae"] = _results(tmp_path / "b", {"dupmae": [0.3, 0.5]}, inits=(0.1, 0.25))["dupmae"]
    problems = ablation.init_mismatches(results)
    assert len(problems) == len(ablation.EVAL_METRICS)
    assert all(p.startswith("seed #1") and "dupmae=0.250000" in p for p in problems)


def test_markdown_tables(tmp_path):
    summary = ablation.summarise(_results(tmp_path, {"retromae": [0.3, 0.5, 0.4], "mlm": [0.2, 0.45, 0.2]}),
                                 baseline="mlm")
    table = ablation.markdown_table(summary).splitlines()
    assert table[0] == "| metric | step 0 (init) | retromae | mlm |"
    assert len(table) == 2 + len(ablation.TABLE_METRICS)
    row = next(line for line in table if line.startswith("| heldout/mrr10 |"))
    assert row == f"| heldout/mrr10 | 0.200 | 0.400 ± 0.100 | 0.283 ± {statistics.stdev([0.2, 0.45, 0.2]):.3f} |"
    assert any(line.startswith("| encoder MLM loss") for line in table)
    paired = ablation.paired_table(summary, "mlm").splitlines()
    assert paired[0] == "| metric | retromae − mlm |"
    assert "| lee/spearman_cls | +0.117 ± 0.076 |" in paired


def test_write_model_config_is_a_loadable_bert_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = ablation.write_model_config(tmp_path / "cfg", hidden=64, layers=2, heads=4, intermediate=256)
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
    tags = plot_curves.plot_curves(plot_curves.find_runs(tmp_path), tmp_path / "b.png")
    assert tags == ["train/encoder_loss", "train/decoder_loss", "eval/lee/spearman_cls"]
    assert plot_curves.main([str(tmp_path / "out"), "--out", str(tmp_path / "c.png")]) == 2  # no runs there
