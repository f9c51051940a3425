"""Coverage against Torch-Pruning: which models each library prunes at ratio 0.5 and still runs, same shapes.

For every model (torchvision zoo, timm families, tiny Hugging Face configs; see
``zoo.py``) one worker process builds the model once and, for each library,

1. prunes a copy at ratio 0.5 (fxprune: ``fxprune.prune``; Torch-Pruning: its README
   recipe plus the output layers, see ``tp_recipe.py``), timed;
2. runs the pruned model on the example input (one example of batch 1, as users call it) and compares every
   output shape; then on inputs of batch 3 (token ids also of another length: ``zoo.other_inputs``), whose
   output shapes must be the original model's there ("other sizes"; a failure is noted in the library's cell);
3. counts MACs before and after (one counter for both, see ``measure.py``);
4. fxprune only: the dead-unit oracle (plant all-zero units, remove exactly them
   with ``fxprune.apply``, compare outputs; exact means relative difference <= 1e-4).

A library *covers* a model when it prunes without raising, the pruned model runs
and every output keeps its shape (with finite values). Each library gets the same limit per model,
``harness.step_seconds`` (300 s; ``--step-timeout`` changes it for both), and ``--max-gib`` of memory (a hang
is a failure of that library only); each worker gets ``--timeout`` (default: all its steps' limits plus 300 s).
A failure is logged with its class (``harness.CLASSES``): timeout (with the seconds it ran), memory, error
(with its message; ``stage: forward`` when the pruned model does not run), wrong output, shape changed.

Usage::

    python benchmarks/coverage.py --quick                 # CI: a handful of models, < 3 minutes
    python benchmarks/coverage.py --jobs 2                # standard list (zoo.TV_STANDARD, timm, HF)
    python benchmarks/coverage.py --models tv:resnet18,timm:convnext_atto,hf:t5
    python benchmarks/coverage.py --selection full --out benchmarks/coverage_full.md   # every torchvision model

One JSON line per model goes to ``--log`` (default: ``--out`` with ``.jsonl``) after a header naming the run
(command, date, versions, limits); the markdown table and the totals ("fxprune N/M, Torch-Pruning K/M") are
rendered from that log after every model (:func:`render`, also called by ``results.py``; ``--render`` alone
rebuilds the report). ``--resume`` adds a run for the models the log lacks (``--redo``: and those named).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import zoo  # noqa: E402

RATIO = 0.5
ORACLE_TOL = 1e-4
LIBRARIES = ("fxprune", "torch-pruning")


# ---------------------------------------------------------------------------------------------- worker side

def _fxprune_step(name, model, args, kwargs, reference, out_shapes) -> dict:
    import fxprune

    import measure

    start = time.perf_counter()
    pruned = fxprune.prune(model, RATIO, example_inputs=args, kwargs=kwargs or None)
    row = {"prune_s": time.perf_counter() - start}
    return _check(row, name, pruned, args, kwargs, out_shapes, measure)


def _tp_step(name, model, args, kwargs, reference, out_shapes) -> dict:
    import measure
    import tp_recipe

    victim = model
    start = time.perf_counter()
    tp_recipe.prune(name, victim, args, kwargs, RATIO)
    row = {"prune_s": time.perf_counter() - start}
    return _check(row, name, victim, args, kwargs, out_shapes, measure)


def _check(row, name, pruned, args, kwargs, out_shapes, measure) -> dict:
    try:
        got = measure.run(pruned, args, kwargs)
    except Exception as exc:  # pruned without complaint, but the model no longer runs
        return {**row, **harness.failed("error", "forward failed: " + harness.first_line(exc), stage="forward")}
    row["shapes"] = measure.shapes(got)
    checked = harness.classify_outputs(got, out_shapes, measure)  # every output's shape, finite values
    if checked["status"] != "ok":
        return {**row, **checked}
    original = zoo.build(name)[0]  # untouched by either library, for parameter and MAC counts
    row["other_sizes"] = _other_sizes(pruned, original, args, kwargs, measure)
    row["params_kept"] = measure.params(pruned) / measure.params(original)
    row["macs_kept"], row["macs_counter"] = measure.macs_ratio(original, pruned, args, kwargs)
    row.update(status="ok", **{"class": "ok"})
    return row


def _other_sizes(pruned, original, args, kwargs, measure) -> str:
    """"ok" when the pruned model runs at another batch size (and token length) with the original's output shapes
    there; else why not."""
    other_args, other_kwargs = zoo.other_inputs(args, kwargs)
    try:
        expected = measure.shapes(measure.run(original, other_args, other_kwargs))
    except Exception as exc:  # the model itself takes only the example's sizes
        return f"n/a: the original fails there too: {harness.first_line(exc)}"[:240]
    try:
        got = measure.shapes(measure.run(pruned, other_args, other_kwargs))
    except Exception as exc:
        return f"fails: {harness.first_line(exc)}"[:240]
    return "ok" if got == expected else f"shapes {got} != {expected}"[:240]


def _oracle_step(name, model, args, kwargs, reference, out_shapes) -> dict:
    import fxprune
    from fxprune.testing import plant_dead_units

    import measure

    dg = fxprune.analyze(model, args, kwargs=kwargs or None)
    row = {"groups": len(dg.groups), "prunable": len(dg.prunable_groups),
           "unsupported": sorted({where for _, where in dg.state.unsupported})[:3]}
    removal = plant_dead_units(dg, seed=0)
    row["oracle_groups"] = len(removal)
    before = measure.run(dg.gm, args, kwargs)
    after = measure.run(fxprune.apply(dg, removal), args, kwargs)
    row["oracle_diff"] = measure.relative_diff(after, before)
    exact = row["oracle_diff"] <= ORACLE_TOL
    row.update(status="exact" if exact else "inexact", **{"class": "ok" if exact else "wrong output"})
    return row


def measure_model(name: str, libraries, step_timeout: float, oracle: bool, max_gib: float) -> dict:
    """Everything the table reports for one model (runs inside a worker process); every step gets ``step_timeout``
    seconds and ``max_gib``, whichever library it measures."""
    import torch

    import measure
    import tp_recipe

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model, args, kwargs = zoo.build(name)
    row = {"model": name, "input": [list(a.shape) for a in args], "build_s": time.perf_counter() - start,
           "params": measure.params(model)}
    reference = measure.run(model, args, kwargs)
    out_shapes = measure.shapes(reference)
    steps = []
    if "fxprune" in libraries:
        steps.append(("fxprune", _fxprune_step))
        if oracle:
            steps.append(("oracle", _oracle_step))
    if "torch-pruning" in libraries:
        if tp_recipe.available():
            steps.append(("torch-pruning", _tp_step))
        else:
            row["torch-pruning"] = {"status": "skipped", "reason": "torch-pruning is not installed"}
    for key, step in steps:
        # every step gets a freshly built model (same seed, same weights): tracing can leave state behind
        # (timm's LeViT caches a torch.fx Proxy in attention_bias_cache), and one library must not see the other's
        model = zoo.build(name)[0]
        t = time.perf_counter()
        with harness.time_limit(step_timeout, max_gib):
            row[key] = harness.guarded(step, name, model, args, kwargs, reference, out_shapes)
        row[key]["step_s"] = time.perf_counter() - t
        harness.emit(row)  # if a later step kills the process, this one is still reported
    return row


def worker(name: str, libraries, step_timeout: float, oracle: bool, threads: int, max_gib: float) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    row = harness.guarded(measure_model, name, libraries, step_timeout, oracle, max_gib)
    row.setdefault("model", name)
    harness.emit(row)


# ---------------------------------------------------------------------------------------------- parent side

def covered(row: dict, library: str) -> bool:
    return row.get(library, {}).get("status") == "ok"


def reduced(rows: list[dict], library: str) -> int:
    """Covered models where the library really removed something (MACs kept at most 90%)."""
    return sum(covered(r, library) and (r[library].get("macs_kept") or 1.0) <= 0.9 for r in rows)


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def _cell(row: dict, library: str) -> str:
    result = row.get(library)
    if result is None:
        return f"error: {row.get('reason', '')}" if row.get("status") == "error" else ""
    kind = harness.failure_class(result)
    cell = "ok" if kind == "ok" else "skipped" if kind == "skipped" else kind
    other = result.get("other_sizes", "ok")
    return cell if other == "ok" or other.startswith("n/a") else f"{cell}, example's batch only"


def _seconds(result: dict) -> str:
    """The prune call's time; for a failed step, how long it ran before failing."""
    if "prune_s" in result:
        return f"{result['prune_s']:.1f}"
    return f"({result['step_s']:.0f})" if "step_s" in result else ""


