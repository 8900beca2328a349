"""SVD re-basis during training: every prefix follows the singular directions of the update.

A layer's full update is ``dW = B diag(p) A`` with ``p`` the diagonal of its
training function (Matryoshka: the fixed P; LoRA: ``s(R)`` on every component;
DyLoRA: ``s(R)``, its function at ``b = R``). Write its SVD
``dW = sum_k sigma_k u_k v_k^T`` with ``sigma_1 >= sigma_2 >= ...``. For any
``c_k > 0`` the factors

    A'_k = c_k v_k^T,        B'_k = sigma_k / (p_k c_k) u_k

(row k of A', column k of B') give ``B' diag(p) A' = sum_k sigma_k u_k v_k^T = dW``:
the full update, and so the model at full rank, is unchanged. The rank-r prefix
of the update is then ``B'[:, :r] diag(p[:r]) A'[:r] = sum_{k <= r} sigma_k u_k v_k^T``,
the best rank-r approximation of dW (Eckart–Young), with error
``||dW - dW_r||_F^2 = sum_{k > r} sigma_k^2``. This needs ``p_k > 0`` for every k
(true of every method's training P; a zero ``p_k`` could not carry ``sigma_k``).

The gauge chosen here is ``c_k = rho``, the RMS row norm of A before the
re-basis (``rho = ||A||_F / sqrt(R)``): A' has orthogonal rows of equal norm and
the same Frobenius norm as A. The balanced choice ``c_k = sqrt(sigma_k / p_k)``
would set ``A'_k = B'_k = 0`` wherever ``sigma_k = 0`` (e.g. a component B has not
grown yet), and a component with both factors zero gets zero gradient and never
trains again; keeping A's scale keeps every component trainable and the effect
of one optimizer step on dW comparable to before. A layer with ``A = 0`` (so
``dW = 0``) is left as it is.

The SVD is computed from the factors, never from the (out, in) matrix:
``B diag(p) = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR) give
``dW = Q_B (R_B R_A^T) Q_A^T``, and the SVD ``U_c Sigma V_c^T`` of the small core
gives ``u = Q_B U_c``, ``v = Q_A V_c``: O((out + in) R^2) instead of
O(out in min(out, in)). When ``min(out, in) < R`` only K = ``min(out, in)``
directions exist; components K+1..R keep their row of A and get ``B'_k = 0``.

**Optimizer state.** Adam's moments of A and B are statistics of coordinates in
the old basis. The first moment would map linearly to the new one, but the
second is per coordinate and the change of basis mixes coordinates, so no exact
transform exists. The state of every re-based parameter is therefore dropped:
the optimizer starts it afresh (AdamW: step 0, zero moments, so bias correction
makes the next update a plain normalised step rather than one scaled by stale
statistics). A checkpoint taken after a re-basis holds no state for those
parameters, and a run resumed from it continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..layer import NestedLoraLinear
from ..model import require_adapters


def rebased_factors(
    a: torch.Tensor, b: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` with ``B' diag(p) A' = B diag(p) A`` whose components are its SVD's.

    ``a`` is (R, in), ``b`` (out, R), ``p`` (R,) with every ``p_k > 0``. Row k of
    A' is ``rho v_k^T`` and column k of B' is ``sigma_k / (p_k rho) u_k``, with
    ``rho = ||A||_F / sqrt(R)`` (see the module docstring). Computed in float64,
    returned in the dtypes of ``a`` and ``b``.
    """
    rank = a.shape[0]
    if b.shape[1] != rank or p.shape != (rank,):
        raise ValueError(
            f"factors must be A (R, in), B (out, R) and p (R,), got {tuple(a.shape)}, "
            f"{tuple(b.shape)} and {tuple(p.shape)}"
        )
    p64 = p.detach().to(device=a.device, dtype=torch.float64)
    if bool((p64 <= 0).any()):
        raise ValueError(
            f"an SVD re-basis needs every component's scale p_k > 0, got {p64.tolist()}: "
            "a component with p_k = 0 cannot carry a singular value"
        )
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    rho = float(a64.norm()) / math.sqrt(rank)
    if rho == 0.0:
        return a.detach().clone(), b.detach().clone()
    q_a, r_a = torch.linalg.qr(a64.T)  # (in, ka), (ka, R)
    q_b, r_b = torch.linalg.qr(b64 * p64)  # (out, kb), (kb, R)
    u_core, sigma, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    directions = min(sigma.numel(), rank)
    u = (q_b @ u_core)[:, :directions]
    v = (q_a @ vh_core.T)[:, :directions]
    sigma = sigma[:directions]
    new_a = a64.clone()
    new_b = torch.zeros_like(b64)
    new_a[:directions] = rho * v.T
    new_b[:, :directions] = u * (sigma / (p64[:directions] * rho))
    return new_a.to(a.dtype), new_b.to(b.dtype)


def rebase_adapters_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Re-base every adapter of ``model`` on the SVD of its full update, in place.

    Each layer's A and B become :func:`rebased_factors` of its training diagonal
    (``layer.train_p``), so the model's full-rank function is unchanged and every
    rank-r prefix of each update is that update's best rank-r approximation. The
    config, P and the rank state stay as they are. ``optimizer``: the state of the
    re-based parameters is dropped (see the module docstring). Under
    ``torch.distributed`` every process computes the same factors and process 0's
    are broadcast, so the replicas stay bit-identical. Refuses merged adapters
    and sharded (FSDP) parameters.
    """
    layers = require_adapters(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(
            f"{len(merged)} adapters are merged into their base weights: call unmerge(model) first"
        )
    for name, layer in layers.items():
        if not isinstance(layer, NestedLoraLinear):
            raise TypeError(f"adapter {name} is a {type(layer).__name__}, not a NestedLoraLinear")
        if hasattr(layer.lora_A, "full_tensor"):  # a DTensor shard
            raise ValueError(
                f"adapter {name} is sharded (FSDP): an SVD re-basis needs whole factors; "
                "train without svd_rebase_every or without sharding"
            )
    broadcast = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    with torch.no_grad():
        for layer in layers.values():
            a, b = rebased_factors(layer.lora_A, layer.lora_B, layer.train_p)
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            if broadcast:
                dist.broadcast(layer.lora_A.data, src=0)
                dist.broadcast(layer.lora_B.data, src=0)
            if optimizer is not None:
                state = getattr(optimizer, "optimizer", optimizer).state  # accelerate's wrapper
                state.pop(layer.lora_A, None)
                state.pop(layer.lora_B, None)


__all__ = ["rebase_adapters_", "rebased_factors"]
