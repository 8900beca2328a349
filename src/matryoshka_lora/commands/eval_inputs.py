"""``matryoshka-lora eval``'s inputs: the evaluation records and each evaluator's metric function.

:func:`load_data` reads and checks the records before any model is loaded, so a
dataset without the fields its evaluator needs fails fast;
:func:`build_metric_fn` turns them, with the tokenizer, into the function a
rank sweep calls at every rank (:func:`matryoshka_lora.eval.rank_sweep`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CLIError
from .inputs import load_records_checked


def _is_hub(source: str) -> bool:
    return not source.startswith("reasoning-gym:") and not Path(source).exists()


def _qa_rows(records) -> list[dict[str, str]]:
    return [
        {"question": str(r.fields["question"]), "answer": str(r.fields["answer"])} for r in records
    ]


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """Read (and check the fields of) the evaluation records, before any model is loaded."""
    ev, split = args.evaluator, args.split or "test"

    def read(
        fields: Sequence[str],
        what: str,
        source: str = args.dataset,
        split: str = split,
        size: int | None = args.limit,
    ):
        """The checked records of ``source`` (default: the evaluated dataset)."""
        return load_records_checked(
            source, split, args.dataset_subset, size, args.data_seed, fields, what
        )

    if ev == "teacher-forced":
        from ..train.data import REQUIRED_FIELDS

        fmt = args.format or "gsm8k"
        return {"records": read(REQUIRED_FIELDS[fmt], f"format {fmt!r}"), "format": fmt}
    if ev == "seq-cls":
        fields = (args.text_field or "text", args.label_field or "label")
        return {"records": read(fields, "evaluator seq-cls"), "fields": fields}
    # gsm8k: shots are the first N records of the shot source; taken from the evaluated
    # records themselves when both are the same file, generator or hub split
    n = args.num_fewshot or 0
    shot_source, shot_split = args.fewshot_dataset or args.dataset, args.fewshot_split or "train"
    carve = (
        n > 0 and shot_source == args.dataset and not (_is_hub(shot_source) and shot_split != split)
    )
    size = None if args.limit is None else args.limit + (n if carve else 0)
    fields = ("question", "answer")
    rows = _qa_rows(read(fields, "gsm8k", size=size))
    shots: list[dict[str, str]] = []
    if carve:
        shots, rows = rows[:n], rows[n:]
    elif n:
        shots = _qa_rows(read(fields, "gsm8k", shot_source, shot_split, n))
    if len(shots) < n:
        raise CLIError(f"--num-fewshot {n}: the shot source has only {len(shots)} records")
    if not rows:
        raise CLIError(f"no examples left to evaluate after taking {n} shots")
    return {"rows": rows, "shots": shots}


def build_metric_fn(args: argparse.Namespace, data: dict[str, Any], tokenizer, num_labels):
    """``(metric_fn returning every metric of the evaluator, number of examples)``."""
    if args.evaluator == "teacher-forced":
        from ..eval.teacher_forced import teacher_forced_metric_fn
        from ..train.data import PaddingCollator, SFTDataset

        dataset = SFTDataset(data["records"], tokenizer, data["format"], args.max_length or 512)
        collate = PaddingCollator(tokenizer.pad_token_id)
        items = [dataset[i] for i in range(len(dataset))]
        size = args.batch_size
        batches = [collate(items[i : i + size]) for i in range(0, len(items), size)]
        return teacher_forced_metric_fn(batches, metric=None), len(items)
    if args.evaluator == "seq-cls":
        from ..eval.classification import classification_metric_fn
        from ..train.classification import ClassificationDataset, batches

        dataset = ClassificationDataset(
            data["records"], tokenizer, *data["fields"], num_labels, args.max_length or 512
        )
        chunks = batches(dataset, args.batch_size, tokenizer.pad_token_id)
        return classification_metric_fn(chunks, metric=None), len(dataset)
    from ..eval.gsm8k import gsm8k_metric_fn

    fn = gsm8k_metric_fn(
        tokenizer,
        data["rows"],
        data["shots"],
        metric=None,
        max_new_tokens=args.max_new_tokens or 256,
        batch_size=args.batch_size,
    )
    return fn, len(data["rows"])
