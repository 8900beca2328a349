"""SFT data: formats, prompt masking, collation, sources and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matryoshka_lora.train import (
    DatasetFormatError,
    PaddingCollator,
    Record,
    SFTDataset,
    build_sft_dataset,
    load_records,
    prompt_and_target,
)

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def test_gsm8k_masking_and_eos(char_tokenizer):
    record = Record({"question": "2+3?", "answer": "2+3=5\n#### 5"}, "x")
    ds = SFTDataset([record], char_tokenizer, "gsm8k", max_length=512)
    ex = ds[0]
    prompt = "Question: 2+3?\nAnswer: "
    n_prompt = len(prompt)
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert char_tokenizer.decode(ex["input_ids"][:n_prompt]) == prompt
    assert char_tokenizer.decode(ex["labels"][n_prompt:-1]) == "2+3=5\n#### 5"
    assert ex["labels"][-1] == char_tokenizer.eos_token_id
    assert ds.target_tokens() == len("2+3=5\n#### 5") + 1


def test_truncation_and_dropping(char_tokenizer):
    records = [
        Record({"question": "q" * 50, "answer": "a" * 10}, "long prompt"),
        Record({"question": "q", "answer": "a" * 40}, "long answer"),
    ]
    ds = SFTDataset(records, char_tokenizer, "gsm8k", max_length=30)
    assert len(ds) == 1 and ds.dropped == 1
    assert len(ds[0]["input_ids"]) == 30 and len(ds[0]["labels"]) == 30
    with pytest.raises(DatasetFormatError, match="longer than max_length=30"):
        SFTDataset(records[:1], char_tokenizer, "gsm8k", max_length=30)


def test_alpaca_text_formats(char_tokenizer):
    prompt, target = prompt_and_target(
        Record({"instruction": "Add", "input": "1 2", "output": "3"}, "x"), "alpaca"
    )
    assert (
        "### Instruction:\nAdd" in prompt
        and "### Input:\n1 2" in prompt
        and prompt.endswith("### Response:\n")
    )
    assert target == "3"
    prompt, _ = prompt_and_target(
        Record({"instruction": "Hi", "input": "", "output": "yo"}, "x"), "alpaca"
    )
    assert "### Input" not in prompt
    ds = SFTDataset([Record({"text": "hello"}, "x")], char_tokenizer, "text")
    assert all(label != -100 for label in ds[0]["labels"])  # plain LM: everything supervised


@pytest.mark.slow
def test_chat_format_masks_all_but_last_assistant_turn():
    from transformers import AutoTokenizer

    from matryoshka_lora.assets import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())  # SmolLM2's real chat template
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    prompt, target = prompt_and_target(Record({"messages": messages}, "x"), "chat", tokenizer)
    assert "What is 2+3?" in prompt and prompt.rstrip().endswith("assistant")
    assert target.strip().startswith("5") and "What is" not in target
    ds = SFTDataset([Record({"messages": messages}, "x")], tokenizer, "chat")
    supervised = [t for t in ds[0]["labels"] if t != -100]
    assert tokenizer.decode(supervised).strip().startswith("5")


def test_collator_pads_right_and_masks():
    collate = PaddingCollator(pad_token_id=0)
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert PaddingCollator(0, pad_to_multiple_of=4)([{"input_ids": [1], "labels": [1]}])[
        "input_ids"
    ].shape == (1, 4)


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="../shared/data/gsm8k not present")
def test_real_gsm8k_files(char_tokenizer):
    records = load_records(str(GSM8K_DIR / "train.jsonl"))
    assert len(records) == 7473
    assert records[0].origin.endswith("train.jsonl line 1")
    test = load_records(str(GSM8K_DIR), split="test", size=20)
    assert len(test) == 20 and "####" in test[0].fields["answer"]
    ds = SFTDataset(test, char_tokenizer, "gsm8k", max_length=512)
    assert len(ds) == 20
    text = char_tokenizer.decode(
        [t for t in ds[0]["labels"] if t not in (-100, char_tokenizer.eos_token_id)]
    )
    assert text.rstrip().endswith("#### " + test[0].fields["answer"].split("####")[-1].strip())


def test_reasoning_gym_source(char_tokenizer):
    pytest.importorskip("reasoning_gym")
    records = load_records("reasoning-gym:gsm_symbolic", size=5, seed=1)
    again = load_records("reasoning-gym:gsm_symbolic", size=5, seed=1)
    assert [r.fields for r in records] == [r.fields for r in again]  # seeded
    assert all("####" in r.fields["answer"] for r in records)
    assert all(r.fields["answer"].rstrip().endswith(r.fields["final_answer"]) for r in records)
    assert len(build_sft_dataset("reasoning-gym:gsm_symbolic", char_tokenizer, size=5)) == 5


def test_csv_and_parquet_sources(tmp_path):
    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text(
        "question,answer\n" + "\n".join(f'"{r["question"]}","{r["answer"]}"' for r in rows) + "\n"
    )
    assert [r.fields for r in load_records(str(csv_path))] == rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [r.fields for r in load_records(str(tmp_path / "d.parquet"))] == rows


def test_bad_files_name_file_and_line(tmp_path, char_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DatasetFormatError, match="empty.jsonl is empty"):
        load_records(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n{not json\n")
    with pytest.raises(DatasetFormatError, match="broken.jsonl line 2: invalid JSON"):
        load_records(str(broken))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(
        json.dumps({"question": "a", "answer": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n"
    )
    with pytest.raises(DatasetFormatError, match="wrong.jsonl line 2: missing field 'question'"):
        build_sft_dataset(str(wrong), char_tokenizer, "gsm8k")
    with pytest.raises(DatasetFormatError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DatasetFormatError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("x")
        load_records(str(tmp_path / "d.txt"))
    with pytest.raises(ValueError, match="unknown dataset format 'sharegpt'"):
        prompt_and_target(Record({"a": 1}, "x"), "sharegpt")


def test_hub_loading_uses_datasets(monkeypatch):
    import datasets

    calls = {}

    def fake_load_dataset(name, subset, split):
        calls.update(name=name, subset=subset, split=split)
        return [{"question": "q", "answer": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("openai/gsm8k", "test", subset="main")
    assert calls == {"name": "openai/gsm8k", "subset": "main", "split": "test"}
    assert records[0].fields == {"question": "q", "answer": "a"}
    assert torch.is_tensor(PaddingCollator(0)([{"input_ids": [1], "labels": [1]}])["labels"])
