"""Summaries over seeds and paired differences with 95% intervals (numpy only; scipy is not a dependency).

Runs of one seed are paired (same init, data, masks; final_eval.py: same evaluation items), so a difference
is taken per seed first. Its interval comes from a two-stage bootstrap: resample seeds, and independently the
evaluation items (held-out queries; Lee documents, whose pairs are rebuilt from the resampled documents), and
recompute the mean over resampled seeds of the per-seed difference on the resampled items. Resampling items
alone would call seed noise a difference; seeds alone would ignore how few queries there are. "separates"
means the interval excludes 0. The training encoder MLM loss has no item level: it gets a t-interval over seeds.
"""

from __future__ import annotations

import math

from experiments.metric_keys import (CI_METRICS, DECODER_METRICS, EVAL_METRICS, HELDOUT_MEAN_METRICS,
                                     LEE_CORR_METRICS, RETRIEVAL_METRICS, TABLE_METRICS)

# ------------------------------------------------------------------------------------------------
# Mean ± std over seeds, and of the per-seed differences
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# A metric on a resample of the evaluation items
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# Intervals
# ------------------------------------------------------------------------------------------------

# Two-sided 95% Student t quantiles by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The largest tabulated quantile at or below df (conservative between table rows); 1.96 above 30."""
    if df > 30:
        return 1.96
    return _T95[max(k for k in _T95 if k <= df)]


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
