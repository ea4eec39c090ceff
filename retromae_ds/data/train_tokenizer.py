"""Train a vocabulary on your own corpus and write a fast Hugging Face tokenizer folder.

  retromae-ds tokenizer --input corpus.jsonl more/ --algorithm wordpiece --vocab-size 32000 --output tok/
  retromae-ds prepare --input corpus.jsonl more/ --tokenizer tok/ --output data/corpus

Why: a model pre-trained from random initialisation (--model-config) is not tied to a borrowed
vocabulary. One trained on the corpus itself (a domain, a language, source code) cuts its words into
fewer pieces, so a block holds more text and whole-word masking masks whole terms. The inputs and
their flags are prepare's (files, folders, datasets.save_to_disk folders); they are streamed, so only
the word counts are kept in memory. --max-documents / --max-chars train on a sample of a huge corpus.

Algorithms (each with the [CLS]/[SEP]/[PAD]/[MASK]/[UNK] equivalents RetroMAE needs):
  wordpiece  BERT: lower-cased and accents stripped by default, punctuation split off, "##" marks a
             piece that continues a word; [PAD]=0 [UNK] [CLS] [SEP] [MASK].
  bpe        RoBERTa / GPT-2 byte-level BPE: any text, never an unknown token, "Ġ" marks a piece that
             follows a space; <s>=0 (cls) <pad> </s> (sep) <unk> <mask>.
  unigram    SentencePiece-style unigram language model: whitespace becomes single spaces, "▁" marks a
             word start; <s>=0 (cls) <pad> </s> (sep) <unk> <mask> (XLM-R's ids).

The folder loads with AutoTokenizer.from_pretrained, puts [CLS] ... [SEP] (or <s> ... </s>) around a
text, and is what `prepare --tokenizer` and a `--model-config` run's `--tokenizer` take; that config needs
vocab_size >= the size printed at the end and pad_token_id = the tokenizer's pad id (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

from retromae_ds.data.readers import DemoReader, FileReader, add_reading_arguments, discover_sources
from retromae_ds.errors import UserError
from retromae_ds.hf_compat import save_tokenizer

ALGORITHMS = ("wordpiece", "bpe", "unigram")
DEFAULT_VOCAB_SIZE = 32_000
DEFAULT_MIN_FREQUENCY = 2
BYTE_ALPHABET = 256
TRAINING_FILE = "tokenizer_training.json"  # how the folder was made (settings, inputs, counts)
# Files a tokenizer folder may hold; --overwrite replaces a folder only when it holds nothing else.
REPLACEABLE_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                     "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja", TRAINING_FILE}


@dataclass(frozen=True)
class Family:
    """The special tokens of one algorithm, in id order, and which of them plays which role."""

    specials: tuple[str, ...]
    cls: str
    sep: str
    pad: str
    mask: str
    unk: str
    lowercase: bool  # the default of --lowercase
    uses_bos_eos: bool  # RoBERTa / XLM-R also name <s> and </s> bos and eos


FAMILIES = {
    "wordpiece": Family(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]",
                        lowercase=True, uses_bos_eos=False),
    "bpe": Family(("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s>", "</s>", "<pad>", "<mask>", "<unk>",
                  lowercase=False, uses_bos_eos=True),
    "unigram": Family(("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s>", "</s>", "<pad>", "<mask>", "<unk>",
                      lowercase=False, uses_bos_eos=True),
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="files, folders of files, or datasets.save_to_disk folders (as for prepare)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="the tokenizer folder to write (tokenizer.json, tokenizer_config.json, "
                             f"{TRAINING_FILE})")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="wordpiece",
                        help="wordpiece (BERT, default), bpe (byte-level, RoBERTa) or unigram (SentencePiece-style)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"entries in the vocabulary, special tokens included (default {DEFAULT_VOCAB_SIZE:,})")
    parser.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                        help="lower-case text before training and at use (wordpiece also strips accents); "
                             "default: on for wordpiece, off for bpe and unigram")
    parser.add_argument("--min-frequency", type=int, default=None, metavar="N",
                        help=f"wordpiece/bpe: merge only pairs seen at least N times (default "
                             f"{DEFAULT_MIN_FREQUENCY}); unigram has no such setting")
    parser.add_argument("--model-max-length", type=int, default=512, metavar="N",
                        help="the model's positions, saved as model_max_length (default 512)")
    add_reading_arguments(parser)
    parser.add_argument("--max-documents", type=int, default=None, metavar="N",
                        help="train on the first N input records only (a sample of a huge corpus)")
    parser.add_argument("--max-chars", type=int, default=None, metavar="N",
                        help="train on the first N characters only (the document that crosses N is cut)")
    parser.add_argument("--demo", action="store_true",
                        help="train on the demo corpus (gensim's Wikipedia sample + Lee news) instead of --input")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer folder at --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    settings = check_settings(args)
    output = os.path.abspath(args.output)
    check_output(output, args.overwrite)
    if args.demo:
        if args.input:
            raise UserError("--demo trains on the demo corpus; drop --input, or drop --demo to train on your files.")
        reader = DemoReader()
    else:
        if not args.input:
            raise UserError("tokenizer needs --input (or --demo for the demo corpus), e.g. `retromae-ds tokenizer "
                            "--input corpus.jsonl --output tokenizer/`.")
        reader = FileReader(find_sources(args.input), args.text_field, args.on_bad_record, args.txt_sample_by)
    result = train(reader, settings, max_documents=args.max_documents, max_chars=args.max_chars,
                   progress=not args.no_progress)
    write_folder(result, output, args.overwrite)
    print(format_summary(result, output))
    return 0


@dataclass(frozen=True)
class Settings:
    algorithm: str
    vocab_size: int
    lowercase: bool
    min_frequency: int | None  # None for unigram
    model_max_length: int


def check_settings(args) -> Settings:
    """The flags, validated before any input is read (a mistake costs no reading)."""
    family = FAMILIES[args.algorithm]
    for flag, value in (("--max-documents", args.max_documents), ("--max-chars", args.max_chars),
                        ("--model-max-length", args.model_max_length)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give a positive number.")
    if args.algorithm == "unigram" and args.min_frequency is not None:
        raise UserError("--min-frequency does not apply to --algorithm unigram, which keeps the pieces that best "
                        "explain the corpus whatever their count; drop --min-frequency (or use wordpiece or bpe).")
    if args.min_frequency is not None and args.min_frequency < 1:
        raise UserError(f"--min-frequency {args.min_frequency}: give 1 or more.")
    smallest = len(family.specials) + (BYTE_ALPHABET if args.algorithm == "bpe" else 1)
    if args.vocab_size < smallest:
        what = ("the 256 bytes of the byte-level alphabet plus the 5 special tokens" if args.algorithm == "bpe"
                else "the 5 special tokens plus the characters of the corpus")
        raise UserError(f"--vocab-size {args.vocab_size} cannot hold {what}; pass --vocab-size of at least "
                        f"{smallest} (typical sizes: 8,000-64,000).")
    min_frequency = None if args.algorithm == "unigram" else (args.min_frequency or DEFAULT_MIN_FREQUENCY)
    lowercase = family.lowercase if args.lowercase is None else args.lowercase
    return Settings(args.algorithm, args.vocab_size, lowercase, min_frequency, args.model_max_length)


def find_sources(inputs: list[str]):
    """prepare's input discovery, plus a read check: a file we may not open stops here, by name."""
    try:
        sources = discover_sources(inputs)
        for source in sources:
            if source.kind != "saved":
                with open(source.path, "rb"):
                    pass
    except OSError as err:
        raise UserError(f"--input: cannot read {err.filename}: {err.strerror}. Make it readable (chmod +r) or "
                        f"leave it out of --input.") from None
    return sources


