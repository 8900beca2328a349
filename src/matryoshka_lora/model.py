"""Whole-model operations: attach, detach, set rank, merge, parameter summary."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .config import NestedLoraConfig
from .layer import NestedAdapter, wrappable_types
from .nesting import check_rank
from .quantized import adapter_layer, mark_adapters_loaded, unmark_adapters_loaded

CONFIG_ATTRIBUTE = "nested_lora_config"
REQUIRES_GRAD_ATTRIBUTE = "_nested_lora_original_requires_grad"


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _describe_targets(targets: list[str] | str) -> str:
    return f"regex {targets!r}" if isinstance(targets, str) else f"target_modules {targets}"


def _linear_suffixes(model: nn.Module) -> list[str]:
    types = wrappable_types()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, types) and name
        }
    )


def adapter_layers(model: nn.Module) -> dict[str, NestedAdapter]:
    """All nested adapters in ``model`` by module path, found by protocol."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NestedAdapter)}


def require_adapters(model: nn.Module, unmerged: bool = False) -> dict[str, NestedAdapter]:
    """:func:`adapter_layers`, refusing a model without adapters (and, if ``unmerged``,
    one whose adapters are merged) with a message that names the fix."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no nested-LoRA adapter: call attach(model, config) first")
    merged = [n for n, layer in layers.items() if unmerged and getattr(layer, "merged", False)]
    if merged:
        raise RuntimeError(f"{len(merged)} adapters are merged: call unmerge(model) first")
    return layers


def get_config(model: nn.Module) -> NestedLoraConfig:
    """The config the model's adapters were attached with."""
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError("the model has no nested-LoRA adapter: call attach(model, config) first")
    return config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def attach(model: nn.Module, config: NestedLoraConfig | None = None, **overrides) -> nn.Module:
    """Wrap every target module of ``model`` with a :class:`~.layer.NestedLoraLinear`, in place.

    Targets are module-name suffixes (``"q_proj"``) or one regex matched against
    the full name. All parameters outside the adapters are frozen, except those of
    ``config.modules_to_save`` (trained in full and saved with the adapter). Raises
    ``ValueError`` if nothing matches and ``TypeError`` if a match is a module
    type that cannot be wrapped. Returns ``model``.
    """
    config = NestedLoraConfig() if config is None else config
    if overrides:
        config = config.replace(**overrides)
    if adapter_layers(model):
        raise ValueError(
            "the model already has nested-LoRA adapters: detach(model) before attaching again"
        )
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        config = config.replace(base_model_name_or_path=name)
    types = wrappable_types()
    matched = [(n, m) for n, m in model.named_modules() if n and _matches(n, config.target_modules)]
    if not matched:
        raise ValueError(
            f"{_describe_targets(config.target_modules)} matched no module of {type(model).__name__}; "
            f"wrappable module names in this model: {_linear_suffixes(model)}"
        )
    bad = [(n, type(m).__name__) for n, m in matched if not isinstance(m, types)]
    if bad:
        raise TypeError(
            f"{_describe_targets(config.target_modules)} matched modules that cannot be wrapped "
            f"(only nn.Linear and Conv1D can): {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
            "narrow the targets"
        )
    original_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in matched:
        _set_submodule(model, name, adapter_layer(module, config))  # bitsandbytes: quantized.py
    saved = _modules_to_save(model, config)
    for module in saved.values():
        module.requires_grad_(True)
    setattr(model, CONFIG_ATTRIBUTE, config)
    setattr(model, REQUIRES_GRAD_ATTRIBUTE, original_requires_grad)
    mark_adapters_loaded(model)  # a quantized base: transformers' Trainer accepts it
    return model


def _modules_to_save(model: nn.Module, config: NestedLoraConfig) -> dict[str, nn.Module]:
    """The modules ``config.modules_to_save`` names, by full name (refused if none matches)."""
    if not config.modules_to_save:
        return {}
    found = {
        n: m
        for n, m in model.named_modules()
        if n and _matches(n, config.modules_to_save) and not isinstance(m, NestedAdapter)
    }
    if not found:
        raise ValueError(
            f"modules_to_save {config.modules_to_save} matched no module of "
            f"{type(model).__name__}: name a module of it (e.g. a classifier head 'score' or "
            "'classifier'), or leave modules_to_save unset"
        )
    return found


