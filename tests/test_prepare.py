"""`retromae-ds prepare`: round trips for WordPiece / SentencePiece / large vocabularies, packing
invariants, every input format, the demo corpus, and a clear error for every bad input."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.corpora import lee_articles, write_jsonl
from retromae_ds.data import packing, prepare, workers
from retromae_ds.data.indexed import IndexedDataset
from retromae_ds.errors import UserError


def run_prepare(*argv: str) -> int:
    """The prepare subcommand as the CLI runs it (UserError propagates; the CLI turns it into exit 2)."""
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return prepare.main(parser.parse_args([*argv, "--no-progress"]))


def prepare_error(tmp_path, *argv: str) -> str:
    """Run prepare expecting a UserError; check that no output file was left; return the message."""
    with pytest.raises(UserError) as err:
        run_prepare(*argv)
    leftovers = [p.name for p in tmp_path.glob("out*")]
    assert not leftovers, leftovers
    return " ".join(str(err.value).split())


def token_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

def check_round_trip(prefix, tokenizer, documents, capacity):
    """The ids stored for each non-empty document are the tokenizer's ids of the same document text.

    "Same text" is the document string exactly as written in the input file. prepare tokenizes each
    document once and only decides where blocks are cut (at sentence starts, or inside a sentence
    that is longer than a block), so no sentence is tokenized on its own and the concatenated blocks
    must equal the tokenization of the whole document, for any tokenizer.
    """
    ds = IndexedDataset(prefix)
    kept = [d for d in documents if token_ids(tokenizer, d)]
    assert ds.num_documents == len(kept)
    assert ds.meta["dropped_empty_documents"] == len(documents) - len(kept)
    for k, text in enumerate(kept):
        first, last = ds.doc_index[k], ds.doc_index[k + 1]
        blocks = [ds[i].tolist() for i in range(first, last)]
        assert sum(blocks, []) == token_ids(tokenizer, text)
        assert ds.document(k).tolist() == token_ids(tokenizer, text)
        assert all(1 <= len(b) <= capacity for b in blocks)
    assert int(ds.sizes.sum()) == ds.num_tokens == ds.meta["num_tokens"]
    return ds


def test_round_trip_wordpiece(tmp_path, minilm_tokenizer, minilm_tokenizer_dir, sample_documents):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t, "id": i} for i, t in enumerate(sample_documents)])
    assert run_prepare("--input", corpus, "--tokenizer", minilm_tokenizer_dir, "--output", str(tmp_path / "out"),
                       "--max-seq-len", "18", "--num-proc", "1") == 0
    ds = check_round_trip(str(tmp_path / "out"), minilm_tokenizer, sample_documents, 16)
    assert ds.dtype == np.uint16 and ds.meta["max_seq_len"] == 18
    tok = ds.meta["tokenizer"]
    assert (tok["cls_token_id"], tok["sep_token_id"], tok["pad_token_id"], tok["mask_token_id"],
            tok["vocab_size"]) == (101, 102, 0, 103, 30522)
    assert ds.meta["sources"] == [{"path": os.path.abspath(corpus), "format": "jsonl", "records": 7}]
    # The first document's sentences fit 16 tokens per block and are never cut mid-sentence.
    first_blocks = [minilm_tokenizer.decode(ds[i]) for i in range(ds.doc_index[0], ds.doc_index[1])]
    assert first_blocks[0].startswith("the cat sat on the mat.")
    assert all(b.endswith((".", "!", "?")) for b in first_blocks)


def test_round_trip_sentencepiece(tmp_path, sentencepiece_tokenizer, sentencepiece_tokenizer_dir,
                                  sample_documents):
    documents = sample_documents + lee_articles(20)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in documents])
    run_prepare("--input", corpus, "--tokenizer", sentencepiece_tokenizer_dir, "--output", str(tmp_path / "out"),
                "--max-seq-len", "40", "--num-proc", "1")
    ds = check_round_trip(str(tmp_path / "out"), sentencepiece_tokenizer, documents, 38)
    assert ds.meta["tokenizer"]["class"] == "XLMRobertaTokenizer"
    assert ds.meta["tokenizer"]["mask_token_id"] == sentencepiece_tokenizer.mask_token_id


def test_long_documents_are_not_truncated(minilm_tokenizer):
    """MiniLM's tokenizer.json pads and truncates to 128 tokens; prepare must store every token."""
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 50)
    workers.init_worker(minilm_tokenizer, 126)
    ids, sizes, counts, empty = workers.tokenize_batch([long_text, ""])
    assert ids.tolist() == token_ids(minilm_tokenizer, long_text) and len(ids) == 500
    assert sizes.tolist() == [120, 120, 120, 120, 20] and counts.tolist() == [5] and empty == 1


