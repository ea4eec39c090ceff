"""RetroMAEForPretraining: the loss equals a naive re-implementation of the published reference (dense
additive mask, full logits), fast heads equal naive heads, checkpointing changes nothing, reference
checkpoints load strictly, save/load round-trips, and BERT / RoBERTa / XLM-R tiny models learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoModel, BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM,
                          XLMRobertaConfig, XLMRobertaForMaskedLM)
from transformers.models.bert.modeling_bert import BertLayer

from retromae_ds.data.masking import MaskGenerator, collate_blocks, continuation_table, mask_rng
from retromae_ds.errors import UserError
from retromae_ds.model.decoder import EnhancedDecoderLayer
from retromae_ds.model.positions import PADDED_POSITION_MODEL_TYPES, position_offset
from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining
from tests.helpers.corpora import lee_articles
from tests.helpers.masking_data import VOCAB, synthetic_batch
from tests.helpers.tiny_models import decoder_loss_after_training, grads, tiny_bert


def attention_of(batch: dict) -> torch.Tensor:
    """The encoder mask; a static batch without padding has none (all ones)."""
    mask = batch["encoder_attention_mask"]
    return torch.ones_like(batch["encoder_input_ids"]) if mask is None else mask


# --------------------------------------------------------------------------------------------------
# An independent, naive implementation of the published reference's forward


def naive_reference_loss(model: RetroMAEForPretraining, batch: dict, objective: str) -> torch.Tensor:
    """Full logits everywhere, HF's own MLM loss for the encoder, and a hand-written BERT layer with
    an additive [B, 1, L, L] mask for the decoder (as the reference did via get_extended_attention_mask)."""
    lm = model.lm
    out = lm(input_ids=batch["encoder_input_ids"], attention_mask=attention_of(batch),
             labels=batch["encoder_labels"], output_hidden_states=True)
    cls = out.hidden_states[-1][:, :1]
    embeddings = lm.base_model.embeddings
    ids = batch["decoder_input_ids"]
    batch_size, length = ids.shape
    kv = torch.cat([cls, embeddings(input_ids=ids)[:, 1:]], dim=1)
    query = embeddings(inputs_embeds=cls.expand(batch_size, length, cls.shape[-1]))
    additive = (1.0 - batch["decoder_attention_mask"].float()[:, None]) * torch.finfo(torch.float32).min

    layer = model.c_head
    heads = lm.config.num_attention_heads
    split = lambda x: x.view(batch_size, length, heads, -1).transpose(1, 2)  # noqa: E731
    q = split(layer.attention.self.query(query))
    k, v = split(layer.attention.self.key(kv)), split(layer.attention.self.value(kv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + additive
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch_size, length, -1)
    attn = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + query)
    ffn = F.gelu(layer.intermediate.dense(attn))
    decoded = layer.output.LayerNorm(layer.output.dense(ffn) + attn)
    logits = model.mlm_head(decoded)
    decoder_loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch["decoder_labels"].view(-1))
    loss = out.loss + decoder_loss
    if objective == "dupmae":
        # the DupMAE reference: max over positions 1.. of the encoder logits (padding pushed down by
        # 1000), log-softmax, targets weight[t] = 1 / len(tokens) for every token t of the sample
        mask = attention_of(batch)[:, 1:, None].float()
        pooled = (out.logits[:, 1:] + (1 - mask) * -1000).max(dim=1).values
        weights = torch.zeros(batch_size, logits.shape[-1], device=logits.device)
        for b in range(batch_size):
            tokens = [t for t in batch["decoder_labels"][b].tolist() if t != -100]
            for t in tokens:
                weights[b, t] = 1 / len(tokens)
        loss = loss + 0.7 * torch.mean(-torch.sum(weights * F.log_softmax(pooled, dim=-1), dim=1))
    return loss


HEAD_VARIANTS = [pytest.param(True, None, None, id="fast"), pytest.param(True, 5, None, id="fast-chunked"),
                 pytest.param(False, None, None, id="naive"),
                 # static shapes (the trainer's path): padded batch, and one without padding (no encoder mask)
                 pytest.param(True, None, (20, 13, 6, 17), id="static-padded"),
                 pytest.param(True, 5, (22, 22, 22), id="static-unpadded-chunked")]


@pytest.mark.parametrize("objective", ["retromae", "dupmae"])
@pytest.mark.parametrize("fast_heads, chunk, static", HEAD_VARIANTS)
def test_loss_and_gradients_match_the_naive_reference(objective, fast_heads, chunk, static):
    torch.manual_seed(0)
    config = RetroMAEConfig(objective=objective, bow_loss_weight=0.7, fast_heads=fast_heads, ce_chunk_size=chunk)
    model = RetroMAEForPretraining(tiny_bert(), config).train()
    batch = synthetic_batch(lengths=static, static=True) if static else synthetic_batch()
    if static:
        assert batch["encoder_label_capacity"] > int((batch["encoder_labels"] != -100).sum())  # filler rows exist
        assert (batch["encoder_attention_mask"] is None) == (len(set(static)) == 1)
    else:
        assert (~batch["decoder_attention_mask"].any(-1)).any()  # padding rows without a visible key exist

    expected = naive_reference_loss(model, batch, objective)
    expected.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)

    out = model(**batch)
    out.loss.backward()
    got = grads(model)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - expected.item()) < 1e-5, (out.loss.item(), expected.item())
    assert out[0] is out.loss
    assert (out.bow_loss is not None) == (objective == "dupmae")
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name


def test_fast_heads_equal_naive_heads_with_a_large_vocabulary():
    """XLM-R-like vocabulary (5,000 ids here) with a small chunk: loss, accuracy and gradients agree."""
    results = []
    for fast, chunk in ((False, None), (True, 16)):
        torch.manual_seed(1)
        model = RetroMAEForPretraining(tiny_bert(vocab=5000), RetroMAEConfig(fast_heads=fast, ce_chunk_size=chunk))
        out = model(**synthetic_batch(seed=3))
        out.loss.backward()
        results.append((out, grads(model)))
    (naive, naive_grads), (fast, fast_grads) = results
    for field in ("loss", "encoder_loss", "decoder_loss", "encoder_accuracy", "encoder_tokens", "decoder_tokens"):
        assert torch.allclose(getattr(naive, field).float(), getattr(fast, field).float(), atol=1e-5), field
    for name in naive_grads:
        assert torch.allclose(naive_grads[name], fast_grads[name], atol=1e-5, rtol=1e-4), name


def test_decoder_layer_is_a_bert_layer():
    """c_head takes a BERT layer's weights strictly and, fed one stream as both query and key/value,
    computes what transformers' BertLayer computes with the equivalent additive mask."""
    config = tiny_bert().config
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    bert_layer = BertLayer(config).eval()
    layer = EnhancedDecoderLayer.from_config(config).eval()
    layer.load_state_dict(bert_layer.state_dict(), strict=True)
    hidden = torch.randn(3, 9, config.hidden_size)
    visible = torch.rand(3, 9, 9) > 0.4
    visible[..., 0] = True
    additive = (1.0 - visible.float()[:, None]) * torch.finfo(torch.float32).min
    with torch.no_grad():
        assert torch.allclose(layer(hidden, hidden, visible), bert_layer(hidden, additive), atol=1e-5)


