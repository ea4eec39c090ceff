"""The demo (README command 1) ends at the figures the README quotes (full tier: ~4 min on 2 cores).

The demo is deterministic (seeded data order, masks and dropout; one rank, fp32), so its evaluations at
steps 0 and 100 are fixed numbers. They are kept in one place, bench/results/demo_figures.json, which the
README's results row must quote (tests/test_docs.py, default tier) and which this test compares with a
fresh run of the demo's own command, in an empty folder (the demo prepares its corpus there). When a
change moves the demo on purpose, run the demo and put its numbers into that file.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import engine_runs as R

pytestmark = pytest.mark.full

FIGURES = R.REPO / "bench" / "results" / "demo_figures.json"


def test_the_demo_ends_at_the_figures_the_readme_quotes(tmp_path):
    figures = json.loads(FIGURES.read_text())
    command = ["deepspeed", str(R.REPO / "launch" / "pretrain.py"), "--deepspeed",
               str(R.REPO / "ds_configs" / "zero2.json")]
    res = subprocess.run(command, cwd=tmp_path, env=R.run_env(), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    evals = {r["step"]: r for r in R.metrics(tmp_path / "runs" / "demo", kind="eval")}
    assert sorted(evals) == [0, 50, figures["steps"]], sorted(evals)
    for when, step in (("start", 0), ("end", figures["steps"])):
        for key, want in figures[when].items():
            got = evals[step][key]
            assert got == pytest.approx(want, abs=2e-3), (
                f"the demo's {key} at step {step} is {got:.4f}, {FIGURES.name} says {want:.4f}: if the change "
                f"is meant to move the demo, put the new figures into {FIGURES} (and the README row)")
