"""RetroMAE pre-training model: a Hugging Face masked-LM encoder plus one enhanced decoder layer.

forward() follows the published reference's input contract (six tensors, `decoder_attention_mask`
being the [B, L, L] matrix mask with 1 = visible; see retromae_ds.data.masking):

    hidden  = encoder(encoder_input_ids)                       encoder loss: its MLM head on masked ids
    kv      = [hidden[:, 0] ; E(decoder_input_ids)[1:]]        E = the encoder's own embedding module
    query   = E(inputs_embeds = hidden[:, 0] at every position)
    decoded = c_head(query, kv, decoder_attention_mask)        decoder loss: the same MLM head
    loss    = encoder_loss + decoder_loss (+ bow_loss_weight * bag-of-words loss for DupMAE)

decoder_loss(..., roll_cls=(0, 1)) runs the same decoder path with each sample's own [CLS] vector and with
its neighbour's (the `cls_gain` diagnostic, retromae_ds/evaluate.py).

Objectives: "retromae"; "dupmae" (adds the bag-of-words loss on max-pooled encoder logits);
"mlm" (encoder MLM only, the ablation baseline fed the same batches; the decoder is not run and
its parameters are frozen, so optimizers and DeepSpeed never wait for their gradients).

State-dict keys match the reference checkpoints: `lm.*` (the HF model) and `c_head.*` (a BERT
layer). Its `pytorch_model.bin` loads strictly: the reference also saved the shared embedding
module a second time as `decoder_embeddings.*` and older transformers saved `position_ids`
buffers; `load_state_dict` drops those duplicates before the strict check.

Folder layout written by `save_pretrained(dir)`:
    model.safetensors       full state (lm.* + c_head.*); tied tensors stored once, aliases in metadata
    encoder_model/          lm.save_pretrained (what evaluation and export use)
    retromae_config.json    RetroMAEConfig
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from retromae_ds.console import is_rank0, say
from retromae_ds.errors import UserError
from retromae_ds.model import heads
from retromae_ds.model.decoder import EnhancedDecoderLayer
from retromae_ds.model.positions import ROTARY, decoder_positions

OBJECTIVES = ("retromae", "dupmae", "mlm")
# encoders whose self-attention is full and bidirectional (no local windows): their padding mask can be
# handed over ready-made (see RetroMAEForPretraining._encoder_mask)
PLAIN_BIDIRECTIONAL = frozenset({"bert", "roberta", "xlm-roberta"})
STATE_FILE = "model.safetensors"
REFERENCE_STATE_FILE = "pytorch_model.bin"
ENCODER_DIR = "encoder_model"
CONFIG_FILE = "retromae_config.json"
ALIASES_KEY = "retromae_ds_aliases"


@dataclass
class RetroMAEConfig:
    objective: str = "retromae"
    bow_loss_weight: float = 1.0
    fast_heads: bool = True  # vocabulary logits only where a label exists (same loss as the naive way)
    ce_chunk_size: int | None = None  # rows per projection + cross-entropy chunk (None = all at once)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}.")
        if self.bow_loss_weight < 0:
            raise UserError(f"bow_loss_weight {self.bow_loss_weight}: must be >= 0.")
        if self.ce_chunk_size is not None and self.ce_chunk_size < 0:
            raise UserError(f"ce_chunk_size {self.ce_chunk_size}: give a positive number of rows, or 0/None.")
        self.ce_chunk_size = self.ce_chunk_size or None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RetroMAEConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class RetroMAEOutput(ModelOutput):
    """out.loss (also out[0]) plus the separate parts for logging; all but loss are detached-safe."""

    loss: torch.Tensor | None = None
    encoder_loss: torch.Tensor | None = None
    decoder_loss: torch.Tensor | None = None
    bow_loss: torch.Tensor | None = None
    encoder_accuracy: torch.Tensor | None = None
    encoder_tokens: torch.Tensor | None = None
    decoder_tokens: torch.Tensor | None = None


class RetroMAEForPretraining(nn.Module):
    def __init__(self, encoder: nn.Module, config: RetroMAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or RetroMAEConfig()
        self.lm = encoder
        self._head_names = heads.find_mlm_head(encoder)
        heads.find_embeddings(encoder)
        self.positions = decoder_positions(encoder)
        dtype = next(encoder.parameters()).dtype
        self.c_head = EnhancedDecoderLayer.from_config(encoder.config, rotary=self.positions == ROTARY).to(dtype=dtype)
        if self.config.objective == "mlm":
            self.c_head.requires_grad_(False)
        self._checkpoint_decoder = False
        self._head_bounds: tuple[int, int, int] | None = None  # see bound_head_calls
        # The top-level parts that start from fresh random weights, as parameter-name prefixes ("lm.cls",
        # "c_head"): set by from_pretrained (the MLM head the checkpoint lacked, the decoder a plain encoder
        # folder has not). None: built around an encoder of unknown provenance (random init): all is new.
        self.new_parts: tuple[str, ...] | None = None

    # --- parts ------------------------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module:
        """The HF base model (BertModel, XLMRobertaModel, ...): what evaluation embeds with."""
        return self.lm.base_model

    @property
    def mlm_head(self) -> nn.Module:
        """The encoder's MLM head: its one head module (BERT `cls`), or its parts chained (ModernBERT)."""
        if len(self._head_names) == 1:
            return getattr(self.lm, self._head_names[0])
        return heads.ChainedHead([getattr(self.lm, name) for name in self._head_names])

    @property
    def embeddings(self) -> nn.Module:
        return self.lm.base_model.embeddings

    def bound_head_calls(self, block_length: int, encoder_mask_ratio: float) -> None:
        """Make the number of MLM-head calls per forward depend only on the micro-batch size, `block_length`
        (tokens per block with [CLS]/[SEP]: the run's max_seq_len) and --ce-chunk-size, not on the batch.

        With --ce-chunk-size the head runs once per chunk of rows, and under ZeRO-3 each call all-gathers
        the tied vocabulary projection: ranks that call it a different number of times (one rank's
        length-grouped batch is narrower, or has fewer masked tokens) break DeepSpeed's collective
        bookkeeping. With these bounds (the encoder's masking budget of a full block, every inner position
        of the decoder) trailing chunks are empty instead of missing. The trainer sets them; a model
        used alone (tests, evaluation) chunks by its batch."""
        if block_length < 3:
            raise ValueError(f"block_length {block_length}: needs room for [CLS], a token and [SEP]")
        inner = block_length - 2
        self._head_bounds = (min(inner, max(1, round(block_length * encoder_mask_ratio))), inner, block_length)

    def _bounds(self, batch: int) -> tuple[int | None, int | None, int | None]:
        """(encoder rows, decoder rows, positions) bounds for a batch of `batch` samples, or Nones."""
        if self._head_bounds is None:
            return None, None, None
        encoder, decoder, length = self._head_bounds
        return batch * encoder, batch * decoder, length

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, encoder_input_ids, encoder_attention_mask, encoder_labels, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_labels=None, bag_word_weight=None,
                encoder_label_capacity: int | None = None) -> RetroMAEOutput:
        """`encoder_attention_mask` None means no padding (the encoder then runs without a mask: no check
        for padding, flash attention). `encoder_label_capacity` (a host-known bound on the encoder's
        labelled positions, from the masker's plan) makes every shape static: the heads gather a fixed
        number of rows instead of a data-dependent selection, so a step never waits for the device."""
        cfg = self.config
        hidden = self.lm.base_model(input_ids=encoder_input_ids, attention_mask=self._encoder_mask(encoder_attention_mask))[0]
        head, chunk = self.mlm_head, cfg.ce_chunk_size
        static = encoder_label_capacity is not None
        encoder_tokens = (encoder_labels != heads.IGNORE_INDEX).sum()
        encoder_rows, _, block_length = self._bounds(encoder_labels.shape[0])
        bow_loss = None
        if cfg.objective == "dupmae":
            if decoder_labels is None and bag_word_weight is None:
                raise ValueError("dupmae needs decoder_labels (or bag_word_weight) for its bag-of-words targets")
            if encoder_attention_mask is None:
                keep = torch.ones_like(encoder_labels, dtype=torch.bool)
            else:
                keep = encoder_attention_mask.bool().clone()
            keep[:, 0] = False  # the reference pools positions 1.. (not [CLS])
            if cfg.fast_heads:
                pooled, enc_sum, enc_right = heads.pooled_and_labelled_loss(head, hidden, encoder_labels, keep, chunk,
                                                                            static=static, max_length=block_length)
            else:
                logits = head(hidden)
                enc_sum, enc_right = heads.dense_logits_loss(logits, encoder_labels)
                pooled = heads.max_pool_logits(logits, keep)
                del logits
            targets = bag_word_weight if bag_word_weight is not None else \
                heads.bag_of_words_targets(decoder_labels, pooled.shape[-1])
            bow_loss = heads.bag_of_words_loss(pooled, targets.to(pooled.dtype))
        elif cfg.fast_heads:
            enc_sum, enc_right = heads.labelled_rows_loss(head, hidden, encoder_labels, chunk,
                                                          capacity=encoder_label_capacity, max_rows=encoder_rows)
        else:
            enc_sum, enc_right = heads.dense_logits_loss(head(hidden), encoder_labels)
        encoder_loss = enc_sum / encoder_tokens.clamp(min=1)
        loss = encoder_loss

        decoder_loss = decoder_tokens = None
        if cfg.objective != "mlm":
            decoder_tokens = (decoder_labels != heads.IGNORE_INDEX).sum()
            dec_sum = self._decoder_loss_sum(hidden[:, :1], decoder_input_ids, decoder_attention_mask, decoder_labels,
                                             static)
            decoder_loss = dec_sum / decoder_tokens.clamp(min=1)
            loss = loss + decoder_loss
        if bow_loss is not None:
            loss = loss + cfg.bow_loss_weight * bow_loss
        accuracy = (enc_right.float() / encoder_tokens.clamp(min=1)).detach()
        return RetroMAEOutput(loss=loss, encoder_loss=encoder_loss, decoder_loss=decoder_loss, bow_loss=bow_loss,
                              encoder_accuracy=accuracy, encoder_tokens=encoder_tokens, decoder_tokens=decoder_tokens)

    def decoder_loss(self, encoder_input_ids, encoder_attention_mask, decoder_input_ids, decoder_attention_mask,
                     decoder_labels, roll_cls: tuple[int, ...] = (0,), encoder_labels=None,
                     encoder_label_capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's reconstruction loss of a batch, with each sample's own [CLS] vector or another's:
        `(sums, tokens)`, `sums[k]` the summed cross-entropy (fp32, nats) of the decoder's labelled tokens
        when sample i decodes from the [CLS] vector of sample (i + roll_cls[k]) mod B, `tokens` how many
        tokens were scored. The encoder runs once; the decoder once per entry, on the same path as
        forward() (`_decoder_loss_sum`). `(0,)` gives forward()'s decoder loss times its token count.
        Takes a MaskGenerator batch whole (`encoder_labels`, `encoder_label_capacity` are not used).
        Used by retromae_ds.evaluate.cls_gain; the caller picks train/eval mode and grad mode."""
        mask = self._encoder_mask(encoder_attention_mask)
        cls_hidden = self.lm.base_model(input_ids=encoder_input_ids, attention_mask=mask)[0][:, :1]
        sums = [self._decoder_loss_sum(cls_hidden.roll(-int(shift), dims=0) if shift else cls_hidden,
                                       decoder_input_ids, decoder_attention_mask, decoder_labels, static=False)
                for shift in roll_cls]
        return torch.stack(sums), (decoder_labels != heads.IGNORE_INDEX).sum()

    def _decoder_loss_sum(self, cls_hidden, decoder_input_ids, decoder_attention_mask, decoder_labels,
                          static: bool) -> torch.Tensor:
        """Summed cross-entropy of the decoder's labelled tokens, decoding from `cls_hidden` [B, 1, H]."""
        head, chunk = self.mlm_head, self.config.ce_chunk_size
        decoded = self._decode(cls_hidden, decoder_input_ids, decoder_attention_mask)
        _, rows, _ = self._bounds(decoder_labels.shape[0])
        if self.config.fast_heads and static:  # every row but [CLS] and the last ([SEP] or padding): a slice
            inner = decoder_labels[:, 1:-1]
            dec_sum, _ = heads.labelled_rows_loss(head, decoded[:, 1:-1], inner, chunk, count_correct=False,
                                                  capacity=inner.numel(), max_rows=rows)
        elif self.config.fast_heads:
            dec_sum, _ = heads.labelled_rows_loss(head, decoded, decoder_labels, chunk, count_correct=False,
                                                  max_rows=rows)
        else:
            dec_sum, _ = heads.dense_logits_loss(head(decoded), decoder_labels)
        return dec_sum

    def _encoder_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The padding mask as the encoder's attention takes it, prepared here when that avoids a sync:
        for a 2D mask transformers asks the device whether it has padding at all (`mask.all()`, read on
        the host) to decide whether to drop it. For encoders whose attention is plain bidirectional
        (PLAIN_BIDIRECTIONAL) under the sdpa or eager kernels, an additive [B, 1, 1, L] mask, which
        transformers passes through unchanged, is the same computation without that question. Other
        encoders (ModernBERT's local attention, flash-attention kernels) get the 2D mask as before."""
        config = self.lm.config
        if mask is None or mask.dim() != 2 or config.model_type not in PLAIN_BIDIRECTIONAL or \
                getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
            return mask
        dtype = self.lm.dtype
        blocked = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0, torch.finfo(dtype).min)
        return blocked[:, None, None, :]

    def _decode(self, cls_hidden, decoder_input_ids, decoder_attention_mask):
        """The enhanced decoder: queries from the sentence embedding, keys/values from the tokens."""
        length = decoder_input_ids.shape[1]
        embed = self.embeddings
        key_value = torch.cat([cls_hidden, embed(input_ids=decoder_input_ids)[:, 1:]], dim=1)
        query = embed(inputs_embeds=cls_hidden.expand(-1, length, -1))
        if self._checkpoint_decoder and self.training and torch.is_grad_enabled():
            return checkpoint(self.c_head, query, key_value, decoder_attention_mask, use_reentrant=False)
        return self.c_head(query, key_value, decoder_attention_mask)

    # --- activation checkpointing -----------------------------------------------------------------
    def gradient_checkpointing_enable(self) -> None:
        """Recompute encoder layers (HF) and the decoder layer in backward; same loss and gradients."""
        if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._checkpoint_decoder = True

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.lm, "activation_checkpointing_disable"):
            self.lm.activation_checkpointing_disable()
        else:
            self.lm.gradient_checkpointing_disable()
        self._checkpoint_decoder = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpoint_decoder

    # --- torch.compile ------------------------------------------------------------------------------
    def compile_layers(self, **options) -> int:
        """torch.compile each encoder layer and the decoder layer in place (`nn.Module.compile`); returns
        how many modules were compiled.

        Layers, not the whole model: they are where the FLOPs are, they are identical (one compiled graph
        serves all of them), and the code around them (the HF mask preparation, the heads' custom
        cross-entropy, DeepSpeed's hooks) stays eager, so nothing there can break a graph or recompile.
        State-dict keys do not change (the module is compiled in place, not wrapped)."""
        layers = list(encoder_layers(self.lm.base_model)) + [self.c_head]
        for layer in layers:
            layer.compile(**options)
        return len(layers)

    # --- state dicts ------------------------------------------------------------------------------
    def normalize_state_dict(self, state: dict) -> dict:
        """Drop what the reference saved twice (`decoder_embeddings.*`, the embedding module under a
        second name) and legacy non-persistent buffers (`position_ids`), so strict loading works."""
        own = set(self.state_dict().keys())
        transient = {name for name, _ in self.named_buffers()} - own
        prefix = f"lm.{self.lm.base_model_prefix}.embeddings."
        out = {}
        for key, value in state.items():
            if key.startswith("decoder_embeddings.") and prefix + key[len("decoder_embeddings."):] in own:
                continue
            if key in transient:
                continue
            out[key] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(self.normalize_state_dict(state_dict), strict=strict, assign=assign)

    def load_state_file(self, path: str | Path) -> None:
        """Load `model.safetensors` (ours) or a reference `pytorch_model.bin`, strictly."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
            state = load_file(str(path))
            for alias, source in aliases.items():
                state[alias] = state[source]
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = self.normalize_state_dict(state)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise UserError(f"{path}: its weights do not fit this model (missing {missing[:4]}"
                            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                            f"{'...' if len(unexpected) > 4 else ''}). Expected a RetroMAE state with lm.* and "
                            f"c_head.* keys for the architecture in {path.parent / ENCODER_DIR}.")
        bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if bad:
            raise UserError(f"{path}: tensor shapes differ from the model for {bad[:4]} (e.g. {bad[0]}: "
                            f"{tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}); the state was saved "
                            f"for another configuration than {path.parent / ENCODER_DIR}.")
        super().load_state_dict(state, strict=True)

    # --- folders ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write model.safetensors + encoder_model/ + retromae_config.json (temp names, then renamed)."""
        from safetensors.torch import save_file

        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        staging = target / f".staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            tensors, aliases = _deduplicated_state(self.state_dict())
            save_file(tensors, str(staging / STATE_FILE), metadata={"format": "pt", ALIASES_KEY: json.dumps(aliases)})
            self.lm.save_pretrained(str(staging / ENCODER_DIR))
            (staging / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=1))
            for name in (ENCODER_DIR, STATE_FILE, CONFIG_FILE):
                old = target / name
                if old.is_dir():
                    shutil.rmtree(old)
                os.replace(staging / name, old)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: RetroMAEConfig | None = None) -> "RetroMAEForPretraining":
        """A RetroMAE folder (with encoder_model/ and model.safetensors or the reference's
        pytorch_model.bin: the decoder continues), or a plain HF masked-LM folder (fresh decoder)."""
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder. Give a local Hugging Face model folder or a RetroMAE "
                            f"folder (with {ENCODER_DIR}/); nothing is downloaded at run time.")
        encoder_dir = folder / ENCODER_DIR
        if not encoder_dir.is_dir():
            lm, fresh_head = _load_masked_lm(folder)
            model = cls(lm, config)
            model.new_parts = tuple(f"lm.{name}" for name in fresh_head) + ("c_head",)
            return model
        if config is None:
            settings = folder / CONFIG_FILE
            config = RetroMAEConfig.from_dict(json.loads(settings.read_text())) if settings.exists() else None
        lm, fresh_head = _load_masked_lm(encoder_dir)
        model = cls(lm, config)
        model.new_parts = tuple(f"lm.{name}" for name in fresh_head) + ("c_head",)
        for name in (STATE_FILE, REFERENCE_STATE_FILE):
            if (folder / name).exists():
                model.load_state_file(folder / name)  # strict: every part, the head and the decoder included
                model.new_parts = ()
                break
        return model