def table(rows: list[dict]) -> str:
    lines = ["| model | input | fxprune | MACs kept | oracle | s | Torch-Pruning | MACs kept | s |",
             "| --- | --- | --- | ---: | --- | ---: | --- | ---: | ---: |"]
    for r in rows:
        fx, tp, orc = r.get("fxprune", {}), r.get("torch-pruning", {}), r.get("oracle", {})
        oracle = f"{orc['oracle_diff']:.0e}" if "oracle_diff" in orc else orc.get("status", "")
        if orc.get("status") == "inexact":
            oracle += " (inexact)"
        shape = "x".join(map(str, r["input"][0])) if r.get("input") else ""
        lines.append(f"| {r['model']} | {shape} | {_cell(r, 'fxprune')} | {_pct(fx.get('macs_kept'))} | {oracle} | "
                     f"{_seconds(fx)} | {_cell(r, 'torch-pruning')} | {_pct(tp.get('macs_kept'))} | {_seconds(tp)} |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    """Per library: how many failed in each class, then one line per failing model with its class and reason."""
    lines = []
    for library, key in (("fxprune", "fxprune"), ("dead-unit oracle", "oracle"), ("Torch-Pruning", "torch-pruning")):
        bad = [r for r in rows if harness.failure_class(r.get(key)) not in ("ok", "skipped")
               and (key in r or (key == "fxprune" and r.get("status") == "error"))]
        classes = {}
        for r in bad:
            kind = harness.failure_class(r.get(key) or {"status": "error"})
            classes[kind] = classes.get(kind, 0) + 1
        by_class = ", ".join(f"{n} {kind}" for kind, n in sorted(classes.items(), key=lambda kv: -kv[1]))
        lines.append(f"\n**{library}**: {len(bad)} failing" + (f" ({by_class}):" if bad else "."))
        for r in bad:
            res = dict(r.get(key) or {"status": "error", "reason": r.get("reason", "")})
            if key == "oracle" and "oracle_diff" in res:
                res["reason"] = f"relative difference {res['oracle_diff']:.1e}"
            lines.append(f"- {r['model']}: {harness.describe_failure(res)}")
    for library, key in (("fxprune", "fxprune"), ("Torch-Pruning", "torch-pruning")):
        other = [(r["model"], r[key]["other_sizes"]) for r in rows if key in r
                 and r[key].get("other_sizes", "ok") != "ok" and not r[key]["other_sizes"].startswith("n/a")]
        lines.append(f"\n**{library} at another batch size / length**: {len(other)} failing" + (":" if other else "."))
        lines += [f"- {model}: {why}".replace("|", "/") for model, why in other]
    return "\n".join(lines)


def totals(rows: list[dict]) -> str:
    n = len(rows)
    fx = sum(covered(r, "fxprune") for r in rows)
    tp = sum(covered(r, "torch-pruning") for r in rows)
    tp_skipped = all(r.get("torch-pruning", {}).get("status") == "skipped" for r in rows) and rows
    exact = sum(r.get("oracle", {}).get("status") == "exact" for r in rows)
    both = sum(covered(r, "fxprune") and covered(r, "torch-pruning") for r in rows)
    lines = [f"**fxprune {fx}/{n}, Torch-Pruning " + ("not installed" if tp_skipped else f"{tp}/{n}") + "**"
             f" (pruned at ratio {RATIO}, runs, every output shape kept); fxprune exact under the dead-unit oracle "
             f"on {exact}/{n}.",
             f"Covered *and* at most 90% of the MACs kept: fxprune {reduced(rows, 'fxprune')}/{n}, "
             f"Torch-Pruning {reduced(rows, 'torch-pruning')}/{n}."]
    for source in ("tv", "timm", "hf"):
        sub = [r for r in rows if r["model"].startswith(source + ":")]
        if sub:
            lines.append(f"- {source}: fxprune {sum(covered(r, 'fxprune') for r in sub)}/{len(sub)}, "
                         f"Torch-Pruning {sum(covered(r, 'torch-pruning') for r in sub)}/{len(sub)}")
    for library in LIBRARIES:
        kept = sorted(r[library]["macs_kept"] for r in rows if covered(r, library) and r[library].get("macs_kept"))
        times = sorted(r[library]["prune_s"] for r in rows if covered(r, library))
        if kept:
            lines.append(f"- {library}: median MACs kept {_pct(kept[len(kept) // 2])} over the models it covers, "
                         f"{sum(k > 0.9 for k in kept)} of them with more than 90% kept; "
                         f"median prune time {times[len(times) // 2]:.1f} s")
    if both:
        pairs = [(r["fxprune"]["prune_s"], r["torch-pruning"]["prune_s"]) for r in rows
                 if covered(r, "fxprune") and covered(r, "torch-pruning")]
        ratio = sorted(f / t for f, t in pairs)[len(pairs) // 2]
        lines.append(f"- on the {both} models both cover: median prune-time ratio fxprune/Torch-Pruning {ratio:.2f}")
    return "\n".join(lines)


def _classes(rows: list[dict], key: str) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        kind = harness.failure_class(r.get(key))
        if kind not in ("ok", "skipped"):
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def summary(runs: list[dict]) -> str:
    """The README's sentence on this report, every number from the log."""
    rows, _ = harness.latest_rows(runs, "model")
    n = len(rows)
    parts = []
    for source, label in (("tv", "torchvision"), ("timm", "timm"), ("hf", "Hugging Face")):
        sub = [r for r in rows if r["model"].startswith(source + ":")]
        if sub:
            parts.append(f"{label} {sum(covered(r, 'fxprune') for r in sub)}/{len(sub)} vs "
                         f"{sum(covered(r, 'torch-pruning') for r in sub)}/{len(sub)}")
    times = [(r["fxprune"]["prune_s"], r["model"]) for r in rows if covered(r, "fxprune")]
    slowest = max(times) if times else None
    exact = sum(r.get("oracle", {}).get("status") == "exact" for r in rows)
    return (f"fxprune {sum(covered(r, 'fxprune') for r in rows)}/{n}, Torch-Pruning "
            f"{sum(covered(r, 'torch-pruning') for r in rows)}/{n} ({'; '.join(parts)}) pruned at ratio {RATIO}, "
            f"run, every output shape kept; fxprune exact under the dead-unit oracle on {exact}/{n}. "
            f"Torch-Pruning's failures: {_classes(rows, 'torch-pruning')}; fxprune's: {_classes(rows, 'fxprune')}"
            + (f"; fxprune's slowest prune {slowest[0]:.1f} s ({slowest[1]})." if slowest else "."))


def render(runs: list[dict]) -> str:
    """The report, from the log's runs (a later run's row of a model replaces an earlier one)."""
    rows, _ = harness.latest_rows(runs, "model")
    header = runs[-1]["header"] if runs else {}
    limit = header.get("step_limit_note") or "Step limits not recorded (log from before harness limits)."
    return (f"# Coverage: fxprune vs Torch-Pruning at ratio {RATIO}\n\nRuns (every row comes from the run named "
            f"with it when there are several):\n\n{harness.describe_runs(runs, 'model')}\n\n{limit} "
            f"Times are each library's prune call (s; in parentheses: how long a failing step ran), MACs kept = "
            f"pruned / original MACs (fxprune's counter, Torch-Pruning's where fxprune's cannot capture the model), "
            f"oracle = relative output difference after removing planted dead units (fxprune). A failure is "
            f"named by its class: timeout, memory, error (pruning raised, or the pruned model does not run), wrong "
            f"output (non-finite values; for the oracle, outputs that differ), shape changed.\n\n"
            f"{totals(rows)}\n\n{table(rows)}\n\n## Failures\n{failures(rows)}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI subset: " + ", ".join(zoo.QUICK))
    parser.add_argument("--selection", default="standard", choices=["quick", "standard", "full"])
    parser.add_argument("--models", help="comma-separated source:name list (tv:, timm:, hf:)")
    parser.add_argument("--skip", default="", help="comma-separated names to leave out")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="fxprune,torch-pruning (default both)")
    parser.add_argument("--no-oracle", action="store_true")
    harness.add_limit_arguments(parser, max_gib=8)
    parser.add_argument("--timeout", type=float, help="seconds per worker process (default: every step's limit "
                                                      "plus 300 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="workers running at the same time (default 1)")
    parser.add_argument("--out", help="markdown report (default benchmarks/coverage.md; a temp dir with --quick)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--resume", action="store_true", help="add a run to --log for the models it lacks")
    parser.add_argument("--redo", default="", help="with --resume: comma-separated models to measure again "
                        "(only the --libraries given; the other library's result in the log is kept)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--note", default="", help="text for the report's header (how the rows were made)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    libraries = [lib for lib in args.libraries.split(",") if lib]
    if args.worker:
        worker(args.worker, libraries, harness.step_seconds("coverage", args.worker, args.step_timeout),
               not args.no_oracle, args.threads, args.max_gib)
        return 0
    names = args.models.split(",") if args.models else zoo.catalogue("quick" if args.quick else args.selection)
    skip = set(args.skip.split(","))
    names = [n for n in names if n not in skip]
    out = Path(args.out) if args.out else harness.default_out(args.quick, "coverage.md")
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        print(f"wrote {out} from {log_path}")
        return 0
    done, earlier = {}, {}
    if args.resume:  # rows of earlier runs (the last per model), except those to --redo
        if not log_path.exists():
            parser.error("--resume needs an existing --log")
        redo = set(args.redo.split(","))
        for row in harness.latest_rows(harness.read_runs(log_path), "model")[0]:
            if row["model"] in names:
                (earlier if row["model"] in redo else done)[row["model"]] = row
    todo = [n for n in names if n not in done]
    header = harness.run_header("coverage.py", list(sys.argv[1:] if argv is None else argv), args.note,
                                step_limit_note=harness.limits_note("coverage", todo, args.step_timeout))
    log = harness.Log(log_path, header, mode="a" if args.resume else "w")
    extra = ["--libraries", ",".join(libraries), "--threads", str(args.threads), "--max-gib", str(args.max_gib)]
    extra += ["--step-timeout", str(args.step_timeout)] if args.step_timeout else []
    extra += ["--no-oracle"] if args.no_oracle else []
    oracle = not args.no_oracle
    steps = len(libraries) + (1 if oracle and "fxprune" in libraries else 0)
    start, finished = time.perf_counter(), 0

    def one(name: str) -> dict:
        cmd = [harness.python(), __file__, "--worker", name] + extra
        step = harness.step_seconds("coverage", name, args.step_timeout)
        row = harness.run_worker(cmd, args.timeout or harness.worker_seconds(steps, step), {"model": name})
        if "died" in row or row.get("class") in ("timeout", "memory"):  # the steps the worker never reported
            reason = row.get("died") or row.get("reason", "")
            kind = row.get("class") or ("memory" if "SIGKILL" in reason else "error")
            for key in list(libraries) + (["oracle"] if "fxprune" in libraries and oracle else []):
                row.setdefault(key, harness.failed(kind, reason))
        for key in set(LIBRARIES) - set(libraries):  # redone for some libraries only: keep the others' results
            if key in earlier.get(name, {}):
                row[key] = earlier[name][key]
        return row

    # --jobs > 1 runs workers side by side (each library's time is then measured on a shared CPU)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one, name): name for name in todo}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            finished += 1
            log.write(row)
            print(f"[{finished}/{len(todo)}] {row['model']}: fxprune {_cell(row, 'fxprune')}, oracle "
                  f"{row.get('oracle', {}).get('status', '-')}, Torch-Pruning {_cell(row, 'torch-pruning')} "
                  f"({row['seconds']:.0f} s)", flush=True)
            harness.write_report(render, log_path, out)
    log.finish(wall_s=time.perf_counter() - start)
    harness.write_report(render, log_path, out)
    print()
    print(totals([r for r in harness.latest_rows(harness.read_runs(log_path), "model")[0] if r["model"] in names]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
