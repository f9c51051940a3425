"""Analysis and pruning speed and peak memory, fxprune against Torch-Pruning, on the same models in one run.

For each case and library, one worker process builds the model (not measured) and
measures, after an unmeasured warm-up analysis of a 3-layer CNN (one-time costs of the
process: lazy imports, dispatcher caches), with ``meter.Meter`` (wall time, peak RSS above
the start of the step):

* analysis: ``fxprune.analyze(model, inplace=True)`` (the analysis that in-place pruning runs;
  Hugging Face models are then exported with static sizes, since the graph is never handed out)
  / Torch-Pruning's ``DependencyGraph().build_dependency``;
* graph analysis (fxprune only): ``fxprune.analyze(model)``, the analysis ``prune`` runs when it returns a graph
  (batch and sequence sizes symbolic), with its CPU seconds per pass (``dg.meta["cpu_times"]``: capture,
  propagate, decompose, relate, solve);
* prune: ``fxprune.prune(model, 0.5, inplace=True)`` / Torch-Pruning's recipe
  (``tp_recipe.prune``, in place too), then checks that the pruned model runs with
  every output shape kept;

then rebuilds the model and repeats both steps under tracemalloc for the peak of
Python allocations (tracemalloc slows Python down, so it never overlaps the timing).
The ``llama-1b-meta`` case builds the 1B LLaMA on the meta device (no weights) and
measures analysis only: pruning needs weights to score units. Every example is one input of batch 1 (the
usual call): 16 tokens, or one 224 px image.

Cases: torchvision ``resnet50``, ``densenet121``, ``vit_b_16``, ``swin_b``; timm ``timm-vit-b``
(``vit_base_patch16_224``), ``timm-swin-b`` (``swin_base_patch4_window7_224``); Hugging Face ``bert-base``,
``hf-swin-b`` (Swin-B: embed 128, depths 2-2-18-2, window 7), ``hf-convnext-t`` (ConvNeXt-T), ``hf-deit-b``
(DeiT-B), ``llama-1b`` and ``llama-1b-meta``; random weights, eval mode.

Every step of both libraries gets the same limit, ``harness.step_seconds`` (300 s; 900 s for llama-1b, whose
traced pass is slow; ``--step-timeout`` changes it for all). Each (case, library) is measured ``--repeat``
times (default 3), each in a fresh worker, the libraries in turns; the log (``--log``, default ``--out`` with
``.jsonl``) holds every repeat and the report (:func:`render`, also called by ``results.py``) gives medians.

Usage::

    python benchmarks/speed.py --quick       # CI: small models, < 2 minutes
    python benchmarks/speed.py               # every case in FULL
    python benchmarks/speed.py --cases resnet50,llama-1b-meta --libraries fxprune
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

RATIO = 0.5
LIBRARIES = ("fxprune", "torch-pruning")
FULL = ["resnet50", "densenet121", "vit_b_16", "swin_b", "timm-vit-b", "timm-swin-b", "bert-base", "hf-swin-b",
        "hf-convnext-t", "hf-deit-b", "llama-1b", "llama-1b-meta"]
QUICK = ["resnet18", "bert-tiny", "llama-tiny-meta"]  # hf-swin-tiny: the tiny Swin of issue 23, by --cases
# About 1.1B parameters (TinyLlama's shape): hidden 2048, 22 layers, 32 heads, 4 kv heads, MLP 5632, vocab 32000.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, use_cache=False)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, use_cache=False)


def build(case: str):
    """``(model, args, kwargs, on_meta)`` for a case; random init, eval mode."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    if case in ("resnet18", "resnet50", "densenet121", "vit_b_16", "swin_b"):
        import torchvision

        return torchvision.models.get_model(case, weights=None).eval(), (image,), {}, False
    if case.startswith("timm-"):
        import timm

        name = {"timm-vit-b": "vit_base_patch16_224", "timm-swin-b": "swin_base_patch4_window7_224"}[case]
        return timm.create_model(name, pretrained=False).eval(), (image,), {}, False
    import transformers as T

    if case.startswith("hf-"):
        configs = {  # Swin-B, ConvNeXt-T and DeiT-B; the tiny Swin of issue 23
            "hf-swin-b": lambda: T.SwinForImageClassification(T.SwinConfig(
                embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7)),
            "hf-swin-tiny": lambda: T.SwinForImageClassification(T.SwinConfig(
                image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4)),
            "hf-convnext-t": lambda: T.ConvNextForImageClassification(T.ConvNextConfig()),
            "hf-deit-b": lambda: T.DeiTForImageClassification(T.DeiTConfig()),
        }
        side = 32 if case == "hf-swin-tiny" else 224
        return configs[case]().eval(), (image[..., :side, :side].contiguous(),), {}, False

    if case == "bert-base":  # BertConfig's defaults are bert-base: hidden 768, 12 layers, 12 heads
        return T.BertModel(T.BertConfig()).eval(), (ids,), {}, False
    if case == "bert-tiny":
        config = T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128)
        return T.BertModel(config).eval(), (ids,), {}, False
    if case.startswith("llama-"):
        config = T.LlamaConfig(**(LLAMA_1B if case.startswith("llama-1b") else LLAMA_TINY))
        on_meta = case.endswith("-meta")
        with torch.device("meta" if on_meta else "cpu"):
            model = T.LlamaForCausalLM(config)
        return model.eval(), (ids,), {}, on_meta
    raise KeyError(f"unknown case {case!r}")


