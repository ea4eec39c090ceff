"""Tokenizers and model folders written by this project load in transformers 4.44 (FlagEmbedding's pin) as
well as 5.x (issue 27, section 3: trained tokenizers were saved as `tokenizer_class: TokenizersBackend`).

Default tier: what is written (retromae_ds/hf_compat.py says what 4.44 needs and why), for the three places
that write a tokenizer or a model config a user loads later: `retromae-ds tokenizer`, a checkpoint's
model_config/ (build.write_model_files) and `retromae-ds export`; and that 5.x still loads each folder as
before. Full tier: a real 4.44 venv loads a trained tokenizer of each algorithm and a real export (from a
run on a trained tokenizer) and gives the tokens and hidden states 5.x gives.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from retromae_ds import cli
from retromae_ds.hf_compat import FAST_TOKENIZER_CLASSES_4_44, legacy_bpe_merges
from tests.helpers.corpora import lee_articles, write_jsonl

ALGORITHMS = ("wordpiece", "bpe", "unigram")
TEXTS = ["The Prime Minister, John Howard , said: \"It's a 3.5 per cent rise.\"", "ok",
         "Australian-based firms weren't told ."]


def load_5x(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def tokenizer_config(folder) -> dict:
    return json.loads((Path(folder) / "tokenizer_config.json").read_text())


def resolves_in_5x(name: str):
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    return tokenizer_class_from_name(name)


def encodings(tok) -> dict:
    """What a user of the folder gets: the batch (every key), a pair, decoded text, the special ids."""
    batch = tok(TEXTS, padding=True)
    pair = tok("first part", "second part")
    return {"batch": {k: [list(v) for v in batch[k]] for k in sorted(batch.keys())},
            "pair": {k: list(pair[k]) for k in sorted(pair.keys())},
            "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]],
            "special": [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id, tok.unk_token_id],
            "model_max_length": tok.model_max_length, "size": len(tok)}


def check_portable_tokenizer_folder(folder, want_class: str) -> None:
    """The written files name a class that 4.44 has and 5.x resolves, pin what 4.x would otherwise
    default differently, and keep BPE merges in the form tokenizers 0.19 reads."""
    config = tokenizer_config(folder)
    assert config["tokenizer_class"] == want_class and want_class in FAST_TOKENIZER_CLASSES_4_44
    tok = load_5x(folder)
    assert resolves_in_5x(want_class) is type(tok)
    assert config["model_input_names"] == list(tok.model_input_names)
    assert config["clean_up_tokenization_spaces"] is False
    model = json.loads((Path(folder) / "tokenizer.json").read_text())["model"]
    if model["type"] == "BPE":
        assert all(isinstance(m, str) and len(m.split(" ")) == 2 for m in model["merges"])


# --------------------------------------------------------------------------------------------------
# default tier: retromae-ds tokenizer
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Each algorithm trained on 60 Lee articles, vocabulary 800: {algorithm: folder}."""
    root = tmp_path_factory.mktemp("hf_compat_tok")
    corpus = write_jsonl(root / "lee.jsonl", [{"text": t} for t in lee_articles(60)])
    folders = {}
    for algorithm in ALGORITHMS:
        folders[algorithm] = root / algorithm
        assert cli.main(["tokenizer", "--no-progress", "--input", corpus, "--algorithm", algorithm,
                         "--vocab-size", "800", "--output", str(folders[algorithm])]) == 0
    return folders


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_trained_tokenizer_names_a_class_both_versions_have(trained, algorithm):
    check_portable_tokenizer_folder(trained[algorithm], "PreTrainedTokenizerFast")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_rewritten_files_tokenize_as_the_trained_backend(trained, algorithm):
    """5.x loads the rewritten folder (merges as strings, new keys) into the same tokenizer as before:
    the same ids as the raw tokenizers backend, no token_type_ids (as TokenizersBackend gives)."""
    from tokenizers import Tokenizer

    folder = trained[algorithm]
    tok, raw = load_5x(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert type(tok).__name__ == "TokenizersBackend"
    assert [tok(t)["input_ids"] for t in TEXTS] == [raw.encode(t).ids for t in TEXTS]
    assert sorted(tok(TEXTS[0]).keys()) == ["attention_mask", "input_ids"]
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert json.loads(raw.to_str())["model"]["vocab"] == spec["model"]["vocab"]


def test_merges_with_a_space_stay_pairs():
    spec = {"model": {"type": "BPE", "merges": [["a", "b"], ["c d", "e"]]}}
    assert not legacy_bpe_merges(spec) and spec["model"]["merges"] == [["a", "b"], ["c d", "e"]]
    spec = {"model": {"type": "BPE", "merges": [["Ġ", "t"], ["h", "e"]]}}
    assert legacy_bpe_merges(spec) and spec["model"]["merges"] == ["Ġ t", "h e"]
    assert not legacy_bpe_merges({"model": {"type": "WordPiece", "vocab": {}}})


# --------------------------------------------------------------------------------------------------
# default tier: a checkpoint's model_config/ and the export
# --------------------------------------------------------------------------------------------------

def tiny_masked_lm(vocab_size: int, pad_token_id: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                      pad_token_id=pad_token_id))


