"""CPU latency against MACs of models pruned by fxprune at ratios 0.1..0.8, with and without ``round_to=8``.

For each model and ratio, ``fxprune.prune(model, ratio, round_to=...)`` is timed
against MACs (``fxprune.macs.count``); latency is the median of repeated
forward passes under ``torch.inference_mode`` with ``torch.set_num_threads(2)``
(after warm-up), at batch 1 and batch 16. The unpruned model is ratio 0. The
plot (``--plot``) has one panel per (model, batch): latency against MACs, one line
per ``round_to``, and a dashed line where latency would fall exactly with MACs.

Usage::

    python benchmarks/latency.py                 # resnet50 and vit_b_16 at 224 px (slow on 2 cores)
    python benchmarks/latency.py --quick         # CI: resnet18 at 64 px, 2 ratios, batch 1 and 4
    python benchmarks/latency.py --models resnet50 --ratios 0.3,0.6 --batches 1

Example row of the table: ``| resnet50 | 0.5 | 8 | 1.07 | 26% | 7.0M | 262.0 | 3120.5 |``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

FULL = dict(models=["resnet50", "vit_b_16"], ratios=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], batches=[1, 16],
            size=224)
QUICK = dict(models=["resnet18"], ratios=[0.3, 0.6], batches=[1, 4], size=64)
ROUNDS = [None, 8]


def latency_ms(model, x, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``model(x)`` in milliseconds."""
    import torch

    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sweep(model_name: str, ratios, batches, size: int, repeats: dict, log=print) -> list[dict]:
    """One row per (ratio, round_to) with MACs, params, prune time and latency per batch size."""
    import torch
    import torchvision

    import fxprune
    from fxprune.macs import count

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    inputs = {b: x.expand(b, -1, -1, -1).contiguous() for b in batches}
    macs0, params0 = count(model, (x,))
    rows = [_row(model_name, 0.0, None, model, macs0, params0, macs0, 0.0, inputs, repeats)]
    log(_line(rows[-1]))
    for round_to in ROUNDS:
        for ratio in ratios:
            start = time.perf_counter()
            pruned = fxprune.prune(model, ratio, example_inputs=(x,), round_to=round_to)
            prune_s = time.perf_counter() - start
            macs, params = count(pruned, (x,))
            rows.append(_row(model_name, ratio, round_to, pruned, macs, params, macs0, prune_s, inputs, repeats))
            log(_line(rows[-1]))
            del pruned
    return rows


def _row(name, ratio, round_to, model, macs, params, macs0, prune_s, inputs, repeats) -> dict:
    row = {"model": name, "ratio": ratio, "round_to": round_to, "macs": macs, "macs_kept": macs / macs0,
           "params": params, "prune_s": prune_s}
    for batch, x in inputs.items():
        row[f"b{batch}_ms"] = latency_ms(model, x, repeats[batch])
    return row


def _line(r: dict) -> str:
    lat = ", ".join(f"batch {k[1:-3]} {v:.1f} ms" for k, v in r.items() if k.endswith("_ms"))
    return (f"{r['model']} ratio {r['ratio']:.1f} round_to {r['round_to']}: MACs {r['macs'] / 1e9:.2f}G "
            f"({100 * r['macs_kept']:.0f}%), {lat}")


