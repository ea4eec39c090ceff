"""Tokenize a corpus into packed, memory-mapped blocks: PREFIX.bin, PREFIX.idx and PREFIX.json.

  retromae-ds prepare --input corpus.jsonl more/ --tokenizer TOKENIZER_DIR --output data/wiki
  retromae-ds prepare --demo --output data/demo

Inputs: .jsonl/.json, .txt, .csv/.tsv and .parquet files, folders of them (searched recursively),
and folders written by `datasets.save_to_disk`; all are read with the `datasets` library. A .txt file
holds one document per line (see --txt-sample-by). Each document is tokenized once, cut into
sentences, and consecutive sentences are packed into blocks of at most max_seq_len - 2 tokens (the
trainer adds [CLS] and [SEP]); a sentence longer than that is split. Blocks never cross documents.
The file format is described in retromae_ds/data/indexed.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from retromae_ds.errors import UserError

DEFAULT_MAX_SEQ_LEN = 512
READ_BATCH_ROWS = 1000
TOKENIZE_BATCH_DOCS = 512
TOKENIZE_BATCH_CHARS = 256 * 1024
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".txt": "txt", ".text": "txt", ".csv": "csv",
              ".tsv": "tsv", ".parquet": "parquet"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "special_tokens_map.json"}
REQUIRED_SPECIAL_TOKENS = ("cls_token", "sep_token", "pad_token", "mask_token")
SKIP_HINT = "or pass --on-bad-record skip to skip such records and count them"

# Sentence ends, found without nltk: (1) the last visible character before a line break;
# (2) runs of . ! ? (plus closing quotes/brackets) followed by whitespace and a character that is not
# an ASCII lower-case letter, so "e.g. the" is not cut; (3) CJK full stops. Abbreviations followed by
# a capital ("Dr. Who") are cut too: sentences only decide where a block may end, never which ids
# are stored, so an occasional wrong cut costs a little packing quality and nothing else.
SENTENCE_END = re.compile(r"\S(?=[^\S\n]*\n)|[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[^\sa-z])|[\u3002\uff01\uff1f]+")


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
    parser.add_argument("--text-field", default="text",
                        help="field/column holding the document text (default: text; ignored for .txt)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help=f"model sequence length; blocks hold up to this minus 2 tokens "
                             f"(default {DEFAULT_MAX_SEQ_LEN}, or 128 with --demo)")
    parser.add_argument("--num-proc", type=int, default=None,
                        help="tokenizer processes (default: the CPUs available, at most 8)")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                        help="stop at the first bad record (default), or skip and count bad records")
    parser.add_argument("--txt-sample-by", choices=("line", "paragraph", "document"), default="line",
                        help="what one document is in a .txt file (default: line)")
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
            f"  fill ratio {s['fill_ratio']:.3f} (tokens / (blocks x {s['block_capacity']}), i.e. the share "
            f"of a padded batch that is real text)\n"
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
    tokenizer_path = demo_corpus.demo_tokenizer_path()
    tokenizer = load_tokenizer(tokenizer_path)
    check_max_seq_len(tokenizer, tokenizer_path, max_seq_len)
    return prepare_corpus(DemoReader(), tokenizer, prefix, max_seq_len, num_proc,
                          {"demo": True, "max_documents": max_documents}, progress, max_documents)


# --------------------------------------------------------------------------------------------
# Checks on the output, the tokenizer and max_seq_len
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
    parent = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {parent} for --output {prefix}: {err.strerror}. "
                        f"Choose a writable location.") from None


def load_tokenizer(path: str):
    """Load a fast Hugging Face tokenizer from a local folder, with errors a user can act on."""
    fix = ("Pass the folder that `tokenizer.save_pretrained(...)` wrote (a model folder usually holds "
           "tokenizer.json / tokenizer_config.json / vocab.txt)")
    if os.path.isfile(path):
        raise UserError(f"--tokenizer {path} is a file, not a tokenizer folder. {fix}; for a single "
                        f"vocabulary or SentencePiece file, load it with its tokenizer class in Python and "
                        f"save_pretrained() it to a folder.")
    if os.path.isdir(path):
        present = set(os.listdir(path))
        if not present & TOKENIZER_FILES:
            raise UserError(f"--tokenizer {path} is not a tokenizer folder: it has none of "
                            f"{', '.join(sorted(TOKENIZER_FILES))}. {fix}.")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... here
        where = "folder" if os.path.isdir(path) else "path (not a folder, nor a model in the local Hugging Face cache)"
        first_line = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"--tokenizer {path}: this {where} did not load as a tokenizer ({first_line}). {fix}; "
                        f"if it only holds a SentencePiece model, load it with its class (e.g. "
                        f"XLMRobertaTokenizer.from_pretrained) and save_pretrained() it.") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"--tokenizer {path} loaded as {type(tokenizer).__name__}, a slow (pure Python) "
                        f"tokenizer; prepare needs a fast one (tokenizer.json). Convert it with "
                        f"`AutoTokenizer.from_pretrained(path, use_fast=True).save_pretrained(path)`.")
    if len(tokenizer) < 32:
        raise UserError(f"--tokenizer {path} loaded with a vocabulary of only {len(tokenizer)} tokens, so the "
                        f"vocabulary files are missing or unreadable. {fix}.")
    missing = [name for name in REQUIRED_SPECIAL_TOKENS if getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise UserError(f"--tokenizer {path} ({type(tokenizer).__name__}) has no {', '.join(missing)}; "
                        f"RetroMAE needs [CLS], [SEP], [PAD] and [MASK]-style tokens. Add them with "
                        f"`tokenizer.add_special_tokens({{...}})` and save_pretrained() the tokenizer "
                        f"(and resize the model's embeddings).")
    return tokenizer


def position_limit(tokenizer, path: str) -> tuple[int, str] | None:
    """The longest sequence the model next to the tokenizer takes, and where that number comes from."""
    limits = []
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 1_000_000:
        limits.append((model_max, "model_max_length in its tokenizer_config.json"))
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = {}
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int):
            # RoBERTa-style models number positions from pad_token_id + 1.
            offset = config.get("pad_token_id", 1) + 1 if "roberta" in str(config.get("model_type", "")) else 0
            limits.append((positions - offset, "max_position_embeddings in its config.json"))
    return min(limits) if limits else None


def check_max_seq_len(tokenizer, path: str, max_seq_len: int) -> None:
    if max_seq_len < 3:
        raise UserError(f"--max-seq-len {max_seq_len} leaves no room for tokens besides [CLS] and [SEP]; "
                        f"use at least 3 (typically 128-512).")
    limit = position_limit(tokenizer, path)
    if limit and max_seq_len > limit[0]:
        raise UserError(f"--max-seq-len {max_seq_len} is longer than the {limit[0]} positions of the model "
                        f"at {path} ({limit[1]}); the model could not embed such blocks. Use "
                        f"--max-seq-len {limit[0]} or less.")


# --------------------------------------------------------------------------------------------
# Finding and reading inputs
# --------------------------------------------------------------------------------------------

@dataclass
class Source:
    """One input: a file of a known kind, or one split of a save_to_disk folder."""

    path: str
    kind: str  # jsonl, json, txt, csv, tsv, parquet or saved
    split: str | None = None
    records: int = 0

    def describe(self) -> str:
        return f"{self.path} (split {self.split})" if self.split else self.path

    def as_meta(self) -> dict:
        entry = {"path": os.path.abspath(self.path), "format": self.kind, "records": self.records}
        if self.split:
            entry["split"] = self.split
        return entry


def _saved_dataset_splits(folder: str) -> list[str | None] | None:
    """Splits of a datasets.save_to_disk folder ([None] for a single Dataset), or None if it is not one."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as f:
            return list(json.load(f).get("splits", []))
    if os.path.isfile(os.path.join(folder, "state.json")) and os.path.isfile(os.path.join(folder, "dataset_info.json")):
        return [None]
    return None


