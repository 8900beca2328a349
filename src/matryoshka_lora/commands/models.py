"""Where a base model comes from, how it loads, and on which device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

from .errors import CLIError, one_line

Dtype = Literal["auto", "float32", "bfloat16", "float16"]  # auto: as stored in the checkpoint
DTYPES: tuple[str, ...] = get_args(Dtype)
Quantization = Literal["4bit", "8bit"]  # bitsandbytes: NF4 with double quantisation; LLM.int8


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


def require_bitsandbytes(bits: Quantization) -> None:
    """Raise :class:`CLIError` if bitsandbytes, which ``--load-in-<bits>`` needs, is missing."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise CLIError(
            f"--load-in-{bits} needs bitsandbytes: pip install 'matryoshka-lora[quantisation]'"
        )


def quantization_config(bits: Quantization, compute_dtype: str | None = None):
    """transformers' ``BitsAndBytesConfig`` of a QLoRA base: 4-bit NF4 with double
    quantisation computing in ``compute_dtype`` (default float32), or LLM.int8.

    Raises :class:`CLIError` if bitsandbytes is not installed.
    """
    require_bitsandbytes(bits)
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype or "float32"),
    )


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
    quantization: Quantization | None = None,
):
    """Load ``(model, tokenizer)`` for ``task`` (``causal-lm`` or ``seq-cls``) on ``device``.

    :func:`matryoshka_lora.assets.load_pretrained` with the command line's
    checks of ``name`` (:func:`model_source`) and one-line errors. With
    ``quantization`` the linear layers load quantized by bitsandbytes
    (:func:`quantization_config`, computing in ``dtype``) straight onto ``device``.
    """
    from ..assets import load_pretrained

    source = model_source(name)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    extra = {}
    if quantization is not None:
        compute = dtype if dtype not in (None, "auto") else "float32"
        extra["quantization_config"] = quantization_config(quantization, compute)
        extra["device_map"] = {"": device if device is not None else "cpu"}
    try:
        model, tokenizer = load_pretrained(
            name, task, num_labels=num_labels, dtype=torch_dtype(dtype), source=source, **extra
        )
    except OSError as err:
        raise CLIError(f"could not load model {name!r}: {one_line(err)}") from None
    except (ValueError, KeyError) as err:
        kind = "sequence classifier" if task == "seq-cls" else "causal LM"
        raise CLIError(f"could not load {name!r} as a {kind}: {one_line(err)}") from None
    if device is not None and quantization is None:  # a quantized model loads on its device
        model.to(device)
    return model, tokenizer
