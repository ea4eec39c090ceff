"""`retromae-ds tokenizer`: a vocabulary trained on the Lee news text, for each algorithm, must load with
AutoTokenizer, round-trip text, carry the special tokens, give the whole-word masker the words its own
pre-tokenizer sees, and be accepted by prepare and by a model config; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch

from retromae_ds import cli
from retromae_ds.data.masking import (BYTE_LEVEL_BPE, MAX_WORD_TOKENS, SENTENCEPIECE, WORDPIECE, MaskGenerator,
                                      collate_blocks, continuation_table, mask_rng, tokenizer_family,
                                      word_break_table)
from tests.helpers.corpora import lee_articles, write_jsonl
from tests.helpers.masking_data import device_word_lengths

ALGORITHMS = ("wordpiece", "bpe", "unigram")
FAMILY = {"wordpiece": WORDPIECE, "bpe": BYTE_LEVEL_BPE, "unigram": SENTENCEPIECE}
SPECIALS = {"wordpiece": ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"),
            "bpe": ("<s>", "</s>", "<pad>", "<mask>", "<unk>"),
            "unigram": ("<s>", "</s>", "<pad>", "<mask>", "<unk>")}
VOCAB = 2000
# Line breaks, a tab, runs of spaces, punctuation inside and between words; only characters of the Lee text,
# so that no family needs an unknown token.
CRAFTED = ("The Prime Minister, John Howard, said:\n\"It's a 3.5 per cent rise.\"  Mr Howard's  "
           "government\twould (he said) act -- today.\n\nAustralian-based firms weren't told.")


def run_cli(*argv: str) -> int:
    return cli.main(["tokenizer", "--no-progress", *argv])


@pytest.fixture(scope="module")
def lee_jsonl(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("lee") / "lee.jsonl", [{"text": t} for t in lee_articles()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lee_jsonl) -> dict[str, str]:
    """Each algorithm trained on the 300 Lee articles with a 2,000-entry vocabulary: {algorithm: folder}."""
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for algorithm in ALGORITHMS:
        folders[algorithm] = str(root / algorithm)
        assert run_cli("--input", lee_jsonl, "--algorithm", algorithm, "--vocab-size", str(VOCAB),
                       "--output", folders[algorithm]) == 0
    return folders


def load(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def sample_texts() -> list[str]:
    return [CRAFTED] + [article[:600] for article in lee_articles(12)]


# --------------------------------------------------------------------------------------------------
# the folder


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_folder_loads_with_its_special_tokens(trained, algorithm):
    tok = load(trained[algorithm])
    assert tok.is_fast and len(tok) == VOCAB and tok.model_max_length == 512
    cls, sep, pad, mask, unk = SPECIALS[algorithm]
    ids = {name: getattr(tok, f"{name}_token_id") for name in ("cls", "sep", "pad", "mask", "unk")}
    assert dict(zip(ids, tok.convert_ids_to_tokens(list(ids.values())))) == {
        "cls": cls, "sep": sep, "pad": pad, "mask": mask, "unk": unk}
    assert len(set(ids.values())) == 5 and max(ids.values()) < 5           # the specials come first
    single = tok("the government said")["input_ids"]
    assert single[0] == ids["cls"] and single[-1] == ids["sep"] and ids["sep"] not in single[1:-1]
    pair = tok("the government", "said")["input_ids"]
    assert pair[0] == ids["cls"] and pair[-1] == ids["sep"] and pair.count(ids["sep"]) >= 2
    record = json.loads(open(os.path.join(trained[algorithm], "tokenizer_training.json")).read())
    assert record["algorithm"] == algorithm and record["documents"] == 300 and record["vocab_size"] == VOCAB


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_text_round_trips(trained, algorithm):
    tok = load(trained[algorithm])
    normalize = tok.backend_tokenizer.normalizer.normalize_str
    for text in sample_texts():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        back = tok.decode(ids)
        if algorithm == "bpe":       # bytes: exact
            assert back == text
        elif algorithm == "unigram":  # whitespace runs become one space
            assert back == " ".join(text.split())
        else:                         # lower-cased, accents stripped; decoding re-spaces punctuation
            assert back.split() != text.split()  # (it did lower-case)
            assert "".join(back.split()) == "".join(normalize(text).split())
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == back


def test_lowercase_defaults_and_flags(tmp_path, lee_jsonl):
    """wordpiece lower-cases unless --no-lowercase; bpe keeps case unless --lowercase."""
    for algorithm, flag, lowered in (("wordpiece", None, True), ("wordpiece", "--no-lowercase", False),
                                     ("bpe", None, False), ("bpe", "--lowercase", True)):
        out = tmp_path / f"{algorithm}{flag}"
        assert run_cli("--input", lee_jsonl, "--algorithm", algorithm, "--vocab-size", "600", "--output", str(out),
                       *([flag] if flag else [])) == 0
        tok = load(str(out))
        back = tok.decode(tok("The Prime Minister", add_special_tokens=False)["input_ids"])
        assert back == ("the prime minister" if lowered else "The Prime Minister"), (algorithm, flag)


def test_sample_limits(tmp_path, lee_jsonl, capsys):
    assert run_cli("--input", lee_jsonl, "--vocab-size", "500", "--max-documents", "40",
                   "--output", str(tmp_path / "docs")) == 0
    record = json.loads((tmp_path / "docs" / "tokenizer_training.json").read_text())
    assert record["documents"] == 40 and record["characters"] == sum(map(len, lee_articles(40)))
    assert run_cli("--input", lee_jsonl, "--vocab-size", "500", "--max-chars", "5000",
                   "--output", str(tmp_path / "chars")) == 0
    record = json.loads((tmp_path / "chars" / "tokenizer_training.json").read_text())
    assert record["characters"] == 5000
    summary = capsys.readouterr().out
    assert "5,000 characters" in summary and "chars/s" in summary and "pad_token_id 0" in summary


# --------------------------------------------------------------------------------------------------
# whole-word masking


# Byte-level BPE sometimes writes a word as a lone "Ġ" piece followed by pieces without one (" illegal" ->
# "Ġ" "il" "le" ...: no "Ġi"/"Ġil" merge ranks first). The GPT-2 regex attaches one space to the run after
# it, so that space belongs to the word that follows (0.3% of the Lee words with this 2,000-piece vocabulary).


def words_by_the_tokenizer(tok, algorithm: str, text: str) -> list[bool]:
    """Independent word starts: WordPiece and unigram from their pre-tokenizer's word ids (BERT splits off
    punctuation, Metaspace splits at spaces); byte-level BPE from the text (whitespace before a token,
    or a whitespace token before it), since its pre-tokenizer also splits off punctuation inside a word."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if algorithm != "bpe":
        word_ids = enc.word_ids()
        return [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(len(word_ids))]
    offsets = enc["offset_mapping"]
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    starts = [True]
    for i, ((prev_start, prev_end), (start, end)) in enumerate(zip(offsets, offsets[1:]), 1):
        lone_space = pieces[i - 1] == "\u0120"  # its space is the next piece's word's
        before = ("" if lone_space else text[prev_start:prev_end][-1:]) + text[prev_end:start]
        starts.append(any(c.isspace() for c in before) or start == end or text[start].isspace())
    return starts