def check_output(output: str, overwrite: bool) -> None:
    """Refuse an existing non-empty folder (unless --overwrite, and then only a tokenizer folder) before
    any reading, so that a mistake costs nothing."""
    if os.path.isfile(output):
        raise UserError(f"--output {output} is a file; give a folder for the tokenizer (it is created).")
    if os.path.isdir(output) and os.listdir(output):
        present = sorted(os.listdir(output))
        if not overwrite:
            raise UserError(f"--output {output} already holds files ({', '.join(present[:4])}"
                            f"{', ...' if len(present) > 4 else ''}); the tokenizer is not written over them "
                            f"unless you pass --overwrite (or choose another --output).")
        foreign = [name for name in present if name not in REPLACEABLE_FILES]
        if foreign:
            raise UserError(f"--output {output} holds more than a tokenizer ({', '.join(foreign[:4])}), so "
                            f"--overwrite will not replace it; choose an empty or new folder for --output.")
    existing = os.path.dirname(output)  # created only when the tokenizer is written; writable now?
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {output}: cannot write in {existing} (no permission). Choose a writable "
                        f"location.")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class Counts:
    """What was read: records seen, documents with text, their characters, and (unigram) the alphabet."""

    records: int = 0
    documents: int = 0
    characters: int = 0
    alphabet: set | None = None
    read_seconds: float = 0.0
    fit_seconds: float = 0.0


