"""Model FLOPs of a RetroMAE / DupMAE / MLM training step: the formula behind TFLOPs per device and MFU.

Matrix multiplications only (the usual MFU convention); `retromae_flops_per_sample` says what is
counted and what is not. Checked against torch.utils.flop_counter in tests/test_monitor.py.
"""

from __future__ import annotations


def transformer_layer_flops(seq_len: float, hidden: int, intermediate: int) -> float:
    """Forward matmul FLOPs of one BERT-shaped layer on `seq_len` query rows and `seq_len` keys.

    Q, K, V projections 3 * 2*L*h*h; scores Q K^T 2*L*L*h; weights x V 2*L*L*h; output projection
    2*L*h*h; feed-forward 2 * 2*L*h*f. (A multiply-add counts as 2 FLOPs.)
    """
    L, h, f = seq_len, hidden, intermediate
    return 8 * L * h * h + 4 * L * L * h + 4 * L * h * f


def mlm_head_flops(rows: float, hidden: int, vocab_size: int) -> float:
    """Forward FLOPs of a BERT MLM head on `rows` positions: transform dense h x h, then the
    projection to the vocabulary h x V."""
    return 2 * rows * hidden * hidden + 2 * rows * hidden * vocab_size


def retromae_flops_per_sample(model_config, seq_len: float, *, objective: str = "retromae",
                              num_encoder_masked: float | None = None, num_decoder_labelled: float | None = None,
                              fast_heads: bool = True, encoder_mask_ratio: float = 0.3) -> float:
    """Training FLOPs (forward + backward) of one sample of `seq_len` tokens ([CLS] and [SEP] included).

    Counted (matrix multiplications only, as in the usual MFU convention):
    - the encoder: num_hidden_layers x `transformer_layer_flops(L)` (attention scores included);
    - the decoder (retromae, dupmae): one layer of the same shape, L query rows over L keys;
    - the MLM head (`mlm_head_flops`) on the rows it is applied to. With fast heads that is the
      labelled rows only: the encoder's masked tokens (`num_encoder_masked`, by default
      `encoder_mask_ratio` of the L - 2 real tokens) and the decoder's labels (`num_decoder_labelled`,
      by default all L - 2 real tokens). Without fast heads, and for the DupMAE encoder (its
      bag-of-words pools logits over every position), the head runs on all L rows.
    - backward = 2 x forward, so training = 3 x forward. Activation-checkpoint recomputation is not
      counted (this is model FLOPs, not hardware FLOPs).
    Not counted: embeddings (lookups), LayerNorm, softmax, GELU, the losses, the optimizer: all
    linear in L*h or L*V with a small constant, below 1% for BERT-base at L=512.

    `objective` "mlm" is the encoder MLM alone (no decoder). Checked against
    torch.utils.flop_counter on a Hugging Face BertForMaskedLM in tests/test_monitor.py.
    """
    if objective not in ("retromae", "dupmae", "mlm"):
        raise ValueError(f"objective must be retromae, dupmae or mlm, got {objective!r}")
    h = int(model_config.hidden_size)
    f = int(model_config.intermediate_size)
    layers = int(model_config.num_hidden_layers)
    vocab = int(model_config.vocab_size)
    L = float(seq_len)
    real = max(L - 2.0, 0.0)
    enc_rows = num_encoder_masked if num_encoder_masked is not None else encoder_mask_ratio * real
    dec_rows = num_decoder_labelled if num_decoder_labelled is not None else real
    if not fast_heads or objective == "dupmae":
        enc_rows = L
    if not fast_heads:
        dec_rows = L

    forward = layers * transformer_layer_flops(L, h, f) + mlm_head_flops(enc_rows, h, vocab)
    if objective != "mlm":
        forward += transformer_layer_flops(L, h, f) + mlm_head_flops(dec_rows, h, vocab)
    return 3.0 * forward
