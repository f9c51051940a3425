"""Run one measurement per subprocess, so that a crash, a hang or running out of memory is one row, not the sweep;
one time limit for every library; failures sorted into classes; every report rendered from its log.

The parent runs ``python script.py --worker ARG ...``; the worker prints one line
``@@RESULT@@{json}``. Inside a worker, :func:`time_limit` bounds a single step
(one library on one model) in time and memory, so a library that loops forever
fails that step and the other library still gets measured.

**Limits.** Every step of every library in every benchmark gets :data:`STEP_SECONDS` (300 s), unless
:data:`LONGER_STEPS` names the benchmark and case with the reason it needs more (then every library gets that).
A script's ``--step-timeout`` overrides it, for every library at once.

**Failure classes.** A step's result carries ``class`` (:data:`CLASSES`): ``ok``, ``timeout`` (with the seconds it
ran), ``memory``, ``error`` (with the message; ``stage`` says whether pruning raised or the pruned model failed to
run), ``wrong output`` (runs, same shapes, but not the output it must give: non-finite values, an oracle
that fails) or ``shape changed``. :func:`failure_class` reads it, or infers it from older rows.

**Logs.** Every benchmark writes a JSON-lines log: a header record per run (``{"@run": {...}}``: script,
command, UTC date, versions, machine, load, limits, note) followed by that run's rows. Its markdown is
``render(runs)`` of that log (:func:`read_runs`), written by the script after every row and rebuilt by
``benchmarks/results.py`` from the committed logs: no number in a report is typed by hand.

Example::

    >>> row = run_worker([sys.executable, "benchmarks/coverage.py", "--worker", "tv:resnet18"], timeout=600)
    >>> row["model"], row["seconds"] > 0
    ('tv:resnet18', True)
    >>> step_seconds("checkpoint_streaming", "7b")
    900.0
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import tempfile
import time
import traceback
from pathlib import Path

MARK = "@@RESULT@@"
RUN = "@run"  # the key of a log's run header record

# ---------------------------------------------------------------------------------------------- limits

STEP_SECONDS = 300.0
"""Seconds for one step (one library on one model), the same for every library in every benchmark.