@pytest.mark.parametrize("which, want", [("minilm", "BertTokenizerFast"), ("sentencepiece", "XLMRobertaTokenizerFast"),
                                         ("trained", "PreTrainedTokenizerFast")])
def test_a_checkpoints_model_config_folder(which, want, tmp_path, minilm_tokenizer, sentencepiece_tokenizer, trained):
    from transformers import AutoConfig

    from retromae_ds.engine.build import write_model_files

    tok = {"minilm": minilm_tokenizer, "sentencepiece": sentencepiece_tokenizer,
           "trained": load_5x(trained["wordpiece"]) if which == "trained" else None}[which]
    model = SimpleNamespace(lm=tiny_masked_lm(len(tok), tok.pad_token_id))
    model.lm.config.dtype = torch.float32  # as a --model run has it (from_pretrained sets it; from_config not)
    cfg = SimpleNamespace(objective="retromae", bow_loss_weight=1.0, max_seq_len=64)
    folder = tmp_path / "model_config"
    write_model_files(model, tok, cfg, folder)
    check_portable_tokenizer_folder(folder, want)
    assert encodings(load_5x(folder)) == encodings(tok)  # 5.x: the same tokenizer as the one saved
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert AutoConfig.from_pretrained(folder).dtype == torch.float32


@pytest.fixture
def exported(tmp_path, minilm_tokenizer, monkeypatch):
    """`retromae-ds export` of a tiny RetroMAE model with the MiniLM tokenizer, in-process: the checkpoint
    loader is replaced by the model itself (what is tested is what export writes)."""
    from retromae_ds.engine import export
    from retromae_ds.model.retromae import RetroMAEForPretraining

    model = RetroMAEForPretraining(tiny_masked_lm(len(minilm_tokenizer), 0))
    settings = {"objective": "retromae", "bow_loss_weight": 1.0, "max_seq_len": 64}
    monkeypatch.setattr(export, "load_checkpoint_model",
                        lambda checkpoint: (model, minilm_tokenizer, settings, Path(checkpoint)))
    out = tmp_path / "export"
    assert cli.main(["export", str(tmp_path / "no_checkpoint"), str(out)]) == 0
    return out


def test_the_export_folder(exported, minilm_tokenizer):
    from transformers import AutoModel

    for folder in (exported, exported / "retromae"):
        check_portable_tokenizer_folder(folder, "BertTokenizerFast")
        assert encodings(load_5x(folder)) == encodings(minilm_tokenizer)
    for folder in (exported, exported / "retromae" / "encoder_model"):
        config = json.loads((folder / "config.json").read_text())
        assert config["torch_dtype"] == config["dtype"] == "float32", folder
    assert AutoModel.from_pretrained(exported).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# full tier: a transformers 4.44 venv loads what this code writes
# --------------------------------------------------------------------------------------------------

