"""The two test tiers and the per-venv cache of DeepSpeed's JIT-built ops (used by tests/conftest.py).

Tiers (tests/README.md says what each holds): a test marked ``full`` is skipped, with FULL_REASON, unless
pytest runs with ``--full``; ``--full -m full`` runs the full tier alone (what .ci/run does after the
default tier).

Extension cache: the offload runs load DeepSpeed's CPU Adam (the ``deepspeed_shm_comm`` op, which every CPU
process group used to build, is left out: engine/distributed.py); torch JIT-builds it into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions/pyXY_cpu).
That default folder is shared by every environment of a user, and a build made by another virtual
environment does not match (other include paths), so each switch between environments rebuilds (50-150 s on
2 cores). In a virtual environment the tests use SYS.PREFIX/torch_extensions instead: one build per venv.
A TORCH_EXTENSIONS_DIR set by the user is kept; outside a venv torch's default is kept.

Workers: a run of the whole suite (no test paths on the command line, e.g. the README's command) uses 2
pytest-xdist workers, one test file per worker at a time (`--dist loadfile`: a module's shared training
runs stay in one process), when pytest-xdist is installed (the `dev` extra) and the machine has 2 or more
cores. On 2 cores this measured 12 min instead of 19 for the default tier: the launched training
processes leave a core idle much of the time (bench/results/2026-12-05-test-suite-cpu.md). Runs given
paths or test ids (one file, the mutation check) stay in one process; `-n N` chooses, `-n 0` runs serially.
"""

from __future__ import annotations

import os
import sys

import pytest

FULL_REASON = "full tier: run with --full (tests/README.md)"
WHOLE_SUITE_WORKERS = 2


def use_per_venv_extension_cache() -> str | None:
    """Point TORCH_EXTENSIONS_DIR at this venv's own folder (inherited by every launched process);
    returns the folder in use, None for torch's default."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def full_tier_requested(config) -> bool:
    return bool(config.getoption("--full", default=False))


def skip_full_tier_unless_asked(config, items) -> None:
    if full_tier_requested(config):
        return
    skip = pytest.mark.skip(reason=FULL_REASON)
    for item in items:
        if item.get_closest_marker("full") is not None:
            item.add_marker(skip)


def runs_in_this_session(item) -> bool:
    """False for a collected test that this session skips as part of the full tier (for module fixtures
    that start work for the tests they will serve, e.g. the configuration matrix's cells)."""
    return item.get_closest_marker("full") is None or full_tier_requested(item.config)


def parallel_whole_suite(config) -> None:
    """Before pytest-xdist reads its options: 2 workers with --dist loadfile for a whole-suite run (above)."""
    option = config.option
    if (os.environ.get("PYTEST_XDIST_WORKER")  # a worker: its controller decided
            or not config.pluginmanager.hasplugin("xdist")
            or config.args_source != pytest.Config.ArgsSource.TESTPATHS
            or getattr(option, "numprocesses", None) is not None or getattr(option, "dist", "no") != "no"
            or getattr(option, "tx", None) or option.usepdb or option.collectonly
            or (os.cpu_count() or 1) < WHOLE_SUITE_WORKERS):
        return
    option.numprocesses = WHOLE_SUITE_WORKERS
    option.dist = "loadfile"
    option.loadscopereorder = False  # keep the order heaviest_files_first gives (xdist's: most tests first)


# Test files by their test time, heaviest first (bench/results/2026-12-05-test-suite-cpu.md; the full tier's
# demo and Slurm runs lead). A worker takes the next file when it finishes one, so the long files must start
# first: pytest-xdist's own order (files with the most tests first) left few-test, long-running files such
# as test_sync_free.py and test_zero_failures.py to the end, one worker busy with them while the other idled.
HEAVIEST_FIRST = ("test_demo.py", "test_slurm.py", "test_config_matrix.py", "test_engine.py",
                  "test_cli_usability.py", "test_retrieval_eval.py", "test_zero_failures.py", "test_sync_free.py",
                  "test_cluster_faults.py", "test_storage_faults.py", "test_model.py", "test_presets.py",
                  "test_length_grouping.py", "test_new_parts_warmup.py", "test_scale.py", "test_wsd.py",
                  "test_step_features.py", "test_trainer_features.py")


def heaviest_files_first(items) -> None:
    """Reorder `items` in place: the files of HEAVIEST_FIRST in its order, then the rest as collected (a
    stable sort: tests keep their order within a file)."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
