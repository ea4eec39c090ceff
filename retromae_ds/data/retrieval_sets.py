"""The user's retrieval data, for evaluation and fine-tuning, with every bad input explained.

Two layouts are read:

- a pairs file (.jsonl, .tsv, .csv or .parquet) with one query and one relevant passage per row.
  For evaluation (:func:`load_pairs`) every passage in the file is a candidate and a query's positives
  are the passages of all its rows; for fine-tuning (:func:`load_training_pairs`) the rows are
  (anchor, positive[, negative]) examples as they stand.
- a BEIR folder (:func:`load_beir`): corpus.jsonl, queries.jsonl and qrels/{split}.tsv with graded
  judgements, evaluated the BEIR way: every corpus passage is a candidate, only judged queries count.

Any problem raises :class:`UserError` with one paragraph naming the file, the line (the parquet row),
what is wrong and what to change.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator

from retromae_ds.errors import UserError

PAIR_FORMATS = {".jsonl": "jsonl", ".tsv": "tsv", ".csv": "csv", ".parquet": "parquet"}
BEIR_LAYOUT = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv"
BEIR_JSONL_FIX = ('every line of a BEIR {name} needs "_id" and "text"{title}; add the field '
                  '(or fix its spelling) on that line')
QRELS_FIX = ('a BEIR qrels file starts with the header line "query-id<TAB>corpus-id<TAB>score"; '
             'add or fix that line')
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) is shorter than some passages


@dataclass
class RetrievalSet:
    """Queries, candidate passages and graded relevance, ids in file order."""

    source: str  # the path given (file or BEIR folder), for messages and reports
    query_ids: list[str]
    queries: list[str]  # texts, parallel to query_ids
    doc_ids: list[str]
    docs: list[str]  # passage texts, parallel to doc_ids
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade > 0}; every listed query has one

    def describe(self) -> str:
        """One line for logs and reports: counts and where they came from."""
        pairs = sum(len(docs) for docs in self.qrels.values())
        return (f"{_count(len(self.query_ids), 'query', 'queries')}, {_count(len(self.doc_ids), 'passage')}, "
                f"{_count(pairs, 'relevant pair')} ({self.source})")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _names(names) -> str:
    names = list(names)
    shown = ", ".join(_quoted(str(n)) for n in names[:12])
    return (shown + f", ... ({len(names)} in all)" if len(names) > 12 else shown) or "none"


# -- evaluation pairs ----------------------------------------------------------------------------

def load_pairs(path: str, query_field: str = "query", passage_field: str = "passage") -> RetrievalSet:
    """An evaluation set from a pairs file: queries and passages deduplicated by exact text, grade 1."""
    flags = _pair_flags(path, query_field, passage_field, None)
    query_ids: dict[str, str] = {}  # text -> id, first-seen order
    doc_ids: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for _location, row in read_rows(path, [query_field, passage_field], flags):
        qid = query_ids.setdefault(row[query_field], f"q{len(query_ids)}")
        did = doc_ids.setdefault(row[passage_field], f"p{len(doc_ids)}")
        qrels.setdefault(qid, {})[did] = 1
    if not query_ids:
        raise _no_rows(path, flags)
    return RetrievalSet(source=path, query_ids=list(query_ids.values()), queries=list(query_ids),
                        doc_ids=list(doc_ids.values()), docs=list(doc_ids), qrels=qrels)


def load_training_pairs(path: str, query_field: str = "query", passage_field: str = "passage",
                        negative_field: str | None = None) -> dict[str, list[str]]:
    """Training columns {"anchor", "positive"[, "negative"]} from a pairs file, row for row, in file order."""
    flags = _pair_flags(path, query_field, passage_field, negative_field)
    fields = [query_field, passage_field] + ([negative_field] if negative_field else [])
    columns: dict[str, list[str]] = {"anchor": [], "positive": []}
    if negative_field:
        columns["negative"] = []
    for _location, row in read_rows(path, fields, flags):
        columns["anchor"].append(row[query_field])
        columns["positive"].append(row[passage_field])
        if negative_field:
            columns["negative"].append(row[negative_field])
    if not columns["anchor"]:
        raise _no_rows(path, flags)
    return columns


def _pair_flags(path: str, query_field: str, passage_field: str, negative_field: str | None) -> dict[str, str]:
    """Field -> flag; refuses one field named for two roles (the rows would pair a text with itself)."""
    flags: dict[str, str] = {}
    for field, flag in ((query_field, "--query-field"), (passage_field, "--passage-field"),
                        (negative_field, "--negative-field")):
        if field is None:
            continue
        if field in flags:
            raise UserError(f"{flags[field]} and {flag} both name the field {_quoted(field)} of {path}; each "
                            f"must name its own field, so pass the right field to one of them.")
        flags[field] = flag
    return flags


def _no_rows(path: str, flags: dict[str, str]) -> UserError:
    fields = ", ".join(f"{_quoted(field)} ({flag})" for field, flag in flags.items())
    return UserError(f"{path} holds no rows: a pairs file needs one row per query and relevant passage, with "
                     f"the fields {fields}. Point at the file that holds your pairs, or fill this one.")


# -- BEIR folders ----------------------------------------------------------------------------------

def load_beir(folder: str, split: str = "test") -> RetrievalSet:
    """An evaluation set from a BEIR folder: all corpus passages, the queries judged in qrels/{split}.tsv."""
    corpus_path, queries_path, qrels_path = _beir_files(folder, split)
    docs: dict[str, str] = {}  # id -> passage text, file order
    for location, row in _beir_jsonl(corpus_path, "corpus.jsonl", with_title=True):
        title, text = row["title"].strip(), row["text"].strip()
        passage = f"{row['title']} {row['text']}" if title and text else (row["text"] if text else row["title"])
        if not passage.strip():
            raise UserError(f'{location}: both "title" and "text" are empty, so the passage has no text; fill '
                            f'in its text or delete the line.')
        docs[row["_id"]] = passage
    queries: dict[str, str] = {}
    for _location, row in _beir_jsonl(queries_path, "queries.jsonl", with_title=False):
        queries[row["_id"]] = row["text"]

    qrels: dict[str, dict[str, int]] = {}
    grade_lines: dict[tuple[str, str], tuple[int, str]] = {}  # (query, doc) -> (score, location)
    rows = 0
    for location, row in read_rows(qrels_path, ["query-id", "corpus-id", "score"],
                                   {"query-id": QRELS_FIX, "corpus-id": QRELS_FIX, "score": QRELS_FIX}):
        rows += 1
        qid, did, score_text = row["query-id"], row["corpus-id"], row["score"]
        try:
            score = int(score_text)
        except ValueError:
            raise UserError(f"{location}: score {_quoted(score_text)} is not an integer; BEIR qrels grade each "
                            f"(query, passage) pair with a whole number (0 = not relevant, 1 or more = relevant "
                            f"by degree). Fix the score on that line.") from None
        if qid not in queries:
            raise UserError(f"{location} names query id {_quoted(qid)}, which {queries_path} does not hold; add "
                            f"that query to queries.jsonl or delete the line from qrels/{split}.tsv.")
        if did not in docs:
            raise UserError(f"{location} names corpus id {_quoted(did)}, which {corpus_path} does not hold; add "
                            f"that passage to corpus.jsonl or delete the line from qrels/{split}.tsv.")
        earlier = grade_lines.setdefault((qid, did), (score, location))
        if earlier[0] != score:
            raise UserError(f"{location} grades query {_quoted(qid)} and passage {_quoted(did)} {score}, but "
                            f"{earlier[1]} grades the same pair {earlier[0]}; keep one line per pair.")
        if score > 0:
            qrels.setdefault(qid, {})[did] = score
    if not qrels:
        held = f"its {_count(rows, 'row')} all score 0 or less" if rows else "it holds no rows"
        raise UserError(f"{qrels_path} gives no query a positive score ({held}), so there is nothing to "
                        f"evaluate; judge at least one (query, passage) pair with a score of 1 or more, or pass "
                        f"--beir-split with a split that has judgements.")
    query_ids = [qid for qid in queries if qid in qrels]  # BEIR: only judged queries are evaluated
    return RetrievalSet(source=folder, query_ids=query_ids, queries=[queries[qid] for qid in query_ids],
                        doc_ids=list(docs), docs=list(docs.values()),
                        qrels={qid: qrels[qid] for qid in query_ids})


def _beir_files(folder: str, split: str) -> tuple[str, str, str]:
    """The three files of a BEIR folder, each checked to exist (a wrong split lists the ones there)."""
    if not os.path.exists(folder):
        raise UserError(f"BEIR folder {folder} does not exist; check the path (relative paths start from "
                        f"{os.getcwd()}).")
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is a file, not a BEIR folder ({BEIR_LAYOUT.replace('SPLIT', split)}); pass "
                        f"the folder, or give this file as a pairs file.")
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"BEIR folder {folder} has no {name} ({BEIR_LAYOUT.replace('SPLIT', split)}); add "
                            f"it, or pass the folder that holds it.")
    qrels_dir = os.path.join(folder, "qrels")
    qrels_path = os.path.join(qrels_dir, f"{split}.tsv")
    if not os.path.isfile(qrels_path):
        present = sorted(name for name in os.listdir(qrels_dir)
                         if name.endswith(".tsv")) if os.path.isdir(qrels_dir) else []
        if not present:
            where = "qrels/ holds no .tsv files" if os.path.isdir(qrels_dir) else "and no qrels/ folder"
            raise UserError(f"BEIR folder {folder} has no qrels/{split}.tsv ({where}); "
                            f"{BEIR_LAYOUT.replace('SPLIT', split)}: add the relevance judgements there.")
        splits = [name[:-len(".tsv")] for name in present]
        fix = (f"pass --beir-split {splits[0]}" if len(splits) == 1
               else f"pass --beir-split with one of {', '.join(splits)}")
        raise UserError(f"BEIR folder {folder} has no qrels/{split}.tsv; qrels/ holds {', '.join(present)}; {fix}.")
    return os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "queries.jsonl"), qrels_path


def _beir_jsonl(path: str, name: str, with_title: bool) -> Iterator[tuple[str, dict]]:
    """Rows of corpus.jsonl / queries.jsonl with text ids; a repeated _id names both lines."""
    fix = BEIR_JSONL_FIX.format(name=name, title=' (and may have "title")' if with_title else "")
    first_line: dict[str, str] = {}
    for location, row in read_rows(path, ["_id", "text"], {"_id": fix, "text": fix},
                                   optional=["title"] if with_title else [],
                                   may_be_empty=["text"] if with_title else [], ids=["_id"]):
        earlier = first_line.setdefault(row["_id"], location)
        if earlier != location:
            raise UserError(f"{location} repeats _id {_quoted(row['_id'])} of {earlier}; give each line of "
                            f"{name} its own _id, or delete the repeated line.")
        yield location, row


# -- the shared reader -----------------------------------------------------------------------------

def read_rows(path: str, fields: list[str], flag_names: dict[str, str], *, optional=(), may_be_empty=(),
              ids=()) -> Iterator[tuple[str, dict]]:
    """Yield (location, {field: text}) per row of a .jsonl/.tsv/.csv/.parquet file, in file order.

    ``location`` is "PATH line N" (1-based, the header line counts) or "PATH row N" (parquet, 1-based).
    Each field in ``fields`` must hold a string that is not blank; ``optional`` fields may be absent or
    null (read as ""), ``may_be_empty`` fields may be blank, and ``ids`` fields may hold an integer (read
    as its digits). ``flag_names`` maps a field to the flag that names it ("--query-field"), or to a
    sentence saying how to fix a row that lacks it.
    """
    kind = _pairs_kind(path)
    wanted = list(fields) + [field for field in optional if field not in fields]
    if kind == "parquet":
        records = _parquet_records(path, fields, wanted, flag_names)
    else:
        _refuse_binary(path)
        records = _jsonl_records(path) if kind == "jsonl" else _delimited_records(path, kind, fields, flag_names)
    optional, may_be_empty, ids = set(optional), set(may_be_empty), set(ids)
    for location, record in records:
        yield location, _checked_row(location, record, kind, fields, wanted, flag_names, optional, may_be_empty, ids)


def _pairs_kind(path: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; check the path (relative paths start from {os.getcwd()}).")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a pairs file ({', '.join(PAIR_FORMATS)}); pass the file, or, "
                        f"if it is a BEIR folder (corpus.jsonl, queries.jsonl, qrels/), pass it as a BEIR folder.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in PAIR_FORMATS:
        raise UserError(f"{path}: unsupported file type {_quoted(ext or '(no extension)')}; retrieval data is "
                        f"read from {', '.join(PAIR_FORMATS)} files. Convert the file to one of them (or give it "
                        f"the right extension if it already is one).")
    return PAIR_FORMATS[ext]


def _refuse_binary(path: str) -> None:
    """A compressed or binary file given as text: say what it is, not that line 1 is bad UTF-8."""
    from retromae_ds.data.readers import BINARY_MAGIC

    with open(path, "rb") as f:
        head = f.read(8192)
    ext = os.path.splitext(path)[1]
    for magic, what, fix in BINARY_MAGIC:
        if head.startswith(magic):
            fix = fix.replace("FILE", path).replace("OUT", f"pairs{ext}")
            raise UserError(f"{path} is {what}, not a text {ext} file; {fix}, and pass that file instead.")
    if b"\x00" in head:
        raise UserError(f"{path} is a binary file (it holds NUL bytes), not a text {ext} file; write the pairs "
                        f"as {', '.join(PAIR_FORMATS)} and pass that file instead.")


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file (a leading BOM dropped); bad bytes name the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                ext = os.path.splitext(path)[1]
                raise UserError(f"{path} line {lineno} holds bytes that are not UTF-8 "
                                f"({raw[err.start:err.start + 4]!r} at column {err.start + 1}); re-encode the "
                                f"file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed{ext}`.") from None
            yield lineno, (line.removeprefix("\ufeff") if lineno == 1 else line)


def _jsonl_records(path: str) -> Iterator[tuple[str, object]]:
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue  # blank lines are no records
        location = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            shown = line.strip()
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise UserError(f"{location} is not valid JSON ({err.msg} at column {err.colno}: {shown}); a .jsonl "
                            f"file holds one JSON object per line: fix or delete that line.") from None
        yield location, record


def _delimited_records(path: str, kind: str, fields: list[str],
                       flag_names: dict[str, str]) -> Iterator[tuple[str, dict]]:
    """Rows of a .csv/.tsv file with a header line, as {column: value}; row lengths checked."""
    import csv

    delimiter = "\t" if kind == "tsv" else ","
    line_numbers = _LineCounter(_decoded_lines(path))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, CSV_FIELD_LIMIT))
    try:
        reader = csv.reader(line_numbers, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return  # an empty file: the caller says it holds no rows
            _check_header(path, header, fields, flag_names)
            end = line_numbers.lineno
            for row in reader:
                start, end = end + 1, line_numbers.lineno
                if not row:
                    continue  # a blank line
                location = f"{path} line {start}"
                if kind == "tsv" and end > start and any("\t" in value for value in row):
                    raise UserError(f'{location}: a double quote (") opens a quoted value that runs on to line '
                                    f'{end}, swallowing tabs and line ends; a .tsv value that starts with " must '
                                    f'end with " (write "" for a quote inside it). Fix the quoting on line {start}.')
                if len(row) != len(header):
                    sep = "a tab" if kind == "tsv" else "a comma"
                    raise UserError(f"{location} has {_count(len(row), 'value')}, but the header (line 1) names "
                                    f"{_count(len(header), 'column')} ({_names(header)}); give the row one value "
                                    f"per column (quote a value that holds {sep}).")
                yield location, dict(zip(header, row))
        except csv.Error as err:
            raise UserError(f"{path} line {line_numbers.lineno} is not valid {kind.upper()} ({err}); fix that "
                            f"line.") from None
    finally:
        csv.field_size_limit(limit)


class _LineCounter:
    """Feeds decoded lines to csv.reader and remembers the number of the last line read."""

    def __init__(self, lines: Iterator[tuple[int, str]]) -> None:
        self.lines = lines
        self.lineno = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        self.lineno, line = next(self.lines)
        return line


def _check_header(path: str, header: list[str], fields: list[str], flag_names: dict[str, str]) -> None:
    for field in fields:
        if field not in header:
            raise UserError(f"{path} line 1 (the header) has no column {_quoted(field)} (it has: "
                            f"{_names(header)}); {_missing_fix(field, flag_names)}.")
        if header.count(field) > 1:
            raise UserError(f"{path} line 1 (the header) names the column {_quoted(field)} twice; rename one of "
                            f"them so the right one is read.")


def _parquet_records(path: str, fields: list[str], wanted: list[str],
                     flag_names: dict[str, str]) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{path} is not a readable Parquet file ({type(err).__name__}: {str(err)[:200]}); "
                        f"write it again with pyarrow or pandas, or convert it to .jsonl.") from None
    names = parquet.schema_arrow.names
    for field in fields:
        if field not in names:
            raise UserError(f"{path} has no column {_quoted(field)} (it has: {_names(names)}); "
                            f"{_missing_fix(field, flag_names)}.")
    columns = [field for field in wanted if field in names]
    row = 0
    try:
        for batch in parquet.iter_batches(columns=columns, batch_size=4096):
            values = {name: batch.column(name).to_pylist() for name in columns}
            for i in range(batch.num_rows):
                row += 1
                yield f"{path} row {row}", {name: values[name][i] for name in columns}
    except (OSError, ValueError) as err:  # pyarrow's ArrowIOError / ArrowInvalid for damaged data pages
        raise UserError(f"{path}: Parquet data after row {row} cannot be read ({str(err)[:200]}); write the "
                        f"file again.") from None


def _missing_fix(field: str, flag_names: dict[str, str]) -> str:
    """How to fix a missing field: the flag that names it, or the sentence given for it."""
    fix = flag_names.get(field)
    if fix is None:
        return f"add the {_quoted(field)} field"
    if fix.startswith("--"):
        role = fix[2:].removesuffix("-field").replace("-", " ")
        return f"name the {role} field with {fix}"
    return fix


def _checked_row(location: str, record, kind: str, fields: list[str], wanted: list[str],
                 flag_names: dict[str, str], optional: set, may_be_empty: set, ids: set) -> dict:
    """{field: text} for one record, or a UserError saying which field is wrong and how to fix it."""
    if not isinstance(record, dict):
        what = "list" if isinstance(record, list) else type(record).__name__
        raise UserError(f"{location} is a JSON {what}, not an object; write each row as an object with the "
                        f"fields {_names(fields)}.")
    row = {}
    for field in wanted:
        if field not in record:
            if field in optional:
                row[field] = ""
                continue
            raise UserError(f"{location} has no field {_quoted(field)} (it has: {_names(record)}); "
                            f"{_missing_fix(field, flag_names)}.")
        value = record[field]
        if value is None and field in optional:
            value = ""
        if field in ids and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is None:
            raise UserError(f"{location}: field {_quoted(field)} is null, not text; fill it in or delete the row.")
        if not isinstance(value, str):
            shown = json.dumps(value) if kind == "jsonl" else repr(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            what = _json_type(value) if kind == "jsonl" else f"of type {type(value).__name__}"
            fix = "write it as a JSON string" if kind == "jsonl" else "store it as a string column"
            if field in ids:
                fix += " or an integer"
            if field in flag_names and flag_names[field].startswith("--"):
                fix += f", or {_missing_fix(field, flag_names)} if the text is in another field"
            raise UserError(f"{location}: field {_quoted(field)} is {what} ({shown}), not text; {fix}.")
        if not value.strip() and field not in may_be_empty and field not in optional:
            raise UserError(f"{location}: field {_quoted(field)} is empty; fill it in or delete the row.")
        row[field] = value
    return row


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a JSON list" if isinstance(value, list) else "a JSON object"