OLD_TRANSFORMERS = "transformers==4.44.*"
# pip's messages when the package index cannot be reached (no network, DNS, proxy, TLS interception)
UNREACHABLE = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                         r"Name or service not known|Network is unreachable|Connection refused|ConnectTimeout|"
                         r"ReadTimeout|ProxyError|Failed to establish a new connection|SSLError|"
                         r"connection broken|Could not fetch URL", re.IGNORECASE)

OLD_SIDE = r'''
import json, sys
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

sys.path.insert(0, sys.argv[3])
from helper_encodings import encodings

tokenizers, export, out = json.loads(sys.argv[1]), sys.argv[2], {"version": transformers.__version__}
out["tokenizers"] = {}
for name, folder in tokenizers.items():
    tok = AutoTokenizer.from_pretrained(folder)
    out["tokenizers"][name] = {"class": type(tok).__name__, **encodings(tok)}
tok = AutoTokenizer.from_pretrained(export)
model, info = AutoModel.from_pretrained(export, output_loading_info=True)
model.eval()
batch = tok(TEXTS, padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
torch.save({"hidden": hidden, "input_ids": batch["input_ids"]}, sys.argv[4])
out["export"] = {"class": type(model).__name__, "tokenizer_class": type(tok).__name__,
                 "keys": sorted(batch.keys()), "load_report": {k: sorted(v) for k, v in info.items() if v},
                 "torch_dtype": str(model.config.torch_dtype)}
mlm = AutoModelForMaskedLM.from_pretrained(export + "/retromae/encoder_model")
out["retromae_encoder_class"] = type(mlm).__name__
print("RESULT " + json.dumps(out))
'''


def build_old_venv(root: Path) -> Path:
    """A venv with transformers 4.44 (and its tokenizers 0.19) and the local torch wheel; returns its
    python. Skips when the package index is unreachable, except in CI (CI=true), where it fails."""
    env_dir = root / "venv444"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    res = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--retries", "1",
                          "--timeout", "30", OLD_TRANSFORMERS, "torch==2.13.0"],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        log = res.stdout[-3000:] + res.stderr[-3000:]
        verdict, reason = install_failure_verdict(log, os.environ.get("CI") == "true")
        (pytest.skip if verdict == "skip" else pytest.fail)(reason)
    return python


def install_failure_verdict(pip_log: str, ci: bool) -> tuple[str, str]:
    """("skip" | "fail", reason) for a failed pip install: skip when pip could not reach the package
    index, unless in CI; any other failure (a conflict, a broken wheel) fails everywhere."""
    unreachable = UNREACHABLE.search(pip_log)
    if unreachable and not ci:
        return "skip", (f"cannot install {OLD_TRANSFORMERS} into a venv: the package index is unreachable "
                        f"(pip: {unreachable.group(0)}); in CI (CI=true) this fails instead")
    what = "the package index is unreachable, and CI=true requires this test" if unreachable else "pip failed"
    return "fail", f"pip install {OLD_TRANSFORMERS} torch==2.13.0 into a venv: {what}:\n{pip_log}"


def test_an_unreachable_index_skips_the_venv_test_except_in_ci():
    offline = ("WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after "
               "connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection object>: "
               "Failed to establish a new connection: [Errno 111] Connection refused')': /simple/transformers/\n"
               "ERROR: Could not find a version that satisfies the requirement transformers==4.44.*\n")
    conflict = ("ERROR: Cannot install transformers==4.44.2 because these package versions have conflicting "
                "dependencies.\n")
    assert install_failure_verdict(offline, ci=False)[0] == "skip"
    assert "unreachable" in install_failure_verdict(offline, ci=False)[1]
    assert install_failure_verdict(offline, ci=True)[0] == "fail"
    assert install_failure_verdict(conflict, ci=False)[0] == "fail"


def hidden_states_5x(export: Path) -> dict:
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(export), AutoModel.from_pretrained(export).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return {"hidden": model(**batch).last_hidden_state, "input_ids": batch["input_ids"]}


