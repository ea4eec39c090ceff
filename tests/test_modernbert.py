"""ModernBERT in RetroMAE: its split MLM head (`head` then `decoder`) is found as the chain its own
forward uses, the decoder gets rotary positions with the encoder's settings (and really uses them),
every objective trains, checkpointing/save/load work, --extend-positions refuses a rotary model,
whole-word masking is checked against a ModernBERT-style byte-level BPE vocabulary, and a tiny
ModernBERT trains through the real trainer under ZeRO-2 and ZeRO-3 on 2 ranks (eval, resume, export)."""

from __future__ import annotations

import itertools
import json
import math
import os
import traceback

import numpy as np
import pytest
import torch
from transformers import AutoModel, ModernBertConfig, ModernBertForMaskedLM
from transformers.models.bert.modeling_bert import BertLayer

from retromae_ds.data.masking import (MaskGenerator, collate_blocks, continuation_table, mask_rng, tokenizer_family,
                                      word_break_table)
from retromae_ds.errors import UserError
from retromae_ds.model.positions import RotaryEmbedding, rope_settings
from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining
from scripts.sync_watch import TORCH_DIR, SyncWatch
from tests.helpers import engine_runs as R
from tests.helpers.masking_data import VOCAB, device_word_numbers, synthetic_batch
from tests.helpers.tiny_models import decoder_loss_after_training, grads, tiny_bert


def modernbert_config(vocab: int = VOCAB, **overrides) -> ModernBertConfig:
    """Tiny ModernBERT whose special ids match the synthetic batches (pad 0, [CLS] 2, [SEP] 3)."""
    values = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2,
                  eos_token_id=3)
    values.update(overrides)
    return ModernBertConfig(**values)


def tiny_modernbert(**overrides) -> ModernBertForMaskedLM:
    return ModernBertForMaskedLM(modernbert_config(**overrides))