def discover_sources(inputs: Iterable[str]) -> list[Source]:
    """Expand folders (recursively, sorted) into supported files; save_to_disk folders stay whole."""
    sources: list[Source] = []
    supported = ", ".join(sorted(FILE_KINDS))
    for path in inputs:
        if not os.path.exists(path):
            raise UserError(f"--input {path} does not exist. Check the path (relative paths start from "
                            f"{os.getcwd()}).")
        if os.path.isfile(path):
            kind = FILE_KINDS.get(os.path.splitext(path)[1].lower())
            if kind is None:
                raise UserError(f"--input {path}: unsupported file type; prepare reads {supported} files, "
                                f"folders of them and datasets.save_to_disk folders. Rename or convert it.")
            sources.append(Source(path, kind))
            continue
        found = _sources_in_folder(path)
        if not found:
            raise UserError(f"--input {path} is a folder with no {supported} files and is not a "
                            f"datasets.save_to_disk folder: the input is empty. Point --input at your data.")
        sources.extend(found)
    return sources


def _sources_in_folder(folder: str) -> list[Source]:
    """Supported files under ``folder`` in name order; a save_to_disk folder counts as one input."""
    splits = _saved_dataset_splits(folder)
    if splits is not None:
        return [Source(folder, "saved", split) for split in splits]
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.extend(_sources_in_folder(entry.path))
        elif FILE_KINDS.get(os.path.splitext(entry.name)[1].lower()):
            found.append(Source(entry.path, FILE_KINDS[os.path.splitext(entry.name)[1].lower()]))
    return found


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs loader failures at ERROR level before raising; we explain them ourselves."""
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False  # local files: no telemetry request per file
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)


class FileReader:
    """Yields batches of document texts from the sources, handling bad records as asked.

    The datasets library reads every format. With ``--on-bad-record skip``, line-based files (.jsonl,
    .txt read by line) are read line by line instead, so that one broken line costs one record and
    not the file. ``sources`` and ``skipped_bad_records`` are filled in while reading.
    """

    def __init__(self, sources: list[Source], text_field: str, on_bad_record: str, txt_sample_by: str) -> None:
        self.sources = sources
        self.text_field = text_field
        self.skip_bad = on_bad_record == "skip"
        self.txt_sample_by = txt_sample_by
        self.skipped_bad_records = 0

    def batches(self) -> Iterator[list[str]]:
        for source in self.sources:
            if source.kind != "saved" and os.path.getsize(source.path) == 0:
                continue  # an empty file holds no documents (the run fails if all are empty)
            if self.skip_bad and self._one_record_per_line(source):
                yield from self._line_batches(source)
            else:
                yield from self._datasets_batches(source)

    def _one_record_per_line(self, source: Source) -> bool:
        if source.kind == "txt":
            return self.txt_sample_by == "line"
        return source.kind == "jsonl" or (source.kind == "json" and not _starts_with(source.path, b"["))

    def _field_for(self, source: Source) -> str:
        return "text" if source.kind == "txt" else self.text_field

    # -- the datasets path ------------------------------------------------------------------
    def _datasets_batches(self, source: Source) -> Iterator[list[str]]:
        field = self._field_for(source)
        with _quiet_datasets() as datasets:
            try:
                stream = self._open_with_datasets(datasets, source)
                for batch in stream:
                    if field not in batch:
                        raise UserError(
                            f"{source.describe()}: no field '{field}' in its records (fields: "
                            f"{', '.join(batch) or 'none'}). Pass --text-field with the field that holds "
                            f"the document text.")
                    values = batch[field]
                    yield self._keep_good(source, values)
                    source.records += len(values)
            except UserError:
                raise
            except Exception as err:  # pyarrow / datasets raise many types; explain the first bad line
                raise diagnose_unreadable(source, field, err) from None

    def _open_with_datasets(self, datasets, source: Source) -> Iterator[dict]:
        if source.kind == "saved":
            data = datasets.load_from_disk(source.path)
            if source.split is not None:
                data = data[source.split]
            if self._field_for(source) in data.column_names:  # don't decode the other columns
                data = data.select_columns([self._field_for(source)])
            return data.iter(batch_size=READ_BATCH_ROWS)
        builder = {"jsonl": "json", "tsv": "csv"}.get(source.kind, source.kind)
        builder = "text" if builder == "txt" else builder
        options = {"sample_by": self.txt_sample_by} if source.kind == "txt" else {}
        if source.kind == "tsv":
            options = {"sep": "\t"}
        data = datasets.load_dataset(builder, data_files=[source.path], split="train", streaming=True, **options)
        return data.iter(batch_size=READ_BATCH_ROWS)

    def _keep_good(self, source: Source, values: list) -> list[str]:
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if not bad:
            return values
        if not self.skip_bad:
            row = source.records + bad[0]
            value = values[bad[0]]
            what = "missing or null" if value is None else f"of type {type(value).__name__} ({str(value)[:40]!r})"
            raise UserError(f"{locate_record(source, row)}: field '{self._field_for(source)}' is {what}, not "
                            f"text. Fix the record, choose the text field with --text-field, {SKIP_HINT}.")
        self.skipped_bad_records += len(bad)
        return [v for v in values if isinstance(v, str)]

    # -- the line-by-line path (--on-bad-record skip) -------------------------------------------
    def _line_batches(self, source: Source) -> Iterator[list[str]]:
        batch: list[str] = []
        with open(source.path, "rb") as f:
            for line in f:
                text, problem = parse_line("txt" if source.kind == "txt" else "jsonl", line, self.text_field)
                if text is None and problem is None:  # a blank line in a .jsonl file is no record
                    continue
                source.records += 1
                if problem:
                    self.skipped_bad_records += 1
                    continue
                batch.append(text)
                if len(batch) == READ_BATCH_ROWS:
                    yield batch
                    batch = []
        if batch:
            yield batch


def parse_line(kind: str, raw: bytes, text_field: str) -> tuple[str | None, str | None]:
    """(text, problem) for one line of a .jsonl or .txt file; problem says what is wrong with it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"bytes that are not UTF-8 ({raw[err.start:err.start + 4]!r} at column {err.start + 1})"
    line = line.rstrip("\r\n")
    if kind == "txt":
        return line, None
    if not line.strip():
        return None, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"malformed JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object with a '{text_field}' field"
    value = record.get(text_field)
    if not isinstance(value, str):
        what = "missing or null" if value is None else f"of type {type(value).__name__}"
        return None, f"field '{text_field}' is {what}, not text (fields: {', '.join(record) or 'none'})"
    return value, None


