"""Hugging Face coverage sweep: tiny random models of many ``transformers`` model types, every check fxprune makes.

For each model type (decoders with GQA / MQA / ALiBi / RoPE, encoders, encoder-decoders,
vision, audio, mixtures of experts) one worker process builds a tiny random-init model
from ``AutoConfig.for_model(type, **small sizes)`` (the sizes the type's config has, from
one generic table; :data:`OVERRIDES` adds what a type needs besides) and checks, each on a
freshly built copy:

1. **analysis**: ``fxprune.analyze`` runs and finds prunable groups (unsupported ops listed);
2. **oracle**: the dead-unit oracle (plant all-zero units with ``fxprune.testing.plant_dead_units``,
   remove exactly them, outputs equal within ``assert_close_to_scale``), head dims prunable;
3. **prune**: ``fxprune.prune(model, 0.3)`` runs on the example inputs, and on inputs of another
   batch size and sequence length, with the original model's output shapes;
4. **in place**: ``prune(..., inplace=True)`` gives a model that runs on both inputs, its first output (logits,
   or a base model's last hidden state) of the original shape (later outputs may carry the pruned hidden size:
   an encoder-decoder's ``encoder_last_hidden_state``, which its decoder reads);
5. **reload**: ``save_pretrained`` + ``fxprune.load_pretrained`` computes what the pruned model computes
   (relative difference <= 1e-5; the largest absolute difference is logged);
6. **generate**: generative models only: the pruned and the reloaded model generate the same tokens;
7. **Torch-Pruning**: its documented recipe (``tp_recipe.py``, as ``coverage.py`` uses it) at the same ratio,
   checked as the in-place model is: it runs on both inputs with its first output's shape, finite;
8. **plain reload** (not counted in "all checks"): the checkpoint of 5 reloaded with the class's own
   ``from_pretrained``, no fxprune at load time (fails where the config cannot state the pruned widths and
   ``config.fxprune_shapes`` records them), and **portable**: ``prune(..., inplace=True, portable=True)`` on a fresh
   copy, ``save_pretrained``, plain ``from_pretrained``, the same comparison (params kept logged: what
   ``portable=True`` costs).

Parameters kept are logged for both libraries (fxprune: the in-place model). Every step of both libraries
gets the same limit, ``harness.step_seconds`` (300 s; ``--step-timeout`` changes it for all) and ``--max-gib``
of memory; every worker ``--timeout`` (default: all its steps' limits plus 300 s). A failed check is logged
with its class (``harness.CLASSES``: timeout with the seconds it ran, memory, error with its message, wrong
output, shape changed).

Usage::

    python benchmarks/hf_sweep.py --quick                      # llama and bert, a temp dir
    python benchmarks/hf_sweep.py --models llama,bart,whisper
    python benchmarks/hf_sweep.py --jobs 2                     # every type in MODELS, benchmarks/hf_sweep.md
    python benchmarks/hf_sweep.py --redo llama,bert            # measure again: a run added to the log
    python benchmarks/hf_sweep.py --render                     # hf_sweep.md again from hf_sweep.jsonl

One JSON line per model goes to ``--log`` (default: ``--out`` with ``.jsonl``) after a header naming the run
(command, date, versions, limits); the markdown table and the totals line (``fxprune: N/M all checks;
Torch-Pruning: K/M runs``) are rendered from that log after every model (:func:`render`, also called by
``results.py``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

RATIO = 0.3
RELOAD_TOL = 1e-5

# model type -> kind; the kind picks the Auto class and the inputs
MODELS = {
    # decoders: MHA, GQA (num_key_value_heads), MQA, RoPE, ALiBi, learned and sinusoidal positions
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "stablelm", "starcoder2", "olmo", "olmo2", "cohere",
                     "granite", "phi", "persimmon", "glm", "gemma", "gemma2", "gpt_neox", "phi3", "gptj", "codegen",
                     "gpt_bigcode", "gpt_neo", "gpt2", "opt", "xglm", "falcon", "bloom", "mpt", "biogpt"], "decoder"),
    **dict.fromkeys(["mixtral", "qwen2_moe", "qwen3_moe"], "decoder"),  # mixtures of experts
    **dict.fromkeys(["bert", "roberta", "electra", "albert", "distilbert", "mpnet", "xlm-roberta", "deberta-v2"],
                    "encoder"),
    **dict.fromkeys(["t5", "bart", "mbart", "pegasus", "marian", "blenderbot-small", "m2m_100"], "seq2seq"),
    **dict.fromkeys(["vit", "deit", "swin", "convnext", "beit", "dinov2"], "vision"),
    **dict.fromkeys(["wav2vec2", "hubert"], "ctc"),
    "whisper": "speech2seq",
}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
QUICK = ["llama", "bert"]

# the small size of every field a config may have; only the fields the type's config has are set
SIZES = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=64, head_dim=16, d_model=64, d_ff=128, d_kv=16,
             num_layers=2, num_heads=4, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, ffn_dim=128, n_positions=64,
             n_ctx=64, max_seq_len=64, embedding_size=64, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
             image_size=32, patch_size=8, num_labels=3, moe_intermediate_size=32, num_experts=4,
             num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=48, max_window_layers=2,
             rotary_dim=8, max_source_positions=32, max_target_positions=64, num_mel_bins=16, decoder_start_token_id=0,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZE_CHANGES: dict = {}  # --sizes KEY=VALUE: changes to SIZES for one run (e.g. num_key_value_heads=1)
OVERRIDES = {
    "swin": dict(patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
    "convnext": dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=16),
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2),
    "persimmon": dict(partial_rotary_factor=0.5),
    "wav2vec2": dict(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=4, vocab_size=32),
    "hubert": dict(conv_dim=[32, 32], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=4, vocab_size=32),
    "whisper": dict(begin_suppress_tokens=None, suppress_tokens=None),
}
AUTO = {"decoder": "AutoModelForCausalLM", "encoder": "AutoModelForMaskedLM", "seq2seq": "AutoModelForSeq2SeqLM",
        "vision": "AutoModelForImageClassification", "ctc": "AutoModelForCTC",
        "speech2seq": "AutoModelForSpeechSeq2Seq"}
CHECKS = ("analysis", "oracle", "prune", "prune_other", "inplace", "reload", "generate")
PLAIN = ("plain", "portable")  # reloaded by plain from_pretrained: reported, not part of "all checks"
HEADERS = {"analysis": "analysis", "oracle": "oracle", "prune": "prune", "prune_other": "other batch/length",
           "inplace": "in place", "reload": "reload", "generate": "generate", "torch-pruning": "Torch-Pruning",
           "plain": "plain from_pretrained", "portable": "portable=True: plain from_pretrained"}


# ---------------------------------------------------------------------------------------------- worker side

def config_for(model_type: str):
    """A tiny config of ``model_type``: :data:`SIZES` where its default config has the field, then OVERRIDES."""
    import transformers

    default = transformers.AutoConfig.for_model(model_type)
    overrides = OVERRIDES.get(model_type, {})
    aliases = getattr(default, "attribute_map", {})  # Swin's num_attention_heads is its num_heads list
    table = {**SIZES, **SIZE_CHANGES}
    sizes = {k: v for k, v in table.items() if hasattr(default, k) and aliases.get(k) not in overrides
             and not isinstance(getattr(type(default), k, None), property)}  # Falcon's head_dim: read-only
    return transformers.AutoConfig.for_model(model_type, **{**sizes, **overrides})


def build(model_type: str):
    """(model in eval mode, example args, example kwargs, other args, other kwargs), seeded: the same weights
    every call."""
    import torch
    import transformers

    config = config_for(model_type)
    torch.manual_seed(0)
    kind = MODELS[model_type]
    cls = getattr(transformers, AUTO[kind])._model_mapping[type(config)]
    model = (cls[0] if isinstance(cls, tuple) else cls)(config).eval()  # DeiT maps to two classes: the first
    # one example of batch 1, as users call it; the other inputs: another batch size and length
    example, other = _inputs(kind, config, 1, 7, 0), _inputs(kind, config, 3, 5, 2)
    return model, *example, *other


def _inputs(kind: str, config, batch: int, length: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(config.vocab_size, 100), (batch, length), generator=g) \
        if hasattr(config, "vocab_size") else None
    if kind == "vision":  # a fixed image size (position tables); another batch size
        return (torch.randn(batch, 3, 32, 32, generator=g),), {}
    if kind == "ctc":  # another number of audio samples
        return (torch.randn(batch, 400 + 40 * length, generator=g),), {}
    decoder = {"decoder_input_ids": torch.randint(3, 100, (batch, length - 2), generator=g)}
    if kind == "speech2seq":  # Whisper's encoder wants exactly 2 * max_source_positions frames
        return (torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions, generator=g),), decoder
    return (ids,), decoder if kind == "seq2seq" else {}


def _run(model, args, kwargs):
    import torch

    with torch.no_grad():
        return model(*args, **kwargs)


def _same_shapes(got, expected) -> dict:
    import measure

    return harness.classify_outputs(got, measure.shapes(expected), measure)


def _same_first_shape(got, expected) -> dict:
    import measure

    return harness.classify_outputs(got, measure.shapes(expected), measure, first_only=True)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def step_analysis(t):
    import fxprune

    model, args, kwargs = build(t)[:3]
    dg = fxprune.analyze(model, args, kwargs=kwargs or None)
    unsupported = sorted({str(where) for _, where in dg.state.unsupported})
    row = {"groups": len(dg.groups), "prunable": len(dg.prunable_groups), "unsupported": unsupported[:3],
           **analysis_times(dg)}
    if not dg.prunable_groups:
        return {**row, **harness.failed("error", "no prunable group")}
    return {**row, "status": "ok", "class": "ok"}


def analysis_times(dg) -> dict:
    """CPU seconds of the analysis and of each of its passes (``dg.meta``; CPU time: other processes on the
    machine do not count), and the capture's shapes."""
    cpu = dg.meta.get("cpu_times", {})
    capture = dg.meta.get("capture") or {}
    return {"analysis_cpu_s": round(sum(cpu.values()), 3), "pass_cpu_s": {k: round(v, 3) for k, v in cpu.items()},
            "shapes": capture.get("shapes"), "static_why": capture.get("why") or None}