def _analyze(library: str, case: str, model, args, kwargs):
    if library == "fxprune":
        import fxprune

        return fxprune.analyze(model, args, kwargs=kwargs or None, inplace=True)  # as the prune step uses it
    import tp_recipe

    return tp_recipe.analyze(model, args, kwargs)


def _graph_analysis(case: str, model, args, kwargs):
    """fxprune's analysis as ``prune`` runs it to return a graph (dynamic batch and sequence sizes)."""
    import fxprune

    return fxprune.analyze(model, args, kwargs=kwargs or None)


def _passes(dg) -> dict:
    return {k: round(v, 3) for k, v in getattr(dg, "meta", {}).get("cpu_times", {}).items()}


def _prune(library: str, case: str, model, args, kwargs):
    if library == "fxprune":
        import fxprune

        return fxprune.prune(model, RATIO, example_inputs=args, kwargs=kwargs or None, inplace=True)
    import tp_recipe

    return tp_recipe.prune(f"speed:{case}", model, args, kwargs, RATIO)


def warm_up(library: str) -> None:
    """One analysis of a 3-layer CNN, not measured: lazy imports and dispatcher caches are a per-process cost."""
    import torch

    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(392, 4))
    _analyze(library, "warm-up", tiny.eval(), (torch.randn(1, 3, 9, 9),), {})


def _step(row: dict, key: str, limit: tuple, fn, *args) -> object:
    """Time ``fn`` with a Meter under a (seconds, GiB) limit; record seconds and RSS peak, or the failure."""
    import meter

    try:
        with harness.time_limit(*limit), meter.Meter() as m:
            result = fn(*args)
    except (Exception, harness.StepLimit) as exc:  # a library that fails or hangs on a case is a result
        row[f"{key}_error"] = harness.first_line(exc)
        row[f"{key}_class"] = exc.kind if isinstance(exc, harness.StepLimit) else "error"
        return None
    row[f"{key}_s"], row[f"{key}_rss_mb"] = m.seconds, m.rss_peak_mb
    return result


