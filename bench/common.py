"""Shared helpers of the speed and memory benchmarks (see ``bench/README.md``).

The scripts in this folder import this module by name (Python puts a script's own
folder first on ``sys.path``). Run as a script, it is the worker that measures the
peak memory of one configuration in a fresh process::

    python bench/common.py memory-worker '<json spec>'
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from matryoshka_lora.config import LLAMA_PROJECTIONS

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SECTION_HEADING = "## Speed and memory"
SEVEN_TARGETS = list(LLAMA_PROJECTIONS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIB = 1024.0 * 1024.0

# Models built from a LlamaConfig (random weights; speed does not depend on the values).
LLAMA_SPECS: dict[str, dict[str, int]] = {
    # hidden 1024: adapters are a smaller FLOP fraction than on SmolLM2 (hidden 576).
    "wide": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=8192,
    ),
    # a few-millisecond model for --smoke runs and tests
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}
MODEL_DESCRIPTIONS = {
    "smollm2": "SmolLM2-135M-Instruct (30 layers, hidden 576, MLP 1536, vocab 49152)",
    "wide": "Llama from LlamaConfig: 4 layers, hidden 1024, MLP 2816, 16 heads / 8 KV heads, "
    "vocab 8192, random weights",
    "tiny": "Llama from LlamaConfig: 2 layers, hidden 64, MLP 128, vocab 256 (smoke test)",
}


# --------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser, *, repeats: int, warmup: int) -> None:
    g = parser.add_argument_group("common benchmark options")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32", help="base model dtype")
    g.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help="timed rounds; each round runs every configuration once (round-robin)",
    )
    g.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help="untimed rounds before the timed ones",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: the CPU machine is shared)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, tiny batch, 1 repeat, no warmup: checks the script runs",
    )
    g.add_argument(
        "--write",
        action="store_true",
        help="replace this script's subsection of BENCHMARKS.md and write bench/results/*.json",
    )
    g.add_argument(
        "--tag",
        default="",
        help="suffix of the BENCHMARKS.md block and JSON name (a second run kept beside the first)",
    )
    g.add_argument("--benchmarks-file", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    g.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    g.add_argument(
        "--profile",
        action="store_true",
        help="also profile some configurations side by side (torch.profiler, interleaved rounds)",
    )
    g.add_argument("--profile-rows", type=int, default=12)
    g.add_argument("--profile-rounds", type=int, default=3)


def setup_runtime(args: argparse.Namespace) -> torch.device:
    if args.smoke:
        args.repeats, args.warmup = 1, 0
        # smoke output never lands in the repository unless asked for explicitly
        scratch = Path(tempfile.gettempdir()) / "matryoshka-lora-bench-smoke"
        if args.benchmarks_file == REPO_ROOT / "BENCHMARKS.md":
            args.benchmarks_file = scratch / "BENCHMARKS.md"
        if args.results_dir == BENCH_DIR / "results":
            args.results_dir = scratch / "results"
        if args.write:
            args.benchmarks_file.parent.mkdir(parents=True, exist_ok=True)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:  # already set (parallel work has started)
        pass
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(args.device)


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join(["python", script_text, *sys.argv[1:]])


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine_info(device: torch.device) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict[str, str]:
    import peft
    import transformers

    import matryoshka_lora

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "matryoshka_lora": matryoshka_lora.__version__,
    }
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            out["git"] = commit + (" (src modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def header_lines(meta: dict[str, Any]) -> list[str]:
    m, v = meta["machine"], meta["versions"]
    machine = (
        f"{m['cpu']}, {m['usable_cores']} usable cores of {m['cpu_cores']}, "
        f"torch threads {m['torch_threads']} (interop {m['torch_interop_threads']}), "
        f"load average at start {m['load_average_at_start']}"
    )
    if "gpu" in m:
        machine = f"GPU {m['gpu']} (CUDA {m['cuda']}); host CPU {machine}"
    libs = ", ".join(f"{k} {val}" for k, val in v.items())
    return [
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; wall time {meta['wall_s']:.0f} s",
        f"- Machine: {machine}",
        f"- Versions: {libs}",
        f"- Settings: {meta['settings']}",
    ]


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- models
def load_base(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A frozen base causal LM: the packaged SmolLM2 or a Llama built from LlamaConfig."""
    if name == "smollm2":
        from matryoshka_lora.assets import load_causal_lm

        model, _ = load_causal_lm("smollm2", dtype=dtype)
    elif name in LLAMA_SPECS:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(max_position_embeddings=4096, **LLAMA_SPECS[name])
        config._name_or_path = f"llama-{name}"
        model = LlamaForCausalLM(config).to(dtype)
    else:
        raise SystemExit(f"unknown model {name!r}: choose smollm2, {', '.join(LLAMA_SPECS)}")
    model.to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.sum()  # page in lazily loaded (mmapped) weights, so RSS baselines include them
    return model