def test_rows_without_visible_keys_stay_finite():
    layer = EnhancedDecoderLayer.from_config(tiny_bert().config)
    query = torch.randn(2, 6, 32, requires_grad=True)
    kv = torch.randn(2, 6, 32, requires_grad=True)
    visible = torch.zeros(2, 6, 6, dtype=torch.bool)
    visible[0, :3, 1:4] = True  # rows 3.. of sample 0 and all of sample 1 see nothing
    out = layer(query, kv, visible)
    (out[0, :3].sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(query.grad).all() and torch.isfinite(kv.grad).all()
    # the reference's integer mask (1 = visible) gives the same result as the boolean one
    assert torch.allclose(layer(query, kv, visible.long()), out)


def test_long_sequences_attend_in_row_blocks_with_the_same_result(monkeypatch):
    """Beyond ROW_BLOCKS_FROM the decoder attends in blocks of query rows (each under activation
    checkpointing): same outputs and gradients, padding rows without a visible key still finite."""
    from retromae_ds.model import decoder

    torch.manual_seed(0)
    layer = EnhancedDecoderLayer.from_config(tiny_bert().config).eval()
    query, kv = torch.randn(2, 11, 32), torch.randn(2, 11, 32)
    visible = torch.rand(2, 11, 11) > 0.5
    visible[1, 8:] = False  # padding rows: no visible key
    results = []
    for blocks_from in (10 ** 9, 0):
        layer.attention.self.row_blocks_from = blocks_from
        monkeypatch.setattr(decoder, "ROW_BLOCK", 4)  # blocks of 4, 4, 3 rows
        q, k = query.clone().requires_grad_(), kv.clone().requires_grad_()
        out = layer(q, k, visible)
        out.square().sum().backward()
        results.append((out, q.grad, k.grad, grads(layer)))
        layer.zero_grad(set_to_none=True)
    (out_a, qa, ka, ga), (out_b, qb, kb, gb) = results
    assert torch.isfinite(out_b).all()
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert torch.allclose(qa, qb, atol=1e-6) and torch.allclose(ka, kb, atol=1e-6)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6), name