The larger of the limits the benchmarks had: ``hf_sweep.py`` gave fxprune 300 s a step and Torch-Pruning 60 s,
``coverage.py`` 180 s (240 s in its committed run) to both, ``quality.py`` 240 s to Torch-Pruning and none to fxprune.
The slowest step measured in those runs was fxprune's analysis of a tiny Swin, 112.6 s (hf_sweep.md, on 2 shared
cores), and a model that needs more is listed in :data:`LONGER_STEPS`.
"""

LONGER_STEPS = {
    # (benchmark, case): (seconds, why) -- every library in that benchmark gets these seconds on that case
    ("speed", "llama-1b"): (900.0, "the second pass runs analysis and pruning of the 1.1B LLaMA under tracemalloc, "
                                   "which slows Python down several times (the untraced prune took up to 24.2 s, "
                                   "speed.jsonl); 900 s as every speed step had before"),
    ("quality", "minilm"): (1200.0, "fxprune's obs + reconstruct + sequential row on the real MiniLM took 736 s and "
                                    "the distilled row 420 s (quality.jsonl, 2026-12-01, on 2 shared cores)"),
    ("latency", "llama-7b"): (900.0, "builds the 7B-class LLaMA on the device (14 GB in bfloat16) and times 20 "
                                     "prefills of 4 x 1024 tokens per step"),
    ("checkpoint_streaming", "7b"): (900.0, "reads and writes 13.5 GB of shards; 122.8 s for each library on 2 "
                                            "cores at load 8 (checkpoint_streaming.md, 2026-12-01)"),
    ("checkpoint_streaming", "1b calibration"): (3600.0, "layer-by-layer calibration of the 1.1B checkpoint took "
                                                         "1126.7 s at load 5-9 (checkpoint_layerwise.md)"),
    ("checkpoint_streaming", "7b calibration"): (7200.0, "six times the 1.1B's layer work"),
    ("calibration_memory", "llama-1b"): (1800.0, "Gram statistics of the 1.1B LLaMA took 374.9 s and its analysis "
                                                 "64.9 s (calibration_memory.md)"),
    ("scale", "llama-70b"): (1800.0, "the 70B-class plan; 14.4 s of worker wall time measured, the limit leaves room "
                                     "for a dynamic capture (--dynamic)"),
}


def step_seconds(benchmark: str, case: str | None = None, override: float | None = None) -> float:
    """The time limit of one step of ``case`` in ``benchmark`` (the same for every library): ``override`` (a
    script's ``--step-timeout``) if given, else :data:`LONGER_STEPS`, else :data:`STEP_SECONDS`."""
    if override:
        return float(override)
    return float(LONGER_STEPS.get((benchmark, case), (STEP_SECONDS, ""))[0])


def limits_note(benchmark: str, cases, override: float | None = None) -> str:
    """One sentence for a report's header: the step limit, and which cases get more and why."""
    if override:
        return f"Every step of every library: at most {override:g} s (--step-timeout)."
    longer = [f"{case}: {seconds:g} s ({why})" for (b, case), (seconds, why) in LONGER_STEPS.items()
              if b == benchmark and case in set(cases)]
    return (f"Every step of every library: at most {STEP_SECONDS:g} s (`harness.STEP_SECONDS`)"
            + ("; more where a case needs it, for every library: " + "; ".join(longer) if longer else "") + ".")


def add_limit_arguments(parser, max_gib: float | None = None) -> None:
    """``--step-timeout`` (default: :func:`step_seconds`) and ``--max-gib``, one value for every library."""
    parser.add_argument("--step-timeout", type=float, default=None,
                        help=f"seconds per step, every library alike (default {STEP_SECONDS:g}, more for the cases "
                             "harness.LONGER_STEPS names)")
    if max_gib is not None:
        parser.add_argument("--max-gib", type=float, default=max_gib,
                            help=f"RSS cap per worker step, GiB, every library alike (default {max_gib:g})")


class StepLimit(BaseException):
    """Raised inside a worker when a step runs past its :func:`time_limit` (time or memory).

    A BaseException, like KeyboardInterrupt: libraries that retry after ``except Exception``
    (a capture falling back to another tracer) must not swallow it and run on past the limit.
    ``kind`` is ``"timeout"`` or ``"memory"``.
    """

    def __init__(self, message: str, kind: str = "timeout"):
        super().__init__(message)
        self.kind = kind


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
        if reason:
            raise StepLimit(reason[0], "memory")
        raise StepLimit(f"timed out after {seconds:.0f} s", "timeout")

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


# ---------------------------------------------------------------------------------------------- failure classes

CLASSES = ("ok", "timeout", "memory", "error", "wrong output", "shape changed")


def first_line(exc: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, short enough for a table cell."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:limit]


def failed(kind: str, reason: str, **extra) -> dict:
    """A failed step's result: ``status`` and ``class`` (one of :data:`CLASSES`), the reason, anything else."""
    assert kind in CLASSES[1:], kind
    status = {"shape changed": "shape changed", "wrong output": "wrong output"}.get(kind, "error")
    return {"status": status, "class": kind, "reason": reason, **extra}


def failure_class(result: dict | None) -> str:
    """The class of a step's result: its ``class``, or for rows logged before classes existed, inferred from its
    status and reason. ``"ok"`` for a passed step (``ok``, ``exact``, ``n/a``), ``"skipped"`` when not run."""
    if not result:
        return "error"
    if result.get("class"):
        return result["class"]
    status, reason = result.get("status", ""), str(result.get("reason", ""))
    if status in ("ok", "exact", "n/a"):
        return "ok"
    if status == "skipped":
        return "skipped"
    if "timed out" in reason:
        return "timeout"
    if "memory above" in reason or "SIGKILL" in reason:
        return "memory"
    if status == "shape changed" or "shape" in reason and "!=" in reason:
        return "shape changed"
    if status == "inexact" or "inexact" in reason or "non-finite" in reason:
        return "wrong output"
    return "error"


def describe_failure(result: dict) -> str:
    """``class: reason`` for a failures list, a timeout with the seconds the step ran."""
    kind = failure_class(result)
    reason = str(result.get("reason", result.get("status", ""))).replace("|", "/")
    if kind == "timeout" and result.get("step_s"):
        return f"timeout: ran {result['step_s']:.0f} s ({reason})"
    return f"{kind}: {reason}" + (f" (at {result['where']})" if result.get("where") else "")


def classify_outputs(got, expected_shapes, measure, first_only: bool = False) -> dict:
    """``{"status": "ok"}``, or the failure of a pruned model that runs: output shapes changed (only the first
    output's with ``first_only``), or non-finite values where the original's were finite."""
    mine = measure.shapes(got)
    if first_only:
        mine, expected_shapes = mine[:1], expected_shapes[:1]
    if mine != expected_shapes:
        return failed("shape changed", f"output shapes {mine} != {expected_shapes}"[:240])
    bad = [i for i, t in enumerate(measure.tensors(got)[:len(mine)]) if t.is_floating_point() and
           not bool(t.isfinite().all())]
    if bad:
        return failed("wrong output", f"non-finite values in output {bad[0]}")
    return {"status": "ok", "class": "ok"}


# ---------------------------------------------------------------------------------------------- workers

def publish(text: str, out: str | None) -> None:
    """A benchmark's markdown report: printed, and written to ``out`` (its ``--out``) when given."""
    print(text)
    if out:
        Path(out).write_text(text)


def emit(row: dict) -> None:
    """Print the worker's result for the parent (the last such line wins, so emit partial rows as you go)."""
    print(MARK + json.dumps(row, default=str), flush=True)


def guarded(fn, *args) -> dict:
    """``fn(*args)``, or a row describing why it failed (class, reason, seconds, the end of the traceback)."""
    start = time.perf_counter()
    try:
        return fn(*args)
    except StepLimit as exc:  # one failed measurement is a result, not the end of the worker
        return {**failed(exc.kind, f"{exc}"), "step_s": time.perf_counter() - start}
    except Exception as exc:
        return {**failed("error", first_line(exc)), "step_s": time.perf_counter() - start, "where": raised_at(exc),
                "traceback": traceback.format_exc()[-2000:]}


def raised_at(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame that raised (the path from the package folder on)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    path = f.filename.split("site-packages/")[-1]
    if path == f.filename:  # a file of this repository: from its top folder on
        root = str(Path(__file__).resolve().parents[1]) + "/"
        path = path.replace(root, "")
    return f"{path}:{f.lineno} in {f.name}"


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
            row.update(failed("memory" if proc.returncode == -9 else "error", f"{death}: {tail[:200]}"))
    except subprocess.TimeoutExpired:
        row.update(failed("timeout", f"worker timed out after {timeout:.0f} s"))
    row["seconds"] = time.perf_counter() - start
    return row


def worker_seconds(steps: int, step: float, margin: float = 300.0) -> float:
    """A worker's limit: every step may use its whole limit, plus ``margin`` for building models and imports."""
    return steps * step + margin


def python() -> str:
    return sys.executable


def default_out(quick: bool, filename: str) -> Path:
    """``benchmarks/filename`` for a real run; a temp dir for ``--quick``, so CI never overwrites results."""
    folder = Path(tempfile.gettempdir()) / "fxprune-bench" if quick else Path(__file__).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / filename


# ---------------------------------------------------------------------------------------------- logs

def versions(modules=("torch", "torchvision", "timm", "transformers", "torch_pruning")) -> dict:
    """Versions of the libraries a benchmark used (those installed), and fxprune's git commit when known."""
    from importlib import metadata

    found = {}
    for name in modules:
        try:  # the installed distribution's version (torch_pruning 1.6.1 still says 1.6.0 in __version__)
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                found[name] = __import__(name).__version__
            except Exception:  # not installed, or no version: left out
                pass
    try:
        found["fxprune"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "?"
    except Exception:
        found["fxprune"] = "?"
    return found


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except OSError:
        return None


def command_line(script: str, argv: list[str], hide=("--note",)) -> str:
    """``python benchmarks/script.py ARGS``, without the options in ``hide`` (their text is shown elsewhere)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in hide:
            skip = True
        elif not any(arg.startswith(h + "=") for h in hide):
            shown.append(arg)
    return " ".join(["python", f"benchmarks/{script}", *shown])


def run_header(script: str, argv: list[str], note: str = "", **extra) -> dict:
    """The header record of one run: what was run, when, where, with which versions and limits."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {RUN: {"script": script, "command": command_line(script, argv),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "versions": versions(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"
                  + (f", {_memory_gib():.1f} GiB RAM" if _memory_gib() else ""),
                  "load_at_start": load, "step_seconds": STEP_SECONDS, "note": note, **extra}}


class Log:
    """A JSON-lines log: a run header, then rows. ``mode="w"`` starts a new log, ``"a"`` adds a run to it."""

    def __init__(self, path: str | Path, header: dict, mode: str = "w"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, mode) as f:
            f.write(json.dumps(header, default=str) + "\n")

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def finish(self, **facts) -> None:
        """A closing record of the run (wall time, load at the end): ``{"@end": {...}}``."""
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.write({"@end": {"ended": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                             "load_at_end": load, **facts}})


def read_runs(path: str | Path) -> list[dict]:
    """``[{"header": {...}, "rows": [...], "end": {...}}]``, one per run in the log, in order. Rows logged before
    headers existed form a first run whose header is empty."""
    runs: list[dict] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if RUN in record:
            runs.append({"header": record[RUN], "rows": [], "end": {}})
        elif "@end" in record:
            if runs:
                runs[-1]["end"] = record["@end"]
        else:
            if not runs:
                runs.append({"header": {}, "rows": [], "end": {}})
            runs[-1]["rows"].append(record)
    return runs


def latest_rows(runs: list[dict], key: str) -> tuple[list[dict], dict]:
    """The last row of every ``row[key]`` over the runs (a later run's row replaces an earlier one), in first-seen
    order, and ``{value: index of the run it came from}``."""
    rows, source = {}, {}
    for i, run in enumerate(runs):
        for row in run["rows"]:
            rows[row[key]] = row
            source[row[key]] = i
    return list(rows.values()), source


def describe_runs(runs: list[dict], key: str | None = None) -> str:
    """Markdown lines naming each run: command, date, versions, machine, load, note; with ``key``, which rows each
    run contributed (when a later run replaced some)."""
    used = latest_rows(runs, key)[1] if key else {}
    lines = []
    for i, run in enumerate(runs):
        h, end = run["header"], run.get("end", {})
        if not h:
            lines.append(f"- run {i + 1}: logged before run headers: command, date and versions not recorded "
                         "(see the report committed with it)")
            continue
        versions_ = ", ".join(f"{k} {v}" for k, v in h.get("versions", {}).items())
        load = f"load average {h['load_at_start']:.1f} at the start" if h.get("load_at_start") is not None else ""
        if end.get("load_at_end") is not None:
            load += f", {end['load_at_end']:.1f} at the end"
        wall = f", {end['wall_s'] / 60:.0f} min wall" if end.get("wall_s") else ""
        rows = ""
        if key and len(runs) > 1:
            mine = [v for v, j in used.items() if j == i]
            rows = f"; rows kept from it: {len(mine)}" + (f" ({', '.join(map(str, mine))})" if len(mine) <= 30 else "")
        when = f"{h['started']}{' to ' + end['ended'] if end.get('ended') else ''}{wall}"
        facts = "; ".join(part for part in (when, h.get("machine", ""), load, versions_) if part)
        lines.append(f"- `{h['command']}`: {facts}{rows}." + (f" {h['note']}" if h.get("note") else ""))
    return "\n".join(lines)


def stopped_runs(runs: list[dict]) -> str:
    """A sentence naming the runs (1-based, as listed) that have a header but no end record: stopped before they
    finished, so they measured only the rows they logged; empty when every run ended."""
    stopped = [str(i + 1) for i, run in enumerate(runs) if run["header"] and not run.get("end")
               and not run["header"].get("recovered")]
    return (f"Run(s) {', '.join(stopped)} of the list were stopped before they finished (no end record): they "
            "measured only the rows they logged.") if stopped else ""


def write_report(render, log: str | Path, out: str | Path | None) -> str:
    """``render(read_runs(log))`` written to ``out``: a report is always rebuilt from its log, never kept apart."""
    text = render(read_runs(log))
    if out:
        Path(out).write_text(text)
    return text


def table_report(title: str, runs: list[dict], columns: list[str], intro: str = "", formats: dict | None = None,
                 every_run: bool = False) -> str:
    """A report of one table: title, the run(s) it comes from, ``intro`` (prose: conventions, no measured numbers),
    then one row per logged row (``columns`` of it; floats by ``formats[column]``, e.g. ``"{:.2%}"``). The last run
    only, unless ``every_run``."""
    chosen = runs if every_run else runs[-1:]
    formats = formats or {}

    def cell(row, c):
        value = row.get(c, "")
        if isinstance(value, float):
            return formats.get(c, "{:.4g}").format(value)
        return "" if value is None else str(value).replace("|", "/")

    lines = [f"# {title}", "", describe_runs(chosen), ""] + ([intro, ""] if intro else [])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for run in chosen for r in run["rows"]]
    return "\n".join(lines) + "\n"
