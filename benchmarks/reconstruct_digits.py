"""Accuracy right after pruning (no fine-tuning), with and without ``reconstruct=True``, on sklearn's digits.

The model, data and training are those of ``benchmarks/accuracy_digits.py`` (a small ResNet on 16x16
digits, 80/20 split). It is pruned to half its MACs by each criterion, with and without the
least-squares refit of the layers after the pruned units (``fxprune.calibration``): none, one-shot
(``reconstruct=True``) or front to back on the pruned model's inputs (``sequential=True``), each without
and with the BatchNorm statistics re-estimated (``reestimate_bn=True``), from 8 calibration batches of 64
training images. Columns: test accuracy, and the output error
``mean((y' - y)^2) / mean(y^2)`` of the logits on the test images.

Run (about 10 minutes on 2 shared cores, most of it training)::

    python benchmarks/reconstruct_digits.py
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import fxprune
from accuracy_digits import SmallResNet, accuracy, load_digits_16, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--importance", nargs="+", default=["l2", "activation", "wanda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_16(args.seed)
    torch.manual_seed(args.seed)
    base = train(SmallResNet(), x_train, y_train, args.epochs, args.lr, args.seed).eval()
    calibration = [x_train[i:i + 64] for i in range(0, 512, 64)]
    with torch.no_grad():
        expected = base(x_test)
    print(f"unpruned: test accuracy {accuracy(base, x_test, y_test):.4f}\n")
    print("| importance | reconstruct | BN re-estimated | acc. after pruning | output error | MACs kept |")
    print("|---|---|---|---:|---:|---:|")
    refits = {"none": {}, "one-shot": {"reconstruct": True}, "sequential": {"reconstruct": True, "sequential": True}}
    for importance in args.importance:
        for refit, bn in [(refit, bn) for refit in refits for bn in (False, True)]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pruned = fxprune.prune(base, example_inputs=(x_test[:2],), target_macs=0.5, importance=importance,
                                       calibration=calibration, reestimate_bn=bn, **refits[refit])
            with torch.no_grad():
                out = pruned(x_test)
            error = ((out - expected).square().mean() / expected.square().mean()).item()
            macs = fxprune.count(pruned, (x_test[:1],))[0] / fxprune.count(base, (x_test[:1],))[0]
            print(f"| {importance} | {refit} | {bn} | {accuracy(pruned, x_test, y_test):.4f} | {error:.4f} | "
                  f"{macs:.1%} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f}s wall")


if __name__ == "__main__":
    main()
