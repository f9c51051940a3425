"""``target_macs`` / ``target_params`` on resnet50 and vit_b_16: how close the pruned model lands, and round_to=8.

For each model and setting it prints the ratio the search found, the number of
probes (plans counted without rewriting), the fraction of MACs and parameters
the pruned model keeps (``fxprune.count`` on the result), and the wall time.
With ``round_to=8`` it also checks that every pruned group keeps a multiple of 8.

Run::

    python benchmarks/targets.py            # about 2 minutes on 2 cores

It logs one row per (model, setting) to ``benchmarks/RESULTS_targets.jsonl`` and renders
``RESULTS_targets.md`` from it (:func:`render`, also called by ``results.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

import fxprune
from fxprune.api import check_prune_settings
from fxprune.pipeline import PIPELINE, Job, Settings, run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

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


COLUMNS = ["model", "setting", "ratio found", "probes", "MACs kept", "params kept", "multiples of 8", "seconds"]
INTRO = ("Random weights, input 1x3x224x224, 2 threads; seconds are wall clock. \"ratio found\" is the uniform "
         "(local) or global ratio the bisection chose; \"probes\" the number of candidate plans counted without "
         "rewriting (`fxprune.macs.estimate`); MACs and params kept are `fxprune.count` of the pruned model over the "
         "original's; \"multiples of 8\" counts the pruned groups whose kept units are a multiple of 8.")


def render(runs: list[dict]) -> str:
    rows = runs[-1]["rows"]
    text = harness.table_report("target_macs / target_params on resnet50 and vit_b_16", runs, COLUMNS, INTRO,
                                {"ratio found": "{:.4f}", "MACs kept": "{:.2%}", "params kept": "{:.2%}",
                                 "seconds": "{:.1f}"})
    off = [abs(r[r["target"]] / 0.5 - 1) for r in rows if "target" in r]
    if off:
        text += f"\nLargest relative distance of a row from its target: {max(off):.2%}.\n"
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16"])
    parser.add_argument("--out", default=str(HERE / "RESULTS_targets.md"))
    parser.add_argument("--log", help="JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log")
    args = parser.parse_args(argv)
    log_path = Path(args.log) if args.log else Path(args.out).with_suffix(".jsonl")
    if not args.render:
        torch.set_num_threads(2)
        x = torch.randn(1, 3, 224, 224)
        log = harness.Log(log_path, harness.run_header("targets.py", list(sys.argv[1:] if argv is None else argv)))
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
                row = dict(zip(COLUMNS, [name, label, job.search.ratio, job.search.probes, macs1 / macs,
                                         params1 / params, multiples, seconds]))
                row["target"] = "MACs kept" if "target_macs" in settings else "params kept"
                log.write(row)
                print(row, flush=True)
        log.finish()
    print(harness.write_report(render, log_path, args.out))


if __name__ == "__main__":
    main()
