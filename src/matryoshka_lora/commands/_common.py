"""Shared pieces of the sub-commands: option types, config files, models, adapters.

Config files (``--config FILE``, YAML or JSON) hold one mapping whose keys are
the sub-command's long option names, with dashes or underscores
(``learning-rate`` or ``learning_rate``), and an optional ``command`` key that
must name the sub-command. Values are converted by the option's own type, so a
file value is checked exactly like the same value on the command line; lists
may be YAML lists or comma strings. Options given on the command line override
the file. An unknown key is an error that names it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# Options that are about the invocation itself, never read from a config file.
RESERVED_DESTS = frozenset(
    {"help", "config", "debug", "print_config", "version", "command", "func"}
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
RESOLVED_CONFIG_STEM = "resolved_config"


class CLIError(ValueError):
    """Bad command-line input; printed as a single line with exit status 2."""


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


# ---------------------------------------------------------------------------- option types
def _type(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(str(text).strip())
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(f"invalid {name} {text!r}: {err}") from None

    convert.__name__ = name  # argparse names the type in its messages
    return convert


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an integer") from None


def _bounded_int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise ValueError(f"must be >= {low}")
        return value

    return parse


def _bounded_float(low: float, strict: bool, high: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number") from None
        if value != value or (value <= low if strict else value < low):
            raise ValueError(f"must be {'>' if strict else '>='} {low}")
        if high is not None and value >= high:
            raise ValueError(f"must be < {high}")
        return value

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("give at least one integer, comma-separated")
    values = tuple(_int(t) for t in items)
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"ranks must be >= 1, got {bad[0]}")
    return values


def _name_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("give at least one name, comma-separated")
    return items


positive_int = _type("positive integer", _bounded_int(1))
non_negative_int = _type("non-negative integer", _bounded_int(0))
positive_float = _type("positive number", _bounded_float(0.0, strict=True))
non_negative_float = _type("non-negative number", _bounded_float(0.0, strict=False))
probability = _type("probability", _bounded_float(0.0, strict=False, high=1.0))
rank_list = _type("rank list", _int_list)
name_list = _type("name list", _name_list)


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A comma list whose items are each one of ``choices`` (duplicates removed, order kept)."""

    def parse(text: str) -> list[str]:
        items = _name_list(text)
        bad = [i for i in items if i not in choices]
        if bad:
            raise ValueError(f"unknown {bad[0]!r}, choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))

    return _type("list", parse)


def _fewshot(text: str) -> int | dict[str, int]:
    if "=" not in text:
        value = _int(text)
        if value < 0:
            raise ValueError("must be >= 0")
        return value
    out: dict[str, int] = {}
    for item in _name_list(text):
        task, sep, count = item.partition("=")
        if not sep or not task.strip():
            raise ValueError(f"expected TASK=N, got {item!r}")
        value = _int(count.strip())
        if value < 0:
            raise ValueError(f"shots for {task.strip()!r} must be >= 0")
        out[task.strip()] = value
    return out


fewshot_spec = _type("few-shot count", _fewshot)


# ---------------------------------------------------------------------------- messages
def one_line(err: BaseException | str) -> str:
    """The message of ``err`` on one line (library errors sometimes span several)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if isinstance(err, BaseException) and not text:
        return type(err).__name__
    return text


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def reject_options(args: argparse.Namespace, dests: Iterable[str], reason: str) -> None:
    """Raise a :class:`CLIError` if any option in ``dests`` was given (is not None).

    The message reads ``--a and --b are <reason>`` (``is`` for one option).
    """
    given = [d for d in dests if getattr(args, d, None) is not None]
    if given:
        names = " and ".join(option_name(d) for d in given)
        raise CLIError(f"{names} {'is' if len(given) == 1 else 'are'} {reason}")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------- config files
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


def config_file_defaults(
    parser: argparse.ArgumentParser, command: str, path: str | os.PathLike
) -> dict[str, Any]:
    """Option values (by dest) from config file ``path`` for sub-command ``command``.

    Raises :class:`CLIError` naming the key for an unknown key, a bad value,
    a key given twice (``lr`` and ``learning-rate``), two mutually exclusive
    options, or a ``command`` key naming another sub-command.
    """
    data = read_config_file(path)
    options = config_option_map(parser)
    out: dict[str, Any] = {}
    for key, value in data.items():
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
        action = options.get(norm)
        if action is None:
            close = difflib.get_close_matches(norm, list(options), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise CLIError(
                f"config file {path}: unknown key {key!r}, not an option of "
                f"'matryoshka-lora {command}'{hint}"
            )
        if action.dest in out:
            raise CLIError(f"config file {path}: option {key!r} is given twice")
        out[action.dest] = convert_config_value(action, key, value, str(path))
    for group in parser._mutually_exclusive_groups:
        both = [a.dest for a in group._group_actions if out.get(a.dest) is not None]
        if len(both) > 1:
            raise CLIError(
                f"config file {path}: keys {' and '.join(repr(b.replace('_', '-')) for b in both)} "
                "exclude each other; keep one"
            )
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


# ---------------------------------------------------------------------------- devices, dtypes
def resolve_device(spec: str):
    """``auto``: the local CUDA device (``LOCAL_RANK`` under torchrun), else MPS, else CPU."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise CLIError(
            f"--device {spec!r} is not a device (use auto, cpu, cuda, cuda:N, mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {spec} asks for CUDA, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise CLIError(
                f"--device {spec}: there are only {torch.cuda.device_count()} CUDA devices"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError("--device mps asks for Apple MPS, but it is not available here")
    return device


def torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


# ---------------------------------------------------------------------------- models
def model_source(name: str) -> str:
    """Where ``name`` loads from: a packaged folder, an absolute local folder, or a hub id.

    Raises :class:`CLIError` for a local path that does not exist or is not a
    transformers model folder, and for a packaged alias that is not installed.
    """
    from ..assets import ALIASES, resolve_model_path

    key = name.lower()
    hub_ids = {v.lower() for v in ALIASES.values()}
    if key in ALIASES or key in hub_ids:
        try:
            return resolve_model_path(name)
        except FileNotFoundError as err:
            if key in ALIASES:
                raise CLIError(
                    f"packaged model {name!r} is not installed: {one_line(err)}"
                ) from None
            return name  # the hub id itself
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"model {name} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise CLIError(
                f"model folder {name} has no config.json: it is not a transformers model"
            )
        return str(path.resolve())
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or not name.strip():
        raise CLIError(
            f"model {name!r} not found: no such folder, and not a packaged alias "
            f"({', '.join(ALIASES)}) or hub id"
        )
    return name


