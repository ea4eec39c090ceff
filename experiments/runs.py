"""One training run of the sweep, and the sweep's runs side by side: the command, the launch, reuse, fail-fast.

Each (objective, seed) is one `launch/pretrain.py` process writing OUT_DIR/<objective>_seed<seed> (log in
run.log). What a run leaves in its metrics.jsonl is read here too, so that "finished" (reuse) and "its
results" mean the same records. The readers need no torch: tests use them on fabricated metrics.jsonl files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.metric_keys import DECODER_METRICS, EVAL_METRICS

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------
# What a run leaves behind
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


# ------------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------------

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


def keep_checkpoints(args) -> list[str]:
    """The trainer's checkpoint flags: the final checkpoint only, or (--save-interval N) every N steps, all kept."""
    every = getattr(args, "save_interval", 0)
    return ["--save-interval", str(every), "--keep-last", str(max(2, -(-args.steps // every) if every else 2))]


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
            *keep_checkpoints(args),
            "--resume", "none", "--no-export", "--output-dir", str(out)]


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
