"""Run one measurement per subprocess, so that a crash, a hang or running out of memory is one row, not the sweep.

The parent runs ``python script.py --worker ARG ...``; the worker prints one line
``@@RESULT@@{json}``. Inside a worker, :func:`time_limit` bounds a single step
(one library on one model) with ``SIGALRM``, so a library that loops forever
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
import tempfile
import time
import traceback
from pathlib import Path

MARK = "@@RESULT@@"


class StepTimeout(BaseException):
    """Raised inside a worker when a step runs past its :func:`time_limit`.

    A BaseException, like KeyboardInterrupt: libraries that retry after ``except Exception``
    (a capture falling back to another tracer) must not swallow it and run on past the limit.
    """


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`StepTimeout` in the main thread after ``seconds`` (no limit for None or 0)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _expire(signum, frame):
        raise StepTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_line(exc: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, short enough for a table cell."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


def emit(row: dict) -> None:
    """Print the worker's result for the parent (the last such line wins)."""
    print(MARK + json.dumps(row, default=str), flush=True)


def guarded(fn, *args) -> dict:
    """``fn(*args)``, or a row describing why it failed (with the end of the traceback)."""
    try:
        return fn(*args)
    except (Exception, StepTimeout) as exc:  # one failed measurement is a result, not the end of the worker
        return {"status": "error", "reason": first_line(exc), "traceback": traceback.format_exc()[-2000:]}


def run_worker(cmd: list[str], timeout: float, base: dict | None = None) -> dict:
    """Run a worker command; its JSON row, or an error row if it died or timed out. Adds ``seconds``."""
    row = dict(base or {})
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        results = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if results:
            row.update(json.loads(results[-1]))
        else:
            tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            row.update(status="error", reason=f"worker died (exit {proc.returncode}): {tail[:200]}")
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
