"""Accuracy after pruning to half the MACs: L2, Taylor, and group-norm sparse training, on sklearn's digits.

The data is ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes),
upsampled to 16x16, split 80/20 (stratified, seed 0). A small ResNet is
trained to >= 97% test accuracy, then pruned to half its MACs (counted with
``fxprune.count``) by

  (a) fxprune, group L2 magnitude,
  (b) fxprune, first-order Taylor from 8 training batches,
  (c) fxprune, group-norm sparse training (``Pruner(regularizer="group_norm")``) then pruning,

and, when ``torch-pruning`` is installed (``pip install -e ".[bench]"``), by its
``MagnitudePruner`` with ``GroupMagnitudeImportance`` and its ``GroupNormPruner``
(the same sparse training), with the same model, data, seed, ratio of MACs and
fine-tuning. Every pruned model is fine-tuned for the same number of epochs.

Run (a few minutes on 2 idle cores; it prints wall and CPU time)::

    python benchmarks/accuracy_digits.py

It logs one row per method to ``benchmarks/RESULTS_accuracy.jsonl`` and renders ``RESULTS_accuracy.md``
from it (:func:`render`, also called by ``results.py``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402


# -- data and model -----------------------------------------------------------
def load_digits_16(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=seed)
    return x[train], y[train], x[test], y[test]


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """ResNet-10-style for 16x16 inputs: stem, three stages of two blocks (16, 32, 64 channels), linear head."""

    def __init__(self, widths=(16, 32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [Block(c, w, 1 if i == 0 else 2), Block(w, w, 1)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


# -- training -----------------------------------------------------------------
def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


BATCH = 128


def train(model, x, y, epochs: int, lr: float, seed: int, after_backward=None, every_epoch=None):
    """SGD (momentum 0.9, weight decay 5e-4), cosine learning rate, batches of 128, shuffled with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(y) + BATCH - 1) // BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    for _ in range(epochs):
        if every_epoch is not None:
            every_epoch()
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), BATCH):
            batch = order[i:i + BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            if after_backward is not None:
                after_backward(model)
            optimizer.step()
            schedule.step()
    return model


# -- pruning methods ----------------------------------------------------------
def fxprune_l2(model, data, args):
    return fxprune.prune(model, example_inputs=(data[0][:2],), target_macs=0.5, importance="l2")


def fxprune_taylor(model, data, args):
    x, y = data[0], data[1]
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    return fxprune.prune(model, example_inputs=(x[:2],), target_macs=0.5, importance="taylor", calibration=batches)


def fxprune_group_norm(model, data, args):
    pruner = fxprune.Pruner(model, (data[0][:2],), target_macs=0.5, regularizer="group_norm", reg=args.reg)
    train(model, data[0], data[1], args.sparse_epochs, args.finetune_lr, args.seed,
          after_backward=pruner.regularize, every_epoch=pruner.update_regularizer)
    model.eval()
    return pruner.step()


def tp_ratio_for_half_macs(model, example, base_macs: float) -> float:
    """Torch-Pruning has no MAC target: bisect its (local, uniform) ratio on copies; it does not depend on weights."""
    import torch_pruning as tp

    low, high = 0.0, 0.95
    for _ in range(14):
        ratio = (low + high) / 2
        trial = copy.deepcopy(model)
        tp.pruner.MagnitudePruner(trial, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[trial.fc]).step()
        kept = fxprune.count(trial, (example,))[0] / base_macs
        low, high = (ratio, high) if kept > 0.5 else (low, ratio)
    return (low + high) / 2


def tp_magnitude(model, data, args):
    import torch_pruning as tp

    example = data[0][:2]
    ratio = tp_ratio_for_half_macs(model, example, fxprune.count(model, (example,))[0])
    tp.pruner.MagnitudePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                              pruning_ratio=ratio, ignored_layers=[model.fc]).step()
    return model