def test_mlm_objective_runs_only_the_encoder():
    torch.manual_seed(0)
    model = RetroMAEForPretraining(tiny_bert(), RetroMAEConfig(objective="mlm"))
    batch = synthetic_batch()
    out = model(**batch)
    out.loss.backward()
    hf = model.lm(input_ids=batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"],
                  labels=batch["encoder_labels"]).loss
    assert out.decoder_loss is None and out.bow_loss is None
    assert torch.allclose(out.loss, hf, atol=1e-6) and torch.allclose(out.encoder_loss, hf, atol=1e-6)
    assert all(not p.requires_grad and p.grad is None for p in model.c_head.parameters())
    assert all(p.grad is not None for p in model.lm.parameters())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = synthetic_batch(seed=2)
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = RetroMAEForPretraining(tiny_bert(dropout=0.1)).train()
        if enabled:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing and model.lm.is_activation_checkpointing
        torch.manual_seed(123)  # same dropout masks
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.item(), grads(model)))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_off == pytest.approx(loss_on, abs=1e-6)
    for name in grads_off:
        assert torch.allclose(grads_off[name], grads_on[name], atol=1e-6), name
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and not model.lm.is_activation_checkpointing


# --------------------------------------------------------------------------------------------------
# checkpoints


class ReferenceLayout(nn.Module):
    """The attribute layout of the published reference module: the HF model as `lm`, its embedding
    module registered a second time as `decoder_embeddings`, and a BERT layer as `c_head`."""

    def __init__(self, lm: BertForMaskedLM) -> None:
        super().__init__()
        self.lm = lm
        self.decoder_embeddings = lm.bert.embeddings
        self.c_head = BertLayer(lm.config)


def test_reference_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(5)
    reference = ReferenceLayout(tiny_bert())
    state = reference.state_dict()
    assert any(k.startswith("decoder_embeddings.") for k in state)
    state["lm.bert.embeddings.position_ids"] = torch.arange(64)[None]  # what older transformers saved
    torch.save(state, tmp_path / "pytorch_model.bin")
    reference.lm.save_pretrained(tmp_path / "encoder_model")

    model = RetroMAEForPretraining.from_pretrained(tmp_path)
    own = model.state_dict()
    assert set(own) == {k for k in state if not k.startswith("decoder_embeddings.") and "position_ids" not in k}
    for key, value in own.items():
        assert torch.equal(value, state[key]), key
    # the same state also loads through load_state_dict(strict=True)
    fresh = RetroMAEForPretraining(tiny_bert())
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.c_head.output.dense.weight, reference.c_head.output.dense.weight)

    broken = {k: v for k, v in state.items() if k != "c_head.intermediate.dense.weight"}
    torch.save(broken, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="c_head.intermediate.dense.weight"):
        RetroMAEForPretraining.from_pretrained(tmp_path)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    config = RetroMAEConfig(objective="dupmae", bow_loss_weight=0.25, ce_chunk_size=32)
    model = RetroMAEForPretraining(tiny_bert(), config).eval()
    with torch.no_grad():
        model.c_head.output.dense.weight.add_(1.0)  # not a fresh initialisation
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["encoder_model", "model.safetensors",
                                                                     "retromae_config.json"]
    loaded = RetroMAEForPretraining.from_pretrained(tmp_path / "out").eval()
    assert loaded.config == config
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    tied = loaded.lm.cls.predictions.decoder.weight
    assert tied.data_ptr() == loaded.lm.bert.embeddings.word_embeddings.weight.data_ptr()
    batch = synthetic_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)
        encoder = AutoModel.from_pretrained(tmp_path / "out" / "encoder_model").eval()
        ids, mask = batch["decoder_input_ids"], batch["encoder_attention_mask"]
        assert torch.allclose(encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                              model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-6)
    model.save_pretrained(tmp_path / "out")  # overwriting an existing folder works and leaves no staging dirs
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_plain_hugging_face_folder_gets_a_fresh_decoder(tmp_path):
    torch.manual_seed(0)
    lm = tiny_bert()
    lm.save_pretrained(tmp_path)
    model = RetroMAEForPretraining.from_pretrained(tmp_path, RetroMAEConfig(objective="retromae"))
    assert torch.equal(model.lm.bert.embeddings.word_embeddings.weight, lm.bert.embeddings.word_embeddings.weight)
    weight = model.c_head.attention.self.query.weight
    assert abs(weight.std().item() - lm.config.initializer_range) < 0.005  # BERT initialisation
    assert torch.equal(model.c_head.output.LayerNorm.weight, torch.ones(32))
    with pytest.raises(UserError, match="no such folder"):
        RetroMAEForPretraining.from_pretrained(tmp_path / "missing")


