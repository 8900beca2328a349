"""Hugging Face ``Trainer`` integration.

:class:`NestedLoraTrainer` is a thin ``transformers.Trainer`` subclass, because
a callback cannot reach the two places that matter: the start of every
micro-batch (DyLoRA draws a rank there) and the model save/load used by
checkpoints. Everything else (optimizer, scheduler, gradient accumulation,
mixed precision, gradient checkpointing, ``torch.compile``, DDP under
``torchrun`` / ``accelerate launch``, RNG and data-order restore on resume) is
the Trainer's own.

* DyLoRA's rank ``b`` comes from a :class:`~matryoshka_lora.sampling.RankSampler`
  as a function of ``(seed, global_step, micro-batch index)``: every process
  draws the same ``b`` without communication and a resumed run draws the same
  sequence.
* Checkpoints (``checkpoint-N/``) hold the adapter in the native format
  (``adapter_config.json`` + ``adapter.safetensors``), never the base model;
  ``resume_from_checkpoint`` reloads it, and the Trainer restores optimizer,
  scheduler, RNG and trainer state from the same folder (those files are the
  Trainer's own format).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Trainer

from ..io import load_adapter, save_adapter
from ..model import adapter_layers, get_config, set_sampled_rank
from ..sampling import RankSampler
from .distributed import gathered_adapters, is_sharded
from .objective import prefix_loss, prefix_loss_ranks_for, rank_sampler_for


class NestedLoraTrainer(Trainer):
    """``Trainer`` for models with nested-LoRA adapters attached (``matryoshka_lora.attach``).

    Extra keyword argument: ``rank_sampler`` (DyLoRA only; default: b uniform over
    the train ranks, drawn per micro-batch, seeded with ``args.seed``).
    """

    def __init__(self, *args, rank_sampler: RankSampler | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model = self.model
        if not adapter_layers(model):
            raise ValueError(
                "NestedLoraTrainer needs a model with adapters: call matryoshka_lora.attach first"
            )
        config = get_config(model)
        if rank_sampler is None:
            rank_sampler = rank_sampler_for(config, seed=self.args.seed)
        elif config.method != "dylora" and not config.prefix_sampling:
            raise ValueError(
                f"a rank sampler applies to method 'dylora' or to an adapter with prefix_sampling > 0; "
                f"the adapter's method is {config.method!r} without prefix_sampling"
            )
        self.rank_sampler = rank_sampler
        self.adapter_config = config
        self._micro_batch_position = (-1, 0)  # (global step, micro-batches seen in it)
        self.sampled_ranks: list[tuple[int, int, int]] = []  # (step, micro, b), for inspection
        checkpointing = (
            getattr(self.args, "activation_checkpointing", False)
            or self.args.gradient_checkpointing
        )
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            # frozen embeddings: without this, checkpointed blocks would see no input requiring grad
            model.enable_input_require_grads()

    def _current_micro_batch(self) -> tuple[int, int]:
        """(global step, index of the micro-batch being trained in it); 0 before the first."""
        step = self.state.global_step
        last_step, seen = self._micro_batch_position
        return step, (seen - 1 if step == last_step and seen else 0)

    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None) -> torch.Tensor:
        step = self.state.global_step
        last_step, seen = self._micro_batch_position
        micro = seen if step == last_step else 0
        self._micro_batch_position = (step, micro + 1)
        if self.rank_sampler is not None:
            b = self.rank_sampler.apply(self.model, step, micro)
            self.sampled_ranks.append((step, micro, b))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model: nn.Module, inputs, return_outputs: bool = False, **kwargs):
        """The Trainer's loss, or with ``prefix_loss`` the mean of the train ranks' losses."""
        if not (self.adapter_config.prefix_loss and model.training):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        outputs = {}

        def loss_of(module: nn.Module):
            def compute() -> torch.Tensor:
                loss, out = super(NestedLoraTrainer, self).compute_loss(
                    module, inputs, return_outputs=True, **kwargs
                )
                outputs["last"] = out
                return loss

            return compute

        ranks = prefix_loss_ranks_for(
            self.adapter_config, self.args.seed, *self._current_micro_batch()
        )
        loss = prefix_loss(
            self._unwrapped(),
            self.adapter_config,
            loss_of(model),
            loss_of(self._unwrapped()),
            ranks,
        )
        return (loss, outputs["last"]) if return_outputs else loss

    def _unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the adapter only (native format), the tokenizer and the arguments as JSON."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self._unwrapped(), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as fh:
            fh.write(self.args.to_json_string())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3 / FSDP2 every process gathers the adapter, process 0 writes it (never the base)."""
        model = self._unwrapped()
        if not is_sharded(model):
            return super().save_model(output_dir, _internal_call)
        with gathered_adapters(model):
            self._save(output_dir)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        load_adapter(model if model is not None else self._unwrapped(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter(self._unwrapped(), self.state.best_model_checkpoint)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.rank_sampler is not None:
                set_sampled_rank(self.model, None)
