"""Trainer features checked in-process (no DeepSpeed launch): what --activation-checkpointing does to
the model the trainer builds. The end-to-end runs are in test_engine.py."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_run import tiny_bert_config_dir


def build(tmp_path, tokenizer_dir, activation_checkpointing: bool):
    from retromae_ds.config import TrainConfig
    from retromae_ds.engine.build import build_model, load_tokenizer

    folder = tiny_bert_config_dir(tmp_path)
    cfg = TrainConfig(data=["unused"], model_config=str(folder), tokenizer=tokenizer_dir, seed=3,
                      activation_checkpointing=activation_checkpointing)
    return build_model(cfg, load_tokenizer(cfg))


def batch(seed: int = 0, size: int = 4, length: int = 64) -> dict:
    """A RetroMAE batch in the model's input contract: 15% masked encoder tokens, a decoder that sees
    [CLS] plus half of the other tokens per row, every non-special token a decoder label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (size, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    attention = torch.ones(size, length, dtype=torch.long)
    masked = torch.rand(size, length, generator=g) < 0.15
    masked[:, 0] = masked[:, -1] = False
    enc_ids = ids.masked_fill(masked, 103)
    enc_labels = ids.masked_fill(~masked, -100)
    visible = (torch.rand(size, length, length, generator=g) < 0.5).long()
    visible[:, :, 0] = 1
    dec_labels = ids.clone()
    dec_labels[:, 0] = dec_labels[:, -1] = -100
    return dict(encoder_input_ids=enc_ids, encoder_attention_mask=attention, encoder_labels=enc_labels,
                decoder_input_ids=ids, decoder_attention_mask=visible, decoder_labels=dec_labels)


def train_step_saved_bytes(model, inputs) -> tuple[int, torch.Tensor, dict]:
    """Bytes of activations that autograd keeps for backward from inside the encoder layers and the
    decoder layer (what activation checkpointing drops and recomputes; parameters not counted), the
    loss, and the gradients after backward."""
    layers = list(model.lm.base_model.encoder.layer) + [model.c_head]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    depth = [0]
    storages: dict[int, int] = {}

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if depth[0] > 0 and ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter),
                                               layer.register_forward_hook(leave))]
    model.train()
    torch.manual_seed(11)  # dropout: the same draws for both models (checkpointing replays RNG state)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    assert depth[0] == 0
    out.loss.backward()
    for h in handles:
        h.remove()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return sum(storages.values()), out.loss.detach(), grads


def test_activation_checkpointing_keeps_less_for_backward_and_gives_the_same_gradients(tmp_path,
                                                                                      minilm_tokenizer_dir):
    plain = build(tmp_path, minilm_tokenizer_dir, activation_checkpointing=False)
    ac = build(tmp_path, minilm_tokenizer_dir, activation_checkpointing=True)
    assert ac.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    ac.load_state_dict(plain.state_dict())
    inputs = batch()
    kept_plain, loss_plain, grads_plain = train_step_saved_bytes(plain, inputs)
    kept_ac, loss_ac, grads_ac = train_step_saved_bytes(ac, inputs)
    # checkpointed layers keep nothing for backward (they are recomputed from their inputs)
    assert kept_plain > 1_000_000 and kept_ac < 0.05 * kept_plain, (kept_ac, kept_plain)
    assert torch.equal(loss_ac, loss_plain)
    assert grads_ac.keys() == grads_plain.keys()
    for name in grads_plain:
        assert torch.allclose(grads_ac[name], grads_plain[name], atol=1e-6, rtol=1e-5), name
