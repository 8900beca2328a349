"""Shared fixtures and helpers: tiny models built from configs (no hub access), tokenizers,
adapter set-ups and the helpers several test modules use (a test module never imports
another)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

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


def save_tiny_llama_dir(folder, **overrides) -> None:
    """A model folder as the CLI reads it: the tiny Llama (seed 0, 256 positions, pad/bos/eos
    ids 0/1/2; ``overrides`` change config fields) and the char tokenizer."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        **{"max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
        | overrides
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    config._name_or_path = "tiny-gpt2"
    return GPT2LMHeadModel(config).eval()


def tiny_bert(**overrides):
    """A tiny 3-class BERT sequence classifier (seed 0) of the tiny Llama's sizes (vocabulary,
    width, depth, heads, MLP, positions); ``overrides`` change config fields."""
    from transformers import BertConfig, BertForSequenceClassification

    llama = tiny_llama_config()
    names = ["vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings"]
    names += ["num_hidden_layers", "num_attention_heads"]
    sizes = {name: getattr(llama, name) for name in names}
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**{**sizes, "num_labels": 3, **overrides}))


TINY_MODELS = {"llama": (make_tiny_llama, LLAMA_TARGETS), "gpt2": (make_tiny_gpt2, GPT2_TARGETS)}


def llama_with_adapter(dtype: torch.dtype = torch.float32, **config) -> LlamaForCausalLM:
    """The tiny Llama (seed 0, ``dtype``) with a rank-8 adapter on every projection
    (``config`` overrides fields); B is still 0."""
    import matryoshka_lora as ml

    fields = {"r": 8, "target_modules": LLAMA_TARGETS, **config}
    return ml.attach(make_tiny_llama(dtype=dtype), ml.NestedLoraConfig(**fields))


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


