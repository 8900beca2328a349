"""``matryoshka-lora slice``: cut a rank-r PEFT folder out of a larger-rank PEFT export.

No model is loaded: the first r rows of every ``lora_A`` and columns of every
``lora_B`` are written with ``r`` / ``lora_alpha`` rewritten, and the result is the
folder ``export --rank r`` would write
(:func:`matryoshka_lora.export.slice_peft_adapter`). The options are the fields of
:class:`SliceOptions`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..described import described
from ._common import require_options
from .option_spec import option
from .option_types import positive_int
from .options import add_options, resolve

DESCRIPTION = """\
Cut a rank-r PEFT LoRA folder out of a PEFT export at a larger rank, without loading a model.

  matryoshka-lora export runs/gsm8k/adapter --rank 16 --output-dir deploy/r16
  matryoshka-lora slice deploy/r16 --rank 4 --output-dir deploy/r4

The result is the folder `export --rank 4` writes, file for file. Exact for the default
scale encoding (baked) with the trained inference scale or an --svd export, and for every
--scale-encoding alpha export; a baked export at the paper scale is refused (its prefix
carries the rank-16 scales).
"""


@dataclass
class SliceOptions:
    """The options of ``slice``."""

    rank: int | None = described(
        None, "the rank r to cut, at most the rank the source folder holds (required)"
    )
    output_dir: str | None = described(
        None, "folder to create, empty unless --overwrite (required)"
    )
    overwrite: bool = described(False, "replace a non-empty --output-dir")


OPTIONS = (
    option(SliceOptions, "rank", type=positive_int, metavar="R"),
    option(SliceOptions, "output_dir", metavar="DIR"),
    option(SliceOptions, "overwrite", switch=True),
)


NAME = "slice"
HELP = "cut a rank-r PEFT folder out of a larger-rank PEFT export (no model loaded)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a PEFT folder written by `matryoshka-lora export`")
    add_options(p, OPTIONS)
    p.set_defaults(func=run, resolve=lambda args: resolve(args, OPTIONS, "slice"))


def run(args: argparse.Namespace) -> int:
    from ..export import slice_peft_adapter
    from ..serving import vllm_max_lora_rank

    require_options(args, ("rank", "output_dir"))
    out = slice_peft_adapter(args.source, args.output_dir, args.rank, overwrite=args.overwrite)
    print(f"PEFT LoRA at rank {args.rank}: {out}")
    print(f"vLLM: --enable-lora --max-lora-rank {vllm_max_lora_rank(args.rank)}")
    return 0
