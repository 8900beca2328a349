"""Native adapter save/load: ``adapter_config.json`` + ``adapter.safetensors``.

No pickles. Each file is written to a temporary name in the target folder,
flushed to disk and renamed over the old one (``os.replace`` is atomic), weights
first and config last. The config records the SHA-256 of the weights file, so a
truncated copy or flipped bytes are detected at load time instead of silently
loading wrong weights. While a save replaces the weights of an existing adapter,
the old weights stay reachable under a second name (a hard link) until the new
config is in place: a process killed between the two renames leaves the previous
adapter loadable, and the next save removes what the killed one left behind.

The weights file's metadata records the config too. ``adapter_config.json`` is
checked against it at every load: the fields that define the trained function
must agree, and only the fields of
:data:`EDITABLE_FIELDS` (how the adapter is deployed and described) may be
edited by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ._peft_type import PEFT_TYPE_NAME
from ._version import __version__
from .config import NestedLoraConfig
from .model import adapter_layers, adapter_state_dict, attach, detach, get_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_NAME = "matryoshka-lora"
FORMAT_VERSION = 1
PREVIOUS_WEIGHTS_NAME = f".{WEIGHTS_NAME}.previous"
# Fields that define the trained function; a checkpoint and a model must agree on them.
_IDENTITY_FIELDS = (
    "r",
    "method",
    "train_ranks",
    "scaling",
    "alpha",
    "normalize",
    "target_modules",
    "modules_to_save",
)
# Fields of adapter_config.json a user may edit: the deployed scale rule, the ranks to
# evaluate and the base model's name. Every other field must equal the weights' record.
EDITABLE_FIELDS = ("inference_scale", "eval_ranks", "base_model_name_or_path")


@contextmanager
def staged_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir``; rename it to ``out_dir`` on success.

    Refuses (``ValueError``, before anything is written) an ``out_dir`` that is a
    file, or a non-empty folder unless ``overwrite``. On any error the temporary
    folder is removed and ``out_dir`` is left as it was.
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise ValueError(
                f"{out} exists and is not empty: pass overwrite=True to replace it, or choose "
                "another folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.old"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class AdapterCheckpointError(ValueError):
    """A saved adapter is missing, corrupted, or does not fit the model."""


def _fsync_write(path: Path, write) -> None:
    """Write via ``write(tmp_path)`` in a scratch folder beside ``path``, fsync, rename over it.

    The scratch folder (``.<name>.<random>.tmp``) also holds whatever temporary
    files the writer makes itself (safetensors writes through its own ``.tmp*``
    file), so a killed write leaves one removable folder and never a stray file.
    """
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = scratch / path.name
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    _fsync_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Atomically write ``tensors`` (made contiguous, on CPU) as a safetensors file."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _fsync_write(Path(path), lambda tmp: save_file(cpu, tmp, metadata=metadata))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _module_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "base_type": type(layer.base_layer).__name__,
        }
        for name, layer in adapter_layers(model).items()
    }


def _remove_leftover_temporaries(directory: Path) -> None:
    """Remove the temporary files a killed save left in ``directory``."""
    for name in (f".{WEIGHTS_NAME}.", f".{CONFIG_NAME}."):
        for leftover in directory.glob(f"{name}*.tmp"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _described_by_config(directory: Path, weights: Path) -> bool:
    """Whether ``weights`` is the file whose SHA-256 ``adapter_config.json`` records."""
    try:
        payload = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        expected = payload.get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return False
    return expected is not None and weights.is_file() and file_sha256(weights) == expected


def _keep_loadable_weights(directory: Path) -> None:
    """Before the weights are replaced: keep the ones the config describes as ``previous``.

    Normally those are the current weights, linked under the second name (a hard
    link, else a copy). After an interrupted save they already are ``previous``
    (the current ones are the orphan of that save) and stay as they are.
    """
    weights, previous = directory / WEIGHTS_NAME, directory / PREVIOUS_WEIGHTS_NAME
    if _described_by_config(directory, previous):
        return
    previous.unlink(missing_ok=True)
    if weights.is_file():
        try:
            os.link(weights, previous)
        except OSError:
            shutil.copyfile(weights, previous)


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the model's adapter: config, A/B tensors and the ``modules_to_save``
    parameters (a classifier head), never the frozen base weights.

    ``directory`` is a folder (created if needed); files other than the adapter's
    two are left alone, so a training checkpoint can hold the adapter beside its
    optimizer state.
    """
    config = get_config(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(
            f"{directory} is a file, not a folder: save_adapter writes {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} into a folder; pass a folder path (it is created if needed)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    _remove_leftover_temporaries(directory)
    tensors = adapter_state_dict(model)  # A, B and the modules_to_save
    weights_path = directory / WEIGHTS_NAME
    previous = directory / PREVIOUS_WEIGHTS_NAME
    _keep_loadable_weights(directory)
    try:
        atomic_save_safetensors(
            tensors, weights_path, metadata={"format": FORMAT_NAME, "config": config.to_json()}
        )
        payload = {
            # PEFT recognises the folder by this key; matryoshka_lora.peft registers it
            "peft_type": PEFT_TYPE_NAME,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            **config.to_dict(),
            "modules": _module_table(model),
            "weights_file": WEIGHTS_NAME,
            "weights_sha256": file_sha256(weights_path),
        }
        atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True))
    except BaseException:
        if _described_by_config(directory, weights_path):  # the previous copy is not needed
            previous.unlink(missing_ok=True)
        raise
    previous.unlink(missing_ok=True)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> tuple[NestedLoraConfig, dict[str, Any]]:
    """Parse and validate ``adapter_config.json``; returns the config and the raw payload.

    The config is checked against the one recorded in the weights file (when the
    weights are there): a field outside :data:`EDITABLE_FIELDS` that differs is
    refused with an :class:`AdapterCheckpointError` naming it and both values.
    """
    config, payload, _ = _read_verified(Path(directory))
    return config, payload


