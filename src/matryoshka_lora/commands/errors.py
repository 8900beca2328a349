"""The command line's error type and one-line messages."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


class CLIError(ValueError):
    """Bad command-line input; printed as a single line with exit status 2."""


def one_line(err: BaseException | str) -> str:
    """The message of ``err`` on one line (library errors sometimes span several)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if isinstance(err, BaseException) and not text:
        return type(err).__name__
    return text


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def reject_options(args: argparse.Namespace, dests: Iterable[str], reason: str) -> None:
    """Raise a :class:`CLIError` if any option in ``dests`` was given (is not None).

    The message reads ``--a and --b are <reason>`` (``is`` for one option).
    """
    given = [d for d in dests if getattr(args, d, None) is not None]
    if given:
        names = " and ".join(option_name(d) for d in given)
        raise CLIError(f"{names} {'is' if len(given) == 1 else 'are'} {reason}")


def require_options(args: argparse.Namespace, dests: Iterable[str]) -> None:
    """Raise a :class:`CLIError` naming every option in ``dests`` that was not given (None)."""
    missing = [option_name(d) for d in dests if getattr(args, d, None) is None]
    if missing:
        raise CLIError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