def _first_non_utf8(path: str) -> tuple[int, int, bytes] | None:
    """(line number, byte offset, bad bytes) of the first invalid UTF-8 in a file, or None."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return lineno, offset + err.start, raw[err.start:err.start + 4]
            offset += len(raw)
    return None


def diagnose_unreadable(source: Source, field: str, err: Exception) -> UserError:
    """Turn a loader failure into a message naming the file, the line and the fix."""
    line_based = source.kind in ("jsonl", "txt") or (source.kind == "json" and not _starts_with(source.path, b"["))
    if source.kind in ("jsonl", "json", "txt", "csv", "tsv"):
        bad = _first_non_utf8(source.path)
        if bad:
            lineno, offset, raw = bad
            skip = f", {SKIP_HINT}" if line_based else ""
            return UserError(f"{source.path} line {lineno} (byte offset {offset}): bytes that are not UTF-8 "
                             f"({raw!r}). Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
                             f"{source.path} > fixed{os.path.splitext(source.path)[1]}`{skip}.")
    if source.kind == "json" and _starts_with(source.path, b"["):
        try:
            with open(source.path, encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError as bad_json:
            return UserError(f"{source.path} line {bad_json.lineno} column {bad_json.colno}: malformed JSON "
                             f"({bad_json.msg}). Fix the file, or write one JSON object per line (.jsonl) so "
                             f"that bad lines can be skipped with --on-bad-record skip.")
    elif source.kind in ("jsonl", "json"):
        with open(source.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                _text, problem = parse_line("jsonl", raw, field)
                if problem:
                    return UserError(f"{source.path} line {lineno}: {problem}. Fix or delete the line, "
                                     f"choose the text field with --text-field, {SKIP_HINT}.")
    return UserError(f"{source.describe()}: the datasets '{source.kind}' reader failed ({type(err).__name__}: "
                     f"{str(err).strip()[:300]}). Check that the file is valid {source.kind}.")


def _starts_with(path: str, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


def locate_record(source: Source, row: int) -> str:
    """Where record ``row`` (0-based) of a source is, in the words its format uses."""
    if source.kind in ("jsonl", "json") and not _starts_with(source.path, b"["):
        seen = -1
        with open(source.path, "rb") as f:  # JSON lines: blank lines are no records
            for lineno, raw in enumerate(f, 1):
                seen += bool(raw.strip())
                if seen == row:
                    return f"{source.path} line {lineno}"
    if source.kind in ("csv", "tsv"):
        return f"{source.path} data row {row + 1} (after the header line)"
    if source.kind == "json":
        return f"{source.path} record {row + 1} of the top-level list"
    return f"{source.describe()} row {row} (0-based)"


class DemoReader:
    """The demo corpus as batches of documents (see retromae_ds.data.demo_corpus)."""

    def __init__(self) -> None:
        from retromae_ds.data import demo_corpus

        self.sources = [Source(path, "demo") for path in demo_corpus.demo_sources()]
        self.skipped_bad_records = 0

    def batches(self) -> Iterator[list[str]]:
        from retromae_ds.data import demo_corpus

        wiki, lee = self.sources
        for source, documents in ((wiki, demo_corpus.iter_wikipedia_articles()),
                                  (lee, demo_corpus.iter_lee_articles())):
            batch = []
            for text in documents:
                batch.append(text)
                source.records += 1
                if len(batch) == 64:
                    yield batch
                    batch = []
            if batch:
                yield batch


# --------------------------------------------------------------------------------------------
# Sentences and packing
# --------------------------------------------------------------------------------------------

def sentence_end_chars(text: str) -> list[int]:
    """Character offsets just past each sentence end (see SENTENCE_END)."""
    return [m.end() for m in SENTENCE_END.finditer(text)]


def sentence_starts(token_starts, ends: list[int], num_tokens: int):
    """Token indices where a new sentence begins: the first token starting at or after each end.

    Working on the offsets of ONE tokenization of the whole document means the stored ids are exactly
    the tokenizer's ids for the document, for WordPiece, SentencePiece and byte-level BPE alike.
    """
    import numpy as np

    cuts = np.searchsorted(np.maximum.accumulate(token_starts), ends, side="left")
    return np.unique(cuts[(cuts > 0) & (cuts < num_tokens)])


def pack_blocks(num_tokens: int, starts: Iterable[int], capacity: int) -> list[int]:
    """Block sizes for one document: greedy packing of whole sentences into blocks of <= capacity.

    A block ends at a sentence start when the next sentence would not fit. A sentence longer than
    ``capacity`` is cut into full blocks; its tail opens the next block, which later sentences fill.
    """
    sizes = []
    block_start = sentence_start = 0
    for sentence_end in list(starts) + [num_tokens]:
        if sentence_end - block_start > capacity:
            if sentence_start > block_start:
                sizes.append(sentence_start - block_start)
                block_start = sentence_start
            while sentence_end - block_start > capacity:
                sizes.append(capacity)
                block_start += capacity
        sentence_start = sentence_end
    if num_tokens > block_start:
        sizes.append(num_tokens - block_start)
    return sizes


_WORKER: dict = {}


def init_worker(tokenizer, capacity: int, in_pool: bool = False) -> None:
    """Per-process state of a tokenizer worker (also used in-process when num_proc == 1)."""
    if in_pool:  # Ctrl-C is handled once, by the parent, which then stops the pool
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from num_proc
    _WORKER.update(tokenizer=tokenizer, capacity=capacity)


def tokenize_batch(texts: list[str]):
    """Tokenize and pack documents: (all ids, block sizes, blocks per kept document, empty count)."""
    import numpy as np

    capacity = _WORKER["capacity"]
    ids_parts, sizes, counts, empty = [], [], [], 0
    # The wrapper (not tokenizer.backend_tokenizer) ignores the padding/truncation that a
    # tokenizer.json may carry (MiniLM's pads and truncates to 128); it measured as fast.
    encoded = _WORKER["tokenizer"](texts, add_special_tokens=False, return_offsets_mapping=True,
                                   return_attention_mask=False, return_token_type_ids=False,
                                   verbose=False)  # documents are long on purpose: no length warning
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"]):
        if not ids:
            empty += 1
            continue
        ends = sentence_end_chars(text)
        starts = []
        if ends:
            token_starts = np.fromiter((o[0] for o in offsets), np.int64, len(offsets))
            starts = sentence_starts(token_starts, ends, len(ids))
        block_sizes = pack_blocks(len(ids), starts, capacity)
        ids_parts.append(np.asarray(ids, dtype=np.int32))
        sizes.extend(block_sizes)
        counts.append(len(block_sizes))
    ids_all = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
    return ids_all, np.asarray(sizes, np.int32), np.asarray(counts, np.int32), empty


def _rebatch(batches: Iterable[list[str]], limit: int | None) -> Iterator[list[str]]:
    """Regroup into batches of at most TOKENIZE_BATCH_DOCS documents / TOKENIZE_BATCH_CHARS characters."""
    out, chars, taken = [], 0, 0
    for batch in batches:
        for text in batch:
            if limit is not None and taken >= limit:
                break
            out.append(text)
            chars += len(text)
            taken += 1
            if len(out) >= TOKENIZE_BATCH_DOCS or chars >= TOKENIZE_BATCH_CHARS:
                yield out
                out, chars = [], 0
        if limit is not None and taken >= limit:
            break
    if out:
        yield out


def default_num_proc() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


@contextlib.contextmanager
def tokenizer_pool(tokenizer, capacity: int, num_proc: int):
    """A function mapping document batches to packed results, in order, on ``num_proc`` processes.

    At most 2 x num_proc batches are in flight, so memory stays flat however large the corpus is.
    """
    if num_proc == 1:
        init_worker(tokenizer, capacity)
        yield lambda batches: map(tokenize_batch, batches)
        return
    import multiprocessing

    # fork: workers start in milliseconds and inherit the loaded tokenizer; the pool is created
    # before any reader thread exists.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = context.Pool(num_proc, initializer=init_worker, initargs=(tokenizer, capacity, True))

    def ordered(batches):
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    try:
        yield ordered
        pool.close()
    finally:
        pool.terminate()
        pool.join()


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
            for ids, sizes, counts, n_empty in tokenize(_rebatch(reader.batches(), max_documents)):
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
            "sentence_splitter": "regex, see retromae_ds.data.prepare.SENTENCE_END",
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