def measure_case(case: str, library: str, limit: tuple, python_memory: bool) -> dict:
    import torch

    import measure
    import meter

    torch.set_grad_enabled(False)
    warm_up(library)
    model, args, kwargs, on_meta = build(case)
    row = {"case": case, "library": library, "params": measure.params(model), "meta": on_meta}
    expected = None if on_meta else measure.shapes(measure.run(model, args, kwargs))
    dg = _step(row, "analysis", limit, _analyze, library, case, model, args, kwargs)
    if dg is not None and library == "fxprune":
        row["analysis_passes_cpu_s"] = _passes(dg)
    del dg
    gc.collect()
    if library == "fxprune" and "analysis_error" not in row:
        dg = _step(row, "graph_analysis", limit, _graph_analysis, case, model, args, kwargs)
        if dg is not None:
            row["graph_analysis_passes_cpu_s"] = _passes(dg)
            row["graph_shapes"] = (dg.meta.get("capture") or {}).get("shapes")
        del dg
        gc.collect()
    harness.emit(row)  # partial rows: a step that kills the worker leaves the ones before it
    if not on_meta and "analysis_error" not in row:
        pruned = _step(row, "prune", limit, _prune, library, case, model, args, kwargs)
        if pruned is not None:
            try:
                got = measure.shapes(measure.run(pruned, args, kwargs))
                row["shapes_kept"] = got == expected
                row["params_kept"] = measure.params(pruned) / row["params"]
            except Exception as exc:  # pruned, but no longer runs
                row["prune_error"] = "pruned model fails to run: " + harness.first_line(exc)
                row["prune_class"] = "error"
        del pruned
        harness.emit(row)
    del model
    gc.collect()
    if python_memory and "analysis_error" not in row:
        model, args, kwargs, _ = build(case)
        try:
            with harness.time_limit(*limit):
                row["analysis_py_mb"], dg = meter.python_peak(_analyze, library, case, model, args, kwargs)
                del dg
                if "prune_s" in row:
                    row["prune_py_mb"], _ = meter.python_peak(_prune, library, case, model, args, kwargs)
        except (Exception, harness.StepLimit) as exc:  # the timed pass succeeded; say why this one did not
            row["python_memory_error"] = harness.first_line(exc)
    return row


def worker(case: str, library: str, limit: tuple, python_memory: bool) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    if library == "torch-pruning":
        import tp_recipe

        if not tp_recipe.available():
            harness.emit({"case": case, "library": library, "skipped": "torch-pruning is not installed"})
            return
    row = harness.guarded(measure_case, case, library, limit, python_memory)
    row.update(case=case, library=library)
    harness.emit(row)


NUMBERS = ("analysis_s", "graph_analysis_s", "analysis_rss_mb", "analysis_py_mb", "prune_s", "prune_rss_mb",
           "prune_py_mb", "params_kept")


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (case, library): the median of every quantity over the repeats that measured it (``repeats``:
    how many did), the other fields from the last repeat, and the distinct failures of any repeat."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["library"]), []).append(r)
    merged = []
    for group in groups.values():
        row = dict(group[-1])
        for key in NUMBERS:
            values = [r[key] for r in group if key in r]
            if values:
                row[key] = statistics.median(values)
                row[key + "_runs"] = len(values)
            else:
                row.pop(key, None)
        row["repeats"] = len(group)
        row["shapes_kept"] = all(r.get("shapes_kept", True) for r in group if "prune_s" in r) and \
            any("shapes_kept" in r for r in group)
        merged.append(row)
    return merged


def _num(row, key, fmt="{:.2f}"):
    if key not in row:
        return ""
    runs = row.get(key + "_runs", 1)
    return fmt.format(row[key]) + ("" if runs == row.get("repeats", 1) else f" ({runs}/{row['repeats']})")


def _status(row) -> str:
    if "skipped" in row:
        return "skipped: " + row["skipped"]
    if "died" in row:
        return f"{row['died']} after the steps shown".replace("|", "/")
    for key in ("analysis_error", "prune_error", "reason"):
        if key in row:
            kind = row.get(key.split("_")[0] + "_class") or harness.failure_class({"reason": row[key]})
            return f"{key.split('_')[0]} failed ({kind}): {row[key]}".replace("|", "/")
    if row.get("meta"):
        return "ok (analysis only, meta device)"
    return "ok" if row.get("shapes_kept") else "output shapes changed"


