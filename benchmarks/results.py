"""Assemble benchmarks/RESULTS.md from the reports the three benchmark scripts wrote (nothing is typed by hand).

Reads ``coverage.md``, ``speed.md``, ``latency_cpu.md``, ``latency_cuda.md``, ``quality.md`` and
``calibration_memory.md``, ``scale.md``, ``checkpoint_streaming.md``, ``checkpoint_layerwise.md``, ``isomorphic_minilm.md``, ``depth.md``, ``depth_latency.md``, ``hf_sweep.md`` (each script's ``--out``; ``latency.py --device cuda`` writes the GPU one, on a GPU
machine) and writes them one after another under a header naming the machine, with
the latency plots linked. A missing report is named as not run (the latency of the
old single-table script, ``latency.md``, stands in for ``latency_cpu.md`` until that exists).
Run it after the scripts:

    python benchmarks/coverage.py --jobs 2 && python benchmarks/speed.py && python benchmarks/latency.py
    python benchmarks/results.py            # -> benchmarks/RESULTS.md

Example of the header it writes::

    # fxprune benchmarks against Torch-Pruning
    Machine: x86_64, 2 CPUs, 23.4 GiB RAM, Linux 6.1; load average when assembled: 8.4
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = [("coverage.md", "Coverage"), ("speed.md", "Speed and memory"), ("latency_cpu.md", "Latency on CPU"),
            ("latency_cuda.md", "Latency on GPU"), ("quality.md", "Quality without retraining"),
            ("calibration_memory.md", "Calibration statistics of a 1B LLaMA"),
            ("scale.md", "Scale: planning a 70B-class LLaMA on the meta device"),
            ("checkpoint_streaming.md", "prune_checkpoint on random LLaMA checkpoints"),
            ("checkpoint_layerwise.md", "Layer-by-layer calibration from checkpoint shards"),
            ("isomorphic_minilm.md", "Isomorphic global ranking on MiniLM"),
            ("depth.md", "Depth against width at equal parameters"),
            ("depth_latency.md", "Depth against width: CPU latency of the small LLaMA"),
            ("hf_sweep.md", "Hugging Face model types: every fxprune check, and Torch-Pruning")]
LEGACY = {"latency_cpu.md": "latency.md"}  # the report of latency.py before --device


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


def assemble(folder: Path, notes: str = "") -> str:
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"
    parts = ["# fxprune benchmarks against Torch-Pruning\n",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {_memory_gib()}, {platform.system()} "
             f"{platform.release()}; load average when assembled: {load}. Every number below was measured by the "
             "script named in its section; the README's \"Against Torch-Pruning\" section summarises them.\n"]
    if notes:
        parts.append(notes.strip() + "\n")
    for filename, title in SECTIONS:
        path = folder / filename
        if not path.exists() and filename in LEGACY and (folder / LEGACY[filename]).exists():
            path = folder / LEGACY[filename]
        if not path.exists():
            parts.append(f"## {title}\n\nNot run: {filename} is missing.\n")
            continue
        body = _demote(path.read_text())
        png = path.with_suffix(".png")
        if path.name.startswith("latency") and png.exists():
            body += f"\n\n![{title.lower()}]({png.name})\n"
        parts.append(body + "\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(HERE), help="where the reports are (default benchmarks/)")
    parser.add_argument("--notes", help="a markdown file whose text goes under the header (conditions, caveats)")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else ""
    Path(args.out).write_text(assemble(Path(args.folder), notes))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
