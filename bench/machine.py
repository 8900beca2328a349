"""Where a benchmark ran: the machine (CPU, cores, threads, load, GPU) and the library versions.

These go into each block's header (``report.header_lines``) and the results JSON, so a
number can always be traced to the hardware, the load at the time and the code.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from cli_args import command_line
from report import REPO_ROOT, now_iso


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work competing for the cores)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine_info(device: torch.device) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict[str, str]:
    """Python, torch, transformers, peft, this library, and the git commit (flagged if src/ is
    modified)."""
    import peft
    import transformers

    import matryoshka_lora

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "matryoshka_lora": matryoshka_lora.__version__,
    }
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            out["git"] = commit + (" (src modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def run_meta(script: str, device: torch.device, settings: str) -> dict[str, Any]:
    """A run's record before it starts: script, command, date, machine, versions, settings."""
    return {
        "script": script,
        "command": command_line(),
        "date": now_iso(),
        "machine": machine_info(device),
        "versions": versions(),
        "settings": settings,
    }


def finish_meta(meta: dict[str, Any], start: float) -> None:
    """Record the wall time since ``start`` (``time.perf_counter``) and the load at the end."""
    meta["wall_s"] = time.perf_counter() - start
    meta["machine"]["load_average_at_end"] = load_average()
