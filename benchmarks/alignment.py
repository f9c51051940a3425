"""Which channel multiple this machine's kernels want: latency of linear and conv layers at widths near a round one.

fxprune's default alignment (``fxprune/planning/alignment.py``) is 8 on CUDA and in half
precision, and the SIMD width in float32 elements on a CPU (16 with AVX-512, 8 with AVX2).
This script measures it: for a few layer shapes of ResNet-50, ViT-B and LLaMA-sized MLPs,
the latency of the same layer at widths that are multiples of 16, multiples of 8 only, and
odd, each relative to the multiple of 16 just below (fewer channels, so it should be
faster). A ratio above 1 means the odd width costs time it should have saved.

Usage::

    python benchmarks/alignment.py                       # CPU, float32, 2 threads -> benchmarks/alignment_cpu.md
    python benchmarks/alignment.py --device cuda --dtype bfloat16 --out $OUT/alignment_cuda.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

# (name, kind, fixed shape, width that varies): linear varies its output features, conv its output channels
LAYERS = [
    ("linear 768 -> N, 197 tokens x 8 (ViT-B MLP)", "linear", (8 * 197, 768), 3072),
    ("linear N -> 768, 197 tokens x 8 (ViT-B MLP)", "linear_in", (8 * 197, 768), 3072),
    ("linear 1024 -> N, 512 tokens (LLaMA-style MLP)", "linear", (512, 1024), 2816),
    ("conv3x3 N -> N, 28x28, batch 8 (ResNet stage 2)", "conv", (8, 28, 28), 128),
    ("conv1x1 256 -> N, 56x56, batch 8 (ResNet stage 1)", "conv1x1", (8, 56, 56), 256),
]
OFFSETS = {"16k": 0, "16k-8": 8, "16k-1": 1, "16k-3": 3, "16k-5": 5}  # widths below the round one


def _time(fn, device, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layer(kind, shape, width, device, dtype):
    if kind == "linear":
        x, w = torch.randn(shape, device=device, dtype=dtype), torch.randn(width, shape[1], device=device, dtype=dtype)
        return lambda: F.linear(x, w)
    if kind == "linear_in":
        x = torch.randn(shape[0], width, device=device, dtype=dtype)
        w = torch.randn(shape[1], width, device=device, dtype=dtype)
        return lambda: F.linear(x, w)
    b, h, w_ = shape
    k = 1 if kind == "conv1x1" else 3
    cin = 256 if kind == "conv1x1" else width
    x = torch.randn(b, cin, h, w_, device=device, dtype=dtype)
    w = torch.randn(width, cin, k, k, device=device, dtype=dtype)
    return lambda: F.conv2d(x, w, padding=k // 2)


def render(runs: list[dict]) -> str:
    h = runs[-1]["header"]
    intro = (f"On {h.get('hardware')}, {h.get('dtype')}; latency relative to the multiple of 16 below (median of "
             f"{h.get('repeats')}); each cell: width: relative latency.")
    columns = ["layer"] + [f"width {k}" for k in OFFSETS]
    return harness.table_report(f"Latency of aligned and unaligned widths ({h.get('device', '?')})", runs, columns,
                                intro)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/alignment_DEVICE.md")
    parser.add_argument("--log", type=Path, help="JSON-lines log the report is rendered from (default: --out with "
                                                 ".jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = args.out or HERE / f"alignment_{device.type}.md"
    log_path = args.log or out.with_suffix(".jsonl")
    if args.render:
        print(harness.write_report(render, log_path, out))
        return
    torch.set_num_threads(args.threads)
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, " \
        f"{args.threads} threads"
    log = harness.Log(log_path, harness.run_header("alignment.py", list(sys.argv[1:] if argv is None else argv),
                                                   hardware=hardware, dtype=args.dtype, repeats=args.repeats,
                                                   device=device.type))
    for name, kind, shape, base in LAYERS:
        ref = _time(_layer(kind, shape, base - 16, device, dtype), device, args.repeats)
        row = {"layer": name}
        for label, offset in OFFSETS.items():
            width = base - offset
            t = _time(_layer(kind, shape, width, device, dtype), device, args.repeats)
            row[f"width {label}"] = f"{width}: {t / ref:.2f}"
            row[f"ratio {label}"] = t / ref
        log.write(row)
        print(row, flush=True)
    log.finish()
    print(harness.write_report(render, log_path, out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
