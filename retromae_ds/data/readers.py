"""Finding the input files and reading documents from them, with every bad record explained.

Inputs: .jsonl/.json, .txt, .csv/.tsv and .parquet files, folders of them (searched recursively),
and folders written by `datasets.save_to_disk`; all are read with the `datasets` library. A .txt file
holds one document per line (see --txt-sample-by). A reader yields batches of document texts and
fills in ``sources`` (with record counts) and ``skipped_bad_records`` as it goes; when a file cannot
be read, :func:`diagnose_unreadable` finds the line at fault and says how to fix it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from retromae_ds.errors import UserError


def add_reading_arguments(parser) -> None:
    """How documents are read from the inputs: the flags `prepare` and `tokenizer` share (same meaning)."""
    parser.add_argument("--text-field", default="text",
                        help="field/column holding the document text (default: text; ignored for .txt)")
    parser.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                        help="stop at the first bad record (default), or skip and count bad records")
    parser.add_argument("--txt-sample-by", choices=("line", "paragraph", "document"), default="line",
                        help="what one document is in a .txt file (default: line)")

READ_BATCH_ROWS = 1000
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".txt": "txt", ".text": "txt", ".csv": "csv",
              ".tsv": "tsv", ".parquet": "parquet"}
SKIP_HINT = "or pass --on-bad-record skip to skip such records and count them"


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
        binary = binary_file_problem(source)
        if binary:  # its "lines" are no records to skip: the whole file is the wrong input
            raise UserError(f"{binary}.")
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


# Magic numbers of binary formats people feed by mistake (a compressed corpus, an archive, a document).
BINARY_MAGIC = ((b"\x1f\x8b", "gzip-compressed", "decompress it first: `gzip -dc FILE > OUT`"),
                (b"BZh", "bzip2-compressed", "decompress it first: `bzip2 -dc FILE > OUT`"),
                (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first: `xz -dc FILE > OUT`"),
                (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first: `zstd -dc FILE > OUT`"),
                (b"PK\x03\x04", "a zip archive (or an Office document)", "extract its text files to OUT"),
                (b"%PDF", "a PDF document", "extract its text first, e.g. `pdftotext FILE OUT`"),
                (b"PAR1", "a Parquet file", "give it the .parquet extension"),
                (b"\x89HDF", "an HDF5 file", "write its text column to a .jsonl or .parquet file"))
TEXT_KINDS = ("jsonl", "json", "txt", "csv", "tsv")


def binary_file_problem(source: Source) -> str | None:
    """'PATH is not text: ...' when a file that should hold text is binary (a known magic number, or NUL
    bytes in its first 8 KiB, as `grep` and `git` decide), else None. Re-encoding cannot fix such a file."""
    if source.kind not in TEXT_KINDS:
        return None
    with open(source.path, "rb") as f:
        head = f.read(8192)
    ext = os.path.splitext(source.path)[1]
    for magic, what, fix in BINARY_MAGIC:
        if head.startswith(magic):
            fix = fix.replace("FILE", source.path).replace("OUT", f"corpus{ext}")
            return f"{source.path} is {what}, not a text {ext} file: {fix}, then pass that to --input"
    if b"\x00" in head:
        return (f"{source.path} is a binary file (it holds NUL bytes), not a text {ext} file: give --input the "
                f"corpus as text files ({', '.join(sorted(FILE_KINDS))}), folders of them or a save_to_disk folder")
    return None


def diagnose_unreadable(source: Source, field: str, err: Exception) -> UserError:
    """Turn a loader failure into a message naming the file, the line and the fix."""
    line_based = source.kind in ("jsonl", "txt") or (source.kind == "json" and not _starts_with(source.path, b"["))
    binary = binary_file_problem(source)
    if binary:
        return UserError(f"{binary}.")
    if source.kind in TEXT_KINDS:
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
