"""What a newcomer meets on the command line (issue 27, section 3): typos in flags, inputs checked before
DeepSpeed starts, an unwritable --output-dir, `eval` repeating the trainer's evaluation, recall@k that
cannot be 1 by construction, Ctrl-C, a clean export load, and the smaller messages (YAML paths, help
texts, export permissions, binary inputs, `init`, fill ratio vs padding efficiency).

The runs are real (`python launch/pretrain.py`, one CPU rank, the tiny BERT of tests/helpers/tiny_run.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import engine_runs as R
from tests.helpers.tiny_run import tiny_run

QUICK = ["--micro-batch-size", "4", "--log-interval", "1", "--save-interval", "0", "--deepspeed", "zero2"]


@pytest.fixture(scope="module")
def lee(tmp_path_factory):
    """80 Lee articles prepared at 64 tokens (MiniLM), the tiny BERT config."""
    return tiny_run(tmp_path_factory.mktemp("usability"), n_docs=80, max_seq_len=64)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only filesystem (a tmpfs mounted ro; needs root, as CI has)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"a read-only folder is made with a ro tmpfs mount, which needs root: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# Launch launch/pretrain.py with init_distributed (the start of DeepSpeed's process group, the slow part of
# a start) watched: WATCH/started exists when it was reached, and WATCH/modules
# says whether deepspeed was imported by the time the process exited.
WATCHED = """
import atexit, runpy, sys
watch, script = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(watch + '/modules', 'w').write(str('deepspeed' in sys.modules)))
import retromae_ds.engine.distributed as d
original = d.init_distributed
def watched(*a, **k):
    open(watch + '/started', 'w').close()
    return original(*a, **k)