def saved_module_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the ``modules_to_save`` modules, keyed ``<module path>.<name>``."""
    return {
        f"{name}.{key}": param
        for name, module in _modules_to_save(model, get_config(model)).items()
        for key, param in module.named_parameters()
    }


def _unwrap_all(model: nn.Module) -> None:
    """Swap every adapter for its base module and restore the original requires_grad flags."""
    for name, layer in adapter_layers(model).items():
        _set_submodule(model, name, layer.base_layer)
    flags = getattr(model, REQUIRES_GRAD_ATTRIBUTE, {})
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
    for attribute in (CONFIG_ATTRIBUTE, REQUIRES_GRAD_ATTRIBUTE):
        if hasattr(model, attribute):
            delattr(model, attribute)
    unmark_adapters_loaded(model)


def detach(model: nn.Module) -> nn.Module:
    """Put the original base modules back (the same objects, untouched), in place.

    Refuses a merged model, whose base weights hold the update: ``unmerge`` first.
    The ``requires_grad`` flags ``attach`` changed are restored.
    """
    layers = require_adapters(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise RuntimeError(
            f"{len(merged)} adapters are merged into their base weights: call unmerge(model) first"
        )
    _unwrap_all(model)
    return model


def set_rank(model: nn.Module, rank: int | None) -> None:
    """Deploy every adapter at ``rank`` (None: the full training function)."""
    layers = require_adapters(model)
    if rank is not None:
        check_rank(rank, min(m.max_rank for m in layers.values()))
    for layer in layers.values():
        layer.set_rank(rank)


def get_rank(model: nn.Module) -> int | None:
    """The active rank shared by all adapters (None: full training function)."""
    ranks = {m.active_rank for m in require_adapters(model).values()}
    if len(ranks) != 1:
        raise ValueError(f"adapters are at different ranks {sorted(ranks, key=str)}")
    return ranks.pop()


@contextmanager
def at_rank(model: nn.Module, rank: int | None) -> Iterator[nn.Module]:
    """Temporarily deploy every adapter at ``rank``; restores each layer's previous rank."""
    layers = require_adapters(model)
    previous = {name: layer.active_rank for name, layer in layers.items()}
    set_rank(model, rank)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.set_rank(previous[name])


def set_example_ranks(model: nn.Module, ranks: torch.Tensor | Sequence[int] | None) -> None:
    """Give each example of the batch its own rank (a mixed-rank batch); None turns it off."""
    layers = require_adapters(model)
    if ranks is not None:
        ranks = torch.as_tensor(ranks)
    for layer in layers.values():
        layer.set_example_ranks(ranks)


@contextmanager
def mixed_ranks(model: nn.Module, ranks: torch.Tensor | Sequence[int]) -> Iterator[nn.Module]:
    """Run batches whose example i is served at rank ``ranks[i]``."""
    set_example_ranks(model, ranks)
    try:
        yield model
    finally:
        set_example_ranks(model, None)


def set_sampled_rank(model: nn.Module, rank: int | None) -> None:
    """Set DyLoRA's sampled prefix ``b`` on every adapter (one b shared by all layers)."""
    for layer in require_adapters(model).values():
        layer.set_sampled_rank(rank)


def set_inference_scale(model: nn.Module, inference_scale: str) -> None:
    """Use ``paper`` (s(r)) or ``trained`` (p[:r]) scales for active ranks."""
    for layer in require_adapters(model).values():
        layer.set_inference_scale(inference_scale)
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is not None:
        setattr(model, CONFIG_ATTRIBUTE, config.replace(inference_scale=inference_scale))


def reconfigure(model: nn.Module, **changes) -> NestedLoraConfig:
    """Change scale-defining fields (method, scaling, alpha, normalize, train/eval ranks,
    inference scale) of every adapter in place, keeping A and B.

    R and the targets cannot change (they define the tensors). Returns the new config.
    """
    frozen = {"r", "target_modules"} & set(changes)
    if frozen:
        raise ValueError(
            f"reconfigure cannot change {sorted(frozen)}: they define the adapter tensors"
        )
    config = get_config(model).replace(**changes)
    for layer in require_adapters(model).values():
        layer.apply_scale_config(config)
    setattr(model, CONFIG_ATTRIBUTE, config)
    return config


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the frozen base model alone (the rank-0 reference)."""
    layers = require_adapters(model).values()
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


def merge(model: nn.Module, rank: int | None = None) -> nn.Module:
    """Fold the rank-``rank`` adapter into every base weight (None: each layer's active rank)."""
    layers = require_adapters(model)
    if rank is not None:
        check_rank(rank, min(m.max_rank for m in layers.values()))
    for layer in layers.values():
        layer.merge(rank)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged update from its base weight."""
    for layer in require_adapters(model).values():
        layer.unmerge()
    return model


def merge_and_detach(model: nn.Module, rank: int | None = None) -> nn.Module:
    """Merge at ``rank`` and return a plain model (no adapter modules left)."""
    merge(model, rank)
    _unwrap_all(model)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter tensors keyed ``<module path>.lora_A`` / ``.lora_B``, and the parameters of
    the ``modules_to_save`` modules (``<module path>.<name>``): everything a save holds."""
    return {
        **{
            f"{name}.{key}": tensor
            for name, layer in require_adapters(model).items()
            for key, tensor in layer.adapter_parameters().items()
        },
        **saved_module_state(model),
    }


@dataclass(frozen=True)
class ParameterSummary:
    trainable: int
    total: int
    adapter: int
    adapter_per_rank: dict[int, int]

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        per_rank = ", ".join(f"r={r}: {n:,}" for r, n in self.adapter_per_rank.items())
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f} || deployed adapter params per rank: {per_rank}"
        )


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Trainable/total counts and the size of the deployed adapter at each eval rank."""
    layers = require_adapters(model)
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    ranks = config.eval_ranks if config is not None else (max(m.max_rank for m in layers.values()),)
    per_rank = {
        r: sum(r * (m.in_features + m.out_features) for m in layers.values()) for r in ranks
    }
    params = list(model.parameters())
    adapter = sum(p.numel() for m in layers.values() for p in m.adapter_parameters().values())
    return ParameterSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        adapter=adapter,
        adapter_per_rank=per_rank,
    )


def print_trainable_parameters(model: nn.Module) -> None:
    print(parameter_summary(model))