def test_the_head_is_the_chain_the_model_itself_applies():
    torch.manual_seed(0)
    model = RetroMAEForPretraining(tiny_modernbert()).eval()
    assert model._head_names == ("head", "decoder")
    assert model.positions == "rotary"
    batch = synthetic_batch()
    ids, mask = batch["encoder_input_ids"], batch["encoder_attention_mask"]
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(model.mlm_head(hidden), model.lm(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    # nothing new in the state dict: c_head has exactly a BERT layer's keys (the reference layout)
    state = model.state_dict()
    bert_layer = {f"c_head.{k}" for k in BertLayer(tiny_bert().config).state_dict()}
    assert {k for k in state if k.startswith("c_head.")} == bert_layer
    assert set(state) - bert_layer == {f"lm.{k}" for k in model.lm.state_dict()}


@pytest.mark.parametrize("objective", ["retromae", "dupmae", "mlm"])
def test_every_objective_builds_forwards_and_backwards(objective):
    batch = synthetic_batch()
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = RetroMAEForPretraining(tiny_modernbert(), RetroMAEConfig(objective=objective, fast_heads=fast))
        out = model(**batch)
        out.loss.backward()
        results.append((out, grads(model)))
        assert torch.isfinite(out.loss)
        assert (out.decoder_loss is None) == (objective == "mlm")
        assert (out.bow_loss is not None) == (objective == "dupmae")
        decoder_grads = [g for name, g in results[-1][1].items() if name.startswith("c_head.")]
        if objective == "mlm":
            assert not decoder_grads
            hf = model.lm(input_ids=batch["encoder_input_ids"], attention_mask=batch["encoder_attention_mask"],
                          labels=batch["encoder_labels"]).loss
            assert torch.allclose(out.loss, hf, atol=1e-6)  # the model's own MLM loss: the head is its head
        else:
            assert len(decoder_grads) == 16 and all(g.abs().sum() > 0 for g in decoder_grads)
        head_grads = [name for name in results[-1][1] if name.startswith(("lm.head.", "lm.decoder."))]
        assert "lm.head.dense.weight" in head_grads and "lm.decoder.bias" in head_grads
    (fast, fast_grads), (naive, naive_grads) = results
    assert torch.allclose(fast.loss, naive.loss, atol=1e-5)  # the fast heads chain the parts like the model
    for name in naive_grads:
        assert torch.allclose(fast_grads[name], naive_grads[name], atol=1e-5, rtol=1e-4), name


def test_decoder_rotates_with_the_encoders_rotary_settings():
    """The decoder's rotation equals transformers' own RoPE for the encoder's full-attention layers
    (default theta 160,000, not the sliding layers' 10,000)."""
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    torch.manual_seed(0)
    model = RetroMAEForPretraining(ModernBertForMaskedLM(modernbert_config(hidden_size=64, num_attention_heads=2)))
    rotary = model.c_head.attention.self.rotary
    q, k = torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
    cos, sin = model.lm.model.rotary_emb(q, torch.arange(40)[None], "full_attention")
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.allclose(rotary(q), want_q, atol=1e-5) and torch.allclose(rotary(k), want_k, atol=1e-5)
    cos_local, _ = model.lm.model.rotary_emb(q, torch.arange(40)[None], "sliding_attention")
    assert not torch.allclose(cos, cos_local)  # the two settings differ, so the check above means something


class CopyWatch(SyncWatch):
    """SyncWatch plus every copy between two devices, host to device included: on a GPU a copy from
    pageable host memory blocks the host as a sync does."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = func._schema.name, kwargs or {}
        if name == "aten::_to_copy" and kwargs.get("device") is not None:
            source, target = args[0].device.type, torch.device(kwargs["device"]).type
        elif name == "aten::copy_":
            source, target = args[1].device.type, args[0].device.type
        else:
            source = target = None
        if source != target:
            frame = next(f for f in reversed(traceback.extract_stack()) if f.name != "__torch_dispatch__"
                         and not os.path.abspath(f.filename).startswith(TORCH_DIR))
            self.records.append({"window": self.window, "op": f"{name} ({source} to {target})", "package": "",
                                 "where": f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"})
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_rotary_tables_need_no_copy_once_on_the_device():
    """Issue 18 item 9: the inverse frequencies move with the model, so the decoder's cos/sin tables
    are built on the device without a host-to-device copy, for any mix of batch lengths (varying
    lengths used to copy them from the host on every step). "meta" stands in for the GPU."""
    model = RetroMAEForPretraining(tiny_modernbert()).to("meta")
    rotary = model.c_head.attention.self.rotary
    meta = torch.device("meta")
    with CopyWatch() as watch:
        for length in (7, 19, 7, 33, 19, 7, 1, 33):
            cos, sin = rotary.cos_sin(length, meta)
            assert cos.shape == sin.shape == (length, 8) and cos.device == sin.device == meta
            assert cos.dtype == sin.dtype == torch.float32
            assert rotary(torch.empty(2, 4, length, 8, device=meta)).device == meta
    assert not watch.records, watch.summary()
    assert rotary.inv_freq.device == meta and rotary.inv_freq.dtype == torch.float32


def test_rotary_tables_are_the_original_formula_for_every_length():
    """Bit-identical to the tables before issue 18 (fp32 inverse frequencies times fp32 positions),
    for lengths in any order, also after the model is cast to bf16, and equal to a fresh module's;
    the frequencies add nothing to the state dict."""
    config = modernbert_config(hidden_size=64, num_attention_heads=2)
    model = RetroMAEForPretraining(ModernBertForMaskedLM(config)).to(torch.bfloat16)
    rotary = model.c_head.attention.self.rotary
    assert rotary.inv_freq.dtype == torch.float32  # a bf16 cast would be tens of radians off at 8k
    assert not rotary.state_dict()
    theta, head_dim = rope_settings(config)["rope_theta"], 32
    inv_freq = (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()
    cpu = torch.device("cpu")
    for length in (5, 40, 5, 1, 64, 17, 40, 3):
        angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = rotary.cos_sin(length, cpu)
        assert torch.equal(cos, angles.cos() * 1.0) and torch.equal(sin, angles.sin() * 1.0), length
        fresh_cos, fresh_sin = RotaryEmbedding(head_dim, inv_freq).cos_sin(length, cpu)
        assert torch.allclose(cos, fresh_cos, atol=1e-6) and torch.allclose(sin, fresh_sin, atol=1e-6), length


def test_modernbert_decoder_uses_positions():
    """ModernBERT's embedding module adds no positions: without the decoder's own rotary positions
    every query row would start from the same vector and the decoder could not learn the tokens."""
    torch.manual_seed(0)
    with_positions = decoder_loss_after_training(RetroMAEForPretraining(tiny_modernbert(global_rope_theta=10000.0)))
    torch.manual_seed(0)
    blind = RetroMAEForPretraining(tiny_modernbert(global_rope_theta=10000.0))
    blind.c_head.attention.self.rotary = None  # the same model, its decoder without positions
    without = decoder_loss_after_training(blind)
    assert without > 2.0, without
    assert with_positions < 0.4 * without, (with_positions, without)


def test_gradient_checkpointing_changes_nothing():
    batch = synthetic_batch(seed=2)
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = RetroMAEForPretraining(tiny_modernbert(mlp_dropout=0.1, attention_dropout=0.1)).train()
        if enabled:
            model.gradient_checkpointing_enable()
            assert model.lm.is_activation_checkpointing
        torch.manual_seed(123)
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.item(), grads(model)))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-6), name


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RetroMAEForPretraining(tiny_modernbert(), RetroMAEConfig(objective="dupmae")).eval()
    with torch.no_grad():
        model.c_head.output.dense.weight.add_(1.0)
    model.save_pretrained(tmp_path / "out")
    loaded = RetroMAEForPretraining.from_pretrained(tmp_path / "out").eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.lm.decoder.weight.data_ptr() == loaded.lm.model.embeddings.tok_embeddings.weight.data_ptr()
    assert loaded.c_head.attention.self.rotary is not None
    batch = synthetic_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, loaded(**batch).loss)
        encoder = AutoModel.from_pretrained(tmp_path / "out" / "encoder_model").eval()
        assert type(encoder).__name__ == "ModernBertModel"
        ids, mask = batch["decoder_input_ids"], batch["encoder_attention_mask"]
        assert torch.allclose(encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                              model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-6)


def test_extend_positions_refuses_a_rotary_model():
    from retromae_ds.model.positions import extend_position_table

    with pytest.raises(UserError, match="rotary .*no position table to extend"):
        extend_position_table(tiny_modernbert(), 8192)


# --------------------------------------------------------------------------------------------------
# whole-word masking against a ModernBERT-style vocabulary


@pytest.fixture(scope="module")
def modernbert_style_tokenizer(tmp_path_factory):
    """What ModernBERT's tokenizer is, at 2,000 pieces: byte-level BPE without a prefix space
    (GPT-NeoX/OLMo style), specials [CLS] [SEP] [PAD] [UNK] and an lstrip [MASK], a "[CLS] $A [SEP]"
    template; trained on gensim's Wikipedia sample (which keeps its line breaks)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from retromae_ds.data.demo_corpus import iter_wikipedia_articles

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|padding|>", "<|endoftext|>"])
    backend.train_from_iterator(itertools.islice(iter_wikipedia_articles(), 25), trainer)
    backend.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", AddedToken("[MASK]", lstrip=True)])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                        sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    folder = tmp_path_factory.mktemp("modernbert_tokenizer")
    tokenizer.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def text_word_starts(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """Independent word starts from the text: a token starts a word when it opens the text or
    whitespace comes right before it (pieces of one multi-byte character share its offset)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts, previous = [], None
    for i, (start, _) in enumerate(enc["offset_mapping"]):
        starts.append(i == 0 or (start != previous and (text[start - 1].isspace() or text[start].isspace())))
        previous = start
    return enc["input_ids"], starts


def table_word_starts(table: torch.Tensor, ids: list[int], breaks: torch.Tensor | None = None) -> list[bool]:
    """The generator's rule: a block's first token starts a word; later ones when their id does not
    continue or the previous id ended with whitespace."""
    return [i == 0 or not bool(table[t]) or (breaks is not None and bool(breaks[ids[i - 1]]))
            for i, t in enumerate(ids)]


SPACED = ("The unbelievably quick, brownish fox jumped over 12 lazy dogs in Zürich; Anthropomorphization isn't "
          "uncommon (approx. 3.50 CHF each) in Australian newspapers, said Mr. Howard.")


def test_continuation_table_is_right_for_space_separated_words(modernbert_style_tokenizer):
    tokenizer = modernbert_style_tokenizer
    assert tokenizer_family(tokenizer) == "byte-level-bpe"
    ids, starts = text_word_starts(tokenizer, SPACED)
    assert sum(1 for s in starts if not s) > 10  # the text really has multi-piece words
    assert table_word_starts(continuation_table(tokenizer), ids) == starts
    table = continuation_table(tokenizer)
    assert not table[tokenizer.all_special_ids].any()


def test_word_starts_after_a_line_break(modernbert_style_tokenizer):
    """A line break (Ċ) starts a word, and so does the word after it, which carries no Ġ: the
    continuation table alone would join it to the word before the break; the word-break table
    (the previous piece ends with whitespace) separates them, in the table rule and in the generator."""
    tok = modernbert_style_tokenizer
    text = "The history of the alphabet.\nHistory\nThe Egyptian script came first.\n\n  Two  spaces\ttab."
    ids, starts = text_word_starts(tok, text)
    table, breaks = continuation_table(tok), word_break_table(tok)
    assert table_word_starts(table, ids) != starts                       # the old per-piece rule is wrong here
    assert table_word_starts(table, ids, breaks) == starts
    gen = MaskGenerator(table, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id, len(tok),
                        tok.all_special_ids, word_breaks=breaks)
    tokens, lengths = collate_blocks([np.array(ids)], tok.pad_token_id)
    plan = gen.plan(tokens.numpy(), lengths.numpy())
    begin = [i for i, s in enumerate(starts) if s] + [len(ids)]
    words = (sum(starts), max(b - a for a, b in zip(begin, begin[1:])))      # (word count, longest word)
    assert (plan.n_words, plan.longest) == words                             # the host plan
    assert device_word_numbers(gen, tokens, lengths) == words                # the generator on the device
    for sync_free in (False, True):
        gen.sync_free = sync_free
        for step in range(20):                                           # whole words: masked runs follow `starts`
            out = gen(tokens, lengths, mask_rng(0, step, 0, "cpu"), plan=plan if sync_free else None)
            masked = (out["encoder_labels"][0, 1:len(ids) + 1] != -100).tolist()
            for i in range(1, len(ids)):
                if not starts[i]:
                    assert masked[i] == masked[i - 1], (step, i)


# --------------------------------------------------------------------------------------------------
# the real trainer on 2 ranks: ZeRO-2 and ZeRO-3 (with activation checkpointing, eval, resume, export)

TINY_MODERNBERT = dict(
    architectures=["ModernBertForMaskedLM"], model_type="modernbert", vocab_size=30522, hidden_size=64,
    num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, max_position_embeddings=128,
    pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102,
    global_attn_every_n_layers=2, local_attention=16,
)  # MiniLM's WordPiece ids; layer 1 is a sliding-window layer, so both attention kinds are trained


@pytest.fixture(scope="module", params=[pytest.param(stage, marks=pytest.mark.full) for stage in ("zero2", "zero3")])
def trained(request, tmp_path_factory, tiny_dataset, minilm_tokenizer_dir):
    """One 2-rank torchrun run per ZeRO stage; ZeRO-3 stops at step 2 and resumes to step 4."""
    stage = request.param
    root = tmp_path_factory.mktemp(f"modernbert_{stage}")
    (root / "config").mkdir()
    (root / "config" / "config.json").write_text(json.dumps(TINY_MODERNBERT))
    out = root / "run"
    args = ["--data", tiny_dataset, "--model-config", str(root / "config"), "--tokenizer", minilm_tokenizer_dir,
            "--micro-batch-size", "4", "--log-interval", "1", "--save-interval", "2", "--eval-interval", "2",
            "--lr", "1e-3", "--warmup", "1", "--eval-heldout-docs", "10", "--eval-max-length", "64", "--seed", "7",
            "--deepspeed", f"ds_configs/{stage}.json", "--output-dir", str(out)]
    logs = []
    if stage == "zero3":
        args.append("--activation-checkpointing")
        first = R.run("torchrun", 2, args + ["--max-steps", "2"], root / "first.log")
        assert first.returncode == 0, first.stdout[-4000:]
        logs.append(first.stdout)
    res = R.run("torchrun", 2, args + ["--max-steps", "4"], root / "run.log")
    assert res.returncode == 0, res.stdout[-4000:]
    logs.append(res.stdout)
    return {"stage": stage, "out": out, "logs": logs, "root": root, "args": args + ["--max-steps", "4"]}


@pytest.mark.distributed
def test_trains_under_zero_on_two_ranks(trained):
    rows = R.metrics(trained["out"])
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["decoder_loss"]), row
    evals = R.metrics(trained["out"], kind="eval")
    assert {r["step"] for r in evals} >= {2, 4}
    assert all(math.isfinite(v) for r in evals for k, v in r.items() if isinstance(v, float))
    if trained["stage"] == "zero3":
        assert "resumed from" in trained["logs"][-1] and "at step 2" in trained["logs"][-1]
    config = json.loads((trained["out"] / "checkpoints").glob("*/model_config/config.json").__next__().read_text())
    assert config["model_type"] == "modernbert"
    console = "\n".join(trained["logs"])
    assert "LOAD REPORT" not in console and "seem corrupted" not in console


@pytest.mark.distributed
def test_export_loads_with_automodel_and_equals_the_checkpoint(trained):
    from retromae_ds.engine.export import load_checkpoint_model

    export = trained["out"] / "export"
    encoder = AutoModel.from_pretrained(export).eval()
    assert type(encoder).__name__ == "ModernBertModel"
    model, tokenizer, _, path = load_checkpoint_model(trained["out"])
    assert path.name.endswith("4") and model.positions == "rotary"
    enc = tokenizer(["Retrieval-oriented pre-training of a ModernBERT encoder."], return_tensors="pt")
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        want = model.eval().encoder(**ids).last_hidden_state
        got = encoder(**ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(model.c_head.output.dense.weight, torch.zeros(()))  # the trained decoder came back
    continued = RetroMAEForPretraining.from_pretrained(export / "retromae")
    for key, value in model.state_dict().items():
        assert torch.equal(continued.state_dict()[key], value), key


@pytest.mark.distributed
def test_resume_from_a_checkpoint_ends_bitwise_equal(trained):
    """Resume the ZeRO-2 run from its step-2 checkpoint (what a kill -9 after that save leaves) with the same
    command: steps 3-4 and the final weights equal the uninterrupted run's bit for bit."""
    import shutil

    from retromae_ds.engine.export import load_checkpoint_model

    if trained["stage"] != "zero2":
        pytest.skip("the ZeRO-3 run resumes above; one bitwise comparison is enough")
    resumed = trained["root"] / "resumed"
    shutil.copytree(trained["out"] / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    args = list(trained["args"])
    args[args.index("--output-dir") + 1] = str(resumed)
    res = R.run("torchrun", 2, args, trained["root"] / "resumed.log")
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-4000:]
    a, b = R.metrics(trained["out"]), R.metrics(resumed)
    assert {r["step"]: r["loss"] for r in a if r["step"] > 2} == {r["step"]: r["loss"] for r in b}
    want, *_ = load_checkpoint_model(trained["out"] / "checkpoints" / "step_00000004")
    got, *_ = load_checkpoint_model(resumed / "checkpoints" / "step_00000004")
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
