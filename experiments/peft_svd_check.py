"""Check our SVD truncation of a trained LoRA against PEFT's own LoRA-to-LoRA conversion.

    python experiments/peft_svd_check.py \
        --adapter experiments/results/smollm2-gsm-symbolic-150/runs/lora-r16-lr0.008-s0/adapter \
        --output experiments/results/smollm2-gsm-symbolic-150/peft_svd_check.json

The trained adapter is exported as a standard PEFT LoRA at R and loaded with
``PeftModel.from_pretrained``; ``peft.tuners.lora.conversion.convert_to_lora`` then
builds its rank-r approximation, which is compared, module by module, with ours
(the SVD of the same update, ``matryoshka_lora.svd.svd_components``, truncated to r
components): the relative Frobenius distance
``||dW_peft(r) - dW_ours(r)||_F / ||dW_ours(r)||_F`` and each one's truncation error
against the Eckart–Young optimum ``sqrt(sum_{k > r} sigma_k^2)``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

from matryoshka_lora.assets import load_causal_lm
from matryoshka_lora.export import export_peft
from matryoshka_lora.io import load_adapter
from matryoshka_lora.model import adapter_layers, detach
from matryoshka_lora.svd import svd_components


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--adapter", required=True, help="a saved matryoshka-lora LoRA adapter folder")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ranks", default="1,2,4,8")
    p.add_argument("--output", required=True, help="JSON file for the results")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    model, _ = load_causal_lm(args.model)
    load_adapter(model, args.adapter)
    ours = {
        name: layer.delta_weight(None).detach().double()
        for name, layer in adapter_layers(model).items()
    }
    # (u, sigma, v) of each update B diag(p) A, computed from its factors
    components = {
        name: svd_components(layer.lora_A, layer.lora_B, layer.train_p)
        for name, layer in adapter_layers(model).items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        full_rank = max(layer.max_rank for layer in adapter_layers(model).values())
        folder = export_peft(model, full_rank, Path(tmp) / "peft")
        detach(model)
        from peft import PeftModel
        from peft.tuners.lora.conversion import convert_to_lora

        peft_model = PeftModel.from_pretrained(model, folder)
        results: dict[str, dict[str, float]] = {}
        for rank in ranks:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "converting a LoRA to LoRA": what we check
                config, state = convert_to_lora(peft_model, rank)
            distances, ours_err, peft_err, optimum = [], [], [], []
            for name, delta in ours.items():
                key = f"base_model.model.{name}"
                a = state[f"{key}.lora_A.weight"].double()
                b = state[f"{key}.lora_B.weight"].double()
                theirs = (b @ a) * (config.lora_alpha / config.r)
                u, sigma, v = components[name]
                mine = (u[:, :rank] * sigma[:rank]) @ v[:, :rank].T
                distances.append(float((theirs - mine).norm() / mine.norm()))
                ours_err.append(float((delta - mine).norm()))
                peft_err.append(float((delta - theirs).norm()))
                optimum.append(float(sigma[rank:].square().sum().sqrt()))
            results[str(rank)] = {
                "modules": len(distances),
                "max_relative_distance": max(distances),
                "ours_error_over_optimum_max": max(
                    e / o for e, o in zip(ours_err, optimum, strict=True) if o > 0
                ),
                "peft_error_over_optimum_max": max(
                    e / o for e, o in zip(peft_err, optimum, strict=True) if o > 0
                ),
            }
            print(rank, results[str(rank)], flush=True)
    Path(args.output).write_text(
        json.dumps({"adapter": args.adapter, "ranks": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
