"""Tiny in-process models for the model tests (no DeepSpeed): a 2-layer BERT over the synthetic vocabulary,
its gradients, and a short training loop that shows whether the decoder uses positions."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from retromae_ds.data.masking import collate_blocks, mask_rng
from retromae_ds.model.retromae import RetroMAEForPretraining
from tests.helpers.masking_data import VOCAB, synthetic_block, synthetic_generator


def tiny_bert(dropout: float = 0.0, vocab: int = VOCAB) -> BertForMaskedLM:
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    return BertForMaskedLM(config)


def grads(model: nn.Module) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def fixed_blocks(seed: int = 0, n: int = 4, length: int = 22):
    rng = random.Random(seed)
    blocks = [np.array(synthetic_block([rng.choice([1, 1, 2]) for _ in range(length)], rng)[:length])
              for _ in range(n)]
    return collate_blocks(blocks, 0, pad_to_multiple_of=None)


def decoder_loss_after_training(model: RetroMAEForPretraining, steps: int = 150, lr: float = 1e-2) -> float:
    """Train on one fixed batch of tokens (fresh masks every step); mean decoder loss of the last 20 steps.

    With positions the decoder can learn which token sits at each row of these few samples; without,
    every row of a sample looks alike and the loss cannot go much below the entropy of its tokens."""
    generator = synthetic_generator()
    tokens, lengths = fixed_blocks()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only wait on each other on a busy machine
    try:
        for step in range(steps):
            out = model(**generator(tokens, lengths, mask_rng(0, step, 0, "cpu")))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            history.append(out.decoder_loss.item())
    finally:
        torch.set_num_threads(threads)
    return float(np.mean(history[-20:]))
