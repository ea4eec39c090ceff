"""RetroMAE's enhanced decoder: one BERT-shaped layer whose queries and keys/values differ.

The query stream carries only the sentence embedding (plus each position's embedding); the
key/value stream carries the unmasked token embeddings. Each query row sees the keys its row of
the [B, L, L] matrix mask allows. Parameter names copy a BERT layer (`attention.self.query`, ...,
`output.LayerNorm`) so the published reference's `c_head.*` weights load unchanged.

Positions: BERT-like encoders give both streams positions through their embedding module. For a
rotary encoder (ModernBERT) the layer gets a `RotaryEmbedding` (retromae_ds/model/positions.py,
which says why) that rotates its queries and keys, as the encoder's own attention does.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` with a boolean mask.
A row with no visible key (padding rows) would come out NaN there, and NaN * 0 is still NaN in
the loss and gradients, so such rows get column 0 as their one visible key: their outputs are
never scored, so any finite value is harmless.

Long sequences (L > ROW_BLOCKS_FROM = 1,024) attend in blocks of ROW_BLOCK query rows, each block
under activation checkpointing; rows are independent, so the result is the same. Why: SDPA turns
the boolean mask into a float one (4 x B x L^2 bytes, 256 MB per sample at L = 8,192) and keeps it
for backward, and with attention dropout (0.1 in BERT configs) its CPU path materialises all
B x heads x L^2 probabilities. Measured on the CPU (bench/bench_long_context.py, results in
bench/results/long_context_cpu.json: hidden 768, 12 heads, batch 1, one decoder forward + backward),
memory held after the forward / peak:
  L = 2,048  dropout 0:   117 / 144 MB all rows at once,  101 / 128 MB in row blocks
  L = 2,048  dropout 0.1: 678 / 811 MB,                    102 / 453 MB
  L = 4,096  dropout 0.1: 2,502 / 3,151 MB,                198 / 899 MB
  L = 8,192  dropout 0:   646 / 746 MB,                    389 / 489 MB
  (one BERT-base encoder layer at L = 8,192: 385 MB held; 24 MB with activation checkpointing)
Row blocks recompute the attention in backward: +3% to +17% time at L = 8,192 without dropout, ~2x
with it on the CPU (the math path). At L <= 1,024 nothing changes. An additive float mask built by
the caller measured the same as the boolean one; the reference's matmul + softmax held 2.5x the
memory (4x the peak) and took ~2x the time at L = 2,048.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from retromae_ds.errors import UserError

ROW_BLOCK = 1024  # query rows per attention block for long sequences
ROW_BLOCKS_FROM = 1024  # sequences longer than this attend in row blocks (see the module docstring)

# decoder argument -> the config attributes that carry it (BERT's name first, then ModernBERT's)
CONFIG_FIELDS = {
    "hidden_size": ("hidden_size",),
    "num_attention_heads": ("num_attention_heads",),
    "intermediate_size": ("intermediate_size",),
    "hidden_act": ("hidden_act", "hidden_activation"),
    "layer_norm_eps": ("layer_norm_eps", "norm_eps"),
    "hidden_dropout_prob": ("hidden_dropout_prob", "mlp_dropout"),
    "attention_probs_dropout_prob": ("attention_probs_dropout_prob", "attention_dropout"),
    "initializer_range": ("initializer_range",),
}


class CrossStreamSelfAttention(nn.Module):
    """Multi-head attention of the query stream over the key/value stream (BERT `attention.self`)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.rotary = rotary  # rotates queries and keys by position (rotary encoders); None for BERT-like
        self.row_blocks_from = ROW_BLOCKS_FROM
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """visible: bool [B, L, L]; rows without a visible key get column 0 (see with_fallback_key)."""
        q, k, v = self._split(self.query(query)), self._split(self.key(key_value)), self._split(self.value(key_value))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        dropout = self.dropout if self.training else 0.0
        batch, _, length, _ = q.shape
        if length <= self.row_blocks_from:
            out = _attend(q, k, v, visible, dropout)
        else:
            blocks = []
            for start in range(0, length, ROW_BLOCK):
                rows = (q[:, :, start:start + ROW_BLOCK], k, v, visible[:, start:start + ROW_BLOCK], dropout)
                blocks.append(checkpoint(_attend, *rows, use_reentrant=False) if torch.is_grad_enabled()
                              else _attend(*rows))
            out = torch.cat(blocks, dim=2)
        return out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)


