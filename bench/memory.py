"""Peak memory of training steps: what the process holds, and what the step's tensors need.

:func:`measure_memory_here` runs ``steps`` steps of an already built model and reports

- ``before`` / ``peak`` / ``delta = peak - before``: the whole process. CUDA:
  ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` after
  ``reset_peak_memory_stats``. CPU: the resident set size (``VmRSS``) and its
  high-water mark (``VmHWM``) from ``/proc/self/status``, the mark reset after the
  model is built by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0), so that
  building the model does not count. ``resource.getrusage(...).ru_maxrss`` is the
  same mark but cannot be reset, so it is only the fallback where ``/proc`` is
  missing; ``tracemalloc`` sees Python's allocator, not tensor storage, so it
  cannot measure tensors at all. RSS includes the allocator's free lists, so CPU
  peaks are good to a few MiB.
- ``saved_activations``: bytes of the distinct tensors autograd saves for backward
  in one step, weights excluded (``torch.autograd.graph.saved_tensors_hooks``).
- ``tensor_peak``: the peak bytes of tensor storage one step allocates, counted op by
  op (:class:`TensorPeak`): the CPU analogue of ``max_memory_allocated`` minus the
  memory at the start, independent of the allocator and the same from run to run.

The first is what a user sees; the last two compare implementations exactly.
"""

from __future__ import annotations

import gc
import resource
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# TorchDispatchMode is the one way to see every op's outputs below autograd (backward
# included) on any device; torch exposes it only from this private module.
from torch.utils._python_dispatch import TorchDispatchMode


# --------------------------------------------------------------------------- CPU process
def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The resident set size now."""
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
    """The RSS high-water mark since the last :func:`reset_peak_rss` (or the process start)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --------------------------------------------------------------------------- tensors
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


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's output (a tensor, or tuples/lists of them and None)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, tuple | list):
        for item in out:
            yield from _tensors(item)


class TensorPeak:
    """Peak bytes of tensor storages created while active, freed ones subtracted.

    A TorchDispatchMode sees every op's outputs (autograd's backward on CPU runs
    on the calling thread, so it sees those too); each new storage is counted
    once and uncounted when it dies. This is the CPU analogue of
    ``torch.cuda.max_memory_allocated`` minus the memory at the start: it does
    not depend on the allocator, so it is the same from run to run.
    """

    def __init__(self) -> None:
        tracker = self
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in _tensors(out):
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
    tracker = TensorPeak()
    with tracker.mode:
        step()
    return tracker.peak


# --------------------------------------------------------------------------- all of it
def measure_memory_here(
    model: nn.Module, step: Callable[[], Any], device: torch.device, steps: int
) -> dict[str, Any]:
    """Peak memory over ``steps`` training steps of an already built model (see module doc)."""
    gc.collect()
    out: dict[str, Any] = {"steps": steps}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
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
