"""``matryoshka-lora demo``: the default path against the paper's MatryoshkaLoRA, every rank.

On the packaged SmolLM2-135M-Instruct and GSM-Symbolic word problems it trains two
adapters of rank R with the same data, steps, batch and forward passes (equal
compute), each at one learning rate:

* the library's default path (``NestedLoraConfig()`` and its default objective
  ``lora-svd``): LoRA at rank R whose factors are re-based on the SVD of the update
  after the last step, deployed with the trained scales, so that its rank-r prefix
  is the best rank-r approximation of the trained update;
* MatryoshkaLoRA as the paper trains and deploys it
  (``NestedLoraConfig.from_preset("matryoshka-paper")`` and the ``full`` objective:
  the fixed P, the full adapter's loss, rank r deployed with s(r) and P dropped).

It sweeps every rank r = 1, 2, 4, ..., R of both on held-out problems (teacher-forced
answer-token accuracy, one forward pass per rank), and writes into ``--output-dir``
the table (``results.json``, ``.csv``, ``.md``), the rank-accuracy plot
(``rank_curves.png``, ``.svg``) and the default adapter at rank ``--export-rank`` as
a standard PEFT LoRA folder (``peft-r<r>/``), then prints how to serve and evaluate
it. Runs are seeded: the same options give the same numbers. Running it again with
the same options reuses the finished training runs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PRESETS
from ..described import described
from ..train.data import DatasetFormat
from ._common import resolve_device
from .errors import CLIError
from .option_spec import Option, option
from .option_types import name_list, positive_float, positive_int
from .options import add_groups, resolve

DESCRIPTION = (
    __doc__.replace("``", "")
    + """
  matryoshka-lora demo                   # about 2 minutes on 2 CPU cores
  matryoshka-lora demo --full            # seeds 1 and 2 added in the same folder
  matryoshka-lora demo --steps 40 --r 16 --output-dir demo-r16
