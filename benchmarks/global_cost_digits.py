"""Accuracy at half the MACs: uniform against global by cost (and global by count), on sklearn's digits.

The model, data and training are those of ``benchmarks/accuracy_digits.py`` (a small ResNet on
16x16 digits, 80/20 split). It is pruned to half its MACs three ways, for each criterion:

* uniform: ``prune(model, target_macs=0.5)`` (every group loses the same fraction);
* global by count: units of all groups ranked on per-group normalised scores, the ratio of
  units searched for the target (the planner before costs, called through ``make_plan``);
* global by cost: ``prune(model, target_macs=0.5, global_pruning=True)``: score per MAC saved,
  scores normalised per group type (:mod:`fxprune.planning.costs`), the units re-costed once at
  the plan found; and with one round of costs only (the whole model's).

Columns: test accuracy right after pruning, the logits' error ``mean((y' - y)^2) / mean(y^2)``,
accuracy after a short fine-tune, MACs kept, and the convolutions' output widths.

Run (a few minutes on 2 shared cores)::

    python benchmarks/global_cost_digits.py
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import fxprune
from accuracy_digits import SmallResNet, accuracy, load_digits_16, train
from fxprune.importance import resolve_importance, score_groups
from fxprune.planning.alignment import removal_steps
from fxprune.planning.costs import group_types
from fxprune.planning.planner import make_plan
from fxprune.planning.target import search_by_cost, search_ratio


def global_plan(model, example, importance, calibration, target: float, rounds: int):
    """Global pruning to ``target`` of the MACs: by count (``rounds=0``) or by cost with ``rounds`` cost rounds."""
    dg = fxprune.analyze(model, example)
    groups = dg.prunable_groups
    scores = score_groups(resolve_importance(importance, calibration, None), dg, groups)
    steps = removal_steps(dg, groups, 8)
    if rounds == 0:
        found = search_ratio(dg, lambda r: make_plan(groups, scores, r, steps=steps, global_pruning=True),
                             "macs", target)
    else:
        types = group_types(dg, groups)
        found = search_by_cost(dg, groups, lambda r, costs: make_plan(
            groups, scores, r, steps=steps, global_pruning=True, costs=costs, types=types), "macs", target,
            steps=steps, rounds=rounds)
    return fxprune.apply(dg, found.removal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the MACs kept")
    parser.add_argument("--widths", default="16,32,64", help="the three stages' channels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_16(args.seed)
    torch.manual_seed(args.seed)
    widths = tuple(int(w) for w in args.widths.split(","))
    base = train(SmallResNet(widths), x_train, y_train, args.epochs, args.lr, args.seed).eval()
    calibration = [x_train[i:i + 64] for i in range(0, 512, 64)]
    example = (x_test[:2],)
    base_macs = fxprune.count(base, (x_test[:1],))[0]
    print(f"unpruned: test accuracy {accuracy(base, x_test, y_test):.4f} ({time.perf_counter() - start:.0f}s)\n")
    with torch.no_grad():
        expected = base(x_test)
    print(f"target_macs={args.target}, widths {args.widths}\n")
    print(f"| importance | allocation | acc. after pruning | output error | acc. after {args.finetune_epochs} epochs "
          "| MACs kept | conv widths |")
    print("|---|---|---:|---:|---:|---:|---|")
    for importance in ("l2", "activation"):
        ways = {
            "uniform": lambda m: fxprune.prune(m, example_inputs=example, target_macs=args.target,
                                               importance=importance, calibration=calibration),
            "global by count": lambda m: global_plan(m, example, importance, calibration, args.target, 0),
            "global by cost, 1 round": lambda m: global_plan(m, example, importance, calibration, args.target, 1),
            "global by cost (prune)": lambda m: fxprune.prune(m, example_inputs=example, target_macs=args.target,
                                                              importance=importance, calibration=calibration,
                                                              global_pruning=True),
        }
        for way, prune in ways.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned = prune(copy.deepcopy(base))
            right_after = accuracy(pruned, x_test, y_test)
            with torch.no_grad():
                out = pruned(x_test)
            error = ((out - expected).square().mean() / expected.square().mean()).item()
            widths = "/".join(str(m.out_channels) for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))
            torch.manual_seed(args.seed)
            train(pruned, x_train, y_train, args.finetune_epochs, args.finetune_lr, args.seed)
            macs = fxprune.count(pruned, (x_test[:1],))[0] / base_macs
            print(f"| {importance} | {way} | {right_after:.4f} | {error:.3f} | {accuracy(pruned, x_test, y_test):.4f} "
                  f"| {macs:.1%} | {widths} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f}s wall")


if __name__ == "__main__":
    main()