def step_oracle(t):
    import fxprune
    import measure
    from fxprune.testing import assert_close_to_scale, plant_dead_units

    model, args, kwargs = build(t)[:3]
    dg = fxprune.analyze(model, args, kwargs=kwargs or None, prune_head_dims=True)
    removal = plant_dead_units(dg, seed=0)
    if not removal:
        return harness.failed("error", "no group to plant dead units in")
    before = _run(model, args, kwargs)
    after = _run(fxprune.apply(dg, removal), args, kwargs)
    row = {"oracle_groups": len(removal), "oracle_diff": measure.relative_diff(after, before)}
    try:
        assert_close_to_scale(measure.tensors(after), measure.tensors(before))
    except AssertionError as exc:
        return {**row, **harness.failed("wrong output", f"inexact: relative difference {row['oracle_diff']:.1e}: "
                                                         f"{harness.first_line(exc)}"[:240])}
    return {**row, "status": "ok", "class": "ok"}


def step_prune(t):
    """``prune(model, 0.3)``; the example inputs, then another batch size and length (two checks)."""
    import fxprune

    model, args, kwargs, other_args, other_kwargs = build(t)
    reference, other_reference = _run(model, args, kwargs), _run(model, other_args, other_kwargs)
    pruned = fxprune.prune(model, RATIO, example_inputs=args, kwargs=kwargs or None)
    row = {"params_kept": _params(pruned) / _params(model), **_same_shapes(_run(pruned, args, kwargs), reference),
           "pass_cpu_s": {k: round(v, 3) for k, v in pruned.meta.get("fxprune_times", {}).get("cpu", {}).items()}}
    try:
        other = _same_shapes(_run(pruned, other_args, other_kwargs), other_reference)
    except Exception as exc:  # runs on the example only: a shape was baked into the graph
        other = harness.failed("error", harness.first_line(exc), stage="forward")
    return {"prune": row, "prune_other": other}