def encoder_layers(base_model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers: the ModuleList holding most of its parameters
    (BERT/RoBERTa/XLM-R `encoder.layer`, ModernBERT `layers`)."""
    lists = [m for m in base_model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"{type(base_model).__name__}: no list of layers found to compile; run without --compile.")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _load_masked_lm(folder: Path) -> tuple[nn.Module, tuple[str, ...]]:
    """(the HF masked-LM model of `folder`, the names of its MLM head modules when the folder lacked
    weights of that head, which then start random; else ())."""
    from transformers import AutoModelForMaskedLM

    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no config.json; expected a Hugging Face model folder (save_pretrained output).")
    try:
        with quiet_transformers():
            lm, info = AutoModelForMaskedLM.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: could not load a masked-LM model from this folder ({err}). RetroMAE needs an "
                        f"architecture with a masked-LM head (BERT, RoBERTa, XLM-R, ModernBERT, ...).") from None
    missing = info.get("missing_keys") or []
    report_missing_weights(lm, missing, folder)
    head = heads.find_mlm_head(lm) if missing else ()
    return lm, head if any(k.startswith(tuple(f"{name}." for name in head)) for k in missing) else ()


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading chatter (its load-report table, the tied-weights "checkpoint seem
    corrupted" warning, the "Loading weights" bar) for one load; report_missing_weights says what matters."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def report_missing_weights(lm: nn.Module, missing: list[str], folder: Path) -> None:
    """One line instead of transformers' tables: a missing MLM head is normal for encoders published
    without one (sentence-transformers models); missing encoder weights are not, so they are named."""
    if not missing or not is_rank0():
        return
    head = tuple(f"{name}." for name in heads.find_mlm_head(lm)) if missing else ()
    in_head = [k for k in missing if k.startswith(head)]
    elsewhere = [k for k in missing if not k.startswith(head)]
    if in_head:
        say("no MLM head in this checkpoint: a new one is initialised")
    if elsewhere:
        say(f"warning: {folder} lacks {len(elsewhere)} encoder weights, initialised at random: "
            f"{', '.join(elsewhere[:5])}{' ...' if len(elsewhere) > 5 else ''}")


def _deduplicated_state(state: dict) -> tuple[dict, dict]:
    """Tensors that share memory (tied embeddings / MLM decoder) stored once: (tensors, alias -> name)."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases
