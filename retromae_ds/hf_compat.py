"""Hugging Face files a user loads later, written so that transformers 4.x (4.44, what FlagEmbedding pins)
and 5.x both load them, and both give the same tokens and hidden states.

Every tokenizer this project writes (`retromae-ds tokenizer`, a checkpoint's model_config/, the export and
its retromae/) goes through `save_tokenizer`; every model config through `save_config` or, for a folder
that `model.save_pretrained` wrote, `make_config_portable`.

What transformers 5 writes and 4.44 does not read the same way (each checked in a 4.44 venv, see
tests/test_hf_compat.py):

- tokenizer_config.json "tokenizer_class": 5.x writes the class of the object it saves, without "Fast".
  A plain tokenizers-backed tokenizer (every `retromae-ds tokenizer` output, ModernBERT's) is a
  `TokenizersBackend`, a 5.x-only class: 4.44 stops with "Tokenizer class TokenizersBackend does not
  exist or is not currently imported". A model tokenizer is written as e.g. "BertTokenizer", which 4.44
  resolves to the fast class only when `use_fast` is on, and to the slow class, which needs a vocab.txt
  that 5.x no longer writes, when it is off. Written here: the 4.x fast class name (BertTokenizerFast,
  XLMRobertaTokenizerFast, ...; 5.x keeps these names as aliases of the same classes), and
  PreTrainedTokenizerFast (5.x: an alias of TokenizersBackend) for anything else.
- "model_input_names": not written by 5.x. TokenizersBackend returns input_ids and attention_mask; 4.x's
  PreTrainedTokenizerFast also returns token_type_ids, which changes the hidden states of a sentence pair.
  Written here: the saving tokenizer's own list.
- "clean_up_tokenization_spaces": not written by 5.x, whose default is off; 4.44 then turns it on (with a
  FutureWarning) and decodes "a , b" as "a, b". Written here: the saving tokenizer's value.
- tokenizer.json BPE merges: tokenizers >= 0.20 (5.x needs it) writes each merge as a pair ["a", "b"];
  tokenizers 0.19 (4.44 pins < 0.20) reads only the "a b" string form and fails with "data did not match
  any variant of untagged enum ModelWrapper". Both versions read the string form, so it is written when no
  piece holds a space (never in byte-level BPE, whose pieces spell a space as "Ġ").
- config.json: 5.x writes "dtype" where 4.x reads "torch_dtype" (4.44 keeps "dtype" as an unknown
  string attribute, so `torch_dtype="auto"` does not see it). Written here: both keys (5.x reads "dtype"
  first and drops "torch_dtype" without a warning).

Not fixed here (nothing to write differently): the weights (model.safetensors with {"format": "pt"}
metadata and the base model's key names load in 4.44 as written), and model types 4.44 does not know:
ModernBERT needs transformers >= 4.48.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The fast tokenizer classes of transformers 4.44.2 (the values of its TOKENIZER_MAPPING_NAMES), the
# oldest version the written folders are meant for. A 5.x tokenizer whose 4.x fast class is not here is
# written as PreTrainedTokenizerFast, which loads its tokenizer.json as it is in every version.
FAST_TOKENIZER_CLASSES_4_44 = frozenset("""
    AlbertTokenizerFast BartTokenizerFast BarthezTokenizerFast BertTokenizerFast BigBirdTokenizerFast
    BlenderbotTokenizerFast BloomTokenizerFast CLIPTokenizerFast CamembertTokenizerFast CodeGenTokenizerFast
    CodeLlamaTokenizerFast CohereTokenizerFast ConvBertTokenizerFast CpmTokenizerFast
    DPRQuestionEncoderTokenizerFast DebertaTokenizerFast DebertaV2TokenizerFast DistilBertTokenizerFast
    ElectraTokenizerFast FNetTokenizerFast FunnelTokenizerFast GPT2TokenizerFast GPTNeoXTokenizerFast
    GemmaTokenizerFast HerbertTokenizerFast LEDTokenizerFast LayoutLMTokenizerFast LayoutLMv2TokenizerFast
    LayoutLMv3TokenizerFast LayoutXLMTokenizerFast LlamaTokenizerFast LongformerTokenizerFast
    LxmertTokenizerFast MBart50TokenizerFast MBartTokenizerFast MPNetTokenizerFast MT5TokenizerFast
    MobileBertTokenizerFast MvpTokenizerFast NllbTokenizerFast OpenAIGPTTokenizerFast PegasusTokenizerFast
    PreTrainedTokenizerFast Qwen2TokenizerFast RealmTokenizerFast ReformerTokenizerFast RemBertTokenizerFast
    RetriBertTokenizerFast RoFormerTokenizerFast RobertaTokenizerFast SeamlessM4TTokenizerFast
    SplinterTokenizerFast SqueezeBertTokenizerFast T5TokenizerFast UdopTokenizerFast WhisperTokenizerFast
    XGLMTokenizerFast XLMRobertaTokenizerFast XLNetTokenizerFast
""".split())
GENERIC_FAST_CLASS = "PreTrainedTokenizerFast"


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(folder)`, then the files made loadable by transformers 4.x as well
    (see the module docstring). OSError propagates, as from save_pretrained."""
    tokenizer.save_pretrained(str(folder))
    make_tokenizer_portable(tokenizer, folder)


def portable_tokenizer_class(tokenizer) -> str | None:
    """The tokenizer_class to write for `tokenizer`: a name both 4.x and 5.x resolve to a fast tokenizer
    that reads tokenizer.json; None for a slow tokenizer (whatever save_pretrained wrote stays)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    name = type(tokenizer).__name__
    fast = name if name.endswith("Fast") else name + "Fast"
    return fast if fast in FAST_TOKENIZER_CLASSES_4_44 else GENERIC_FAST_CLASS


def make_tokenizer_portable(tokenizer, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    name = portable_tokenizer_class(tokenizer)
    if name is not None:
        config["tokenizer_class"] = name
    config["model_input_names"] = list(tokenizer.model_input_names)
    config["clean_up_tokenization_spaces"] = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    _write_json(config_path, config)
    spec_path = folder / "tokenizer.json"
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if legacy_bpe_merges(spec):
            _write_json(spec_path, spec, sort_keys=False)


def legacy_bpe_merges(spec: dict) -> bool:
    """Rewrite a BPE model's merges from pairs to "a b" strings in the tokenizer.json `spec` (in place);
    True when it changed something. Left as pairs when a piece holds a space (not expressible as a string)."""
    model = spec.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(isinstance(m, list) for m in merges):
        return False
    if any(len(m) != 2 or " " in m[0] or " " in m[1] for m in merges):
        return False
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return True


def save_config(config, folder: str | os.PathLike) -> None:
    """`config.save_pretrained(folder)` with a config.json that transformers 4.x reads as 5.x does."""
    config.save_pretrained(str(folder))
    make_config_portable(folder)


def make_config_portable(folder: str | os.PathLike) -> None:
    """Give the config.json in `folder` (written by a 5.x save_pretrained) 4.x's "torch_dtype" next to "dtype"."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("dtype") is not None and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
        _write_json(path, config)


def _write_json(path: Path, data: dict, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8")