def tp_group_norm(model, data, args):
    import torch_pruning as tp

    example = data[0][:2]
    ratio = tp_ratio_for_half_macs(model, example, fxprune.count(model, (example,))[0])
    pruner = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       reg=args.reg, pruning_ratio=ratio, ignored_layers=[model.fc])
    train(model, data[0], data[1], args.sparse_epochs, args.finetune_lr, args.seed,
          after_backward=pruner.regularize, every_epoch=pruner.update_regularizer)
    model.eval()
    pruner.step()
    return model


METHODS = [("fxprune L2", fxprune_l2), ("fxprune Taylor", fxprune_taylor),
           ("fxprune group-norm sparse training", fxprune_group_norm)]
TP_METHODS = [("Torch-Pruning GroupMagnitude (L2)", tp_magnitude),
              ("Torch-Pruning GroupNormPruner (sparse training)", tp_group_norm)]


COLUMNS = ["method", "acc. after pruning", "acc. after fine-tuning", "MACs", "MACs kept", "params", "params kept",
           "seconds"]


def render(runs: list[dict]) -> str:
    h = runs[-1]["header"]
    intro = (f"digits 16x16, {h.get('data', '')}; unpruned trained {h.get('epochs')} epochs; pruned to half the "
             f"MACs; fine-tuned {h.get('finetune_epochs')} epochs each; sparse training {h.get('sparse_epochs')} "
             f"epochs (reg {h.get('reg')}); seed {h.get('seed')}; {h.get('threads')} threads. MACs and params are "
             "`fxprune.count` for one image; seconds are wall clock (pruning, sparse training and fine-tuning).")
    return harness.table_report("Accuracy after pruning to half the MACs (sklearn digits, 16x16)", runs, COLUMNS,
                                intro, {"acc. after pruning": "{:.4f}", "acc. after fine-tuning": "{:.4f}",
                                        "MACs": "{:.4g}", "MACs kept": "{:.1%}", "params kept": "{:.1%}",
                                        "seconds": "{:.0f}"})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="training epochs of the unpruned model")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--sparse-epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--reg", type=float, default=5e-3, help="group-norm regularisation strength")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "RESULTS_accuracy.md"))
    parser.add_argument("--log", help="JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log")
    args = parser.parse_args(argv)
    log_path = Path(args.log) if args.log else Path(args.out).with_suffix(".jsonl")
    if args.render:
        print(harness.write_report(render, log_path, args.out))
        return
    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    data = load_digits_16(args.seed)
    x_train, y_train, x_test, y_test = data
    log = harness.Log(log_path, harness.run_header(
        "accuracy_digits.py", list(sys.argv[1:] if argv is None else argv), epochs=args.epochs,
        finetune_epochs=args.finetune_epochs, sparse_epochs=args.sparse_epochs, reg=args.reg, seed=args.seed,
        threads=args.threads, data=f"{len(y_train)} train / {len(y_test)} test images"))
    torch.manual_seed(args.seed)
    base = train(SmallResNet(), x_train, y_train, args.epochs, args.lr, args.seed).eval()
    example = (x_test[:1],)  # MACs per image
    base_macs, base_params = fxprune.count(base, example)
    log.write(dict(zip(COLUMNS, ["unpruned", accuracy(base, x_test, y_test), None, base_macs, 1.0, base_params, 1.0,
                                 time.perf_counter() - start])))
    methods = list(METHODS)
    try:
        import torch_pruning  # noqa: F401  (optional comparison rows)
        methods += TP_METHODS
    except ImportError:
        print("torch-pruning not installed: its rows are skipped (pip install -e '.[bench]')")
    for name, method in methods:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        pruned = method(copy.deepcopy(base), data, args)
        before_ft = accuracy(pruned, x_test, y_test)
        train(pruned, x_train, y_train, args.finetune_epochs, args.finetune_lr, args.seed)
        macs, params = fxprune.count(pruned, example)
        row = dict(zip(COLUMNS, [name, before_ft, accuracy(pruned, x_test, y_test), macs, macs / base_macs, params,
                                 params / base_params, time.perf_counter() - t0]))
        log.write(row)
        print(row, flush=True)
    log.finish(wall_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start)
    print(harness.write_report(render, log_path, args.out))


if __name__ == "__main__":
    main()