def test_architectures_without_an_mlm_head_are_user_errors():
    from transformers import BertModel, DistilBertConfig, DistilBertForMaskedLM

    with pytest.raises(UserError, match="base_model"):
        RetroMAEForPretraining(BertModel(tiny_bert().config))
    distil = DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, hidden_dim=64))
    with pytest.raises(UserError, match="lacks intermediate_size"):  # its head chains, its config is not BERT's
        RetroMAEForPretraining(distil)
    with pytest.raises(UserError, match="objective"):
        RetroMAEConfig(objective="contrastive")


class SummedHeadsLM(BertForMaskedLM):
    """Two head parts that the forward adds instead of chaining: not reusable as one head."""

    def __init__(self, config):
        super().__init__(config)
        self.extra = nn.Linear(config.hidden_size, config.vocab_size)

    def get_output_embeddings(self):
        return self.extra

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import MaskedLMOutput

        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        return MaskedLMOutput(logits=self.cls(hidden) + self.extra(hidden))


def test_a_head_in_parts_that_do_not_chain_is_refused():
    with pytest.raises(UserError, match="not applied as a simple chain"):
        RetroMAEForPretraining(SummedHeadsLM(tiny_bert().config))


# --------------------------------------------------------------------------------------------------
# the decoder uses position


def test_bert_decoder_uses_positions():
    torch.manual_seed(0)
    with_positions = decoder_loss_after_training(RetroMAEForPretraining(tiny_bert()))
    torch.manual_seed(0)
    blind = RetroMAEForPretraining(tiny_bert())
    table = blind.lm.bert.embeddings.position_embeddings.weight
    with torch.no_grad():
        table.zero_()  # the same model with its (only) position signal removed
    table.requires_grad_(False)
    without = decoder_loss_after_training(blind)
    assert without > 2.0, without  # near the entropy of a sample's tokens
    assert with_positions < 0.4 * without, (with_positions, without)


# --------------------------------------------------------------------------------------------------
# --extend-positions


def test_extend_positions_copies_rows_block_by_block_bert(tmp_path):
    from retromae_ds.model.positions import extend_position_table

    torch.manual_seed(0)
    model = RetroMAEForPretraining(tiny_bert()).eval()  # 64 positions
    old = model.lm.bert.embeddings.position_embeddings.weight.detach().clone()
    assert extend_position_table(model.lm, 150)
    new = model.lm.bert.embeddings.position_embeddings.weight
    assert new.shape == (150, 32) and model.lm.config.max_position_embeddings == 150
    assert torch.equal(new[:64], old) and torch.equal(new[64:128], old) and torch.equal(new[128:], old[:22])
    assert new.requires_grad and model.lm.bert.embeddings.position_ids.shape == (1, 150)
    assert model.lm.bert.embeddings.token_type_ids.shape == (1, 150)
    assert not extend_position_table(model.lm, 150)  # already that size: nothing to do
    with pytest.raises(UserError, match="smaller than the model's 150 positions"):
        extend_position_table(model.lm, 100)

    # the model runs at the new length (longer than the old table), and its state round-trips
    batch = synthetic_batch(lengths=(140, 97))
    assert batch["encoder_input_ids"].shape[1] > 64
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    model.save_pretrained(tmp_path / "out")
    loaded = RetroMAEForPretraining.from_pretrained(tmp_path / "out").eval()
    assert loaded.lm.config.max_position_embeddings == 150
    assert torch.equal(loaded.lm.bert.embeddings.position_embeddings.weight, new)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).loss, loss)
    encoder = AutoModel.from_pretrained(tmp_path / "out" / "encoder_model")
    assert encoder.embeddings.position_embeddings.num_embeddings == 150