def _generate(model, kind, args):
    import torch

    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if kind in ("seq2seq", "speech2seq"):
        kwargs["decoder_start_token_id"] = 0
    with torch.no_grad():
        return model.generate(args[0][:1], **kwargs)


def step_inplace(t):
    """``prune(..., inplace=True)``, then save_pretrained + load_pretrained, then generate (three checks)."""
    import fxprune
    import measure

    model, args, kwargs, other_args, other_kwargs = build(t)
    before = _params(model)
    reference, other_reference = _run(model, args, kwargs), _run(model, other_args, other_kwargs)
    result = fxprune.prune(model, RATIO, example_inputs=args, kwargs=kwargs or None, inplace=True)
    if result is not model:
        return {"inplace": harness.failed("error", "prune(inplace=True) returned another object")}
    # the first output (logits, or a base model's last hidden state) keeps its shape; later outputs may carry the
    # pruned hidden size (an encoder-decoder's encoder_last_hidden_state: the decoder reads it)
    inplace = {"params_kept": _params(model) / before, **_same_first_shape(_run(model, args, kwargs), reference)}
    if inplace["status"] == "ok":
        inplace.update(_same_first_shape(_run(model, other_args, other_kwargs), other_reference))
    rows = {"inplace": inplace}
    got = _run(model, args, kwargs)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = fxprune.load_pretrained(folder).eval()
        rows["plain"] = _plain_reload(model, folder, args, kwargs, got)
    again = _run(reloaded, args, kwargs)
    pairs = list(zip(measure.tensors(again), measure.tensors(got)))
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    rel = measure.relative_diff(again, got)
    ok = len(measure.tensors(again)) == len(measure.tensors(got)) and rel <= RELOAD_TOL
    rows["reload"] = {"status": "ok", "class": "ok", "max_abs_diff": diff, "relative_diff": rel}
    if not ok:
        rows["reload"].update(harness.failed("wrong output", f"reloaded model differs: max abs diff {diff:.1e} "
                                                             f"(relative {rel:.1e})"))
    kind = MODELS[t]
    if not model.can_generate():
        rows["generate"] = {"status": "n/a"}
        return rows
    try:
        tokens = _generate(model, kind, args)
        same = bool((tokens.shape == _generate(reloaded, kind, args).shape)
                    and (tokens == _generate(reloaded, kind, args)).all())
        rows["generate"] = {"status": "ok", "class": "ok", "tokens": tokens.shape[-1]}
        if not same:
            rows["generate"].update(harness.failed("wrong output", "the reloaded model generates other tokens"))
    except Exception as exc:
        rows["generate"] = harness.failed("error", harness.first_line(exc))
    return rows