def run_bench_smoke(tmp_path, script: str, *args: str, timeout: float = 300):
    """Run ``bench/<script> --smoke --write <args>`` into ``tmp_path``; the BENCHMARKS file it
    wrote (its JSON results go to ``tmp_path`` too). The script must succeed."""
    import subprocess
    from pathlib import Path

    target = tmp_path / "BENCHMARKS.md"
    script_path = Path(__file__).resolve().parents[1] / "bench" / script
    command = [sys.executable, str(script_path), "--smoke", *args, "--write"]
    command += ["--benchmarks-file", str(target), "--results-dir", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return target


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


def short_loop_config(output_dir, **overrides):
    """The plain loop's short test run: 8 optimizer steps of 4 examples, seed 1, no progress
    bar (``overrides`` change fields; the learning rate has no default here)."""
    from matryoshka_lora.train import TrainConfig

    settings = dict(output_dir=str(output_dir), batch_size=4, max_steps=8, progress=False, seed=1)
    return TrainConfig(**{**settings, **overrides})


def assert_logged_equal(logged: dict, curves: dict) -> None:
    """The logged ``eval_<metric>_r<rank>`` values and AURACs equal ``curves`` (metric ->
    ``RankCurve`` of an independent sweep), and the ranks' losses all differ."""
    for metric, curve in curves.items():
        for rank, value in curve.as_mapping().items():
            assert logged[f"eval_{metric}_r{rank}"] == pytest.approx(value, rel=1e-6, abs=1e-9)
        assert logged[f"eval_aurac_{metric}"] == pytest.approx(curve.aurac_log, rel=1e-6)
    assert logged["eval_aurac"] == logged["eval_aurac_token_accuracy"]
    losses = [logged[f"eval_loss_r{r}"] for r in curves["loss"].as_mapping()]
    assert len(losses) > 1 and len(set(losses)) == len(losses)  # the ranks really differ


def assert_one_loop_step_loss(tmp_path, model, data, expected: float, objective, seed: int):
    """One step of the plain loop over all of ``data`` (one micro-batch) logs ``expected``."""
    from matryoshka_lora.train import PaddingCollator, TrainConfig, train_adapter

    config = TrainConfig(
        output_dir=str(tmp_path / "loop"),
        max_steps=1,
        batch_size=len(data),
        progress=False,
        seed=seed,
    )
    result = train_adapter(model, data, config, PaddingCollator(0), objective=objective)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def assert_trainer_loss(tmp_path, model, batch: dict, expected: float, objective, seed: int = 7):
    """``NestedLoraTrainer.compute_loss`` on ``batch``, in train mode outside a training step
    (the draws of step 0, micro-batch 0), equals ``expected``."""
    from transformers import TrainingArguments

    from matryoshka_lora.train import PaddingCollator
    from matryoshka_lora.train.hf_trainer import NestedLoraTrainer

    args = TrainingArguments(**cpu_trainer_settings(tmp_path / "trainer", seed=seed))
    trainer = NestedLoraTrainer(
        model=model, args=args, data_collator=PaddingCollator(0), objective=objective
    )
    model.train()
    assert trainer.compute_loss(model, batch).item() == pytest.approx(expected, rel=1e-5)


def assert_checkpointing_keeps_gradients(make_model, loss_of, reentrant: bool) -> None:
    """With gradient checkpointing (``reentrant`` or not) every parameter's gradient of
    ``loss_of(model)`` is what it is without: checkpointed blocks recompute their own forward."""
    grads = []
    for checkpointing in (False, True):
        model = make_model()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        loss_of(model).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def worker_train_config(output_dir, batch_size: int, **overrides):
    """The worker processes' plain-loop run: 4 optimizer steps of 2 accumulated micro-batches
    of ``batch_size`` at 1e-2, seed 3, no progress bar (``overrides`` change fields)."""
    from matryoshka_lora.train import TrainConfig

    settings = dict(
        output_dir=str(output_dir),
        learning_rate=1e-2,
        batch_size=batch_size,
        gradient_accumulation_steps=2,
        max_steps=4,
        progress=False,
        seed=3,
    )
    return TrainConfig(**{**settings, **overrides})


def save_adapter_tensors(model, path) -> None:
    """The full adapter tensors as this process sees them (gathered when sharded) to ``path``
    (safetensors); a collective in a sharded run."""
    from safetensors.torch import save_file

    from matryoshka_lora.train.distributed import gathered_adapters

    with gathered_adapters(model):
        tensors = {k: v.contiguous() for k, v in adapter_copy(model).items()}
    save_file(tensors, str(path))


def export_gathered(model, folder, merged: bool) -> None:
    """The rank-4 PEFT export of a (sharded) ``model`` to ``folder/peft`` and, with ``merged``,
    its rank-4 merged model to ``folder/merged``, each from the gathered tensors (collectives)."""
    import os

    from matryoshka_lora.export import export_peft, save_merged
    from matryoshka_lora.train.distributed import run_gathered

    run_gathered(model, lambda m: export_peft(m, 4, os.path.join(folder, "peft")))
    if merged:
        save = lambda m: save_merged(m, 4, os.path.join(folder, "merged"))  # noqa: E731
        run_gathered(model, save, include_base=True)


def end_processes() -> None:
    """A worker's last step: leave the process group, if the run made one."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_workers(script, root, modes, timeout: float = 600, **env: str) -> dict:
    """Run the worker ``script OUT_DIR MODE`` once per mode, each into its own folder under
    ``root`` (``env`` added to its environment, one intra-op thread, this folder importable):
    alone for mode ``one``, else in 2 processes under torchrun. Each must succeed (its output
    ends the failure message). Returns mode -> its folder."""
    import os
    import subprocess
    from pathlib import Path

    folder = str(Path(__file__).parent)
    path = os.pathsep.join([folder, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env}
    out = {}
    for mode in modes:
        out[mode] = root / mode
        out[mode].mkdir()
        command = [sys.executable, str(script), str(out[mode]), mode]
        if mode != "one":
            command = torchrun(script, out[mode], mode)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{mode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return out


def gathered_runs(runs: dict, mode: str, variant: str) -> tuple[dict, dict, dict]:
    """``variant``'s final adapters of the one-process run, the DDP run and process 0 of
    ``mode`` (``runs``: mode -> the worker's output folder), after checking that both of
    ``mode``'s processes gathered the same fp32 adapter (A and B of 7 projections x 2 layers)
    and that the run trained (every B moved from 0)."""
    from safetensors.torch import load_file

    one, ddp, r0, r1 = (
        load_file(runs[name] / variant / f"rank{rank}.safetensors")
        for name, rank in (("one", 0), ("ddp", 0), (mode, 0), (mode, 1))
    )
    assert set(r0) == set(r1) == set(ddp) == set(one) and len(one) == 2 * 7 * 2
    for key in one:
        assert r0[key].dtype == torch.float32, key  # fp32 adapters, also under a bf16 base
        assert torch.equal(r0[key], r1[key]), key  # both processes gather the same adapter
    assert all(one[k].abs().max() > 1e-2 for k in one if k.endswith("lora_B"))
    return one, ddp, r0


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to oversubscription on shared
    cores (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- adapters
def adapter_copy(model) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s adapter tensors (to compare before and after a step)."""
    from matryoshka_lora.model import adapter_state_dict

    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def randomise_adapters(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter random A and B so that each rank is a different function."""
    from matryoshka_lora.model import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def trained_llama(seed: int = 7, scale: float = 0.05, make=None, targets=None, **config):
    """A tiny model (``make()``, default the Llama) with a rank-8 adapter on ``targets``
    (``config`` overrides fields) whose B is ``scale`` x N(0, 1) drawn with ``seed``: as after
    training, every rank is a different function."""
    import matryoshka_lora as ml
    from matryoshka_lora.model import adapter_layers

    model = (make or make_tiny_llama)()
    fields = {"r": 8, "target_modules": targets or LLAMA_TARGETS, **config}
    ml.attach(model, ml.NestedLoraConfig(**fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
    return model


def all_rank_logits(model, ids) -> dict:
    """``model``'s logits on ``ids`` at full rank (key ``None``) and at each rank 1..8."""
    import matryoshka_lora as ml

    out = {}
    with torch.no_grad():
        out[None] = model(ids).logits
        for r in range(1, 9):
            with ml.at_rank(model, r):
                out[r] = model(ids).logits
    return out


class CrashAt(TrainerCallback):
    """Raise at the end of optimizer step ``step``: a simulated kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


# ---------------------------------------------------------------------------- tokenizers
# A chat template in the char tokenizer's alphabet: "<bos>role: content\n" per turn
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

WORD_SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = (
    ["Question:", "Answer:", "####", "what", "is", "plus", "minus", "the", "a", "cat", "dog"]
    + ["sat", "on", "mat", "ran", "far", "red", "blue", "sky", "?", ".", "$", "answer"]
    + [str(i) for i in range(21)]
)
WORD_VOCAB_SIZE = 97  # the tiny Llama's vocabulary: every id the model can emit decodes to a word


def make_tiny_tokenizer():
    """Word-level tokenizer (whitespace split, BOS prepended) with exactly 97 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fillers = [f"w{i}" for i in range(WORD_VOCAB_SIZE - len(WORD_SPECIALS) - len(WORDS))]
    vocab = {token: i for i, token in enumerate(WORD_SPECIALS + WORDS + fillers)}
    assert len(vocab) == WORD_VOCAB_SIZE
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


# ---------------------------------------------------------------------------- command line
def run_main(capsys, *args) -> tuple[int, str, str]:
    """``cli.main`` in-process: (exit status, stdout, stderr)."""
    from matryoshka_lora import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as stop:  # argparse: --help, usage errors
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A failed command that printed one line, no traceback, containing every needle."""
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------- comparisons
def write_dataset(folder) -> str:
    """A GSM8K-style local dataset in ``folder``: 16 train and 4 test sums, one jsonl each."""
    folder.mkdir(exist_ok=True)
    for split, n, offset in (("train", 16, 0), ("test", 4, 50)):
        rows = [
            {"question": f"{a}+{a + 1}?", "answer": f"{a}+{a + 1}={2 * a + 1}\n#### {2 * a + 1}"}
            for a in range(offset, offset + n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def tiny_spec(dataset="unused", **kw):
    """A comparison on the tiny Llama: rank 4, two seeds, two steps, two rates per method."""
    from matryoshka_lora.compare import ComparisonSpec

    base = dict(
        model="tiny",
        dataset=dataset,
        max_rank=4,
        target_modules=LLAMA_TARGETS,
        seeds=(0, 1),
        steps=2,
        batch_size=2,
        warmup_steps=0,
        max_length=48,
        train_size=8,
        val_size=4,
        test_size=4,
        learning_rates={
            "lora": [1e-3, 3e-2],
            "lora_r": [1e-3, 3e-2],
            "dylora": [1e-3, 3e-2],
            "matryoshka": [1e-3, 3e-2],
        },
    )
    return ComparisonSpec(**{**base, **kw})
