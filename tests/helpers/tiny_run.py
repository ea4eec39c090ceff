"""The one way tests build a tiny training run: Lee news articles prepared with the MiniLM tokenizer, and
a tiny BERT config (2 layers, hidden size 64, MiniLM's vocabulary) trained from random init.

    run = tiny_run(root, n_docs=80, max_seq_len=32)   # {"root", "prefix", "tok", "model", "base"}
    args = run["base"] + ["--max-steps", "4", ...]     # --data PREFIX --model-config DIR --tokenizer MINILM

The parts, for runs that need another corpus or only the model:
    prefix = prepare_lee_corpus(root, lee_articles()[120:220], "lee_other", max_seq_len=64)
    folder = tiny_bert_config_dir(root, hidden_dropout_prob=0.0)
"""

from __future__ import annotations

import json
from pathlib import Path

from retromae_ds.data.demo_corpus import minilm_path  # the package's one; tests import it from here too
from tests.helpers.corpora import lee_articles, write_jsonl

TINY_BERT = dict(
    architectures=["BertForMaskedLM"], model_type="bert", vocab_size=30522, hidden_size=64,
    num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=128,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, type_vocab_size=2,
    initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
)


def prepare_lee_corpus(root, docs: list[str], name: str = "lee", max_seq_len: int = 64) -> str:
    """Prepare `docs` with the MiniLM tokenizer as ROOT/NAME (.bin/.idx/.json, from ROOT/NAME.jsonl);
    returns the prefix."""
    from retromae_ds.data.prepare import prepare_files

    corpus = write_jsonl(Path(root) / f"{name}.jsonl", [{"text": d} for d in docs])
    prefix = str(Path(root) / name)
    prepare_files([corpus], minilm_path(), prefix, max_seq_len=max_seq_len, num_proc=1, progress=False)
    return prefix


def tiny_bert_config_dir(root, name: str = "tiny", **overrides) -> Path:
    """ROOT/NAME/config.json holding TINY_BERT (with `overrides`), for --model-config."""
    folder = Path(root) / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY_BERT, **overrides}))
    return folder


def tiny_run(root, n_docs: int, max_seq_len: int, bert_overrides: dict | None = None) -> dict:
    """The first `n_docs` Lee articles prepared at `max_seq_len` (prefix ROOT/lee) and the tiny BERT
    config (ROOT/tiny). Returns {"root", "prefix", "tok", "model", "base"}: `model` the flags for the model
    config and tokenizer, `base` the data flag plus those."""
    root = Path(root)
    prefix = prepare_lee_corpus(root, lee_articles(n_docs), "lee", max_seq_len)
    tok = minilm_path()
    model = ["--model-config", str(tiny_bert_config_dir(root, **(bert_overrides or {}))), "--tokenizer", tok]
    return {"root": root, "prefix": prefix, "tok": tok, "model": model, "base": ["--data", prefix, *model]}
