"""The PEFT method's name and its registration with PEFT's mappings.

PEFT looks a saved adapter's ``peft_type`` up in ``PEFT_TYPE_TO_CONFIG_MAPPING``,
``PEFT_TYPE_TO_TUNER_MAPPING`` and ``PEFT_TYPE_TO_PREFIX_MAPPING`` (``peft/mapping.py``);
from PEFT 0.21 these take any string key, so a method outside PEFT registers by
adding one entry to each. The key registered here is nonetheless a member of PEFT's
``PeftType`` enum (a ``str``, equal to and hashed as its value): PEFT 0.19 and 0.20
check ``peft_type in list(PeftType)`` when saving, and transformers' ``load_adapter``
before 5.25 reads ``peft_type.value``. One member is added; nothing else changes.

Without this package imported, PEFT's lookup of the name fails with
``KeyError: '<name>'``; the name itself therefore says what to install and import.
"""

from __future__ import annotations

import enum

import peft
from packaging.version import Version

from .._peft_type import PEFT_TYPE_NAME

# The member name in PEFT's PeftType enum.
ENUM_MEMBER = "MATRYOSHKA_LORA"
# Parameter prefix: the factors keep LoRA's names (lora_A, lora_B).
PREFIX = "lora_"
MIN_PEFT = Version("0.19")


def check_peft_version(version: str | None = None) -> Version:
    """The installed PEFT version; refuses releases older than 0.19."""
    found = Version(version or peft.__version__)
    if found.release < MIN_PEFT.release:
        raise ImportError(
            f"matryoshka_lora.peft needs peft >= {MIN_PEFT} (found {found}): "
            f"pip install -U 'peft>={MIN_PEFT}'"
        )
    return found


# refuse an unsupported PEFT before the rest of the package touches its internals
check_peft_version()


def _enum_member(name: str, value: str) -> enum.Enum:
    """``PeftType.<name>`` with ``value``, added to the enum if absent.

    Sets what the enum's lookups read: the name and value maps, the member list
    (iteration and ``in list(PeftType)``) and the class attribute.
    """
    from peft.utils.peft_types import PeftType

    if name in PeftType.__members__:
        member = PeftType[name]
        if member.value != value:
            raise RuntimeError(
                f"PeftType.{name} already exists with value {member.value!r}, not {value!r}: "
                "another package registered a PEFT method of that name"
            )
        return member
    member = str.__new__(PeftType, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(name)
    return member


def peft_type() -> str:
    """The registered ``peft_type``: ``PeftType.MATRYOSHKA_LORA``, whose value is
    :data:`PEFT_TYPE_NAME` (added to the enum on first use)."""
    return _enum_member(ENUM_MEMBER, PEFT_TYPE_NAME)


def _full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(config_cls: type, tuner_cls: type) -> str:
    """Map this method's ``peft_type`` to its config and tuner classes (idempotent).

    Refuses a name already mapped to another package's classes. Returns the
    registered ``peft_type``.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    key = peft_type()
    for mapping, cls in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (PEFT_TYPE_TO_TUNER_MAPPING, tuner_cls),
    ):
        present = mapping.get(key)
        if present is not None and _full_name(present) != _full_name(cls):
            raise RuntimeError(f"PEFT type {key!r} is already registered to {_full_name(present)}")
        mapping[key] = cls
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
    return key
