"""Comparisons of training methods at every rank: the spec, one run, the protocol."""

from .run import run_one
from .runner import ComparisonRunner
from .spec import CORE_KINDS, CORE_ROWS, METHOD_ROWS, ComparisonSpec, RunKey, row_source

__all__ = [
    "CORE_KINDS",
    "CORE_ROWS",
    "METHOD_ROWS",
    "ComparisonRunner",
    "ComparisonSpec",
    "RunKey",
    "row_source",
    "run_one",
]