def load_model(
    name: str,
    task: str = "causal-lm",
    *,
    num_labels: int | None = None,
    dtype: str | None = "auto",
    device=None,
    progress: bool = True,
):
    """Load ``(model, tokenizer)`` for ``task`` (``causal-lm`` or ``seq-cls``).

    The tokenizer gets EOS as pad token if it has none; a sequence classifier
    gets the tokenizer's pad id (it needs one to find each row's last token).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..assets import ALIASES

    source = model_source(name)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if task == "seq-cls":
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise CLIError(f"could not load model {name!r}: {one_line(err)}") from None
    except (ValueError, KeyError) as err:
        kind = "sequence classifier" if task == "seq-cls" else "causal LM"
        raise CLIError(f"could not load {name!r} as a {kind}: {one_line(err)}") from None
    if name.lower() in ALIASES:
        model.config._name_or_path = ALIASES[name.lower()]
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model, tokenizer


# ---------------------------------------------------------------------------- adapters
def locate_adapter(path: str | os.PathLike) -> Path:
    """The adapter folder: ``path/adapter`` for a training output folder, else ``path``.

    Whether ``path`` really is an adapter is left to ``read_adapter_config``,
    whose error names the missing file.
    """
    from ..io import CONFIG_NAME

    p = Path(path)
    if not (p / CONFIG_NAME).is_file() and (p / "adapter" / CONFIG_NAME).is_file():
        return p / "adapter"
    return p


def base_model_name(args_model: str | None, config) -> str:
    if args_model:
        return args_model
    if not config.base_model_name_or_path:
        raise CLIError("the adapter does not record its base model: pass --model")
    return config.base_model_name_or_path


def check_ranks(ranks: Iterable[int], max_rank: int, option: str) -> tuple[int, ...]:
    """Sorted distinct ranks, each in 1..R (a :class:`CLIError` naming the bad one otherwise)."""
    ranks = tuple(sorted(set(ranks)))
    bad = [r for r in ranks if r > max_rank]
    if bad:
        raise CLIError(
            f"{option} {bad[0]} is larger than the adapter's max rank R={max_rank}: "
            f"use ranks in 1..{max_rank}"
        )
    return ranks


def load_records_checked(
    source: str,
    split: str,
    subset: str | None,
    size: int | None,
    seed: int,
    fields: Sequence[str],
    what: str,
):
    """``load_records`` with one-line errors, and every record checked for ``fields``."""
    from ..train.data import DatasetFormatError, load_records

    try:
        records = load_records(source, split, subset=subset, size=size, seed=seed)
    except DatasetFormatError:
        raise
    except ImportError as err:
        raise CLIError(f"dataset {source!r} needs a missing package: {one_line(err)}") from None
    except Exception as err:  # reasoning-gym and datasets raise many types
        raise CLIError(f"could not load dataset {source!r}: {one_line(err)}") from None
    if not records:
        raise DatasetFormatError(f"dataset {source!r} has no records")
    for record in records:
        missing = [f for f in fields if record.fields.get(f) is None]
        if missing:
            raise DatasetFormatError(
                f"{record.origin}: missing field {missing[0]!r} needed by {what} "
                f"(fields present: {sorted(record.fields)})"
            )
    return records