def test_int32_for_a_vocabulary_beyond_uint16(tmp_path, big_vocab_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(big_vocab_tokenizer_dir)
    documents = ["w69999 w3 w65535. W70 w12345 w66000!", "w1 w2"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in documents])
    run_prepare("--input", corpus, "--tokenizer", big_vocab_tokenizer_dir, "--output", str(tmp_path / "out"))
    ds = check_round_trip(str(tmp_path / "out"), tokenizer, documents, 510)
    assert ds.dtype == np.int32 and ds.meta["dtype"] == "int32"
    assert ds.document(0).max() > 65_535


def test_several_processes_write_identical_files(tmp_path, minilm_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in lee_articles(120)])
    summaries = [prepare.prepare_files([corpus], minilm_tokenizer_dir, str(tmp_path / f"out{n}"), max_seq_len=64,
                                       num_proc=n, progress=False) for n in (1, 2)]
    assert summaries[1]["num_proc"] == 2
    assert (tmp_path / "out1.bin").read_bytes() == (tmp_path / "out2.bin").read_bytes()
    idx1, idx2 = (tmp_path / "out1.idx").read_bytes(), (tmp_path / "out2.idx").read_bytes()
    assert idx1[:40] == idx2[:40] and idx1[64:] == idx2[64:]  # all but the random build id


# ---------------------------------------------------------------------------------------------
# Sentences and packing
# ---------------------------------------------------------------------------------------------

def test_sentence_ends():
    text = "Hello world. The cat, e.g. a tabby, sat!  Really?\nNo stop here\n\n\"Quoted.\" Next one. 東京。大阪"
    ends = packing.sentence_end_chars(text)
    pieces = [text[a:b].strip() for a, b in zip([0] + ends, ends + [len(text)])]
    assert pieces == ["Hello world.", "The cat, e.g. a tabby, sat!", "Really?", "No stop here",
                      "\"Quoted.\"", "Next one.", "東京。", "大阪"]


def check_packing(num_tokens, starts, capacity, sizes):
    assert sum(sizes) == num_tokens and all(1 <= s <= capacity for s in sizes)
    bounds = np.cumsum(sizes)[:-1].tolist()
    sentence_bounds = sorted(set(starts) | {0, num_tokens})
    block_starts = [0] + bounds
    for i, b in enumerate(bounds):
        # A block ends at a sentence start, or is full because a sentence did not fit in one block.
        assert b in starts or sizes[i] == capacity
        if b in starts:
            # Greedy: the next sentence would have overflowed this block.
            next_end = min(x for x in sentence_bounds if x > b)
            assert next_end - block_starts[i] > capacity


def test_packing_invariants_on_random_documents():
    rng = random.Random(0)
    for _ in range(2000):
        capacity = rng.randint(1, 20)
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 12))]
        starts = np.cumsum(lengths)[:-1].tolist()
        sizes = packing.pack_blocks(sum(lengths), starts, capacity)
        check_packing(sum(lengths), starts, capacity, sizes)


def test_packing_examples():
    assert packing.pack_blocks(6, [3], 5) == [3, 3]
    assert packing.pack_blocks(6, [3], 6) == [6]
    assert packing.pack_blocks(17, [2, 4, 16], 5) == [4, 5, 5, 3]  # 12-token sentence split, tail shared
    assert packing.pack_blocks(3, [], 5) == [3]


def test_packing_of_a_prepared_corpus(tiny_dataset):
    ds = IndexedDataset(tiny_dataset)
    assert ds.meta["max_seq_len"] == 64 and ds.sizes.max() <= 62
    fill = ds.num_tokens / (len(ds) * 62)
    assert fill > 0.7  # sentences are packed, not one per block
    assert np.all(np.diff(ds.doc_index) >= 1)


