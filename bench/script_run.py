"""The frame of a benchmark script's run: set up, measure each model, record and publish."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from cli_args import result_key, setup_runtime, title_suffix
from machine import finish_meta, run_meta
from report import publish_run


def run_script(
    args: argparse.Namespace,
    script: str,
    heading: str,
    settings: str,
    measure: Callable[[argparse.Namespace, str, torch.device], dict[str, Any]],
    render: Callable[[dict[str, Any], argparse.Namespace], str],
) -> int:
    """Measure every model of ``--models`` and print (with ``--write``, publish) the block.

    ``measure(args, model_name, device)`` returns one model's result; ``render(result, args)``
    its Markdown. The block is ``### <heading> (<device>, <dtype>...)``, the machine header
    and the models' sections; its key and JSON name come from :func:`cli_args.result_key`.
    """
    device = setup_runtime(args)
    start = time.perf_counter()
    meta = run_meta(script, device, settings)
    results = [measure(args, name, device) for name in args.models.split(",")]
    finish_meta(meta, start)
    publish_run(
        args,
        result_key(script, args),
        f"### {heading} ({title_suffix(args)})",
        meta,
        [render(r, args) for r in results],
        results,
    )
    return 0
