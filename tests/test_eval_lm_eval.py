"""lm-evaluation-harness wrapper: clear error without lm_eval, right calls with a fake one."""

from __future__ import annotations

import sys
import types

import pytest
from conftest import LLAMA_TARGETS, make_tiny_llama

import matryoshka_lora as ml
from matryoshka_lora.eval import flatten_lm_eval_results, lm_eval_sweep
from matryoshka_lora.model import adapter_layers, adapters_disabled, get_config, get_rank


def adapted():
    model = make_tiny_llama()
    ml.attach(
        model, ml.NestedLoraConfig(r=4, target_modules=LLAMA_TARGETS, inference_scale="paper")
    )
    return model


def test_clear_import_error_without_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'matryoshka-lora\[eval\]'"):
        lm_eval_sweep(adapted(), tokenizer=None, tasks=["gsm8k"])


@pytest.fixture
def fake_lm_eval(monkeypatch):
    calls = {"hflm": [], "evaluate": []}

    class HFLM:
        def __init__(self, pretrained, tokenizer=None, batch_size=1, **kwargs):
            calls["hflm"].append(
                {
                    "pretrained": pretrained,
                    "tokenizer": tokenizer,
                    "batch_size": batch_size,
                    **kwargs,
                }
            )
            self.model = pretrained

    def simple_evaluate(model, tasks, num_fewshot=None, limit=None, **kwargs):
        layers = adapter_layers(model.model).values()
        disabled = all(layer.disabled for layer in layers)
        rank = 0 if disabled else get_rank(model.model)
        scale = get_config(model.model).inference_scale
        calls["evaluate"].append((tuple(tasks), num_fewshot, limit, rank, scale, kwargs))
        return {
            "results": {
                task: {
                    "alias": task,
                    "exact_match,strict-match": rank / 10 + (num_fewshot or 0) / 100,
                    "exact_match_stderr,strict-match": 0.01,
                    "bogus": "N/A",
                }
                for task in tasks
            },
            "configs": {},
        }

    root = types.ModuleType("lm_eval")
    root.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    root.models, models.huggingface = models, hf
    monkeypatch.setitem(sys.modules, "lm_eval", root)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    return calls


def test_calls_per_rank_with_fake_lm_eval(fake_lm_eval):
    model, tokenizer = adapted(), object()
    result = lm_eval_sweep(
        model,
        tokenizer,
        ["gsm8k"],
        num_fewshot=8,
        batch_size=4,
        include_base=True,
        limit=5,
        progress=False,
        evaluate_kwargs={"apply_chat_template": False},
    )
    assert len(fake_lm_eval["hflm"]) == 1  # wrapped once, reused at every rank
    assert fake_lm_eval["hflm"][0]["pretrained"] is model
    assert fake_lm_eval["hflm"][0]["tokenizer"] is tokenizer
    assert fake_lm_eval["hflm"][0]["batch_size"] == 4
    assert fake_lm_eval["evaluate"] == [
        (("gsm8k",), 8, 5, rank, scale, {"apply_chat_template": False})
        for rank, scale in [(0, "paper"), (1, "paper"), (2, "paper"), (4, "paper")]
    ]
    key = "gsm8k/exact_match,strict-match"
    assert result.metrics == [key]  # stderr and non-numeric entries dropped
    assert result.curve("paper").as_mapping() == pytest.approx({1: 0.18, 2: 0.28, 4: 0.48})
    assert result.base_value() == pytest.approx(0.08)
    assert result.info["lm_eval"] == {"tasks": ["gsm8k"], "num_fewshot": 8, "limit": 5}
    assert get_rank(model) is None


def test_per_task_fewshot_counts(fake_lm_eval):
    model = adapted()
    result = lm_eval_sweep(
        model,
        None,
        ["gsm8k", "arc_challenge"],
        num_fewshot={"gsm8k": 3, "arc_challenge": 25},
        ranks=[2],
        inference_scales=("paper", "trained"),
        progress=False,
    )
    assert [(c[0], c[1], c[3], c[4]) for c in fake_lm_eval["evaluate"]] == [
        (("gsm8k",), 3, 2, "paper"),
        (("arc_challenge",), 25, 2, "paper"),
        (("gsm8k",), 3, 2, "trained"),
        (("arc_challenge",), 25, 2, "trained"),
    ]
    assert result.values["arc_challenge/exact_match,strict-match"]["trained"][2] == pytest.approx(
        0.45
    )
    with pytest.raises(ValueError, match=r"no count for tasks \['hellaswag'\]"):
        lm_eval_sweep(model, None, ["hellaswag"], num_fewshot={"gsm8k": 3}, progress=False)


def test_flatten_with_stderr():
    output = {"results": {"arc": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "arc"}}}
    assert flatten_lm_eval_results(output) == {"arc/acc,none": 0.5}
    assert flatten_lm_eval_results(output, include_stderr=True) == {
        "arc/acc,none": 0.5,
        "arc/acc_stderr,none": 0.1,
    }


def test_real_lm_eval_on_a_local_task_agrees_with_our_multiple_choice_evaluator(tmp_path):
    """The installed lm-evaluation-harness, offline, on a local multiple-choice task:
    its ``acc`` / ``acc_norm`` at each rank equal our own log-likelihood evaluator's."""
    pytest.importorskip("lm_eval")
    import json

    import torch
    from conftest import make_char_tokenizer
    from lm_eval.tasks import TaskManager

    from matryoshka_lora.eval import multiple_choice_accuracy

    generator = torch.Generator().manual_seed(0)
    items = []
    for i in range(10):
        a, b = (int(x) for x in torch.randint(1, 9, (2,), generator=generator))
        choices = [str(a + b), str(a * b + 1), str(abs(a - b)) + "0"]
        items.append({"question": f"{a}+{b}=", "choices": choices, "label": i % 3})
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    model, tokenizer = adapted(), make_char_tokenizer()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.5)
    sweep = lm_eval_sweep(
        model,
        tokenizer,
        ["tiny_mc"],
        batch_size=4,
        ranks=[1, 2, 4],
        include_base=True,
        progress=False,
        evaluate_kwargs={"task_manager": TaskManager(include_path=str(tmp_path))},
    )
    ours = [
        {"context": it["question"], "choices": it["choices"], "label": it["label"]} for it in items
    ]
    for rank in (1, 2, 4):
        with ml.at_rank(model, rank):
            expected = multiple_choice_accuracy(model, tokenizer, ours, add_special_tokens=False)
        assert 100 * sweep.values["tiny_mc/acc,none"]["paper"][rank] == pytest.approx(
            expected["acc"]
        )
        assert 100 * sweep.values["tiny_mc/acc_norm,none"]["paper"][rank] == pytest.approx(
            expected["acc_norm"]
        )
    with adapters_disabled(model):
        base = multiple_choice_accuracy(model, tokenizer, ours, add_special_tokens=False)
    assert 100 * sweep.base["tiny_mc/acc,none"] == pytest.approx(base["acc"])
    seen = {*sweep.values["tiny_mc/acc,none"]["paper"].values(), sweep.base["tiny_mc/acc,none"]}
    assert len(seen) > 1  # the ranks really are different models here
