"""Wall time, CPU time and peak memory of one step: resident set size (sampled) and Python allocations (tracemalloc).

RSS is what the operating system sees, tensors included; it is sampled every few
milliseconds by a thread, and reported as the peak *above* the RSS at the start of
the step. tracemalloc only sees allocations through Python's allocator (graph
nodes, dicts, FakeTensor metadata: not tensor storage) and slows Python code
down, so :func:`measure` times a step without it and the caller runs it again
under :func:`python_peak` when it wants that number.

Example::

    >>> with Meter() as m:
    ...     x = torch.zeros(10_000_000)
    >>> round(m.seconds, 1) >= 0, m.rss_peak_mb > 30
    (True, True)
"""

from __future__ import annotations

import gc
import os
import threading
import time
import tracemalloc

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; psutil elsewhere; 0 if neither)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        try:
            import psutil
        except ImportError:
            return 0
        return psutil.Process().memory_info().rss


class Meter:
    """Context manager: ``seconds``, ``cpu_seconds`` (this process, all threads) and ``rss_peak_mb`` (peak RSS above
    the RSS on entry). On a loaded machine CPU time is the steadier number: wall time includes waiting for a core."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.rss_peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "Meter":
        gc.collect()
        self._base = self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.rss_peak_mb = (self._peak - self._base) / 2**20


def python_peak(fn, *args) -> tuple[float, object]:
    """(peak MB of Python allocations while running ``fn(*args)``, its result), with tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20, result