def clone_sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the same tensors.

    Every configuration of a benchmark gets its own module tree (adapters, PEFT
    wrappers) over one set of frozen base weights, so a run holds the base once.
    Never merge into such a clone: the update would leak into every other one.
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def target_linears(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]


def adapter_flop_fraction(model: nn.Module, targets: Sequence[str], rank: float) -> dict:
    """The analytical adapter cost r(in+out)/(in*out) over the adapted layers.

    ``mean``: the plain average over layers (as in the brief); ``weighted``: total
    adapter FLOPs over total adapted-layer FLOPs (sum r(in+out) / sum in*out).
    """
    shapes = [(m.in_features, m.out_features) for _, m in target_linears(model, targets)]
    per_layer = [rank * (i + o) / (i * o) for i, o in shapes]
    return {
        "mean": statistics.fmean(per_layer),
        "weighted": rank * sum(i + o for i, o in shapes) / sum(i * o for i, o in shapes),
        "layers": len(shapes),
    }


# --------------------------------------------------------------------------- variants
def variant(name: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A configuration to measure: ``kind`` is ``nested`` (this library), ``peft`` or ``base``."""
    return {"name": name, "kind": kind, **fields}


def effective_rank(spec: dict[str, Any], train_ranks: Sequence[int] | None = None) -> float:
    """Components whose matmuls run in one training forward (for the FLOP fraction)."""
    if spec["kind"] == "base":
        return 0.0
    if spec.get("rank"):
        return float(spec["rank"])
    if spec.get("method") == "dylora" and spec.get("b"):
        return float(spec["b"])
    if spec.get("method") == "matryoshka_exact":
        from matryoshka_lora.nesting import powers_of_two_ranks

        return float(sum(train_ranks or powers_of_two_ranks(spec["r"])))
    return float(spec["r"])


def build_variant(
    base: nn.Module,
    spec: dict[str, Any],
    targets: Sequence[str],
    random_b: bool = False,
) -> nn.Module:
    """Build one configuration over ``base``.

    The frozen weights are shared with ``base`` unless the variant merges (or asks
    for ``own_weights``): merging writes into them.
    """
    kind = spec["kind"]
    own = spec.get("merged") or spec.get("own_weights")
    model = copy.deepcopy(base) if own else clone_sharing_weights(base)
    torch.manual_seed(1234)  # the same A in every build of the same R
    if kind == "nested":
        import matryoshka_lora as ml
        from matryoshka_lora.model import set_sampled_rank

        config = ml.NestedLoraConfig(r=spec["r"], method=spec["method"], target_modules=targets)
        ml.attach(model, config)
        if random_b:
            _randomise_b(model)
        if spec.get("b"):
            set_sampled_rank(model, spec["b"])
        if spec.get("rank"):
            ml.set_rank(model, spec["rank"])
        if spec.get("merged"):
            ml.merge(model, spec.get("rank"))
        if spec.get("patch") == "addmm":
            patch_addmm_forward(model)
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=spec["r"],
            lora_alpha=spec["r"],
            lora_dropout=0.0,
            target_modules=list(targets),
        )
        model = get_peft_model(model, config)
        if random_b:
            _randomise_b(model)
        if spec.get("merged"):
            model = model.merge_and_unload()
    elif kind != "base":
        raise ValueError(f"unknown variant kind {kind!r}")
    return model


def _addmm_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A candidate NestedLoraLinear.forward (bench only, NOT the library's code).

    Same function as the library's full-rank training path, with the final
    ``result + adapter`` folded into the second adapter matmul:
    ``addmm(result, (x A^T) * p, B^T)``. This saves one out-of-place (tokens x out)
    add and its allocation per layer. Other states (a rank set, DyLoRA, merged,
    disabled, dtype mismatch, mixed-rank batches) fall back to the library forward.
    """
    fallback = (
        self.merged
        or self.disabled
        or self.active_rank is not None
        or self.method not in ("matryoshka", "lora")
        or getattr(self, "example_scales", None) is not None
        or torch.is_autocast_enabled(x.device.type)
    )
    if fallback:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    if result.dtype != self.lora_A.dtype:
        return result + self.adapter_output(x).to(result.dtype)
    z = torch.nn.functional.linear(self.lora_dropout(x), self.lora_A)
    zp = z * self.train_p.to(z.dtype)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        zp.reshape(-1, zp.shape[-1]),
        self.lora_B.t(),
    )
    return out.view(result.shape)


