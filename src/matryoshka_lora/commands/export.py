"""``matryoshka-lora export``: deploy a saved adapter at chosen ranks.

* ``--format peft``: a standard PEFT LoRA folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) that vanilla ``peft.PeftModel.from_pretrained``
  loads; several ranks give one ``rank-<r>/`` sub-folder each
  (:func:`matryoshka_lora.export.export_peft`).
* ``--format merged``: a plain transformers model with the rank-r update folded
  into its weights, plus the tokenizer (:func:`matryoshka_lora.export.save_merged`).

Every PEFT folder carries a Hub model card (``README.md``, :mod:`matryoshka_lora.hub`),
with the rank sweep of ``--sweep`` (the ``sweep.json`` that ``matryoshka-lora eval``
writes) when given; ``--push-to-hub REPO`` uploads the finished folder as written.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..described import described
from ..nesting import InferenceScale
from ._common import (
    ADAPTER_HELP,
    CLIError,
    base_model_name,
    check_ranks,
    load_model,
    locate_adapter,
    model_source,
    require_options,
    resolve_device,
)
from .models import Dtype
from .option_spec import option
from .option_types import name_list, rank_list
from .options import add_options, resolve

ExportFormat = Literal["peft", "merged"]
ScaleEncoding = Literal["baked", "alpha"]  # matryoshka_lora.export.SCALE_ENCODINGS


@dataclass
class ExportOptions:
    """The options of ``export``, each declared once (help, choices, default)."""

    format: ExportFormat = described(
        "peft", "peft: PEFT LoRA folder; merged: full model with the update folded into the weights"
    )
    rank: tuple[int, ...] | None = described(
        None,
        "rank(s) to export, each <= R; several ranks (peft only) give rank-<r>/ "
        "sub-folders (required)",
    )
    output_dir: str | None = described(
        None, "folder to create, empty unless --overwrite (required)"
    )
    overwrite: bool = described(False, "replace a non-empty --output-dir")
    scale_encoding: ScaleEncoding | None = described(
        None,
        "peft: baked = per-component scales folded into B, lora_alpha = r (exact for "
        "every method); alpha = B unscaled, scale in lora_alpha/use_rslora (constant scales "
        "only) (default: baked)",
    )
    inference_scale: InferenceScale | None = described(
        None,
        "which rank-r function to export: paper (s(r)) or trained (p[:r]) "
        "(default: the adapter's own)",
    )
    model: str | None = described(
        None,
        "base model (hub id, local folder, smollm2, minilm; default: the one "
        "recorded in the adapter)",
    )
    dtype: Dtype = described(
        "auto",
        "peft: dtype of the written tensors (auto: the adapter's); merged: dtype of "
        "the model (auto: the base checkpoint's)",
    )
    svd: bool = described(
        False,
        "re-base each module on the SVD of its full trained update first, so rank r "
        "is the best rank-r approximation of it (an adapter trained on the default path is "
        "already re-based; for others see BENCHMARKS.md)",
    )
    device: str = described("cpu", "device for loading and merging")
    sweep: str | None = described(
        None,
        "peft: the sweep.json of `matryoshka-lora eval` on this adapter, shown in "
        "the model cards as the rank-sweep table",
    )
    tags: list[str] = described(help="peft: extra Hub tags for the model cards", factory=list)
    push_to_hub: str | None = described(
        None,
        "peft: upload the finished --output-dir to the Hub model repo REPO (created "
        "if missing; needs a token: `hf auth login` or HF_TOKEN)",
    )
    private: bool = described(False, "with --push-to-hub: a private repo")
    hub_revision: str | None = described(None, "with --push-to-hub: the branch")


OPTIONS = (
    option(ExportOptions, "format"),
    option(ExportOptions, "rank", type=rank_list, metavar="R[,R2,...]"),
    option(ExportOptions, "output_dir", metavar="DIR"),
    option(ExportOptions, "overwrite", switch=True),
    option(ExportOptions, "scale_encoding"),
    option(ExportOptions, "inference_scale"),
    option(ExportOptions, "model"),
    option(ExportOptions, "dtype"),
    option(ExportOptions, "svd", switch=True),
    option(ExportOptions, "device"),
    option(ExportOptions, "sweep", metavar="FILE"),
    option(ExportOptions, "tags", type=name_list, metavar="T1,T2"),
    option(ExportOptions, "push_to_hub", metavar="REPO"),
    option(ExportOptions, "private", switch=True),
    option(ExportOptions, "hub_revision", metavar="BRANCH"),
)
REQUIRED = ("rank", "output_dir")


DESCRIPTION = """\
Export a saved adapter at one or several ranks.

  matryoshka-lora export runs/gsm8k/adapter --rank 8 --output-dir deploy/r8
  matryoshka-lora export runs/gsm8k/adapter --rank 4,8,16 --output-dir deploy/peft
  matryoshka-lora export runs/gsm8k/adapter --format merged --rank 16 --output-dir merged-r16
  matryoshka-lora export runs/gsm8k --rank 4,16 --sweep runs/gsm8k/eval/sweep.json \
      --output-dir deploy/hub --push-to-hub me/gsm8k-matryoshka

