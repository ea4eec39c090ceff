"""`retromae-ds init DIR`: write editable copies of the bundled DeepSpeed configs and SLURM script.

Why: a wheel install (`pip install retromae-ds`, or from git) has no checkout, so no `ds_configs/` or
`launch/` folder to edit. The trainer finds the bundled configs by name on its own (`--deepspeed zero2`
or `ds_configs/zero2.json`); this command is for users who want to change them, or submit with Slurm:

    retromae-ds init my_run && cd my_run
    sbatch launch/slurm.sh --deepspeed ds_configs/zero2.json --data ... --model ...
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from retromae_ds.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="where to write ds_configs/*.json and launch/slurm.sh")
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")


def main(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    written = write_templates(folder, overwrite=args.overwrite)
    print(f"wrote {len(written)} files to {folder}/ (edit them freely):")
    for path in written:
        print(f"  {path}")
    print(f"next: cd {folder} && sbatch launch/slurm.sh --deepspeed ds_configs/zero2.json --data ... --model ...\n"
          f"  (or, without Slurm: deepspeed --module retromae_ds.engine.trainer --deepspeed ds_configs/zero2.json ...)")
    return 0


def write_templates(folder: Path, overwrite: bool = False) -> list[Path]:
    from retromae_ds.engine.ds_config import bundled_ds_config_dir

    package = Path(__file__).resolve().parent
    plan = [(p, folder / "ds_configs" / p.name) for p in sorted(bundled_ds_config_dir().glob("*.json"))]
    plan.append((package / "templates" / "slurm.sh", folder / "launch" / "slurm.sh"))
    clashes = [str(dst) for _, dst in plan if dst.exists()]
    if clashes and not overwrite:
        raise UserError(f"{', '.join(clashes)} already exist; pass --overwrite to replace them or choose another DIR.")
    written = []
    for src, dst in plan:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        except OSError as err:
            raise UserError(f"{dst}: could not write it ({err.strerror or err}); choose another DIR.") from None
        written.append(dst)
    return written