def _plain_reload(model, folder, args, kwargs, got) -> dict:
    """The class's own ``from_pretrained`` of a saved folder, compared with the pruned model's outputs ``got``."""
    import measure

    try:
        plain = type(model).from_pretrained(folder).eval()
    except Exception as exc:  # the plain loader refuses widths its config does not state
        return harness.failed("error", harness.first_line(exc)[:240], stage="from_pretrained")
    again = _run(plain, args, kwargs)
    rel = measure.relative_diff(again, got)
    row = {"status": "ok", "class": "ok", "relative_diff": rel}
    if len(measure.tensors(again)) != len(measure.tensors(got)) or rel > RELOAD_TOL:
        row.update(harness.failed("wrong output", f"plain from_pretrained computes something else (relative "
                                                  f"difference {rel:.1e})"))
    return row


def step_portable(t):
    """``prune(..., inplace=True, portable=True)``, ``save_pretrained``, plain ``from_pretrained``: the same."""
    import fxprune

    model, args, kwargs = build(t)[:3]
    before = _params(model)
    fxprune.prune(model, RATIO, example_inputs=args, kwargs=kwargs or None, inplace=True, portable=True)
    got = _run(model, args, kwargs)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        row = _plain_reload(model, folder, args, kwargs, got)
    return {**row, "params_kept": _params(model) / before}