d.init_distributed = watched
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name='__main__')
"""


def launch_watched(args: list[str], watch: Path, timeout: float = 300, cwd: Path = R.REPO) -> dict:
    watch.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", WATCHED, str(watch), R.PRETRAIN, *args], capture_output=True,
                         text=True, cwd=cwd, env=R.run_env(), timeout=timeout)
    return {"rc": res.returncode, "out": res.stdout + res.stderr, "seconds": time.monotonic() - started,
            "deepspeed_started": (watch / "started").exists(),
            "deepspeed_imported": (watch / "modules").read_text() == "True"}


def assert_clear_error(res: dict, *phrases: str) -> None:
    assert res["rc"] == 2, res["out"][-3000:]
    assert "Traceback" not in res["out"], res["out"][-3000:]
    for phrase in phrases:
        assert phrase in res["out"], (phrase, res["out"][-3000:])


# ------------------------------------------------------------------------------------------------
# a. flags: no abbreviations, the nearest flag suggested
# ------------------------------------------------------------------------------------------------

def _all_parsers():
    from retromae_ds.cli import build_parser

    top = build_parser()
    subs = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)][0]
    return top, dict(subs.choices)


def _parse_error(parser, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_an_abbreviated_flag_is_refused_and_the_full_flag_suggested(capsys):
    from retromae_ds.engine import trainer

    top, _ = _all_parsers()
    err = _parse_error(top, ["train", "--micro-batch", "4"], capsys)
    assert "--micro-batch: did you mean --micro-batch-size?" in err and "abbreviations are not accepted" in err
    err = _parse_error(top, ["eval", "MODEL", "--max-len", "128"], capsys)
    assert "did you mean --max-length?" in err
    # launch/pretrain.py's parser: run_cli exits 2 on it before anything starts
    with pytest.raises(SystemExit) as exc:
        trainer.run_cli(["--micro-batch=4"])
    assert exc.value.code == 2 and "did you mean --micro-batch-size?" in capsys.readouterr().err


def test_a_mistyped_flag_or_command_gets_the_nearest_one(capsys):
    top, _ = _all_parsers()
    err = _parse_error(top, ["train", "--max-step", "3"], capsys)
    assert "--max-step: did you mean --max-steps?" in err
    err = _parse_error(top, ["prepare", "--output", "x", "--inptu", "a.jsonl"], capsys)
    assert "--inptu: did you mean --input?" in err
    err = _parse_error(top, ["train", "--zzz"], capsys)
    assert "--zzz: no such flag" in err
    err = _parse_error(top, ["trian"], capsys)
    assert "Did you mean 'train'?" in err


def test_every_parser_refuses_abbreviations():
    from retromae_ds.argparsing import Parser

    top, subs = _all_parsers()
    assert not top.allow_abbrev and all(not p.allow_abbrev for p in subs.values()), \
        [name for name, p in subs.items() if p.allow_abbrev]
    source = (R.REPO / "retromae_ds" / "engine" / "trainer.py").read_text()
    run_cli = source[source.index("def run_cli"):source.index("def mix_seed")]
    assert "Parser(" in run_cli and "argparse.ArgumentParser(" not in run_cli
    assert Parser(prog="x").allow_abbrev is False


# ------------------------------------------------------------------------------------------------
# b, c. inputs checked before DeepSpeed starts
# ------------------------------------------------------------------------------------------------

def test_max_seq_len_beyond_the_data_is_refused_before_deepspeed_starts(lee, tmp_path):
    """bert-tiny at --max-seq-len 100000 on data of at most 64 tokens used to train a model with 100,032
    position rows; now it is a clear error, given within seconds."""
    out = tmp_path / "run"
    res = launch_watched(["--data", lee["prefix"], "--model-config", "bert-tiny", "--tokenizer", lee["tok"],
                          "--max-seq-len", "100000", "--max-steps", "1", "--eval-heldout-docs", "0", "--no-export",
                          "--output-dir", str(out), *QUICK], tmp_path / "watch")
    assert_clear_error(res, "--max-seq-len 100000 is longer than the data", "prepared with max_seq_len 64",
                       "Use --max-seq-len 64 or less")
    assert not res["deepspeed_started"] and not out.exists()


def test_a_tokenizer_that_did_not_prepare_the_data_is_reported_before_deepspeed_starts(lee, tmp_path,
                                                                                        big_vocab_tokenizer_dir):
    out = tmp_path / "run"
    res = launch_watched(["--data", lee["prefix"], "--model-config", str(lee["root"] / "tiny"),
                          "--tokenizer", big_vocab_tokenizer_dir, "--max-steps", "1", "--output-dir", str(out),
                          *QUICK], tmp_path / "watch")
    assert_clear_error(res, "does not match the model's tokenizer", lee["prefix"])
    assert not res["deepspeed_started"] and not res["deepspeed_imported"] and not out.exists()
    print(f"tokenizer/data mismatch reported after {res['seconds']:.1f} s (process start included)")


def test_a_relative_path_in_the_yaml_is_explained_before_deepspeed_starts(lee, tmp_path):
    """Relative paths in a --config file resolve against the current folder (as on the command line),
    not the YAML file's: the error says so, and says which folder that is."""
    (tmp_path / "conf").mkdir()
    yaml_file = tmp_path / "conf" / "run.yaml"
    yaml_file.write_text(f"data: lee\nmodel_config: {lee['root'] / 'tiny'}\ntokenizer: {lee['tok']}\n"
                         f"output_dir: {tmp_path / 'run'}\nmax_steps: 1\n")
    res = launch_watched(["--config", str(yaml_file), *QUICK], tmp_path / "watch", cwd=lee["root"] / "tiny")
    assert_clear_error(res, "no prepared dataset at lee", f"`data` in {yaml_file}",
                       f"resolves against the current folder {lee['root'] / 'tiny'}", "not the YAML file's folder")
    assert not res["deepspeed_started"]


