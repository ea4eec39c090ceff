"""Where an encoder's positions come from, the decoder's rotary positions, and growing a position table.

RetroMAE's decoder needs to know *where* each query row is: every query row starts from the same
sentence embedding, so without a position signal all rows would attend alike and predict alike.
BERT-like encoders add an absolute position table inside their embedding module, and the decoder
inherits it by calling that module. Rotary encoders (ModernBERT and other RoPE models) add nothing
there; their positions live inside attention. For those the decoder rotates its own queries and keys
(`RotaryEmbedding`) with the encoder's rotary settings, see `decoder_positions`.
"""

from __future__ import annotations

import torch
from torch import nn

from retromae_ds.errors import UserError

ABSOLUTE = "absolute"
ROTARY = "rotary"


def absolute_position_table(embeddings: nn.Module) -> nn.Embedding | None:
    """The embedding module's learned position table (BERT, RoBERTa, XLM-R), or None."""
    table = getattr(embeddings, "position_embeddings", None)
    return table if isinstance(table, nn.Embedding) else None


def rope_settings(config) -> dict | None:
    """The encoder's rotary settings for global (full) attention, or None for a model without RoPE.

    transformers 5 keeps them in `config.rope_parameters`: one dict ({"rope_type", "rope_theta", ...})
    or one dict per layer type (ModernBERT: "full_attention" theta 160k, "sliding_attention" 10k);
    the decoder attends over the whole sequence, so it takes the full-attention settings.
    """
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        theta = getattr(config, "rope_theta", None)
        return {"rope_type": "default", "rope_theta": float(theta)} if theta else None
    if "rope_type" not in params and "rope_theta" not in params:
        params = params.get("full_attention") or next((v for v in params.values() if isinstance(v, dict)), None)
    return dict(params) if params else None


def decoder_positions(lm: nn.Module) -> str:
    """ABSOLUTE when the embedding module adds a position table (the decoder gets positions by calling
    it), ROTARY when the encoder uses RoPE (the decoder rotates its own queries and keys); a clear
    error otherwise, since the decoder would be blind to position."""
    if absolute_position_table(lm.base_model.embeddings) is not None:
        return ABSOLUTE
    if rope_settings(lm.config) is not None:
        return ROTARY
    raise UserError(f"{type(lm).__name__}: its embedding module adds no position embeddings and its config has no "
                    f"rotary settings (rope_parameters), so the RetroMAE decoder could not tell its query rows "
                    f"apart. Supported are absolute-position encoders (BERT, RoBERTa, XLM-R) and rotary ones "
                    f"(ModernBERT).")


