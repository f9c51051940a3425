"""``target_macs`` / ``target_params`` on resnet50 and vit_b_16: how close the pruned model lands, and round_to=8.

For each model and setting it prints the ratio the search found, the number of
probes (plans counted without rewriting), the fraction of MACs and parameters
the pruned model keeps (``fxprune.count`` on the result), and the wall time.
With ``round_to=8`` it also checks that every pruned group keeps a multiple of 8.

Run::

    python benchmarks/targets.py            # about 2 minutes on 2 cores

and paste the table into benchmarks/RESULTS_targets.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import fxprune
from fxprune.api import check_prune_settings
from fxprune.pipeline import PIPELINE, Job, Settings, run

SETTINGS = [
    ("target_macs=0.5", {"target_macs": 0.5}),
    ("target_macs=0.5, global", {"target_macs": 0.5, "global_pruning": True}),
    ("target_params=0.5", {"target_params": 0.5}),
    ("target_macs=0.5, round_to=8", {"target_macs": 0.5, "round_to": 8}),
]


def prune_job(model, x, settings: dict) -> Job:
    """``fxprune.prune`` with the Job kept, to read the search result and the plan."""
    ratio, target, max_ratio = check_prune_settings(None, settings.get("target_macs"), settings.get("target_params"),
                                                    settings.get("round_to"), 0.9)
    asked = Settings(ratio=ratio, target=target, max_ratio=max_ratio, round_to=settings.get("round_to"),
                     global_pruning=settings.get("global_pruning", False))
    return run(Job(model, (x,), None, asked), PIPELINE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    x = torch.randn(1, 3, 224, 224)
    print("| model | setting | ratio found | probes | MACs kept | params kept | multiples of 8 | time |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for name in args.models:
        model = getattr(torchvision.models, name)().eval()
        macs, params = fxprune.count(model, (x,))
        for label, settings in SETTINGS:
            start = time.perf_counter()
            job = prune_job(model, x, settings)
            seconds = time.perf_counter() - start
            macs1, params1 = fxprune.count(job.result, (x,))
            multiples = "-"
            if settings.get("round_to"):
                kept = [g.units - len(units) for g, units in job.removal.items()]
                multiples = f"{sum(k % 8 == 0 for k in kept)}/{len(kept)} groups"
            print(f"| {name} | {label} | {job.search.ratio:.4f} | {job.search.probes} | {macs1 / macs:.2%} | "
                  f"{params1 / params:.2%} | {multiples} | {seconds:.1f}s |", flush=True)


if __name__ == "__main__":
    main()