@pytest.mark.full
def test_transformers_4_44_loads_trained_tokenizers_and_an_export(tmp_path, trained, minilm_tokenizer_dir,
                                                                   sentencepiece_tokenizer):
    """A from-scratch run on a trained WordPiece tokenizer (2 steps of bert-tiny, exported) and the
    trained tokenizers of all three algorithms, plus MiniLM's and an XLM-R one saved through the
    checkpoint path, load in transformers 4.44 with the tokens, decoding and hidden states of 5.x."""
    from retromae_ds.engine.build import write_model_files
    from retromae_ds.engine import checkpoint as ck
    from tests.helpers import engine_runs as R

    started = time.perf_counter()
    python = build_old_venv(tmp_path)
    venv_seconds = time.perf_counter() - started

    # the run: prepare with the trained tokenizer, bert-tiny from random init, 2 steps, exported at the end
    from retromae_ds.data.prepare import prepare_files

    tok_dir = trained["wordpiece"]
    corpus = write_jsonl(tmp_path / "lee.jsonl", [{"text": t} for t in lee_articles(60)])
    prefix = str(tmp_path / "lee")
    prepare_files([corpus], str(tok_dir), prefix, max_seq_len=64, num_proc=1, progress=False)
    out = tmp_path / "run"
    res = R.run("python", 1, ["--data", prefix, "--model-config", "bert-tiny", "--tokenizer", str(tok_dir),
                              "--micro-batch-size", "4", "--max-steps", "2", "--save-interval", "0",
                              "--eval-heldout-docs", "0", "--deepspeed", "ds_configs/zero2.json",
                              "--output-dir", str(out)], tmp_path / "run.log", timeout=400)
    assert res.returncode == 0, res.stdout[-4000:]
    export = out / "export"
    model_config = ck.complete_checkpoints(out)[-1] / "model_config"
    # MiniLM's and an XLM-R tokenizer through the checkpoint path (write_model_files)
    from transformers import AutoTokenizer

    others = {}
    for name, tok in (("minilm", AutoTokenizer.from_pretrained(minilm_tokenizer_dir)),
                      ("xlmr", sentencepiece_tokenizer)):
        others[name] = tmp_path / f"{name}_model_config"
        write_model_files(SimpleNamespace(lm=tiny_masked_lm(len(tok), tok.pad_token_id)), tok,
                          SimpleNamespace(objective="retromae", bow_loss_weight=1.0, max_seq_len=64), others[name])
    folders = {**{a: str(f) for a, f in trained.items()}, "run_model_config": str(model_config),
               "export": str(export), **{k: str(v) for k, v in others.items()}}

    helper = tmp_path / "helper"
    helper.mkdir()
    (helper / "helper_encodings.py").write_text(f"TEXTS = {TEXTS!r}\n" + encodings_source())
    script = tmp_path / "old_side.py"
    script.write_text(f"TEXTS = {TEXTS!r}\n" + OLD_SIDE)
    old_started = time.perf_counter()
    res = subprocess.run([str(python), str(script), json.dumps(folders), str(export), str(helper),
                          str(tmp_path / "hidden_444.pt")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ""})
    old_seconds = time.perf_counter() - old_started
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    old = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert old["version"].startswith("4.44.")

    for name, folder in folders.items():
        mine = encodings(load_5x(folder))
        theirs = dict(old["tokenizers"][name])
        assert theirs.pop("class").endswith("Fast"), name
        assert theirs == mine, name

    want = hidden_states_5x(export)
    got = torch.load(tmp_path / "hidden_444.pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    torch.testing.assert_close(got["hidden"], want["hidden"], rtol=1e-5, atol=1e-5)
    assert old["export"]["class"] == "BertModel" and old["export"]["load_report"] == {}
    assert old["export"]["torch_dtype"] == "torch.float32"
    assert old["retromae_encoder_class"] == "BertForMaskedLM"
    print(f"\n[hf_compat full tier] venv with {OLD_TRANSFORMERS}: {venv_seconds:.0f} s; 4.44 side: "
          f"{old_seconds:.0f} s; max |hidden 4.44 - 5.x| = {(got['hidden'] - want['hidden']).abs().max():.2e}; "
          f"whole test {time.perf_counter() - started:.0f} s")


def encodings_source() -> str:
    """`encodings` as source text, for the 4.44 side to run the very same function."""
    import inspect

    return inspect.getsource(encodings)
