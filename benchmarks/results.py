"""Rebuild every benchmark report from its committed log, then assemble benchmarks/RESULTS.md (nothing typed by hand).

Each benchmark script writes a JSON-lines log (a header naming each run: command, date, versions, machine, load,
limits; then its rows) and renders its markdown report from that log with its ``render(runs)`` function.
This script calls those functions on the committed logs (:data:`REPORTS`), so every markdown report is what its
log says, and writes RESULTS.md: the reports one after another under a header naming the machine, the latency
plots linked. A report whose log is missing is named as not run; a report with no log behind it is left out with
the command that makes one.

Run it after the scripts (see each script's docstring for its command)::

    python benchmarks/results.py              # rebuild every report from its log, then RESULTS.md
    python benchmarks/results.py --check      # rebuild in memory and fail if a committed report differs
    python benchmarks/results.py --readme     # also the README's "Against Torch-Pruning" bullets, from the logs

Example of the header it writes::

    # fxprune benchmarks against Torch-Pruning
    Machine: x86_64, 2 CPUs, 23.4 GiB RAM, Linux 6.1; load average when assembled: 8.4
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (report, its log, the script whose render() makes the report, RESULTS.md section title, the command that makes it)
REPORTS = [
    ("coverage.md", "coverage.jsonl", "coverage", "Coverage", "python benchmarks/coverage.py --jobs 2"),
    ("speed.md", "speed.jsonl", "speed", "Speed and memory", "python benchmarks/speed.py"),
    ("latency_cpu.md", "latency_cpu.jsonl", "latency", "Latency on CPU", "python benchmarks/latency.py"),
    ("latency_cuda.md", "latency_cuda.jsonl", "latency", "Latency on GPU",
     "python benchmarks/latency.py --device cuda"),
    ("quality.md", "quality.jsonl", "quality", "Quality without retraining", "python benchmarks/quality.py"),
    ("recovery.md", "recovery.jsonl", "recovery", "Recovery by distillation, per CPU budget",
     "python benchmarks/recovery.py --threads 1"),
    ("calibration_memory.md", "calibration_memory.jsonl", "calibration_memory",
     "Calibration statistics of a 1B LLaMA", "python benchmarks/calibration_memory.py"),
    ("scale.md", "scale.jsonl", "scale", "Scale: planning a 70B-class LLaMA on the meta device",
     "python benchmarks/scale.py --plan-70b"),
    ("checkpoint_streaming.md", "checkpoint_streaming.jsonl", "checkpoint_streaming",
     "prune_checkpoint on random LLaMA checkpoints",
     "python benchmarks/checkpoint_streaming.py --sizes 1b,7b --torch-pruning "
     "--out benchmarks/checkpoint_streaming.md"),
    ("checkpoint_layerwise.md", "checkpoint_layerwise.jsonl", "checkpoint_streaming",
     "Layer-by-layer calibration from checkpoint shards",
     "python benchmarks/checkpoint_streaming.py --sizes 1b --calibration 4x128 "
     "--out benchmarks/checkpoint_layerwise.md"),
    ("isomorphic_minilm.md", "isomorphic_minilm.jsonl", "isomorphic_minilm", "Isomorphic global ranking on MiniLM",
     "python benchmarks/isomorphic_minilm.py --ratios 0.3 --target-params 0.85,0.7 --importances l2,activation"),
    ("depth.md", "depth.jsonl", "depth", "Depth against width at equal parameters", "python benchmarks/depth.py"),
    ("depth_latency.md", "depth_latency.jsonl", "depth", "Depth against width: CPU latency of the small LLaMA",
     "python benchmarks/depth.py --tasks lm --latency"),
    ("hf_sweep.md", "hf_sweep.jsonl", "hf_sweep", "Hugging Face model types: every fxprune check, and Torch-Pruning",
     "python benchmarks/hf_sweep.py --jobs 2"),
    ("tp_hang.md", "tp_hang.jsonl", "tp_hang", "Why Torch-Pruning times out on tiny decoders",
     "python benchmarks/tp_hang.py"),
    ("alignment_cpu.md", "alignment_cpu.jsonl", "alignment", "Latency of aligned and unaligned widths (CPU)",
     "python benchmarks/alignment.py"),
    ("torchvision_results.md", "torchvision_results.jsonl", "torchvision_sweep", "The torchvision zoo, fxprune alone",
     "python benchmarks/torchvision_sweep.py"),
    ("RESULTS_accuracy.md", "RESULTS_accuracy.jsonl", "accuracy_digits", "Accuracy after pruning and fine-tuning",
     "python benchmarks/accuracy_digits.py"),
    ("RESULTS_macs.md", "RESULTS_macs.jsonl", "macs_vs_fvcore", "fxprune.count against fvcore",
     "python benchmarks/macs_vs_fvcore.py"),
    ("RESULTS_targets.md", "RESULTS_targets.jsonl", "targets", "MACs and parameter targets",
     "python benchmarks/targets.py"),
    ("ecosystem.md", "ecosystem.jsonl", "ecosystem", "The pruned model back in its library (in place, reload, downstream)",
     "python benchmarks/ecosystem.py"),
]


# the README's "Against Torch-Pruning" bullets: (bold title, report, its log, the script whose summary() says it)
README_BULLETS = [
    ("Coverage", "coverage.md", "coverage.jsonl", "coverage"),
    ("Hugging Face breadth", "hf_sweep.md", "hf_sweep.jsonl", "hf_sweep"),
    ("Why Torch-Pruning times out", "tp_hang.md", "tp_hang.jsonl", "tp_hang"),
    ("Speed and memory", "speed.md", "speed.jsonl", "speed"),
    ("Latency of the pruned models (fxprune alone)", "latency_cpu.md", "latency_cpu.jsonl", "latency"),
    ("Quality without retraining", "quality.md", "quality.jsonl", "quality"),
    ("The pruned model back in its library", "ecosystem.md", "ecosystem.jsonl", "ecosystem"),
]
# other generated README blocks: (begin marker, end marker, log, script, its function of the runs)
README_BLOCKS = [
    ("<!-- ecosystem:begin (python benchmarks/results.py --readme) -->", "<!-- ecosystem:end -->",
     "ecosystem.jsonl", "ecosystem", "readme_table"),
]
BEGIN, END = "<!-- benchmarks:begin (python benchmarks/results.py --readme) -->", "<!-- benchmarks:end -->"


def run_source(runs: list[dict]) -> str:
    """Where a bullet's numbers come from: one run's command and date, or, for a log of several runs (each
    measuring some rows, as quality.jsonl), their count and dates, since one command would not make the bullet's
    rows (the report lists every run's command).

        >>> run_source([{"header": {"command": "python benchmarks/quality.py", "started": "2026-12-07"}, "rows": []}])
        '`python benchmarks/quality.py`, 2026-12-07'
    """
    headers = [run["header"] or (run["rows"] or [{}])[-1] for run in runs]  # latency's rows name their command
    if len(headers) > 1:
        dates = [h["started"] for h in headers if h.get("started")]
        span = f", {dates[0]} to {dates[-1]}" if dates else ""
        return f"{len(headers)} runs{span}, each run's command in the report"
    if headers and headers[-1].get("command"):
        return f"`{headers[-1]['command']}`, {headers[-1]['started']}"
    return "run before logs named their command"


def readme_block(folder: Path) -> str:
    """The bullets between the README's markers: each generated from its log by its script's ``summary(runs)``,
    naming the report, the command and the date of the run (or saying that the log is missing)."""
    import harness

    lines = []
    for title, report, log, script in README_BULLETS:
        if not (folder / log).exists():
            lines.append(f"- **{title}**: not measured yet (`{log}` is missing).")
            continue
        runs = harness.read_runs(folder / log)
        source = run_source(runs)
        module = importlib.import_module(script)
        text = (getattr(module, "readme_summary", None) or module.summary)(runs)
        lines.append(f"- **{title}** ([{report}](benchmarks/{report}); {source}): {text}")
    return "\n".join(lines)


def write_readme(readme: Path, folder: Path) -> None:
    import harness

    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} block to fill")
    text = _fill(text, BEGIN, END, readme_block(folder))
    for begin, end, log, script, function in README_BLOCKS:  # blocks elsewhere in the README, from their logs
        if begin in text and end in text and (folder / log).exists():
            module = importlib.import_module(script)
            text = _fill(text, begin, end, getattr(module, function)(harness.read_runs(folder / log)))
    readme.write_text(text)


def _fill(text: str, begin: str, end: str, block: str) -> str:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def _memory_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])
        return f"{total_kb / 2**20:.1f} GiB RAM"
    except OSError:
        return "RAM unknown"


def _demote(text: str) -> str:
    """Each report's headings one level down, so RESULTS.md has one title."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def rebuild(folder: Path, write: bool = True) -> dict[str, str]:
    """``{report: text}`` rendered from each report's log (written to the report when ``write``); a report without
    its log is not in the result."""
    import harness

    texts = {}
    for report, log, script, _, _ in REPORTS:
        if not (folder / log).exists():
            continue
        module = importlib.import_module(script)
        texts[report] = module.render(harness.read_runs(folder / log))
        if write:
            (folder / report).write_text(texts[report])
    return texts


def assemble(folder: Path, texts: dict[str, str], notes: str = "") -> str:
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"
    parts = ["# fxprune benchmarks against Torch-Pruning\n",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {_memory_gib()}, {platform.system()} "
             f"{platform.release()}; load average when assembled: {load}. Every report below is rendered from its "
             "committed log (`benchmarks/*.jsonl`) by the script named in it; each run's command, date, machine and "
             "versions are in its section. The README's \"Against Torch-Pruning\" section summarises them.\n"]
    if notes:
        parts.append(notes.strip() + "\n")
    missing = []
    for report, log, _, title, command in REPORTS:
        if report not in texts:
            if (folder / report).exists():
                missing.append(f"- {report}: no log ({log}) behind it: left out until `{command}` makes one")
            continue
        body = _demote(texts[report])
        png = (folder / report).with_suffix(".png")
        if report.startswith("latency") and png.exists():
            body += f"\n\n![{title.lower()}]({png.name})\n"
        parts.append((f"## {title}\n\n" + body.split("\n", 1)[1]) if body.startswith("## ") else body)
    if missing:
        parts.append("## Reports without a log\n\n" + "\n".join(missing) + "\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(HERE), help="where the reports and logs are (default benchmarks/)")
    parser.add_argument("--notes", help="a markdown file whose text goes under the header (conditions, caveats)")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--readme", nargs="?", const=str(HERE.parent / "README.md"), metavar="README",
                        help="also fill the README's generated block (default README.md) from the logs")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; fail if a committed report is not what its log renders")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if args.check:
        texts = rebuild(folder, write=False)
        stale = [r for r, text in texts.items() if (folder / r).read_text() != text]
        print("\n".join(f"{r} differs from what its log renders" for r in stale) or "every report is its log's")
        return 1 if stale else 0
    texts = rebuild(folder)
    notes = Path(args.notes).read_text() if args.notes else ""
    Path(args.out).write_text(assemble(folder, texts, notes))
    print(f"rebuilt {', '.join(texts)}; wrote {args.out}")
    if args.readme:
        write_readme(Path(args.readme), folder)
        print(f"filled the generated block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
