"""Locating saved adapters, checking ranks against them, and loading checked records."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import CLIError, one_line


def locate_adapter(path: str | os.PathLike) -> Path:
    """The adapter folder: ``path/adapter`` for a training output folder, else ``path``.

    Whether ``path`` really is an adapter is left to ``read_adapter_config``,
    whose error names the missing file.
    """
    from ..io import CONFIG_NAME

    p = Path(path)
    if not (p / CONFIG_NAME).is_file() and (p / "adapter" / CONFIG_NAME).is_file():
        return p / "adapter"
    return p


def base_model_name(args_model: str | None, config) -> str:
    if args_model:
        return args_model
    if not config.base_model_name_or_path:
        raise CLIError("the adapter does not record its base model: pass --model")
    return config.base_model_name_or_path


def check_ranks(ranks: Iterable[int], max_rank: int, option: str) -> tuple[int, ...]:
    """Sorted distinct ranks, each in 1..R (a :class:`CLIError` naming the bad one otherwise)."""
    ranks = tuple(sorted(set(ranks)))
    bad = [r for r in ranks if r > max_rank]
    if bad:
        raise CLIError(
            f"{option} {bad[0]} is larger than the adapter's max rank R={max_rank}: "
            f"use ranks in 1..{max_rank}"
        )
    return ranks


def load_records_checked(
    source: str,
    split: str,
    subset: str | None,
    size: int | None,
    seed: int,
    fields: Sequence[str],
    what: str,
):
    """``load_records`` with one-line errors, and every record checked for ``fields``."""
    from ..train.data import DatasetFormatError, load_records

    try:
        records = load_records(source, split, subset=subset, size=size, seed=seed)
    except DatasetFormatError:
        raise
    except ImportError as err:
        raise CLIError(f"dataset {source!r} needs a missing package: {one_line(err)}") from None
    except Exception as err:  # reasoning-gym and datasets raise many types
        raise CLIError(f"could not load dataset {source!r}: {one_line(err)}") from None
    if not records:
        raise DatasetFormatError(f"dataset {source!r} has no records")
    for record in records:
        missing = [f for f in fields if record.fields.get(f) is None]
        if missing:
            raise DatasetFormatError(
                f"{record.origin}: missing field {missing[0]!r} needed by {what} "
                f"(fields present: {sorted(record.fields)})"
            )
    return records
