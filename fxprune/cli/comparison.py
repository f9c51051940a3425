"""Before/after numbers for the command line: parameters, MACs and CPU latency, as one table.

Example::

    >>> before = measure(model, (x,), runs=10)
    >>> after = measure(pruned, (x,), runs=10)
    >>> print(comparison_table(before, after))
                        before         after    kept
    params              25.56M         6.92M   27.1%
    MACs                 4.09G         1.05G   25.7%
    latency            658.5ms       261.4ms   39.7%   (CPU, batch 1, 2 threads, median of 10)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Measurement:
    params: int
    macs: int | None  # None when the MACs could not be counted
    latency: float | None  # seconds, median; None when not measured
    runs: int = 0
    threads: int = 0
    batch: int = 1
    note: str = ""


def measure(model, example_inputs, kwargs=None, runs: int = 10, threads: int | None = None,
            progress=None) -> Measurement:
    """Parameters, MACs and median CPU latency of ``model(*example_inputs, **kwargs)``."""
    from fxprune.analysis.macs import count

    params = sum(p.numel() for p in model.parameters())
    note = ""
    try:
        macs, _ = count(model, tuple(example_inputs))
    except Exception as exc:  # counting is a report, never a reason to fail the command
        macs, note = None, f"MACs not counted: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    latency = None
    if runs > 0:
        latency = cpu_latency(model, example_inputs, kwargs, runs=runs, threads=threads, progress=progress)
    batch = example_inputs[0].shape[0] if example_inputs and isinstance(example_inputs[0], torch.Tensor) \
        and example_inputs[0].ndim else 1
    return Measurement(params, macs, latency, runs, threads or torch.get_num_threads(), batch, note)


@torch.inference_mode()
def cpu_latency(model, example_inputs, kwargs=None, runs: int = 10, warmup: int = 2, threads: int | None = None,
                progress=None) -> float:
    """Median wall time of one forward pass on the CPU, in seconds, after ``warmup`` passes."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        kwargs = kwargs or {}
        for _ in range(warmup):
            model(*example_inputs, **kwargs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(*example_inputs, **kwargs)
            times.append(time.perf_counter() - start)
            if progress is not None:
                progress.update(1)
        return statistics.median(times)
    finally:
        torch.set_num_threads(previous)


def comparison_table(before: Measurement, after: Measurement) -> str:
    rows = [f"{'':<12}{'before':>14}{'after':>14}{'kept':>9}",
            _row("params", before.params, after.params, _count),
            _row("MACs", before.macs, after.macs, _count)]
    if before.latency is not None and after.latency is not None:
        rows.append(_row("latency", before.latency, after.latency, _seconds)
                    + f"   (CPU, batch {before.batch}, {before.threads} threads, median of {before.runs})")
    rows.extend(note for note in dict.fromkeys((before.note, after.note)) if note)
    return "\n".join(rows)


def _row(label: str, old, new, fmt) -> str:
    if old is None or new is None:
        return f"{label:<12}{'n/a':>14}{'n/a':>14}"
    kept = f"{new / old:.1%}" if old else "-"
    return f"{label:<12}{fmt(old):>14}{fmt(new):>14}{kept:>9}"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f}ms" if s < 10 else f"{s:.1f}s"
