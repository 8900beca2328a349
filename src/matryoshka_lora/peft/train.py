"""The SVD re-basis of PEFT-hosted nested adapters (the default recipe's last step).

The default recipe trains LoRA at R and, once training ends, re-bases each layer's
factors on the SVD of its update ``dW = B diag(p) A`` (:func:`matryoshka_lora.svd.rebased_factors`,
``docs/method.md`` §5): the full-rank function is unchanged and every prefix
``B'[:, :r] diag(p[:r]) A'[:r]`` becomes the best rank-r approximation of dW, so the
saved adapter deploys at every rank with its trained scales.

:class:`~matryoshka_lora.peft.objective.SvdRebaseCallback` runs it in ``on_train_end`` of
any transformers ``Trainer`` (TRL's included), without subclassing it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..svd import rebased_factors
from .model import _require_layers


def svd_rebase_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Re-base every nested adapter of ``model`` on the SVD of its full update, in place.

    Afterwards each adapter deploys with the trained scales (``inference_scale="trained"``)
    and a DyLoRA adapter is the ``lora`` adapter of the same full-rank function (p = s(R));
    ``model.peft_config`` records both, so a save describes the new factors.
    ``optimizer``: the state of the re-based parameters is dropped (Adam's moments
    belong to the old basis). Under ``torch.distributed`` process 0's factors are
    broadcast. Refuses merged adapters.
    """
    layers = _require_layers(model)
    merged = [name for name, layer in layers.items() if layer.merged_rank]
    if merged:
        raise RuntimeError(f"adapters are merged in {merged[:3]}: unmerge them first")
    broadcast = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    state = getattr(optimizer, "optimizer", optimizer).state if optimizer is not None else None
    changed: dict[str, dict[str, str]] = {}
    with torch.no_grad():
        for layer in layers.values():
            for name in list(layer.nested):
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                new_a, new_b = rebased_factors(a, b, layer.scale_vector(name, None))
                a.copy_(new_a)
                b.copy_(new_b)
                if broadcast:
                    dist.broadcast(a.data, src=0)
                    dist.broadcast(b.data, src=0)
                if state is not None:
                    state.pop(a, None)
                    state.pop(b, None)
                changes = {"inference_scale": "trained"}
                if layer.nested[name].method == "dylora":
                    changes["method"] = "lora"  # DyLoRA's full function is LoRA's: p = s(R)
                layer.reconfigure(name, **changes)
                changed[name] = changes
    for name, changes in changed.items():
        config = getattr(model, "peft_config", {}).get(name)
        for key, value in changes.items():
            if config is not None:
                setattr(config, key, value)
    return model
