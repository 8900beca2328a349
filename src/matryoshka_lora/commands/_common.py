"""Shared pieces of the sub-commands, importable from one place.

Each piece lives in a module of its own: :mod:`.errors` (the error type, one-line
messages), :mod:`.option_types` (value types of options), :mod:`.config_files`
(reading and writing config files), :mod:`.models` (devices, model loading),
:mod:`.inputs` (adapter folders, ranks, dataset records). This module re-exports
them and holds the help formatter.
"""

from __future__ import annotations

import argparse
import os

from .config_files import (
    RESERVED_DESTS,
    RESOLVED_CONFIG_STEM,
    config_file_defaults,
    config_option_map,
    convert_config_value,
    dump_config,
    options_dict,
    read_config_file,
    to_plain,
    write_resolved_config,
)
from .errors import CLIError, one_line, option_name, reject_options
from .inputs import base_model_name, check_ranks, load_records_checked, locate_adapter
from .models import load_model, model_source, resolve_device, torch_dtype
from .option_types import (
    choice_list,
    fewshot_spec,
    name_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    rank_list,
)

__all__ = [
    "DTYPES",
    "RESERVED_DESTS",
    "RESOLVED_CONFIG_STEM",
    "CLIError",
    "HelpFormatter",
    "base_model_name",
    "check_ranks",
    "choice_list",
    "config_file_defaults",
    "config_option_map",
    "convert_config_value",
    "dump_config",
    "fewshot_spec",
    "is_main_process",
    "load_model",
    "load_records_checked",
    "locate_adapter",
    "model_source",
    "name_list",
    "non_negative_float",
    "non_negative_int",
    "one_line",
    "option_name",
    "options_dict",
    "positive_float",
    "positive_int",
    "probability",
    "rank_list",
    "read_config_file",
    "reject_options",
    "resolve_device",
    "to_plain",
    "torch_dtype",
    "write_resolved_config",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")


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


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