def test_extend_positions_keeps_roberta_reserved_rows(byte_level_tokenizer):
    from retromae_ds.model.positions import extend_position_table, token_positions

    torch.manual_seed(0)
    lm = build_tiny("roberta", byte_level_tokenizer, 64)  # 66 rows: pad_token_id + 1 = 2 reserved
    old = lm.roberta.embeddings.position_embeddings.weight.detach().clone()
    assert token_positions(lm) == 64
    extend_position_table(lm, 160)
    new = lm.roberta.embeddings.position_embeddings.weight
    assert new.shape[0] == 162 and lm.config.max_position_embeddings == 162 and token_positions(lm) == 160
    assert torch.equal(new[:2], old[:2])  # reserved rows untouched
    for start in (0, 64, 128):  # token position t gets trained row t mod 64
        block = min(64, 160 - start)
        assert torch.equal(new[2 + start:2 + start + block], old[2:2 + block]), start
    ids = torch.randint(5, len(byte_level_tokenizer), (1, 150))
    assert lm(input_ids=ids).logits.shape == (1, 150, len(byte_level_tokenizer))


@pytest.mark.parametrize("model_type", sorted(PADDED_POSITION_MODEL_TYPES) + ["bert"])
def test_position_offset_from_a_config_equals_the_built_models(model_type):
    """The rule read from a config (prepare, --max-seq-len checks: no model built) says what transformers
    builds: padding_idx + 1 reserved rows for the RoBERTa family, none for BERT."""
    from transformers import AutoConfig, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=40)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        embeddings = AutoModelForMaskedLM.from_config(config).base_model.embeddings
    finally:
        hf_logging.set_verbosity(verbosity)
    built = position_offset(embeddings)
    assert built == (0 if model_type == "bert" else config.pad_token_id + 1)
    assert position_offset(config) == position_offset(json.loads(config.to_json_string())) == built


def test_build_model_applies_extend_positions(minilm_tokenizer, tmp_path):
    from retromae_ds.config import TrainConfig
    from retromae_ds.engine.build import build_model, resolve_max_seq_len, write_model_files

    (tmp_path / "cfg").mkdir()
    tiny_bert(vocab=len(minilm_tokenizer)).config.save_pretrained(tmp_path / "cfg")
    cfg = TrainConfig(model_config=str(tmp_path / "cfg"), tokenizer="unused", extend_positions=256)
    tokenizer = type(minilm_tokenizer).from_pretrained(minilm_tokenizer.name_or_path)
    model = build_model(cfg, tokenizer)
    assert model.lm.config.max_position_embeddings == 256
    cfg.max_seq_len = 200
    assert resolve_max_seq_len(cfg, {"max_seq_len": 64}, model.lm.config) == 200  # beyond the old 64
    cfg.max_seq_len = 300
    with pytest.raises(UserError, match="exceeds the model's 256 positions"):
        resolve_max_seq_len(cfg, {"max_seq_len": 64}, model.lm.config)
    assert tokenizer.model_max_length >= 256
    write_model_files(model, tokenizer, cfg, tmp_path / "model_config")
    assert json.loads((tmp_path / "model_config" / "config.json").read_text())["max_position_embeddings"] == 256


# --------------------------------------------------------------------------------------------------
# console


def test_loading_an_encoder_without_mlm_head_prints_one_line(minilm_tokenizer_dir, capfd):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    capfd.readouterr()
    RetroMAEForPretraining.from_pretrained(minilm_tokenizer_dir)
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines == ["[retromae-ds] no MLM head in this checkpoint: a new one is initialised"], lines
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled()


# --------------------------------------------------------------------------------------------------
# every tokenizer family trains


