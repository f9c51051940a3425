"""LLMs at the scale people prune them (issue 11): one measurement per mode, each in its own worker process.

``--plan-70b``: the plan of a 70B-class LLaMA config (hidden 8192, 80 layers, 64 heads over 8
kv heads, MLP 28672, vocabulary 128256) built on the meta device, as ``prune_checkpoint`` would
plan it before reading a shard: the analysis that in-place pruning runs (``torch.export`` with
static sizes), then a weight-free criterion (``importance="random"``: meta weights cannot be
scored) and the plan at ratio 0.3. Every phase is timed on its own with ``meter.Meter`` (wall
time, CPU time, peak RSS above the phase's start): capture (``torch.export``), propagate,
decompose, relate (rules and the unifications they state), solve (final atoms and their
connected components: the groups), groups (members of every group, flags), score, plan. The row
also holds the worker's peak RSS (imports, the meta model and the warm-up included) and the
whole worker's wall time. Before measuring, the worker plans a 2-layer meta LLaMA unmeasured (lazy
imports, dispatcher caches: a per-process cost, as in ``speed.py``).

Other modes (sharded checkpoints, layer-by-layer calibration) each add a ``measure_*`` function,
an entry in ``MODES`` and a report section.

Usage::

    python benchmarks/scale.py --plan-70b                    # benchmarks/scale.md, one worker
    python benchmarks/scale.py --plan-70b --layers 20        # the same config with 20 decoder layers
    python benchmarks/scale.py --plan-70b --dynamic          # analyze's default capture (symbolic sizes)
    python benchmarks/scale.py --plan-70b --profile /tmp/p   # also a cProfile run, stats in /tmp/p
    python benchmarks/scale.py --quick                       # CI: the tiny config, a report in a temp dir
    python benchmarks/scale.py --render                      # scale.md again from scale.jsonl

The worker gets ``harness.step_seconds("scale", config)`` (1800 s for the 70B-class plan). The log (``--log``,
default ``--out`` with ``.jsonl``) holds a header naming the run and its row; the report is rendered from it
(:func:`render`, also called by ``results.py``); ``--append`` adds a measurement as another section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import meter  # noqa: E402

RATIO = 0.3
IMPORTANCE = "random"  # weight-free: meta weights cannot be scored
# Llama-3-70B's shape (about 70.6B parameters)
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, use_cache=False,
                 tie_word_embeddings=False)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, use_cache=False,
                  tie_word_embeddings=False)
CONFIGS = {"llama-70b": LLAMA_70B, "llama-tiny": LLAMA_TINY}
# the passes of fxprune.pipeline.ANALYSIS + score + plan, in order; "solve" is split into two rows below
PHASES = ("capture", "propagate", "decompose", "relate", "solve", "groups", "score", "plan")


def build_meta_llama(config: dict, layers: int | None = None):
    """``(model, args)``: a ``LlamaForCausalLM`` of ``config`` on the meta device (no weights), and 16 token ids.

    Example::

        >>> model, args = build_meta_llama(LLAMA_TINY)
        >>> model.lm_head.weight.device.type, args[0].shape
        ('meta', torch.Size([1, 16]))
    """
    import torch
    import transformers

    config = dict(config, **({"num_hidden_layers": layers} if layers else {}))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    return model.eval(), (ids,)


def _measured(meter_: meter.Meter) -> dict:
    return {"wall_s": meter_.seconds, "cpu_s": meter_.cpu_seconds, "rss_peak_mb": meter_.rss_peak_mb}


@contextlib.contextmanager
def _timed_methods(cls, names: dict, sink: dict):
    """Wall and CPU seconds of methods of ``cls`` (``{method: phase}``) into ``sink[phase]``; originals put back.

    A bare timer, not a :class:`meter.Meter`: a nested Meter's ``gc.collect`` would land in the outer phase.
    """
    originals = {name: cls.__dict__[name] for name in names if name in cls.__dict__}  # older fxprune: fewer

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            sink[phase] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
            return result
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(cls, name, timed(fn, names[name]))
        yield
    finally:
        for name, fn in originals.items():
            setattr(cls, name, fn)


def time_plan(model, args, kwargs=None, ratio: float = RATIO, importance=IMPORTANCE, inplace: bool = True) -> dict:
    """Run analysis, scoring and planning pass by pass; ``{"phases": {phase: {wall_s, cpu_s, rss_peak_mb}}, ...}``.

    ``inplace=True`` analyses as in-place pruning does (a Hugging Face model is exported with static
    sizes); the model is not changed (nothing is rewritten). The solve pass is reported as two
    phases: ``solve`` (the atom graph and its connected components: one group each) and ``groups``
    (the rest of the pass: every axis added to its groups as a member, flags, frozen head dims); both
    rows carry the pass's RSS peak. Also returned: totals, ``groups``, ``prunable`` and ``removed_units``.

    Example::

        >>> row = time_plan(*build_meta_llama(LLAMA_TINY))
        >>> list(row["phases"]) == list(PHASES), row["prunable"] > 0
        (True, True)
    """
    from fxprune import pipeline
    from fxprune.analysis.depgraph import DependencyGraph

    job = pipeline.Job(model, args, kwargs, pipeline.Settings(ratio=ratio, importance=importance, inplace=inplace))
    passes = dict(pipeline.ANALYSIS + pipeline.PRUNING)
    phases, inner = {}, {}
    for name in ("capture", "propagate", "decompose", "relate", "solve", "score", "plan"):
        with _timed_methods(DependencyGraph, {"_partition": "solve"}, inner), meter.Meter() as m:
            passes[name](job)
        phases[name] = _measured(m)
    solve = phases.pop("solve")
    split = {"solve": solve}  # an fxprune without DependencyGraph._partition: the pass as one row
    if "solve" in inner:
        split = {"solve": {**inner["solve"], "rss_peak_mb": solve["rss_peak_mb"]},
                 "groups": {k: solve[k] - inner["solve"][k] for k in ("wall_s", "cpu_s")} | {
                     "rss_peak_mb": solve["rss_peak_mb"]}}
    phases = {**{k: phases[k] for k in ("capture", "propagate", "decompose", "relate")}, **split,
              "score": phases["score"], "plan": phases["plan"]}
    return {"phases": phases,
            "wall_s": sum(p["wall_s"] for p in phases.values()),
            "cpu_s": sum(p["cpu_s"] for p in phases.values()),
            "rss_peak_mb": max(p["rss_peak_mb"] for p in phases.values()),
            "groups": len(job.dg.groups), "prunable": len(job.dg.prunable_groups),
            "removed_units": sum(len(u) for u in job.removal.values()),
            "reused_export_shapes": getattr(job, "reused_shapes", False)}


def measure_plan_70b(options: dict) -> dict:
    """The ``--plan-70b`` row: build on meta, warm up on the tiny config, then :func:`time_plan` (and a profile)."""
    import torch

    import fxprune

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    time_plan(*build_meta_llama(LLAMA_TINY), inplace=not options["dynamic"])  # warm-up, not measured
    config = CONFIGS[options["config"]]
    with meter.Meter() as m:
        model, args = build_meta_llama(config, options["layers"])
    row = {"mode": "plan-70b", "config": options["config"],
           "layers": options["layers"] or config["num_hidden_layers"], "capture": "dynamic" if options["dynamic"]
           else "static", "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "build_s": m.seconds,
           "fxprune": str(Path(fxprune.__file__).parents[1])}
    row.update(time_plan(model, args, inplace=not options["dynamic"]))
    if options["profile"]:
        import cProfile
        import pstats

        model, args = build_meta_llama(config, options["layers"])
        profile = cProfile.Profile()
        profile.runcall(time_plan, model, args, inplace=not options["dynamic"])
        profile.dump_stats(options["profile"])
        with open(options["profile"] + ".txt", "w") as f:
            pstats.Stats(profile, stream=f).sort_stats("cumulative").print_stats(80)
        row["profile"] = options["profile"]
    row["process_rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row["worker_s"] = time.perf_counter() - start
    return row


MODES = {"plan-70b": measure_plan_70b}


def plan_table(rows: list[dict]) -> str:
    """Markdown: one column per ``plan-70b`` row, one line per phase (wall / CPU seconds, peak RSS MB)."""
    rows = [r for r in rows if r.get("mode") == "plan-70b"]
    if not rows:
        return ""
    head = [f"{r.get('config', '?')} x{r.get('layers', '?')} ({r.get('capture', '?')})" for r in rows]
    lines = ["| phase | " + " | ".join(f"{h} wall s | CPU s | RSS MB" for h in head) + " |",
             "| --- |" + " ---: | ---: | ---: |" * len(rows)]
    for phase in PHASES + ("total",):
        cells = []
        for r in rows:
            p = r if phase == "total" else r.get("phases", {}).get(phase)
            cells.append(" | ".join([f"{p['wall_s']:.2f}", f"{p['cpu_s']:.2f}", f"{p['rss_peak_mb']:.0f}"])
                         if p and "wall_s" in p else " |  | ")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    notes = []
    for r in rows:
        if "status" in r:
            notes.append(f"- {r.get('config')}: {r['status']}: {r.get('reason', '')}")
        else:
            notes.append(f"- {r['config']} x{r['layers']} ({r['params_b']:.1f}B parameters, {r['capture']} capture): "
                         f"{r['groups']} groups, {r['prunable']} prunable, {r['removed_units']} units removed at "
                         f"ratio {RATIO}; shapes of the export reused: {r['reused_export_shapes']}; "
                         f"meta model built in {r['build_s']:.2f} s; worker peak RSS "
                         f"{r['process_rss_peak_mb']:.0f} MB, worker wall {r['worker_s']:.1f} s; fxprune from "
                         f"{r.get('fxprune', '?')}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def render(runs: list[dict]) -> str:
    """The report: one plan table per run of the log (each run is one measurement)."""
    sections = []
    for run in runs:
        rows = run["rows"]
        sections.append(f"{harness.describe_runs([run])}\n\n{run['header'].get('step_limit_note', '')}\n\n"
                        f"{plan_table(rows)}\n")
    return ("# Scale: planning and pruning LLMs at the sizes people prune\n\n"
            "## Plan of a 70B-class LLaMA on the meta device\n\n"
            f"Analysis as in-place pruning runs it, `importance={IMPORTANCE!r}` (meta weights cannot be scored), "
            f"plan at ratio {RATIO}. RSS = peak resident memory above the start of the phase (solve and groups "
            f"share one: the solve pass's); total RSS = the largest of those.\n\n" + "\n".join(sections))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-70b", action="store_true", help="time the plan of a 70B-class LLaMA on meta")
    parser.add_argument("--quick", action="store_true", help="CI: the plan of the 2-layer tiny config")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the config's, 80 for 70B)")
    parser.add_argument("--dynamic", action="store_true",
                        help="capture as analyze() does by default (symbolic sizes), not as in-place pruning")
    parser.add_argument("--profile", help="also profile the plan with cProfile: stats file (+ .txt summary)")
    harness.add_limit_arguments(parser)
    parser.add_argument("--out", help="markdown report (default benchmarks/scale.md; a temp dir with --quick)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--append", action="store_true", help="add this measurement to --log (another section)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        options = json.loads(args.worker)
        row = harness.guarded(MODES[options["mode"]], options)
        harness.emit({"mode": options["mode"], "config": options["config"], **row})
        return 0
    out = Path(args.out) if args.out else harness.default_out(args.quick, "scale.md")
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        print(f"wrote {out} from {log_path}")
        return 0
    if not (args.plan_70b or args.quick):
        parser.error("choose a measurement: --plan-70b (or --quick)")
    options = {"mode": "plan-70b", "config": "llama-tiny" if args.quick else "llama-70b", "layers": args.layers,
               "dynamic": args.dynamic, "profile": args.profile}
    limit = harness.step_seconds("scale", options["config"], args.step_timeout)
    header = harness.run_header("scale.py", list(sys.argv[1:] if argv is None else argv),
                                step_limit_note=harness.limits_note("scale", [options["config"]], args.step_timeout))
    log = harness.Log(log_path, header, mode="a" if args.append else "w")
    row = harness.run_worker([harness.python(), __file__, "--worker", json.dumps(options)], limit,
                             {"mode": options["mode"], "config": options["config"]})
    log.write(row)
    log.finish(wall_s=row["seconds"])
    harness.write_report(render, log_path, out)
    print(plan_table([row]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
