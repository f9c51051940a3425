"""Prune a torchvision ResNet-50 by half of every group and compare parameters, MACs and CPU latency.

    python examples/prune_resnet.py [--model resnet50] [--ratio 0.5] [--size 224]

Weights are random (nothing is downloaded); pruning, MACs and latency do not
depend on the values. The pruned model is checked to give the same output shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import fxprune
from fxprune.analysis.macs import count


def latency_ms(model, x, repeats: int = 10) -> float:
    with torch.inference_mode():
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)

    start = time.perf_counter()
    dg = fxprune.analyze(model, (x,))
    analysis_s = time.perf_counter() - start
    start = time.perf_counter()
    pruned = fxprune.prune(model, args.ratio, example_inputs=(x,))
    prune_s = time.perf_counter() - start

    with torch.inference_mode():
        assert pruned(x).shape == model(x).shape
    macs0, params0 = count(model, (x,))
    macs1, params1 = count(pruned, (x,))
    lat0, lat1 = latency_ms(model, x), latency_ms(pruned, x)

    print(f"{args.model}: {len(dg.prunable_groups)} prunable groups, analysis {analysis_s:.2f}s, "
          f"prune {prune_s:.2f}s (ratio {args.ratio})")
    print(f"{'':12}{'before':>14}{'after':>14}{'kept':>8}")
    print(f"{'params':12}{params0 / 1e6:>13.2f}M{params1 / 1e6:>13.2f}M{params1 / params0:>8.1%}")
    print(f"{'MACs':12}{macs0 / 1e9:>13.2f}G{macs1 / 1e9:>13.2f}G{macs1 / macs0:>8.1%}")
    print(f"{'latency':12}{lat0:>12.1f}ms{lat1:>12.1f}ms{lat1 / lat0:>8.1%}   "
          f"(CPU, batch 1, {args.threads} threads, median of 10)")


if __name__ == "__main__":
    main()
