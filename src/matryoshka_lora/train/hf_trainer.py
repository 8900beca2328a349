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
from ..sampling import RankSampler
from .distributed import gathered_adapters, is_sharded
from .objective import (
    MicroBatchPlan,
    batch_examples,
    micro_batch_plan,
    plan_loss,
    rank_sampler_for,
)
from .rank_eval import RANK_EVAL_METRICS, check_eval_ranks, rank_eval_metrics
from .rebase import rebase_adapters_


class NestedLoraMixin:
    """The nested adapter's training for a ``transformers.Trainer`` subclass (put it first).

    Used by :class:`NestedLoraTrainer` and by
    :class:`~matryoshka_lora.train.trl.NestedSFTTrainer`: the adapter's own
    objective (prefix loss, DyLoRA / prefix sampling per micro-batch),
    adapter-only checkpoints and their reload on resume, input gradients for
    activation checkpointing with a frozen embedding, and the rank curve at
    every evaluation (:mod:`matryoshka_lora.train.rank_eval`).

    Extra keyword arguments: ``rank_sampler`` (DyLoRA only; default: b uniform over
    the train ranks, drawn per micro-batch, seeded with ``args.seed``);
    ``rank_eval`` (default True: each evaluation also reports the teacher-forced
    metrics at every eval rank and their AURAC); ``eval_ranks`` (default: the
    adapter's ``eval_ranks``); ``rank_eval_metrics`` (default ``("loss",
    "token_accuracy")``, the first accuracy-like one gives ``eval_aurac``);
    ``svd_rebase_every`` (default 0, never: every K optimizer steps each adapter
    is re-based on the SVD of its update and its optimizer state dropped, before
    that step's checkpoint, as :class:`SvdRebaseCallback` does).
    """

    def __init__(
        self,
        *args,
        rank_sampler: RankSampler | None = None,
        rank_eval: bool = True,
        eval_ranks: Sequence[int] | None = None,
        rank_eval_metrics: Sequence[str] = RANK_EVAL_METRICS,
        svd_rebase_every: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if svd_rebase_every:
            self.add_callback(SvdRebaseCallback(svd_rebase_every))
        model = self.model
        if not adapter_layers(model):
            raise ValueError(
                f"{type(self).__name__} needs a model with adapters: call matryoshka_lora.attach first"
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
        self.rank_eval = rank_eval
        self.eval_ranks = check_eval_ranks(model, eval_ranks, rank_eval_metrics)
        self.rank_eval_metric_names = tuple(rank_eval_metrics)
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
        """The Trainer's loss, or the adapter's objective for this micro-batch
        (:func:`~matryoshka_lora.train.objective.micro_batch_plan`: the prefix loss,
        per rank or mixed, on the micro-batches ``prefix_loss_every`` selects)."""
        plan = self._micro_batch_plan(model, inputs)
        if plan.mode == "full":
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

        loss = plan_loss(
            self._unwrapped(), self.adapter_config, plan, loss_of(model), loss_of(self._unwrapped())
        )
        return (loss, outputs["last"]) if return_outputs else loss

    def _micro_batch_plan(self, model: nn.Module, inputs) -> MicroBatchPlan:
        """This micro-batch's objective; the full adapter outside training."""
        if not (self.adapter_config.prefix_loss and model.training):
            return MicroBatchPlan("full")
        examples = (
            batch_examples(inputs) if self.adapter_config.prefix_loss_mode != "per_rank" else None
        )
        return micro_batch_plan(
            self.adapter_config,
            self.args.seed,
            *self._current_micro_batch(),
            accumulation=self.args.gradient_accumulation_steps,
            examples=examples,
            first_example=self.args.process_index * (examples or 0),
        )

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
        if self.rank_sampler is not None:
            # evaluate the full function, not the last micro-batch's b (each micro-batch redraws it)
            set_sampled_rank(self.model, None)
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


class SvdRebaseCallback(TrainerCallback):
    """Every ``every`` optimizer steps, re-base the adapters on the SVD of their updates.

    :func:`~matryoshka_lora.train.rebase.rebase_adapters_` at the end of steps
    ``every, 2 every, ...``: the full-rank function is unchanged, each rank-r
    prefix becomes the best rank-r approximation of its layer's update, and the
    optimizer state of the re-based parameters is dropped. ``on_step_end`` runs
    before the Trainer saves that step's checkpoint, so a resumed run continues
    from the re-based factors and the dropped state.
    """

    def __init__(self, every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"svd_rebase_every must be an integer >= 1, got {every!r}")
        self.every = every

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or state.global_step % self.every:
            return control
        if is_sharded(model):
            raise ValueError(
                "svd_rebase_every needs whole adapter factors: it does not run under FSDP or "
                "DeepSpeed ZeRO-3; set svd_rebase_every=0 or train without sharding"
            )
        rebase_adapters_(model, optimizer)
        return control


class NestedLoraTrainer(NestedLoraMixin, Trainer):
    """``Trainer`` for models with nested-LoRA adapters attached (``matryoshka_lora.attach``).

    Keyword arguments beyond the Trainer's: see :class:`NestedLoraMixin`.
    """
