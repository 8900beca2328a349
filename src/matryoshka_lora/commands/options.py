"""Command-line options generated from dataclass fields, each declared once.

An option is a field of a config dataclass (``NestedLoraConfig``,
``TrainConfig``, or a command's own dataclass of CLI-only settings): its help
text is ``metadata["help"]`` (PEFT's convention), its choices the ``Literal[...]``
of its type, its default the field's default. :func:`option` reads a field into
an :class:`Option`; the argparse arguments, the config-file keys and their value
conversion, the precedence of the sources and the resolved-options listing are
all generated from the same list of options. What only the command line needs
(a short flag name such as ``--lr``, an alias, a checking value type such as
``positive_int``, a metavar) is given to :func:`option` by the command.

Why not transformers' ``HfArgumentParser``: it cannot express options this CLI
already has and its users type. It turns a ``list`` field into space-separated
``nargs="+"`` and a ``tuple`` field into ``tuple(text)`` (``--train-ranks 1,2,4``
and ``--target-modules q_proj,v_proj`` are comma lists); a ``bool | None`` field
becomes an option that requires a value (``--prefix-loss`` is a bare flag with
``--no-prefix-loss``) and a ``False`` default gets no ``--no-X`` (``--no-bf16``);
the ``type`` in a field's metadata is overwritten by the annotation's, so the
checking types that name a bad config-file key (``r: -1``) cannot be used; the
option's dest is always the field name (the CLI's ``--lr`` fills
``learning_rate``, recipes spell ``lr`` and ``grad-accum``); and every option
gets a second ``--snake_case`` spelling. jsonargparse or tyro would add a
dependency for the same result. The mapping here is small: ``Literal`` ->
choices, ``bool`` -> ``--x/--no-x``, ``int``/``float``/``str``, ``tuple[int, ...]``
-> a comma list of ranks, ``list[str]`` -> a comma list of names.

Precedence, defaults < preset < config file < command line, needs the options the
command line gave. :func:`add_options` registers every option with
``default=argparse.SUPPRESS``, which argparse documents as "no attribute is added
if the argument was not present"; so after parsing, an option's attribute exists
exactly when it was given (:func:`given_values`), and :func:`merge` lays the
layers on one another.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .config_files import _as_text, check_exclusive, file_entries
from .errors import CLIError, one_line
from .option_types import name_list, rank_list

VALUE, FLAG, SWITCH = "value", "flag", "switch"  # --x V; --x/--no-x; --x (store_true)


@dataclass(frozen=True)
class Option:
    """One command-line option filling field ``field`` of dataclass ``owner``.

    ``dest`` is the namespace attribute and, with dashes, the long flag and the
    config-file key; ``aliases`` are further flags (``--learning-rate``).
    """

    dest: str
    owner: type
    field: str
    help: str
    default: Any
    kind: str = VALUE
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        return ("--" + self.dest.replace("_", "-"), *self.aliases)

    @property
    def keys(self) -> tuple[str, ...]:
        """Config-file keys: the long flags without ``--``, with underscores."""
        return tuple(flag.lstrip("-").replace("-", "_") for flag in self.flags)

    def help_text(self) -> str:
        """The help, with ``(default: X)`` when the default is informative and not stated."""
        text = self.help
        shown = self.default is not None and self.default is not False
        if shown and "default" not in text.lower():
            text += f" (default: {_as_text(self.default)})"
        return text.replace("%", "%%")  # argparse %-formats help strings


_NO_DEFAULT = object()


def _strip_none(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def option(
    owner: type,
    field: str,
    *,
    dest: str | None = None,
    type: Callable[[str], Any] | None = None,
    default: Any = _NO_DEFAULT,
    choices: Sequence[Any] | None = None,
    aliases: Iterable[str] = (),
    metavar: str | None = None,
    switch: bool = False,
) -> Option:
    """The option of field ``field`` of dataclass ``owner``; keywords override what the
    field declares (``default=None`` for an option that is "not given" unless set)."""
    fields = {f.name: f for f in dataclasses.fields(owner)}
    if field not in fields:
        raise TypeError(f"{owner.__name__} has no field {field!r}")
    spec = fields[field]
    text = spec.metadata.get("help")
    if not text:
        raise TypeError(f"{owner.__name__}.{field} declares no metadata['help']")
    if default is _NO_DEFAULT:
        if spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            default = None if spec.default is dataclasses.MISSING else spec.default
    hint = _strip_none(typing.get_type_hints(owner)[field])
    kind, parse, values = VALUE, type, None
    if typing.get_origin(hint) is Literal:
        values = typing.get_args(hint)
    elif hint is bool:
        kind = SWITCH if switch else FLAG
    elif parse is None:
        parse = _value_type(hint, f"{owner.__name__}.{field}")
    if choices is not None:
        values = tuple(choices)
    return Option(
        dest=dest or field,
        owner=owner,
        field=field,
        help=text,
        default=default,
        kind=kind,
        type=parse,
        choices=values,
        aliases=tuple(aliases),
        metavar=metavar,
    )


def _value_type(hint: Any, where: str) -> Callable[[str], Any] | None:
    if hint is str:
        return None
    if hint in (int, float):
        return hint
    if hint == tuple[int, ...]:
        return rank_list
    if hint == list[str]:
        return name_list
    raise TypeError(f"{where}: no command-line type for {hint!r}; pass type=... to option()")


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
            kwargs.update(type=o.type, choices=o.choices, metavar=o.metavar)
        target.add_argument(*o.flags, **kwargs)


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
