"""SFT data: formats, prompt masking, collation, sources and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE

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


# ---------------------------------------------------------------------------- TRL formats
def chat_tokenizer(add_bos: bool = False):
    """The char tokenizer with :data:`CHAT_TEMPLATE`; ``add_bos``: it prepends BOS itself."""
    from conftest import make_char_tokenizer
    from tokenizers import processors

    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    if add_bos:
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)]
        )
    return tokenizer


def supervised_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != -100])


def test_prompt_completion_masks_the_prompt(char_tokenizer):
    record = Record({"prompt": "2+3=", "completion": "5"}, "x")
    assert prompt_and_target(record, "prompt-completion") == ("2+3=", "5")
    example = SFTDataset([record], char_tokenizer, "prompt-completion")[0]
    assert example["input_ids"] == char_tokenizer("2+3=5")["input_ids"] + [2]
    assert example["labels"] == [-100] * 4 + char_tokenizer("5")["input_ids"] + [2]


def test_conversational_prompt_completion_masks_the_templated_prompt():
    tokenizer = chat_tokenizer()
    record = Record(
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+3?"},
            ],
            "completion": [{"role": "assistant", "content": "5"}],
        },
        "x",
    )
    prompt, target = prompt_and_target(record, "prompt-completion", tokenizer)
    assert prompt == "<bos>system: Be brief.\nuser: 2+3?\nassistant: "
    assert target == "5\n"
    example = SFTDataset([record], tokenizer, "prompt-completion")[0]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == tokenizer("5\n")["input_ids"] + [2]
    mixed = Record({"prompt": "2+3?", "completion": [{"role": "assistant", "content": "5"}]}, "y")
    with pytest.raises(DatasetFormatError, match="y: 'prompt' and 'completion' must both be"):
        prompt_and_target(mixed, "prompt-completion", tokenizer)


def test_messages_target_only_the_last_assistant_turn():
    tokenizer = chat_tokenizer()
    messages = [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    example = SFTDataset([Record({"messages": messages}, "x")], tokenizer, "messages")[0]
    assert supervised_text(tokenizer, example) == "4\n<eos>"  # the earlier answer "2" is masked
    n_prompt = sum(1 for t in example["labels"] if t == -100)
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert tokenizer.decode(example["input_ids"][:n_prompt]) == (
        "<bos>system: Add.\nuser: 1+1?\nassistant: 2\nuser: 2+2?\nassistant: "
    )
    # "chat" is the same format under another name
    again = SFTDataset([Record({"messages": messages}, "x")], tokenizer, "chat")[0]
    assert again == example
    bad = Record({"messages": messages[:-1]}, "data.jsonl line 3")
    with pytest.raises(DatasetFormatError, match="data.jsonl line 3: 'messages' must be a list"):
        prompt_and_target(bad, "messages", tokenizer)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        prompt_and_target(Record({"messages": messages}, "x"), "messages", chat_tokenizer_none())


def chat_tokenizer_none():
    from conftest import make_char_tokenizer

    return make_char_tokenizer()  # no chat template


def test_templated_prompts_get_no_second_bos():
    tokenizer = chat_tokenizer(add_bos=True)  # BOS from the tokenizer and from the template
    bos = tokenizer.bos_token_id
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat = SFTDataset([Record({"messages": messages}, "x")], tokenizer, "messages")[0]
    plain = SFTDataset(
        [Record({"prompt": "hi", "completion": "yo"}, "x")], tokenizer, "prompt-completion"
    )[0]
    assert chat["input_ids"].count(bos) == 1 and chat["input_ids"][0] == bos
    assert plain["input_ids"].count(bos) == 1 and plain["input_ids"][0] == bos


# ---------------------------------------------------------------------------- files via datasets
def test_local_files_are_memory_mapped_arrow_tables(tmp_path):
    import datasets

    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"{i}?", "answer": str(i)}) + "\n" for i in range(5))
    )
    records = load_records(str(path), size=3)
    assert isinstance(records.rows, datasets.Dataset)
    assert records.rows.cache_files  # read from an Arrow file on disk, not held in memory
    assert len(records) == 3 and [r.fields["answer"] for r in records] == ["0", "1", "2"]
    assert [r.fields["answer"] for r in records[1:]] == ["1", "2"]
    assert records[-1].origin == f"{path} line 3"


def test_a_bad_record_names_its_line_past_blank_lines(tmp_path, char_tokenizer):
    good = json.dumps({"question": "a", "answer": "b"})
    path = tmp_path / "gaps.jsonl"
    path.write_text(f"{good}\n\n   \n{good}\n\n" + json.dumps({"question": "c"}) + f"\n{good}\n")
    records = load_records(str(path))
    assert [r.origin.rsplit(" ", 1)[1] for r in records] == ["1", "4", "6", "7"]
    with pytest.raises(DatasetFormatError, match="gaps.jsonl line 6: missing field 'answer'"):
        SFTDataset(records, char_tokenizer, "gsm8k")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(f"{good}\n\n{good}\n[1, 2]\n")
    with pytest.raises(DatasetFormatError, match="broken.jsonl line 4: expected a JSON object"):
        load_records(str(broken))


def test_json_list_data_key_and_csv_text_cells(tmp_path):
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    records = load_records(str(tmp_path / "list.json"))
    assert [r.fields for r in records] == rows and records[1].origin.endswith("list.json item 1")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    assert [r.fields for r in load_records(str(tmp_path / "wrapped.json"))] == rows
    # CSV cells stay the text written: no numbers, no NaN; a quoted cell may span lines
    (tmp_path / "t.csv").write_text('question,answer,input\n"a\nb",0.50,\nc,007,NA\n')
    records = load_records(str(tmp_path / "t.csv"))
    assert [r.fields for r in records] == [
        {"question": "a\nb", "answer": "0.50", "input": ""},
        {"question": "c", "answer": "007", "input": "NA"},
    ]
    assert [r.origin.rsplit(" ", 1)[1] for r in records] == ["3", "4"]
    (tmp_path / "long.csv").write_text("question,answer\na,b\nc,d,e\n")
    with pytest.raises(DatasetFormatError, match="long.csv line 3: more values than header"):
        load_records(str(tmp_path / "long.csv"))


def test_messages_jsonl_with_uneven_message_keys(tmp_path):
    # Arrow gives every message every key seen in the file (None where absent); a chat
    # template must see the messages as written
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% if 'name' in m %}({{ m['name'] }}){% endif %}: "
        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    first = [
        {"role": "user", "content": "hi", "name": "bo"},
        {"role": "assistant", "content": "yo"},
    ]
    second = [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "k"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (first, second)))
    records = load_records(str(path))
    prompt, target = prompt_and_target(records[1], "messages", tokenizer)
    assert (prompt, target) == ("user: ok\nassistant: ", "k\n")
    assert prompt_and_target(records[0], "messages", tokenizer)[0].startswith("user(bo): hi")
