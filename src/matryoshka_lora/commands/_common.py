"""Shared pieces of the sub-commands, importable from one place.

Each piece lives in a module of its own: :mod:`.errors` (the error type, one-line
messages), :mod:`.config_files` (reading and writing config files), :mod:`.models`
(devices, model loading), :mod:`.inputs` (adapter folders, ranks, dataset
records). This module re-exports them and holds the help formatter and the
options every sub-command has. Option value types are imported from
:mod:`.option_types` itself, next to the option declarations that use them.
"""

from __future__ import annotations

import argparse
import os
from types import ModuleType
from typing import Any

from .config_files import (
    RESOLVED_CONFIG_STEM,
    dump_config,
    read_config_file,
    to_plain,
    write_resolved_config,
)
from .errors import CLIError, one_line, option_name, reject_options, require_options
from .inputs import base_model_name, check_ranks, load_records_checked, locate_adapter
from .models import DTYPES, load_model, model_source, resolve_device, torch_dtype

__all__ = [
    "DTYPES",
    "ADAPTER_HELP",
    "RESOLVED_CONFIG_STEM",
    "CLIError",
    "HelpFormatter",
    "add_command",
    "base_model_name",
    "check_ranks",
    "dump_config",
    "is_main_process",
    "load_model",
    "load_records_checked",
    "locate_adapter",
    "model_source",
    "one_line",
    "option_name",
    "read_config_file",
    "reject_options",
    "require_options",
    "resolve_device",
    "to_plain",
    "torch_dtype",
    "write_resolved_config",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends ``(default: X)`` to option help.

    The default is shown when it is informative (not None/False) and the help
    text does not already state it.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text.lower()
            or default is None
            or default is False
            or default is argparse.SUPPRESS
        ):
            return text
        return text + " (default: %(default)s)"


ADAPTER_HELP = "adapter folder (save_adapter output) or a training --output-dir"


def add_command(subparsers: Any, command: ModuleType) -> argparse.ArgumentParser:
    """The parser of a command module: its ``NAME``, ``HELP`` and ``DESCRIPTION``, the
    arguments its ``add_arguments(parser)`` declares, ``--config`` / ``--print-config``
    where ``CONFIG_FILE`` is true, and the hidden ``--debug`` (read by ``cli.main``)."""
    p = subparsers.add_parser(
        command.NAME,
        help=command.HELP,
        description=command.DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    if getattr(command, "CONFIG_FILE", False):
        p.add_argument(
            "--config",
            metavar="FILE",
            help="YAML or JSON file of options (keys: long option names, dashes or "
            "underscores); command-line options override it; an unknown key is an error",
        )
        p.add_argument(
            "--print-config",
            action="store_true",
            help="check the options, print them as YAML and exit (loads no model or data)",
        )
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    command.add_arguments(p)
    return p


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
