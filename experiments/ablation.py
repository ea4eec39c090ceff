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

For each (seed, objective) it runs `launch/pretrain.py`, one process per run, --jobs of them at once
(default 1: one after the other; results are taken in seed-major order whatever finishes first). Each run
evaluates every --eval-interval steps (Lee similarity + held-out retrieval, see retromae_ds/evaluate.py).
The seed fixes the encoder's initialisation (or, with --model, the initialisation of whatever the folder
lacks, e.g. the MLM head), the data order and the encoder masks, so for one seed the objectives differ
only in what they train; the step-0 evaluations must then agree across objectives, which this script
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

# Where the rest lives (one concept per file): runs.py (launching a run, --jobs, reuse, reading its
# metrics.jsonl), run_inputs.py (tokenizer, prepared data, random-init config), final_eval.py (the common
# query set, final_eval.npz), pairing_checks.py (one seed's runs start alike), paired_statistics.py
# (summaries, bootstrap and t-intervals), report.py (tables, JSON, markdown, curves); metric_keys.py names
# the metrics. This file holds the command line, the presets and the order of the work.

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from experiments import final_eval, paired_statistics, pairing_checks, report, run_inputs, runs
from experiments.runs import REPO

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
                  "--heldout-docs", "125",
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


def eval_length(args, model_cfg, tokenizer: str) -> int:
    """--eval-max-length, by default the data's block length. A random-init model has the positions its
    preset gave it for that length, so a longer evaluation is refused before training, not by a crash in
    the first evaluation."""
    from retromae_ds.data.indexed import IndexedDataset

    block = IndexedDataset(args.data).meta["max_seq_len"]
    length = args.eval_max_length or block
    if model_cfg is not None:
        positions = run_inputs.model_config_report(model_cfg, tokenizer, args).get("max_position_embeddings", 512)
        if length > positions:
            raise SystemExit(f"ablation: --eval-max-length {length} is longer than the random-init model's "
                             f"{positions} positions (sized for the data's {block}-token blocks): pass "
                             f"--eval-max-length {positions} or less, or leave it out (the block length)")
    return length


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
    ap.add_argument("--save-interval", type=int, default=0,
                    help="keep a checkpoint every N steps (all of them) for `retromae-ds probe` to score later; "
                         "default 0: the final one only")
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
    ap.add_argument("--eval-max-length", type=int, default=None,
                    help="token length of the evaluation's passages (default: the data's block length)")
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

    # What every run starts from: the encoder (--model, else a random init), the tokenizer, the data
    from retromae_ds.data.demo_corpus import minilm_path

    if first.preset == "gpu" and not args.model and not args.no_model:  # the expanded argv has no --preset
        args.model = minilm_path()
    if args.no_model:
        args.model = None
    if args.model:
        args.model = str(Path(args.model).resolve())
        tokenizer, model_cfg = args.model, None
    else:
        tokenizer = minilm_path()
    runs.model_defaults(args)
    check_scratch_args(ap, args, argv)
    if args.threads:  # the runs' OMP_NUM_THREADS (run_one, the report's command) and this process's evaluation
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    prep_steps = []
    if args.corpus or args.train_tokenizer:  # tokenizer + data prepared under OUT_DIR (cached with --reuse)
        prep_steps = run_inputs.scratch_plan(args, out_root)
        if run_inputs.run_prep(prep_steps, out_root, args) and args.reuse:
            print("  the data were prepared again, so no finished run is reused", file=sys.stderr, flush=True)
            args.reuse = False
        tokenizer = run_inputs.run_tokenizer(args)
        args.data = str(run_inputs.scratch_paths(out_root, args.max_seq_len)["data"])
    elif not Path(args.data + ".idx").exists():
        from retromae_ds.data.prepare import prepare_demo

        prepare_demo(args.data, max_seq_len=128)
    if not args.model:
        model_cfg = run_inputs.random_init_config(args, out_root, tokenizer)
    args.eval_max_length = eval_length(args, model_cfg, tokenizer)
    blocks = final_eval.heldout_for(args.data, args.heldout_docs)

    head_digests, head_mismatches = {}, []
    if args.model:  # the MLM head the folder lacks: built alike for every objective of a seed?
        head_digests = pairing_checks.mlm_head_digests(args.model, args.objectives, args.seeds)
        head_mismatches = pairing_checks.head_mismatches(head_digests)

    # The sweep: train every (seed, objective), then evaluate it on the common query set
    t0 = time.monotonic()
    results, run_dirs, walls, items, eval_seconds = {}, {}, {}, {}, []
    for seed, objective, (out, wall) in runs.run_all(args, model_cfg, tokenizer):
        results.setdefault(objective, []).append(runs.final_metrics(out))
        run_dirs.setdefault(objective, []).append(out)
        walls[f"{objective}_seed{seed}"] = None if wall is None else round(wall, 1)
        it = final_eval.final_items(out, blocks, args)
        items.setdefault(objective, []).append(it)
        eval_seconds.append(it["seconds"]["total"])
    wall_s = time.monotonic() - t0

    # Paired differences: each objective against the baseline, and with --model against the starting encoder
    pairs = [(o, args.baseline) for o in args.objectives if o != args.baseline and args.baseline in args.objectives]
    if args.model:
        items["init"] = [final_eval.init_items(args.model, blocks, args, out_root)] * len(args.seeds)
        pairs += [(o, "init") for o in args.objectives]
    ivals = paired_statistics.intervals(items, results, pairs, n_boot=args.n_boot)

    report.write_report(report.SweepOutcome(
        args=args, argv=argv, tokenizer=tokenizer,
        model_config=run_inputs.model_config_report(model_cfg, tokenizer, args) if model_cfg else args.model,
        prep_steps=prep_steps, blocks=blocks, results=results, run_dirs=run_dirs, walls=walls, items=items,
        eval_seconds=eval_seconds, wall_s=wall_s, summary=paired_statistics.summarise(results, args.baseline),
        intervals=ivals, init_mismatches=pairing_checks.init_mismatches(results),
        step1_mismatches=pairing_checks.first_step_loss_mismatches(run_dirs), head_digests=head_digests,
        head_mismatches=head_mismatches), json_path, md_path, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
