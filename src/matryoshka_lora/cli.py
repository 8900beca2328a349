"""The ``matryoshka-lora`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _info(args: argparse.Namespace) -> int:
    from .io import read_adapter_config

    config, payload = read_adapter_config(args.adapter)
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
    print(f"adapter: {args.adapter} (library version {payload.get('library_version')})")
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    print(f"  adapted modules: {len(modules)}")
    for r, n in per_rank.items():
        print(f"  rank {r:>4}: {n:,} adapter parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matryoshka-lora",
        description="Nested-rank LoRA: one adapter usable at every rank r <= R.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser(
        "info", help="show a saved adapter's config, ranks and parameter counts per rank"
    )
    info.add_argument("adapter", help="folder written by save_adapter")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as err:
        if args.debug:
            raise
        print(f"matryoshka-lora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
