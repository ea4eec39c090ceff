"""Retrieval data (pairs files, BEIR folders) reads the same in every format, and every bad input is
refused with one paragraph that names the file, the line and the fix (retromae_ds.data.retrieval_sets)."""

from __future__ import annotations

import csv
import gzip
import json
import os

import pytest

from retromae_ds.data.retrieval_sets import (RetrievalSet, load_beir, load_pairs, load_training_pairs,
                                             read_rows)
from retromae_ds.errors import UserError

# Rows of a pairs file: the first query has two positives, one passage serves two queries, and the texts
# hold a comma, a tab, a double quote and a line break (each format must carry them unchanged).
PAIRS = [
    ("what do cats eat", 'Cats eat meat, mostly "fresh".'),
    ("how loud is a dog", "A dog\tcan bark at 100 dB."),
    ("what do cats eat", "Cats also eat\ngrass sometimes."),
    ("are cats carnivores", 'Cats eat meat, mostly "fresh".'),
]
EXPECTED = RetrievalSet(
    source="",
    query_ids=["q0", "q1", "q2"],
    queries=["what do cats eat", "how loud is a dog", "are cats carnivores"],
    doc_ids=["p0", "p1", "p2"],
    docs=['Cats eat meat, mostly "fresh".', "A dog\tcan bark at 100 dB.", "Cats also eat\ngrass sometimes."],
    qrels={"q0": {"p0": 1, "p2": 1}, "q1": {"p1": 1}, "q2": {"p0": 1}},
)


def write_table(path, columns: list[str], rows: list[tuple]) -> str:
    """Rows under the given column names, in the format the extension names (.jsonl/.tsv/.csv/.parquet)."""
    path = str(path)
    ext = os.path.splitext(path)[1]
    if ext == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(columns, row))) + "\n")
    elif ext in (".tsv", ".csv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t" if ext == ".tsv" else ",")
            writer.writerow(columns)
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)}), path)
    return path


def write_lines(path, lines: list[str] | bytes) -> str:
    """A file with exactly these lines (or bytes), so that line numbers in messages are known."""
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def message(call, *args, **kwargs) -> str:
    """The UserError message of a call; it must be one paragraph."""
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    text = str(caught.value)
    assert "\n" not in text, f"not one paragraph: {text!r}"
    return text


def assert_mentions(text: str, *parts: str) -> None:
    for part in parts:
        assert part in text, f"{part!r} missing from: {text}"


# -- pairs files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".jsonl", ".tsv", ".csv", ".parquet"])
def test_every_format_gives_the_same_set(tmp_path, ext):
    path = write_table(tmp_path / f"pairs{ext}", ["query", "passage"], PAIRS)
    loaded = load_pairs(path)
    assert loaded == RetrievalSet(**{**EXPECTED.__dict__, "source": path})
    assert loaded.describe() == f"3 queries, 3 passages, 4 relevant pairs ({path})"


def test_queries_and_passages_are_deduplicated_by_exact_text(tmp_path):
    path = write_table(tmp_path / "p.jsonl", ["query", "passage"], [
        ("q a", "passage one"), ("q b", "passage one"), ("q a", "passage two"),
        ("q a ", "passage one"),  # not the same text as "q a": its own query
        ("q a", "passage one"),  # a repeated row adds nothing
    ])
    loaded = load_pairs(path)
    assert loaded.query_ids == ["q0", "q1", "q2"]
    assert loaded.queries == ["q a", "q b", "q a "]
    assert loaded.docs == ["passage one", "passage two"]
    assert loaded.qrels == {"q0": {"p0": 1, "p1": 1}, "q1": {"p0": 1}, "q2": {"p0": 1}}
    assert loaded.describe() == f"3 queries, 2 passages, 4 relevant pairs ({path})"


