"""Hugging Face ``Trainer`` integration.

:class:`NestedLoraTrainer` is a thin ``transformers.Trainer`` subclass, because
a callback cannot reach the two places that matter: the start of every
micro-batch (DyLoRA draws a rank there) and the model save/load used by
checkpoints. Everything else (optimizer, scheduler, gradient accumulation,
mixed precision, gradient checkpointing, ``torch.compile``, DDP under
``torchrun`` / ``accelerate launch``, RNG and data-order restore on resume) is
the Trainer's own.

* Each micro-batch trains the training objective's plan
  (:mod:`matryoshka_lora.train.objective`; default: the adapter method's, for
  ``method="lora"`` the full adapter's loss and an SVD re-basis after the last
  step), a function of ``(seed, global_step, micro-batch index)``: every process
  plans alike without communication and a resumed run plans the same sequence.
* Checkpoints (``checkpoint-N/``) hold the adapter in the native format
  (``adapter_config.json`` + ``adapter.safetensors``), never the base model;
  ``resume_from_checkpoint`` reloads it, and the Trainer restores optimizer,
  scheduler, RNG and trainer state from the same folder (those files are the
  Trainer's own format).
* Each evaluation (``eval_strategy`` / ``eval_steps``) also reports the rank
  curve: the teacher-forced loss and token accuracy at every eval rank and their
  AURAC (:mod:`matryoshka_lora.train.rank_eval`), through the Trainer's own
  logging, so every ``report_to`` backend receives them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..io import load_adapter, save_adapter
from ..model import adapter_layers, get_config, set_sampled_rank
from .distributed import gathered_adapters, is_sharded
from .objective import (
    FULL,
    MicroBatch,
    MicroBatchPlan,
    TrainingObjective,
    batch_examples,
    end_sampling,
    plan_loss,
    resolve_objective,
)
from .rank_eval import RANK_EVAL_METRICS, check_eval_ranks, rank_eval_metrics


class NestedLoraMixin:
    """The nested adapter's training for a ``transformers.Trainer`` subclass (put it first).

    Used by :class:`NestedLoraTrainer` and by
    :class:`~matryoshka_lora.train.trl.NestedSFTTrainer`: the adapter's own
    training objective's plan for each micro-batch and its end of step,
    adapter-only checkpoints and their reload on resume, input gradients for
    activation checkpointing with a frozen embedding, and the rank curve at
    every evaluation (:mod:`matryoshka_lora.train.rank_eval`).

    Extra keyword arguments: ``objective`` (a
    :class:`~matryoshka_lora.train.objective.TrainingObjective`, its record or its
    name; default: the adapter method's, seeded with ``args.seed``); ``rank_eval`` (default True: each evaluation also reports the teacher-forced
    metrics at every eval rank and their AURAC); ``eval_ranks`` (default: the
    adapter's ``eval_ranks``); ``rank_eval_metrics`` (default ``("loss",
    "token_accuracy")``, the first accuracy-like one gives ``eval_aurac``).
    """

    def __init__(
        self,
        *args,
        objective: TrainingObjective | dict | str | None = None,
        rank_eval: bool = True,
        eval_ranks: Sequence[int] | None = None,
        rank_eval_metrics: Sequence[str] = RANK_EVAL_METRICS,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        model = self.model
        if not adapter_layers(model):
            raise ValueError(
                f"{type(self).__name__} needs a model with adapters: call matryoshka_lora.attach first"
            )
        config = get_config(model)
        self.objective = resolve_objective(objective, config)
        self.add_callback(ObjectiveCallback(self.objective))
        self.adapter_config = config
        self.rank_eval = rank_eval
        self.eval_ranks = check_eval_ranks(model, eval_ranks, rank_eval_metrics)
        self.rank_eval_metric_names = tuple(rank_eval_metrics)
        self._micro_batch_position = (-1, 0)  # (global step, micro-batches seen in it)
        self.sampled_ranks: list[tuple[int, int, int]] = []  # (step, micro, b) of sampled plans
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
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model: nn.Module, inputs, return_outputs: bool = False, **kwargs):
        """The Trainer's loss under the training objective's plan for this micro-batch
        (the full adapter, a sampled prefix, or several ranks' losses in one graph)."""
        plan = self._micro_batch_plan(model, inputs)
        if plan.mode in ("full", "sampled"):
            b = plan.ranks[0] if plan.mode == "sampled" else None
            set_sampled_rank(self._unwrapped(), b)
            if b is not None:
                self.sampled_ranks.append((*self._current_micro_batch(), b))
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        outputs = {}

        def loss_of(module: nn.Module):
            def compute() -> torch.Tensor:
                if not return_outputs:  # TRL's compute_loss spends an extra forward on outputs
                    return super(NestedLoraMixin, self).compute_loss(module, inputs, **kwargs)
                loss, out = super(NestedLoraMixin, self).compute_loss(
                    module, inputs, return_outputs=True, **kwargs
                )
                outputs["last"] = out
                return loss

            return compute

        loss = plan_loss(self._unwrapped(), plan, loss_of(model), loss_of(self._unwrapped()))
        return (loss, outputs["last"]) if return_outputs else loss

    def _micro_batch_plan(self, model: nn.Module, inputs) -> MicroBatchPlan:
        """This micro-batch's plan; the full adapter outside training."""
        if not model.training:
            return FULL
        examples = batch_examples(inputs)
        step, micro = self._current_micro_batch()
        accumulation = self.args.gradient_accumulation_steps
        first = self.args.process_index * examples
        batch = MicroBatch(self.args.seed, step, micro, accumulation, examples, first)
        return self.objective.plan(self.adapter_config, batch)

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
            end_sampling(self._unwrapped())

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        """The Trainer's evaluation, plus the rank curve on the same batches (``rank_eval``).

        Adds ``<prefix>_<metric>_r<r>`` for each metric and eval rank and
        ``<prefix>_aurac_<metric>`` / ``<prefix>_aurac`` to the metrics that
        ``evaluate()`` logs (every ``report_to`` backend and the progress bar
        receive them) and returns (``metric_for_best_model="eval_aurac"`` works).
        Under several processes each evaluates its shard of the eval set and the
        sums are added (examples accelerate repeats to even out the last batch
        count twice).
        """
        # evaluate the full function, not the last micro-batch's sampled prefix
        end_sampling(self._unwrapped())
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self.rank_eval and description == "Evaluation":
            output.metrics.update(
                rank_eval_metrics(
                    self._unwrapped(),
                    dataloader,
                    self.eval_ranks,
                    self.rank_eval_metric_names,
                    prefix=metric_key_prefix,
                    reduce=self._sum_over_processes,
                )
            )
        return output

    def _sum_over_processes(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the processes (itself on one process)."""
        if self.accelerator.num_processes == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()


class ObjectiveCallback(TrainerCallback):
    """Runs the training objective's ``after_step`` at the end of every optimizer step.

    ``on_step_end`` runs before the Trainer saves that step's checkpoint, so a
    resumed run continues from what it left (e.g. the factors re-based on their
    SVD and the dropped optimizer state). On a sharded model (FSDP2, ZeRO-3) the
    last step's call gets whole factors, written back into the shards.
    """

    def __init__(self, objective: TrainingObjective) -> None:
        self.objective = objective

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return control
        done, total = state.global_step, state.max_steps
        if is_sharded(model) and done == total:
            with gathered_adapters(model, writeback=True):
                self.objective.after_step(model, optimizer, done, total)
        else:
            self.objective.after_step(model, optimizer, done, total)
        return control


class NestedLoraTrainer(NestedLoraMixin, Trainer):
    """``Trainer`` for models with nested-LoRA adapters attached (``matryoshka_lora.attach``).

    Keyword arguments beyond the Trainer's: see :class:`NestedLoraMixin`.
    """