def capped_word_lengths(starts: list[bool]) -> list[int]:
    """Word lengths, with words longer than MAX_WORD_TOKENS cut like the masker cuts them."""
    lengths = []
    for start in starts:
        if start or lengths[-1] == MAX_WORD_TOKENS:
            lengths.append(0)
        lengths[-1] += 1
    return lengths


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_whole_word_masks_follow_the_tokenizer_words(trained, algorithm):
    tok = load(trained[algorithm])
    assert tokenizer_family(tok) == FAMILY[algorithm]
    gen = MaskGenerator(continuation_table(tok), tok.cls_token_id, tok.sep_token_id, tok.pad_token_id,
                        tok.mask_token_id, len(tok), tok.all_special_ids, word_breaks=word_break_table(tok))
    texts = sample_texts()
    blocks = [np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    expected = [capped_word_lengths(words_by_the_tokenizer(tok, algorithm, t)) for t in texts]
    assert any(length > 1 for lengths in expected for length in lengths)   # words of several pieces exist
    tokens, lengths = collate_blocks(blocks, tok.pad_token_id)
    found = device_word_lengths(gen, tokens, lengths)
    for row, want in zip(found.tolist(), expected):
        assert row[:len(want)] == want and not any(row[len(want):])
    out = gen(tokens, lengths, mask_rng(0, 1, 0, "cpu"))
    for b, want in enumerate(expected):
        masked = (out["encoder_labels"][b, 1:int(lengths[b]) + 1] != -100).tolist()
        at = 0
        for length in want:                                          # each word masked whole or not at all
            assert len(set(masked[at:at + length])) == 1
            at += length
        assert 0 < sum(masked) < len(masked)


# --------------------------------------------------------------------------------------------------
# what comes next: prepare and a model config


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_prepare_accepts_the_folder(trained, algorithm, tmp_path):
    from retromae_ds.data.indexed import IndexedDataset
    from retromae_ds.data.prepare import prepare_files

    docs = lee_articles(6)
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in docs])
    summary = prepare_files([data], trained[algorithm], str(tmp_path / "corpus"), max_seq_len=128, num_proc=1,
                            progress=False)
    assert summary["num_documents"] == 6
    dataset = IndexedDataset(str(tmp_path / "corpus"))
    tok = load(trained[algorithm])
    assert dataset.meta["tokenizer"]["vocab_size"] == VOCAB
    assert dataset.meta["tokenizer"]["mask_token_id"] == tok.mask_token_id
    for k, text in enumerate(docs):
        assert dataset.document(k).tolist() == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_model_config_for_it_runs_a_retromae_step(trained, algorithm, tmp_path):
    """A BERT config with vocab_size = len(tokenizer) and its pad id, loaded as --model-config loads it."""
    from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig

    from retromae_ds.model.retromae import RetroMAEForPretraining

    tok = load(trained[algorithm])
    BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=tok.model_max_length,
               pad_token_id=tok.pad_token_id).save_pretrained(str(tmp_path / "config"))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(tmp_path / "config"))
    model = RetroMAEForPretraining(AutoModelForMaskedLM.from_config(config))
    gen = MaskGenerator(continuation_table(tok), tok.cls_token_id, tok.sep_token_id, tok.pad_token_id,
                        tok.mask_token_id, len(tok), tok.all_special_ids, word_breaks=word_break_table(tok))
    blocks = [np.array(tok(t, add_special_tokens=False)["input_ids"][:62]) for t in lee_articles(4)]
    tokens, lengths = collate_blocks(blocks, tok.pad_token_id)
    out = model(**gen(tokens, lengths, mask_rng(0, 1, 0, "cpu")))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert model.lm.get_input_embeddings().weight.grad[tok.cls_token_id].abs().sum() > 0  # [CLS] is no padding


