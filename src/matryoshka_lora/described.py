"""A dataclass field that carries its help text.

``x: float = described(1.0, "multiplier alpha of s(r)")`` is
``field(default=1.0, metadata={"help": "multiplier alpha of s(r)"})``: the help lives in
``metadata["help"]`` (the convention of PEFT's and transformers' config dataclasses),
where the command line, the config-file checks and the documentation read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any


def described(
    default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | Any = MISSING
) -> Any:
    """A ``dataclasses.field`` with ``default`` (or ``default_factory=factory``) and
    ``metadata={"help": help}``."""
    return field(default=default, default_factory=factory, metadata={"help": help})
