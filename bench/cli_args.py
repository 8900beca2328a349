"""The options every benchmark script shares, and the runtime they set up.

Each script declares its own options and then calls :func:`add_common_args`;
:func:`setup_runtime` applies them (``--smoke`` shrinks the run and sends its output
to a temporary folder, threads, seed, TF32 on CUDA). :func:`result_key` names a
run's JSON and BENCHMARKS.md block from the same options, so a CPU run, a GPU
run and a ``--tag``-ged recheck never overwrite each other.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from report import BENCHMARKS_FILE, REPO_ROOT, RESULTS_DIR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_memory_args(parser: argparse.ArgumentParser, *, steps: int) -> None:
    """``--memory`` and ``--memory-steps``: how a training-step benchmark measures each
    variant's peak memory (:func:`variant_run.variant_memory`)."""
    parser.add_argument(
        "--memory",
        choices=["subprocess", "inprocess", "none"],
        default="subprocess",
        help="peak memory: a fresh process per variant (honest), or in this process one after "
        "another (quick, CPU numbers then include earlier allocations), or not at all",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=steps, help="training-step calls per memory run"
    )


def smoke_memory(args: argparse.Namespace, steps: int | None = None) -> None:
    """Under ``--smoke``: memory measured in this process (quick), ``steps`` calls if given."""
    if args.memory == "subprocess":
        args.memory = "inprocess"
    if steps is not None:
        args.memory_steps = steps


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int, warmup: int) -> None:
    g = parser.add_argument_group("common benchmark options")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32", help="base model dtype")
    g.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help="timed rounds; each round runs every configuration once (round-robin)",
    )
    g.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help="untimed rounds before the timed ones",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: the CPU machine is shared)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, tiny batch, 1 repeat, no warmup: checks the script runs",
    )
    g.add_argument(
        "--write",
        action="store_true",
        help="replace this script's subsection of BENCHMARKS.md and write bench/results/*.json",
    )
    g.add_argument(
        "--tag",
        default="",
        help="suffix of the BENCHMARKS.md block and JSON name (a second run kept beside the first)",
    )
    g.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS_FILE)
    g.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    g.add_argument(
        "--profile",
        action="store_true",
        help="also profile some configurations side by side (torch.profiler, interleaved rounds)",
    )
    g.add_argument("--profile-rows", type=int, default=12)
    g.add_argument("--profile-rounds", type=int, default=3)


def setup_runtime(args: argparse.Namespace) -> torch.device:
    """Apply the common options; returns the device to run on."""
    if args.smoke:
        args.repeats, args.warmup = 1, 0
        # smoke output never lands in the repository unless asked for explicitly
        scratch = Path(tempfile.gettempdir()) / "matryoshka-lora-bench-smoke"
        if args.benchmarks_file == BENCHMARKS_FILE:
            args.benchmarks_file = scratch / "BENCHMARKS.md"
        if args.results_dir == RESULTS_DIR:
            args.results_dir = scratch / "results"
        if args.write:
            args.benchmarks_file.parent.mkdir(parents=True, exist_ok=True)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:  # already set (parallel work has started)
        pass
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(args.device)


def command_line() -> str:
    """The command that is running, with the script's path relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join(["python", script_text, *sys.argv[1:]])


def result_key(script: str, args: argparse.Namespace) -> str:
    """``<script>_<device>_<dtype>[_smoke][_<tag>]``: the JSON name and the block's marker key."""
    key = f"{script}_{args.device}_{args.dtype}"
    if args.smoke:
        key += "_smoke"
    if args.tag:
        key += "_" + "".join(c if c.isalnum() or c in "-_" else "-" for c in args.tag)
    return key


def title_suffix(args: argparse.Namespace) -> str:
    parts = [args.device, args.dtype] + (["smoke"] if args.smoke else [])
    return ", ".join(parts + ([args.tag] if args.tag else []))