# --------------------------------------------------------------------------------------------------
# bad input: exit 2, one paragraph naming the flag or file, and no folder


def refused(capsys, parent, *argv: str) -> str:
    """Run the command, expect exit 2 and nothing new (no temporary folder either) in ``parent``."""
    before = set(os.listdir(parent))
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("retromae-ds tokenizer: error: ") and err.count("\n") == 1, err
    assert set(os.listdir(parent)) == before
    return err


def test_empty_corpus(tmp_path, capsys):
    data = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  \n"}])
    err = refused(capsys, tmp_path, "--input", data, "--output", str(tmp_path / "tok"))
    assert "empty input" in err and "empty.jsonl" in err and "--text-field" in err


@pytest.mark.parametrize("algorithm, size", [("wordpiece", "60"), ("unigram", "60"), ("unigram", "83"), ("bpe", "200")])
def test_vocab_smaller_than_the_alphabet(tmp_path, capsys, lee_jsonl, algorithm, size):
    """Refused before reading (bpe: 256 bytes + 5), when the trainer fails (unigram 60), or when it silently
    made a larger vocabulary than asked (wordpiece 60: 94 entries; unigram 83: 104)."""
    err = refused(capsys, tmp_path, "--input", lee_jsonl, "--algorithm", algorithm, "--vocab-size", size,
                  "--output", str(tmp_path / "tok"))
    assert f"--vocab-size {size}" in err and "at least" in err
    minimum = int(err.split("at least ")[1].split()[0].replace(",", ""))
    if size != "60" or algorithm == "wordpiece":  # the minimum it names is enough (bpe: exact before reading)
        assert run_cli("--input", lee_jsonl, "--algorithm", algorithm, "--vocab-size", str(minimum),
                       "--output", str(tmp_path / "tok")) == 0
        assert len(load(str(tmp_path / "tok"))) <= minimum
    if algorithm == "bpe":
        assert minimum == 261


