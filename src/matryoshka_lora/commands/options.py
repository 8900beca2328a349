"""Command-line options generated from dataclass fields, each declared once.

Each option is a field of a config dataclass, read into an :class:`Option` by
:func:`option` (:mod:`.option_spec`). From the same list of options this module
generates the argparse arguments (:func:`add_options`), the config-file values
and their checks (:func:`file_values`), the precedence of the sources
(:func:`resolve`) and the resolved-options listing (:func:`listing`).

Precedence, defaults < preset < config file < command line, needs the options the
command line gave. :func:`add_options` registers every option with
``default=argparse.SUPPRESS``, which argparse documents as "no attribute is added
if the argument was not present"; so after parsing, an option's attribute exists
exactly when it was given (:func:`given_values`), and :func:`merge` lays the
layers on one another (:func:`resolve` does both for a command). A list option
given on the command line therefore replaces the file's list as a whole.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .config_files import _as_text, check_exclusive, file_entries, to_plain
from .errors import CLIError, one_line
from .option_spec import FLAG, REPEAT, SWITCH, VALUE, Option, option

__all__ = [
    "FLAG",
    "REPEAT",
    "SWITCH",
    "VALUE",
    "Option",
    "add_groups",
    "add_options",
    "defaults",
    "file_value",
    "file_values",
    "given_values",
    "listing",
    "merge",
    "option",
    "resolve",
]


def add_options(
    parser: argparse.ArgumentParser | Any,
    options: Iterable[Option],
    exclusive: Iterable[Iterable[str]] = (),
) -> None:
    """Add ``options`` to ``parser`` (or an argument group), each defaulting to SUPPRESS;
    the options of one ``exclusive`` group of dests go into one mutually exclusive group."""
    group_of = {dest: tuple(group) for group in exclusive for dest in group}
    rivals: dict[tuple[str, ...], Any] = {}
    for o in options:
        target = parser
        if o.dest in group_of:
            group = group_of[o.dest]
            if group not in rivals:
                rivals[group] = parser.add_mutually_exclusive_group()
            target = rivals[group]
        kwargs: dict[str, Any] = {"dest": o.dest, "help": o.help_text()}
        kwargs["default"] = argparse.SUPPRESS
        if o.kind == FLAG:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif o.kind == SWITCH:
            kwargs["action"] = "store_true"
        else:
            if o.kind == REPEAT:
                kwargs["action"] = "append"
            kwargs.update(type=o.type, choices=o.choices, metavar=o.metavar)
        target.add_argument(*o.flags, **kwargs)


def add_groups(
    parser: argparse.ArgumentParser,
    groups: Mapping[str | None, Iterable[Option]],
    exclusive: Iterable[Iterable[str]] = (),
) -> None:
    """Add each group of options under its help title (``None``: the parser's own section)."""
    exclusive = [tuple(group) for group in exclusive]
    for title, options in groups.items():
        target = parser if title is None else parser.add_argument_group(title)
        add_options(target, options, exclusive)


def given_values(namespace: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """The options given on the command line (attributes present), by dest."""
    return {o.dest: getattr(namespace, o.dest) for o in options if hasattr(namespace, o.dest)}


def defaults(options: Iterable[Option]) -> dict[str, Any]:
    return {o.dest: o.default for o in options}


def file_value(o: Option, key: str, value: Any, path: str) -> Any:
    """A config-file value of option ``o``, converted and checked like its command-line text."""
    where = f"config file {path}: key {key!r}"
    if o.kind in (FLAG, SWITCH):
        if value is None and o.kind == FLAG:
            return o.default
        if not isinstance(value, bool):
            raise CLIError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    if o.kind == REPEAT:  # one item per list entry; a single value is a list of one
        items = value if isinstance(value, list | tuple) else [value]
        return [_file_item(o, item, where) for item in items]
    return _file_item(o, value, where)


def _file_item(o: Option, value: Any, where: str) -> Any:
    if isinstance(value, bool):
        raise CLIError(f"{where}: expected a value of the option's type, got {value!r}")
    if o.type is None and isinstance(value, list | tuple | dict):
        raise CLIError(f"{where} takes a single value, got {value!r}")
    text = _as_text(value)
    try:
        converted = o.type(text) if o.type is not None else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
        raise CLIError(f"{where}: {one_line(err)}") from None
    if o.choices is not None and converted not in o.choices:
        choices = ", ".join(map(str, o.choices))
        raise CLIError(f"{where}: invalid choice {converted!r} (choose from {choices})")
    return converted


def file_values(
    options: Sequence[Option],
    command: str,
    path: str | os.PathLike,
    exclusive: Iterable[Iterable[str]] = (),
) -> dict[str, Any]:
    """Option values (by dest) from config file ``path``; :class:`CLIError` names a bad key."""
    by_key = {key: o for o in options for key in o.keys}
    out: dict[str, Any] = {}
    for key, norm, value in file_entries(path, command, by_key):
        o = by_key[norm]
        if o.dest in out:
            raise CLIError(f"config file {path}: option {key!r} is given twice")
        out[o.dest] = file_value(o, key, value, str(path))
    check_exclusive(path, [d for d, v in out.items() if v is not None], exclusive)
    return out


def merge(
    layers: Sequence[Mapping[str, Any]], exclusive: Iterable[Iterable[str]] = ()
) -> dict[str, Any]:
    """The layers laid on one another, the last winning; the first must hold every dest.

    A layer that sets an option of an exclusive group (``target_modules`` /
    ``target_regex``) also resets the group's other options to their defaults,
    so a later source replaces its rivals set by an earlier one.
    """
    groups = [tuple(group) for group in exclusive]
    base = layers[0]
    out = dict(base)
    for layer in layers[1:]:
        for group in groups:
            if any(layer.get(dest) is not None for dest in group):
                out.update({dest: base[dest] for dest in group})
        out.update(layer)
    return out


def resolve(
    args: argparse.Namespace,
    options: Sequence[Option],
    command: str,
    exclusive: Iterable[Iterable[str]] = (),
    presets: Callable[[dict[str, Any], dict[str, Any]], list[Mapping[str, Any]]] | None = None,
) -> argparse.Namespace:
    """Every option's value from defaults < ``presets`` < ``--config`` file < command line.

    ``presets(given, from_file)`` returns the layers between the defaults and
    the file (``train``'s ``--preset``). Attributes of ``args`` that are not
    options (``config``, ``func``, positionals, ...) are kept.
    """
    exclusive = [tuple(group) for group in exclusive]
    given = given_values(args, options)
    path = getattr(args, "config", None)
    from_file = file_values(options, command, path, exclusive) if path else {}
    middle = presets(given, from_file) if presets is not None else []
    merged = merge([defaults(options), *middle, from_file, given], exclusive)
    dests = {o.dest for o in options}
    rest = {k: v for k, v in vars(args).items() if k not in dests}
    return argparse.Namespace(**rest, **merged)


def listing(args: argparse.Namespace, options: Iterable[Option], command: str) -> dict[str, Any]:
    """``{"command": command, "<long-option>": value, ...}``: a config file of ``args``."""
    out: dict[str, Any] = {"command": command}
    out.update({o.dest.replace("_", "-"): to_plain(getattr(args, o.dest)) for o in options})
    return out
