"""Tokenize a corpus into packed, memory-mapped blocks: PREFIX.bin, PREFIX.idx and PREFIX.json.

  retromae-ds prepare --input corpus.jsonl more/ --tokenizer TOKENIZER_DIR --output data/wiki
  retromae-ds prepare --demo --output data/demo

Inputs: .jsonl/.json, .txt, .csv/.tsv and .parquet files, folders of them (searched recursively),
and folders written by `datasets.save_to_disk`; all are read with the `datasets` library. A .txt file
holds one document per line (see --txt-sample-by). Each document is tokenized once, cut into
sentences, and consecutive sentences are packed into blocks of at most max_seq_len - 2 tokens (the
trainer adds [CLS] and [SEP]); a sentence longer than that is split. Blocks never cross documents.
The file format is described in retromae_ds/data/indexed.py.

This module is the orchestration, top to bottom: the command line, the entry points, the output
check and the pipeline. The parts live next to it: reading inputs and explaining bad records
(readers.py), loading and checking the tokenizer (tokenizer.py), sentence ends and block packing
(packing.py), and the tokenizer worker processes (workers.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from retromae_ds.data.readers import DemoReader, FileReader, add_reading_arguments, discover_sources
from retromae_ds.data.tokenizer import check_max_seq_len, load_tokenizer
from retromae_ds.data.workers import default_num_proc, rebatch, tokenizer_pool
from retromae_ds.errors import UserError, make_folder

DEFAULT_MAX_SEQ_LEN = 512


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="files, folders of files, or datasets.save_to_disk folders")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="folder of a Hugging Face tokenizer (as written by save_pretrained)")
    parser.add_argument("--output", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help=f"model sequence length; blocks hold up to this minus 2 tokens "
                             f"(default {DEFAULT_MAX_SEQ_LEN}, or 128 with --demo)")
    parser.add_argument("--num-proc", type=int, default=None,
                        help="tokenizer processes (default: the CPUs available, at most 8)")
    add_reading_arguments(parser)
    parser.add_argument("--max-documents", type=int, default=None, metavar="N",
                        help="stop after N input records (for quick runs)")
    parser.add_argument("--demo", action="store_true",
                        help="build the demo corpus (gensim's Wikipedia sample + Lee news, MiniLM tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at PREFIX")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    if args.max_seq_len is not None and args.max_seq_len < 3:
        raise UserError(f"--max-seq-len {args.max_seq_len} leaves no room for tokens besides [CLS] and "
                        f"[SEP]; use at least 3 (typically 128-512).")
    if args.num_proc is not None and args.num_proc < 1:
        raise UserError(f"--num-proc {args.num_proc}: give 1 or more processes.")
    progress = not args.no_progress
    if args.demo:
        if args.input or args.tokenizer:
            raise UserError("--demo builds its own corpus with the MiniLM tokenizer; drop --input and "
                            "--tokenizer, or drop --demo to prepare your own files.")
        summary = build_demo(args.output, args.max_seq_len or 128, args.num_proc, overwrite=args.overwrite,
                             progress=progress, max_documents=args.max_documents)
    else:
        missing = [flag for flag, value in (("--input", args.input), ("--tokenizer", args.tokenizer)) if not value]
        if missing:
            raise UserError(f"prepare needs {' and '.join(missing)} (or --demo for the demo corpus), e.g. "
                            f"`retromae-ds prepare --input corpus.jsonl --tokenizer TOKENIZER_DIR "
                            f"--output data/corpus`.")
        summary = prepare_files(args.input, args.tokenizer, args.output, text_field=args.text_field,
                                max_seq_len=args.max_seq_len or DEFAULT_MAX_SEQ_LEN, num_proc=args.num_proc,
                                on_bad_record=args.on_bad_record, txt_sample_by=args.txt_sample_by,
                                max_documents=args.max_documents, overwrite=args.overwrite, progress=progress)
    print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    return (f"prepared {s['prefix']}.bin/.idx/.json: {s['num_documents']:,} documents -> "
            f"{s['num_blocks']:,} blocks, {s['num_tokens']:,} tokens ({s['dtype']})\n"
            f"  dropped empty documents: {s['dropped_empty_documents']:,}; "
            f"skipped bad records: {s['skipped_bad_records']:,}\n"
            f"  fill ratio {s['fill_ratio']:.3f}: tokens / (blocks x {s['block_capacity']}), how full the blocks "
            f"are. Training pads each micro-batch to its longest block (with --static-shapes: to the full length), "
            f"so the share of real tokens it computes differs: `retromae-ds info {s['prefix']}` shows it "
            f"(padding_efficiency)\n"
            f"  {s['seconds']:.1f} s, {s['tokens_per_second']:,.0f} tokens/s with {s['num_proc']} process(es)")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def prepare_files(inputs: list[str], tokenizer_path: str, output_prefix: str, *, text_field: str = "text",
                  max_seq_len: int = DEFAULT_MAX_SEQ_LEN, num_proc: int | None = None,
                  on_bad_record: str = "error", txt_sample_by: str = "line", max_documents: int | None = None,
                  overwrite: bool = False, progress: bool = True) -> dict:
    """Prepare the user's files; returns the summary (counts, fill ratio, speed)."""
    from retromae_ds.data.indexed import normalize_prefix

    prefix = normalize_prefix(output_prefix)
    check_output(prefix, overwrite)
    sources = discover_sources(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    check_max_seq_len(tokenizer, tokenizer_path, max_seq_len)
    reader = FileReader(sources, text_field, on_bad_record, txt_sample_by)
    extra = {"text_field": text_field, "txt_sample_by": txt_sample_by, "on_bad_record": on_bad_record}
    return prepare_corpus(reader, tokenizer, prefix, max_seq_len, num_proc, extra, progress, max_documents)


def prepare_demo(output_prefix: str, max_seq_len: int = 128, num_proc: int = 1, *,
                 overwrite: bool = False, progress: bool = True) -> str:
    """Make sure the demo corpus is prepared at ``output_prefix`` and return the prefix.

    For the trainer: an existing demo dataset with the same max_seq_len is reused; any other dataset
    at the prefix is an error unless ``overwrite``. Several ranks must not call this at once: let
    rank 0 call it, then barrier.
    """
    from retromae_ds.data.indexed import IndexedDataset, dataset_paths, normalize_prefix

    prefix = normalize_prefix(output_prefix)
    if os.path.exists(dataset_paths(prefix)["idx"]) and not overwrite:
        meta = IndexedDataset(prefix).meta
        if meta.get("demo") and meta.get("max_seq_len") == max_seq_len and meta.get("max_documents") is None:
            return prefix
        raise UserError(f"{prefix}.idx already exists and is not the full demo corpus with max_seq_len "
                        f"{max_seq_len} (it has demo={meta.get('demo', False)}, max_seq_len="
                        f"{meta.get('max_seq_len')}). Delete it, pass --overwrite, or choose another prefix.")
    build_demo(prefix, max_seq_len, num_proc, overwrite=overwrite, progress=progress)
    return prefix


def build_demo(output_prefix: str, max_seq_len: int = 128, num_proc: int | None = 1, *, overwrite: bool = False,
               progress: bool = True, max_documents: int | None = None) -> dict:
    """Prepare the demo corpus (gensim's Wikipedia sample + Lee news, MiniLM tokenizer); returns the summary."""
    from retromae_ds.data import demo_corpus
    from retromae_ds.data.indexed import normalize_prefix

    prefix = normalize_prefix(output_prefix)
    check_output(prefix, overwrite)
    tokenizer_path = demo_corpus.minilm_path()
    tokenizer = load_tokenizer(tokenizer_path)
    check_max_seq_len(tokenizer, tokenizer_path, max_seq_len)
    return prepare_corpus(DemoReader(), tokenizer, prefix, max_seq_len, num_proc,
                          {"demo": True, "max_documents": max_documents}, progress, max_documents)


# --------------------------------------------------------------------------------------------
# The output
# --------------------------------------------------------------------------------------------

def check_output(prefix: str, overwrite: bool) -> None:
    from retromae_ds.data.indexed import dataset_paths

    if prefix.endswith(os.sep) or os.path.isdir(prefix):
        raise UserError(f"--output {prefix} is a folder; give a file prefix inside it, e.g. "
                        f"{os.path.join(prefix, 'corpus')} (writes corpus.bin/.idx/.json).")
    existing = [p for p in dataset_paths(prefix).values() if os.path.exists(p)]
    if existing and not overwrite:
        raise UserError(f"{', '.join(existing)} already exist(s); prepare will not replace a dataset "
                        f"unless you pass --overwrite (or choose another --output).")
    make_folder(os.path.dirname(os.path.abspath(prefix)), f"--output {prefix}")


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def prepare_corpus(reader, tokenizer, prefix: str, max_seq_len: int, num_proc: int | None,
                   extra_meta: dict, progress: bool = True, max_documents: int | None = None) -> dict:
    """Read -> tokenize (num_proc processes) -> pack -> write atomically; returns the summary."""
    from tqdm import tqdm

    from retromae_ds import __version__
    from retromae_ds.data.indexed import IndexedDatasetWriter, choose_dtype, tokenizer_fingerprint

    num_proc = num_proc or default_num_proc()
    capacity = max_seq_len - 2
    fingerprint = tokenizer_fingerprint(tokenizer)
    dtype = choose_dtype(fingerprint["vocab_size"])
    started = time.perf_counter()
    empty = 0
    with IndexedDatasetWriter(prefix, dtype) as writer:
        with tokenizer_pool(tokenizer, capacity, num_proc) as tokenize, \
                tqdm(desc=f"prepare {os.path.basename(prefix)}", unit="tok", unit_scale=True, file=sys.stderr,
                     disable=not progress, mininterval=0.5) as bar:
            for ids, sizes, counts, n_empty in tokenize(rebatch(reader.batches(), max_documents)):
                if len(counts):
                    writer.add_documents(ids, sizes, counts)
                empty += n_empty
                bar.update(len(ids))
                bar.set_postfix_str(f"{writer.num_documents:,} docs", refresh=False)
        if writer.num_documents == 0:
            raise UserError(
                f"empty input: no document with text in {', '.join(s.describe() for s in reader.sources)} "
                f"({empty} empty documents, {reader.skipped_bad_records} bad records skipped). Check "
                f"--input and --text-field.")
        seconds = time.perf_counter() - started
        meta = {
            "max_seq_len": max_seq_len,
            "block_capacity": capacity,
            "dropped_empty_documents": empty,
            "skipped_bad_records": reader.skipped_bad_records,
            "sources": [s.as_meta() for s in reader.sources],
            "tokenizer": fingerprint,
            "sentence_splitter": "regex, see retromae_ds.data.packing.SENTENCE_END",
            "created_by": f"retromae-ds {__version__}",
            "demo": False,
            **extra_meta,
        }
        meta = writer.finalize(meta)
    return {**{k: meta[k] for k in ("num_documents", "num_blocks", "num_tokens", "dtype", "dropped_empty_documents",
                                    "skipped_bad_records", "block_capacity", "max_seq_len")},
            "prefix": prefix, "num_proc": num_proc, "seconds": seconds,
            "tokens_per_second": meta["num_tokens"] / max(seconds, 1e-9),
            "fill_ratio": meta["num_tokens"] / (meta["num_blocks"] * capacity)}
