"""Helpers for the eval tests (no tests here): a tiny offline tokenizer and adapter setup."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from matryoshka_lora.model import adapter_layers

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = (
    ["Question:", "Answer:", "####", "what", "is", "plus", "minus", "the", "a", "cat", "dog"]
    + ["sat", "on", "mat", "ran", "far", "red", "blue", "sky", "?", ".", "$", "answer"]
    + [str(i) for i in range(21)]
)
VOCAB_SIZE = 97  # the tiny Llama's vocabulary: every id the model can emit decodes to a word
FILLERS = [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIALS) - len(WORDS))]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer (whitespace split, BOS prepended) with exactly 97 tokens."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + FILLERS)}
    assert len(vocab) == VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )


def randomise_adapters(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter random A and B so that each rank is a different function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