@dataclass
class Trained:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    settings: Settings
    counts: Counts
    sources: list = field(default_factory=list)
    skipped_bad_records: int = 0


def documents(reader, counts: Counts, max_documents: int | None, max_chars: int | None, bar):
    """Batches of the documents to train on, counted as they pass, within the sample limits."""

    def full() -> bool:
        return ((max_documents is not None and counts.records >= max_documents)
                or (max_chars is not None and counts.characters >= max_chars))

    for batch in reader.batches():
        out, before = [], counts.records
        for text in batch:
            if full():
                break
            counts.records += 1
            if not text.strip():
                continue
            if max_chars is not None:
                text = text[:max_chars - counts.characters]
            counts.documents += 1
            counts.characters += len(text)
            if counts.alphabet is not None:
                counts.alphabet.update(text)
            out.append(text)
        bar.update(counts.records - before)
        if out:
            bar.set_postfix_str(f"{counts.characters / 1e6:,.1f} M chars", refresh=False)
            yield out
        if full():
            return


def train(reader, settings: Settings, *, max_documents: int | None = None, max_chars: int | None = None,
          progress: bool = True) -> Trained:
    """Read the documents (streamed) into the trainer, fit the vocabulary, and wrap it for transformers."""
    from tqdm import tqdm

    backend, trainer = build_backend(settings)
    counts = Counts(alphabet=set() if settings.algorithm == "unigram" else None)
    started = time.perf_counter()
    with tqdm(desc=f"tokenizer {settings.algorithm}: reading", unit="doc", total=max_documents, file=sys.stderr,
              disable=not progress, mininterval=0.5) as bar:

        def stream():
            yield from documents(reader, counts, max_documents, max_chars, bar)
            counts.read_seconds = time.perf_counter() - started
            bar.set_description_str(f"tokenizer {settings.algorithm}: fitting the vocabulary")
            bar.refresh()

        try:
            backend.train_from_iterator(stream(), trainer=trainer)
        except OSError as err:
            raise UserError(f"cannot read {err.filename or 'an input'}: {err.strerror or err}. Check the file "
                            f"(permissions, disk) or leave it out of --input.") from None
        except UserError:
            raise
        except Exception as err:  # the trainers raise plain Exception with a message
            if counts.documents and "not large enough" in str(err):
                raise too_small(settings, unigram_minimum(backend, counts)) from None
            if counts.documents:
                raise
    counts.fit_seconds = time.perf_counter() - started - counts.read_seconds
    if counts.documents == 0:
        names = ", ".join(s.describe() for s in reader.sources) or "the inputs"
        raise UserError(f"empty input: no document with text in {names} ({counts.records} records read, "
                        f"{reader.skipped_bad_records} bad records skipped). Check --input and --text-field.")
    if backend.get_vocab_size() > settings.vocab_size:
        minimum = (unigram_minimum(backend, counts) if settings.algorithm == "unigram"
                   else backend.get_vocab_size())
        raise too_small(settings, minimum)
    if settings.algorithm == "wordpiece":
        backend = canonical_wordpiece_ids(backend)
    return Trained(wrap(backend, settings), settings, counts, list(reader.sources), reader.skipped_bad_records)