def test_field_names_come_from_the_arguments(tmp_path):
    path = write_table(tmp_path / "p.csv", ["id", "question", "answer"],
                       [("1", "who wrote it", "She did."), ("2", "when", "In 1900.")])
    loaded = load_pairs(path, query_field="question", passage_field="answer")
    assert loaded.queries == ["who wrote it", "when"] and loaded.docs == ["She did.", "In 1900."]
    assert_mentions(message(load_pairs, path), 'p.csv line 1 (the header) has no column "query"',
                    '(it has: "id", "question", "answer")', "--query-field")


def test_describe_counts_with_separators_and_singulars():
    many = RetrievalSet("data/pairs.jsonl", [f"q{i}" for i in range(1234)], ["x"] * 1234,
                        [f"p{i}" for i in range(5678)], ["y"] * 5678,
                        {f"q{i}": {"p0": 1, "p1": 1} if i < 66 else {"p0": 1} for i in range(1234)})
    assert many.describe() == "1,234 queries, 5,678 passages, 1,300 relevant pairs (data/pairs.jsonl)"
    one = RetrievalSet("b", ["q0"], ["x"], ["p0"], ["y"], {"q0": {"p0": 1}})
    assert one.describe() == "1 query, 1 passage, 1 relevant pair (b)"


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_training_pairs_row_for_row(tmp_path, ext):
    rows = [("q1", "pos1", "neg1"), ("q2", "pos2", "neg2"), ("q1", "pos1", "neg3")]
    path = write_table(tmp_path / f"t{ext}", ["question", "answer", "hard"], rows)
    assert load_training_pairs(path, "question", "answer") == {
        "anchor": ["q1", "q2", "q1"], "positive": ["pos1", "pos2", "pos1"]}
    assert load_training_pairs(path, "question", "answer", negative_field="hard") == {
        "anchor": ["q1", "q2", "q1"], "positive": ["pos1", "pos2", "pos1"], "negative": ["neg1", "neg2", "neg3"]}


def test_training_pairs_missing_negative_names_the_flag(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"query": "a", "passage": "b", "negative": "c"}',
                                              '{"query": "a", "passage": "b"}'])
    assert_mentions(message(load_training_pairs, path, negative_field="negative"),
                    "t.jsonl line 2 has no field \"negative\"", "--negative-field")


def test_read_rows_yields_locations_and_values(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"a": "x", "b": "y", "c": 1}', "", '{"a": "z", "b": "w"}'])
    assert list(read_rows(path, ["a", "b"], {})) == [
        (f"{path} line 1", {"a": "x", "b": "y"}), (f"{path} line 3", {"a": "z", "b": "w"})]


