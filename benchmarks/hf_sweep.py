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
   and whether the result runs with the original output shapes.

Parameters kept are logged for both libraries (fxprune: the in-place model). Every step
gets ``--step-timeout`` seconds and ``--max-gib`` of memory; every worker ``--timeout``.

Usage::

    python benchmarks/hf_sweep.py --quick                      # llama and bert, a temp dir
    python benchmarks/hf_sweep.py --models llama,bart,whisper
    python benchmarks/hf_sweep.py --jobs 2                     # every type in MODELS, benchmarks/hf_sweep.md

The markdown table and the totals line (``fxprune: N/M all checks; Torch-Pruning: K/M runs``)
are written to ``--out`` after every model, one JSON line per model to ``--log``.
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
HEADERS = {"analysis": "analysis", "oracle": "oracle", "prune": "prune", "prune_other": "other batch/length",
           "inplace": "in place", "reload": "reload", "generate": "generate", "torch-pruning": "Torch-Pruning"}


# ---------------------------------------------------------------------------------------------- worker side

def config_for(model_type: str):
    """A tiny config of ``model_type``: :data:`SIZES` where its default config has the field, then OVERRIDES."""
    import transformers

    default = transformers.AutoConfig.for_model(model_type)
    overrides = OVERRIDES.get(model_type, {})
    aliases = getattr(default, "attribute_map", {})  # Swin's num_attention_heads is its num_heads list
    sizes = {k: v for k, v in SIZES.items() if hasattr(default, k) and aliases.get(k) not in overrides
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

    if measure.shapes(got) != measure.shapes(expected):
        return {"status": "fail", "reason": f"output shapes {measure.shapes(got)} != {measure.shapes(expected)}"[:240]}
    return {"status": "ok"}


def _same_first_shape(got, expected) -> dict:
    import measure

    mine, theirs = measure.shapes(got)[:1], measure.shapes(expected)[:1]
    if mine != theirs:
        return {"status": "fail", "reason": f"first output's shape {mine} != {theirs}"}
    return {"status": "ok"}


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
        return {**row, "status": "fail", "reason": "no prunable group"}
    return {**row, "status": "ok"}


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
        return {"status": "fail", "reason": "no group to plant dead units in"}
    before = _run(model, args, kwargs)
    after = _run(fxprune.apply(dg, removal), args, kwargs)
    row = {"oracle_groups": len(removal), "oracle_diff": measure.relative_diff(after, before)}
    try:
        assert_close_to_scale(measure.tensors(after), measure.tensors(before))
    except AssertionError as exc:
        return {**row, "status": "fail", "reason": f"inexact: relative difference {row['oracle_diff']:.1e}: "
                                                   f"{harness.first_line(exc)}"[:240]}
    return {**row, "status": "ok"}


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
        other = {"status": "fail", "reason": harness.first_line(exc)}
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
        return {"inplace": {"status": "fail", "reason": "prune(inplace=True) returned another object"}}
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
    again = _run(reloaded, args, kwargs)
    pairs = list(zip(measure.tensors(again), measure.tensors(got)))
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    rel = measure.relative_diff(again, got)
    ok = len(measure.tensors(again)) == len(measure.tensors(got)) and rel <= RELOAD_TOL
    rows["reload"] = {"status": "ok" if ok else "fail", "max_abs_diff": diff, "relative_diff": rel}
    if not ok:
        rows["reload"]["reason"] = f"reloaded model differs: max abs diff {diff:.1e} (relative {rel:.1e})"
    kind = MODELS[t]
    if not model.can_generate():
        rows["generate"] = {"status": "n/a"}
        return rows
    try:
        tokens = _generate(model, kind, args)
        same = bool((tokens.shape == _generate(reloaded, kind, args).shape)
                    and (tokens == _generate(reloaded, kind, args)).all())
        rows["generate"] = {"status": "ok" if same else "fail", "tokens": tokens.shape[-1]}
        if not same:
            rows["generate"]["reason"] = "the reloaded model generates other tokens"
    except Exception as exc:
        rows["generate"] = {"status": "fail", "reason": harness.first_line(exc)}
    return rows


def step_tp(t):
    import tp_recipe

    if not tp_recipe.available():
        return {"status": "skipped", "reason": "torch-pruning is not installed"}
    model, args, kwargs = build(t)[:3]
    if getattr(model.config, "use_cache", False):  # as coverage.py's zoo: Torch-Pruning cannot trace a cache
        model.config.use_cache = False
    before, reference = _params(model), _run(model, args, kwargs)
    tp_recipe.prune(f"hf:{t}", model, args, kwargs, RATIO)
    row = {"params_kept": _params(model) / before}
    try:
        return {**row, **_same_shapes(_run(model, args, kwargs), reference)}
    except Exception as exc:
        return {**row, "status": "fail", "reason": "forward failed: " + harness.first_line(exc)}


STEPS = [("analysis", step_analysis, False), ("oracle", step_oracle, False), ("prune", step_prune, True),
         ("inplace", step_inplace, True), ("torch-pruning", step_tp, False)]


def measure_type(t: str, step_timeout: float, max_gib: float, tp_timeout: float) -> dict:
    """Every check of one model type (inside a worker process); emits the row after each step."""
    import torch

    torch.set_grad_enabled(False)
    model = build(t)[0]
    row = {"model": t, "kind": MODELS[t] if t not in MOE else "moe", "class": type(model).__name__,
           "params": _params(model)}
    del model
    for key, step, several in STEPS:
        start = time.perf_counter()
        with harness.time_limit(tp_timeout if key == "torch-pruning" else step_timeout, max_gib):
            result = harness.guarded(step, t)
        seconds = time.perf_counter() - start
        if several and result.get("status") != "error":
            row.update(result)
        elif several:  # the step died: its first check failed, the later ones were never reached
            first, *later = {"prune": ["prune", "prune_other"], "inplace": ["inplace", "reload", "generate"]}[key]
            row[first] = result
            for k in later:
                row[k] = {"status": "fail", "reason": f"not reached: {key} failed"}
            if "generate" in later and MODELS[t] in ("encoder", "vision", "ctc"):
                row["generate"] = {"status": "n/a"}
        else:
            row[key] = result
        row.setdefault(key, {})["step_s"] = seconds
        harness.emit(row)
    return row


def worker(t: str, step_timeout: float, max_gib: float, threads: int, tp_timeout: float) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    row = harness.guarded(measure_type, t, step_timeout, max_gib, tp_timeout)
    row.setdefault("model", t)
    harness.emit(row)


# ---------------------------------------------------------------------------------------------- parent side

def passed(row: dict, check: str) -> bool:
    return row.get(check, {}).get("status") in ("ok", "n/a")


def all_fxprune(row: dict) -> bool:
    return all(passed(row, c) for c in CHECKS)


def _mark(row: dict, check: str) -> str:
    status = row.get(check, {}).get("status")
    if status is None:
        return "✗" if row.get("status") == "error" else ""
    return {"ok": "✓", "n/a": "n/a", "skipped": "skipped"}.get(status, "✗")


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def table(rows: list[dict]) -> str:
    cols = list(CHECKS) + ["torch-pruning"]
    lines = ["| model type | kind | " + " | ".join(HEADERS[c] for c in cols) + " | params kept fxprune | "
             "params kept Torch-Pruning | reload max abs diff |",
             "| --- | --- |" + " :---: |" * len(cols) + " ---: | ---: | ---: |"]
    for r in rows:
        diff = r.get("reload", {}).get("max_abs_diff")
        lines.append(f"| {r['model']} | {r.get('kind', '')} | " + " | ".join(_mark(r, c) for c in cols) +
                     f" | {_pct(r.get('inplace', {}).get('params_kept') or r.get('prune', {}).get('params_kept'))}"
                     f" | {_pct(r.get('torch-pruning', {}).get('params_kept'))} | "
                     f"{'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    lines = []
    for check in list(CHECKS) + ["torch-pruning"]:
        bad = [r for r in rows if not passed(r, check) and r.get(check, {}).get("status") != "skipped"]
        lines.append(f"\n**{HEADERS[check]}**: {len(bad)} failing" + (":" if bad else "."))
        for r in bad:
            res = r.get(check) or {"reason": r.get("reason", r.get("died", "not measured"))}
            lines.append(f"- {r['model']}: {res.get('reason', res.get('status', ''))}".replace("|", "/"))
    return "\n".join(lines)


def totals(rows: list[dict]) -> str:
    n = len(rows)
    fx = sum(all_fxprune(r) for r in rows)
    tp = sum(passed(r, "torch-pruning") for r in rows)
    skipped = rows and all(r.get("torch-pruning", {}).get("status") == "skipped" for r in rows)
    tp_cell = "not installed" if skipped else f"{tp}/{n} runs"
    line = f"**fxprune: {fx}/{n} all checks; Torch-Pruning: {tp_cell}**"
    per = ", ".join(f"{HEADERS[c]} {sum(passed(r, c) for r in rows)}/{n}" for c in CHECKS)
    return f"{line}\n\nfxprune per check: {per}.\n\n{analysis_budget(rows)}"


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


def report(rows: list[dict], command: str, wall: float | None = None, note: str = "") -> str:
    import platform

    import torch

    versions = f"torch {torch.__version__}"
    for mod in ("transformers", "torch_pruning"):
        try:
            versions += f", {mod} {__import__(mod).__version__}"
        except ImportError:
            pass
    took = (f" Wall time {wall / 60:.0f} min." if wall else "") + (f" {note}" if note else "")
    return (f"# Hugging Face sweep: {len(rows)} transformers model types, fxprune and Torch-Pruning at ratio "
            f"{RATIO}\n\n`{command}`\n\n{versions}; {platform.machine()}, {os.cpu_count()} CPUs.{took} Tiny "
            f"random-init models (hidden 64, 2 layers, 4 heads, 2 kv heads where the config has them; "
            f"`AutoConfig.for_model`); see `hf_sweep.py` for the checks. ✓ passed, ✗ failed (reasons below), "
            f"n/a: not a generative model. Params kept: fxprune in place, Torch-Pruning with its recipe "
            f"(`tp_recipe.py`); reload max abs diff: saved and reloaded vs the pruned model, same inputs.\n\n"
            f"{totals(rows)}\n\n{table(rows)}\n\n## Failures\n{failures(rows)}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI subset: " + ", ".join(QUICK))
    parser.add_argument("--models", help="comma-separated model types (default: every type in MODELS)")
    parser.add_argument("--step-timeout", type=float, default=300, help="seconds per check step")
    parser.add_argument("--tp-timeout", type=float, default=60,
                        help="seconds for Torch-Pruning's step (it hangs on LLaMA-style decoders: coverage.md)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    parser.add_argument("--max-gib", type=float, default=4, help="RSS cap per worker step, GiB")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--jobs", type=int, default=1, help="workers at the same time")
    parser.add_argument("--out", help="markdown report (default benchmarks/hf_sweep.md; a temp dir with --quick)")
    parser.add_argument("--log", help="one JSON line per model (overwritten)")
    parser.add_argument("--redo", default="", help="comma-separated types to measure again; the other rows "
                        "are read from --log, which is then rewritten")
    parser.add_argument("--note", default="", help="text for the report's header (how the rows were made)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.step_timeout, args.max_gib, args.threads, args.tp_timeout)
        return 0
    names = args.models.split(",") if args.models else (QUICK if args.quick else list(MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model types {unknown}: {', '.join(MODELS)}")
    out = Path(args.out) if args.out else harness.default_out(args.quick, "hf_sweep.md")
    given = list(sys.argv[1:] if argv is None else argv)
    shown = [a for i, a in enumerate(given) if a != "--note" and (i == 0 or given[i - 1] != "--note")]
    command = "python benchmarks/hf_sweep.py " + " ".join(shown)  # the note is printed after it
    earlier = {}
    if args.redo:
        if not args.log or not Path(args.log).exists():
            parser.error("--redo needs an existing --log")
        earlier = {r["model"]: r for r in map(json.loads, Path(args.log).read_text().splitlines())}
        names = [n for n in names if n in earlier or n in args.redo.split(",")]
    log = open(args.log, "w") if args.log else None
    for row in earlier.values():
        if log and row["model"] not in args.redo.split(","):
            log.write(json.dumps(row, default=str) + "\n")
    extra = ["--step-timeout", str(args.step_timeout), "--tp-timeout", str(args.tp_timeout),
             "--max-gib", str(args.max_gib), "--threads", str(args.threads)]
    todo = args.redo.split(",") if args.redo else names
    start, done = time.perf_counter(), {n: r for n, r in earlier.items() if n not in todo}

    def one(name: str) -> dict:
        row = harness.run_worker([harness.python(), __file__, "--worker", name] + extra, args.timeout,
                                 {"model": name})
        for check in list(CHECKS) + ["analysis", "torch-pruning"]:
            if check not in row and ("died" in row or row.get("status") == "error"):
                row[check] = {"status": "error", "reason": row.get("died") or row.get("reason", "")}
        return row

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one, name): name for name in todo}
        for future in concurrent.futures.as_completed(futures):
            row = done[futures[future]] = future.result()
            if log:
                log.write(json.dumps(row, default=str) + "\n")
                log.flush()
            marks = " ".join(f"{c}:{_mark(row, c)}" for c in list(CHECKS) + ["torch-pruning"])
            cpu = analysis_cpu(row)
            took = f"analysis {cpu:.1f} s CPU, " if cpu is not None else ""
            print(f"[{len(done)}/{len(names)}] {row['model']}: {marks} ({took}{row['seconds']:.0f} s)", flush=True)
            rows = [done[n] for n in names if n in done]
            out.write_text(report(rows, command, note=args.note))
    rows = [done[n] for n in names if n in done]
    wall = time.perf_counter() - start
    out.write_text(report(rows, command, None if args.redo else wall, args.note))
    print(f"\n{totals(rows)}\nwall time {wall:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
