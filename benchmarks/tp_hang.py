"""Why Torch-Pruning times out on tiny decoders: its own LLM recipe on small configs, stack and indices at the limit.

Each case builds a 2-layer random-init decoder of ``hf_sweep.py``'s sizes (hidden 64, heads of 16) with the
head counts of the case, and runs Torch-Pruning's ``BasePruner`` exactly as its examples/LLMs/prune_llm.py
writes it (``GroupMagnitudeImportance(p=2, group_reduction="mean")``, ``num_heads`` for q/k/v with the key/value
head count for k and v, ``prune_num_heads=True``, ``prune_head_dims=False``, ``round_to=4``, ``lm_head``
ignored, ``output_transform=lambda x: x.logits``; nothing from ``tp_recipe.py``), in a worker process, under
the benchmarks' step limit. Recorded per case: whether the pruner was built and stepped, the seconds, and
for a case stopped at the limit the Torch-Pruning frames of the main thread's stack (``faulthandler``),
the group being built (``DependencyGraph.get_pruning_group``'s root layer) and the largest channel index
Torch-Pruning had put in that group (``Group.add_dep``, counted without changing what it does): indices far
beyond every layer's width mean a loop that cannot end, not a slow step.

Usage::

    python benchmarks/tp_hang.py                      # every case, benchmarks/tp_hang.md and .jsonl
    python benchmarks/tp_hang.py --cases llama:4:2 --step-timeout 20
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

# model type: heads: kv heads (a type from hf_sweep.MODELS; the heads of 16 each, hidden 64 = 4 x 16 when heads 4)
CASES = ["llama:4:4", "llama:4:2", "llama:4:1", "llama:8:4", "llama:8:2", "llama:16:8", "llama:16:4",
         "qwen3:4:2", "gemma2:4:2", "mistral:4:2", "stablelm:4:4", "phi:4:4", "cohere:4:2", "gptj:4:4"]


def build(case: str):
    import hf_sweep

    model_type, heads, kv = case.split(":")
    heads, kv = int(heads), int(kv)
    hf_sweep.SIZE_CHANGES.update(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=16 * heads,
                                 head_dim=16)
    model, args, _ = hf_sweep.build(model_type)[:3]
    model.config.use_cache = False
    return model, args[0]


def prune_llm_recipe(model, ids):
    """examples/LLMs/prune_llm.py's pruner, as written there (separate q/k/v projections)."""
    import torch
    import torch_pruning as tp

    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn") and hasattr(m, "q_proj"):
            num_heads[m.q_proj] = model.config.num_attention_heads
            num_heads[m.k_proj] = model.config.num_key_value_heads
            num_heads[m.v_proj] = model.config.num_key_value_heads
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            model, example_inputs=ids, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False, output_transform=lambda x: x.logits, pruning_ratio=0.3,
            ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=0.3, round_to=4)
        pruner.step()


def worker(case: str, seconds: float) -> None:
    import warnings

    import torch
    from torch_pruning.dependency import graph as tp_graph, group as tp_group

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model, ids = build(case)
    row = {"case": case, "params": sum(p.numel() for p in model.parameters()),
           "widest layer": max(max(p.shape) for p in model.parameters() if p.ndim == 2 and p.shape[0] != 100)}
    watch = {"root": None, "max_index": 0, "adds": 0}
    add_dep, get_group = tp_group.Group.add_dep, tp_graph.DependencyGraph.get_pruning_group

    def counting_add_dep(self, dep, idxs):
        watch["adds"] += 1
        watch["max_index"] = max(watch["max_index"], max((getattr(i, "idx", i) for i in idxs), default=0))
        return add_dep(self, dep, idxs)

    def named_get_group(self, module, fn, idxs):
        watch.update(root=self._module2name.get(module, str(module)), max_index=0, adds=0)
        return get_group(self, module, fn, idxs)

    tp_group.Group.add_dep, tp_graph.DependencyGraph.get_pruning_group = counting_add_dep, named_get_group
    stack = tempfile.TemporaryFile("w+")
    faulthandler.dump_traceback_later(max(seconds - 1, 1), file=stack)  # the stack one second before the limit
    start = time.perf_counter()
    try:
        with harness.time_limit(seconds, 4):
            prune_llm_recipe(model, ids)
        row.update(status="ok", **{"class": "ok"})
    except harness.StepLimit as exc:
        row.update(harness.failed(exc.kind, str(exc)))
    except Exception as exc:
        row.update(harness.failed("error", harness.first_line(exc)))
    faulthandler.cancel_dump_traceback_later()
    row["prune_s"] = time.perf_counter() - start
    if row["class"] != "ok":
        stack.seek(0)
        frames = [line.strip() for line in stack.read().splitlines() if "torch_pruning" in line]
        row["stack"] = [f.split("site-packages/")[-1].replace('", line ', ":").replace('File "', "") for f in frames]
        row.update(group_root=watch["root"], group_adds=watch["adds"], group_max_index=watch["max_index"])
    harness.emit(row)