class RotaryEmbedding(nn.Module):
    """RoPE for the decoder's query and key streams, positions 0..L-1 on both (key 0 = the sentence
    embedding, so row i can also read its absolute position as its offset from key 0).

    Why RoPE with the encoder's own settings rather than a position table owned by the decoder:
    no new parameters (state-dict keys stay the reference's `c_head.*` BERT layer, export and
    ZeRO-3 see nothing new), no length limit to outgrow (8k contexts work as they are), and the
    same relative-position geometry (theta, scaling) as the encoder the decoder reads from.

    The inverse frequencies are a buffer, so they move with the module (`.to(device)`, DeepSpeed) and
    the cos/sin tables are built on the device without a blocking host-to-device copy (issue 18: one per
    step when batch lengths vary). The buffer holds their fp32 bits as int32, because no dtype cast
    touches an integer tensor: `.to(bf16)` or DeepSpeed's buffer_dtype would otherwise round them, and
    at position 8,000 a 0.4% frequency error is tens of radians. It is non-persistent, so the state dict
    (checkpoint keys) holds nothing of this module; ZeRO-3 partitions parameters, never buffers.
    """

    def __init__(self, head_dim: int, inv_freq: torch.Tensor, scaling: float = 1.0) -> None:
        super().__init__()
        if inv_freq.numel() * 2 != head_dim:
            raise UserError(f"rotary settings give {inv_freq.numel() * 2} rotated dimensions for attention heads of "
                            f"{head_dim}; partial rotary embeddings are not supported by the RetroMAE decoder.")
        self.head_dim = head_dim
        self.register_buffer("inv_freq_bits", inv_freq.detach().float().contiguous().view(torch.int32),
                             persistent=False)
        self.scaling = float(scaling)
        self._tables: dict = {}  # device -> (cos, sin) for the longest length seen there

    @classmethod
    def from_config(cls, config, head_dim: int) -> "RotaryEmbedding":
        settings = rope_settings(config)
        if settings is None:
            raise UserError(f"{type(config).__name__} has no rotary settings (rope_parameters / rope_theta).")
        if float(settings.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UserError("partial rotary embeddings (partial_rotary_factor != 1) are not supported by the "
                            "RetroMAE decoder.")
        rope_type = settings.get("rope_type", "default")
        if rope_type == "default":
            theta = float(settings["rope_theta"])
            inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            return cls(head_dim, inv_freq.float())
        # scaled variants (linear, yarn, ...): let transformers compute them from the same config
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS.get(rope_type)
        if init is None:
            raise UserError(f"rope_type {rope_type!r} is not known to this transformers version.")
        layer_type = "full_attention" if "full_attention" in (getattr(config, "rope_parameters", None) or {}) else None
        inv_freq, scaling = init(config, None, **({"layer_type": layer_type} if layer_type else {}))
        return cls(head_dim, inv_freq, scaling)

    @property
    def inv_freq(self) -> torch.Tensor:
        """The fp32 inverse frequencies [head_dim / 2] (a view of the buffer's bits: no copy)."""
        return self.inv_freq_bits.view(torch.float32)

    def cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 [L, head_dim] tables (fp32 whatever the module's dtype). Built once per device for the
        longest length seen there and sliced: rows don't depend on the length, so batches of varying
        length neither rebuild them nor copy between host and device."""
        device = torch.device(device)
        tables = self._tables.get(device)
        if tables is None or tables[0].shape[0] < length:
            inv_freq = self.inv_freq.to(device)  # a no-op once the module is on `device`
            angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
            angles = torch.cat([angles, angles], dim=-1)
            tables = self._tables[device] = (angles.cos() * self.scaling, angles.sin() * self.scaling)
        cos, sin = tables
        return cos[:length], sin[:length]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, heads, L, head_dim] by its positions (first half / second half pairing)."""
        cos, sin = self.cos_sin(x.shape[-2], x.device)
        wide = x.float()
        half = wide.shape[-1] // 2
        swapped = torch.cat([-wide[..., half:], wide[..., :half]], dim=-1)
        return (wide * cos + swapped * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# growing an absolute position table (--extend-positions)


# Hugging Face model types whose position table reserves padding_idx + 1 rows (padding_idx = pad_token_id):
# the RoBERTa family numbers a token's position from pad_token_id + 1. tests/test_model.py checks this list
# against the models transformers builds.
PADDED_POSITION_MODEL_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert", "data2vec-text",
    "longformer", "luke", "mpnet"})


def position_offset(source) -> int:
    """Rows reserved before the first token's position: padding_idx + 1 for the RoBERTa family (RoBERTa,
    XLM-R, CamemBERT, ...: positions count from pad_token_id + 1), 0 for BERT. The one place that knows.

    `source`: a built encoder's embedding module (its position table's padding_idx says), or, where no
    model is built, its config or config.json dict (the model type and pad_token_id say; a config without
    pad_token_id gets RobertaConfig's default, 1)."""
    if isinstance(source, nn.Module):
        table = absolute_position_table(source)
        padding_idx = getattr(table, "padding_idx", None) if table is not None else None
        return 0 if padding_idx is None else int(padding_idx) + 1
    get = source.get if isinstance(source, dict) else (lambda key: getattr(source, key, None))
    if get("model_type") not in PADDED_POSITION_MODEL_TYPES:
        return 0
    pad = get("pad_token_id")
    return (1 if pad is None else int(pad)) + 1


def token_positions(lm: nn.Module) -> int | None:
    """How many tokens the absolute position table holds (None for rotary models)."""
    embeddings = lm.base_model.embeddings
    table = absolute_position_table(embeddings)
    return None if table is None else table.num_embeddings - position_offset(embeddings)


def extend_position_table(lm: nn.Module, positions: int) -> bool:
    """Grow an absolute position table to `positions` tokens by copying the trained rows block by
    block (new token position t gets trained row t mod P, the recipe Longformer and bge-m3 used:
    it keeps local order inside each block and starts from embeddings the encoder already knows).

    Reserved rows before the first position (RoBERTa/XLM-R padding_idx + 1) stay as they are. Updates
    config.max_position_embeddings and the embedding module's `position_ids` / `token_type_ids`
    buffers, so save_pretrained writes a config that rebuilds the larger table. Returns False when the
    table already has exactly `positions` tokens (nothing to do, e.g. when resuming an extended model).
    """
    embeddings = lm.base_model.embeddings
    table = absolute_position_table(embeddings)
    if table is None:
        kind = "rotary (RoPE)" if rope_settings(lm.config) is not None else "non-absolute"
        raise UserError(f"--extend-positions {positions}: {type(lm).__name__} has {kind} positions and no position "
                        f"table to extend; it takes sequences up to max_position_embeddings "
                        f"({getattr(lm.config, 'max_position_embeddings', '?')}) as it is. Drop --extend-positions.")
    offset = position_offset(embeddings)
    current = table.num_embeddings - offset
    if positions < current:
        raise UserError(f"--extend-positions {positions} is smaller than the model's {current} positions; "
                        f"it can only grow the table (give N > {current}, or 0 to keep it).")
    if positions == current:
        return False
    old = table.weight.detach()
    rows = positions + offset
    grown = nn.Embedding(rows, old.shape[1], padding_idx=table.padding_idx, device=old.device, dtype=old.dtype)
    with torch.no_grad():
        grown.weight[:offset] = old[:offset]
        trained = old[offset:]
        for start in range(0, positions, current):
            block = min(current, positions - start)
            grown.weight[offset + start:offset + start + block] = trained[:block]
    grown.weight.requires_grad_(table.weight.requires_grad)
    embeddings.position_embeddings = grown
    for name, fill in (("position_ids", "arange"), ("token_type_ids", "zeros")):
        buffer = getattr(embeddings, name, None)
        if isinstance(buffer, torch.Tensor):
            values = torch.arange(rows, device=buffer.device) if fill == "arange" else \
                torch.zeros(rows, dtype=buffer.dtype, device=buffer.device)
            persistent = name not in embeddings._non_persistent_buffers_set
            embeddings.register_buffer(name, values.to(buffer.dtype).expand(1, -1), persistent=persistent)
    lm.config.max_position_embeddings = rows
    return True
