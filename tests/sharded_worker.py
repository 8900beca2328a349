"""Worker for the sharded-training tests: run under torchrun (or alone for the 1-process reference).

usage: sharded_worker.py OUT_DIR MODE
MODE: ``one`` (1 process, global batch 4), ``ddp``, ``fsdp`` (torch FSDP2
``fully_shard`` per decoder layer) or ``accelerate-fsdp`` (accelerate's FSDP2
plugin), 2 processes with micro-batches of 2. For every variant in VARIANTS it
trains a tiny Llama for 4 steps (2 micro-batches each) with ``train_adapter``
and writes the adapter as this process sees it after a gather to
OUT_DIR/<variant>/rank<k>.safetensors; process 0's saved adapter is
OUT_DIR/<variant>/run/adapter. ``fsdp`` also writes a PEFT export and a merged
model from the sharded run, an SVD re-basis of the sharded adapter, resumes a
crashed run from its sharded checkpoint, and records P after meta-device
initialisation.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import (  # noqa: E402
    LLAMA_TARGETS,
    end_processes,
    export_gathered,
    llama_with_adapter,
    save_adapter_tensors,
    tiny_llama_config,
    worker_train_config,
)
from ddp_worker import fixed_length_dataset  # noqa: E402

import matryoshka_lora as ml  # noqa: E402
from matryoshka_lora.model import adapter_state_dict  # noqa: E402
from matryoshka_lora.svd import svd_rebase_  # noqa: E402
from matryoshka_lora.train import PaddingCollator, train_adapter  # noqa: E402
from matryoshka_lora.train.distributed import (  # noqa: E402
    gathered_adapters,
    reset_scales,
    save_adapter_sharded,
    shard_model,
)

# variant -> (NestedLoraConfig overrides, base dtype, training objective; None: the method's)
VARIANTS = {
    "lora": ({"method": "lora"}, torch.float32, None),  # the default: re-based after the last step
    "dylora": ({"method": "dylora"}, torch.float32, None),
    "matryoshka": ({"method": "matryoshka"}, torch.float32, None),
    "prefix_loss": ({"method": "matryoshka"}, torch.float32, {"name": "prefix-loss"}),
    "bf16_base": ({"method": "matryoshka"}, torch.bfloat16, {"name": "prefix-loss"}),
}
RESUMED = ("dylora", "prefix_loss")


class Crash(RuntimeError):
    pass


def adapter_config(variant: str) -> ml.NestedLoraConfig:
    overrides = VARIANTS[variant][0]
    return ml.NestedLoraConfig(r=8, target_modules=LLAMA_TARGETS, **overrides)


def build(variant: str, mode: str) -> torch.nn.Module:
    model = llama_with_adapter(VARIANTS[variant][1], **VARIANTS[variant][0])
    if mode == "fsdp":
        shard_model(model)
    elif mode == "accelerate-fsdp":
        model = accelerate_fsdp(model)
    return model


def accelerate_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """accelerate's FSDP2 wrapping of ``model`` (what ``accelerator.prepare`` runs), on CPU.

    accelerate only selects FSDP for accelerator devices (a CPU run stays
    ``MULTI_CPU``), and its ``prepare`` wants the optimizer too, which
    ``train_adapter`` builds itself; the test sets the distributed type and
    calls accelerate's own ``fsdp2_prepare_model`` with the plugin, on gloo.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
    )
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return fsdp2_prepare_model(accelerator, model)


def dump_gradient(model: torch.nn.Module, data: list[dict], path: str) -> None:
    """The full adapter gradient of one backward of the first global batch of 4 examples."""
    from torch.distributed.tensor import DTensor

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    per = 4 // int(os.environ.get("WORLD_SIZE", "1"))
    batch = PaddingCollator(0)(data[rank * per : (rank + 1) * per])
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grads = {}
    for name, param in adapter_state_dict(model).items():
        grad = param.grad
        grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).contiguous()
    model.zero_grad(set_to_none=True)
    model.eval()
    save_file(grads, path)


def meta_init_scales(out_dir: str, rank: int) -> None:
    """P and the deployed scales of a model built on the meta device, sharded, then materialised."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config())
    ml.attach(model, adapter_config("prefix_loss"))
    shard_model(model)
    model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():
        if name.endswith("_p"):
            buffer.fill_(float("nan"))  # what uninitialised memory may hold
    reset_scales(model)
    layer = model.model.layers[1].mlp.down_proj
    layer.set_rank(3)
    layer.set_sampled_rank(5)
    save_file(
        {
            "train_p": layer.train_p.clone(),
            "rank_p": layer.rank_p.clone(),
            "sampled_p": layer.sampled_p.clone(),
        },
        os.path.join(out_dir, f"meta_rank{rank}.safetensors"),
    )


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    torch.use_deterministic_algorithms(True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch_size = 4 // world
    data = fixed_length_dataset()
    collate = PaddingCollator(0)
    rank = 0
    for variant in VARIANTS:
        folder = os.path.join(out_dir, variant)
        os.makedirs(folder, exist_ok=True)
        model = build(variant, mode)
        run = os.path.join(folder, "run")
        save_every = 2 if variant in RESUMED else None
        objective = VARIANTS[variant][2]
        train_adapter(
            model,
            data,
            worker_train_config(run, batch_size, save_every=save_every),
            collate,
            resume=False,
            objective=objective,
        )
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        save_adapter_tensors(model, os.path.join(folder, f"rank{rank}.safetensors"))
        if mode == "ddp":
            continue
        if variant in ("dylora", "prefix_loss"):
            dump_gradient(model, data, os.path.join(folder, f"grad_rank{rank}.safetensors"))
        if mode != "fsdp":
            continue
        export_gathered(model, folder, merged=variant == "prefix_loss")
        if variant == "prefix_loss":
            with gathered_adapters(model, writeback=True):  # an in-place change of the shards
                svd_rebase_(model)
            save_adapter_sharded(model, os.path.join(folder, "svd"))
        if variant in RESUMED:
            crashed = os.path.join(folder, "crashed")

            def crash_at_3(step: int, loss: float) -> None:
                if step == 3:
                    raise Crash("simulated kill")

            try:
                train_adapter(
                    build(variant, mode),
                    data,
                    worker_train_config(crashed, batch_size, save_every=2),
                    collate,
                    resume=False,
                    on_step=crash_at_3,
                    objective=objective,
                )
            except Crash:
                pass
            resumed = build(variant, mode)
            torch.manual_seed(12345 + rank)  # whatever RNG state a new process has
            result = train_adapter(
                resumed,
                data,
                worker_train_config(crashed, batch_size, save_every=2),
                collate,
                objective=objective,
            )
            assert result.resumed_from == 2, result.resumed_from
            save_adapter_tensors(resumed, os.path.join(folder, f"resumed_rank{rank}.safetensors"))
    if mode == "fsdp":
        meta_init_scales(out_dir, rank)
    end_processes()


if __name__ == "__main__":
    main()
