"""Teacher-forced loss / perplexity / token accuracy / exact match on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LLAMA_TARGETS, make_tiny_llama, randomise_adapters

import matryoshka_lora as ml
from matryoshka_lora.eval import rank_sweep, teacher_forced_metric_fn, teacher_forced_metrics


def make_batch(seed: int, batch: int, length: int, prompt: int, pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :prompt] = -100
    if pad:
        mask[-1, -pad:] = 0
        labels[-1, -pad:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_loss(model, batch) -> tuple[float, int]:
    with torch.no_grad():
        loss = model(**batch).loss.item()
    return loss, int((batch["labels"][:, 1:] != -100).sum())


def greedy_labels(model, batch):
    """Labels equal to the model's own teacher-forced argmax at every scored position."""
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"].clone()
    scored = labels[:, 1:] != -100
    labels[:, 1:][scored] = pred[:, :-1].argmax(-1)[scored]
    return {**batch, "labels": labels}


def test_single_batch_loss_equals_transformers_loss():
    model = make_tiny_llama()
    batch = make_batch(0, batch=3, length=12, prompt=5, pad=2)
    metrics = teacher_forced_metrics(model, [batch])
    loss, n = hf_loss(model, batch)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["n_tokens"] == n == 3 * 7 - 2
    assert metrics["n_sequences"] == 3


def test_loss_is_token_weighted_over_batches():
    model = make_tiny_llama()
    b1 = make_batch(1, batch=2, length=10, prompt=2)  # 16 scored tokens
    b2 = make_batch(2, batch=2, length=10, prompt=7)  # 6 scored tokens
    (l1, n1), (l2, n2) = hf_loss(model, b1), hf_loss(model, b2)
    metrics = teacher_forced_metrics(model, [b1, b2])
    assert (n1, n2) == (16, 6)
    assert metrics["loss"] == pytest.approx((l1 * n1 + l2 * n2) / (n1 + n2), rel=1e-5)
    assert metrics["loss"] != pytest.approx((l1 + l2) / 2, rel=1e-3)


def test_accuracy_and_exact_match_constructed_cases():
    model = make_tiny_llama()
    batch = greedy_labels(model, make_batch(3, batch=2, length=10, prompt=4))
    perfect = teacher_forced_metrics(model, [batch])
    assert perfect["token_accuracy"] == 100.0 and perfect["exact_match"] == 100.0
    # Break one answer token of sequence 0: 11 of 12 tokens right, 1 of 2 answers exact.
    labels = batch["labels"].clone()
    labels[0, 6] = (labels[0, 6] + 1) % 97
    broken = teacher_forced_metrics(model, [{**batch, "labels": labels}])
    assert broken["n_tokens"] == 12
    assert broken["token_accuracy"] == pytest.approx(100 * 11 / 12)
    assert broken["exact_match"] == 50.0
    # A sequence without scored tokens does not count for exact match.
    labels[1, :] = -100
    only_first = teacher_forced_metrics(model, [{**batch, "labels": labels}])
    assert only_first["n_sequences"] == 1 and only_first["exact_match"] == 0.0


def test_training_flags_restored_and_no_grad():
    model = make_tiny_llama()
    model.train()
    model.model.layers[0].eval()  # a mixed state must survive exactly
    batch = make_batch(4, batch=2, length=8, prompt=3)
    teacher_forced_metrics(model, [batch])
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training
    assert all(p.grad is None for p in model.parameters())


def test_metric_fn_replays_a_generator_in_a_rank_sweep():
    model = make_tiny_llama()
    ml.attach(
        model, ml.NestedLoraConfig(r=4, target_modules=LLAMA_TARGETS, inference_scale="paper")
    )
    randomise_adapters(model)
    batches = [make_batch(5, 2, 10, 4), make_batch(6, 2, 10, 4)]
    fn = teacher_forced_metric_fn(iter(batches), metric="loss")
    result = rank_sweep(model, fn, ranks=[1, 4], inference_scales=("paper",), progress=False)
    for rank in (1, 4):
        with ml.at_rank(model, rank):
            expected = teacher_forced_metrics(model, batches)["loss"]
        assert result.values["metric"]["paper"][rank] == pytest.approx(expected, rel=1e-6)
    assert result.values["metric"]["paper"][1] != pytest.approx(
        result.values["metric"]["paper"][4], rel=1e-4
    )
    every = teacher_forced_metric_fn(batches, metric=None)(model)
    assert set(every) == {"loss", "perplexity", "token_accuracy", "exact_match"}


def test_errors():
    model = make_tiny_llama()
    batch = make_batch(7, 1, 6, 6)
    with pytest.raises(ValueError, match="no scored token"):
        teacher_forced_metrics(model, [batch])
    with pytest.raises(ValueError, match="labels"):
        teacher_forced_metrics(model, [{"input_ids": batch["input_ids"]}])
    with pytest.raises(ValueError, match="unknown metric"):
        teacher_forced_metric_fn([batch], metric="bleu")


class HidesLogitsToKeep(torch.nn.Module):
    """The same model behind a forward without ``logits_to_keep``: every position's logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )


def test_lm_head_on_scored_positions_only_gives_the_same_metrics():
    from matryoshka_lora.eval.teacher_forced import accepts_logits_to_keep, scored_positions

    model = make_tiny_llama()
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=LLAMA_TARGETS))
    randomise_adapters(model)
    # rows scored on different, partly disjoint spans, one row with nothing scored
    batch = make_batch(0, 4, 14, prompt=3, pad=2)
    batch["labels"][1, :10] = -100
    batch["labels"][2, 6:] = -100
    batch["labels"][3] = -100
    assert accepts_logits_to_keep(model) and not accepts_logits_to_keep(HidesLogitsToKeep(model))
    kept = scored_positions(batch["labels"])
    assert 0 < len(kept) < batch["labels"].shape[1] - 1
    only_scored = teacher_forced_metrics(model, [batch])
    every_position = teacher_forced_metrics(HidesLogitsToKeep(model), [batch])
    assert only_scored == pytest.approx(every_position, rel=1e-6)
