"""Test reference for per-example-rank losses: every example run alone at its own rank.

A one-forward objective that puts example i of a micro-batch at rank r_i must
train ``sum_i (n_i / n) L_i(r_i)``, with ``L_i(r)`` example i's mean token loss
when it runs alone at rank r, ``n_i`` its target tokens and ``n = sum_i n_i``
(the model's own token mean over the batch), and the gradients of that loss.
:func:`one_at_a_time` computes both the slow way, one example and one rank at a
time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA_TARGETS, make_tiny_llama

from matryoshka_lora.config import NestedLoraConfig
from matryoshka_lora.model import adapter_layers, at_rank, attach
from matryoshka_lora.train.data import PaddingCollator

COLLATE = PaddingCollator(0)


def trained_tiny(method: str = "matryoshka", std: float = 0.5, **config) -> torch.nn.Module:
    """The tiny Llama with a rank-8 adapter (S = {1, 2, 4, 8}) whose B ~ N(0, std^2): a
    large update, so that the ranks (and the examples at them) give different losses."""
    model = make_tiny_llama()
    attach(model, NestedLoraConfig(r=8, method=method, target_modules=LLAMA_TARGETS, **config))
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=std)
    return model


def targets(example: dict) -> int:
    """Target tokens of one example under the causal shift (labels[1:] != -100)."""
    return sum(label != -100 for label in example["labels"][1:])


def one_at_a_time(model, examples, ranks):
    """``sum_i (n_i / n) L_i(r_i)``, each example run alone at its rank; that loss's
    gradients; and the per-example losses ``L_i(r_i)``."""
    total = sum(targets(e) for e in examples)
    model.zero_grad()
    loss, per_example = 0.0, []
    for example, rank in zip(examples, ranks, strict=True):
        with at_rank(model, rank):
            alone = model(**COLLATE([example])).loss
        (alone * targets(example) / total).backward()
        loss += alone.item() * targets(example) / total
        per_example.append(alone.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss, grads, per_example


def assert_trains_like_one_at_a_time(model, loss, expected, expected_grads) -> None:
    """``loss`` and its gradients equal :func:`one_at_a_time`'s; the example ranks are cleared."""
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6
        )
    assert all(layer.example_scales is None for layer in adapter_layers(model).values())
