"""What a benchmark run writes: Markdown tables, the results JSON, and its block of BENCHMARKS.md.

A run's block sits between two HTML comments, ``<!-- bench:<key>:begin -->`` and
``<!-- bench:<key>:end -->``, inside the ``## Speed and memory`` section, where
``<key>`` is the results JSON's name (``cli_args.result_key``). Rewriting a block
replaces exactly the text between its markers, so the prose around the tables
and the blocks of other runs (another device, dtype or ``--tag``) are never
touched. Both files are replaced atomically (``matryoshka_lora.io.atomic_write_text``):
a killed run leaves the previous version, never half a file.

Progress goes to stderr (:func:`log`), the Markdown body to stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matryoshka_lora.io import atomic_write_text

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
BENCHMARKS_FILE = REPO_ROOT / "BENCHMARKS.md"
RESULTS_DIR = BENCH_DIR / "results"
SECTION_HEADING = "## Speed and memory"
MIB = 1024.0 * 1024.0


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries only the Markdown)."""
    print(msg, file=sys.stderr, flush=True)


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- Markdown
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: l, then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / MIB:.1f}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def header_lines(meta: dict[str, Any]) -> list[str]:
    """The bullet list above a block's tables: command, date, machine, versions, settings, and
    the load average at the end of the run if it was recorded (``machine.finish_meta``)."""
    m, v = meta["machine"], meta["versions"]
    machine = (
        f"{m['cpu']}, {m['usable_cores']} usable cores of {m['cpu_cores']}, "
        f"torch threads {m['torch_threads']} (interop {m['torch_interop_threads']}), "
        f"load average at start {m['load_average_at_start']}"
    )
    if "gpu" in m:
        machine = f"GPU {m['gpu']} (CUDA {m['cuda']}); host CPU {machine}"
    libs = ", ".join(f"{k} {val}" for k, val in v.items())
    lines = [
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; wall time {meta['wall_s']:.0f} s",
        f"- Machine: {machine}",
        f"- Versions: {libs}",
        f"- Settings: {meta['settings']}",
    ]
    if "load_average_at_end" in m:
        lines.append(f"- Load average at end: {m['load_average_at_end']}")
    return lines


# --------------------------------------------------------------------------- files
def write_json(results_dir: Path, name: str, data: dict[str, Any]) -> Path:
    """``results_dir/<name>.json``: ``data`` indented, non-JSON values as ``str``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"


def splice_block(text: str, key: str, body: str) -> str:
    """``text`` with ``body`` between this key's markers inside ``## Speed and memory``.

    An existing block with the same key is replaced in place; a new block goes at
    the end of the section, which is appended to the document if missing. Nothing
    outside the markers changes, except the blank lines around a new block.
    """
    begin, end = _markers(key)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    lines = text.rstrip("\n").split("\n")
    try:
        start = lines.index(SECTION_HEADING)
    except ValueError:
        lines += ["", SECTION_HEADING, ""]
        start = len(lines) - 2
    section_end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
        len(lines),
    )
    stop = section_end
    while stop > start + 1 and not lines[stop - 1].strip():
        stop -= 1
    tail_gap = [""] if section_end < len(lines) else []
    lines[stop:section_end] = ["", *block.split("\n"), *tail_gap]
    return "\n".join(lines)


def replace_subsection(path: Path, key: str, body: str) -> None:
    """Rewrite ``path`` (created with a ``# Benchmarks`` title if missing) with this key's block
    replaced by ``body`` (:func:`splice_block`)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    atomic_write_text(path, splice_block(text, key, body).rstrip("\n") + "\n")


def publish(args: argparse.Namespace, key: str, body: str, data: dict[str, Any]) -> None:
    """``--write``: the results JSON ``<results-dir>/<key>.json`` and the ``key`` block of
    ``--benchmarks-file``."""
    path = write_json(args.results_dir, key, data)
    replace_subsection(args.benchmarks_file, key, body)
    log(f"wrote {path} and the {key} block of {args.benchmarks_file}")


def publish_run(
    args: argparse.Namespace,
    key: str,
    title: str,
    meta: dict[str, Any],
    sections: list[str],
    results: Any,
) -> None:
    """Print a run's block (``title``, the machine header, ``sections`` a blank line
    apart) and, with ``--write``, :func:`publish` it with ``{"meta", "results"}``."""
    body = "\n".join([title, "", *header_lines(meta), "", "\n\n".join(sections)])
    print(body)
    if args.write:
        publish(args, key, body, {"meta": meta, "results": results})