def step_tp(t):
    """Torch-Pruning's recipe at the same ratio, checked as ``prune(..., inplace=True)`` is: the model runs on both
    inputs and its first output keeps its shape (and is finite)."""
    import tp_recipe

    if not tp_recipe.available():
        return {"status": "skipped", "class": "skipped", "reason": "torch-pruning is not installed"}
    model, args, kwargs, other_args, other_kwargs = build(t)
    if getattr(model.config, "use_cache", False):  # as coverage.py's zoo: Torch-Pruning cannot trace a cache
        model.config.use_cache = False
    before = _params(model)
    reference, other_reference = _run(model, args, kwargs), _run(model, other_args, other_kwargs)
    start = time.perf_counter()
    tp_recipe.prune(f"hf:{t}", model, args, kwargs, RATIO, outputs="first")
    row = {"params_kept": _params(model) / before, "prune_s": time.perf_counter() - start}
    for inputs, expected in (((args, kwargs), reference), ((other_args, other_kwargs), other_reference)):
        try:
            result = _same_first_shape(_run(model, *inputs), expected)
        except Exception as exc:
            return {**row, **harness.failed("error", "forward failed: " + harness.first_line(exc), stage="forward")}
        if result["status"] != "ok":
            return {**row, **result}
    return {**row, "status": "ok", "class": "ok"}


STEPS = [("analysis", step_analysis, False), ("oracle", step_oracle, False), ("prune", step_prune, True),
         ("inplace", step_inplace, True), ("portable", step_portable, False), ("torch-pruning", step_tp, False)]


def measure_type(t: str, step_timeout: float, max_gib: float) -> dict:
    """Every check of one model type (inside a worker process); emits the row after each step."""
    import torch

    torch.set_grad_enabled(False)
    model = build(t)[0]
    row = {"model": t, "kind": MODELS[t] if t not in MOE else "moe", "class": type(model).__name__,
           "params": _params(model)}
    del model
    for key, step, several in STEPS:
        start = time.perf_counter()
        with harness.time_limit(step_timeout, max_gib):  # the same limit for every step, both libraries
            result = harness.guarded(step, t)
        seconds = time.perf_counter() - start
        if several and result.get("status") != "error":
            row.update(result)
        elif several:  # the step died: its first check failed, the later ones were never reached
            first, *later = {"prune": ["prune", "prune_other"],
                             "inplace": ["inplace", "reload", "generate", "plain"]}[key]
            row[first] = result
            for k in later:
                row[k] = harness.failed("error", f"not reached: {key} failed")
            if "generate" in later and MODELS[t] in ("encoder", "vision", "ctc"):
                row["generate"] = {"status": "n/a"}
        else:
            row[key] = result
        row.setdefault(key, {})["step_s"] = seconds
        harness.emit(row)
    return row


