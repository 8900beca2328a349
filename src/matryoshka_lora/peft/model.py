"""The tuner (``MatryoshkaLoraModel``) and the rank of nested adapters in any model.

The rank functions take any module holding nested PEFT layers: a ``PeftModel``, its
``LoraModel``, or a transformers model that loaded the adapter with
``model.load_adapter``. On a ``PeftModel`` the same operations are methods
(``peft_model.set_rank(4)``, ``with peft_model.at_rank(4): ...``), which PEFT
forwards to the tuner.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ._registry import PREFIX
from .layer import NestedLoraLayerMixin, layer_class_for


def nested_layers(model: nn.Module) -> dict[str, NestedLoraLayerMixin]:
    """The nested PEFT layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NestedLoraLayerMixin)}


def _require_layers(model: nn.Module) -> dict[str, NestedLoraLayerMixin]:
    layers = nested_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} holds no MatryoshkaLoraConfig adapter: create one with "
            "peft.get_peft_model(model, MatryoshkaLoraConfig(...)) or load one"
        )
    return layers


def _names(adapter_name: str | list[str] | None) -> list[str] | None:
    return [adapter_name] if isinstance(adapter_name, str) else adapter_name


def set_rank(
    model: nn.Module, rank: int | None, adapter_name: str | list[str] | None = None
) -> None:
    """Deploy rank ``rank`` (None: the full training function) for the named adapters
    (default: the active ones) in every nested layer; checked everywhere before any changes."""
    layers = _require_layers(model).values()
    names = _names(adapter_name)
    previous = [(layer, dict(layer.active_rank)) for layer in layers]
    try:
        for layer in layers:
            layer.set_rank(rank, names)
    except Exception:
        for layer, ranks in previous:
            layer.active_rank.update(ranks)
        raise


def get_rank(model: nn.Module, adapter_name: str | None = None) -> int | None:
    """The deployed rank of the named (default: active) adapter; None = full training function."""
    ranks = {
        layer.active_rank[name]
        for layer in _require_layers(model).values()
        for name in layer._nested_adapters(_names(adapter_name))
    }
    if len(ranks) > 1:
        raise ValueError(f"the layers are at different ranks {sorted(ranks, key=str)}")
    return next(iter(ranks), None)


@contextmanager
def at_rank(
    model: nn.Module, rank: int | None, adapter_name: str | list[str] | None = None
) -> Iterator[nn.Module]:
    """Within the block the named adapters are deployed at ``rank``; each layer's previous
    rank comes back on exit."""
    layers = _require_layers(model).values()
    previous = [(layer, dict(layer.active_rank)) for layer in layers]
    set_rank(model, rank, adapter_name)
    try:
        yield model
    finally:
        for layer, ranks in previous:
            if not layer.merged_rank:
                layer.active_rank.update(ranks)


def set_sampled_rank(
    model: nn.Module, rank: int | None, adapter_name: str | list[str] | None = None
) -> None:
    """Train the prefix b = ``rank`` at its deployed scales in every layer (None: full rank).

    A training objective sets it per micro-batch (DyLoRA's drawn b, a drawn prefix).
    """
    for layer in _require_layers(model).values():
        layer.set_sampled_rank(rank, _names(adapter_name))


class MatryoshkaLoraModel(LoraModel):
    """PEFT's ``LoraModel`` whose layers compute the nested adapter; parameters keep
    LoRA's names (``lora_A``, ``lora_B``) so a rank-r export is a plain PEFT LoRA."""

    prefix: str = PREFIX
    # a training objective's run (matryoshka_lora.peft.objective.ObjectiveCallback sets it):
    # while training, it plans and runs each forward
    objective_run: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.objective_run is None or not self.training:
            return super().forward(*args, **kwargs)
        return self.objective_run.forward(partial(LoraModel.forward, self, *args, **kwargs))

    @staticmethod
    def _create_new_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any):
        if kwargs.get("parameter_name") is not None:
            raise ValueError(
                "MatryoshkaLoraConfig adapts modules, not parameters: leave target_parameters unset"
            )
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        return layer_class_for(base)(target, adapter_name, config=lora_config, **kwargs)

    def set_rank(self, rank: int | None, adapter_name: str | list[str] | None = None) -> None:
        """Deploy rank ``rank`` (None: the full training function); see :func:`set_rank`."""
        set_rank(self.model, rank, adapter_name)

    def get_rank(self, adapter_name: str | None = None) -> int | None:
        """The deployed rank (None: the full training function)."""
        return get_rank(self.model, adapter_name)

    @contextmanager
    def at_rank(
        self, rank: int | None, adapter_name: str | list[str] | None = None
    ) -> Iterator[nn.Module]:
        """``with peft_model.at_rank(4): ...``: the block runs the rank-4 adapter."""
        with at_rank(self.model, rank, adapter_name):
            yield self

    def set_sampled_rank(
        self, rank: int | None, adapter_name: str | list[str] | None = None
    ) -> None:
        """Train the drawn prefix b = ``rank`` (None: full rank); see :func:`set_sampled_rank`."""
        set_sampled_rank(self.model, rank, adapter_name)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "add_weighted_adapter combines the factors of plain LoRA adapters and ignores P: "
            "export each nested adapter at a rank (matryoshka_lora.peft.export_rank) and "
            "combine those plain LoRA adapters instead"
        )