def _cfg(lee, **overrides):
    from retromae_ds.config import TrainConfig

    values = dict(data=[lee["prefix"]], model_config=str(lee["root"] / "tiny"), tokenizer=lee["tok"],
                  max_steps=2, micro_batch_size=4, deepspeed="zero2")
    values.update(overrides)
    cfg = TrainConfig(**values)
    cfg.explicit = set(values)
    return cfg


@pytest.mark.parametrize("case", ["data", "tokenizer", "model", "model_config", "deepspeed", "resume",
                                  "output_dir", "max_seq_len", "heldout"])
def test_setup_reports_bad_inputs_before_init_distributed(lee, tmp_path, monkeypatch, case,
                                                          big_vocab_tokenizer_dir):
    """Trainer.setup() checks its inputs before the process group starts: init_distributed is never reached."""
    from retromae_ds.engine import distributed
    from retromae_ds.engine.trainer import Trainer
    from retromae_ds.errors import UserError

    def not_yet(*a, **k):
        raise AssertionError("init_distributed was called before the inputs were checked")

    monkeypatch.setattr(distributed, "init_distributed", not_yet)
    (tmp_path / "a_file").write_text("x")
    cfg = _cfg(lee, **{"output_dir": str(tmp_path / "run"), **{
        "data": dict(data=[str(tmp_path / "missing")]),
        "tokenizer": dict(tokenizer=big_vocab_tokenizer_dir),
        "model": dict(model_config="", model=str(tmp_path / "no_model")),
        "model_config": dict(model_config="bert-huge"),
        "deepspeed": dict(deepspeed="zero9"),
        "resume": dict(resume=str(tmp_path / "no_checkpoint")),
        "output_dir": dict(output_dir=str(tmp_path / "a_file" / "run")),
        "max_seq_len": dict(max_seq_len=65),
        "heldout": dict(eval_heldout_docs=80),
    }[case]})
    want = {"data": "no prepared dataset at", "tokenizer": "does not match the model's tokenizer",
            "model": "--model", "model_config": "--model-config bert-huge", "deepspeed": "--deepspeed zero9",
            "resume": "--resume", "output_dir": "is a file, not a folder", "max_seq_len": "--max-seq-len 65",
            "heldout": "--eval-heldout-docs 80"}[case]
    with pytest.raises(UserError, match=re.escape(want)):
        Trainer(cfg).setup()
    assert not (tmp_path / "run").exists()


