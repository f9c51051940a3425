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
and every output keeps its shape. Each library gets ``--step-timeout`` seconds
and ``--max-gib`` of memory per model (a hang is a failure of that library only); each worker gets ``--timeout``.

Usage::

    python benchmarks/coverage.py --quick                 # CI: a handful of models, < 3 minutes
    python benchmarks/coverage.py --jobs 2                # standard list (zoo.TV_STANDARD, timm, HF)
    python benchmarks/coverage.py --models tv:resnet18,timm:convnext_atto,hf:t5
    python benchmarks/coverage.py --selection full --out benchmarks/coverage_full.md   # every torchvision model

The markdown table and the totals ("fxprune N/M, Torch-Pruning K/M") are written
to ``--out`` after every model, and one JSON line per model to ``--log``.
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
        return {**row, "status": "forward failed", "reason": harness.first_line(exc)}
    row["shapes"] = measure.shapes(got)
    if row["shapes"] != out_shapes:
        return {**row, "status": "shape changed", "reason": f"{row['shapes']} != {out_shapes}"[:240]}
    original = zoo.build(name)[0]  # untouched by either library, for parameter and MAC counts
    row["other_sizes"] = _other_sizes(pruned, original, args, kwargs, measure)
    row["params_kept"] = measure.params(pruned) / measure.params(original)
    row["macs_kept"], row["macs_counter"] = measure.macs_ratio(original, pruned, args, kwargs)
    row["status"] = "ok"
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
    row["status"] = "exact" if row["oracle_diff"] <= ORACLE_TOL else "inexact"
    return row


def measure_model(name: str, libraries, step_timeout: float, oracle: bool, max_gib: float) -> dict:
    """Everything the table reports for one model (runs inside a worker process)."""
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
    other = result.get("other_sizes", "ok")
    cell = "ok" if result["status"] == "ok" else result["status"]
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
    """One line per failing (model, library), with the reason."""
    lines = []
    for library, key in (("fxprune", "fxprune"), ("dead-unit oracle", "oracle"), ("Torch-Pruning", "torch-pruning")):
        bad = [r for r in rows if r.get(key, {}).get("status") not in ("ok", "exact", "skipped", None)
               or (key == "fxprune" and r.get("status") == "error")]
        lines.append(f"\n**{library}**: {len(bad)} failing" + (":" if bad else "."))
        for r in bad:
            res = r.get(key) or {"status": "error", "reason": r.get("reason", "")}
            reason = res.get("reason", "")
            if key == "oracle" and "oracle_diff" in res:
                reason = f"relative difference {res['oracle_diff']:.1e}"
            lines.append(f"- {r['model']}: {res['status']}: {reason}".replace("|", "/"))
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


def report(rows: list[dict], command: str, note: str = "") -> str:
    import platform

    import torch

    versions = f"torch {torch.__version__}"
    for mod in ("torchvision", "timm", "transformers", "torch_pruning"):
        try:
            versions += f", {mod} {__import__(mod).__version__}"
        except ImportError:
            pass
    return (f"# Coverage: fxprune vs Torch-Pruning at ratio {RATIO}\n\n`{command}`{', ' + note if note else ''}\n\n"
            f"{versions}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. "
            f"Times are each library's prune call (s; in parentheses: how long a failing step ran), MACs kept = pruned / original MACs "
            f"(fxprune's counter, Torch-Pruning's where fxprune's cannot capture the model), "
            f"oracle = relative output difference after removing planted dead units (fxprune).\n\n"
            f"{totals(rows)}\n\n{table(rows)}\n\n## Failures\n{failures(rows)}\n")


