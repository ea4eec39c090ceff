"""RetroMAE vs MLM (vs DupMAE): same encoder init, same data, same steps, several seeds.

    OMP_NUM_THREADS=2 python bench/ablation.py --objectives retromae mlm dupmae --seeds 1 2 3 \\
        --steps 150 --micro-batch 8 --hidden 128 --layers 2 --heads 4 --out-dir runs/ablation \\
        --json bench/results/ablation.json --png bench/results/curves.png

For each (objective, seed) it runs `launch/pretrain.py` (one process, one after the other) from a
random-init BERT of the given size on the demo corpus (prepared if missing), evaluating every
--eval-interval steps (Lee similarity + held-out retrieval, see retromae_ds/evaluate.py). The seed
fixes the encoder's initialisation, the data order and the encoder masks, so for one seed the
objectives differ only in what they train; the step-0 evaluations must then agree across objectives,
which this script checks. Each run goes to OUT_DIR/<objective>_seed<seed> (log in run.log), a
finished run there is reused with --reuse.

Prints a markdown table (per metric: mean ± sample std over seeds of the final evaluation, the
step-0 value, the final training encoder MLM loss) and the per-seed paired differences against
--baseline, writes the JSON report, and draws the curves with bench/plot_curves.py.
"""

from __future__ import annotations

import argparse
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
EVAL_METRICS = ["lee/pearson_cls", "lee/spearman_cls", "lee/pearson_mean", "lee/spearman_mean",
                "lee/ndcg10_cls", "heldout/mrr10", "heldout/recall1", "heldout/recall10", "heldout/recall100"]
TABLE_METRICS = EVAL_METRICS + ["encoder_loss"]


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
    result.update({k: last.get(k) for k in EVAL_METRICS})
    if first["step"] == 0:
        result.update({f"init/{k}": first.get(k) for k in EVAL_METRICS})
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
    for objective, runs in results.items():
        summary["per_objective"][objective] = {k: _stats([r[k] for r in runs]) for k in TABLE_METRICS}
    first = next(iter(results.values()))
    if all(f"init/{k}" in r for r in first for k in EVAL_METRICS):
        summary["init"] = {k: _stats([r[f"init/{k}"] for r in first]) for k in EVAL_METRICS}
    if baseline in results:
        base = results[baseline]
        for objective, runs in results.items():
            if objective == baseline:
                continue
            if len(runs) != len(base):
                raise ValueError(f"{objective} has {len(runs)} seeds, {baseline} {len(base)}: cannot pair them")
            summary["paired_vs_baseline"][objective] = {
                k: _stats([r[k] - b[k] for r, b in zip(runs, base)]) for k in TABLE_METRICS}
    return summary


