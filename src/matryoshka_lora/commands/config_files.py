"""Config files: reading them, checking their keys, writing the resolved options.

A config file (``--config FILE``, YAML or JSON) holds one mapping whose keys are
the sub-command's long option names, with dashes or underscores
(``learning-rate`` or ``learning_rate``), and an optional ``command`` key that
must name the sub-command. Values are converted by the option's own type, so a
file value is checked exactly like the same value on the command line; lists
may be YAML lists or comma strings. An unknown key is an error that names it.
A ``train`` file may also spell options as TRL's and PEFT's configs do
(:data:`FOREIGN_KEYS`: ``model_name_or_path``, ``per_device_train_batch_size``,
``lora_r``, ...); a key whose meaning differs here (``lora_alpha``) is refused with
the reason (:data:`REFUSED_KEYS`).

The options themselves are declared on dataclasses; :mod:`.options` converts
a file's values by each option's declaration and merges them with the other
sources. This module knows only the file format.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import CLIError, one_line

RESOLVED_CONFIG_STEM = "resolved_config"

# command -> {TRL / PEFT config key: the command's own key}: the names of the same settings
# in TRL's SFTConfig, ScriptArguments and ModelConfig (PEFT's LoraConfig without "lora_").
# Keys that TRL spells as this CLI does (learning_rate, max_length, max_steps, seed, bf16,
# output_dir, report_to, load_in_4bit, ...) need no entry.
FOREIGN_KEYS: dict[str, dict[str, str]] = {
    "train": {
        "model_name_or_path": "model",
        "dataset_name": "dataset",
        "dataset_config": "dataset_subset",
        "dataset_train_split": "split",
        "dataset_test_split": "eval_split",
        "per_device_train_batch_size": "batch_size",
        "per_device_eval_batch_size": "eval_batch_size",
        "gradient_accumulation_steps": "grad_accum",
        "num_train_epochs": "epochs",
        "logging_steps": "log_every",
        "save_steps": "save_every",
        "save_total_limit": "keep_checkpoints",
        "eval_steps": "eval_every",
        "lora_r": "r",
        "lora_target_modules": "target_modules",
        "lora_dropout": "dropout",
    },
}
# command -> {key: why it is refused}: keys of TRL / PEFT whose value means something else here
REFUSED_KEYS: dict[str, dict[str, str]] = {
    "train": {
        "lora_alpha": "PEFT scales the update by lora_alpha/r, while alpha here is the multiplier "
        "of s(r) (alpha/sqrt(r) under the default scaling: sqrt), so the same number trains "
        "another step size; set alpha instead (default 1; scaling: rank with alpha: <lora_alpha> "
        "is PEFT's rule)",
    },
}


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers/datasets
        return None
    return yaml


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


def file_entries(
    path: str | os.PathLike, command: str, keys: Iterable[str]
) -> Iterator[tuple[str, str, Any]]:
    """``(key as written, key with underscores, value)`` for each option in config file ``path``.

    ``keys`` are the option names the file may use (underscores); a key of
    :data:`FOREIGN_KEYS` is yielded as the command's own. Raises :class:`CLIError`
    for a ``command`` key naming another sub-command, for a key of
    :data:`REFUSED_KEYS` (with the reason) and for an unknown key (with the
    closest known key as a hint).
    """
    known = list(keys)
    foreign, refused = FOREIGN_KEYS.get(command, {}), REFUSED_KEYS.get(command, {})
    for key, value in read_config_file(path).items():
        if not isinstance(key, str):
            raise CLIError(f"config file {path}: key {key!r} is not an option name")
        norm = key.lstrip("-").replace("-", "_")
        if norm in refused:
            raise CLIError(f"config file {path}: key {key!r} is not accepted: {refused[norm]}")
        if norm not in known:
            norm = foreign.get(norm, norm)
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


def to_plain(value: Any) -> Any:
    """Tuples -> lists, recursively (for YAML/JSON output)."""
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


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