PAIRS_ERRORS = {
    # name: (file name, lines or bytes, load_pairs keyword arguments, what the message must say)
    "missing field": ("p.jsonl", ['{"query": "a", "passage": "b"}', '{"query": "c", "passage": "d"}',
                                  '{"q": "e", "text": "f"}'], {},
                      ['p.jsonl line 3 has no field "query" (it has: "q", "text")',
                       "name the query field with --query-field"]),
    "missing column": ("p.csv", ["query,text", "a,b"], {},
                       ['p.csv line 1 (the header) has no column "passage"', '"query", "text"', "--passage-field"]),
    "number in JSON": ("p.jsonl", ['{"query": "a", "passage": "b"}', '{"query": 42, "passage": "d"}'], {},
                       ['p.jsonl line 2', 'field "query" is a number (42)', "JSON string", "--query-field"]),
    "null value": ("p.jsonl", ['{"query": "a", "passage": null}'], {},
                   ['p.jsonl line 1', 'field "passage" is null', "fill it in or delete the row"]),
    "blank value": ("p.tsv", ["query\tpassage", "a\tb", "c\t   "], {},
                    ['p.tsv line 3', 'field "passage" is empty', "fill it in or delete the row"]),
    "bad JSON": ("p.jsonl", ['{"query": "a", "passage": "b"}', '{"query": "a" "passage": "b"}'], {},
                 ["p.jsonl line 2 is not valid JSON", "Expecting ',' delimiter at column 15", "fix or delete"]),
    "JSON list": ("p.jsonl", ['["a", "b"]'], {}, ["p.jsonl line 1 is a JSON list", '"query", "passage"']),
    "not UTF-8 jsonl": ("p.jsonl", b'{"query": "a", "passage": "b"}\n\n{"query": "caf\xe9", "passage": "b"}\n', {},
                        ["p.jsonl line 3", "not UTF-8", "iconv -f latin1 -t utf-8"]),
    "not UTF-8 csv": ("p.csv", b"query,passage\ncaf\xe9,b\n", {}, ["p.csv line 2", "not UTF-8", "re-encode"]),
    "unsupported type": ("p.txt", ["a\tb"], {}, ["p.txt", '".txt"', ".jsonl, .tsv, .csv, .parquet"]),
    "empty jsonl": ("p.jsonl", ["", "  "], {}, ["p.jsonl holds no rows", '"query" (--query-field)']),
    "header only": ("p.csv", ["query,passage"], {}, ["p.csv holds no rows", '"passage" (--passage-field)']),
    "row too long, after a quoted line break": (
        "p.csv", ["query,passage", 'a,"two', 'lines"', "b,c,d"], {},
        ["p.csv line 4 has 3 values", "header (line 1) names 2 columns", "quote a value that holds a comma"]),
    "runaway quote in tsv": ("p.tsv", ["query\tpassage", 'a\t"quoted start', 'b\tsecond" passage', "c\td"], {},
                             ["p.tsv line 2", "runs on to line 3", 'write "" for a quote']),
    "gzip": ("p.jsonl", gzip.compress(b'{"query": "a", "passage": "b"}\n'), {},
             ["p.jsonl is gzip-compressed", "gzip -dc"]),
    "one field, two roles": ("p.jsonl", ['{"query": "a"}'], {"passage_field": "query"},
                             ['--query-field and --passage-field both name the field "query" of']),
    "named field absent": ("p.jsonl", ['{"query": "a", "passage": "b"}'], {"query_field": "question"},
                           ['p.jsonl line 1 has no field "question" (it has: "query", "passage")', "--query-field"]),
}


@pytest.mark.parametrize("case", list(PAIRS_ERRORS))
def test_bad_pairs_file_is_explained(tmp_path, case):
    name, lines, kwargs, expected = PAIRS_ERRORS[case]
    path = write_lines(tmp_path / name, lines)
    assert_mentions(message(load_pairs, path, **kwargs), path, *expected)


def test_missing_file_and_folder_are_explained(tmp_path):
    assert_mentions(message(load_pairs, str(tmp_path / "nope.jsonl")), "nope.jsonl does not exist",
                    "check the path")
    assert_mentions(message(load_pairs, str(tmp_path)), str(tmp_path), "is a folder", "BEIR folder")


def test_bad_parquet_rows_are_located_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"query": ["a", "b", "c"], "passage": ["x", "", "z"]}), path)
    assert_mentions(message(load_pairs, path), "p.parquet row 2", 'field "passage" is empty')
    pq.write_table(pa.table({"query": ["a", "b"], "text": ["x", "y"]}), path)
    assert_mentions(message(load_pairs, path), 'p.parquet has no column "passage" (it has: "query", "text")',
                    "--passage-field")
    pq.write_table(pa.table({"query": ["a", "b"], "passage": [1, 2]}), path)
    assert_mentions(message(load_pairs, path), "p.parquet row 1", 'field "passage" is of type int', "--passage-field")
    write_lines(path, ["not parquet"])
    assert_mentions(message(load_pairs, path), "p.parquet is not a readable Parquet file")


# -- BEIR folders ----------------------------------------------------------------------------------