def init_mismatches(results: dict[str, list[dict]], tol: float = 1e-6) -> list[str]:
    """Same seed => same encoder init => same step-0 evaluation for every objective. Returns a line
    per (seed index, metric) where they disagree by more than tol (empty = the inits matched)."""
    problems = []
    objectives = list(results)
    for i in range(min(len(runs) for runs in results.values())):
        for k in EVAL_METRICS:
            values = [results[o][i].get(f"init/{k}") for o in objectives]
            if None in values:
                continue
            if max(values) - min(values) > tol:
                problems.append(f"seed #{i}: {k} at step 0 differs across objectives: "
                                + ", ".join(f"{o}={v:.6f}" for o, v in zip(objectives, values)))
    return problems


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
            cells.append(f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}")
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
            s = paired[o][k]
            cells.append(f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

def write_model_config(folder: Path, hidden: int, layers: int, heads: int, intermediate: int) -> Path:
    """A small random-init BERT config (MiniLM's uncased vocabulary) for --model-config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "max_position_embeddings": 512, "type_vocab_size": 2,
        "pad_token_id": 0}, indent=1))
    return folder


def pretrain_command(args, objective: str, seed: int, model_cfg: Path, tokenizer: str, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "pretrain.py"),
            "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--data", args.data,
            "--model-config", str(model_cfg), "--tokenizer", tokenizer, "--objective", objective,
            "--seed", str(seed), "--max-steps", str(args.steps), "--micro-batch-size", str(args.micro_batch),
            "--lr", str(args.lr), "--warmup", "0.1", "--eval-interval", str(args.eval_interval),
            "--eval-heldout-docs", "50", "--eval-max-length", "128", "--log-interval", str(args.log_interval),
            "--save-interval", "0", "--resume", "none", "--no-export", "--output-dir", str(out)]


def run_one(args, objective: str, seed: int, model_cfg: Path, tokenizer: str) -> tuple[Path, float | None]:
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
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", nargs="+", default=["retromae", "mlm", "dupmae"],
                    choices=["retromae", "mlm", "dupmae"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--baseline", default="mlm", help="objective the paired differences are taken against")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-interval", type=int, default=50)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=0, help="FFN size (0 = 4 x hidden)")
    ap.add_argument("--data", default=str(REPO / "data" / "demo" / "minilm_128"),
                    help="prepared data PREFIX (the demo corpus is prepared there if missing)")
    ap.add_argument("--out-dir", default=str(REPO / "runs" / "ablation"), help="one folder per run goes here")
    ap.add_argument("--json", help="JSON report (default OUT_DIR/ablation.json)")
    ap.add_argument("--png", help="curves (default OUT_DIR/curves.png; 'none' = no plot)")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs found in OUT_DIR")
    ap.add_argument("--note", help="free text stored in the JSON report (e.g. how reused runs were timed)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_interval < 1:
        ap.error("--steps and --eval-interval must be >= 1")
    out_root = Path(args.out_dir)
    json_path = Path(args.json) if args.json else out_root / "ablation.json"
    png = None if args.png == "none" else Path(args.png) if args.png else out_root / "curves.png"

    sys.path.insert(0, str(REPO))
    from retromae_ds.engine.build import minilm_path

    tokenizer = minilm_path()
    if not Path(args.data + ".idx").exists():
        from retromae_ds.data.prepare import prepare_demo

        prepare_demo(args.data, max_seq_len=128)
    model_cfg = write_model_config(out_root / "model_config", args.hidden, args.layers, args.heads,
                                   args.intermediate or 4 * args.hidden)

    t0 = time.monotonic()
    results, run_dirs, walls = {}, {}, {}
    for objective in args.objectives:
        for seed in args.seeds:
            out, wall = run_one(args, objective, seed, model_cfg, tokenizer)
            results.setdefault(objective, []).append(final_metrics(out))
            run_dirs.setdefault(objective, []).append(out)
            walls[f"{objective}_seed{seed}"] = None if wall is None else round(wall, 1)
    total = time.monotonic() - t0

    summary = summarise(results, args.baseline)
    mismatches = init_mismatches(results)
    table = markdown_table(summary)
    paired = paired_table(summary, args.baseline)
    report = {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "2") + " python bench/ablation.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hardware(), "wall_s": round(total, 1), "run_wall_s": walls,
        "reused_runs": [name for name, wall in walls.items() if wall is None], "note": args.note,
        "args": vars(args), "model_config": json.loads((model_cfg / "config.json").read_text()),
        "init_identical_across_objectives": not mismatches, "init_mismatches": mismatches,
        "summary": summary, "per_seed": {o: dict(zip(map(str, args.seeds), r)) for o, r in results.items()},
        "table_markdown": table, "paired_markdown": paired,
    }
    write_json_atomic(json_path, report)
    if png is not None:
        sys.path.insert(0, str(REPO / "bench"))
        from plot_curves import plot_curves

        plot_curves(run_dirs, png, title=f"{args.hidden}-d, {args.layers}-layer BERT from scratch on the demo "
                                         f"corpus, {args.steps} steps x {args.micro_batch}; mean over seeds "
                                         f"{args.seeds}, shaded min-max")
    print(f"## Final evaluation at step {args.steps} (mean ± std over seeds {args.seeds})\n")
    print(table)
    if paired:
        print(f"\n## Paired per-seed differences vs {args.baseline}\n")
        print(paired)
    print(f"\nstep-0 evaluation identical across objectives: {not mismatches}")
    for line in mismatches:
        print("  " + line)
    print(f"wall time {total:.0f} s; report: {json_path}" + (f"; curves: {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
