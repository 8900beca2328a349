"""The ``matryoshka-lora`` command line.

Sub-commands (one module each in :mod:`matryoshka_lora.commands`, each with ``NAME``,
``HELP``, ``DESCRIPTION`` and ``add_arguments(parser)``): ``train``, ``eval``,
``export``, ``info``, ``slice``, and ``demo`` when :mod:`matryoshka_lora.commands.demo`
imports (its extra is installed).

Errors in the input (a missing model or dataset, a dataset without the fields
its format needs, conflicting options, a rank above R, an unknown config-file
key, ...) end the program with one line on stderr and exit status 2; other
failures print one line and exit with 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, NoReturn

from ._version import __version__
from .commands import evaluate, export, info, slice_adapter, train
from .commands._common import HelpFormatter, add_command, one_line

PROG = "matryoshka-lora"
COMMANDS = (train, evaluate, export, info, slice_adapter)
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
# Exceptions that report bad input (CLIError, DatasetFormatError, AdapterCheckpointError and
# the library's validation errors are ValueErrors; ImportError: a missing optional package).
BAD_INPUT_ERRORS = (ValueError, ImportError, FileNotFoundError, NotADirectoryError)


class ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, naming the option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # config-file precedence needs exact names
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Nested-rank LoRA: one adapter usable at every rank r <= R.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show full tracebacks on errors (also accepted after the command name)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # name -> sub-command parser, for the tests and tools
    for command in COMMANDS:
        add_command(sub, command)
    try:
        demo = importlib.import_module(".commands.demo", __package__)
    except ImportError:  # the demo module (or its dependencies) is not available
        pass
    else:
        add_command(sub, demo)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers of :func:`build_parser`'s parser, by name."""
    return getattr(parser, "commands", {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` and merge a ``--preset`` and a ``--config`` file:
    defaults < preset < file < command line.

    A command whose options may come from a config file sets a ``resolve``
    default that merges the sources (its options are declared on dataclasses,
    :mod:`.commands.options`). Raises :class:`CLIError` for a bad config file
    (unknown key, bad value).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    resolve = getattr(args, "resolve", None)
    return resolve(args) if resolve is not None else args


def _wants_debug(argv: list[str]) -> bool:
    return "--debug" in argv[: argv.index("--")] if "--" in argv else "--debug" in argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prefix = f"{PROG} {command}" if command else PROG
    try:
        args = parse_args(argv)
        prefix = f"{PROG} {args.command}"
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if _wants_debug(argv):
            raise
        bad_input = isinstance(err, BAD_INPUT_ERRORS)
        kind = "" if bad_input else f"{type(err).__name__}: "
        hint = "" if bad_input else " (run with --debug for the traceback)"
        print(f"{prefix}: error: {kind}{one_line(err)}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
