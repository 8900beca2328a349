"""Log-likelihood multiple choice against a direct per-choice computation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from matryoshka_lora.eval import (
    MultipleChoiceItem,
    continuation_loglikelihoods,
    multiple_choice_accuracy,
    multiple_choice_metric_fn,
)
from matryoshka_lora.eval.multiple_choice import encode_pair

ITEMS = [
    MultipleChoiceItem("the cat sat on the", ("mat", "sky", "red dog ran far"), 0),
    MultipleChoiceItem("what is 2 plus 3 ?", ("5", "6 .", "7"), 0),
    MultipleChoiceItem("the sky is", ("blue", "red", "a cat", "the mat ."), 0),
]


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, tok].item() for j, tok in enumerate(cont))


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = make_tiny_llama(seed=2), make_tiny_tokenizer()
    direct = [
        [direct_loglikelihood(model, tokenizer, it.context, " " + c) for c in it.choices]
        for it in ITEMS
    ]
    return model, tokenizer, direct


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def test_batched_loglikelihoods_equal_direct(setup):
    model, tokenizer, direct = setup
    requests = [(it.context, " " + c) for it in ITEMS for c in it.choices]
    flat = [v for row in direct for v in row]
    for batch_size in (1, 4, 16):
        got = continuation_loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
        assert got == pytest.approx(flat, abs=1e-4)
    assert len(set(round(v, 3) for v in flat)) == len(flat)  # a non-trivial case


def test_accuracy_known_from_direct_scores(setup):
    model, tokenizer, direct = setup
    best = [argmax(row) for row in direct]
    worst = [min(range(len(row)), key=row.__getitem__) for row in direct]
    best_norm = [
        argmax([v / len(c) for v, c in zip(row, it.choices, strict=True)])
        for row, it in zip(direct, ITEMS, strict=True)
    ]
    relabel = lambda labels: [  # noqa: E731
        MultipleChoiceItem(it.context, it.choices, lab)
        for it, lab in zip(ITEMS, labels, strict=True)
    ]
    assert multiple_choice_accuracy(model, tokenizer, relabel(best))["acc"] == 100.0
    assert multiple_choice_accuracy(model, tokenizer, relabel(worst))["acc"] == 0.0
    norm = multiple_choice_accuracy(model, tokenizer, relabel(best_norm), batch_size=3)
    assert norm["acc_norm"] == 100.0
    expected_acc = 100 * sum(b == n for b, n in zip(best, best_norm, strict=True)) / 3
    assert norm["acc"] == pytest.approx(expected_acc)
    assert norm["n"] == 3
    # Mappings work too; the metric fn returns one value or both.
    as_dicts = [
        {"context": it.context, "choices": list(it.choices), "label": b}
        for it, b in zip(ITEMS, best, strict=True)
    ]
    assert multiple_choice_metric_fn(tokenizer, iter(as_dicts))(model) == 100.0
    both = multiple_choice_metric_fn(tokenizer, as_dicts, metric=None)(model)
    assert set(both) == {"acc", "acc_norm"}


def test_acc_norm_divides_by_choice_characters_without_delimiter(monkeypatch):
    import matryoshka_lora.eval.multiple_choice as mc

    seen = []

    def fake(model, tokenizer, requests, *args):
        seen.extend(requests)
        return [-2.2, -4.0]

    monkeypatch.setattr(mc, "continuation_loglikelihoods", fake)
    item = MultipleChoiceItem("q", ("ab", "abcd"), 1)
    result = mc.multiple_choice_accuracy(None, None, [item])
    assert seen == [("q", " ab"), ("q", " abcd")]
    # acc: -2.2 > -4.0 picks choice 0; acc_norm: -2.2/2 = -1.1 < -4.0/4 = -1.0 picks choice 1
    # (dividing by the lengths with the space, 3 and 5, would pick choice 0).
    assert (result["acc"], result["acc_norm"]) == (0.0, 100.0)


def test_empty_context_uses_bos_and_truncation_keeps_continuation(setup):
    model, tokenizer, _ = setup
    ctx, cont = encode_pair(tokenizer, "", " cat sat")
    assert ctx == [tokenizer.bos_token_id] and len(cont) == 2
    ctx, cont = encode_pair(tokenizer, "the cat ", "sat")  # trailing space moves over
    assert tokenizer.convert_ids_to_tokens(cont) == ["sat"]
    long_ctx = "the cat sat on the mat . " * 3
    full = tokenizer(long_ctx + " blue sky")["input_ids"]
    got = continuation_loglikelihoods(model, tokenizer, [(long_ctx, " blue sky")], max_length=6)[0]
    kept = full[-7:]  # 6 model inputs + the last target
    with torch.no_grad():
        logp = model(torch.tensor([kept[:-1]])).logits[0].double().log_softmax(-1)
    expected = logp[4, kept[5]].item() + logp[5, kept[6]].item()
    assert got == pytest.approx(expected, abs=1e-4)


def test_errors(setup):
    model, tokenizer, _ = setup
    with pytest.raises(ValueError, match="not an index"):
        MultipleChoiceItem("q", ("a", "b"), 2)
    with pytest.raises(ValueError, match="no multiple-choice items"):
        multiple_choice_accuracy(model, tokenizer, [])
    with pytest.raises(ValueError, match="unknown metric"):
        multiple_choice_metric_fn(tokenizer, ITEMS, metric="f1")


@pytest.mark.slow
def test_real_bpe_tokenizer_boundary():
    from transformers import AutoTokenizer

    from matryoshka_lora.assets import smollm2_dir

    try:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    except FileNotFoundError as error:
        pytest.skip(str(error))
    ctx, cont = encode_pair(tokenizer, "The capital of France is", " Paris")
    assert tokenizer.decode(cont) == " Paris"
    assert tokenizer.decode(ctx).endswith("The capital of France is")
    ctx2, cont2 = encode_pair(tokenizer, "The capital of France is ", "Paris")
    assert (ctx2, cont2) == (ctx, cont)  # the trailing space belongs to the continuation