CORPUS = ['{"_id": "d1", "title": "Cats", "text": "Cats purr."}',
          '{"_id": "d2", "title": "", "text": "Dogs bark."}',
          '{"_id": 3, "text": "Fish swim."}',
          '{"_id": "d4", "title": "Birds", "text": ""}']
QUERIES = ['{"_id": "q1", "text": "do cats purr"}',
           '{"_id": "q2", "text": "never judged"}',
           '{"_id": 7, "text": "what swims"}',
           '{"_id": "q4", "text": "judged, not relevant"}',
           '{"_id": "q5", "text": "birds"}']
QRELS = ["query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\td2\t1", "7\t3\t1", "7\td2\t0", "q4\td1\t0", "q5\td4\t3"]


def make_beir(root, corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="test") -> str:
    folder = root / "beir"
    (folder / "qrels").mkdir(parents=True)
    write_lines(folder / "corpus.jsonl", corpus)
    write_lines(folder / "queries.jsonl", queries)
    write_lines(folder / "qrels" / f"{split}.tsv", qrels)
    return str(folder)


def test_beir_folder(tmp_path):
    folder = make_beir(tmp_path)
    loaded = load_beir(folder)
    assert loaded == RetrievalSet(
        source=folder,
        query_ids=["q1", "7", "q5"],  # queries.jsonl order; q2 (unjudged) and q4 (only score 0) left out
        queries=["do cats purr", "what swims", "birds"],
        doc_ids=["d1", "d2", "3", "d4"],  # every corpus passage is a candidate
        docs=["Cats Cats purr.", "Dogs bark.", "Fish swim.", "Birds"],
        qrels={"q1": {"d1": 2, "d2": 1}, "7": {"3": 1}, "q5": {"d4": 3}},
    )
    assert loaded.describe() == f"3 queries, 4 passages, 4 relevant pairs ({folder})"


def test_beir_split(tmp_path):
    folder = make_beir(tmp_path, qrels=["query-id\tcorpus-id\tscore", "q2\td2\t1"], split="dev")
    loaded = load_beir(folder, split="dev")
    assert loaded.query_ids == ["q2"] and loaded.qrels == {"q2": {"d2": 1}}


def _replaced(lines: list[str], index: int, line: str | None) -> list[str]:
    """Lines with line ``index`` (0-based) replaced, or added at the end when index == len(lines)."""
    return lines[:index] + ([line] if line is not None else []) + lines[index + 1:]


