"""``matryoshka-lora info``: a saved adapter's config, adapted modules and size per rank."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..described import described
from ._common import ADAPTER_HELP, locate_adapter
from .option_spec import option
from .options import add_options, resolve


@dataclass
class InfoOptions:
    """The options of ``info``."""

    json: bool = described(False, "print machine-readable JSON")


OPTIONS = (option(InfoOptions, "json", switch=True),)


NAME = "info"
HELP = "show a saved adapter's config, ranks and parameter counts per rank"
DESCRIPTION = (
    "Show a saved adapter's config, its adapted modules and the number of "
    "adapter parameters deployed at each eval rank."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help=ADAPTER_HELP)
    add_options(p, OPTIONS)
    p.set_defaults(func=run, resolve=lambda args: resolve(args, OPTIONS, "info"))


def run(args: argparse.Namespace) -> int:
    from ..io import read_adapter_config

    folder = locate_adapter(args.adapter)
    config, payload = read_adapter_config(folder)
    modules = payload.get("modules", {})
    per_rank = {
        r: sum(r * (m["in_features"] + m["out_features"]) for m in modules.values())
        for r in config.eval_ranks
    }
    if args.json:
        print(
            json.dumps(
                {"config": config.to_dict(), "modules": len(modules), "params_per_rank": per_rank},
                indent=2,
            )
        )
        return 0
    print(f"adapter: {folder} (library version {payload.get('library_version')})")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print(f"  adapted modules: {len(modules)}")
    for r, n in per_rank.items():
        print(f"  rank {r:>4}: {n:,} adapter parameters")
    return 0
