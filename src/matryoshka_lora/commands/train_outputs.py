"""The output folder of a training run: refusing to mix runs, clearing an earlier one."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .config_files import RESOLVED_CONFIG_STEM
from .errors import CLIError

RUN_FILES = ("adapter", "checkpoints", "training_log.jsonl", "train_config.json")
RUN_FILES += (f"{RESOLVED_CONFIG_STEM}.yaml", f"{RESOLVED_CONFIG_STEM}.json", "train_summary.json")


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse to mix a new run with an earlier one unless resuming or overwriting."""
    from ..train import list_checkpoints

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {out} exists and is not a folder")
    if args.overwrite:
        return
    if (out / "adapter" / "adapter_config.json").is_file():
        raise CLIError(
            f"--output-dir {out} already holds a finished run ({out / 'adapter'}): "
            "pass --overwrite to replace it or choose another --output-dir"
        )
    if list_checkpoints(out / "checkpoints") and not args.resume:
        raise CLIError(
            f"--output-dir {out} holds checkpoints of an unfinished run: resume it (--resume) "
            "or pass --overwrite to start again"
        )


def clear_earlier_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
