"""The ``matryoshka-lora`` command line.

Sub-commands (one module each in :mod:`matryoshka_lora.commands`): ``train``,
``eval``, ``export``, ``info``, and ``demo`` when :mod:`matryoshka_lora.commands.demo`
provides ``add_demo_parser(subparsers)``.

Errors in the input (a missing model or dataset, a dataset without the fields
its format needs, conflicting options, a rank above R, an unknown config-file
key, ...) end the program with one line on stderr and exit status 2; other
failures print one line and exit with 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from ._version import __version__
from .commands import evaluate, export, info, train
from .commands._common import HelpFormatter, config_file_defaults, one_line

PROG = "matryoshka-lora"
COMMANDS = (train, evaluate, export, info)
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
    for command in COMMANDS:
        command.add_parser(sub)
    try:
        from .commands.demo import add_demo_parser
    except ImportError:  # the demo module (or its dependencies) is not available
        add_demo_parser = None
    if add_demo_parser is not None:
        add_demo_parser(sub)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _explicit_dests(argv: list[str], command: str) -> set[str]:
    """The dests of the options given on the command line (not defaults)."""
    parser = build_parser()
    sub = _subparsers(parser)[command]
    for action in sub._actions:
        if action.option_strings:
            action.default = argparse.SUPPRESS
    names = {a.dest for a in sub._actions}
    return {k for k in vars(parser.parse_args(argv)) if k in names}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` and merge a ``--preset`` and a ``--config`` file:
    defaults < preset < file < command line.

    A command that declares its options on dataclasses (``train``) sets a
    ``resolve`` default that merges the sources itself (:mod:`.commands.options`);
    for the others the config file's values become the parser's defaults.
    Raises :class:`CLIError` for a bad config file (unknown key, bad value).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve = getattr(args, "resolve", None)
    if resolve is not None:
        return resolve(args)
    path = getattr(args, "config", None)
    if not path:
        return args
    command = args.command
    defaults = config_file_defaults(_subparsers(parser)[command], command, path)
    explicit = _explicit_dests(argv, command)
    parser = build_parser()
    sub = _subparsers(parser)[command]
    for (
        action
    ) in sub._actions:  # a repeatable option given on the command line replaces the file's list
        if isinstance(action, argparse._AppendAction) and action.dest in explicit:
            defaults.pop(action.dest, None)
    for group in sub._mutually_exclusive_groups:
        dests = {a.dest for a in group._group_actions}
        if dests & explicit:  # an option given on the command line replaces its rivals
            for dest in dests - explicit:
                defaults.pop(dest, None)
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


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