# ---------------------------------------------------------------------------------------------
# Input formats
# ---------------------------------------------------------------------------------------------

FORMAT_DOCS = ["Alpha beta gamma. Delta epsilon.", "Second document here.", "Third, with a comma, and more."]


def write_format(folder, kind):
    import datasets
    import pandas as pd

    folder.mkdir()
    frame = pd.DataFrame({"body": FORMAT_DOCS, "n": [1, 2, 3]})
    if kind == "jsonl":
        write_jsonl(folder / "a.jsonl", [{"body": t} for t in FORMAT_DOCS[:2]])
        (folder / "sub").mkdir()  # folders are searched recursively
        write_jsonl(folder / "sub" / "b.jsonl", [{"body": FORMAT_DOCS[2]}])
    elif kind == "json":
        (folder / "a.json").write_text(json.dumps([{"body": t} for t in FORMAT_DOCS]))
    elif kind == "csv":
        frame.to_csv(folder / "a.csv", index=False)
    elif kind == "tsv":
        frame.to_csv(folder / "a.tsv", index=False, sep="\t")
    elif kind == "parquet":
        frame.to_parquet(folder / "a.parquet")
    elif kind == "txt":
        (folder / "a.txt").write_text("\n".join(FORMAT_DOCS) + "\n")
    elif kind == "saved":
        datasets.Dataset.from_pandas(frame).save_to_disk(str(folder / "saved"))  # found inside the folder
    elif kind == "saved_dict":
        ds = datasets.Dataset.from_pandas(frame)
        datasets.DatasetDict({"train": ds.select([0, 1]), "extra": ds.select([2])}).save_to_disk(str(folder / "dd"))
        return str(folder / "dd")
    return str(folder)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet", "txt", "saved", "saved_dict"])
def test_every_input_format(tmp_path, kind, minilm_tokenizer, minilm_tokenizer_dir):
    path = write_format(tmp_path / "data", kind)
    run_prepare("--input", path, "--tokenizer", minilm_tokenizer_dir, "--output", str(tmp_path / "out"),
                "--text-field", "body", "--max-seq-len", "64")
    ds = IndexedDataset(str(tmp_path / "out"))
    stored = sorted(ds.document(k).tolist() for k in range(ds.num_documents))
    assert stored == sorted(token_ids(minilm_tokenizer, t) for t in FORMAT_DOCS)
    assert sum(s["records"] for s in ds.meta["sources"]) == 3


def test_txt_paragraphs_and_max_documents(tmp_path, minilm_tokenizer_dir):
    (tmp_path / "a.txt").write_text("Para one line one.\nPara one line two.\n\nPara two.\n\nPara three.\n")
    run_prepare("--input", str(tmp_path / "a.txt"), "--tokenizer", minilm_tokenizer_dir,
                "--output", str(tmp_path / "out"), "--txt-sample-by", "paragraph")
    assert IndexedDataset(str(tmp_path / "out")).num_documents == 3
    run_prepare("--input", str(tmp_path / "a.txt"), "--tokenizer", minilm_tokenizer_dir,
                "--output", str(tmp_path / "out2"), "--txt-sample-by", "paragraph", "--max-documents", "2")
    assert IndexedDataset(str(tmp_path / "out2")).num_documents == 2


def test_demo_corpus(tmp_path):
    prefix = str(tmp_path / "demo")
    assert prepare.prepare_demo(prefix, max_seq_len=128, num_proc=1, progress=False) == prefix
    ds = IndexedDataset(prefix)
    assert ds.meta["demo"] is True and ds.dtype == np.uint16
    assert ds.num_documents >= 400 and ds.meta["sources"][0]["records"] == 107
    assert ds.meta["sources"][1]["records"] == 300
    assert ds.num_tokens > 600_000 and ds.sizes.max() <= 126
    assert ds.meta["tokenizer"]["cls_token_id"] == 101 and ds.meta["tokenizer"]["vocab_size"] == 30522
    mtime = os.path.getmtime(prefix + ".idx")
    assert prepare.prepare_demo(prefix, max_seq_len=128) == prefix  # reused, not rebuilt
    assert os.path.getmtime(prefix + ".idx") == mtime
    with pytest.raises(UserError, match="max_seq_len 64"):
        prepare.prepare_demo(prefix, max_seq_len=64)


