"""Sequence-classification accuracy on a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_adapters, tiny_bert
from transformers import BertForSequenceClassification

import matryoshka_lora as ml
from matryoshka_lora.eval import classification_metric_fn, classification_metrics, rank_sweep


def dropout_bert() -> BertForSequenceClassification:
    """Vocabulary 50 and dropout 0.5, so that train and eval mode differ."""
    return tiny_bert(
        vocab_size=50,
        max_position_embeddings=32,
        hidden_dropout_prob=0.5,
        attention_probs_dropout_prob=0.5,
    )


def batch(seed: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (size, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def predictions(model, b) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**b).logits


def test_accuracy_and_loss_on_known_labels():
    model = dropout_bert()
    b1, b2 = batch(0, 3), batch(1, 2)
    logits = torch.cat([predictions(model, b1), predictions(model, b2)])
    pred = logits.argmax(-1)
    labels = pred.clone()
    labels[1] = (pred[1] + 1) % 3  # examples 1 and 4 wrong: 3 of 5 right
    labels[4] = (pred[4] + 2) % 3
    model.train()  # dropout on: the evaluator must switch it off and restore the flag
    metrics = classification_metrics(
        model, [{**b1, "labels": labels[:3]}, {**b2, "labels": labels[3:]}]
    )
    assert model.training
    assert metrics["accuracy"] == pytest.approx(60.0)
    assert metrics["n"] == 5
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_sweep_over_ranks_with_an_adapter():
    model = dropout_bert()
    ml.attach(
        model, ml.NestedLoraConfig(r=4, target_modules=["query", "value"], inference_scale="paper")
    )
    randomise_adapters(model, scale=1.0)
    b = batch(2, 6)
    with ml.at_rank(model, 4):
        labels = predictions(model, b).argmax(-1)
    fn = classification_metric_fn([{**b, "labels": labels}], metric=None)
    result = rank_sweep(model, fn, ranks=[1, 4], inference_scales=("paper",), progress=False)
    assert result.values["accuracy"]["paper"][4] == 100.0
    with ml.at_rank(model, 1):
        expected = (predictions(model, b).argmax(-1) == labels).float().mean().item() * 100
    assert result.values["accuracy"]["paper"][1] == pytest.approx(expected)


def test_errors():
    model = dropout_bert()
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(model, [batch(0, 2)])
    with pytest.raises(ValueError, match="no examples"):
        classification_metrics(model, [])
    with pytest.raises(ValueError, match="unknown metric"):
        classification_metric_fn([], metric="f1")
