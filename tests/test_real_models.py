"""Integration on the packaged real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)."""

from __future__ import annotations

import pytest
import torch

import matryoshka_lora as ml
from matryoshka_lora.assets import SMOLLM2_HUB_ID, load_causal_lm, minilm_dir
from matryoshka_lora.model import adapter_layers, get_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2")


def test_smollm2_all_paper_projections(smollm2, tmp_path):
    model, tokenizer = smollm2
    batch = tokenizer(
        ["Question: What is 2+3?\nAnswer: 5", "Question: Name a colour.\nAnswer: red"],
        return_tensors="pt",
        padding=True,
    )
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        base_logits = model(**batch).logits
    ml.attach(model, ml.NestedLoraConfig(r=8))
    try:
        layers = adapter_layers(model)
        assert len(layers) == 30 * 7
        assert get_config(model).base_model_name_or_path == SMOLLM2_HUB_ID
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, base_logits, atol=0, rtol=0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(4):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        with torch.no_grad(), ml.at_rank(model, 2):
            rank2 = model(**batch).logits
        ml.save_adapter(model, tmp_path)
    finally:
        ml.detach(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits, atol=0, rtol=0)
    ml.load_adapter(model, tmp_path)
    try:
        with torch.no_grad(), ml.at_rank(model, 2):
            torch.testing.assert_close(model(**batch).logits, rank2, atol=0, rtol=0)
    finally:
        ml.detach(model)


def test_minilm_classifier_attach():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    ml.attach(model, ml.NestedLoraConfig(r=4, target_modules=["query", "value"]))
    assert len(adapter_layers(model)) == 6 * 2
    batch = tokenizer(["great drug", "terrible side effects"], return_tensors="pt", padding=True)
    with ml.at_rank(model, 1), torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def _held_out_loss(model, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / count


def test_smollm2_short_default_run_lowers_loss_at_every_rank(smollm2, tmp_path):
    """The default path (LoRA at R, re-based after the last step) on the real model."""
    from matryoshka_lora.train import PaddingCollator, TrainConfig, build_sft_dataset, train_adapter

    model, tokenizer = smollm2
    train = build_sft_dataset(
        "reasoning-gym:gsm_symbolic", tokenizer, size=48, seed=1, max_length=160
    )
    held = build_sft_dataset(
        "reasoning-gym:gsm_symbolic", tokenizer, size=8, seed=999, max_length=160
    )
    collate = PaddingCollator(tokenizer.pad_token_id)
    batches = [collate([held[i] for i in range(j, j + 4)]) for j in range(0, 8, 4)]
    ml.attach(model, ml.NestedLoraConfig(r=8))
    try:
        before = {r: _held_out_loss(model, batches) for r in (1, 2, 4, 8)}  # B = 0: the base model
        config = TrainConfig(
            output_dir=str(tmp_path),
            learning_rate=2e-3,
            batch_size=4,
            max_steps=12,
            warmup_steps=2,
            progress=False,
            seed=0,
        )
        train_adapter(model, train, config, collate)
        after = {}
        for r in (1, 2, 4, 8):
            with ml.at_rank(model, r):
                after[r] = _held_out_loss(model, batches)
        print(before, after)
        for r in (1, 2, 4, 8):
            assert after[r] < before[r] - 0.02, (r, before[r], after[r])
    finally:
        ml.detach(model)


def test_drug_reviews_dataset_asset(tmp_path, monkeypatch):
    import json

    from matryoshka_lora.assets import drug_reviews_dir, resolve_dataset

    monkeypatch.setenv("MATRYOSHKA_LORA_CACHE", str(tmp_path))
    folder = drug_reviews_dir()
    assert resolve_dataset("drug-reviews") == str(folder)
    rows = {
        s: [json.loads(x) for x in (folder / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "test")
    }
    assert (len(rows["train"]), len(rows["test"])) == (600, 379)
    labels = [r["label"] for r in rows["test"]]
    assert (labels.count(0), labels.count(1), labels.count(2)) == (95, 36, 248)
    assert rows["train"][0]["text"].startswith("I recently received an injection of nalbuphine")
    assert not list(tmp_path.glob(".*tmp"))  # no staging folder left behind
