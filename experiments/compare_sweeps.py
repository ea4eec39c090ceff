"""Paired 95% intervals between two sweeps of experiments/ablation.py that differ in one setting, e.g. with and
without --new-parts-warmup-steps:

    M=$(python -c "from retromae_ds.data.demo_corpus import minilm_path; print(minilm_path())")
    python -m experiments.ablation --model $M --objectives retromae --seeds 1 2 3 --steps 100 --out-dir runs/warm
    python -m experiments.ablation --model $M --objectives retromae --seeds 1 2 3 --steps 100 --out-dir runs/nowarm \\
        --new-parts-warmup-steps 0
    python -m experiments.compare_sweeps runs/warm runs/nowarm --objectives retromae --seeds 1 2 3

Run s of one sweep and run s of the other share the seed (the new parts' initialisation, data order, masks)
and the final evaluation's items (the same held-out queries and Lee documents: both sweeps must use the same
--eval-seed, --heldout-docs and --eval-max-length, checked from the stamps in their final_eval.npz). So each
difference gets the ablation's two-stage bootstrap (seeds x items) interval, and the encoder MLM loss a
t-interval over seeds. Writes a JSON report (--json) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.final_eval import load_items
from experiments.paired_statistics import intervals
from experiments.report import intervals_table, write_json_atomic
from experiments.runs import final_metrics


def sweep_items(out_dir: Path, objective: str, seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """(final_eval.npz items, final_metrics) of OUT_DIR/<objective>_seed<s> for each seed."""
    items, results = [], []
    for seed in seeds:
        run = Path(out_dir) / f"{objective}_seed{seed}"
        path = run / "final_eval.npz"
        if not path.exists():
            raise SystemExit(f"{path}: missing; run experiments/ablation.py with --out-dir {out_dir} and seed {seed} "
                             f"first (it writes final_eval.npz for every finished run)")
        items.append(load_items(path))
        results.append(final_metrics(run))
    return items, results


def compare(a_dir: Path, b_dir: Path, objectives: list[str], seeds: list[int], n_boot: int = 2000) -> dict:
    """{"A − B": {metric: interval}} per objective, labels "<objective> (<folder name>)"."""
    items, results, pairs, stamps = {}, {}, [], set()
    for objective in objectives:
        labels = []
        for folder in (a_dir, b_dir):
            label = f"{objective} ({Path(folder).name})"
            items[label], results[label] = sweep_items(folder, objective, seeds)
            stamps |= {json.dumps(it.get("metrics", {}).get("stamp"), sort_keys=True) for it in items[label]}
            labels.append(label)
        pairs.append(tuple(labels))
    if len(stamps) > 1:
        raise SystemExit(f"the runs were evaluated on different items (stamps {sorted(stamps)}): use the same "
                         f"--eval-seed, --heldout-docs and --eval-max-length in both sweeps")
    return intervals(items, results, pairs, n_boot=n_boot)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="--out-dir of the first sweep (differences are A − B)")
    ap.add_argument("b", help="--out-dir of the second sweep")
    ap.add_argument("--objectives", nargs="+", default=["retromae"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--json", help="JSON report (default: A/compare_<B name>.json)")
    args = ap.parse_args(argv)
    ivals = compare(Path(args.a), Path(args.b), args.objectives, args.seeds, args.n_boot)
    table = intervals_table(ivals)
    path = Path(args.json) if args.json else Path(args.a) / f"compare_{Path(args.b).name}.json"
    write_json_atomic(path, {"command": "python -m experiments.compare_sweeps " + " ".join(
        sys.argv[1:] if argv is None else argv), "a": str(args.a), "b": str(args.b), "seeds": args.seeds,
        "intervals": ivals, "intervals_markdown": table})
    print(table)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