def patch_addmm_forward(model: nn.Module) -> int:
    """Give every adapter layer of ``model`` (this instance only) the candidate forward."""
    import types

    from matryoshka_lora.model import adapter_layers

    layers = adapter_layers(model)
    for layer in layers.values():
        layer.forward = types.MethodType(_addmm_forward, layer)
    return len(layers)


def _randomise_b(model: nn.Module) -> None:
    """B starts at 0; a non-zero B makes merged/unmerged outputs comparable (not faster)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.01).to(p.dtype))


def make_batch(model: nn.Module, batch: int, seq: int, device: torch.device, seed: int):
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def make_train_step(model: nn.Module, spec: dict[str, Any], ids: torch.Tensor) -> Callable:
    """One training step: zero grads, forward with loss, backward, AdamW step.

    The frozen base (``kind == "base"``) has nothing to train: it feeds
    ``inputs_embeds`` that require grad so that the backward pass runs through
    every layer (the floor an adapter cannot beat), and has no optimizer step.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if spec["kind"] == "base":
        if params:
            raise RuntimeError("the frozen base has trainable parameters")
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        embeds.requires_grad_(True)

        def step() -> float:
            embeds.grad = None
            out = model(inputs_embeds=embeds, labels=ids, use_cache=False)
            out.loss.backward()
            return 0.0

        return step
    if not params:
        raise RuntimeError(f"{spec['name']}: no trainable parameters")
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        return 0.0

    return step


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timing(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[float]]:
    """Time every function once per round, round-robin (A B C A B C ...), in one process.

    The starting configuration rotates each round so no configuration always
    follows the same one. Returns seconds per call, one entry per timed round.
    """
    names = list(fns)
    for w in range(warmup):
        for name in names:
            fns[name]()
        synchronize(device)
        if log:
            log(f"  warmup round {w + 1}/{warmup} done")
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(repeats):
        order = names[k % len(names) :] + names[: k % len(names)]
        for name in order:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        if log:
            summary = ", ".join(f"{n}={times[n][-1] * 1e3:.0f}" for n in names)
            log(f"  round {k + 1}/{repeats} (ms): {summary}")
    return times


def quantile(values: Sequence[float], q: float) -> float:
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(times),
        "p25_s": quantile(times, 0.25),
        "p75_s": quantile(times, 0.75),
        "min_s": min(times),
        "n": len(times),
    }


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Per-round ratios a_k / b_k (same round, so the same machine load): median and IQR."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {
        "median": statistics.median(ratios),
        "p25": quantile(ratios, 0.25),
        "p75": quantile(ratios, 0.75),
    }


# --------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def saved_activation_bytes(model: nn.Module, step: Callable[[], Any]) -> int:
    """Bytes of distinct tensors autograd saves for backward during one step.

    Parameters and buffers (the frozen weights each linear saves) are not counted;
    this is the deterministic part of the activation memory.
    """
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in own and ptr not in seen:
                seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


class _TensorPeak:
    """Peak bytes of tensor storages created while active, freed ones subtracted.

    A TorchDispatchMode sees every op's outputs (autograd's backward on CPU runs
    on the calling thread, so it sees those too); each new storage is counted
    once and uncounted when it dies. This is the CPU analogue of
    ``torch.cuda.max_memory_allocated`` minus the memory at the start: it does
    not depend on the allocator, so it is the same from run to run.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._seen(t)
                return out

        self.mode = Mode()

    def _seen(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.live:
            size = storage.nbytes()
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._dropped, key)

    def _dropped(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def tensor_peak_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes of the tensors one step allocates (above what exists at its start)."""
    tracker = _TensorPeak()
    with tracker.mode:
        step()
    return tracker.peak


def measure_memory_here(
    model: nn.Module, step: Callable[[], Any], device: torch.device, steps: int
) -> dict[str, Any]:
    """Peak memory over ``steps`` training steps of an already built model."""
    gc.collect()
    out: dict[str, Any] = {"steps": steps}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(kind="cuda max_memory_allocated", before=before, peak=peak)
    else:
        before = rss_bytes()
        out["hwm_reset"] = reset_peak_rss()
        for _ in range(steps):
            step()
        peak = peak_rss_bytes()
        out.update(kind="RSS high-water mark", before=before, peak=peak)
    out["delta"] = out["peak"] - out["before"]
    out["saved_activations"] = saved_activation_bytes(model, step)
    out["tensor_peak"] = tensor_peak_bytes(step)
    return out


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration in this (fresh) process and measure its peak memory."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    base = load_base(spec["model"], DTYPES[spec["dtype"]], device, spec["seed"])
    ids = make_batch(base, spec["batch"], spec["seq"], device, spec["seed"])
    model = build_variant(base, spec["variant"], spec["targets"])
    del base
    step = make_train_step(model, spec["variant"], ids)
    return measure_memory_here(model, step, device, spec["steps"])


