"""SVD truncation of a trained adapter (the "LoRA at R, SVD-truncated to r" baseline).

For each adapted layer take the full update the adapter was trained as,
``dW = layer.delta_weight(None)`` (shape (out, in); for Matryoshka this includes
the trained P, for DyLoRA it is the b = R function), and its SVD
``dW = U diag(sigma) V^T`` with ``sigma_1 >= sigma_2 >= ...``. Re-base the factors
as::

    A' = diag(sqrt(sigma)) V^T       (rows: A'_k = sqrt(sigma_k) v_k^T)
    B' = U diag(sqrt(sigma))         (columns: B'_k = sqrt(sigma_k) u_k)

keeping the first R components, and reinterpret the adapter as plain LoRA with
unit scales (``method="lora", scaling="none", alpha=1``, ``paper`` inference
scale, so every component has weight 1 at every rank). Then:

* rank R: ``B' A' = U_R diag(sigma_R) V_R^T = dW`` (dW has rank <= R), so the
  full adapter is unchanged;
* rank r: ``B'[:, :r] A'[:r] = U_r diag(sigma_r) V_r^T``, the best rank-r
  approximation of dW in Frobenius and spectral norm (Eckart–Young), with error
  ``||dW - dW_r||_F^2 = sum_{k > r} sigma_k^2``.

The components are orthogonal: ``A' A'^T = diag(sigma)`` and ``B'^T B' = diag(sigma)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import adapter_layers, reconfigure, require_adapters


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A', B')`` of shapes (rank, in) and (out, rank) with ``B' A'`` = the best
    rank-``rank`` approximation of ``delta`` (out, in).

    The SVD is computed in float64 and the factors are returned in ``delta``'s
    dtype. If ``rank`` exceeds ``min(out, in)`` the extra components are zero.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix (out, in), got shape {tuple(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    out_features, in_features = delta.shape
    u, sigma, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    k = min(rank, sigma.numel())
    root = sigma[:k].sqrt()
    a = torch.zeros(rank, in_features, dtype=torch.float64, device=delta.device)
    b = torch.zeros(out_features, rank, dtype=torch.float64, device=delta.device)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root[None, :]
    return a.to(delta.dtype), b.to(delta.dtype)


def adapter_singular_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Singular values (float64, descending) of each layer's full update ``delta_weight(None)``."""
    return {
        name: torch.linalg.svdvals(layer.delta_weight(None).detach().to(torch.float64))
        for name, layer in adapter_layers(model).items()
    }


def svd_rebase_(model: nn.Module) -> nn.Module:
    """Re-base every adapter on the SVD of its full update, in place; returns ``model``.

    Afterwards the model's adapters are plain LoRA with unit scales
    (``method="lora", scaling="none", alpha=1.0, inference_scale="paper"``):
    deploying rank r gives the best rank-r approximation of each layer's trained
    update, and rank R reproduces the trained function. The active rank of each
    layer is kept. Refuses merged adapters.
    """
    layers = require_adapters(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"{len(merged)} adapters are merged into their base weights: call unmerge(model) first"
        )
    factors = {}
    with torch.no_grad():
        for name, layer in layers.items():
            delta = layer.delta_weight(None).detach()
            factors[name] = svd_factors(delta.to(torch.float64), layer.max_rank)
        for name, layer in layers.items():
            a, b = factors[name]
            layer.lora_A.copy_(a.to(layer.lora_A.dtype))
            layer.lora_B.copy_(b.to(layer.lora_B.dtype))
    reconfigure(
        model,
        method="lora",
        scaling="none",
        alpha=1.0,
        inference_scale="paper",
        prefix_sampling=0.0,
        prefix_loss=False,
        prefix_loss_sample=0,
    )
    return model
