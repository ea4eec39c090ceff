"""Run a benchmark script from the repository's bench/ folder (prints JSON).

    retromae-ds bench data        # bench/bench_data.py
    retromae-ds bench model       # bench/bench_model.py
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from retromae_ds.errors import UserError

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="benchmark name: the NAME of bench/bench_NAME.py")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def main(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"bench_{args.name}.py"
    if not script.exists():
        found = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
        raise UserError(f"no benchmark {args.name!r} in {BENCH_DIR} (available: {', '.join(found) or 'none'}; "
                        f"benchmarks run from a source checkout).")
    sys.argv = [str(script)] + list(args.rest)
    runpy.run_path(str(script), run_name="__main__")
    return 0
