"""Recovery by distillation: what ``fxprune.distill`` buys after pruning, per CPU budget, on held-out text of other
sources than the distillation text (nothing downloads).

Two models, each pruned at 30% and 50% (``--ratios``) by its best one-shot recipe (column ``pruned by``; the
refit's strength validated on held-out calibration tokens and each layer's refit kept only where it brings the
model's output closer on the held-out calibration sequences), then distilled against the original for each budget
of ``--budgets`` CPU seconds (0: not distilled), each from its own copy of one prune per ratio (before
2026-12-08 each budget pruned again, from the same model and calibration):

- MiniLM: ``obs-output + reconstruct (isomorphic)``: ``importance="obs-output", reconstruct=True,
  global_pruning=True, isomorphic=True`` (each kind of group, heads and MLP units, loses the ratio overall,
  unevenly by layer);
- the LM: ``obs + reconstruct``: ``importance="obs", reconstruct=True`` (every group loses the ratio).

Rows logged before the ``pruned by`` column (2026-12-07, before 14:30 UTC) were pruned by ``obs + reconstruct``
for both models, without the output check.

- ``minilm``: the real all-MiniLM-L6-v2, heads and MLP units, hidden kept, pruned by the measured allocation
  (``prune(..., allocation="measured")``; column ``prune CPU s``; rows logged before 2026-12-07 23:55 UTC: the one-step
  ``obs-output + reconstruct (isomorphic)``). Calibration: 1024 sentences of general English (``corpora.py``'s
  calibration part; ``--calibration-sentences`` up to its 4096, named in ``pruned by``); distillation: batches of
  64 sentences (rows logged before 2026-12-07 23:55 UTC: 16) of its
  training and more-training parts (disjoint from the calibration and evaluation parts; 4096 + 6000 sentences, rows
  logged before 2026-12-07 21:00 UTC: the 4096 of the training part), sentences of similar token counts batched
  together (``text_batches(..., by_length=True)``, the batches in shuffled order; less padding), with the
  vocabulary table frozen (it is not pruned, and AdamW would update all its 30522 rows each step; column
  ``distilled``; rows logged before 2026-12-07 18:00 UTC: batches in text order, every parameter trained), the
  teacher's outputs cached per batch after the first pass (``cache_teacher=True``: later steps run only the
  student, 1.34x the steps in 300 CPU s; rows logged before 2026-12-07 21:00 UTC: the teacher ran every step), and
  the student computing in bfloat16 (``autocast=torch.bfloat16``, float32 weights; rows logged before 2026-12-07
  23:55 UTC: float32; it pays on a CPU with bfloat16 instructions, as this machine's AMD EPYC has, and may be slower
  on one without); scored by the mean cosine to the original embeddings on the everyday sentences and the language
  reference (other sources) and on general English's evaluation part (the distillation's source, held out).
- ``lm``: the small LLaMA of ``benchmarks/tiny_lm.py``, MLP units and key/value heads, hidden kept. Calibration:
  the language reference's calibration topics; distillation: batches of 8 windows of 128 bytes of its training
  text (the model's own training text, the reference's training topics and the standard library's source);
  scored by byte-level perplexity, over the dense model's, on general English and the everyday sentences
  (other sources) and on the reference's evaluation topics (held out).

Distillation: ``fxprune.distill(pruned, original, batches, cpu_budget=B, lr=LR[model], **OPTIONS[model])``:
outputs (MSE for MiniLM's hidden states, KL for the LM's logits), the residual stream at every layer boundary
(found from the graphs), the pooled-embedding cosine for MiniLM; AdamW, linear warm-up over 5% of the run, cosine
decay to 10%. The budget is this process's CPU time (``time.process_time``, all threads; run with ``--threads 1``
so that a CPU second is a core second): the load of other processes on a shared machine slows the run down in
wall time but does not shorten it in steps. The table gives the steps each budget bought, its CPU and wall seconds.

The general-English source needs Debian's ``fortunes`` package (``apt-get install fortunes``); without it the
MiniLM task and the LM's English column say so instead of a number.

Run::

    python benchmarks/recovery.py --threads 1 --out benchmarks/recovery.md --log benchmarks/recovery.jsonl

or a subset, one run per model added to the same log (``--append``; the report shows every run)::

    python benchmarks/recovery.py --threads 1 --tasks minilm --ratios 0.3 --budgets 0,300
    python benchmarks/recovery.py --threads 1 --tasks lm --ratios 0.5 --budgets 0,300 --append
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import fxprune
from fxprune.calibration.batches import text_batches

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import corpora  # noqa: E402
import harness  # noqa: E402
from quality import _sentence_embeddings, lm_windows, load_minilm, run_fxprune  # noqa: E402

# MiniLM: of 1e-3, 3e-4 and 1.5e-4 tried for 150 CPU s (2026-12-07), 1.5e-4 ended with the lowest training loss;
# with batches by length, 1e-4 (300 CPU s) was below 1.5e-4 on 256 held-out training sentences; with batches of 64
# (since 2026-12-07 23:55 UTC) 3e-4, see BATCH
LR = {"minilm": 3e-4, "lm": 1e-3}
# MiniLM's sentences per distillation batch (larger batches: more sentences per CPU second): tried for 300 CPU s
# (2026-12-07, bfloat16 autocast, teacher cached), pooled cosine on 256 held-out training sentences: from the one-step
# prune 8 (lr 1.5e-4) 0.9693, 16 (1.5e-4) 0.9703, 32 (2e-4) 0.9706, 64 (3e-4) 0.9718; from the measured allocation
# 32 0.9747, 64 0.9752, 128 (4e-4) 0.9746. Rows logged before 23:55 UTC: 16 at lr 1.5e-4
BATCH = {"minilm": 64}
# how the MiniLM rows are distilled since 2026-12-07 18:00 UTC (rows logged before say nothing: text order, all trained)
DISTILLED = {"minilm": "batches of 64 by length, teacher cached, bfloat16 autocast, 10096 sentences"}
# fxprune.distill options per model: MiniLM's batches are passed over more than once in 300 CPU s, so the teacher's
# outputs are kept after the first pass (2026-12-07, 300 CPU s: 1257 steps instead of 914-940, pooled cosine on 256
# held-out training sentences 0.9682 against 0.9666-0.9672); memory: the 158 batches' 12 matched states and outputs in
# float32, about 3.8 GiB. The student computes in bfloat16 (autocast, float32 weights; since 2026-12-07 23:55 UTC):
# on this machine's CPU (AMD EPYC with AVX512-BF16) a cached step of 16 sentences took 0.20 CPU s against 0.25 in
# float32 (of 64: 0.48 against 0.72), and 300 CPU s (batches of 16) gave 1129 steps and 0.9703 on the held-out
# training sentences against 1049 and 0.9698. A CPU without bfloat16 instructions may run it slower (the `distilled`
# column says so for every row that used it).
# Around this recipe (2026-12-08, from the measured allocation on 1024 sentences, 300 CPU s, same VAL) nothing moved
# the score past run-to-run spread: the recipe again 0.9748 (0.9752 the day before), lr 4e-4 0.9752, 5e-4 0.9750,
# hidden_weight 0.3 0.9749, 0.1 0.9747, cosine to 0 (min_lr=0) 0.9747, no intermediate states 0.9747, attention
# frozen (MLP and norms trained; 510 steps against 433) 0.9740: the recipe stays as it is
OPTIONS = {"minilm": dict(cache_teacher=True, autocast=torch.bfloat16), "lm": {}}


# MiniLM since 2026-12-07 23:55 UTC: the measured allocation (quality.py's row; allocation="measured"), a better
# start for the distillation (pooled cosine on 256 held-out training sentences 0.9568 against 0.9511 before
# distilling, 0.9752 against 0.9718 after 300 CPU s, batches of 64) at about 5x the one-step prune's CPU time (377
# against 74 CPU s; column `prune CPU s`); rows logged before: the one-step `obs-output + reconstruct (isomorphic)`
PRUNE = {"minilm": ("obs-output + reconstruct (isomorphic, measured allocation)",
                     dict(importance="obs-output", reconstruct=True, global_pruning=True, isomorphic=True,
                          allocation="measured")),
         "lm": ("obs + reconstruct", dict(importance="obs", reconstruct=True))}


def task_minilm(args, emit) -> None:
    model, encode = load_minilm()

    try:
        english = corpora.split("english")
    except corpora.MissingCorpus as exc:
        emit("minilm", {"error": f"not run: {exc}"})
        return
    calibration = [encode(english["calibration"][i:i + 16]) for i in range(0, args.calibration_sentences, 16)]
    # lines of similar length batched together (less padding: 1.7x the steps per CPU second), in shuffled order
    # and 6000 more sentences (after the evaluation part) since 2026-12-07 21:00 UTC: pooled cosine on 256 held-out
    # training sentences 0.9698 against 0.9682 (300 CPU s, teacher cached)
    training = text_batches(encode.tokenizer, english["training"] + english["more training"], BATCH["minilm"],
                            max_length=64, by_length=True)
    sets = {"everyday (other)": corpora.split("everyday")["evaluation"],
            "language reference (other)": corpora.split("reference")["evaluation"][:200],
            "general English (same, held out)": english["evaluation"][:200]}
    batches = {k: encode(v) for k, v in sets.items()}
    reference = {k: _sentence_embeddings(model, b) for k, b in batches.items()}
    example = encode(sets["everyday (other)"][:2])
    for ratio in args.ratios:
        cpu = time.process_time()
        once = run_fxprune(model, PRUNE["minilm"][1], example, calibration, ratio,
                           [model.embeddings.word_embeddings])[0]
        cpu = time.process_time() - cpu
        for budget in args.budgets:  # each budget distills its own copy of the one prune
            pruned = copy.deepcopy(once)
            frozen = _freeze_vocabulary(pruned, model)
            counted = "" if args.calibration_sentences == 1024 else f", {args.calibration_sentences} sentences"
            row = {"pruned by": PRUNE["minilm"][0] + counted, "prune CPU s": cpu,
                   **_distill(pruned, model, training, budget, LR["minilm"], **OPTIONS["minilm"]),
                   "distilled": DISTILLED["minilm"] + (f", {frozen} frozen" if frozen else "")}
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
        once = run_fxprune(model, PRUNE["lm"][1], example, calibration, ratio, [model.model.embed_tokens])[0]
        for budget in args.budgets:  # each budget distills its own copy of the one prune
            pruned = copy.deepcopy(once)
            row = {"pruned by": PRUNE["lm"][0],
                   **_distill(pruned, model, training, budget, LR["lm"], **OPTIONS["lm"])}
            for k, w in sets.items():
                row[k] = tiny_lm.perplexity(pruned, w) / dense[k] if k in dense else "n/a"
            emit("lm", {"ratio": ratio, **row})


def _freeze_vocabulary(pruned, model) -> str | None:
    """Leave the model's vocabulary table (``get_input_embeddings``; kept whole by the pruning) out of the
    distillation: only the rows of a batch's tokens get a gradient, yet AdamW updates every row of it each step, as
    many values as the rest of MiniLM together (1.25x the steps per CPU second without it). Returns its parameter
    name, None when the student has no such parameter."""
    table = model.get_input_embeddings()
    name = next((f"{n}.weight" for n, m in model.named_modules() if m is table), None)
    params = dict(pruned.named_parameters())
    if name not in params:
        return None
    params[name].requires_grad_(False)
    return name


def _distill(pruned, model, batches, budget: float, lr: float, **options) -> dict:
    if not budget:
        return {"budget (CPU s)": 0, "steps": 0, "CPU s": 0.0, "wall s": 0.0}
    result = fxprune.distill(pruned, model, batches, cpu_budget=budget, lr=lr, progress=False, **options)
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
        if "pruned by" in columns and "pruned by" not in r and r.get("ratio"):  # logged before the column existed
            r = {**r, "pruned by": "obs + reconstruct (no output check)"}
        if "distilled" in columns and "distilled" not in r and r.get("budget (CPU s)"):
            r = {**r, "distilled": "batches in text order, every parameter trained"}
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                       for c in columns) + " |")
    return "\n".join(lines)


def render(runs: list[dict]) -> str:
    """The report of every run in the log (a run per model is how a subset is measured: ``--append``), one table
    per model, rows in the order they were logged."""
    records = [r for run in runs for r in run["rows"]]
    threads = sorted({str(run["header"].get("threads", "?")) for run in runs})
    return ("# Recovery by distillation after pruning, per CPU budget, on held-out text of other sources\n\n"
            f"{harness.describe_runs(runs)}\n\n{harness.stopped_runs(runs)} {', '.join(threads)} torch thread(s). "
            "Calibration, "
            "distillation and evaluation text are disjoint (`benchmarks/corpora.py`, `benchmarks/tiny_lm.py`); the "
            "budget is process CPU time, so the load of other processes stretches a run's wall time, not its "
            "steps (see the script's docstring).\n\n"
            + "\n\n".join(table(records, t) for t in dict.fromkeys(r["task"] for r in records)) + "\n")


def summary(runs: list[dict]) -> str:
    """One sentence per model and ratio: the start (0 CPU s) and each budget's score on the everyday sentences (MiniLM)
    or on general English (the LM)."""
    rows = [r for run in runs for r in run["rows"]]
    parts = []
    for task, key in (("minilm", "everyday (other)"), ("lm", "general English (other)")):
        for ratio in dict.fromkeys(r["ratio"] for r in rows if r["task"] == task and r.get("ratio")):
            cells = [f"{r['budget (CPU s)']:.0f} CPU s: {r[key]:.3f}" for r in rows
                     if r["task"] == task and r.get("ratio") == ratio and isinstance(r.get(key), float)]
            if cells:
                parts.append(f"{task} at {ratio:.0%}, {key}: " + ", ".join(cells))
    return "; ".join(parts) + "."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="minilm,lm")
    parser.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.3, 0.5])
    parser.add_argument("--budgets", type=lambda s: [float(v) for v in s.split(",")], default=[0, 60, 300, 1200],
                        help="CPU seconds of distillation per run (0: pruned and refit only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration-sentences", type=int, default=1024,
                        help="MiniLM: general-English calibration sentences of the prune (at most its calibration "
                             "part's 4096; the `pruned by` column names a count other than 1024)")
    parser.add_argument("--out", help="markdown report (default benchmarks/recovery.md)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--append", action="store_true",
                        help="add this run to the log instead of starting a new one (the report shows every run)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else HERE / "recovery.md"
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        print(f"wrote {out} from {log_path}")
        return 0
    torch.set_num_threads(args.threads)
    log = harness.Log(log_path, harness.run_header("recovery.py", list(sys.argv[1:] if argv is None else argv),
                                                   threads=args.threads), mode="a" if args.append else "w")

    def emit(task, values):
        record = {"task": task, **values}
        print(json.dumps(record), flush=True)
        log.write(record)

    start = time.perf_counter()
    tasks = {"minilm": task_minilm, "lm": task_lm}
    for task in args.tasks.split(","):
        tasks[task](args, emit)
    log.finish(wall_s=time.perf_counter() - start)
    harness.publish(harness.write_report(render, log_path, out), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
