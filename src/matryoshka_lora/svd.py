"""SVD re-basis of nested adapters: every prefix rank becomes the best truncation.

A layer's full update is ``dW = B diag(p) A`` with ``p`` the diagonal of its
training function (LoRA: ``s(R)`` on every component; Matryoshka: the fixed P;
DyLoRA: ``s(R)``, its function at ``b = R``). Write its SVD
``dW = sum_k sigma_k u_k v_k^T`` with ``sigma_1 >= sigma_2 >= ...``. For any
``c_k > 0`` the factors

    A'_k = c_k v_k^T,        B'_k = sigma_k / (p_k c_k) u_k

(row k of A', column k of B') give ``B' diag(p) A' = dW``: the full update, and
so the model at full rank, is unchanged. The rank-r prefix at the trained scales
is then ``B'[:, :r] diag(p[:r]) A'[:r] = sum_{k <= r} sigma_k u_k v_k^T``, the
best rank-r approximation of dW in Frobenius and spectral norm (Eckart–Young),
with error ``||dW - dW_r||_F^2 = sum_{k > r} sigma_k^2``. This needs ``p_k > 0``
(true of every method's training P).

The gauge is ``c_k = rho``, the RMS row norm of A before the re-basis
(``rho = ||A||_F / sqrt(R)``): A' has orthogonal rows of equal norm and A's
Frobenius norm. (The balanced ``c_k = sqrt(sigma_k / p_k)`` would zero both
factors of a component with ``sigma_k = 0``, which then never trains again;
keeping A's scale keeps every component trainable, so the same re-basis serves
during training.) A layer with ``A = 0`` (so ``dW = 0``) is left as it is.

The SVD is computed from the factors, never from the (out, in) matrix:
``B diag(p) = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR) give
``dW = Q_B (R_B R_A^T) Q_A^T``, and the SVD ``U_c Sigma V_c^T`` of the small core
gives ``u = Q_B U_c``, ``v = Q_A V_c``: O((out + in) R^2) instead of
O(out in min(out, in)). When ``min(out, in) < R`` only K = ``min(out, in)``
directions exist; components K+1..R keep their row of A and get ``B'_k = 0``.

**Optimizer state.** Adam's moments of A and B are statistics of coordinates in
the old basis; the second moment is per coordinate and a change of basis mixes
coordinates, so no exact transform exists. The state of every re-based parameter
is dropped: the optimizer starts it afresh (AdamW: step 0, zero moments). A
checkpoint written after a re-basis holds no state for those parameters, and a
run resumed from it continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .model import reconfigure, require_adapters


def svd_components(
    a: torch.Tensor, b: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, sigma, v)`` of ``dW = B diag(p) A`` in float64, from the factors.

    ``a`` is (R, in), ``b`` (out, R), ``p`` (R,). ``u`` is (out, K), ``sigma`` (K,)
    descending, ``v`` (in, K) with ``K = min(out, in, R)``, and
    ``dW = u diag(sigma) v^T``.
    """
    rank = a.shape[0]
    if b.shape[1] != rank or p.shape != (rank,):
        raise ValueError(
            f"factors must be A (R, in), B (out, R) and p (R,), got {tuple(a.shape)}, "
            f"{tuple(b.shape)} and {tuple(p.shape)}"
        )
    a64 = a.detach().to(torch.float64)
    p64 = p.detach().to(device=a.device, dtype=torch.float64)
    b64 = b.detach().to(device=a.device, dtype=torch.float64)
    q_a, r_a = torch.linalg.qr(a64.T)  # (in, ka), (ka, R)
    q_b, r_b = torch.linalg.qr(b64 * p64)  # (out, kb), (kb, R)
    u_core, sigma, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(sigma.numel(), rank)
    return (q_b @ u_core)[:, :k], sigma[:k], (q_a @ vh_core.T)[:, :k]


def rebased_factors(
    a: torch.Tensor, b: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``B' diag(p) A' = B diag(p) A`` whose components are its SVD's.

    Row k of A' is ``rho v_k^T`` and column k of B' is ``sigma_k / (p_k rho) u_k``,
    ``rho = ||A||_F / sqrt(R)`` (see the module docstring). Needs every ``p_k > 0``.
    Computed in float64, returned in the dtypes of ``a`` and ``b``.
    """
    p64 = p.detach().to(device=a.device, dtype=torch.float64)
    if p64.ndim != 1 or bool((p64 <= 0).any()):
        raise ValueError(
            f"an SVD re-basis needs every component's scale p_k > 0, got {p64.tolist()}: "
            "a component with p_k = 0 cannot carry a singular value"
        )
    u, sigma, v = svd_components(a, b, p64)
    rank, k = a.shape[0], sigma.numel()
    rho = float(a.detach().to(torch.float64).norm()) / math.sqrt(rank)
    if rho == 0.0:
        return a.detach().clone(), b.detach().clone()
    new_a = a.detach().to(torch.float64).clone()
    new_b = torch.zeros(b.shape, dtype=torch.float64, device=a.device)
    new_a[:k] = rho * v.T
    new_b[:, :k] = u * (sigma / (p64[:k] * rho))
    return new_a.to(a.dtype), new_b.to(device=b.device, dtype=b.dtype)


def adapter_singular_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Singular values (float64, descending) of each layer's full update ``B diag(p) A``."""
    return {
        name: svd_components(layer.lora_A, layer.lora_B, layer.train_p)[1]
        for name, layer in require_adapters(model).items()
    }


def svd_rebase_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Re-base every adapter on the SVD of its full update, in place; returns ``model``.

    Each layer's A and B become :func:`rebased_factors` of its training diagonal,
    so the full-rank function is unchanged, and the adapters deploy with the
    trained scales (``inference_scale="trained"``; a DyLoRA adapter becomes the
    ``lora`` adapter of the same full-rank function, ``p = s(R)``): deploying rank
    r (``at_rank``, a save, a rank-r export) gives each layer's best rank-r
    approximation of its trained update. ``optimizer``: the state of the re-based
    parameters is dropped (see the module docstring). Under ``torch.distributed``
    process 0's factors are broadcast, so replicas stay bit-identical. Refuses
    merged adapters and sharded (FSDP) parameters: gather them first.
    """
    layers = require_adapters(model, unmerged=True)
    for name, layer in layers.items():
        if hasattr(layer.lora_A, "full_tensor"):  # a DTensor shard
            raise ValueError(
                f"adapter {name} is sharded (FSDP): an SVD re-basis needs whole factors; gather "
                "them first (matryoshka_lora.train.distributed.gathered_adapters) or train "
                "without sharding"
            )
    changes = {"inference_scale": "trained"}
    if any(layer.method == "dylora" for layer in layers.values()):
        changes["method"] = "lora"  # DyLoRA's full function is LoRA's: p = s(R)
    if any(getattr(layer, k) != v for layer in layers.values() for k, v in changes.items()):
        reconfigure(model, **changes)
    broadcast = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    state = getattr(optimizer, "optimizer", optimizer).state if optimizer is not None else None
    with torch.no_grad():
        for layer in layers.values():
            a, b = rebased_factors(layer.lora_A, layer.lora_B, layer.train_p)
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            if broadcast:
                dist.broadcast(layer.lora_A.data, src=0)
                dist.broadcast(layer.lora_B.data, src=0)
            if state is not None:
                state.pop(layer.lora_A, None)
                state.pop(layer.lora_B, None)
    return model


__all__ = ["adapter_singular_values", "rebased_factors", "svd_components", "svd_rebase_"]