def _read_verified(directory: Path) -> tuple[NestedLoraConfig, dict[str, Any], Path | None]:
    """The config, the payload and the weights file that matches them (None if absent)."""
    config, payload = _parse_config_file(directory)
    weights = _matching_weights_file(directory, payload)
    if weights is not None:
        _check_against_weights_record(config, weights, directory)
    return config, payload, weights


def _parse_config_file(directory: Path) -> tuple[NestedLoraConfig, dict[str, Any]]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterCheckpointError(
            f"{path} not found: {directory} is not a saved matryoshka-lora adapter"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterCheckpointError(
            f"{path} is corrupted (not valid JSON: {err}); re-save the adapter"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise AdapterCheckpointError(
            f"{path} is not a matryoshka-lora adapter config (format={payload.get('format') if isinstance(payload, dict) else None!r}); "
            "a PEFT LoRA folder loads with peft.PeftModel.from_pretrained"
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterCheckpointError(
            f"{path} has format version {payload['format_version']}, newer than this library supports "
            f"({FORMAT_VERSION}); upgrade matryoshka-lora"
        )
    return _config_from_fields(payload, path), payload


def _config_from_fields(fields: dict[str, Any], origin: Path) -> NestedLoraConfig:
    known = {k: v for k, v in fields.items() if k in NestedLoraConfig.__dataclass_fields__}
    try:
        return NestedLoraConfig.from_dict(known)
    except (ValueError, TypeError) as err:
        raise AdapterCheckpointError(f"{origin} holds an invalid config: {err}") from err


def _matching_weights_file(directory: Path, payload: dict[str, Any]) -> Path | None:
    """The weights file whose SHA-256 is the one the config records.

    That is the weights file itself, or, after a save killed between replacing
    the weights and replacing the config, the previous weights it kept.
    """
    path = directory / payload.get("weights_file", WEIGHTS_NAME)
    if not path.is_file():
        return None
    expected = payload.get("weights_sha256")
    if expected is None or file_sha256(path) == expected:
        return path
    previous = directory / PREVIOUS_WEIGHTS_NAME
    if previous.is_file() and file_sha256(previous) == expected:
        warnings.warn(
            f"a save into {directory} was interrupted before its config was written: "
            "loading the previous adapter, which the config describes",
            stacklevel=4,
        )
        return previous
    raise AdapterCheckpointError(
        f"{path} is corrupted or truncated (SHA-256 differs from the one recorded in {CONFIG_NAME}); "
        "restore it from a good copy or re-save the adapter"
    )


def _check_against_weights_record(config: NestedLoraConfig, weights: Path, directory: Path) -> None:
    """Refuse a hand-edited field of ``adapter_config.json`` that changes the adapter."""
    try:
        with safe_open(weights, framework="pt") as handle:
            recorded = (handle.metadata() or {}).get("config")
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterCheckpointError(
            f"{weights} could not be read as safetensors ({err}); the file is corrupted"
        ) from err
    if recorded is None:
        return  # written without a record: nothing to compare against
    saved = _config_from_fields(json.loads(recorded), weights).to_dict()
    edited = config.to_dict()
    differences = [
        f"{field}: {CONFIG_NAME} says {edited[field]!r}, the weights were saved with {saved[field]!r}"
        for field in edited
        if field not in EDITABLE_FIELDS and edited[field] != saved[field]
    ]
    if differences:
        raise AdapterCheckpointError(
            f"{directory / CONFIG_NAME} does not match the config recorded with its weights "
            f"({'; '.join(differences)}). Only {', '.join(EDITABLE_FIELDS)} may be edited; "
            "restore the other fields, or re-save the adapter from a model attached with the new config"
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterCheckpointError(
            f"{path} could not be read as safetensors ({err}); the file is corrupted"
        ) from err


def read_adapter(
    directory: str | os.PathLike,
) -> tuple[NestedLoraConfig, dict[str, torch.Tensor]]:
    """The verified config and tensors (``<module path>.lora_A`` / ``.lora_B``) of a saved
    adapter, without a model: what :func:`load_adapter` reads."""
    directory = Path(directory)
    config, payload, weights = _read_verified(directory)
    if weights is None:
        missing = directory / payload.get("weights_file", WEIGHTS_NAME)
        raise AdapterCheckpointError(f"{missing} not found: the adapter folder is incomplete")
    return config, _read_weights(weights)


def _config_differences(saved: NestedLoraConfig, current: NestedLoraConfig) -> list[str]:
    return [
        f"{field}: checkpoint {getattr(saved, field)!r} vs model {getattr(current, field)!r}"
        for field in _IDENTITY_FIELDS
        if getattr(saved, field) != getattr(current, field)
    ]


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into ``model``, attaching it first if the model has none.

    Refuses, with an :class:`AdapterCheckpointError` that lists what differs, a
    checkpoint whose config (R, S, scaling, alpha, normalize, method, targets),
    module names or shapes do not match the model, and an ``adapter_config.json``
    edited outside :data:`EDITABLE_FIELDS` (see :func:`read_adapter_config`).
    """
    directory = Path(directory)
    saved_config, tensors = read_adapter(directory)
    attached_here = not adapter_layers(model)
    if not attached_here:
        diffs = _config_differences(saved_config, get_config(model))
        if diffs:
            raise AdapterCheckpointError(
                f"adapter in {directory} was trained with another config than the model's adapter: "
                + "; ".join(diffs)
            )
    else:
        try:
            attach(model, saved_config)
        except (ValueError, TypeError) as err:
            raise AdapterCheckpointError(
                f"adapter in {directory} does not fit this model ({type(model).__name__}): {err}"
            ) from err
    saved_base = saved_config.base_model_name_or_path
    current_base = get_config(model).base_model_name_or_path
    if saved_base and current_base and saved_base != current_base:
        warnings.warn(
            f"adapter in {directory} was trained on {saved_base!r}, loading into {current_base!r}",
            stacklevel=2,
        )
    try:
        _copy_tensors(model, tensors, directory)
    except AdapterCheckpointError:
        if attached_here:
            detach(model)  # leave the model as it was given
        raise
    return model


def _copy_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing from the checkpoint (e.g. {missing[:3]})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} checkpoint tensors have no module in the model (e.g. {unexpected[:3]})"
        )
    shapes = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
        for k, p in expected.items()
        if k in tensors and tensors[k].shape != p.shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    if problems:
        raise AdapterCheckpointError(
            f"adapter in {directory} does not fit this model ({type(model).__name__}), "
            "it was saved from another architecture or config: " + "; ".join(problems)
        )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))
