"""Screen: an activation-aware truncation of a trained LoRA (a cheap step after training).

The default path deploys rank r as the best rank-r approximation of each update in the
Frobenius norm, ``min ||dW - W_r||_F``. What the loss sees is ``dW x`` on the layer's
inputs, so this screen deploys the best rank-r approximation in the norm those inputs
define instead: with ``C = E[x x^T] + lambda I = L L^T`` (a few training batches),

    min_{rank W_r <= r} ||(dW - W_r) L||_F,   dW L = U S V^T,   W_r = U_r S_r V_r^T L^{-1},

which is still nested (the prefixes of one basis), and exact at r = R: the library's SVD
re-basis of ``B diag(p) (A L)``, with the rows of the new A mapped back by ``L^{-1}``, so
component k of ``B' diag(p) A'`` is ``s_k u_k v_k^T L^{-1}``. Its cost is
the forward passes that collect C (``--calibration`` examples; a training step costs about
three forward passes per example), reported beside the result.

    python experiments/activation_svd.py --output experiments/results/smollm2-facts \\
        --seeds 0,1,2 --calibration 32

Reads the folder's LoRA runs (kind ``lora`` at its chosen rate) and writes
``activation_svd.json`` and ``activation_svd.md`` beside them: the test curve of each seed
at every rank against the same run's SVD truncation, and the rank-1 gap to the envelope.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from research import saved_spec
from torch import nn

from matryoshka_lora.assets import load_causal_lm
from matryoshka_lora.compare import ComparisonRunner
from matryoshka_lora.compare.run import collator_for, evaluator, splits_for
from matryoshka_lora.eval.sweep import rank_sweep
from matryoshka_lora.io import load_adapter
from matryoshka_lora.layer import NestedLoraLinear
from matryoshka_lora.model import adapter_layers, detach
from matryoshka_lora.svd import rebased_factors


def input_covariances(
    model: nn.Module, batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` (float64) of each adapted layer's input over the unpadded tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().to(torch.float64)
            keep = mask[0].reshape(-1).bool()
            rows = x.reshape(-1, x.shape[-1])[keep]
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return record

    handles = [
        layer.register_forward_hook(hook(name)) for name, layer in adapter_layers(model).items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                mask[:] = [batch["attention_mask"]]
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def whitened_rebase_(layer: NestedLoraLinear, covariance: torch.Tensor, damping: float) -> None:
    """Re-base ``layer``'s factors on the SVD of ``dW L`` (``C + damping * mean(diag C) I =
    L L^T``): the full update is unchanged and each prefix is the best rank-r approximation
    in the input norm."""
    c = covariance + damping * covariance.diagonal().mean() * torch.eye(
        covariance.shape[0], dtype=covariance.dtype
    )
    chol = torch.linalg.cholesky(c)
    a = layer.lora_A.detach().to(torch.float64)
    b = layer.lora_B.detach().to(torch.float64)
    p = layer.deployed_scales(None).detach().to(torch.float64)
    # the SVD re-basis of dW L = B diag(p) (A L), its rows then mapped back: A' = (A L)' L^{-1}
    whitened_a, new_b = rebased_factors(a @ chol, b, p)
    new_a = torch.linalg.solve_triangular(chol.T, whitened_a.T, upper=True).T
    with torch.no_grad():
        layer.lora_A.copy_(new_a.to(layer.lora_A.dtype))
        layer.lora_B.copy_(new_b.to(layer.lora_B.dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="a comparison folder with LoRA runs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--calibration", type=int, default=32, help="training examples for C")
    p.add_argument("--damping", type=float, default=1e-2, help="lambda, relative to mean(diag C)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.output)
    spec = saved_spec(folder)
    records = {}
    for line in (folder / "runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["name"]] = record
    model, tokenizer = load_causal_lm(spec.model)
    splits = splits_for(spec, tokenizer)
    collate = collator_for(spec, tokenizer)
    both_splits = evaluator(spec, splits, collate)
    train = splits["train"]
    calibration = [
        collate([train[j] for j in range(i, min(i + 8, args.calibration))])
        for i in range(0, args.calibration, 8)
    ]
    lr = float(ComparisonRunner(spec, folder, progress=False).chosen_learning_rates()["lora_svd"])
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        name = f"lora-r{spec.max_rank}-lr{lr:g}-s{seed}"
        load_adapter(model, folder / "runs" / name / "adapter")
        try:
            covariances = input_covariances(model, calibration)
            for layer_name, layer in adapter_layers(model).items():
                whitened_rebase_(layer, covariances[layer_name], args.damping)
            sweep = rank_sweep(
                model, both_splits, ranks=spec.ranks, inference_scales=("trained",), progress=False
            )
        finally:
            detach(model)
        svd = records[name]["curves"]["test"]["svd"]
        ours = {r: sweep.values["test"]["trained"][r] for r in spec.ranks}
        rows.append(
            {"seed": seed, "run": name, "svd": {int(r): v for r, v in svd.items()}, "asvd": ours}
        )
        print(seed, {r: round(v, 2) for r, v in ours.items()}, flush=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in calibration)
    result = {
        "calibration_examples": args.calibration,
        "calibration_tokens": tokens,
        "damping": args.damping,
        "lr": lr,
        # forward-only examples against the run's forward-backward ones (about 3 passes each)
        "compute_x_lora": 1 + args.calibration / (3 * spec.steps * spec.batch_size),
        "rows": rows,
    }
    (folder / "activation_svd.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "activation_svd.md").write_text(markdown(result, spec.ranks))
    print(markdown(result, spec.ranks))


def markdown(result: dict, ranks) -> str:
    head = "| seed | deployment | " + " | ".join(f"r={r}" for r in ranks) + " |"
    lines = [head, "|" + "---|" * (len(ranks) + 2)]
    for row in result["rows"]:
        for key, label in (("svd", "SVD (default)"), ("asvd", "activation-aware SVD")):
            cells = " | ".join(f"{row[key][r]:.2f}" for r in ranks)
            lines.append(f"| {row['seed']} | {label} | {cells} |")
    diffs = [[row["asvd"][r] - row["svd"][r] for r in ranks] for row in result["rows"]]
    means = [sum(col) / len(col) for col in zip(*diffs, strict=True)]
    lines.append(
        "| mean | activation-aware − SVD | " + " | ".join(f"{m:+.2f}" for m in means) + " |"
    )
    return (
        "\n".join(lines) + f"\n\nCalibration: {result['calibration_examples']} training examples "
        f"({result['calibration_tokens']} tokens, forward only), damping {result['damping']}; "
        f"compute {result['compute_x_lora']:.4f} x LoRA's.\n"
    )


if __name__ == "__main__":
    main()