def test_demo_from_the_command_line_prints_a_summary(tmp_path, capsys):
    assert run_prepare("--demo", "--output", str(tmp_path / "d"), "--max-documents", "30") == 0
    out = capsys.readouterr().out
    assert "30 documents" in out and "fill ratio" in out and "tokens/s" in out
    assert IndexedDataset(str(tmp_path / "d")).meta["max_seq_len"] == 128


def test_overwrite(tmp_path, minilm_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "One. Two."}])
    run_prepare("--input", corpus, "--tokenizer", minilm_tokenizer_dir, "--output", str(tmp_path / "out"))
    write_jsonl(corpus, [{"text": "One. Two."}, {"text": "Three."}])
    with pytest.raises(UserError, match="--overwrite"):
        run_prepare("--input", corpus, "--tokenizer", minilm_tokenizer_dir, "--output", str(tmp_path / "out"))
    assert IndexedDataset(str(tmp_path / "out")).num_documents == 1  # untouched
    run_prepare("--input", corpus, "--tokenizer", minilm_tokenizer_dir, "--output", str(tmp_path / "out"),
                "--overwrite")
    assert IndexedDataset(str(tmp_path / "out")).num_documents == 2
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.bin", "out.idx", "out.json"]


def test_a_failure_midway_leaves_no_dataset(tmp_path, minilm_tokenizer):
    class Failing:
        sources, skipped_bad_records = [], 0

        def batches(self):
            for _ in range(5):
                yield lee_articles(40)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_corpus(Failing(), minilm_tokenizer, str(tmp_path / "out"), 64, 2, {}, progress=False)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each, nothing left behind
# ---------------------------------------------------------------------------------------------