def build_tiny(family: str, tokenizer, max_len: int):
    common = dict(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "bert":
        return BertForMaskedLM(BertConfig(max_position_embeddings=max_len, **common))
    config_cls, model_cls = (RobertaConfig, RobertaForMaskedLM) if family == "roberta" else \
        (XLMRobertaConfig, XLMRobertaForMaskedLM)
    config = config_cls(max_position_embeddings=max_len + 2, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **common)
    return model_cls(config)


@pytest.mark.parametrize("family, which, objective", [
    # learning on real runs is checked by the default tier's engine runs, the math by test_math_reference.py
    pytest.param("bert", "minilm_tokenizer", "retromae", marks=pytest.mark.full),
    pytest.param("roberta", "byte_level_tokenizer", "retromae", marks=pytest.mark.full),
    pytest.param("xlmr", "sentencepiece_tokenizer", "retromae", marks=pytest.mark.full),
    pytest.param("roberta", "byte_level_tokenizer", "dupmae", marks=pytest.mark.full),
])
def test_tiny_models_learn(request, family, which, objective):
    tokenizer = request.getfixturevalue(which)
    torch.manual_seed(0)
    model = RetroMAEForPretraining(build_tiny(family, tokenizer, 64), RetroMAEConfig(objective=objective))
    assert type(model.encoder).__name__.lower().startswith(family)
    generator = MaskGenerator(continuation_table(tokenizer), tokenizer.cls_token_id, tokenizer.sep_token_id,
                              tokenizer.pad_token_id, tokenizer.mask_token_id, len(tokenizer),
                              tokenizer.all_special_ids)
    ids = [i for text in lee_articles(12) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    blocks = [np.array(ids[k:k + 38]) for k in range(0, 8 * 38, 38)]
    tokens, lengths = collate_blocks(blocks, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        batch = generator(tokens, lengths, mask_rng(0, step, 0, "cpu"))
        out = model(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        assert math.isfinite(losses[-1])
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_summed_cross_entropy_equals_stock_cross_entropy(monkeypatch):
    """The fast heads' cross-entropy (fp32 math in row blocks, one-buffer backward) is the stock one."""
    from retromae_ds.model import heads

    monkeypatch.setattr(heads, "ROW_BLOCK_ELEMENTS", 40)  # two rows of 20 logits per block
    target = torch.randint(0, 20, (7,))
    logits = torch.randn(7, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: heads.summed_cross_entropy(z, target), (logits,))
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-4)):
        z = torch.randn(9, 20).to(dtype).requires_grad_()
        ours = heads.summed_cross_entropy(z, target.repeat(2)[:9])
        stock = F.cross_entropy(z.float(), target.repeat(2)[:9], reduction="sum")
        assert torch.allclose(ours, stock, rtol=1e-6)
        g_ours, = torch.autograd.grad(0.37 * ours, z)
        g_stock, = torch.autograd.grad(0.37 * stock, z)
        assert g_ours.dtype == dtype and torch.allclose(g_ours.float(), g_stock.float(), atol=tol)
    ignored = target.clone()
    ignored[[1, 4]] = -100                                 # filler rows of a static selection: zero loss and grad
    z = torch.randn(7, 20, requires_grad=True)
    ours, stock = heads.summed_cross_entropy(z, ignored), F.cross_entropy(z, ignored, reduction="sum")
    assert torch.allclose(ours, stock, rtol=1e-6)
    g_ours, = torch.autograd.grad(ours, z)
    g_stock, = torch.autograd.grad(stock, z)
    assert torch.allclose(g_ours, g_stock, atol=1e-6) and not g_ours[[1, 4]].any()


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ready_made_padding_mask_equals_the_2d_mask(family, attn):
    """The encoder gets an additive [B, 1, 1, L] padding mask (no `mask.all()` read by transformers):
    the encoder's output at real positions must be the 2D mask's, for both attention kernels."""
    torch.manual_seed(0)
    cls, config_cls = (BertForMaskedLM, BertConfig) if family == "bert" else (RobertaForMaskedLM, RobertaConfig)
    config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=80, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation=attn)
    model = RetroMAEForPretraining(cls(config)).eval()
    batch = synthetic_batch()
    mask = batch["encoder_attention_mask"]
    prepared = model._encoder_mask(mask)
    assert prepared.shape == (mask.shape[0], 1, 1, mask.shape[1])
    ids = batch["encoder_input_ids"]
    ours = model.lm.base_model(input_ids=ids, attention_mask=prepared)[0]
    theirs = model.lm.base_model(input_ids=ids, attention_mask=mask)[0]
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-6)
