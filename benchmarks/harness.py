"""Run one measurement per subprocess, so that a crash, a hang or running out of memory is one row, not the sweep.

The parent runs ``python script.py --worker ARG ...``; the worker prints one line
``@@RESULT@@{json}``. Inside a worker, :func:`time_limit` bounds a single step
(one library on one model) in time and memory, so a library that loops forever
fails that step and the other library still gets measured.

Example::

    >>> row = run_worker([sys.executable, "benchmarks/coverage.py", "--worker", "tv:resnet18"], timeout=600)
    >>> row["model"], row["seconds"] > 0
    ('tv:resnet18', True)
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import tempfile
import time
import traceback
from pathlib import Path

MARK = "@@RESULT@@"


class StepLimit(BaseException):
    """Raised inside a worker when a step runs past its :func:`time_limit` (time or memory).

    A BaseException, like KeyboardInterrupt: libraries that retry after ``except Exception``
    (a capture falling back to another tracer) must not swallow it and run on past the limit.
    """


@contextlib.contextmanager
def time_limit(seconds: float | None, max_gib: float | None = None):
    """Raise :class:`StepLimit` in the main thread after ``seconds``, or once the process's RSS passes ``max_gib``.

    The memory cap turns a runaway step (Torch-Pruning's group expansion on Swin grows by ~100 MB/s) into one
    failed measurement instead of the kernel's OOM killer taking the worker, or a neighbour's process.
    """
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    reason = []

    def _expire(signum, frame):
        raise StepLimit(reason[0] if reason else f"timed out after {seconds:.0f} s")

    previous = {sig: signal.signal(sig, _expire) for sig in (signal.SIGALRM, signal.SIGUSR1)}
    stop = threading.Event()
    if seconds:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    if max_gib:
        import meter

        main = threading.main_thread().ident

        def watch():
            while not stop.wait(0.25):
                if meter.rss_bytes() > max_gib * 2**30:
                    reason.append(f"memory above {max_gib:g} GiB")
                    signal.pthread_kill(main, signal.SIGUSR1)
                    return

        threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def first_line(exc: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, short enough for a table cell."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


def publish(text: str, out: str | None) -> None:
    """A benchmark's markdown report: printed, and written to ``out`` (its ``--out``) when given."""
    print(text)
    if out:
        Path(out).write_text(text)


def emit(row: dict) -> None:
    """Print the worker's result for the parent (the last such line wins, so emit partial rows as you go)."""
    print(MARK + json.dumps(row, default=str), flush=True)


def guarded(fn, *args) -> dict:
    """``fn(*args)``, or a row describing why it failed (with the end of the traceback)."""
    try:
        return fn(*args)
    except (Exception, StepLimit) as exc:  # one failed measurement is a result, not the end of the worker
        return {"status": "error", "reason": first_line(exc), "traceback": traceback.format_exc()[-2000:]}


def run_worker(cmd: list[str], timeout: float, base: dict | None = None) -> dict:
    """Run a worker command; its JSON row, or an error row if it died or timed out. Adds ``seconds``."""
    row = dict(base or {})
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        results = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        death = f"worker died (exit {proc.returncode}{', SIGKILL: out of memory?' if proc.returncode == -9 else ''})"
        if results:  # a worker emits after every step: a later step that kills it leaves the earlier ones
            row.update(json.loads(results[-1]))
            if proc.returncode != 0:
                row["died"] = death
        else:
            row.update(status="error", reason=f"{death}: {tail[:200]}")
    except subprocess.TimeoutExpired:
        row.update(status="error", reason=f"worker timed out after {timeout:.0f} s")
    row["seconds"] = time.perf_counter() - start
    return row


def python() -> str:
    return sys.executable


def default_out(quick: bool, filename: str) -> Path:
    """``benchmarks/filename`` for a real run; a temp dir for ``--quick``, so CI never overwrites results."""
    folder = Path(tempfile.gettempdir()) / "fxprune-bench" if quick else Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / filename
