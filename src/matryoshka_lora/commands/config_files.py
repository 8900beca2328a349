"""Config files: reading them, converting their values, writing the resolved options.

A config file (``--config FILE``, YAML or JSON) holds one mapping whose keys are
the sub-command's long option names, with dashes or underscores
(``learning-rate`` or ``learning_rate``), and an optional ``command`` key that
must name the sub-command. Values are converted by the option's own type, so a
file value is checked exactly like the same value on the command line; lists
may be YAML lists or comma strings. An unknown key is an error that names it.

``train`` declares its options on dataclasses (:mod:`.options`); the other
sub-commands' files are read against their argparse parser
(:func:`config_file_defaults`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import CLIError, one_line

# Options that are about the invocation itself, never read from a config file.
RESERVED_DESTS = frozenset(
    {"help", "config", "debug", "print_config", "version", "command", "func"}
)
RESOLVED_CONFIG_STEM = "resolved_config"


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers/datasets
        return None
    return yaml


def config_option_map(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config-file keys (long option names with underscores) -> the parser's actions."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in RESERVED_DESTS:
            continue
        for opt in action.option_strings:
            if not opt.startswith("--"):
                continue
            if isinstance(action, argparse.BooleanOptionalAction) and opt.startswith("--no-"):
                continue
            keys[opt[2:].replace("-", "_")] = action
    return keys


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping stored in a YAML or JSON file (JSON for ``.json``, else YAML)."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file {path} not found")
    text = p.read_text(encoding="utf-8")
    yaml = _yaml()
    if p.suffix.lower() == ".json" or yaml is None:
        if p.suffix.lower() in (".yaml", ".yml"):
            raise CLIError(f"reading YAML config file {path} needs PyYAML: pip install pyyaml")
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as err:
            raise CLIError(f"config file {path} is not valid JSON: {one_line(err)}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise CLIError(f"config file {path} is not valid YAML: {one_line(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(
            f"config file {path} must hold a mapping of option names to values, "
            f"got a {type(data).__name__}"
        )
    return data


def _as_text(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def convert_config_value(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """``value`` from a config file converted and checked like the option's command-line value."""
    where = f"config file {source}: key {key!r}"
    if action.nargs == 0:  # flags
        if value is None and isinstance(action, argparse.BooleanOptionalAction):
            return None  # the option's default
        if not isinstance(value, bool):
            raise CLIError(f"{where} must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        return action.const if value else action.default
    if value is None:
        return None
    if isinstance(action, argparse._AppendAction):  # a repeatable option: one item per entry
        items = value if isinstance(value, list | tuple) else [value]
        return [_convert_one(action, item, where) for item in items]
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool):
        raise CLIError(f"{where}: expected a value of the option's type, got {value!r}")
    if action.type is None and isinstance(value, list | tuple | dict):
        raise CLIError(f"{where} takes a single value, got {value!r}")
    text = _as_text(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
        raise CLIError(f"{where}: {one_line(err)}") from None
    if action.choices is not None and converted not in action.choices:
        raise CLIError(
            f"{where}: invalid choice {converted!r} (choose from "
            f"{', '.join(map(str, action.choices))})"
        )
    return converted


def file_entries(
    path: str | os.PathLike, command: str, keys: Iterable[str]
) -> Iterator[tuple[str, str, Any]]:
    """``(key as written, key with underscores, value)`` for each option in config file ``path``.

    ``keys`` are the option names the file may use (underscores). Raises
    :class:`CLIError` for a ``command`` key naming another sub-command and for an
    unknown key (with the closest known key as a hint).
    """
    known = list(keys)
    for key, value in read_config_file(path).items():
        if not isinstance(key, str):
            raise CLIError(f"config file {path}: key {key!r} is not an option name")
        norm = key.lstrip("-").replace("-", "_")
        if norm == "command":
            if value != command:
                raise CLIError(
                    f"config file {path} is for command {value!r}, not {command!r}: "
                    f"run 'matryoshka-lora {value} --config {path}'"
                )
            continue
        if norm not in known:
            close = difflib.get_close_matches(norm, known, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise CLIError(
                f"config file {path}: unknown key {key!r}, not an option of "
                f"'matryoshka-lora {command}'{hint}"
            )
        yield key, norm, value


def check_exclusive(path: str | os.PathLike, given: Iterable[str], groups) -> None:
    """Raise :class:`CLIError` if the file sets two options of one exclusive group."""
    given = set(given)
    for group in groups:
        both = [dest for dest in group if dest in given]
        if len(both) > 1:
            raise CLIError(
                f"config file {path}: keys {' and '.join(repr(b.replace('_', '-')) for b in both)} "
                "exclude each other; keep one"
            )


def config_file_defaults(
    parser: argparse.ArgumentParser, command: str, path: str | os.PathLike
) -> dict[str, Any]:
    """Option values (by dest) from config file ``path`` for sub-command ``command``.

    Raises :class:`CLIError` naming the key for an unknown key, a bad value,
    a key given twice (``lr`` and ``learning-rate``), two mutually exclusive
    options, or a ``command`` key naming another sub-command.
    """
    options = config_option_map(parser)
    out: dict[str, Any] = {}
    for key, norm, value in file_entries(path, command, options):
        action = options[norm]
        if action.dest in out:
            raise CLIError(f"config file {path}: option {key!r} is given twice")
        out[action.dest] = convert_config_value(action, key, value, str(path))
    groups = [[a.dest for a in g._group_actions] for g in parser._mutually_exclusive_groups]
    check_exclusive(path, [d for d, v in out.items() if v is not None], groups)
    return out


def to_plain(value: Any) -> Any:
    """Tuples -> lists, recursively (for YAML/JSON output)."""
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def options_dict(
    parser: argparse.ArgumentParser, args: argparse.Namespace, command: str
) -> dict[str, Any]:
    """``{"command": command, "<long-option>": value, ...}`` for every config-file option."""
    out: dict[str, Any] = {"command": command}
    for action in parser._actions:
        if not action.option_strings or action.dest in RESERVED_DESTS:
            continue
        out[action.dest.replace("_", "-")] = to_plain(getattr(args, action.dest, None))
    return out


def dump_config(data: dict[str, Any], fmt: str = "yaml") -> str:
    yaml = _yaml()
    if fmt == "yaml" and yaml is not None:
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    return json.dumps(data, indent=2) + "\n"


def write_resolved_config(folder: Path, data: dict[str, Any]) -> Path:
    """Write ``resolved_config.yaml`` (``.json`` without PyYAML), loadable with ``--config``."""
    from ..io import atomic_write_text

    fmt = "yaml" if _yaml() is not None else "json"
    path = folder / f"{RESOLVED_CONFIG_STEM}.{fmt}"
    header = "# matryoshka-lora: the options of this run (load with --config)\n"
    atomic_write_text(path, (header if fmt == "yaml" else "") + dump_config(data, fmt))
    return path