BEIR_ERRORS = {
    # name: (make_beir keyword arguments, load_beir keyword arguments, what the message must say)
    "wrong split": ({}, {"split": "dev"}, ["no qrels/dev.tsv; qrels/ holds test.tsv; pass --beir-split test"]),
    "corpus missing _id": ({"corpus": _replaced(CORPUS, 1, '{"id": "d2", "text": "Dogs bark."}')}, {},
                           ['corpus.jsonl line 2 has no field "_id" (it has: "id", "text")',
                            'needs "_id" and "text"']),
    "queries missing text": ({"queries": _replaced(QUERIES, 2, '{"_id": "q3", "query": "x"}')}, {},
                             ['queries.jsonl line 3 has no field "text"', 'needs "_id" and "text"']),
    "corpus repeats _id": ({"corpus": CORPUS + ['{"_id": "d2", "text": "again"}']}, {},
                           ['corpus.jsonl line 5 repeats _id "d2" of', "corpus.jsonl line 2", "its own _id"]),
    "queries repeat _id": ({"queries": QUERIES + ['{"_id": 7, "text": "again"}']}, {},
                           ['queries.jsonl line 6 repeats _id "7" of', "queries.jsonl line 3"]),
    "float _id": ({"corpus": _replaced(CORPUS, 2, '{"_id": 3.5, "text": "Fish swim."}')}, {},
                  ['corpus.jsonl line 3: field "_id" is a number (3.5)', "JSON string or an integer"]),
    "passage without text": ({"corpus": _replaced(CORPUS, 1, '{"_id": "d2", "title": " ", "text": ""}')}, {},
                             ['corpus.jsonl line 2: both "title" and "text" are empty']),
    "score not an integer": ({"qrels": _replaced(QRELS, 2, "q1\td2\thigh")}, {},
                             ['test.tsv line 3: score "high" is not an integer', "Fix the score"]),
    "fractional score": ({"qrels": _replaced(QRELS, 4, "7\td2\t0.5")}, {},
                         ['test.tsv line 5: score "0.5" is not an integer']),
    "qrels row with 2 columns": ({"qrels": _replaced(QRELS, 1, "q1\td1")}, {},
                                 ["test.tsv line 2 has 2 values", "header (line 1) names 3 columns"]),
    "qrels without header": ({"qrels": QRELS[1:]}, {},
                             ['test.tsv line 1 (the header) has no column "query-id"', "query-id<TAB>corpus-id"]),
    "unknown query id": ({"qrels": _replaced(QRELS, 2, "q9\td2\t1")}, {},
                         ['test.tsv line 3 names query id "q9"', "queries.jsonl does not hold",
                          "add that query to queries.jsonl or delete the line"]),
    "unknown corpus id": ({"qrels": _replaced(QRELS, 5, "q4\td9\t0")}, {},
                          ['test.tsv line 6 names corpus id "d9"', "corpus.jsonl does not hold",
                           "add that passage to corpus.jsonl"]),
    "conflicting grades": ({"qrels": QRELS + ["q1\td1\t1"]}, {},
                           ["test.tsv line 8 grades query \"q1\" and passage \"d1\" 1", "test.tsv line 2 grades",
                            "keep one line per pair"]),
    "no positive": ({"qrels": ["query-id\tcorpus-id\tscore", "q1\td1\t0", "7\t3\t0"]}, {},
                    ["test.tsv gives no query a positive score (its 2 rows all score 0 or less)", "--beir-split"]),
    "empty qrels": ({"qrels": ["query-id\tcorpus-id\tscore"]}, {}, ["test.tsv", "it holds no rows"]),
    "bad JSON in queries": ({"queries": _replaced(QUERIES, 3, '{"_id": "q4", "text": }')}, {},
                            ["queries.jsonl line 4 is not valid JSON", "Expecting value"]),
}


@pytest.mark.parametrize("case", list(BEIR_ERRORS))
def test_bad_beir_folder_is_explained(tmp_path, case):
    files, kwargs, expected = BEIR_ERRORS[case]
    folder = make_beir(tmp_path, **files)
    assert_mentions(message(load_beir, folder, **kwargs), folder, *expected)


def test_beir_missing_folder_and_files(tmp_path):
    assert_mentions(message(load_beir, str(tmp_path / "nope")), "BEIR folder", "nope does not exist")
    folder = make_beir(tmp_path)
    write_lines(os.path.join(folder, "qrels", "train.tsv"), QRELS)
    assert_mentions(message(load_beir, folder, "dev"), "no qrels/dev.tsv; qrels/ holds test.tsv, train.tsv",
                    "pass --beir-split with one of test, train")
    os.remove(os.path.join(folder, "queries.jsonl"))
    assert_mentions(message(load_beir, folder), folder, "has no queries.jsonl",
                    "corpus.jsonl, queries.jsonl and qrels/test.tsv")
    os.remove(os.path.join(folder, "corpus.jsonl"))
    assert_mentions(message(load_beir, folder), "has no corpus.jsonl")
    for name in os.listdir(os.path.join(folder, "qrels")):
        os.remove(os.path.join(folder, "qrels", name))
    write_lines(os.path.join(folder, "corpus.jsonl"), CORPUS)
    write_lines(os.path.join(folder, "queries.jsonl"), QUERIES)
    assert_mentions(message(load_beir, folder), "no qrels/test.tsv (qrels/ holds no .tsv files)")
