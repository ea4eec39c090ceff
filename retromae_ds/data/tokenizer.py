"""The tokenizer prepare and training use: loaded from a local folder with errors a user can act on, and
checked against the positions of the model it belongs to."""

from __future__ import annotations

import json
import os

from retromae_ds.errors import UserError

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "special_tokens_map.json"}
REQUIRED_SPECIAL_TOKENS = ("cls_token", "sep_token", "pad_token", "mask_token")


def load_tokenizer(path: str, flag: str = "--tokenizer"):
    """Load a fast Hugging Face tokenizer from a local folder, with errors a user can act on (`flag`: the
    option that named `path`). The one loader: prepare calls it, and training through
    `retromae_ds.engine.build.load_tokenizer`, which picks the folder."""
    fix = ("Pass the folder that `tokenizer.save_pretrained(...)` wrote (a model folder usually holds "
           "tokenizer.json / tokenizer_config.json / vocab.txt)")
    if os.path.isfile(path):
        raise UserError(f"{flag} {path} is a file, not a tokenizer folder. {fix}; for a single "
                        f"vocabulary or SentencePiece file, load it with its tokenizer class in Python and "
                        f"save_pretrained() it to a folder.")
    if os.path.isdir(path):
        present = set(os.listdir(path))
        if not present & TOKENIZER_FILES:
            raise UserError(f"{flag} {path} is not a tokenizer folder: it has none of "
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
        raise UserError(f"{flag} {path}: this {where} did not load as a tokenizer ({first_line}). {fix}; "
                        f"if it only holds a SentencePiece model, load it with its class (e.g. "
                        f"XLMRobertaTokenizer.from_pretrained) and save_pretrained() it.") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{flag} {path} loaded as {type(tokenizer).__name__}, a slow (pure Python) "
                        f"tokenizer; prepare and training need a fast one (tokenizer.json). Convert it with "
                        f"`AutoTokenizer.from_pretrained(path, use_fast=True).save_pretrained(path)`.")
    if len(tokenizer) < 32:
        raise UserError(f"{flag} {path} loaded with a vocabulary of only {len(tokenizer)} tokens, so the "
                        f"vocabulary files are missing or unreadable. {fix}.")
    missing = [name for name in REQUIRED_SPECIAL_TOKENS if getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise UserError(f"{flag} {path} ({type(tokenizer).__name__}) has no {', '.join(missing)}; "
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
            from retromae_ds.model.positions import position_offset

            # RoBERTa-family models number positions from pad_token_id + 1
            limits.append((positions - position_offset(config), "max_position_embeddings in its config.json"))
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