def canonical_wordpiece_ids(backend):
    """The same vocabulary with ids that do not depend on the run: special tokens keep theirs, every other
    token is numbered in sorted order. The WordPiece trainer numbers the continuation alphabet ("##a", ...)
    in hash-map order and breaks ties between equally frequent merges arbitrarily, so two trainings on the
    same text gave the same 8,000 tokens with ~500 different ids, and a model trained from random init on
    data prepared with one could not be reproduced with the other. WordPiece cuts words by the longest
    piece in the vocabulary, whatever the ids, so renumbering changes no segmentation. (Byte-level BPE
    came out identical run to run; the unigram trainer's scores vary in the third decimal, which no
    renumbering fixes.)"""
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    fixed = {token["content"]: token["id"] for token in spec["added_tokens"]}
    free = sorted(set(range(len(vocab))) - set(fixed.values()))
    spec["model"]["vocab"] = {**fixed, **dict(zip(sorted(t for t in vocab if t not in fixed), free))}
    return Tokenizer.from_str(json.dumps(spec))


def too_small(settings: Settings, minimum: int) -> UserError:
    return UserError(f"--vocab-size {settings.vocab_size} is smaller than the alphabet of the corpus (every "
                     f"character it holds) plus the 5 special tokens; pass --vocab-size of at least {minimum} "
                     f"(typical sizes: 8,000-64,000), or use --algorithm bpe, whose alphabet is the 256 bytes.")


def unigram_minimum(backend, counts: Counts) -> int:
    """The smallest unigram vocabulary that holds the corpus' characters: its normalised alphabet (without
    the space), the "▁", the special tokens and one more (what the tokenizers trainer needs, measured)."""
    chars = set("".join(backend.normalizer.normalize_str(c) for c in counts.alphabet or ())) - {" "}
    return len(chars) + 2 + len(FAMILIES["unigram"].specials)


def build_backend(settings: Settings):
    """The untrained tokenizers.Tokenizer of the algorithm (normaliser, pre-tokeniser, decoder) and its trainer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    family = FAMILIES[settings.algorithm]
    # <mask> takes the space before it (RoBERTa, XLM-R), so "a <mask> b" fills in like "a word b".
    specials = [AddedToken(t, special=True, lstrip=t == "<mask>", normalized=False) for t in family.specials]
    if settings.algorithm == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token=family.unk))
        backend.normalizer = normalizers.BertNormalizer(lowercase=settings.lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
                                            special_tokens=specials, continuing_subword_prefix="##",
                                            show_progress=False)
    elif settings.algorithm == "bpe":
        backend = Tokenizer(models.BPE())  # every byte is in the alphabet: no unknown token is ever produced
        backend.normalizer = normalizers.Sequence([normalizers.NFC()] + ([normalizers.Lowercase()]
                                                                          if settings.lowercase else []))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
                                      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    else:
        # Metaspace splits at spaces only: other whitespace (line breaks, tabs) must become a space first,
        # or "end.\nNext" would be one word, and the line break an unknown character.
        backend = Tokenizer(models.Unigram())
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
            + ([normalizers.Lowercase()] if settings.lowercase else []))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=settings.vocab_size, special_tokens=specials,
                                          unk_token=family.unk, show_progress=False)
    return backend, trainer


def wrap(backend, settings: Settings):
    """Add [CLS] ... [SEP] (or <s> ... </s>) around texts and name the special tokens for transformers."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[settings.algorithm]
    cls, sep = (family.cls, backend.token_to_id(family.cls)), (family.sep, backend.token_to_id(family.sep))
    if settings.algorithm == "bpe":  # also trims the space a "Ġ" piece carries from its offsets
        backend.post_processor = processors.RobertaProcessing(sep, cls, trim_offsets=True, add_prefix_space=False)
    else:
        pair = (f"{cls[0]} $A {sep[0]} $B:1 {sep[0]}:1" if settings.algorithm == "wordpiece"
                else f"{cls[0]} $A {sep[0]} {sep[0]} $B:1 {sep[0]}:1")  # XLM-R puts </s></s> between a pair
        backend.post_processor = processors.TemplateProcessing(single=f"{cls[0]} $A {sep[0]}", pair=pair,
                                                               special_tokens=[cls, sep])
    names = {"cls_token": family.cls, "sep_token": family.sep, "pad_token": family.pad, "mask_token": family.mask,
             "unk_token": family.unk}
    if family.uses_bos_eos:
        names.update(bos_token=family.cls, eos_token=family.sep)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=settings.model_max_length, **names)


