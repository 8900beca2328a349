"""TRL integration: ``trl.SFTTrainer`` training a nested adapter (``pip install 'matryoshka-lora[trl]'``).

:class:`NestedSFTTrainer` is ``SFTTrainer`` with :class:`~matryoshka_lora.train.hf_trainer.NestedLoraMixin`
in front: TRL prepares the data (tokenisation, prompt-completion and chat
formats, completion-only loss, packing) and computes the token loss; the mixin
gives the adapter's own objective (prefix loss, DyLoRA / prefix sampling per
micro-batch), adapter-only checkpoints reloaded on resume, and the rank curve at
every evaluation. The model comes with its adapter attached
(``matryoshka_lora.attach``) and ``peft_config=None``.

TRL makes the input embeddings require grad under gradient checkpointing
(``SFTConfig`` turns checkpointing on by default) only for PEFT models; the
mixin does the same for a nested adapter, since the embedding is frozen.

With the prefix loss, one micro-batch runs the model once per rank of
``S'`` (the ranks drawn for it). ``SFTTrainer`` records its training metrics
(``mean_token_accuracy``, ``entropy``, ``num_tokens``) at every such forward;
this class keeps those of the full adapter (rank R, the last forward) and counts
the micro-batch's tokens once, so the logged values mean what they mean in TRL.
"""

from __future__ import annotations

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
    is ``matryoshka_lora.attach``'s) and the mixin's ``rank_sampler``,
    ``rank_eval``, ``eval_ranks`` and ``rank_eval_metrics``.
    """

    def __init__(self, *args, peft_config=None, **kwargs) -> None:
        if peft_config is not None:
            raise ValueError(
                "NestedSFTTrainer trains the nested adapter attached with matryoshka_lora.attach: "
                "pass peft_config=None (a PEFT LoRA can become one with matryoshka_lora.export.import_peft)"
            )
        super().__init__(*args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs, return_outputs: bool = False, **kwargs):
        """The mixin's loss; TRL's per-forward metrics kept for the full adapter only."""
        if not (self.adapter_config.prefix_loss and model.training):
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


__all__ = ["NestedSFTTrainer"]
