"""`retromae-ds {tokenizer,prepare,train,export,eval,bench,info,init}`.

Each subcommand lives in its own module that exposes `add_arguments(parser)` and `main(args) -> int`.
Those modules keep heavy imports (torch, deepspeed, datasets) inside functions so that `--help`
answers instantly. What `--help` shows is user documentation: a module's docstring, or (where the
docstring is written for developers) the text in DESCRIPTIONS below.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from retromae_ds.argparsing import Parser
from retromae_ds.errors import UserError

COMMANDS = {
    "tokenizer": ("retromae_ds.data.train_tokenizer", "train a WordPiece/BPE/unigram tokenizer on a corpus"),
    "prepare": ("retromae_ds.data.prepare", "tokenize a corpus into packed memory-mapped blocks (.bin/.idx/.json)"),
    "train": ("retromae_ds.engine.trainer", "pre-train with DeepSpeed (same flags as launch/pretrain.py)"),
    "export": ("retromae_ds.engine.export", "turn a checkpoint into a Hugging Face encoder folder"),
    "eval": ("retromae_ds.evaluate", "zero-shot quality of the [CLS] embedding: Lee, held-out and your own retrieval set"),
    "probe": ("retromae_ds.retrieval.probe", "fine-tune probe: retrieval after a short contrastive fine-tune, "
                                             "per checkpoint of a run"),
    "bench": ("retromae_ds.bench", "run the benchmarks in bench/ and print JSON"),
    "info": ("retromae_ds.info", "describe a prepared dataset, a checkpoint (and verify it) or the environment"),
    "init": ("retromae_ds.scaffold", "write editable copies of the DeepSpeed configs and the SLURM script"),
}

# `--help` texts of the subcommands whose module docstring is written for developers.
DESCRIPTIONS = {
    "train": """\
Pre-train an encoder with RetroMAE (or DupMAE, or plain MLM) on data written by `retromae-ds prepare`.

  retromae-ds train --data data/wiki --model path/to/bert-base-uncased --output-dir runs/wiki --max-steps 100000
  deepspeed --num_gpus 8 launch/pretrain.py --deepspeed zero2 --data data/wiki --model ...   (several GPUs)
  retromae-ds train                       (no --data and --model: the offline demo)

Every flag can also be set in a YAML file (--config run.yaml, keys = flag names); the command line wins.
Relative paths in the YAML file resolve against the current folder, not the YAML file's folder.

Stop the run at any moment and start the same command again: it resumes from the newest complete
checkpoint in --output-dir. SIGTERM, SIGUSR1 and a first Ctrl-C finish the current step, save a
checkpoint and exit 0; a second Ctrl-C aborts at once without saving (exit 130). Exit codes: 0 finished
or stopped with a checkpoint, 2 a usage or data error, 3 too many NaN/inf steps in a row, 4 a checkpoint
could not be written. More: docs/training.md and docs/checkpoints.md.""",
    "prepare": """\
Tokenize a corpus into packed, memory-mapped blocks: PREFIX.bin, PREFIX.idx and PREFIX.json.

  retromae-ds prepare --input corpus.jsonl more/ --tokenizer TOKENIZER_DIR --output data/wiki
  retromae-ds prepare --demo --output data/demo

Inputs: .jsonl/.json, .txt, .csv/.tsv and .parquet files, folders of them (searched recursively), and
folders written by datasets' save_to_disk. A .txt file holds one document per line (see --txt-sample-by).
Each document is tokenized once, cut into sentences, and consecutive sentences are packed into blocks of
at most --max-seq-len minus 2 tokens (training adds [CLS] and [SEP]); a longer sentence is split. Blocks
never cross documents. Bad input stops with the file, the line and the fix (exit 2).
Next: `retromae-ds info PREFIX` (counts, and the padding to expect in training), then `retromae-ds train`.""",
    "eval": """\
Score an encoder's [CLS] embedding: Lee document similarity and, with --data, held-out retrieval.

  retromae-ds eval runs/wiki/export --data data/wiki

Lee similarity (needs gensim): 50 news documents whose 1,225 pairs were scored by humans; Pearson and
Spearman of the embeddings' cosine against the human scores, and nDCG@10, for [CLS] and for mean
pooling. For reference, all-MiniLM-L6-v2's [CLS] gives Pearson 0.609 / Spearman 0.474, a random model
0.124 / 0.091. The set is small: compare several seeds before claiming a gain.

Held-out retrieval: the last --heldout-docs documents of --data, which training held out. From each
block a span is cut out as the query, and the rest of the block is its target; every query ranks all
targets. Reported: MRR@10 and Recall@1/10/100, leaving out a Recall@k whose k is not below the number of
candidates (it would be 1 by construction); keys ending in _mean rank by mean-pooled embeddings.

With the defaults, `retromae-ds eval EXPORT --data PREFIX` repeats the final evaluation of the run that
wrote EXPORT: the settings that run evaluated with are recorded in the export and used unless a flag
says otherwise (other folders: the trainer's defaults).

Retrieval on your own data: --pairs FILE (one query and its passage per row; every passage is a
candidate) or --beir DIR (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv). nDCG@10, MRR@10, Recall@10/100
for [CLS], mean pooling and BM25, with 95% bootstrap intervals over queries (trec_eval's definitions):

  retromae-ds eval runs/wiki/export --pairs dev.jsonl --no-lee --json dev.json

More, and the fine-tune probe (`retromae-ds probe`): docs/metrics.md#retrieval-on-your-own-data.""",
    "probe": """\
How good a starting point for a retriever is this encoder, or each checkpoint of a run? A short
contrastive fine-tune on your pairs ([CLS] pooling, in-batch negatives, sentence-transformers), then
retrieval on your evaluation set before and after it (nDCG@10, MRR@10, Recall, with 95% intervals).

  retromae-ds probe runs/wiki/export --train-pairs train.jsonl --pairs dev.jsonl
  retromae-ds probe runs/wiki --train-pairs train.jsonl --beir data/scifact      (every kept checkpoint)

On a run folder each complete checkpoint is exported on the fly and probed, oldest first; the results go
to RUN/probe/probe-SETTING-HASH.json (after each checkpoint) with a curve of the after-fine-tune metric
against the pre-training step (PNG). Run it again later: checkpoints already probed are skipped. Settings:
retromae-paper (dot product, temperature 1, as RetroMAE's bi-encoder) or bge (cosine, temperature 0.02).
The same seed gives the same numbers. Keep the fine-tuning pairs apart from the evaluation set. Bad input
stops with exit 2 before anything trains.

A full fine-tune instead of the short probe: --val-pairs held_out.jsonl stops once nDCG@10 on those pairs
has not improved for --patience evaluations (every --eval-every steps) and keeps the best state.
More: docs/metrics.md#retrieval-on-your-own-data.""",
    "init": """\
Write editable copies of the bundled DeepSpeed configs and the Slurm script into DIR.

A pip-installed retromae-ds has no ds_configs/ or launch/ folder to edit; training finds the bundled
configs by name anyway (--deepspeed zero2). Use this command to change them, or to submit with Slurm:

  retromae-ds init my_run && cd my_run
  sbatch launch/slurm.sh --deepspeed ds_configs/zero2.json --data ... --model ...""",
}


def description(name: str, module) -> str:
    return DESCRIPTIONS.get(name) or (module.__doc__ or COMMANDS[name][1]).strip()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="retromae-ds",
        description="RetroMAE / DupMAE pre-training on DeepSpeed: prepare data, train, export, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=description(name, module),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except UserError as err:
        print(f"retromae-ds {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `retromae-ds info X | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"retromae-ds {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