# --------------------------------------------------------------------------------------------
# The output
# --------------------------------------------------------------------------------------------

def write_folder(result: Trained, output: str, overwrite: bool) -> None:
    """Write into a temporary folder next to --output and rename it into place at the end, so that an
    interrupted or failed run leaves no half-written tokenizer (and an --overwrite'd one stays whole
    until the new one is complete)."""
    check_output(output, overwrite)  # again: the folder may have appeared while we trained
    parent, name = os.path.split(output)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        save_tokenizer(result.tokenizer, tmp)  # loadable by transformers 4.x too (hf_compat.py)
        with open(os.path.join(tmp, TRAINING_FILE), "w", encoding="utf-8") as f:
            json.dump(training_record(result), f, indent=2, ensure_ascii=False)
            f.write("\n")
        replace_folder(tmp, output)
    except OSError as err:
        raise UserError(f"cannot write the tokenizer to {output}: {err.strerror or err}. Free some space or choose "
                        f"a writable --output.") from None
    finally:
        if tmp and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: str, output: str) -> None:
    """Rename ``new`` to ``output``; an existing ``output`` is moved aside first and deleted only after."""
    if not os.path.exists(output):
        os.rename(new, output)
        return
    old = new + ".old"
    os.rename(output, old)
    try:
        os.rename(new, output)
    except OSError:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def training_record(result: Trained) -> dict:
    from retromae_ds import __version__

    s, c = result.settings, result.counts
    return {"algorithm": s.algorithm, "vocab_size_requested": s.vocab_size, "vocab_size": len(result.tokenizer),
            "lowercase": s.lowercase, "min_frequency": s.min_frequency, "model_max_length": s.model_max_length,
            "documents": c.documents, "records_read": c.records, "characters": c.characters,
            "skipped_bad_records": result.skipped_bad_records, "sources": [src.as_meta() for src in result.sources],
            "created_by": f"retromae-ds {__version__}"}


def format_summary(result: Trained, output: str) -> str:
    s, c, tok = result.settings, result.counts, result.tokenizer
    seconds = c.read_seconds + c.fit_seconds
    short = (f" (asked {s.vocab_size:,}: the corpus has no more pieces"
             f"{f' seen {s.min_frequency}+ times' if s.min_frequency else ''})" if len(tok) < s.vocab_size else "")
    return (f"tokenizer {output}: {s.algorithm}, vocabulary {len(tok):,}{short}, from {c.documents:,} documents, "
            f"{c.characters:,} characters in {seconds:.1f} s (read {c.read_seconds:.1f} s, fit "
            f"{c.fit_seconds:.1f} s), {c.characters / max(seconds, 1e-9):,.0f} chars/s\n"
            f"  next: retromae-ds prepare --tokenizer {output} ...; a --model-config for it needs vocab_size >= "
            f"{len(tok)} and pad_token_id {tok.pad_token_id}")
