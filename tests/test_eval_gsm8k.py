"""GSM8K: extraction and normalisation, real test answers, few-shot prompts, generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from torch import nn

from matryoshka_lora.eval import gsm8k

DATA = Path(__file__).parents[2] / "shared" / "data" / "gsm8k"
needs_data = pytest.mark.skipif(not (DATA / "test.jsonl").is_file(), reason="GSM8K data missing")


@needs_data
def test_real_answers_score_100_percent():
    rows = gsm8k.load_gsm8k_jsonl(DATA / "test.jsonl")
    assert len(rows) == 1319
    answers = [r["answer"] for r in rows]
    result = gsm8k.score_gsm8k(answers, answers)
    assert (result.strict_match, result.flexible_extract, result.n) == (100.0, 100.0, 1319)
    assert result.records[0].reference == "18" and result.records[0].strict == "18"
    # Shifting every reference by one makes every prediction wrong.
    shifted = [f"#### {int(r.reference) + 1}" for r in result.records]
    wrong = gsm8k.score_gsm8k(answers, shifted)
    assert wrong.strict_match == 0.0 and wrong.flexible_extract == 0.0
    assert len(gsm8k.load_gsm8k_jsonl(DATA / "test.jsonl", limit=5)) == 5


def test_extraction():
    text = "She has 3 + 4 = 7 apples.\n#### 7\nQuestion: more #### 9"
    assert gsm8k.extract_strict(text) == "7"  # the first #### line
    assert gsm8k.extract_flexible(text) == "9"  # the last number
    assert gsm8k.extract_strict("The answer is 7") is None
    assert gsm8k.extract_flexible("no digits here... at all.") is None
    assert gsm8k.extract_strict("#### -1,234.5") == "-1,234.5"
    assert gsm8k.extract_flexible("It costs $1,000.") == "$1,000"
    assert gsm8k.extract_flexible("total: -$5 and 2.50") == "2.50"


def test_normalisation_like_lm_eval():
    assert gsm8k.normalize_answer("Step 1...\n#### 1,000") == "1000"
    assert gsm8k.normalize_answer(" $18. ") == "18"
    assert gsm8k.normalize_answer("18.0") == "18.0"  # string comparison, as lm-eval


@pytest.mark.parametrize(
    ("generation", "strict", "flexible"),
    [
        ("3 + 15 = 18.\n#### 18", True, True),
        ("#### 18.", True, True),
        ("#### $18", False, True),  # strict needs a digit right after '#### '
        ("#### 1,8", True, True),  # commas are dropped: lm-eval's behaviour
        ("The answer is 18", False, True),
        ("#### 18\nThen 20 more.", True, False),
        ("#### 19", False, False),
        ("####18", False, True),  # no space after the marker
        ("18.0", False, False),
        ("", False, False),
    ],
)
def test_scoring_cases(generation, strict, flexible):
    result = gsm8k.score_gsm8k([generation], ["Some reasoning <<1+1=2>>2.\n#### 18"])
    assert result.records[0].strict_correct is strict
    assert result.records[0].flexible_correct is flexible
    assert result.strict_match == (100.0 if strict else 0.0)


def test_numeric_comparison_option_and_mismatch():
    assert gsm8k.score_gsm8k(["#### 18.0"], ["#### 18"], numeric=True).strict_match == 100.0
    assert gsm8k.score_gsm8k(["#### 18.0"], ["#### 18"]).strict_match == 0.0
    with pytest.raises(ValueError, match="2 generations but 1 answers"):
        gsm8k.score_gsm8k(["a", "b"], ["#### 1"])


def test_fewshot_prompt_format():
    shots = [{"question": "Q1?", "answer": "A1\n#### 1"}, {"question": "Q2?", "answer": "#### 2"}]
    prompt = gsm8k.build_fewshot_prompt("Q3?", shots)
    assert prompt == (
        "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer: #### 2\n\nQuestion: Q3?\nAnswer:"
    )
    assert gsm8k.build_fewshot_prompt("Q?", trailing_space=True) == "Question: Q?\nAnswer: "


# ---------------------------------------------------------------- generation on tiny models
class ForwardCounter:
    def __init__(self, module: nn.Module):
        self.calls = 0
        module.register_forward_hook(self.hook)

    def hook(self, *args):
        self.calls += 1


def constant_model(token_id: int):
    """A tiny Llama whose greedy choice is always ``token_id`` (a bias-only LM head)."""
    model = make_tiny_llama()
    head = nn.Linear(32, 97, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


PROMPTS = ["what is 2 plus 3 ?", "the cat sat on the mat . what is 4 minus 1 ?", "what is 7 ?"]


def test_batched_generation_equals_one_by_one():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(seed=5)
    model.generation_config.eos_token_id = None
    batched = gsm8k.generate_greedy(
        model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, stop=()
    )
    single = [
        gsm8k.generate_greedy(model, tokenizer, [p], max_new_tokens=6, batch_size=1, stop=())[0]
        for p in PROMPTS
    ]
    assert batched == single
    assert all(len(text.split()) == 6 for text in batched)  # word-level: one word per token
    assert tokenizer.padding_side == "right"  # restored


def test_constant_number_flexible_right_strict_wrong():
    tokenizer = make_tiny_tokenizer()
    model = constant_model(tokenizer.convert_tokens_to_ids("7"))
    examples = [{"question": "what is 3 plus 4 ?", "answer": "3 plus 4 is 7 .\n#### 7"}] * 2
    result = gsm8k.evaluate_gsm8k(model, tokenizer, examples, max_new_tokens=4, batch_size=2)
    assert [r.generation for r in result.records] == ["7 7 7 7"] * 2
    assert (result.strict_match, result.flexible_extract) == (0.0, 100.0)
    fn = gsm8k.gsm8k_metric_fn(
        tokenizer, iter(examples), metric="flexible_extract", max_new_tokens=2
    )
    assert fn(model) == 100.0 and fn(model) == 100.0  # the iterator is replayed


@pytest.mark.parametrize("token", ["Question:", "[EOS]"])
def test_generation_stops_at_stop_string_or_eos(token):
    tokenizer = make_tiny_tokenizer()
    model = constant_model(tokenizer.convert_tokens_to_ids(token))
    model.generation_config.eos_token_id = None
    counter = ForwardCounter(model.lm_head)
    out = gsm8k.generate_greedy(model, tokenizer, PROMPTS[:2], max_new_tokens=8, batch_size=2)
    assert out == ["", ""]
    assert counter.calls == 1  # stopped right after the first token, not after 8
    counter.calls = 0
    gsm8k.generate_greedy(model, tokenizer, PROMPTS[:1], max_new_tokens=8, stop=())
    assert counter.calls == (1 if token == "[EOS]" else 8)


@pytest.mark.slow
def test_real_model_generation():
    from matryoshka_lora.assets import load_causal_lm

    try:
        model, tokenizer = load_causal_lm("smollm2")
    except FileNotFoundError as error:
        pytest.skip(str(error))
    examples = [
        {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "#### 7"},
        {"question": "A box holds 10 pens. How many pens are in 2 boxes?", "answer": "#### 20"},
    ]
    shots = [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2.\n#### 2"}]
    result = gsm8k.evaluate_gsm8k(
        model, tokenizer, examples, shots, max_new_tokens=12, batch_size=2
    )
    assert result.n == 2 and 0.0 <= result.strict_match <= 100.0
    prompts = [gsm8k.build_fewshot_prompt(e["question"], shots) for e in examples]
    single = [gsm8k.generate_greedy(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert [r.generation for r in result.records] == single
    assert all("Question:" not in r.generation for r in result.records)