def test_unreadable_input(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\u00e9 society\n".encode("latin-1"))
    err = refused(capsys, tmp_path, "--input", str(bad), "--output", str(tmp_path / "tok"))
    assert "latin1.txt line 1" in err and "UTF-8" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    err = refused(capsys, tmp_path, "--input", str(broken), "--output", str(tmp_path / "tok"))
    assert "broken.jsonl line 2" in err and "--on-bad-record skip" in err
    err = refused(capsys, tmp_path, "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "tok"))
    assert "missing.jsonl does not exist" in err


def test_input_without_read_permission(tmp_path, capsys, lee_jsonl, monkeypatch):
    """(The tests may run as root, who reads everything: the refusal to open is simulated.)"""
    import retromae_ds.data.train_tokenizer as command

    def no_permission(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(command, "open", no_permission, raising=False)
    err = refused(capsys, tmp_path, "--input", lee_jsonl, "--output", str(tmp_path / "tok"))
    assert f"cannot read {lee_jsonl}: Permission denied" in err and "chmod" in err


def test_existing_output(tmp_path, capsys, lee_jsonl, trained):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused(capsys, out, "--input", lee_jsonl, "--vocab-size", "500", "--output", str(out))
    assert "already holds files (notes.txt)" in err and "--overwrite" in err
    err = refused(capsys, out, "--input", lee_jsonl, "--vocab-size", "500", "--output", str(out), "--overwrite")
    assert "more than a tokenizer" in err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert run_cli("--input", lee_jsonl, "--vocab-size", "500", "--output", str(out)) == 0   # empty: fine
    assert len(load(str(out))) == 500
    err = refused(capsys, out, "--input", lee_jsonl, "--vocab-size", "600", "--output", str(out))  # a tokenizer too
    assert "already holds files (tokenizer.json" in err and len(load(str(out))) == 500
    assert run_cli("--input", lee_jsonl, "--vocab-size", "600", "--output", str(out), "--overwrite") == 0
    assert len(load(str(out))) == 600 and sorted(os.listdir(tmp_path)) == ["tok"]


def test_failed_write_leaves_the_old_folder(tmp_path, capsys, lee_jsonl, monkeypatch):
    import errno

    from transformers import PreTrainedTokenizerFast

    out = tmp_path / "tok"
    assert run_cli("--input", lee_jsonl, "--vocab-size", "500", "--output", str(out)) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def disk_full(self, folder, *args, **kwargs):
        (open(os.path.join(folder, "tokenizer.json"), "w")).write("{")   # half written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    err = refused(capsys, tmp_path, "--input", lee_jsonl, "--vocab-size", "600", "--output", str(out), "--overwrite")
    assert "No space left" in err and str(out) in err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    err = refused(capsys, tmp_path, "--input", lee_jsonl, "--vocab-size", "600", "--output", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_flag_mistakes(tmp_path, capsys, lee_jsonl):
    err = refused(capsys, tmp_path, "--input", lee_jsonl, "--algorithm", "unigram", "--min-frequency", "3",
                  "--output", str(tmp_path / "tok"))
    assert "--min-frequency" in err
    err = refused(capsys, tmp_path, "--output", str(tmp_path / "tok"))
    assert "--input" in err
    err = refused(capsys, tmp_path, "--input", lee_jsonl, "--max-chars", "0", "--output", str(tmp_path / "tok"))
    assert "--max-chars 0" in err
    with pytest.MonkeyPatch.context() as patch:  # an unwritable place is refused before reading (root writes anywhere)
        patch.setattr(os, "access", lambda path, mode: False)
        err = refused(capsys, tmp_path, "--input", lee_jsonl, "--output", str(tmp_path / "new" / "tok"))
    assert f"cannot write in {tmp_path}" in err


def test_help_imports_nothing_heavy():
    code = ("import sys, retromae_ds.data.train_tokenizer; "
            "print(sorted({'torch', 'tokenizers', 'transformers', 'datasets', 'tqdm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert "tokenizer" in cli.COMMANDS


def test_wordpiece_ids_are_the_same_run_to_run(tmp_path, lee_jsonl, trained, monkeypatch):
    """Two trainings on the same text give the same ids (the trainer alone numbered ~500 of 8,000 differently),
    special tokens keep the family's ids, and renumbering changes no segmentation."""
    from retromae_ds.data import train_tokenizer

    again, raw = tmp_path / "again", tmp_path / "raw"
    assert run_cli("--input", lee_jsonl, "--algorithm", "wordpiece", "--vocab-size", str(VOCAB),
                   "--output", str(again)) == 0
    first = json.loads((Path(trained["wordpiece"]) / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((again / "tokenizer.json").read_text())["model"]["vocab"] == first
    specials = train_tokenizer.FAMILIES["wordpiece"].specials
    assert [first[t] for t in specials] == list(range(len(specials)))
    assert [first[t] for t in sorted(set(first) - set(specials))] == list(range(len(specials), len(first)))

    monkeypatch.setattr(train_tokenizer, "canonical_wordpiece_ids", lambda backend: backend)  # the trainer's ids
    assert run_cli("--input", lee_jsonl, "--algorithm", "wordpiece", "--vocab-size", str(VOCAB),
                   "--output", str(raw)) == 0
    ours, theirs = load(trained["wordpiece"]), load(str(raw))
    for text in sample_texts():
        assert ours.tokenize(text) == theirs.tokenize(text)
