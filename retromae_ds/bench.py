"""Run a benchmark from the repository's bench/ folder (prints JSON).

    retromae-ds bench data        # python -m bench.bench_data, from the checkout's root
    retromae-ds bench model       # python -m bench.bench_model

Benchmarks are modules of the checkout (bench/, scripts/), not of the package: they run with the
checkout's root as the working directory and on the import path, as `python -m` from there would.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from retromae_ds.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="benchmark name: the NAME of bench/bench_NAME.py")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def main(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"bench_{args.name}.py"
    if not script.exists():
        found = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
        raise UserError(f"no benchmark {args.name!r} in {BENCH_DIR} (available: {', '.join(found) or 'none'}; "
                        f"benchmarks run from a source checkout).")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.call([sys.executable, "-m", f"bench.bench_{args.name}", *args.rest], cwd=ROOT, env=env)
