"""Every shipped DeepSpeed config x every precision, on real CPU ranks (issue 18).

Cells: ds_configs/{zero1,zero2,zero3,zero3_offload}.json x {fp32, bf16, fp16}, a tiny BERT on a small
real corpus. Each cell is one pipeline of three launches and an export, each stage checked by its own
test (the stages of a cell run once and are shared through a module-scoped cache; cells run a few at a
time in the background, see the `cells` fixture):

1. train: 2 ranks (torchrun), --max-steps 2, an interval checkpoint at step 1 and the final one at step 2;
   the engine ran the cell's ZeRO stage and precision (read from DeepSpeed's objects by the probe).
2. resume: the same 2 ranks, --resume auto, --max-steps 3: resumes from step 2 and trains step 3; the
   optimizer's fp32 master weights before its first step (tests/helpers/probe_pretrain.py,
   RETROMAE_TEST_PROBE_MASTERS) equal DeepSpeed's consolidation of that checkpoint exactly.
3. new world size: 1 rank (python), --grad-accum 2 (the same global batch), --max-steps 4: resumes
   from step 3 through the consolidated weights, and again the fp32 masters before its first step equal
   the consolidated fp32 weights of that checkpoint exactly: a bf16/fp16 resume must not round them
   to 16 bits.
4. export: `retromae-ds export` of the 2-rank resume's checkpoint (step 3, two ranks' partitions to merge)
   loads with AutoModel, its weights are finite and equal DeepSpeed's own consolidation of that checkpoint
   (get_fp32_state_dict_from_zero_checkpoint), the encoder and the full RetroMAE state.

fp16 on CPU: DeepSpeed refuses fp16 on a CPU accelerator ("Type fp16 is not supported on your device.")
and so does the trainer (--precision fp16 needs a GPU). The fp16 cells run only through a test shim
(RETROMAE_TEST_FP16_ON_CPU in tests/helpers/probe_pretrain.py: the CPU accelerator reports fp16 as supported and
the trainer resolves fp16 as on a GPU). They check configuration resolution, DeepSpeed's fp16 optimizer
wrappers, checkpoint layout, resume and consolidation, not fp16 GPU kernels or loss-scale behaviour on
real hardware. Likewise bf16 here is CPU bf16 (correct, ~10x slower than fp32 on CPUs without AVX512-BF16).

DeepSpeed 0.19.8 accepts every pair here (offload included, with fp16 through the shim), so no cell is
skipped.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from retromae_ds.engine.checkpoint import read_marker
from tests.helpers import engine_runs as R
from tests.helpers import tiers
from tests.helpers.tiny_run import tiny_run

pytestmark = pytest.mark.distributed

CONFIGS = ("zero1", "zero2", "zero3", "zero3_offload")
PRECISIONS = ("fp32", "bf16", "fp16")
STAGE_OF = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
PARAM_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

COMMON = ["--micro-batch-size", "2", "--log-interval", "1", "--save-interval", "1", "--keep-last", "10",
          "--eval-interval", "0", "--eval-heldout-docs", "10", "--eval-max-length", "64", "--lr", "1e-3",
          "--warmup", "1", "--seed", "11", "--no-export"]
TRAIN_STEPS, RESUME_STEPS, RESHARD_STEPS = 2, 3, 4
# the first run of zero3_offload JIT-builds DeepSpeed's CPU Adam (~80 s idle, minutes on a busy machine)
TIMEOUT = {"zero3_offload": 1200}

# cells launched at once (see the `cells` fixture); RETROMAE_TEST_MATRIX_WORKERS=1 runs them one by one
WORKERS = int(os.environ.get("RETROMAE_TEST_MATRIX_WORKERS", "0")) or max(1, min(4, os.cpu_count() or 1))

# The default tier runs one cell per ZeRO stage, each in a precision whose checkpoints take another path
# (BF16_Optimizer under ZeRO-1, bf16 and fp16 masters under ZeRO-2/3; the fp32 pipelines are also
# test_engine.py's ZeRO-2/3 runs); the other 9 cells are the full tier (--full, tests/README.md).
# zero1-bf16's new-world-size resume is the full tier's too: its consolidation is checked by its export, and
# the bf16 masters' path through a new world size by zero2-bf16's.
DEFAULT_CELLS = {("zero1", "bf16"), ("zero2", "bf16"), ("zero3", "fp16")}
DEFAULT_RESHARD_CELLS = DEFAULT_CELLS - {("zero1", "bf16")}


def cells_of(default: set) -> list:
    return [pytest.param(ds, precision, id=f"{ds}-{precision}",
                         marks=() if (ds, precision) in default else pytest.mark.full)
            for ds in CONFIGS for precision in PRECISIONS]


CELLS, RESHARD_CELLS = cells_of(DEFAULT_CELLS), cells_of(DEFAULT_RESHARD_CELLS)
RESHARD_TEST = "test_resumes_at_a_new_world_size_from_the_exact_fp32_masters"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The prepared corpus and tiny BERT config, shared by all cells."""
    return tiny_run(tmp_path_factory.mktemp("matrix"), n_docs=40, max_seq_len=64)