def test_missing_input_path(tmp_path, minilm_tokenizer_dir):
    message = prepare_error(tmp_path, "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    assert "nope.jsonl does not exist" in message


def test_empty_inputs(tmp_path, minilm_tokenizer_dir):
    (tmp_path / "empty_dir").mkdir()
    message = prepare_error(tmp_path, "--input", str(tmp_path / "empty_dir"), "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    assert "empty_dir" in message and "input is empty" in message
    (tmp_path / "zero.jsonl").write_text("")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    message = prepare_error(tmp_path, "--input", str(tmp_path / "zero.jsonl"), blank, "--tokenizer",
                            minilm_tokenizer_dir, "--output", str(tmp_path / "out"))
    assert "empty input" in message and "blank.jsonl" in message and "2 empty documents" in message


def test_unsupported_file_type(tmp_path, minilm_tokenizer_dir):
    (tmp_path / "a.docx").write_text("x")
    message = prepare_error(tmp_path, "--input", str(tmp_path / "a.docx"), "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    assert "a.docx" in message and "unsupported file type" in message


def test_missing_text_field(tmp_path, minilm_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"body": "x", "title": "y"}])
    message = prepare_error(tmp_path, "--input", corpus, "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    assert "c.jsonl" in message and "no field 'text'" in message and "body, title" in message
    assert "--text-field" in message


def test_null_text_stops_or_is_skipped(tmp_path, minilm_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "Good one."}, "", {"text": None}, {"text": "Fine."},
                                                {"other": "no text"}])
    message = prepare_error(tmp_path, "--input", corpus, "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    assert "c.jsonl line 3" in message and "missing or null" in message and "--on-bad-record skip" in message
    run_prepare("--input", corpus, "--tokenizer", minilm_tokenizer_dir, "--output", str(tmp_path / "out"),
                "--on-bad-record", "skip")
    ds = IndexedDataset(str(tmp_path / "out"))
    assert ds.num_documents == 2 and ds.meta["skipped_bad_records"] == 2


def test_non_string_text_in_csv_names_the_row(tmp_path, minilm_tokenizer_dir):
    (tmp_path / "a.csv").write_text("text,n\nhello there,1\n,2\n")
    message = prepare_error(tmp_path, "--input", str(tmp_path / "a.csv"), "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    assert "a.csv data row 2" in message


def test_malformed_json_lines(tmp_path, minilm_tokenizer_dir):
    lines = [json.dumps({"text": f"Document {i}."}) for i in range(5)]
    lines[3] = '{"text": "broken'
    corpus = write_jsonl(tmp_path / "c.jsonl", lines)
    message = prepare_error(tmp_path, "--input", corpus, "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    assert "c.jsonl line 4" in message and "malformed JSON" in message and "--on-bad-record skip" in message
    run_prepare("--input", corpus, "--tokenizer", minilm_tokenizer_dir, "--output", str(tmp_path / "out"),
                "--on-bad-record", "skip")
    ds = IndexedDataset(str(tmp_path / "out"))
    assert ds.num_documents == 4 and ds.meta["skipped_bad_records"] == 1


def test_malformed_json_array(tmp_path, minilm_tokenizer_dir):
    (tmp_path / "a.json").write_text('[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]\n')
    message = prepare_error(tmp_path, "--input", str(tmp_path / "a.json"), "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    assert "a.json line 4" in message and "malformed JSON" in message


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_undecodable_bytes(tmp_path, minilm_tokenizer_dir, kind):
    good = [b"First document.", b"Second document."]
    bad = "Caf\xe9 au lait.".encode("latin-1")
    if kind == "jsonl":
        good = [json.dumps({"text": g.decode()}).encode() for g in good]
        bad = b'{"text": "' + bad + b'"}'
    path = tmp_path / f"c.{kind}"
    path.write_bytes(good[0] + b"\n" + bad + b"\n" + good[1] + b"\n")
    message = prepare_error(tmp_path, "--input", str(path), "--tokenizer", minilm_tokenizer_dir,
                            "--output", str(tmp_path / "out"))
    offset = len(good[0]) + 1 + bad.index(b"\xe9")
    assert f"c.{kind} line 2 (byte offset {offset})" in message and "not UTF-8" in message
    assert "iconv" in message
    run_prepare("--input", str(path), "--tokenizer", minilm_tokenizer_dir, "--output", str(tmp_path / "out"),
                "--on-bad-record", "skip")
    ds = IndexedDataset(str(tmp_path / "out"))
    assert ds.num_documents == 2 and ds.meta["skipped_bad_records"] == 1


def test_tokenizer_paths_that_are_not_tokenizers(tmp_path, minilm_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{ not json")
    cases = {
        str(tmp_path / "empty"): "is not a tokenizer folder",
        str(tmp_path / "config_only"): "is not a tokenizer folder",
        str(tmp_path / "broken"): "did not load as a tokenizer",
        corpus: "is a file, not a tokenizer folder",
        str(tmp_path / "missing"): "did not load as a tokenizer",
    }
    for path, expected in cases.items():
        message = prepare_error(tmp_path, "--input", corpus, "--tokenizer", path, "--output", str(tmp_path / "out"))
        assert path in message and expected in message and "save_pretrained" in message, message


def test_max_seq_len_beyond_the_model_positions(tmp_path, minilm_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    message = prepare_error(tmp_path, "--input", corpus, "--tokenizer", minilm_tokenizer_dir, "--output",
                            str(tmp_path / "out"), "--max-seq-len", "1024")
    assert "--max-seq-len 1024" in message and "512 positions" in message and "--max-seq-len 512 or less" in message
    message = prepare_error(tmp_path, "--input", corpus, "--tokenizer", minilm_tokenizer_dir, "--output",
                            str(tmp_path / "out"), "--max-seq-len", "2")
    assert "at least 3" in message


def test_flag_combinations(tmp_path, minilm_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    assert "--input" in prepare_error(tmp_path, "--demo", "--input", corpus, "--output", str(tmp_path / "out"))
    assert "needs --tokenizer" in prepare_error(tmp_path, "--input", corpus, "--output", str(tmp_path / "out"))
    assert "is a folder" in prepare_error(tmp_path, "--input", corpus, "--tokenizer", minilm_tokenizer_dir,
                                          "--output", str(tmp_path))


def test_cli_exit_code_and_no_traceback(tmp_path):
    try:
        from retromae_ds import cli
        cli.build_parser()
    except ImportError as err:  # other subcommands are written in parallel
        pytest.skip(f"the full CLI does not import yet: {err}")
    result = subprocess.run([sys.executable, "-m", "retromae_ds.cli", "prepare", "--input",
                             str(tmp_path / "missing.jsonl"), "--tokenizer", str(tmp_path), "--output",
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing.jsonl does not exist" in result.stderr and "Traceback" not in result.stderr