def test_the_check_takes_well_under_5_seconds(lee):
    """In a fresh process, imports included (transformers, torch: needed by the run anyway): the whole
    check of a valid run, whose tokenizer is loaded and compared with the data's."""
    code = ("import sys, time; wall = time.monotonic()\n"
            "from retromae_ds.config import TrainConfig\n"
            "from retromae_ds.engine.preflight import check_inputs\n"
            "cfg = TrainConfig(data=[sys.argv[1]], model_config=sys.argv[2], tokenizer=sys.argv[3], max_steps=2)\n"
            "check_inputs(cfg)\n"
            "print(time.process_time(), time.monotonic() - wall)")
    res = subprocess.run([sys.executable, "-c", code, lee["prefix"], str(lee["root"] / "tiny"), lee["tok"]],
                         capture_output=True, text=True, env=R.run_env(), cwd=R.REPO, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    cpu, wall = map(float, res.stdout.split()[-2:])
    print(f"check_inputs in a fresh process: {cpu:.2f} s CPU, {wall:.2f} s wall")
    assert cpu < 5.0


def test_the_demo_is_checked_without_its_data_and_its_config_is_left_as_it_was(tmp_path, monkeypatch,
                                                                              read_only_dir):
    """The demo prepares its corpus after start-up: the check passes while data/demo/ does not exist yet, and
    changes nothing (Trainer.setup applies the demo's defaults itself afterwards)."""
    from retromae_ds.config import TrainConfig
    from retromae_ds.engine.preflight import check_inputs
    from retromae_ds.errors import UserError

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig()
    check_inputs(cfg)
    assert cfg.is_demo and cfg.data == [] and cfg.output_dir == TrainConfig().output_dir
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
    cfg = TrainConfig(output_dir=str(read_only_dir / "demo"))
    cfg.explicit = {"output_dir"}
    with pytest.raises(UserError, match="read-only filesystem"):
        check_inputs(cfg)


# ------------------------------------------------------------------------------------------------
# d. --output-dir: not writable; a failed start leaves nothing
# ------------------------------------------------------------------------------------------------

def test_an_unwritable_output_dir_is_exit_2_with_one_paragraph(lee, tmp_path, read_only_dir):
    res = launch_watched(lee["base"] + ["--max-steps", "1", "--output-dir", str(read_only_dir / "run"), *QUICK],
                         tmp_path / "watch")
    assert_clear_error(res, f"--output-dir {read_only_dir / 'run'}", "not writable", "read-only filesystem")
    assert not res["deepspeed_started"]
    assert len([line for line in res["out"].splitlines() if "error" in line]) == 1


def test_a_run_that_fails_at_start_up_leaves_no_empty_output_dir(lee, tmp_path):
    """A failure found after DeepSpeed started (here a --deepspeed JSON that disagrees with a flag): exit 2,
    and the --output-dir the run created is gone again."""
    ds = json.loads((R.REPO / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 2
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "new" / "run"
    res = launch_watched(lee["base"] + ["--max-steps", "1", *QUICK, "--deepspeed", str(tmp_path / "ds.json"),
                                        "--output-dir", str(out)], tmp_path / "watch")
    assert_clear_error(res, "train_micro_batch_size_per_gpu")
    assert res["deepspeed_started"]  # the failure came after start-up, where the folder had been made
    assert not out.exists()
    assert (tmp_path / "new").exists()  # only what this run created goes: not the parent it found


def test_a_failed_start_keeps_an_output_dir_that_existed(lee, tmp_path):
    from retromae_ds.engine.preflight import remove_if_left_empty

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    remove_if_left_empty(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    (tmp_path / "kept" / "sub").mkdir(parents=True)
    (tmp_path / "kept" / "sub" / "notes.txt").write_text("mine")
    remove_if_left_empty(tmp_path / "kept")
    assert (tmp_path / "kept" / "sub" / "notes.txt").exists()


# ------------------------------------------------------------------------------------------------
# g. Ctrl-C; the run it leaves serves e, f, h and the export's permission message
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interrupted(lee):
    """The tiny run stopped by one Ctrl-C (SIGINT to its process group, as a terminal sends it) after step 2,
    then the same command again: it resumes and finishes (final evaluation, export). Its evaluation
    settings are not the defaults (as the demo's are not), which the export records for `eval`."""
    out = lee["root"] / "ctrl_c"
    args = lee["base"] + ["--max-steps", "24", "--output-dir", str(out), *QUICK, "--eval-max-length", "96",
                          "--eval-heldout-docs", "40", "--seed", "7"]
    log = lee["root"] / "ctrl_c.1.log"
    proc = R.start("python", 1, args, log)
    try:
        R.wait_for(lambda: (out / "metrics.jsonl").exists() and any(
            r.get("step", 0) >= 2 for r in R.metrics(out)), 300, proc, poll=0.1)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            R.kill_group(proc)
    marker = R.marker_of_last(out)
    rest = R.run("python", 1, args, lee["root"] / "ctrl_c.2.log", timeout=420)
    return {"out": out, "rc": rc, "log": log.read_text(), "marker": marker, "rest": rest}


def test_the_first_ctrl_c_finishes_the_step_saves_and_exits_0(interrupted):
    assert interrupted["rc"] == 0, interrupted["log"][-3000:]
    marker = interrupted["marker"]
    assert marker is not None and marker["reason"] == "signal" and 2 <= marker["step"] < 24, marker
    assert "Ctrl-C: finishing this step, then saving a checkpoint" in interrupted["log"]
    assert f"stopped on signal at step {marker['step']}/24" in interrupted["log"]
    rest = interrupted["rest"]
    assert rest.returncode == 0, rest.stdout[-3000:]
    assert f"resumed from" in rest.stdout and f"at step {marker['step']}" in rest.stdout


@pytest.mark.full  # the default tier keeps the first Ctrl-C's save-and-resume run
def test_a_second_ctrl_c_stops_at_once_without_saving(lee, tmp_path):
    """--log-interval 100000: the first Ctrl-C's stop would act only at step 100000, so the second one (1.5 s
    later) finds the run still training, and ends it at once: exit 130, no checkpoint."""
    out = tmp_path / "run"
    args = lee["base"] + ["--max-steps", "100000", "--output-dir", str(out), *QUICK, "--log-interval", "100000",
                          "--eval-heldout-docs", "0", "--no-export"]
    log = tmp_path / "run.log"
    proc = R.start("python", 1, args, log)
    try:
        R.wait_for(lambda: "[retromae-ds] retromae |" in log.read_text(), 300, proc, poll=0.1)  # the start banner
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.5)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            R.kill_group(proc)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "Ctrl-C: finishing this step" in text and "interrupted: stopped at once, nothing saved" in text
    assert R.marker_of_last(out) is None
    assert "Traceback" not in text


def test_a_launcher_passing_the_same_ctrl_c_on_does_not_abort(monkeypatch):
    """torchrun's agent forwards the terminal's SIGINT to the ranks a moment after they got it themselves:
    within StopRequest.SIGINT_REPEAT_S that is the same Ctrl-C, not a second one."""
    from retromae_ds.engine.trainer import StopRequest

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        stop = StopRequest()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # at once: passed on by a launcher
            time.sleep(0.05)
        except KeyboardInterrupt:
            pytest.fail("a first Ctrl-C raised KeyboardInterrupt instead of asking the run to stop and save")
        assert stop.signal == signal.SIGINT
        stop.interrupted_at -= StopRequest.SIGINT_REPEAT_S + 0.1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------
# e, f. `retromae-ds eval` repeats the trainer's final evaluation; no recall@k that is 1 by construction
# ------------------------------------------------------------------------------------------------

def test_eval_of_the_export_repeats_the_final_evaluation(interrupted, lee, tmp_path):
    from retromae_ds.cli import main as cli

    export = interrupted["out"] / "export"
    assert cli(["eval", str(export), "--data", lee["prefix"], "--json", str(tmp_path / "eval.json")]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    final = R.metrics(interrupted["out"], kind="eval")[-1]
    assert final["step"] == 24
    recorded = json.loads((export / "retromae" / "exported_from.json").read_text())["evaluation"]
    assert recorded == {"max_length": 96, "heldout_docs": 40, "seed": 7, "data": lee["prefix"]}
    shared = [k for k in got if isinstance(got[k], float)]
    assert len(shared) >= 12 and all(k in final for k in shared), (sorted(got), sorted(final))
    differ = {k: (got[k], final[k]) for k in shared if abs(got[k] - final[k]) > 1e-6}
    assert not differ, differ


def test_eval_defaults_are_the_trainers(tmp_path):
    """Without a run's record (any Hugging Face folder), eval uses the trainer's defaults: --max-length 256,
    --heldout-docs 50, --seed 42, from one place (retromae_ds/config.py)."""
    from retromae_ds import config
    from retromae_ds.cli import main as cli
    from tests.helpers.tiny_run import minilm_path

    assert cli(["eval", minilm_path(), "--no-lee", "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    defaults = config.TrainConfig()
    assert (got["max_length"], got["heldout_docs"], got["seed"]) == \
        (defaults.eval_max_length, defaults.eval_heldout_docs, defaults.seed) == \
        (config.EVAL_MAX_LENGTH, config.EVAL_HELDOUT_DOCS, config.DEFAULT_SEED) == (256, 50, 42)


def test_recall_at_k_is_left_out_when_k_reaches_the_candidates():
    import numpy as np
    import torch

    from retromae_ds.evaluate import heldout_retrieval, rank_metrics

    class BagOfIds(torch.nn.Module):
        """Every position's vector is the row's bag of (non-special) ids: passages over disjoint ids retrieve
        their own rest perfectly."""

        def __init__(self, vocab: int):
            super().__init__()
            self.vocab, self.dummy = vocab, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            bag = torch.nn.functional.one_hot(input_ids, self.vocab).float()
            bag[..., :3] = 0.0  # [CLS], [SEP], [PAD] are ids 0, 1, 2 here
            counts = bag.sum(1, keepdim=True).expand(-1, input_ids.shape[1], -1)
            return type("Output", (), {"last_hidden_state": counts})()

    rng = np.random.default_rng(0)
    passages = [10 + 50 * k + rng.integers(0, 50, 40) for k in range(120)]
    encoder = BagOfIds(10 + 50 * 120)
    few = heldout_retrieval(encoder, passages[:62], 0, 1, 2)  # the newcomer's case: 62 candidates
    assert few["heldout/num_queries"] == 62 and "heldout/recall100" not in few and "heldout/recall100_mean" not in few
    assert few["heldout/recall10"] == 1.0 and few["heldout/mrr10"] == 1.0
    many = heldout_retrieval(encoder, passages, 0, 1, 2)
    assert many["heldout/num_queries"] == 120 and many["heldout/recall100"] == 1.0
    assert set(rank_metrics(np.array([1, 2]), candidates=2)) == {"heldout/mrr10", "heldout/recall1"}


# ------------------------------------------------------------------------------------------------
# h. the export loads without transformers' MISSING report
# ------------------------------------------------------------------------------------------------

def test_the_export_loads_completely_and_its_card_explains_the_pooler(interrupted):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    from retromae_ds.model.retromae import RetroMAEForPretraining

    export = interrupted["out"] / "export"
    model, info = AutoModel.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hidden = model.config.hidden_size
    assert torch.equal(model.pooler.dense.weight, torch.eye(hidden)) and not model.pooler.dense.bias.any()
    card = (export / "README.md").read_text()
    assert "pooler_output = tanh([CLS] hidden state)" in card and "last_hidden_state[:, 0]" in card
    # the full RetroMAE state is the training module's: no pooler, and it loads strictly to continue training
    assert not [k for k in load_file(str(export / "retromae" / "model.safetensors")) if "pooler" in k]
    RetroMAEForPretraining.from_pretrained(export / "retromae")


def test_loading_the_export_prints_no_load_report(interrupted):
    code = ("from transformers import AutoModel; import sys; AutoModel.from_pretrained(sys.argv[1]); "
            "from sentence_transformers import SentenceTransformer; SentenceTransformer(sys.argv[1], device='cpu')")
    res = subprocess.run([sys.executable, "-c", code, str(interrupted["out"] / "export")], capture_output=True,
                         text=True, env=R.run_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MISSING" not in res.stdout + res.stderr and "LOAD REPORT" not in res.stdout + res.stderr, res.stderr


# ------------------------------------------------------------------------------------------------
# i. smaller items
# ------------------------------------------------------------------------------------------------

def test_help_texts_are_user_documentation():
    from retromae_ds.engine import trainer

    top, subs = _all_parsers()
    helps = {name: p.format_help() for name, p in subs.items()}
    with pytest.raises(SystemExit):
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            trainer.run_cli(["--help"])
    helps["pretrain.py"] = buffer.getvalue()
    markup = ("``", ":func:", ":class:", ":meth:", "This module", "Trainer.setup", "Distributed use",
              "retromae_ds/")
    found = {name: [m for m in markup if m in text] for name, text in helps.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    assert "Ctrl-C" in helps["train"] and "resolve against the current folder" in helps["train"]


def test_export_to_an_unwritable_folder_says_so_not_free_space(interrupted, read_only_dir, capsys):
    from retromae_ds.cli import main as cli

    assert cli(["export", str(interrupted["out"]), str(read_only_dir / "enc")]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "read-only filesystem" in err
    assert "free space" not in err.lower() and "bytes are free" not in err and "Traceback" not in err


def test_eval_json_goes_into_a_new_folder_and_an_unwritable_target_is_refused_before_the_model(tmp_path,
                                                                                              read_only_dir, capsys):
    """`eval --json` into a folder that does not exist yet makes it (it used to fail with a traceback after the
    whole evaluation); one that cannot be written is an exit 2 naming the path before any model loads."""
    from retromae_ds.cli import main as cli
    from retromae_ds.errors import UserError
    from retromae_ds.evaluate import check_json_target, write_json_atomic

    target = tmp_path / "new" / "sub" / "out.json"
    check_json_target(target)
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and not list(target.parent.glob("*.partial"))
    write_json_atomic(tmp_path / "other" / "out.json", {"b": 2})  # the probe writes without the check
    assert json.loads((tmp_path / "other" / "out.json").read_text()) == {"b": 2}
    for bad, words in ((read_only_dir / "x.json", "not writable"), (read_only_dir / "d" / "x.json", "cannot create"),
                       (tmp_path, "is a folder")):
        with pytest.raises(UserError, match=words):
            check_json_target(bad)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "passage": f"passage {i}"}) + "\n" for i in range(3)))
    assert cli(["eval", str(tmp_path / "no-such-encoder"), "--pairs", str(pairs), "--no-lee",
                "--json", str(read_only_dir / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "not writable" in err and "no-such-encoder" not in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["gzip", "nul"])
@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_a_binary_input_file_is_called_binary_not_an_encoding_problem(tmp_path, kind, on_bad):
    from retromae_ds.data.prepare import prepare_files
    from retromae_ds.errors import UserError
    from tests.helpers.tiny_run import minilm_path

    if kind == "gzip":
        path = tmp_path / "corpus.jsonl"
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50))
        want = "is gzip-compressed, not a text .jsonl file: decompress it first: `gzip -dc"
    else:
        path = tmp_path / "corpus.txt"
        path.write_bytes(bytes(range(256)) * 40)
        want = "is a binary file (it holds NUL bytes), not a text .txt file"
    with pytest.raises(UserError) as err:
        prepare_files([str(path)], minilm_path(), str(tmp_path / "out"), num_proc=1, progress=False,
                      on_bad_record=on_bad)
    assert want in str(err.value) and "iconv" not in str(err.value) and "encode" not in str(err.value)


def test_init_says_what_it_wrote(tmp_path, capsys):
    from retromae_ds.cli import main as cli

    assert cli(["init", str(tmp_path / "mine")]) == 0
    out = capsys.readouterr().out
    assert f"wrote 5 files to {tmp_path / 'mine'}/" in out and "launch/slurm.sh" in out and "sbatch" in out


def test_fill_ratio_and_padding_efficiency_say_what_each_measures(lee, capsys):
    from retromae_ds.cli import main as cli
    from retromae_ds.data.prepare import format_summary

    text = format_summary({"prefix": "data/x", "num_documents": 3, "num_blocks": 4, "num_tokens": 100,
                           "dtype": "uint16", "dropped_empty_documents": 0, "skipped_bad_records": 0,
                           "fill_ratio": 0.4, "block_capacity": 62, "seconds": 1.0, "tokens_per_second": 100.0,
                           "num_proc": 1})
    assert "fill ratio 0.400: tokens / (blocks x 62), how full the blocks are" in text
    assert "retromae-ds info data/x" in text and "padding_efficiency" in text
    assert cli(["info", lee["prefix"]]) == 0
    note = json.loads(capsys.readouterr().out)["padding_efficiency"]["note"]
    assert "padded to its longest block" in note and "fill ratio" in note