"""
)
# The paper's MatryoshkaLoRA, deployed as the paper deploys it.
PAPER_PRESET = "matryoshka-paper"
DEFAULT_KIND, PAPER_KIND = "default", PAPER_PRESET
# table rows: <kind>_<deployment> (matryoshka_lora.compare.spec)
DEFAULT_ROW, PAPER_ROW = f"{DEFAULT_KIND}_trained", f"{PAPER_KIND}_paper"
ROW_LABELS = {
    DEFAULT_ROW: "default path (LoRA, SVD re-basis, trained scales)",
    PAPER_ROW: "MatryoshkaLoRA as in the paper (preset matryoshka-paper)",
}
BASE_LABEL = "base model (no adapter)"  # the reference row of ComparisonRunner.table
# Validation-split size: each method trains at one rate, so the validation split chooses
# nothing and only needs to exist (the comparison runner scores it beside the test split).
VAL_SIZE = 2


def _seed_list(text: str) -> tuple[int, ...]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        seeds = tuple(int(t) for t in items)
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"invalid seed list {text!r}: give distinct integers >= 0, comma-separated"
        )
    return seeds


_seed_list.__name__ = "seed list"


@dataclass
class DemoOptions:
    """The options of ``matryoshka-lora demo`` (the defaults are the 3-minute demo)."""

    output_dir: str = described("matryoshka-lora-demo", "folder for the results and the export")
    model: str = described("smollm2", "causal LM: packaged alias smollm2, hub id or local folder")
    dataset: str = described(
        "reasoning-gym:gsm_symbolic",
        "reasoning-gym:<name>, or a local folder with train.* and test.* record files",
    )
    format: DatasetFormat = described(
        "gsm8k", "record format; the prompt is masked out of the loss"
    )
    r: int = described(8, "adapter rank R; the ranks swept are the powers of two up to R, and R")
    target_modules: list[str] = described(
        help="projections that get an adapter, comma-separated",
        factory=lambda: ["q_proj", "v_proj"],
    )
    steps: int = described(24, "optimizer steps per method")
    batch_size: int = described(4, "training examples per step")
    max_length: int = described(128, "tokens per example, prompt included (longer ones are cut)")
    test_size: int = described(48, "held-out problems scored at every rank")
    seeds: tuple[int, ...] = described(
        (0,),
        "training seeds, comma-separated; with several the table shows mean ± std "
        "and the summary the paired differences",
    )
    lr_lora: float = described(
        2e-2, "learning rate of the LoRA run (the library's path, SVD re-based)"
    )
    lr_paper: float = described(2e-2, "learning rate of the paper's MatryoshkaLoRA run")
    export_rank: int = described(4, "rank of the PEFT export of the LoRA run's adapter (<= R)")
    device: str = described("auto", "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    threads: int | None = described(None, "torch CPU threads (default: torch's choice, all cores)")
    full: bool = described(
        False,
        "the longer comparison: seeds 0,1,2, reusing the demo's seed-0 runs in the "
        "same folder (an explicit --seeds wins)",
    )


# What --full changes; explicit options override it. In the same folder the finished
# seed-0 runs are reused, so after the demo it trains seeds 1 and 2 only.
FULL: dict[str, Any] = {"seeds": (0, 1, 2)}

DEMO = DemoOptions
GROUPS: dict[str | None, tuple[Option, ...]] = {
    None: (option(DEMO, "output_dir"), option(DEMO, "full", switch=True)),
    "model and data": (
        option(DEMO, "model"),
        option(DEMO, "dataset"),
        option(DEMO, "format"),
        option(DEMO, "max_length", type=positive_int),
        option(DEMO, "test_size", type=positive_int),
    ),
    "adapters and training (the same for both methods)": (
        option(DEMO, "r", type=positive_int),
        option(DEMO, "target_modules", type=name_list, metavar="NAME,..."),
        option(DEMO, "steps", type=positive_int),
        option(DEMO, "batch_size", type=positive_int),
        option(DEMO, "seeds", type=_seed_list, metavar="S1,S2,..."),
        option(DEMO, "lr_lora", type=positive_float),
        option(DEMO, "lr_paper", type=positive_float),
    ),
    "export and runtime": (
        option(DEMO, "export_rank", type=positive_int),
        option(DEMO, "device"),
        option(DEMO, "threads", type=positive_int),
    ),
}
OPTIONS: tuple[Option, ...] = tuple(o for group in GROUPS.values() for o in group)


def _full_layer(given: dict[str, Any], from_file: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(FULL)] if given.get("full") else []


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every option's value from defaults < ``--full`` < command line."""
    return resolve(args, OPTIONS, "demo", presets=_full_layer)


