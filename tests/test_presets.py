"""`--model-config NAME`: the model presets (retromae_ds/model/presets.py). Each resolves with a real tokenizer
(vocabulary and special ids from it, positions from the training length), bert-tiny trains a step, unknown names
list the presets, an existing path of the same name wins; and a real 1-rank run from `bert-tiny` saves the
resolved config in its checkpoints and its export, and resumes with the config it saved even when the length
the preset would now be sized for differs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from retromae_ds.config import TrainConfig, config_fields
from retromae_ds.engine import checkpoint as ck
from retromae_ds.engine.build import build_model, resolve_model_config
from retromae_ds.errors import UserError
from retromae_ds.model import presets
from tests.helpers import engine_runs as R
from tests.helpers.masking_data import synthetic_batch
from tests.helpers.tiny_run import minilm_path, tiny_run

# name -> (layers, hidden, heads, FFN): the sizes the docs promise
SIZES = {"bert-tiny": (2, 128, 2, 512), "bert-mini": (4, 256, 4, 1024), "bert-small": (4, 512, 8, 2048),
         "bert-base": (12, 768, 12, 3072), "modernbert-base": (22, 768, 12, 1152)}
# keys transformers writes itself: its version, the dtype of saved weights, and the class that saved them
# (an export saves the base encoder, BertModel, where the checkpoint's config names BertForMaskedLM)
WRITER_KEYS = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"tokenizer": minilm_path(), "resume": "none", **kw})


def _comparable(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in WRITER_KEYS}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_each_preset_resolves_with_the_tokenizers_vocabulary_and_special_ids(name, minilm_tokenizer):
    assert set(SIZES) == set(presets.PRESETS)
    config = presets.preset_config(name, minilm_tokenizer, 100)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.intermediate_size) == SIZES[name]
    assert config.model_type == ("modernbert" if name.startswith("modernbert") else "bert")
    assert config.vocab_size == len(minilm_tokenizer) == 30522
    assert config.max_position_embeddings == 128  # 100 rounded up to a multiple of 64
    tok = minilm_tokenizer
    assert config.pad_token_id == tok.pad_token_id == 0
    # BERT's tokenizer has no bos/eos: an encoder's sequence starts with [CLS] and ends with [SEP]
    assert (config.bos_token_id, config.eos_token_id) == (tok.cls_token_id, tok.sep_token_id) == (101, 102)
    if name.startswith("modernbert"):
        assert (config.cls_token_id, config.sep_token_id) == (101, 102)
        assert config.layer_types[0] == "full_attention" and config.local_attention == 128  # its defaults kept


def test_a_tokenizer_with_its_own_ids_and_added_tokens_sizes_the_preset(sentencepiece_tokenizer, minilm_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = sentencepiece_tokenizer  # XLM-R style: <s>=0 <pad>=1 </s>=2, <mask> last
    config = presets.preset_config("bert-mini", tok, 64)
    assert config.vocab_size == len(tok) and config.max_position_embeddings == 64
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    added = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)  # a copy: the fixture's stays as it is
    added.add_tokens(["<domain-term>"])
    assert presets.preset_config("bert-tiny", added, 64).vocab_size == len(added) == added.vocab_size + 1


def test_positions_round_up_to_a_multiple_of_64():
    assert [presets.positions_for(n) for n in (1, 64, 65, 128, 130, 512, 8192)] == [64, 64, 128, 128, 192, 512, 8192]


def test_bert_tiny_builds_and_trains_a_step(minilm_tokenizer):
    model = build_model(_cfg(model_config="bert-tiny", max_seq_len=64), minilm_tokenizer)
    assert model.lm.config.num_hidden_layers == 2 and model.lm.config.max_position_embeddings == 64
    out = model(**synthetic_batch())  # ids < 100, pad 0 (the tokenizer's pad id too)
    assert torch.isfinite(out.loss) and out.decoder_loss is not None
    out.loss.backward()
    assert model.lm.base_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_the_training_length_comes_from_the_dataset_when_no_max_seq_len(tiny_dataset, minilm_tokenizer):
    config = resolve_model_config(_cfg(model_config="bert-tiny", data=[tiny_dataset]), minilm_tokenizer)
    assert config.max_position_embeddings == 64  # the dataset's max_seq_len


def test_an_unknown_name_that_is_no_path_lists_the_presets(minilm_tokenizer):
    with pytest.raises(UserError) as err:
        resolve_model_config(_cfg(model_config="bert-huge", max_seq_len=64), minilm_tokenizer)
    assert "no such file or folder" in str(err.value)
    for name in presets.PRESETS:
        assert name in str(err.value)


def test_an_existing_path_of_a_presets_name_wins(tmp_path, monkeypatch, minilm_tokenizer):
    folder = tmp_path / "bert-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
                                                    "num_hidden_layers": 1, "num_attention_heads": 2,
                                                    "intermediate_size": 64}))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_config(_cfg(model_config="bert-tiny", max_seq_len=64), minilm_tokenizer).hidden_size == 32


def test_the_help_text_names_every_preset():
    help_text = {f.name: f.metadata["help"] for f in config_fields()}["model_config"]
    for name in presets.PRESETS:
        assert name in help_text


# ------------------------------------------------------------------------------------------------
# a real run: 1 rank, 2 steps from bert-tiny, then a resume that would size the preset differently
# ------------------------------------------------------------------------------------------------

COMMON = ["--micro-batch-size", "4", "--log-interval", "1", "--save-interval", "1", "--keep-last", "3",
          "--lr", "1e-3", "--warmup", "1", "--eval-heldout-docs", "10", "--eval-max-length", "64", "--seed", "3",
          "--deepspeed", "ds_configs/zero2.json"]


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """bert-tiny trained 2 steps at --max-seq-len 100 (positions: 128) on data prepared at 100, exported."""
    run = tiny_run(tmp_path_factory.mktemp("preset"), n_docs=60, max_seq_len=100)
    out = run["root"] / "run"
    args = ["--data", run["prefix"], "--model-config", "bert-tiny", "--tokenizer", run["tok"], *COMMON]
    res = R.run("python", 1, args + ["--output-dir", str(out), "--max-steps", "2", "--max-seq-len", "100"],
                run["root"] / "run.log", timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]
    return {**run, "out": out, "args": args, "stdout": res.stdout}


def test_the_resolved_config_is_saved_in_checkpoints_and_the_export(preset_run, minilm_tokenizer):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = preset_run["out"]
    want = presets.preset_config("bert-tiny", minilm_tokenizer, 100).to_dict()
    assert "--model-config bert-tiny: BertConfig with 2 layers" in preset_run["stdout"]
    assert "128 positions (--max-seq-len 100 rounded up" in preset_run["stdout"]
    done = ck.complete_checkpoints(out)
    assert [p.name for p in done] == ["step_00000001", "step_00000002"]
    for folder in [p / "model_config" for p in done] + [out / "export"]:
        saved = AutoConfig.from_pretrained(folder).to_dict()
        assert _comparable(saved) == _comparable(want), folder
        assert saved["max_position_embeddings"] == 128 and saved["vocab_size"] == 30522
    assert AutoConfig.from_pretrained(done[-1] / "model_config").architectures == ["BertForMaskedLM"]
    model = AutoModel.from_pretrained(out / "export")
    tokenizer = AutoTokenizer.from_pretrained(out / "export")
    assert tokenizer.model_max_length == 128  # capped at the positions: it never emits more tokens than fit
    batch = tokenizer(["a long text " * 100], truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 128
    with torch.no_grad():
        assert torch.isfinite(model(**batch).last_hidden_state).all()


@pytest.mark.full  # the default tier resumes a preset run in the damaged-checkpoint test below
def test_a_resume_reuses_the_saved_config_not_a_new_resolution(preset_run):
    """Resumed at --max-seq-len 64 (which would size the table at 64 positions): the run continues with the
    128-position table its checkpoint saved, instead of failing to load the trained rows."""
    out = preset_run["root"] / "resumed"
    shutil.copytree(ck.checkpoint_root(preset_run["out"]) / ck.tag_for(2), ck.checkpoint_root(out) / ck.tag_for(2))
    res = R.run("python", 1, preset_run["args"] + ["--output-dir", str(out), "--max-steps", "3", "--no-export",
                                                   "--max-seq-len", "64"],
                preset_run["root"] / "resumed.log", timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "resumed from" in res.stdout and "resuming, so the config saved in" in res.stdout
    last = ck.complete_checkpoints(out)[-1]
    assert last.name == ck.tag_for(3)
    assert json.loads((last / "model_config" / "config.json").read_text())["max_position_embeddings"] == 128


def test_a_damaged_newest_checkpoint_gives_neither_its_config_nor_its_weights(preset_run):
    """One owner for the resume point: the newest checkpoint's saved config was edited after it was
    written (64 positions instead of 128), so it fails verification. The run must build its model from the
    config of the checkpoint it really resumes from (step 1), not from the newest folder it sees."""
    out = preset_run["root"] / "damaged_newest"
    for step in (1, 2):
        tag = ck.tag_for(step)
        shutil.copytree(ck.checkpoint_root(preset_run["out"]) / tag, ck.checkpoint_root(out) / tag)
    config = ck.checkpoint_root(out) / ck.tag_for(2) / "model_config" / "config.json"
    values = json.loads(config.read_text())
    values["max_position_embeddings"] = 64
    config.write_text(json.dumps(values))
    res = R.run("python", 1, preset_run["args"] + ["--output-dir", str(out), "--max-steps", "3", "--no-export",
                                                   "--max-seq-len", "64"],
                preset_run["root"] / "damaged_newest.log", timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]
    assert f"resumed from {ck.checkpoint_root(out) / ck.tag_for(1)} at step 1" in res.stdout, res.stdout[-4000:]
    assert (ck.checkpoint_root(out) / (ck.tag_for(2) + ".damaged")).is_dir()
    last = ck.complete_checkpoints(out)[-1]
    assert json.loads((last / "model_config" / "config.json").read_text())["max_position_embeddings"] == 128