class StageFailed(AssertionError):
    """A stage of a cell did not do what it should; later stages of the cell report it instead of running."""


@dataclass
class Launch:
    result: object  # subprocess.CompletedProcess
    probe: Path
    seconds: float
    logged: list[int]  # the steps in metrics.jsonl right after this launch (later launches add theirs)


@dataclass
class Cell:
    ds: str
    precision: str
    root: Path
    base: list[str]
    reshards: bool = True  # run the third stage in the background pipeline (its test is selected)
    launches: dict[str, Launch] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.ds}-{self.precision}"

    @property
    def out(self) -> Path:
        return self.root / self.name

    def checkpoint(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step_{step:08d}"

    def launch(self, stage: str, launcher: str, nproc: int, extra: list[str]) -> Launch:
        """Launch one stage once (later calls get the same record), with the probe and the cell's precision."""
        if stage not in self.launches:
            probe = self.root / f"{self.name}.{stage}.probe"
            env = R.probe_env(probe)
            env["RETROMAE_TEST_PROBE_MASTERS"] = "1"
            if self.precision == "fp16":
                env["RETROMAE_TEST_FP16_ON_CPU"] = "1"
            args = self.base + COMMON + ["--deepspeed", f"ds_configs/{self.ds}.json", "--precision", self.precision,
                                         "--output-dir", str(self.out), "--resume", "auto"] + extra
            t0 = time.monotonic()
            res = R.run(launcher, nproc, args, self.root / f"{self.name}.{stage}.log", script=R.PROBE, env=env,
                        timeout=TIMEOUT.get(self.ds, 420))
            seconds = time.monotonic() - t0
            logged = [r["step"] for r in R.metrics(self.out)] if (self.out / "metrics.jsonl").exists() else []
            self.launches[stage] = Launch(res, probe, seconds, logged)
        return self.launches[stage]

    def stage(self, stage: str, run) -> Launch:
        """`run()` the stage; an exception is kept and raised again for later uses."""
        if stage in self.failed:
            raise self.failed[stage]
        try:
            return run()
        except BaseException as err:  # noqa: BLE001 - a timeout's AssertionError, a KeyboardInterrupt
            self.failed[stage] = err
            raise

    # --- the stages ---------------------------------------------------------------------------------
    def train(self) -> Launch:
        def run():
            launch = self.launch("train", "torchrun", 2, ["--max-steps", str(TRAIN_STEPS)])
            self._check_rc(launch, "training on 2 ranks")
            return launch
        return self.stage("train", run)

    def resume(self) -> Launch:
        def run():
            self._require("train", "the training run it resumes")
            launch = self.launch("resume", "torchrun", 2, ["--max-steps", str(RESUME_STEPS)])
            self._check_rc(launch, "resume on the same 2 ranks")
            return launch
        return self.stage("resume", run)

    def reshard(self) -> Launch:
        def run():
            self._require("resume", "the 2-rank resume whose checkpoint it resumes from")
            launch = self.launch("reshard", "python", 1, ["--max-steps", str(RESHARD_STEPS), "--grad-accum", "2"])
            self._check_rc(launch, "resume on 1 rank (new world size)")
            return launch
        return self.stage("reshard", run)

    def run_all(self) -> None:
        """Every stage in order (the background pipeline); outcomes are kept for the tests to raise."""
        for stage in (self.train, self.resume, self.reshard) if self.reshards else (self.train, self.resume):
            try:
                stage()
            except BaseException:  # noqa: BLE001 - kept in self.failed, raised by the stage's test
                return

    def _require(self, stage: str, what: str) -> None:
        """The earlier stage has run (run it now if not) and passed; when it failed, say so."""
        try:
            getattr(self, stage)()
        except Exception as err:
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise StageFailed(f"{self.name}: not run because {what} failed: {first}") from None

    def _check_rc(self, launch: Launch, what: str) -> None:
        res = launch.result
        if res.returncode != 0:
            raise StageFailed(f"{self.name}: {what} exited with {res.returncode}:\n{summarize(res.stdout)}")


def summarize(log: str, lines: int = 60) -> str:
    """The end of a run's log, starting at its first traceback when there is one."""
    text = log.splitlines()
    starts = [i for i, line in enumerate(text) if "Traceback (most recent call last)" in line]
    picked = text[starts[0]:] if starts else text
    return "\n".join(picked[-lines:])


def selected_cells(session, module) -> dict[tuple[str, str], bool]:
    """{cell: whether its new-world-size stage is tested} for the cells this session's selected tests of
    `module` use, in test order (-k can narrow them; the full tier's tests only with --full)."""
    found: dict[tuple[str, str], bool] = {}
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is module and "ds" in params and tiers.runs_in_this_session(item):
            key = (params["ds"], params["precision"])
            found[key] = found.get(key, False) or item.originalname == RESHARD_TEST
    return found


@pytest.fixture(scope="module")
def cells(corpus, request):
    """cells(ds, precision): the Cell with its launches done (the third when its test is selected). They
    start in the background when the first test asks, WORKERS cells at a time, each cell's stages in order, in test order; a test
    waits for its cell's pipeline. A launch is mostly imports and start-up (~13 s of CPU per process for
    well under 1 s of training), with idle gaps a second cell fills: on a quiet 2-core machine the 36
    launches took 12 min 39 s one cell at a time (80 s of it the one-off CPU Adam build) and 6 min 47 s
    two at a time; they need ~13 min of CPU either way, so a busy machine takes longer. Every process is
    launched exactly as it would be alone (own ports, own folders)."""
    made = {key: Cell(*key, corpus["root"], corpus["base"], reshards)
            for key, reshards in selected_cells(request.session, request.module).items()}
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="matrix")
    futures = {key: pool.submit(cell.run_all) for key, cell in made.items()}

    def get(ds: str, precision: str) -> Cell:
        if (ds, precision) not in made:  # not among the selected tests' cells: run here when asked
            made[(ds, precision)] = Cell(ds, precision, corpus["root"], corpus["base"])
        if (ds, precision) in futures:
            futures[(ds, precision)].result()
        return made[(ds, precision)]

    yield get
    pool.shutdown(wait=True, cancel_futures=True)
    # wall time per launch, for the record (pytest -s shows it)
    for cell in made.values():
        times = ", ".join(f"{stage} {launch.seconds:.1f}s" for stage, launch in cell.launches.items())
        print(f"\n[matrix] {cell.name}: {times}", end="")


