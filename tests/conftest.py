"""Shared fixtures: tiny models built from configs (no hub access)."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama_config(**overrides) -> LlamaConfig:
    """The tiny Llama's config (vocab 97 so the char tokenizer fits); ``overrides`` change fields."""
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaConfig(**{**fields, **overrides})


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_llama_config()
    config._name_or_path = "tiny-llama"
    return LlamaForCausalLM(config).to(dtype).eval()


def save_tiny_llama_dir(folder) -> None:
    """A model folder as the CLI reads it: the tiny Llama (seed 0, 256 positions, pad/bos/eos
    ids 0/1/2) and the char tokenizer."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    config._name_or_path = "tiny-gpt2"
    return GPT2LMHeadModel(config).eval()


TINY_MODELS = {"llama": (make_tiny_llama, LLAMA_TARGETS), "gpt2": (make_tiny_gpt2, GPT2_TARGETS)}


def attached_tiny(arch: str = "llama", **config):
    """A tiny ``arch`` model with a rank-8 Matryoshka adapter deployed at the paper scale on
    its usual targets (``config`` overrides any field); B is still 0."""
    import matryoshka_lora as ml

    make, targets = TINY_MODELS[arch]
    defaults = {"r": 8, "method": "matryoshka", "target_modules": targets}
    return ml.attach(
        make(), ml.NestedLoraConfig(**{**defaults, "inference_scale": "paper", **config})
    )


def cpu_trainer_settings(output_dir, **overrides) -> dict:
    """Trainer settings (``TrainingArguments`` / ``SFTConfig``) for a test on CPU: no
    reports, no progress bar, a log entry per step, no checkpoints unless overridden."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    return {**settings, **overrides}


def short_run_settings(output_dir, **overrides) -> dict:
    """The short Trainer tests' settings: 6 optimizer steps of 2 x 2 accumulated examples at
    1e-2, a checkpoint every 3, seed 7."""
    settings = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=1e-2,
        save_steps=3,
        save_strategy="steps",
        seed=7,
        data_seed=7,
    )
    return cpu_trainer_settings(output_dir, **{**settings, **overrides})


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return make_tiny_gpt2()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(123))


CHAR_ALPHABET = list(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \n.,:?!#$%+-*/=()'\""
)


def make_char_tokenizer():
    """A character-level fast tokenizer (85 tokens, fits the tiny models' vocab of 97), offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + CHAR_ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()


def assert_tensors_close(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    """Each tensor within ``rtol`` of its expected value in relative Frobenius norm.

    Float32 rounding differs between equal computations done in another order
    (accumulated micro-batches, all-reduced processes); Adam amplifies it on single
    elements whose gradients are tiny, so the whole tensor's norm is the scale.
    """
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        error = (actual[key].double() - want.double()).norm()
        scale = want.double().norm().clamp_min(1e-12)
        assert error <= rtol * scale, f"{key}: relative error {float(error / scale):.2e}"


def torchrun(script, *args, processes: int = 2) -> list[str]:
    """The command that runs ``script`` with ``args`` in ``processes`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        str(script),
        *map(str, args),
    ]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to oversubscription on shared
    cores (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
