"""TRL integration: ``trl.SFTTrainer`` training a nested adapter (``pip install 'matryoshka-lora[trl]'``).

:class:`NestedSFTTrainer` is ``SFTTrainer`` with :class:`~matryoshka_lora.train.hf_trainer.NestedLoraMixin`
in front: TRL prepares the data (tokenisation, prompt-completion and chat
formats, completion-only loss, packing) and computes the token loss; the mixin
gives the adapter's own objective (prefix loss, DyLoRA / prefix sampling per
micro-batch), adapter-only checkpoints reloaded on resume, and the rank curve at
every evaluation. The model comes with its adapter attached
(``matryoshka_lora.attach``) and ``peft_config=None``.

TRL applies two settings to PEFT models only, and this class to a nested
adapter too: the input embeddings' output requires grad under gradient
checkpointing (``SFTConfig`` turns checkpointing on by default; the embedding is
frozen), and under DeepSpeed ZeRO-3 the checkpointing is reentrant.

With the prefix loss, one micro-batch runs the model once per rank of
``S'`` (the ranks drawn for it). ``SFTTrainer`` records its training metrics
(``mean_token_accuracy``, ``entropy``, ``num_tokens``) at every such forward;
this class keeps those of the full adapter (rank R, the last forward) and counts
the micro-batch's tokens once, so the logged values mean what they mean in TRL.
"""

from __future__ import annotations

import warnings

from torch import nn

try:
    from trl import SFTTrainer
except ImportError as error:  # an optional extra
    raise ImportError(
        "matryoshka_lora.train.trl needs TRL: pip install 'matryoshka-lora[trl]'"
    ) from error

from .hf_trainer import NestedLoraMixin


class NestedSFTTrainer(NestedLoraMixin, SFTTrainer):
    """``trl.SFTTrainer`` for a model with a nested-LoRA adapter attached.

    Takes ``SFTTrainer``'s arguments (``peft_config`` must be None: the adapter
    is ``matryoshka_lora.attach``'s) and the mixin's ``objective``,
    ``rank_eval``, ``eval_ranks`` and ``rank_eval_metrics``.
    """

    def __init__(self, *args, peft_config=None, **kwargs) -> None:
        if peft_config is not None:
            raise ValueError(
                "NestedSFTTrainer trains the nested adapter attached with matryoshka_lora.attach: "
                "pass peft_config=None (a PEFT LoRA can become one with matryoshka_lora.export.import_peft)"
            )
        super().__init__(*args, **kwargs)
        use_reentrant_under_zero3(self.args)

    def compute_loss(self, model: nn.Module, inputs, return_outputs: bool = False, **kwargs):
        """The mixin's loss; TRL's per-forward metrics kept for the full adapter only."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        metrics = self._metrics["train"]
        lengths = {key: len(values) for key, values in metrics.items()}
        tokens_before = self._total_train_tokens
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        forwards = len(metrics["mean_token_accuracy"]) - lengths.get("mean_token_accuracy", 0)
        for key, values in metrics.items():
            if key != "num_tokens" and len(values) - lengths.get(key, 0) > 1:
                del values[lengths.get(key, 0) : -1]  # keep the last forward's: rank R
        if forwards > 1:
            self._total_train_tokens = (
                tokens_before + (self._total_train_tokens - tokens_before) // forwards
            )
            metrics["num_tokens"] = [self._total_train_tokens]
        return result


def use_reentrant_under_zero3(args) -> None:
    """Reentrant gradient checkpointing under DeepSpeed ZeRO-3, as TRL sets for PEFT models.

    Trainable adapters on frozen ZeRO-3-partitioned weights need reentrant
    checkpointing (huggingface/trl#2514); the checkpointing kwargs are read when
    training starts, so setting them after construction applies.
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None or getattr(plugin, "zero_stage", None) != 3:
        return
    # transformers >= 5 reads activation_checkpointing*; gradient_checkpointing* are its aliases
    names = [n for n in ("activation_checkpointing", "gradient_checkpointing") if hasattr(args, n)]
    if not any(getattr(args, name) for name in names):
        return
    kwargs_names = [f"{name}_kwargs" for name in names]
    settings = dict(next((getattr(args, n) for n in kwargs_names if getattr(args, n, None)), {}))
    if settings.get("selective"):
        raise ValueError(
            "gradient_checkpointing_kwargs={'selective': True} needs non-reentrant checkpointing, "
            "which DeepSpeed ZeRO-3 with trainable adapters does not support"
        )
    if settings.get("use_reentrant") is False:
        warnings.warn(
            "DeepSpeed ZeRO-3 with adapters needs reentrant gradient checkpointing: "
            "use_reentrant=False is replaced by True",
            stacklevel=3,
        )
    settings["use_reentrant"] = True
    for name in kwargs_names:
        setattr(args, name, dict(settings))


__all__ = ["NestedSFTTrainer", "use_reentrant_under_zero3"]