NAME = "demo"
HELP = (
    "train the default path and the paper's MatryoshkaLoRA on the packaged SmolLM2 + "
    "GSM-Symbolic, sweep every rank, export a PEFT folder (minutes on a CPU)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_groups(p, GROUPS)
    p.set_defaults(func=run_demo, resolve=resolve_args)


# ---------------------------------------------------------------------------- the comparison
def demo_kinds() -> dict[str, dict[str, Any]]:
    """The two training methods as comparison kinds: a preset's adapter-config fields
    and a training objective (:mod:`matryoshka_lora.train.objective`).

    ``scaling`` and ``alpha`` are left to the spec, which sets the paper's for both
    kinds (:func:`demo_spec`); the default path's are the same.
    """
    shared = ("scaling", "alpha")
    return {
        # NestedLoraConfig() and the objective it trains with when none is named
        DEFAULT_KIND: {**PRESETS["lora"], "objective": "lora-svd"},
        # the authors' 1x objective: the full adapter's loss alone
        PAPER_KIND: {
            **{k: v for k, v in PRESETS[PAPER_PRESET].items() if k not in shared},
            "objective": "full",
        },
    }


def demo_spec(args: argparse.Namespace):
    """The :class:`~matryoshka_lora.compare.ComparisonSpec` of the demo's options."""
    from ..compare import ComparisonSpec

    if args.export_rank > args.r:
        raise CLIError(f"--export-rank {args.export_rank} is above the adapter rank --r {args.r}")
    preset = PRESETS[PAPER_PRESET]
    return ComparisonSpec(
        model=args.model,
        dataset=args.dataset,
        format=args.format,
        max_rank=args.r,
        scaling=preset["scaling"],
        alpha=preset["alpha"],
        target_modules=list(args.target_modules),
        rows=(DEFAULT_ROW, PAPER_ROW),
        kinds=demo_kinds(),
        learning_rates={DEFAULT_KIND: [args.lr_lora], PAPER_KIND: [args.lr_paper]},
        seeds=tuple(args.seeds),
        steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=max(1, args.steps // 10),
        max_length=args.max_length,
        train_size=args.steps * args.batch_size,
        val_size=VAL_SIZE,
        test_size=args.test_size,
    )


def default_adapter_dir(output_dir: str | Path, spec, seed: int) -> Path:
    """Where the comparison saved the default path's adapter of ``seed``."""
    from ..compare import RunKey

    key = RunKey(DEFAULT_KIND, spec.max_rank, spec.learning_rates[DEFAULT_KIND][0], seed)
    return Path(output_dir) / "runs" / key.name / "adapter"


# ---------------------------------------------------------------------------- what it says
def findings(table, base_label: str | None = None) -> list[str]:
    """What the table shows, as sentences: the default minus the paper's method at each
    rank (paired by seed), where it is ahead or behind, and the default's rank-1 share of
    its full-rank gain over the base model. Only numbers from ``table`` are quoted."""
    ranks = list(table.ranks)
    diffs, seeds = table.paired_difference(DEFAULT_ROW, PAPER_ROW)
    n = len(seeds)

    def cell(col: int | str) -> str:
        mean, std = diffs[col]
        return f"{mean:+.2f}" + (f" ± {std:.2f}" if std is not None else "")

    over = "one seed" if n == 1 else f"mean ± std over {n} seeds, paired by seed"
    lines = [
        "default path minus the paper's MatryoshkaLoRA, in points ("
        + over
        + "): "
        + ", ".join(f"r={r}: {cell(r)}" for r in ranks)
        + f"; AURAC_log {cell('aurac_log')}"
    ]
    ahead = [r for r in ranks if diffs[r][0] > 0]
    behind = [r for r in ranks if diffs[r][0] < 0]
    level = [r for r in ranks if diffs[r][0] == 0]
    if len(ahead) == len(ranks):
        where = "the default path scores higher at every rank"
    elif len(behind) == len(ranks):
        where = "the paper's MatryoshkaLoRA scores higher at every rank"
    elif len(level) == len(ranks):
        where = "the two score the same at every rank"
    else:
        parts = [("ahead", ahead), ("behind", behind), ("level", level)]
        where = "the default path is " + "; ".join(
            f"{word} at r = {_ranks(at)}" for word, at in parts if at
        )
    if n > 1:
        sure = [r for r in ranks if diffs[r][1] is not None and abs(diffs[r][0]) > 2 * diffs[r][1]]
        where += (
            f"; the difference exceeds twice its seed std at r = {_ranks(sure)}"
            if sure
            else "; at no rank does the difference exceed twice its seed std"
        )
    lines.append(where)
    if base_label is not None and base_label in table.references:
        base = table.reference_summary(base_label)[0]
        curve = table.summary(DEFAULT_ROW)
        low, high = curve[ranks[0]][0], curve[ranks[-1]][0]
        if high > base:
            lines.append(
                f"the default path at r={ranks[0]} keeps {100 * (low - base) / (high - base):.0f}% "
                f"of its r={ranks[-1]} gain over the base model ({base:.2f} -> {high:.2f})"
            )
    return lines


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if ranks else "none"


def next_steps(
    args: argparse.Namespace, spec, base_path: str, adapter_dir: Path, peft_dir: Path
) -> list[str]:
    """The commands that serve the export and evaluate the adapter, with real paths."""
    from ..compare.run import split_seed
    from ..serving import vllm_max_lora_rank

    adapter_dir, peft_dir = adapter_dir.resolve(), peft_dir.resolve()
    out = Path(args.output_dir).resolve()
    ranks = ",".join(map(str, spec.ranks))
    lines = [
        f"transformers + PEFT (rank {args.export_rank}):",
        "  from transformers import AutoModelForCausalLM; from peft import PeftModel",
        f"  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_path!r}), "
        f"{str(peft_dir)!r})",
        "vLLM (an OpenAI-compatible server; the adapter is the model name 'demo'):",
        f"  vllm serve {base_path} --enable-lora --max-lora-rank "
        f"{vllm_max_lora_rank(args.export_rank)} --lora-modules demo={peft_dir}",
    ]
    # the records of the test split (compare.run.splits_for)
    if spec.dataset.startswith("reasoning-gym:"):
        data = f"--dataset {spec.dataset} --data-seed {split_seed(spec, 'test')}"
    else:
        data = f"--dataset {spec.dataset} --split test"
    data += f" --limit {spec.test_size}"
    lines += [
        "evaluate every rank (reproduces the default row's test numbers, teacher-forced):",
        f"  matryoshka-lora eval {adapter_dir} {data} --format {spec.format} --max-length "
        f"{spec.max_length} --ranks {ranks} --inference-scales trained --output-dir {out / 'eval'}",
    ]
    if spec.format == "gsm8k":
        lines += [
            "the same problems solved by greedy generation (GSM8K answer match; slower):",
            f"  matryoshka-lora eval {adapter_dir} --evaluator gsm8k {data} --ranks {ranks} "
            f"--inference-scales trained --output-dir {out / 'eval-gsm8k'}",
        ]
    return lines


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from ..assets import load_pretrained
    from ..compare import ComparisonRunner
    from ..compare.run import splits_for
    from ..export import export_peft
    from ..io import load_adapter
    from ..model import detach
    from .models import model_source

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = demo_spec(args)
    device = resolve_device(args.device)
    base_path = model_source(args.model)
    started = time.perf_counter()
    seeds = ",".join(map(str, spec.seeds))
    print(
        f"matryoshka-lora demo: {args.model} on {args.dataset}; R={args.r} on "
        f"{','.join(args.target_modules)}; {args.steps} steps x {args.batch_size} examples x "
        f"<={args.max_length} tokens per method (equal compute), seed(s) {seeds}; "
        f"learning rates: LoRA {args.lr_lora:g}, paper {args.lr_paper:g}",
        flush=True,
    )
    model, tokenizer = load_pretrained(args.model, source=base_path)
    model.to(device)
    test = splits_for(spec, tokenizer)["test"]
    print(
        f"metric: teacher-forced answer-token accuracy (%) on {len(test)} held-out problems "
        f"({test.target_tokens()} answer tokens)",
        flush=True,
    )
    runner = ComparisonRunner(spec, args.output_dir)
    runner.run(model, tokenizer)
    paths = runner.write_outputs(
        title=f"{Path(spec.model).name} on {spec.dataset}, R={spec.max_rank}, {spec.steps} steps"
    )
    adapter_dir = default_adapter_dir(args.output_dir, spec, spec.seeds[0])
    peft_dir = Path(args.output_dir) / f"peft-r{args.export_rank}"
    load_adapter(model, adapter_dir)
    export_peft(model, args.export_rank, peft_dir, overwrite=True)
    detach(model)
    table = runner.table()
    said = findings(table, base_label=BASE_LABEL)
    with open(paths["markdown"], "a", encoding="utf-8") as fh:
        fh.write("\nWhat the table shows:\n\n" + "".join(f"- {line}\n" for line in said))
    print()
    print(table.to_markdown())
    print()
    for key, label in ROW_LABELS.items():
        print(f"{key}: {label}")
    print()
    for line in said:
        print(line)
    elapsed = time.perf_counter() - started
    print()
    print(f"finished in {elapsed:.0f} s; written to {Path(args.output_dir).resolve()}:")
    written = dict.fromkeys(paths.values())  # one line per file, in order
    for path in [*written, peft_dir]:
        print(f"  {path}")
    print()
    for line in next_steps(args, spec, base_path, adapter_dir, peft_dir):
        print(line)
    return 0
