"""Where the time goes: self time per op of several configurations, side by side (``--profile``).

Each configuration is profiled (``torch.profiler``) for one call per round,
round-robin over a few rounds, the same defence against background load as the
timings (``timing.py``); self times and call counts are averaged over rounds.
Profiler overhead is included, so the table says where time goes, not how fast
anything is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timing import device_clock


def profile_compare(
    fns: dict[str, Callable[[], Any]], device: torch.device, rows: int, rounds: int = 3
) -> str:
    """Markdown table of self time per op for several configurations, side by side.

    Rows: the ``rows`` ops with the largest self time in any configuration, plus
    the ops whose time differs most between the first two configurations. Device
    self time on CUDA, CPU self time otherwise.
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
            t0 = device_clock()
            with profile(activities=activities) as prof:
                fns[n]()
                device_clock()  # the call's device work belongs inside the profile
            wall[n] += (device_clock() - t0) * 1e3 / rounds
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
