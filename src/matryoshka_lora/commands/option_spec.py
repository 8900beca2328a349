"""Declaring a command-line option: a dataclass field read into an :class:`Option`.

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
-> a comma list of ranks, ``list[str]`` -> a comma list of names, or with
``repeat=True`` a repeatable option (``--metric a --metric b``; a list in a file).

The parser, the config-file values and their precedence are generated from the
options by :mod:`.options`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .config_files import _as_text
from .option_types import name_list, rank_list

# --x V; --x/--no-x; --x (store_true); --x V repeated, collected in a list
VALUE, FLAG, SWITCH, REPEAT = "value", "flag", "switch", "repeat"


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
    repeat: bool = False,
) -> Option:
    """The option of field ``field`` of dataclass ``owner``; keywords override what the
    field declares (``default=None`` for an option that is "not given" unless set).

    ``switch``: a ``bool`` field as a bare ``--x`` (no ``--no-x``); ``repeat``: a
    ``list`` field filled by repeating the option, ``type`` converting each item.
    """
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
    if repeat:
        kind = REPEAT
    elif typing.get_origin(hint) is Literal:
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