def worker(t: str, step_timeout: float, max_gib: float, threads: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    row = harness.guarded(measure_type, t, step_timeout, max_gib)
    row.setdefault("model", t)
    harness.emit(row)


# ---------------------------------------------------------------------------------------------- parent side

def passed(row: dict, check: str) -> bool:
    return harness.failure_class(row.get(check)) == "ok" if row.get(check) else False


def all_fxprune(row: dict) -> bool:
    return all(passed(row, c) for c in CHECKS)


def _mark(row: dict, check: str) -> str:
    result = row.get(check)
    if not result:
        return "✗" if row.get("status") == "error" else ""
    if result.get("status") in ("n/a", "skipped"):
        return result["status"]
    kind = harness.failure_class(result)
    return "✓" if kind == "ok" else f"✗ {kind}"


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def table(rows: list[dict]) -> str:
    cols = list(CHECKS) + ["torch-pruning"] + list(PLAIN)
    lines = ["| model type | kind | " + " | ".join(HEADERS[c] for c in cols) + " | params kept fxprune | "
             "params kept portable | params kept Torch-Pruning | Torch-Pruning s | reload max abs diff |",
             "| --- | --- |" + " :---: |" * len(cols) + " ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        diff = r.get("reload", {}).get("max_abs_diff")
        tp = r.get("torch-pruning", {})
        seconds = tp.get("prune_s", tp.get("step_s"))
        lines.append(f"| {r['model']} | {r.get('kind', '')} | " + " | ".join(_mark(r, c) for c in cols) +
                     f" | {_pct(r.get('inplace', {}).get('params_kept') or r.get('prune', {}).get('params_kept'))}"
                     f" | {_pct(r.get('portable', {}).get('params_kept'))}"
                     f" | {_pct(tp.get('params_kept'))} | {'' if seconds is None else f'{seconds:.1f}'} | "
                     f"{'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    """Per check: how many failed in each class, then one line per failing model with its class and reason."""
    lines = []
    for check in list(CHECKS) + ["torch-pruning"] + list(PLAIN):
        bad = [r for r in rows if not passed(r, check) and r.get(check, {}).get("status") not in ("skipped", "n/a")]
        classes = {}
        for r in bad:
            kind = harness.failure_class(r.get(check) or {"status": "error"})
            classes[kind] = classes.get(kind, 0) + 1
        by_class = ", ".join(f"{n} {kind}" for kind, n in sorted(classes.items(), key=lambda kv: -kv[1]))
        lines.append(f"\n**{HEADERS[check]}**: {len(bad)} failing" + (f" ({by_class}):" if bad else "."))
        for r in bad:
            res = r.get(check) or {"status": "error", "reason": r.get("reason", r.get("died", "not measured"))}
            lines.append(f"- {r['model']}: {harness.describe_failure(res)}")
    return "\n".join(lines)


def totals(rows: list[dict]) -> str:
    n = len(rows)
    fx = sum(all_fxprune(r) for r in rows)
    tp = sum(passed(r, "torch-pruning") for r in rows)
    skipped = rows and all(r.get("torch-pruning", {}).get("status") == "skipped" for r in rows)
    tp_cell = "not installed" if skipped else f"{tp}/{n} runs"
    line = f"**fxprune: {fx}/{n} all checks; Torch-Pruning: {tp_cell}**"
    per = ", ".join(f"{HEADERS[c]} {sum(passed(r, c) for r in rows)}/{n}" for c in CHECKS)
    measured = [r for r in rows if r.get("portable") or r.get("plain")]
    plain = (f" Reloaded by plain from_pretrained (no fxprune at load time): {sum(passed(r, 'plain') for r in rows)}"
             f"/{len(measured)} pruned as usual, {sum(passed(r, 'portable') for r in rows)}/{len(measured)} pruned "
             f"with portable=True." if measured else "")
    return f"{line}\n\nfxprune per check: {per}.{plain}\n\n{analysis_budget(rows)}"


def analysis_cpu(row: dict):
    return row.get("analysis", {}).get("analysis_cpu_s")


def analysis_budget(rows: list[dict], limit: float = 5.0) -> str:
    """How many models ``fxprune.analyze`` analysed in under ``limit`` CPU seconds (issue 23), the slowest with
    their per-pass split."""
    timed = sorted((r for r in rows if analysis_cpu(r) is not None), key=analysis_cpu, reverse=True)
    if not timed:
        return ""
    under = sum(analysis_cpu(r) < limit for r in timed)
    slowest = "; ".join(f"{r['model']} {analysis_cpu(r):.1f} s (" + ", ".join(
        f"{k} {v:.1f}" for k, v in r["analysis"].get("pass_cpu_s", {}).items()) + ")" for r in timed[:3])
    return (f"Analysis (`fxprune.analyze`, example of batch 1) under {limit:g} s of CPU: {under}/{len(timed)} "
            f"models; slowest: {slowest}.")


def summary(runs: list[dict]) -> str:
    """The README's sentence on this report, every number from the log."""
    rows, _ = harness.latest_rows(runs, "model")
    n = len(rows)
    counts: dict[str, list] = {}
    for r in rows:
        kind = harness.failure_class(r.get("torch-pruning"))
        if kind not in ("ok", "skipped"):
            counts.setdefault(kind, []).append(r["model"])
    failures = "; ".join(f"{len(models)} {kind}" + (f" ({', '.join(models)})" if kind == "timeout" else "")
                         for kind, models in sorted(counts.items(), key=lambda kv: -len(kv[1])))
    diffs = [r["reload"]["max_abs_diff"] for r in rows if "max_abs_diff" in r.get("reload", {})]
    return (f"fxprune {sum(all_fxprune(r) for r in rows)}/{n} transformers model types pass every check "
            f"(analysis, dead-unit oracle, prune on two input sizes, in place, save + load_pretrained"
            + (f" with largest difference {max(diffs):.1e}" if diffs else "") + ", generate); Torch-Pruning's "
            f"recipe runs on {sum(passed(r, 'torch-pruning') for r in rows)}/{n}; its failures: {failures or 'none'}.")


def _stopped(runs: list[dict]) -> str:
    """A stopped run's sentence and a blank line (its rows replace the earlier run's; the rest stay), else ''."""
    sentence = harness.stopped_runs(runs)
    return f"{sentence} The rows it did not reach come from the earlier run.\n\n" if sentence else ""


def render(runs: list[dict]) -> str:
    """The report, from the log's runs (a later run's row of a model type replaces an earlier one)."""
    rows, _ = harness.latest_rows(runs, "model")
    order = {name: i for i, name in enumerate(MODELS)}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))
    header = runs[-1]["header"] if runs else {}
    changes = header.get("sizes") or {}
    sizes = ", ".join(f"{k}={v}" for k, v in changes.items())
    limit = header.get("step_limit_note") or "step limits not recorded (log from before harness limits)"
    return (f"# Hugging Face sweep: {len(rows)} transformers model types, fxprune and Torch-Pruning at ratio "
            f"{RATIO}\n\nRuns (every row comes from the run named with it when there are several):\n\n"
            f"{harness.describe_runs(runs, 'model')}\n\n{_stopped(runs)}{limit} Tiny "
            f"random-init models (hidden 64, 2 layers, 4 heads, 2 kv heads where the config has them; "
            f"`AutoConfig.for_model`{'; changed for this run: ' + sizes if sizes else ''}); see `hf_sweep.py` for "
            f"the checks. ✓ passed; ✗ failed, with the class of the failure (timeout, memory, error, wrong output, "
            f"shape changed; reasons below); n/a: not a generative model. Params kept: fxprune in place, "
            f"Torch-Pruning with its recipe (`tp_recipe.py`), both checked alike (the model runs on two input "
            f"sizes with its first output's shape); Torch-Pruning s: its prune call (for a failed step, how long "
            f"the step ran); reload max abs diff: saved and reloaded vs the pruned model, same inputs. Plain "
            f"from_pretrained: the in-place checkpoint reloaded by the class's own loader (no fxprune at load "
            f"time); portable=True: pruned with portable=True on a fresh copy, saved and reloaded the same way "
            f"(params kept portable: its parameters kept). Neither is part of \"all checks\".\n\n"
            f"{totals(rows)}\n\n{table(rows)}\n\n## Failures\n{failures(rows)}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI subset: " + ", ".join(QUICK))
    parser.add_argument("--models", help="comma-separated model types (default: every type in MODELS)")
    harness.add_limit_arguments(parser, max_gib=4)
    parser.add_argument("--timeout", type=float, help="seconds per worker process (default: every step's limit "
                                                      "plus 300 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--jobs", type=int, default=1, help="workers at the same time")
    parser.add_argument("--sizes", default="", help="comma-separated KEY=VALUE changes to the tiny sizes (SIZES), "
                        "e.g. num_key_value_heads=1")
    parser.add_argument("--out", help="markdown report (default benchmarks/hf_sweep.md; a temp dir with --quick)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--redo", default="", help="comma-separated types to measure again, as a new run added to "
                        "--log; the report takes each type's latest row")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--note", default="", help="text for the report's header (how the rows were made)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    changes = {k: int(v) for k, v in (item.split("=") for item in args.sizes.split(",") if item)}
    SIZE_CHANGES.update(changes)
    if args.worker:
        worker(args.worker, harness.step_seconds("hf_sweep", args.worker, args.step_timeout), args.max_gib,
               args.threads)
        return 0
    names = args.models.split(",") if args.models else (QUICK if args.quick else list(MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model types {unknown}: {', '.join(MODELS)}")
    out = Path(args.out) if args.out else harness.default_out(args.quick, "hf_sweep.md")
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        print(f"wrote {out} from {log_path}")
        return 0
    if args.redo and not log_path.exists():
        parser.error("--redo needs an existing --log")
    todo = args.redo.split(",") if args.redo else names
    header = harness.run_header("hf_sweep.py", list(sys.argv[1:] if argv is None else argv), args.note,
                                sizes=changes, step_limit_note=harness.limits_note("hf_sweep", todo, args.step_timeout))
    log = harness.Log(log_path, header, mode="a" if args.redo else "w")
    extra = ["--max-gib", str(args.max_gib), "--threads", str(args.threads)]
    extra += ["--step-timeout", str(args.step_timeout)] if args.step_timeout else []
    extra += ["--sizes", args.sizes] if args.sizes else []
    start, done = time.perf_counter(), 0

    def one(name: str) -> dict:
        step = harness.step_seconds("hf_sweep", name, args.step_timeout)
        row = harness.run_worker([harness.python(), __file__, "--worker", name] + extra,
                                 args.timeout or harness.worker_seconds(len(STEPS), step), {"model": name})
        for check in list(CHECKS) + ["analysis", "torch-pruning"] + list(PLAIN):
            if check not in row and ("died" in row or row.get("status") == "error"):
                reason = row.get("died") or row.get("reason", "")
                kind = row.get("class") if row.get("class") in harness.CLASSES[1:] else \
                    "memory" if "SIGKILL" in reason else "error"
                row[check] = harness.failed(kind, reason)
        return row

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one, name): name for name in todo}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            done += 1
            log.write(row)
            marks = " ".join(f"{c}:{_mark(row, c)}" for c in list(CHECKS) + ["torch-pruning"] + list(PLAIN))
            cpu = analysis_cpu(row)
            took = f"analysis {cpu:.1f} s CPU, " if cpu is not None else ""
            print(f"[{done}/{len(todo)}] {row['model']}: {marks} ({took}{row['seconds']:.0f} s)", flush=True)
            harness.write_report(render, log_path, out)
    log.finish(wall_s=time.perf_counter() - start)
    runs = harness.read_runs(log_path)
    harness.write_report(render, log_path, out)
    print(f"\n{totals(harness.latest_rows(runs, 'model')[0])}\nwall time {time.perf_counter() - start:.0f} s; "
          f"wrote {out} from {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