def consolidated(checkpoint: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of a checkpoint's fp32 weights (names as in the RetroMAE module)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def tied(state: dict[str, torch.Tensor], name: str, among) -> bool:
    """`name` is one of the names under which DeepSpeed's consolidation lists a tied tensor (the MLM
    decoder's weight and bias), and another of them is in `among`: the same storage."""
    v = state[name]
    return any(m != name and state[m].data_ptr() == v.data_ptr() and state[m].shape == v.shape
               for m in among if m in state)


def assert_masters_are_the_checkpoints(cell: Cell, launch: Launch, checkpoint: Path, when: str) -> None:
    """The optimizer's fp32 master weights before the launch's first step (recorded by the probe) equal
    DeepSpeed's consolidation of the checkpoint it resumed from, bit for bit."""
    path = launch.probe / "masters.pt"
    assert path.exists(), f"{cell.name}: the probe recorded no fp32 masters (engine.step never ran?)"
    masters = torch.load(path)
    none = sorted(k for k, v in masters.items() if v is None)
    assert not none, f"{cell.name}: DeepSpeed has no fp32 master for {none[:3]}"
    want = consolidated(checkpoint)
    assert set(masters) <= set(want), f"{cell.name}: masters not in the checkpoint: {sorted(set(masters) - set(want))}"
    # a tied parameter has one master; the consolidation lists it under each of its names
    extra = sorted(k for k in set(want) - set(masters) if not tied(want, k, masters))
    assert not extra, f"{cell.name}: parameters of the checkpoint with no fp32 master: {extra}"
    differ = [k for k in masters if not torch.equal(masters[k], want[k])]
    if differ:
        first = differ[0]
        err = (masters[first] - want[first]).abs().max().item()
        low = TORCH_DTYPE[cell.precision]
        rounded = cell.precision != "fp32" and all(torch.equal(masters[k], want[k].to(low).float()) for k in differ)
        pytest.fail(f"{cell.name}: after {when}, {len(differ)} of {len(masters)} fp32 master weights differ from "
                    f"the consolidated fp32 weights of {checkpoint.name} (first: {first}, max |diff| {err:.3g})"
                    + (f"; they equal those weights rounded to {cell.precision}" if rounded else ""))


# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ds, precision", CELLS)
def test_trains_on_two_ranks_with_interval_checkpoints(cells, ds, precision):
    cell = cells(ds, precision)
    launch = cell.train()
    for rank in (0, 1):
        engine = R.probe(launch.probe, rank)["engine"]
        ran = (engine["zero_stage"], engine["bf16"], engine["fp16"], engine["param_dtype"])
        want = (STAGE_OF[ds], precision == "bf16", precision == "fp16", PARAM_DTYPE[precision])
        assert ran == want, f"{cell.name} rank {rank}: the engine ran (stage, bf16, fp16, dtype) = {ran}, not {want}"
    for step in range(1, TRAIN_STEPS + 1):
        marker = read_marker(cell.checkpoint(step))
        assert marker is not None, f"{cell.name}: no complete checkpoint at step {step}"
        assert (marker["precision"], marker["zero_stage"], marker["world_size"]) == (precision, STAGE_OF[ds], 2), \
            f"{cell.name}: checkpoint step {step} records {marker['precision']}, ZeRO-{marker['zero_stage']}, " \
            f"world {marker['world_size']}"
    assert read_marker(cell.checkpoint(1))["reason"] == "interval", f"{cell.name}: step 1 is not an interval save"
    if ds == "zero3_offload":
        assert read_marker(cell.checkpoint(TRAIN_STEPS))["optimizer"] == "DeepSpeedCPUAdam", cell.name
    assert launch.logged == [1, 2], f"{cell.name}: logged steps {launch.logged}"


@pytest.mark.parametrize("ds, precision", CELLS)
def test_resumes_on_the_same_two_ranks(cells, ds, precision):
    cell = cells(ds, precision)
    launch = cell.resume()
    out = launch.result.stdout
    source = cell.checkpoint(TRAIN_STEPS)
    assert f"resumed from {source} at step {TRAIN_STEPS}" in out, \
        f"{cell.name}: the 2-rank rerun did not resume from {source}:\n{summarize(out)}"
    assert "new world size" not in out, f"{cell.name}: a same-size resume went through the new-world-size path"
    marker = read_marker(cell.checkpoint(RESUME_STEPS))
    assert marker is not None and marker["world_size"] == 2, f"{cell.name}: no checkpoint at step {RESUME_STEPS}"
    assert launch.logged == [1, 2, 3], f"{cell.name}: logged steps {launch.logged}"
    # DeepSpeed loaded each rank's own fp32 partitions: the masters are the checkpoint's, exactly
    assert_masters_are_the_checkpoints(cell, launch, source, "a resume on the same 2 ranks")


@pytest.mark.parametrize("ds, precision", RESHARD_CELLS)
def test_resumes_at_a_new_world_size_from_the_exact_fp32_masters(cells, ds, precision):
    cell = cells(ds, precision)
    launch = cell.reshard()
    out = launch.result.stdout
    source = cell.checkpoint(RESUME_STEPS)
    assert f"resumed from {source} at step {RESUME_STEPS} (new world size" in out, \
        f"{cell.name}: the 1-rank run did not resume from {source} as a new world size:\n{summarize(out)}"
    marker = read_marker(cell.checkpoint(RESHARD_STEPS))
    assert marker is not None and marker["world_size"] == 1, f"{cell.name}: no checkpoint at step {RESHARD_STEPS}"
    assert launch.logged == [1, 2, 3, 4], f"{cell.name}: logged steps {launch.logged}"
    # the weights came through the consolidation; under bf16/fp16 DeepSpeed then casts the module to 16
    # bits and clones its masters from that, so the trainer must put the exact fp32 values back
    assert_masters_are_the_checkpoints(cell, launch, source, "a resume with a new world size (1 rank)")


@pytest.mark.parametrize("ds, precision", CELLS)
def test_export_equals_deepspeeds_consolidation(cells, ds, precision, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    from retromae_ds.cli import main as cli

    cell = cells(ds, precision)
    cell.resume()
    final = cell.checkpoint(RESUME_STEPS)
    target = tmp_path / "encoder"
    assert cli(["export", str(final), str(target)]) == 0, f"{cell.name}: export of {final} failed"
    want = consolidated(final)
    encoder = AutoModel.from_pretrained(target).eval()
    got = encoder.state_dict()
    prefix = f"lm.{encoder.base_model_prefix}."  # the RetroMAE module's encoder is lm.<base model>
    want_encoder = {k[len(prefix):]: v for k, v in want.items() if k.startswith(prefix)}
    assert want_encoder and set(want_encoder) <= set(got), \
        f"{cell.name}: the export lacks {sorted(set(want_encoder) - set(got))[:5]}"
    bad = [k for k in want_encoder if not torch.isfinite(got[k]).all()]
    assert not bad, f"{cell.name}: exported weights not finite: {bad[:5]}"
    differ = [k for k in want_encoder if not torch.equal(got[k], want_encoder[k])]
    assert not differ, f"{cell.name}: exported encoder weights differ from DeepSpeed's consolidation: {differ[:5]}"
    full = load_file(str(target / "retromae" / "model.safetensors"))
    assert any(k.startswith("c_head.") for k in full), f"{cell.name}: the full export has no decoder"
    differ = [k for k in want if k in full and not torch.equal(full[k], want[k])]
    missing = [k for k in want if k not in full and not tied(want, k, full)]  # a tied tensor is saved once
    assert not differ and not missing, \
        f"{cell.name}: the full RetroMAE export differs ({differ[:5]}) or lacks ({missing[:5]}) weights"