def table(rows: list[dict], batches) -> str:
    head = "| model | ratio | round_to | GMACs | MACs kept | params | prune s | " + \
        " | ".join(f"batch {b} ms | speed-up b{b}" for b in batches) + " |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * len(batches)]
    base = {r["model"]: r for r in rows if r["ratio"] == 0.0}
    for r in rows:
        cells = []
        for b in batches:
            ms = r[f"b{b}_ms"]
            cells.append(f"{ms:.1f} | {base[r['model']][f'b{b}_ms'] / ms:.2f}x")
        lines.append(f"| {r['model']} | {r['ratio']:.1f} | {r['round_to'] or '-'} | {r['macs'] / 1e9:.2f} | "
                     f"{100 * r['macs_kept']:.0f}% | {r['params'] / 1e6:.1f}M | {r['prune_s']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], batches, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(batches), len(models), figsize=(6.2 * len(models), 4.6 * len(batches)),
                             squeeze=False)
    styles = {None: dict(color="tab:blue", marker="o", label="fxprune"),
              8: dict(color="tab:orange", marker="s", label="fxprune, round_to=8")}
    for j, name in enumerate(models):
        mine = [r for r in rows if r["model"] == name]
        base = next(r for r in mine if r["ratio"] == 0.0)
        for i, b in enumerate(batches):
            ax = axes[i][j]
            key = f"b{b}_ms"
            for round_to, style in styles.items():
                pts = sorted([base] + [r for r in mine if r["round_to"] == round_to and r["ratio"] > 0],
                             key=lambda r: r["macs"])
                ax.plot([r["macs"] / 1e9 for r in pts], [r[key] for r in pts], lw=1.8, ms=6, **style)
                if round_to is None:
                    for r in pts:
                        ax.annotate(f"{r['ratio']:.1f}" if r["ratio"] else "unpruned", (r["macs"] / 1e9, r[key]), textcoords="offset points",
                                    xytext=(-4, 7), fontsize=8, color="tab:blue")
            top = base["macs"] / 1e9
            ax.plot([0, top], [0, base[key]], ls="--", color="gray", lw=1, label="latency proportional to MACs")
            ax.set_title(f"{name}, batch {b} (CPU, 2 threads)", fontsize=11)
            ax.set_xlabel("GMACs per image")
            ax.set_ylabel(f"latency per batch of {b} (ms, median)")
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("fxprune: CPU latency against MACs\n(labels: pruning ratio; rightmost point: the unpruned model)",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: resnet18, 64 px, ratios 0.3 and 0.6, batch 1 and 4")
    parser.add_argument("--models", help="comma-separated torchvision names")
    parser.add_argument("--ratios", help="comma-separated ratios")
    parser.add_argument("--batches", help="comma-separated batch sizes")
    parser.add_argument("--size", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs at batch 1 (fewer for larger batches)")
    parser.add_argument("--out", help="markdown table (default benchmarks/latency.md; a temp dir with --quick)")
    parser.add_argument("--plot", help="PNG (default benchmarks/latency.png; a temp dir with --quick)")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.models:
        cfg["models"] = args.models.split(",")
    if args.ratios:
        cfg["ratios"] = [float(r) for r in args.ratios.split(",")]
    if args.batches:
        cfg["batches"] = [int(b) for b in args.batches.split(",")]
    if args.size:
        cfg["size"] = args.size
    out = Path(args.out) if args.out else harness.default_out(args.quick, "latency.md")
    png = Path(args.plot) if args.plot else harness.default_out(args.quick, "latency.png")

    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    repeats = {b: max(3, args.repeats // (1 if b == 1 else 2)) for b in cfg["batches"]}
    rows = []
    for name in cfg["models"]:
        rows += sweep(name, cfg["ratios"], cfg["batches"], cfg["size"], repeats, log=lambda s: print(s, flush=True))
    command = "python benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.write_text(f"# Latency against MACs (fxprune)\n\n`{command}`\n\ntorch {torch.__version__}, "
                   f"{os.cpu_count()} CPUs, {args.threads} threads, {cfg['size']} px, median of "
                   f"{', '.join(f'{n} runs at batch {b}' for b, n in repeats.items())}; "
                   f"speed-up = unpruned latency / pruned latency.\n\n{table(rows, cfg['batches'])}\n")
    try:
        plot(rows, cfg["batches"], png)
    except ImportError:  # matplotlib is a benchmark extra: the table is still the result
        print("matplotlib is not installed (pip install -e .[bench]): no plot")
    else:
        print(f"wrote {png}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
