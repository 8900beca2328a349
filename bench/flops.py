"""FLOPs: the adapter's analytical cost per layer, and the matmul FLOPs one step really does.

For an adapted ``nn.Linear(in, out)`` the base matmul costs ``in * out`` multiply-adds
per token and a rank-``r`` adapter ``r (in + out)``; the *adapter FLOP fraction* is
their ratio ``r (in + out) / (in * out)``. A training step also has attention, the
LM head and the loss, which are not adapted, and the base and the adapter have
different backward costs, so the whole-step overhead is counted instead
(:func:`count_flops`, ``torch.utils.flop_counter.FlopCounterMode``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from models import target_linears
from torch import nn


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


def count_flops(step: Callable[[], Any]) -> int:
    """Matmul/attention FLOPs of one step (forward + backward) by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()
