"""Loss and evaluation curves of an ablation, read from the runs' TensorBoard event files.

    python -m experiments.plot_curves runs/ablation --out experiments/results/curves.png

RUNS_DIR holds one output folder per run, named `<objective>_seed<seed>` (what experiments/ablation.py
writes). Each panel draws one line per objective: the mean over seeds, with the seeds' min-max range
shaded. We read TensorBoard rather than metrics.jsonl because the README promises curves "from the
TensorBoard logs": this shows the events a user opens in TensorBoard hold what the table says.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

RUN_NAME = re.compile(r"^(?P<objective>[A-Za-z0-9]+)_seed(?P<seed>-?\d+)$")

# (TensorBoard tag, panel title). A tag no run has is left out; a tag only some objectives have
# (the decoder loss: not for mlm) draws only those.
PANELS = [
    ("train/encoder_loss", "encoder MLM loss (train)"),
    ("train/decoder_loss", "decoder loss (train)"),
    ("eval/lee/spearman_cls", "Lee Spearman, [CLS] cosine"),
    ("eval/lee/pearson_cls", "Lee Pearson, [CLS] cosine"),
    ("eval/heldout/mrr10", "held-out retrieval MRR@10"),
    ("eval/heldout/recall10", "held-out retrieval recall@10"),
    ("eval/lee/spearman_mean", "Lee Spearman, mean-pooled cosine"),
    ("eval/heldout/mrr10_mean", "held-out MRR@10, mean pooling"),
    ("eval/cls_gain", "[CLS] gain (decoder, nats/token)"),  # not logged for mlm (no decoder)
]


LINESTYLES = ["-", "--", ":"]


def find_runs(runs_dir) -> dict[str, list[Path]]:
    """{objective: [run folder, ...]} (seeds in ascending order) for the `<objective>_seed<N>`
    folders of runs_dir that have TensorBoard events."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(Path(runs_dir).iterdir()):
        match = RUN_NAME.match(path.name)
        if match and path.is_dir() and any((path / "tensorboard").glob("events.out.tfevents.*")):
            groups.setdefault(match["objective"], []).append((int(match["seed"]), path))
    return {obj: [p for _, p in sorted(runs)] for obj, runs in groups.items()}


def load_scalars(run_dir) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} of every scalar in run_dir/tensorboard, all events kept. When a step
    was written twice (a resumed run), the last value wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {event.step: event.value for event in acc.Scalars(tag)}
        steps = sorted(by_step)
        scalars[tag] = (steps, [by_step[s] for s in steps])
    return scalars


def aggregate(series: list[tuple[list[int], list[float]]]):
    """Mean, min and max over runs at the steps every run logged (runs of different length are cut
    to the common steps rather than averaged over a shrinking set). Returns numpy arrays
    (steps, mean, low, high), or None when the runs share no step."""
    import numpy as np

    common = set(series[0][0])
    for steps, _ in series[1:]:
        common &= set(steps)
    if not common:
        return None
    steps = sorted(common)
    values = np.array([[dict(zip(s, v))[step] for step in steps] for s, v in series], dtype=float)
    return np.array(steps), values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def moving_average(series: tuple[list[int], list[float]], window: int) -> tuple[list[int], list[float]]:
    """Trailing mean over the last `window` points (fewer at the start): per-step training losses
    (--log-interval 1) are too noisy to compare objectives by eye."""
    steps, values = series
    if window <= 1:
        return series
    out = [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
    return steps, out


def plot_curves(groups: dict[str, list[Path]], png, panels=PANELS, title: str | None = None,
                smooth: int = 1, reference: dict[str, float] | None = None) -> list[str]:
    """Draw the panels (one line per objective) to `png`; returns the tags drawn. Training tags are
    smoothed by a trailing mean over `smooth` logged points (evaluations never). `reference`
    ({tag: value}) draws a dotted black line per panel, e.g. the starting encoder's evaluation when
    the runs did not evaluate at step 0. Writes to a temporary name and renames, so a failed plot
    leaves no half-written PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = {obj: [load_scalars(d) for d in dirs] for obj, dirs in groups.items()}
    drawn = [(tag, name) for tag, name in panels
             if any(tag in run for runs in scalars.values() for run in runs)]
    if not drawn:
        raise SystemExit(f"none of the tags {[t for t, _ in panels]} is in the TensorBoard events of {groups}")
    cols = min(3, len(drawn))
    rows = (len(drawn) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.5 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (tag, name) in zip(axes.flat, drawn):
        for i, (objective, runs) in enumerate(scalars.items()):
            series = [moving_average(run[tag], smooth if tag.startswith("train/") else 1)
                      for run in runs if tag in run]
            curve = aggregate(series) if series else None
            if curve is None or all(math.isnan(x) for x in curve[1]):
                continue  # e.g. the decoder loss of mlm runs: logged as NaN (no decoder)
            steps, mean, low, high = curve
            colour = colours[i % len(colours)]
            marker = "o" if tag.startswith("eval/") else None
            ax.plot(steps, mean, color=colour, marker=marker, markersize=3, linestyle=LINESTYLES[i % 3],
                    label=f"{objective} (n={len(series)})")  # line styles keep overlapping curves visible
            ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
        if reference and tag in reference:
            ax.axhline(reference[tag], color="black", linestyle=":", linewidth=1.2, label="start (step 0)")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.suptitle(title or "mean over seeds; shaded: min-max over seeds", fontsize=11)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return [tag for tag, _ in drawn]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs_dir", help="folder holding <objective>_seed<N> run folders")
    ap.add_argument("--out", default="curves.png", help="PNG to write (default: %(default)s)")
    ap.add_argument("--objectives", nargs="+", help="only these objectives, in this order")
    ap.add_argument("--title", help="figure title")
    ap.add_argument("--smooth", type=int, default=1, help="trailing mean over this many logged training points")
    args = ap.parse_args(argv)
    groups = find_runs(args.runs_dir)
    if args.objectives:
        groups = {obj: groups[obj] for obj in args.objectives if obj in groups}
    if not groups:
        print(f"no <objective>_seed<N> folders with TensorBoard events under {args.runs_dir}", file=sys.stderr)
        return 2
    tags = plot_curves(groups, args.out, title=args.title, smooth=args.smooth)
    print(f"wrote {args.out}: {', '.join(tags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