peft: a standard PEFT LoRA folder (vanilla peft.PeftModel.from_pretrained, vLLM); several
ranks give one rank-<r>/ sub-folder each. merged: a plain transformers model (weights +
tokenizer) with the rank-r update folded in, loadable with AutoModelForCausalLM.
Every PEFT folder gets a Hub model card (README.md); --push-to-hub uploads it.
"""


NAME = "export"
HELP = "write a PEFT LoRA folder or a merged model at chosen ranks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help=ADAPTER_HELP)
    add_options(p, OPTIONS)
    p.set_defaults(func=run, resolve=lambda args: resolve(args, OPTIONS, "export"))


def check_options(args: argparse.Namespace, max_rank: int) -> tuple[int, ...]:
    require_options(args, REQUIRED)
    ranks = check_ranks(args.rank, max_rank, "export rank")
    if args.format == "merged":
        if len(ranks) > 1:
            raise CLIError(
                "--format merged writes one model: give a single --rank (or export several "
                "ranks with --format peft)"
            )
        if args.scale_encoding is not None:
            raise CLIError("--scale-encoding applies to --format peft only")
        for flag, value in (("--push-to-hub", args.push_to_hub), ("--sweep", args.sweep)):
            if value:
                raise CLIError(f"{flag} applies to --format peft only")
    if (args.private or args.hub_revision) and not args.push_to_hub:
        raise CLIError("--private and --hub-revision go with --push-to-hub REPO")
    if args.sweep and not Path(args.sweep).is_file():
        raise CLIError(
            f"--sweep {args.sweep} is not a file (the sweep.json of matryoshka-lora eval)"
        )
    out = Path(args.output_dir)
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"--output-dir {out} exists and is not a folder")
        if any(out.iterdir()) and not args.overwrite:
            raise CLIError(
                f"--output-dir {out} exists and is not empty: pass --overwrite to replace it, "
                "or choose another folder"
            )
    return ranks


def read_sweep(path: str | None):
    """The :class:`~matryoshka_lora.eval.SweepResult` in ``path`` (None: no path)."""
    if path is None:
        return None
    from ..eval.sweep import SweepResult

    try:
        return SweepResult.from_json(Path(path).read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CLIError(
            f"--sweep {path} is not the sweep.json of matryoshka-lora eval ({err})"
        ) from err


def run(args: argparse.Namespace) -> int:
    from ..io import read_adapter_config
    from ..train.classification import classifier_labels

    adapter_dir = locate_adapter(args.adapter)
    config, _ = read_adapter_config(adapter_dir)
    ranks = check_options(args, config.r)
    sweep = read_sweep(args.sweep)
    num_labels = classifier_labels(adapter_dir)
    if num_labels is not None and args.format == "peft":
        raise CLIError(
            "the adapter has a trained classifier head (a --task seq-cls run), which a PEFT "
            "export does not carry yet: use --format merged"
        )
    device = resolve_device(args.device)
    model_name = base_model_name(args.model, config)
    source = model_source(model_name)  # the packaged model's local copy for its hub id

    from .. import export as mlx
    from ..io import load_adapter
    from ..model import set_inference_scale

    task = "seq-cls" if num_labels is not None else "causal-lm"
    dtype = args.dtype if args.format == "merged" else "auto"
    model, tokenizer = load_model(
        model_name, task, num_labels=num_labels, dtype=dtype, device=device
    )
    load_adapter(model, adapter_dir)
    if num_labels is not None:
        from ..train.classification import load_legacy_head

        load_legacy_head(model, adapter_dir)
    if args.inference_scale is not None:
        if args.svd:
            raise CLIError(
                "--svd deploys the best rank-r approximation of the full update, which has no "
                "inference scale: drop --inference-scale"
            )
        set_inference_scale(model, args.inference_scale)
    if args.svd:
        from ..svd import svd_rebase_

        svd_rebase_(model)
    out = Path(args.output_dir)
    if args.format == "peft":
        dtype = None if args.dtype == "auto" else args.dtype
        encoding = args.scale_encoding or "baked"
        card = {"sweep": sweep, "tags": args.tags}
        if len(ranks) == 1:
            mlx.export_peft(model, ranks[0], out, encoding, args.overwrite, dtype=dtype, **card)
            print(f"PEFT LoRA at rank {ranks[0]}: {out}")
        else:
            mlx.export_peft(
                model, None, out, encoding, args.overwrite, ranks=ranks, dtype=dtype, **card
            )
            for r in ranks:
                print(f"PEFT LoRA at rank {r}: {out / mlx.RANK_FOLDER.format(rank=r)}")
        sub = "" if len(ranks) == 1 else f", subfolder={mlx.RANK_FOLDER.format(rank=ranks[0])!r}"
        print(
            "load with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
            f"{source!r}), <folder>{sub})"
        )
        if source != model_name and not Path(model_name).exists():
            print(f"  (the base is the local copy of {model_name}; the hub id works online too)")
        from ..serving import vllm_max_lora_rank

        print(f"vLLM: --enable-lora --max-lora-rank {vllm_max_lora_rank(max(ranks))}")
        if args.push_to_hub:
            from ..hub import push_to_hub

            info = push_to_hub(
                out, args.push_to_hub, private=args.private or None, revision=args.hub_revision
            )
            print(f"pushed {out} to https://huggingface.co/{args.push_to_hub}: {info}")
    else:
        mlx.save_merged(model, ranks[0], out, overwrite=args.overwrite, tokenizer=tokenizer)
        print(f"merged model at rank {ranks[0]}: {out}")
        loader = "AutoModelForSequenceClassification" if num_labels else "AutoModelForCausalLM"
        print(f"load with: {loader}.from_pretrained({str(out)!r})")
    return 0