def memory_in_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "memory-worker",
            json.dumps(spec),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"memory worker for {spec['variant']['name']} failed (rc {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def count_flops(step: Callable[[], Any]) -> int:
    """Matmul/attention FLOPs of one step (forward + backward) by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


# --------------------------------------------------------------------------- profiling
def profile_compare(
    fns: dict[str, Callable[[], Any]], device: torch.device, rows: int, rounds: int = 3
) -> str:
    """Markdown table of self time per op for several configurations, side by side.

    Each configuration is profiled for one call per round, round-robin over
    ``rounds`` rounds (the same defence against background load as the timings),
    and the self times are averaged. Rows: the ops with the largest self time in
    any configuration, plus the ops whose time differs most between the first two.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    names = list(fns)
    self_ms: dict[str, dict[str, float]] = {n: {} for n in names}
    calls: dict[str, dict[str, float]] = {n: {} for n in names}
    wall: dict[str, float] = dict.fromkeys(names, 0.0)
    for fn in fns.values():
        fn()  # warm
    for _ in range(rounds):
        for n in names:
            synchronize(device)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                fns[n]()
                synchronize(device)
            wall[n] += (time.perf_counter() - t0) * 1e3 / rounds
            for e in prof.key_averages():
                t = e.self_device_time_total if cuda else e.self_cpu_time_total
                self_ms[n][e.key] = self_ms[n].get(e.key, 0.0) + t / 1e3 / rounds
                calls[n][e.key] = calls[n].get(e.key, 0.0) + e.count / rounds
    keys = set().union(*(d.keys() for d in self_ms.values()))
    top = sorted(keys, key=lambda k: -max(d.get(k, 0.0) for d in self_ms.values()))[:rows]
    if len(names) >= 2:
        a, b = self_ms[names[0]], self_ms[names[1]]
        diff = sorted(keys, key=lambda k: -abs(a.get(k, 0.0) - b.get(k, 0.0)))
        top += [k for k in diff[:5] if k not in top]
    unit = "self GPU ms (calls)" if cuda else "self CPU ms (calls)"
    lines = [
        "| op | " + " | ".join(f"{n}: {unit}" for n in names) + " |",
        "|---" + "|---:" * len(names) + "|",
    ]
    for k in top:
        cells = [f"{self_ms[n].get(k, 0.0):.1f} ({calls[n].get(k, 0):.0f})" for n in names]
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    totals = [f"{sum(self_ms[n].values()):.0f}" for n in names]
    lines.append("| **sum of self times** | " + " | ".join(totals) + " |")
    walls = [f"{wall[n]:.0f}" for n in names]
    lines.append("| **wall time under the profiler** | " + " | ".join(walls) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- output
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / MIB:.1f}"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def write_json(results_dir: Path, name: str, data: dict[str, Any]) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"


def replace_subsection(path: Path, key: str, body: str) -> None:
    """Put ``body`` between this key's markers inside ``## Speed and memory``.

    Creates the file or the section if missing; an existing block with the same
    key is replaced in place; a new block goes at the end of the section. Nothing
    outside the markers is touched.
    """
    begin, end = _markers(key)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = head + block + tail
    else:
        lines = text.rstrip("\n").split("\n")
        try:
            start = lines.index(SECTION_HEADING)
        except ValueError:
            lines += ["", SECTION_HEADING, ""]
            start = len(lines) - 2
        section_end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
            len(lines),
        )
        stop = section_end
        while stop > start + 1 and not lines[stop - 1].strip():
            stop -= 1
        tail_gap = [""] if section_end < len(lines) else []
        lines[stop:section_end] = ["", *block.split("\n"), *tail_gap]
        new = "\n".join(lines)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new.rstrip("\n") + "\n")
    os.replace(tmp, path)


def result_key(script: str, args: argparse.Namespace) -> str:
    key = f"{script}_{args.device}_{args.dtype}"
    if args.smoke:
        key += "_smoke"
    if args.tag:
        key += "_" + "".join(c if c.isalnum() or c in "-_" else "-" for c in args.tag)
    return key


def title_suffix(args: argparse.Namespace) -> str:
    parts = [args.device, args.dtype] + (["smoke"] if args.smoke else [])
    return ", ".join(parts + ([args.tag] if args.tag else []))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _worker_main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[0] != "memory-worker":
        raise SystemExit("usage: python bench/common.py memory-worker '<json spec>'")
    spec = json.loads(argv[1])
    result = memory_worker(spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