def table(rows: list[dict]) -> str:
    lines = ["| case | params | library | analysis s | graph analysis s | analysis RSS MB | analysis Python MB | "
             "prune s | prune RSS MB | prune Python MB | status |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
        lines.append(f"| {r['case']} | {params} | {r['library']} | {_num(r, 'analysis_s')} | "
                     f"{_num(r, 'graph_analysis_s')} | "
                     f"{_num(r, 'analysis_rss_mb', '{:.1f}')} | {_num(r, 'analysis_py_mb', '{:.1f}')} | "
                     f"{_num(r, 'prune_s')} | {_num(r, 'prune_rss_mb', '{:.1f}')} | "
                     f"{_num(r, 'prune_py_mb', '{:.1f}')} | {_status(r)} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """fxprune / Torch-Pruning for every quantity both measured on a case (medians over the repeats)."""
    keys = [("analysis_s", "analysis time"), ("prune_s", "prune time"), ("analysis_rss_mb", "analysis RSS"),
            ("prune_rss_mb", "prune RSS"), ("analysis_py_mb", "analysis Python"), ("prune_py_mb", "prune Python")]
    lines = ["| case | " + " | ".join(label for _, label in keys) + " |", "| --- |" + " ---: |" * len(keys)]
    by = {(r["case"], r["library"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):
        fx, tp = by.get((case, "fxprune"), {}), by.get((case, "torch-pruning"), {})
        cells = []
        for key, _ in keys:
            if _succeeded(fx, key) and _succeeded(tp, key) and tp[key] > 0:
                cells.append(f"{fx[key] / tp[key]:.2f}")
            elif _succeeded(fx, key) and key in tp:  # timed, but its pruned model failed: no ratio to a failure
                cells.append("Torch-Pruning's failed")
            else:
                cells.append("fxprune only" if key in fx and tp else "")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _succeeded(row: dict, key: str) -> bool:
    """``key`` was measured and its step did not fail in any repeat (a prune whose model then fails to run has a
    time but no result)."""
    step = next(s for s in ("graph_analysis", "analysis", "prune") if key.startswith(s))
    return key in row and f"{step}_error" not in row


def summary(runs: list[dict]) -> str:
    """The README's sentence on this report: per case, the medians of both libraries."""
    rows = median_rows(runs[-1]["rows"])
    by = {(r["case"], r["library"]): r for r in rows}
    repeats = sorted({r["repeats"] for r in rows})
    parts = []
    for case in dict.fromkeys(r["case"] for r in rows):
        fx, tp = by.get((case, "fxprune"), {}), by.get((case, "torch-pruning"), {})
        cells = []
        for key, label, unit, digits in (("analysis_s", "analysis", "s", 2), ("prune_s", "prune", "s", 2),
                                         ("prune_rss_mb", "prune peak RSS", "MB", 0)):
            if key in fx or key in tp:
                mine = f"{fx[key]:.{digits}f}" if _succeeded(fx, key) else "failed"
                theirs = f"{tp[key]:.{digits}f}" if _succeeded(tp, key) else ("failed" if tp else "not run")
                cells.append(f"{label} {mine} {unit} against {theirs}")
        if "analysis_error" in tp:
            cells.append(f"Torch-Pruning: {tp['analysis_error']}")
        parts.append(f"{case}: " + ", ".join(cells))
    return (f"fxprune against Torch-Pruning, medians of {'/'.join(map(str, repeats))} repeats: "
            + "; ".join(parts) + ".")


def render(runs: list[dict]) -> str:
    """The report of the log's last run: the median of each quantity over its repeats."""
    run = runs[-1]
    rows = median_rows(run["rows"])
    header = run["header"]
    repeats = sorted({r["repeats"] for r in rows})
    limit = header.get("step_limit_note") or "Step limits not recorded (log from before harness limits)."
    return (f"# Speed and memory: fxprune vs Torch-Pruning (ratio {RATIO})\n\n"
            f"{harness.describe_runs([run])}\n\n{limit} {header.get('threads', '?')} torch threads. Each number is "
            f"the median over {'/'.join(map(str, repeats))} repeats, each a fresh worker process, the libraries in "
            "turns (a number measured by fewer repeats says how many, e.g. (2/3)). "
            "Both libraries prune in place; each worker first analyses a 3-layer CNN, unmeasured (lazy imports, "
            "dispatcher caches). RSS = peak resident memory above the start of the step "
            "(tensors included); Python = tracemalloc peak (Python allocations only, measured in a separate "
            "pass). Ratios are fxprune / Torch-Pruning of the medians (below 1: fxprune is faster or smaller).\n\n"
            f"{table(rows)}\n\n### Ratios fxprune / Torch-Pruning\n\n{ratios(rows)}\n\n"
            f"### fxprune's passes (CPU seconds, last repeat)\n\n{passes_table(rows)}\n")


def passes_table(rows: list[dict]) -> str:
    """fxprune's CPU seconds per analysis pass, in place (static capture for Hugging Face) and as a graph."""
    names = ["capture", "propagate", "decompose", "relate", "solve"]
    lines = ["| case | analysis | " + " | ".join(names) + " |", "| --- | --- |" + " ---: |" * len(names)]
    for r in rows:
        for label, key in (("in place", "analysis_passes_cpu_s"), ("graph", "graph_analysis_passes_cpu_s")):
            if key in r:
                lines.append(f"| {r['case']} | {label} | " + " | ".join(f"{r[key].get(n, 0):.2f}" for n in names)
                             + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI cases: " + ", ".join(QUICK))
    parser.add_argument("--cases", help="comma-separated cases (default: " + ", ".join(FULL) + ")")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--repeat", type=int, help="measurements of every (case, library), each in a fresh worker; "
                                                   "the report gives medians (default 3; 1 with --quick)")
    parser.add_argument("--no-python-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--threads", type=int, help="torch threads in every worker, both libraries alike (default: "
                                                    "torch's, one per core); 1 keeps the numbers apart from another "
                                                    "process on the machine")
    harness.add_limit_arguments(parser, max_gib=14)
    parser.add_argument("--timeout", type=float, help="seconds per worker process (default: its steps' limits "
                                                      "plus 300 s)")
    parser.add_argument("--out", help="markdown report (default benchmarks/speed.md; a temp dir with --quick)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "LIBRARY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        limit = (harness.step_seconds("speed", args.worker[0], args.step_timeout), args.max_gib)
        worker(*args.worker, limit, not args.no_python_memory)
        return 0
    cases = args.cases.split(",") if args.cases else (QUICK if args.quick else FULL)
    libraries = [lib for lib in args.libraries.split(",") if lib]
    out = Path(args.out) if args.out else harness.default_out(args.quick, "speed.md")
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        print(f"wrote {out} from {log_path}")
        return 0
    import torch

    header = harness.run_header("speed.py", list(sys.argv[1:] if argv is None else argv),
                                step_limit_note=harness.limits_note("speed", cases, args.step_timeout),
                                threads=args.threads or torch.get_num_threads())
    log = harness.Log(log_path, header)
    start = time.perf_counter()
    for repeat in range(args.repeat):  # repeats in turns: a change of load falls on every case and library alike
        for case in cases:
            for library in libraries:
                step = harness.step_seconds("speed", case, args.step_timeout)
                cmd = [harness.python(), __file__, "--worker", case, library, "--max-gib", str(args.max_gib)]
                cmd += ["--step-timeout", str(args.step_timeout)] if args.step_timeout else []
                cmd += ["--no-python-memory"] if args.no_python_memory else []
                cmd += ["--threads", str(args.threads)] if args.threads else []
                row = harness.run_worker(cmd, args.timeout or harness.worker_seconds(4, step),
                                         {"case": case, "library": library})
                row["repeat"] = repeat
                log.write(row)
                print(f"[{repeat + 1}/{args.repeat}] {case} / {library}: analysis {_num(row, 'analysis_s')} s, "
                      f"graph analysis {_num(row, 'graph_analysis_s')} s, prune {_num(row, 'prune_s')} s, "
                      f"{_status(row)} ({row['seconds']:.0f} s)", flush=True)
                harness.write_report(render, log_path, out)
    log.finish(wall_s=time.perf_counter() - start)
    harness.write_report(render, log_path, out)
    print()
    print(ratios(median_rows(harness.read_runs(log_path)[-1]["rows"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
