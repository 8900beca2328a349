"""Option value types: each converts a command-line (or config-file) string and checks it.

A type's ``__name__`` is what argparse names in its messages
(``invalid positive integer value: '0'``); a config-file value is converted by
the same function, so both report the same problem the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any


def _type(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(str(text).strip())
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(f"invalid {name} {text!r}: {err}") from None

    convert.__name__ = name  # argparse names the type in its messages
    return convert


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an integer") from None


def _bounded_int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise ValueError(f"must be >= {low}")
        return value

    return parse


def _bounded_float(low: float, strict: bool, high: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number") from None
        if value != value or (value <= low if strict else value < low):
            raise ValueError(f"must be {'>' if strict else '>='} {low}")
        if high is not None and value >= high:
            raise ValueError(f"must be < {high}")
        return value

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("give at least one integer, comma-separated")
    values = tuple(_int(t) for t in items)
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"ranks must be >= 1, got {bad[0]}")
    return values


def _name_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("give at least one name, comma-separated")
    return items


positive_int = _type("positive integer", _bounded_int(1))
non_negative_int = _type("non-negative integer", _bounded_int(0))
positive_float = _type("positive number", _bounded_float(0.0, strict=True))
non_negative_float = _type("non-negative number", _bounded_float(0.0, strict=False))
probability = _type("probability", _bounded_float(0.0, strict=False, high=1.0))
rank_list = _type("rank list", _int_list)
name_list = _type("name list", _name_list)


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A comma list whose items are each one of ``choices`` (duplicates removed, order kept)."""

    def parse(text: str) -> list[str]:
        items = _name_list(text)
        bad = [i for i in items if i not in choices]
        if bad:
            raise ValueError(f"unknown {bad[0]!r}, choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))

    return _type("list", parse)


def _fewshot(text: str) -> int | dict[str, int]:
    if "=" not in text:
        value = _int(text)
        if value < 0:
            raise ValueError("must be >= 0")
        return value
    out: dict[str, int] = {}
    for item in _name_list(text):
        task, sep, count = item.partition("=")
        if not sep or not task.strip():
            raise ValueError(f"expected TASK=N, got {item!r}")
        value = _int(count.strip())
        if value < 0:
            raise ValueError(f"shots for {task.strip()!r} must be >= 0")
        out[task.strip()] = value
    return out


fewshot_spec = _type("few-shot count", _fewshot)