def _attend(q, k, v, visible, dropout: float):
    """SDPA of query rows over all keys; the [B, rows, L] boolean mask gets its fallback key here, so a
    long sequence never holds a second full-size copy of it."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=with_fallback_key(visible)[:, None], dropout_p=dropout)


class ResidualNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's `attention.output` and `output`."""

    def __init__(self, in_size: int, hidden_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class DecoderAttention(nn.Module):
    """BERT `attention`: `self` (the attention proper) + `output` (projection, residual on the query)."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float, hidden_dropout: float,
                 attention_dropout: float, rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.self = CrossStreamSelfAttention(hidden_size, num_heads, attention_dropout, rotary)
        self.output = ResidualNorm(hidden_size, hidden_size, eps, hidden_dropout)

    def forward(self, query, key_value, visible):
        return self.output(self.self(query, key_value, visible), query)


class Intermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[act] if isinstance(act, str) else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class EnhancedDecoderLayer(nn.Module):
    """attention(query, key/value, mask) + residual on the query + LayerNorm, then the FFN."""

    def __init__(self, hidden_size: int, num_attention_heads: int, intermediate_size: int, hidden_act="gelu",
                 layer_norm_eps: float = 1e-12, hidden_dropout_prob: float = 0.1,
                 attention_probs_dropout_prob: float = 0.1, initializer_range: float = 0.02,
                 rotary: nn.Module | None = None) -> None:
        super().__init__()
        if hidden_size % num_attention_heads:
            raise UserError(f"model config: hidden_size {hidden_size} is not a multiple of num_attention_heads "
                            f"{num_attention_heads}; the decoder layer copies the encoder's head layout.")
        self.attention = DecoderAttention(hidden_size, num_attention_heads, layer_norm_eps, hidden_dropout_prob,
                                          attention_probs_dropout_prob, rotary)
        self.intermediate = Intermediate(hidden_size, intermediate_size, hidden_act)
        self.output = ResidualNorm(intermediate_size, hidden_size, layer_norm_eps, hidden_dropout_prob)
        self.reset_parameters(initializer_range)

    @classmethod
    def from_config(cls, config, rotary: bool = False) -> "EnhancedDecoderLayer":
        """Build from a Hugging Face encoder config (the decoder mirrors one encoder layer's sizes);
        `rotary`: rotate queries and keys with the encoder's RoPE settings (for rotary encoders)."""
        values, missing = {}, []
        for name, sources in CONFIG_FIELDS.items():
            found = next((getattr(config, src) for src in sources if getattr(config, src, None) is not None), None)
            if found is None:
                missing.append(name)
            values[name] = found
        if missing:
            raise UserError(f"model config ({type(config).__name__}) lacks {', '.join(missing)}, which the RetroMAE "
                            f"decoder layer needs; use a BERT/RoBERTa/XLM-R/ModernBERT style masked-LM model.")
        if rotary:
            from retromae_ds.model.positions import RotaryEmbedding

            head_dim = values["hidden_size"] // values["num_attention_heads"]
            values["rotary"] = RotaryEmbedding.from_config(config, head_dim)
        return cls(**values)

    def reset_parameters(self, std: float) -> None:
        """BERT's initialisation: normal(0, std) weights, zero biases, LayerNorm 1/0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """query, key_value: [B, L, H]; visible: [B, L, L] (nonzero/True = row may attend to column)."""
        attended = self.attention(query, key_value, visible.to(torch.bool))
        return self.output(self.intermediate(attended), attended)


def with_fallback_key(visible: torch.Tensor) -> torch.Tensor:
    """Make column 0 visible to rows that see nothing (avoids SDPA's NaN on fully masked rows)."""
    empty = ~visible.any(-1, keepdim=True)
    first = torch.arange(visible.shape[-1], device=visible.device) == 0
    return visible | (empty & first)
