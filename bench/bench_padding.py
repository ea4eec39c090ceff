"""Ragged corpora: padding efficiency and real tokens/s of the trainer, per setting, interleaved runs.

Each run is the real trainer (`retromae-ds train`, one rank, a fresh process) on a prepared dataset; its
figures come from its own metrics.jsonl: the median `step_time_s` and `tokens_per_s` (real tokens,
[CLS]/[SEP] included) of the logged windows after the first, and the mean `padding_efficiency` (real
tokens / computed positions; older checkouts do not log it). Settings run one after another, and the
whole cycle repeats --repeats times, so a slow phase of the machine hits every setting alike.

    python -m bench.bench_padding --data PREFIX --model-config DIR --tokenizer DIR --seq-len 128 \
        --settings random,grouped,random-static --repeats 3
    python -m bench.bench_padding ... --settings random,baseline --baseline-checkout /tmp/wt99   # another commit

Settings (combine with '+' or '-', e.g. `random-static+pad8`, `grouped-static+pad8`):
  random        today's trainer, random batches
  grouped       --group-by-length
  random-static random batches with the accelerators' sync-free shapes on the CPU: the heads score a
                fixed capacity of rows (the encoder's mask budget, the decoder's rows 1..L-2) and the
                greedy mask rounds run without syncs (MaskGenerator.sync_free = True)
  pad8          sequences padded to a multiple of 8 (the accelerators' rounding) instead of 1
  noloader      blocks loaded on the training thread (no loader thread)
  pool0         --decoder-mask-pool 0: one whole-word draw per decoder row (before the pool of 128 draws)
  baseline      the trainer of --baseline-checkout (e.g. a `git worktree` at commit 99f1b89)
Ratios are against the first setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# what each modifier patches before the CLI runs (in the child process only)
PATCHES = {
    "static": "from retromae_ds.data.masking import MaskGenerator; MaskGenerator.sync_free = True\n",
    "pad8": ("import retromae_ds.data.loader as L\n_init = L.MicroBatchLoader.__init__\n"
             "def _init8(self, *a, **k):\n    k['pad_multiple'] = 8\n    _init(self, *a, **k)\n"
             "L.MicroBatchLoader.__init__ = _init8\n"),
    "noloader": ("import retromae_ds.data.loader as L\nfrom concurrent.futures import Future\n"
                 "def _submit(self, batch):\n    f = Future()\n    f.set_result(self.load(batch))\n    return f\n"
                 "L.MicroBatchLoader.submit = _submit\n"),
}


def run_once(setting: str, args, work: Path, repeat: int) -> dict:
    parts = set(setting.replace("+", "-").split("-"))  # e.g. "grouped-static+pad8" -> grouped, static, pad8
    out_dir = work / f"{setting}_{repeat}"
    flags = ["train", "--data", args.data, "--model-config", args.model_config, "--tokenizer", args.tokenizer,
             "--max-seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch),
             "--max-steps", str(args.steps), "--log-interval", str(args.log_interval), "--save-interval", "0",
             "--eval-interval", "0", "--eval-heldout-docs", "0", "--eval-max-length", "128", "--no-export", "--precision", args.precision,
             "--deepspeed", "ds_configs/zero2.json", "--output-dir", str(out_dir), "--seed", str(args.seed)]
    if "grouped" in parts:
        flags.append("--group-by-length")
    if "pool0" in parts:
        flags += ["--decoder-mask-pool", "0"]
    code = "".join(PATCHES[p] for p in sorted(parts) if p in PATCHES)
    code += f"import sys\nfrom retromae_ds.cli import main\nsys.exit(main({flags!r}))\n"
    checkout = Path(args.baseline_checkout if "baseline" in parts else Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{setting} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind", "train") == "train"][1:]  # the first window holds warm-up
    effs = [r["padding_efficiency"] for r in train if r.get("padding_efficiency") is not None]
    return {"step_ms": statistics.median(r["step_time_s"] for r in train) * 1e3,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "padding_efficiency": statistics.fmean(effs) if effs else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--precision", default="fp32", help="fp32 on the CPU; bf16 on a GPU")
    ap.add_argument("--settings", default="random,grouped")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--baseline-checkout", default="", help="a checkout of another commit, for `baseline`")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if any("baseline" in s for s in settings) and not args.baseline_checkout:
        ap.error("the `baseline` setting needs --baseline-checkout")

    work = Path(tempfile.mkdtemp(prefix="bench_padding_"))
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for repeat in range(args.repeats):
        for setting in settings:
            runs[setting].append(run_once(setting, args, work, repeat))
            print(f"[bench_padding] repeat {repeat + 1}/{args.repeats} {setting}: {runs[setting][-1]}",
                  file=sys.stderr, flush=True)
    base = statistics.median(r["step_ms"] for r in runs[settings[0]])
    base_tps = statistics.median(r["tokens_per_s"] for r in runs[settings[0]])
    result = {"data": args.data, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": args.steps,
              "threads": args.threads, "repeats": args.repeats, "settings": {}}
    for setting, rs in runs.items():
        step = statistics.median(r["step_ms"] for r in rs)
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        eff = rs[0]["padding_efficiency"]
        result["settings"][setting] = {
            "step_ms_median": round(step, 1), "step_ms_runs": [round(r["step_ms"], 1) for r in rs],
            "real_tokens_per_s_median": round(tps), "padding_efficiency": round(eff, 4) if eff is not None else None,
            "step_time_vs_first": round(step / base, 3), "real_tokens_per_s_vs_first": round(tps / base_tps, 3)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