def _shown(argv: list[str]) -> list[str]:
    """The command line for the report: without --note (printed after it), long --redo lists counted."""
    shown, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif i and argv[i - 1] == "--redo" and arg.count(",") > 5:
            shown.append(f"<{arg.count(',') + 1} models>")
        else:
            shown.append(arg)
    return shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI subset: " + ", ".join(zoo.QUICK))
    parser.add_argument("--selection", default="standard", choices=["quick", "standard", "full"])
    parser.add_argument("--models", help="comma-separated source:name list (tv:, timm:, hf:)")
    parser.add_argument("--skip", default="", help="comma-separated names to leave out")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="fxprune,torch-pruning (default both)")
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--step-timeout", type=float, default=180, help="seconds per library per model")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    parser.add_argument("--max-gib", type=float, default=8, help="RSS cap per worker step, GiB (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="workers running at the same time (default 1)")
    parser.add_argument("--out", help="markdown report (default benchmarks/coverage.md; a temp dir with --quick)")
    parser.add_argument("--log", help="append one JSON line per model")
    parser.add_argument("--resume", action="store_true", help="reuse the rows already in --log")
    parser.add_argument("--redo", default="", help="with --resume: comma-separated models to measure again "
                        "(only the --libraries given; the other library's result in the log is kept)")
    parser.add_argument("--note", default="", help="text after the command line in the report (how rows were made)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    libraries = [lib for lib in args.libraries.split(",") if lib]
    if args.worker:
        worker(args.worker, libraries, args.step_timeout, not args.no_oracle, args.threads, args.max_gib)
        return 0
    names = args.models.split(",") if args.models else zoo.catalogue("quick" if args.quick else args.selection)
    skip = set(args.skip.split(","))
    names = [n for n in names if n not in skip]
    out = Path(args.out) if args.out else harness.default_out(args.quick, "coverage.md")
    command = "python benchmarks/coverage.py " + " ".join(_shown(sys.argv[1:] if argv is None else argv))
    done, earlier = {}, {}
    if args.resume:  # rows of an earlier run (the last per model), except those to --redo
        if not args.log or not Path(args.log).exists():
            parser.error("--resume needs an existing --log")
        redo = set(args.redo.split(","))
        for line in Path(args.log).read_text().splitlines():
            row = json.loads(line)
            if row["model"] in names:
                (earlier if row["model"] in redo else done)[row["model"]] = row
    todo = [n for n in names if n not in done]
    log = open(args.log, "a") if args.log else None
    extra = ["--libraries", ",".join(libraries), "--step-timeout", str(args.step_timeout), "--threads", str(args.threads),
             "--max-gib", str(args.max_gib)]
    extra += ["--no-oracle"] if args.no_oracle else []
    oracle = not args.no_oracle

    def one(name: str) -> dict:
        cmd = [harness.python(), __file__, "--worker", name] + extra
        row = harness.run_worker(cmd, args.timeout, {"model": name})
        if "died" in row:  # the steps the worker never reported died with it
            for key in list(libraries) + (["oracle"] if "fxprune" in libraries and oracle else []):
                row.setdefault(key, {"status": "error", "reason": row["died"]})
        for key in set(LIBRARIES) - set(libraries):  # redone for some libraries only: keep the others' results
            if key in earlier.get(name, {}):
                row[key] = earlier[name][key]
        return row

    # --jobs > 1 runs workers side by side (each library's time is then measured on a shared CPU)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one, name): name for name in todo}
        for future in concurrent.futures.as_completed(futures):
            row = done[futures[future]] = future.result()
            if log:
                log.write(json.dumps(row, default=str) + "\n")
                log.flush()
            print(f"[{len(done)}/{len(names)}] {row['model']}: fxprune {_cell(row, 'fxprune')}, oracle "
                  f"{row.get('oracle', {}).get('status', '-')}, Torch-Pruning {_cell(row, 'torch-pruning')} "
                  f"({row['seconds']:.0f} s)", flush=True)
            rows = [done[n] for n in names if n in done]
            out.write_text(report(rows, command, args.note))
    rows = [done[n] for n in names if n in done]
    out.write_text(report(rows, command, args.note))
    print()
    print(totals(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