def summary(runs: list[dict]) -> str:
    """The README's sentence on this report."""
    rows, _ = harness.latest_rows(runs, "case")
    stuck = [r["case"] for r in rows if r.get("class") == "timeout"]
    limit = max((r.get("prune_s", 0) for r in rows), default=0)
    return (f"Torch-Pruning's own LLM recipe never finished building its pruner on {len(stuck)} of {len(rows)} "
            f"tiny decoders ({', '.join(stuck)}; type:heads:kv heads), stopped at {limit:.0f} s with channel "
            "indices far beyond every layer's width: a loop in its dependency walk through the rotary "
            "embedding's concatenation, not a slow step.")


def render(runs: list[dict]) -> str:
    rows, _ = harness.latest_rows(runs, "case")
    lines = ["# Torch-Pruning's LLM recipe on tiny decoders: which head counts hang, and where", "",
             harness.describe_runs(runs, "case"), "",
             "Each case: a 2-layer random-init decoder (heads of 16, hidden 16 x heads, `hf_sweep.py`'s other sizes), "
             "pruned at ratio 0.3 by Torch-Pruning's `BasePruner` as examples/LLMs/prune_llm.py writes it "
             "(see `tp_hang.py`). For a case stopped at the limit: the group Torch-Pruning was building and the "
             "largest channel index in it, against the widest layer of the model.", "",
             "What the loop is (torch_pruning 1.6.1's source, and what the column above shows): "
             "`_fix_dependency_graph_non_recursive` (dependency/graph.py, from line 224) walks the dependencies "
             "from the root layer and stops only at a dependency it has already added with the same index list "
             "(graph.py:240-241, `Group.has_pruning_op`, a scan of the whole group). In every case stopped at the "
             "limit the indices in the group grow without bound, one projection width per lap, through the "
             "`_ConcatOp` Torch-Pruning makes of the rotary embedding's `torch.cat` (`rotate_half`; a partial "
             "rotary's rotated and passed parts), whose forward index mapping (`_ConcatIndexMapping`, "
             "dependency/index_mapping.py) adds its offset with no bound: the walk never meets an index list it "
             "has seen, and each step scans a longer group. Which head counts close such a lap is what the table "
             "measures: twice as many query heads as key/value heads loop, one or four times as many do not; "
             "StableLM and Phi (partial rotary) loop with equal counts; Cohere (its rotary interleaves, no "
             "`torch.cat`) does not at twice as many. A case ends in a fraction of a second or "
             "not at all.", "",
             "| case (type:heads:kv heads) | heads / kv heads | result | seconds | group being built | largest index "
             "in it | widest layer |", "| --- | ---: | --- | ---: | --- | ---: | ---: |"]
    for r in rows:
        _, heads, kv = r["case"].split(":")
        result = "ok" if r.get("class") == "ok" else harness.describe_failure(r)
        lines.append(f"| {r['case']} | {int(heads) / int(kv):g} | {result} | {r.get('prune_s', 0):.1f} | "
                     f"{r.get('group_root', '')} | {r.get('group_max_index', '')} | {r.get('widest layer', '')} |")
    # one stack per way in: the innermost frame's line moves within the loop it spins in, so it is left out
    stacks: dict[tuple, list] = {}
    for r in rows:
        if r.get("stack"):
            stacks.setdefault(tuple(r["stack"][1:]), []).append(r)
    for outer, mine in stacks.items():
        innermost = sorted({r["stack"][0] for r in mine})
        cases = ", ".join(r["case"] for r in mine)
        lines += ["", f"Torch-Pruning's frames one second before the limit ({cases}), innermost first:", "", "```",
                  " | ".join(innermost), *outer, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated type:heads:kv_heads")
    harness.add_limit_arguments(parser)
    parser.add_argument("--out", default=str(HERE / "tp_hang.md"))
    parser.add_argument("--log", help="JSON-lines log (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seconds = harness.step_seconds("tp_hang", None, args.step_timeout)
    if args.worker:
        worker(args.worker, seconds)
        return 0
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if not args.render:
        log = harness.Log(log_path, harness.run_header("tp_hang.py", list(sys.argv[1:] if argv is None else argv)))
        start = time.perf_counter()
        for case in args.cases.split(","):
            row = harness.run_worker([harness.python(), __file__, "--worker", case]
                                     + (["--step-timeout", str(args.step_timeout)] if args.step_timeout else []),
                                     harness.worker_seconds(1, seconds, 120), {"case": case})
            log.write(row)
            print(f"{case}: {row.get('class')} {row.get('prune_s', 0):.1f} s {row.get('group_root') or ''}", flush=True)
        log.finish(wall_s=time.perf_counter() - start)
    print(harness.write_report(render, log_path, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
