"""``fxprune.prune_checkpoint`` on random-weight LLaMA checkpoints on disk: wall time and peak memory.

For each size a checkpoint is written shard by shard (random bfloat16 weights, never a whole model in memory,
``fxprune.io.write_shards``) into a temporary folder, then pruned at ratio 0.3 by ``prune_checkpoint`` in a
fresh process; for the 1B model also the reference path in another fresh process: ``from_pretrained``, in-place
``prune`` and ``save_pretrained``. Reported: wall seconds, peak RSS above the process's RSS after imports
(``meter.Meter``) and the process's absolute peak (``ru_maxrss``). The folders are deleted afterwards.

With ``--calibration NxT`` (N random sequences of T tokens, in batches of two) the steps are the calibrated
ones instead: ``prune_checkpoint(..., importance="activation", calibration=batches, reconstruct=True)``, one
decoder layer at a time (:mod:`fxprune.io.layerwise`), against ``from_pretrained`` + in-place ``prune`` with
``importance="activation"`` on the same batches + ``save_pretrained``. The loaded path runs without
``reconstruct=True``: its refit holds the float64 Gram matrix of every consumer at once (reported as "Gram GB",
counted from the config, 10 GB for the 1.1B), more than the memory the benchmark may take. Random weights make
quality meaningless: memory and time only.

``--torch-pruning`` adds Torch-Pruning's column: in another fresh process the checkpoint is loaded whole in
bfloat16 (``from_pretrained``), pruned in place at the same ratio with its documented LLM recipe
(``tp_recipe.prune``: examples/LLMs/prune_llm.py, group L2 magnitude, heads pruned, ``round_to=4``) and saved;
the row says whether the pruned model then runs (finite logits) and reloads from the saved folder, or what failed.
Every step of both libraries runs in its own process under the same limit, ``harness.step_seconds`` (300 s;
900 s for the 7B, 3600 s for the 1.1B's layer-by-layer calibration; ``--step-timeout`` changes it for all).
It needs the whole model in memory (2 bytes a parameter): a size whose
bfloat16 weights plus 8 GB do not fit in the available memory (``MemAvailable``) is skipped with the reason.

Run (the 7B case writes 13.5 GB to the temporary folder and takes a few minutes)::

    python benchmarks/checkpoint_streaming.py --sizes 1b,7b --torch-pruning --out benchmarks/checkpoint_streaming.md
    python benchmarks/checkpoint_streaming.py --sizes 1b --calibration 4x128 --out benchmarks/checkpoint_layerwise.md
    python benchmarks/checkpoint_streaming.py --sizes 125m --calibration 8x256 --append \\
        --out benchmarks/checkpoint_layerwise.md       # a second section, from the same log

Each run writes a header and its rows to the log (``--log``, default ``--out`` with ``.jsonl``); the report
has one section per run of the log, rendered from it (:func:`render`, also called by ``results.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

SIZES = {  # TinyLlama-1.1B's and LLaMA-7B's shapes; bfloat16 shards of the given size
    "1b": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, intermediate_size=5632, shard="1GB"),
    "7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008, shard="2GB"),
    "125m": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=2048, shard="100MB"),
    # the tests' size; one key/value head: Torch-Pruning 1.6 loops forever on 2 query heads per key/value head
    # (benchmarks/tp_hang.md), and the test checks its row, not that bug
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, intermediate_size=128, shard="100KB"),
}
RATIO = 0.3


def write(folder: str, size: str) -> dict:
    import torch
    import transformers

    from fxprune.io.checkpoint import meta_model, write_shards

    spec = dict(SIZES[size])
    shard = spec.pop("shard")
    config = transformers.LlamaConfig(**spec, architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    config.dtype = "bfloat16"
    shapes = {n: tuple(p.shape) for n, p in meta_model(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    write_shards(folder, {n: (s, torch.bfloat16) for n, s in shapes.items()},
                 lambda n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16),
                 max_shard_size=shard, progress=False)
    config.save_pretrained(folder)
    return {"parameters": sum(torch.Size(s).numel() for s in shapes.values()),
            "shards": len(list(Path(folder).glob("*.safetensors")))}


def stream(folder: str, out: str) -> dict:
    import fxprune
    from meter import Meter

    with Meter() as m:
        fxprune.prune_checkpoint(folder, out, RATIO, progress=False)
    return {"seconds": m.seconds, "rss_above_gb": m.rss_peak_mb / 1024}


def loaded(folder: str, out: str) -> dict:
    import torch
    import transformers

    import fxprune
    from meter import Meter

    with Meter() as m:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        fxprune.prune(model, RATIO, example_inputs=(torch.zeros(1, 8, dtype=torch.long),), inplace=True)
        model.save_pretrained(out)
    return {"seconds": m.seconds, "rss_above_gb": m.rss_peak_mb / 1024}


def _batches(folder: str, spec: str) -> list:
    """``NxT``: N random sequences of T tokens of the checkpoint's vocabulary, in batches of two sequences."""
    import torch
    import transformers

    n, t = (int(v) for v in spec.split("x"))
    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))
    return list(ids.split(2))


def gram_gb(size: str) -> float:
    """The float64 ``[x, 1]`` Gram matrices the in-memory refit holds at once: every consumer of a pruned input."""
    c = SIZES[size]
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    per_layer = 5 * (c["hidden_size"] + 1) ** 2 + (c["num_attention_heads"] * head_dim + 1) ** 2 \
        + (c["intermediate_size"] + 1) ** 2  # q k v gate up on the hidden size, o on the heads, down on the MLP
    return 8 * (c["num_hidden_layers"] * per_layer + (c["hidden_size"] + 1) ** 2) / 2 ** 30


def layerwise(folder: str, out: str, spec: str) -> dict:
    import fxprune
    from meter import Meter

    batches = _batches(folder, spec)
    with Meter() as m:
        fxprune.prune_checkpoint(folder, out, RATIO, importance="activation", calibration=batches, reconstruct=True,
                                 progress=False)
    return {"seconds": m.seconds, "rss_above_gb": m.rss_peak_mb / 1024}


def loaded_activation(folder: str, out: str, spec: str) -> dict:
    import transformers

    import fxprune
    from meter import Meter

    batches = _batches(folder, spec)
    with Meter() as m:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        fxprune.prune(model, RATIO, example_inputs=(batches[0],), importance="activation", calibration=batches,
                      inplace=True)
        model.save_pretrained(out)
    return {"seconds": m.seconds, "rss_above_gb": m.rss_peak_mb / 1024}


def torch_pruning(folder: str, out: str) -> dict:
    """Torch-Pruning's LLM recipe on the checkpoint loaded whole in bfloat16, then ``save_pretrained``."""
    import torch
    import transformers

    import tp_recipe
    from meter import Meter

    ids = torch.zeros(1, 8, dtype=torch.long)
    row, stage = {}, "load"
    with Meter() as m:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
            model.config.use_cache = False  # Torch-Pruning traces the outputs' grad_fn: a key/value cache has none
            stage = "prune"
            tp_recipe.prune("hf:llama", model, (ids,), {}, RATIO)
            stage = "save"
            model.save_pretrained(out)
            stage = None
        except Exception as exc:  # which step failed, and how long it ran, is the result
            row["failed"] = f"{stage} failed: {_first_line(exc)}"
    row.update(seconds=m.seconds, rss_above_gb=m.rss_peak_mb / 1024)
    if stage in ("load", "prune"):
        return row
    row["parameters_after"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        try:
            row["runs"] = bool(torch.isfinite(model(ids).logits.float()).all())
        except Exception as exc:
            row["runs"], row["run_error"] = False, _first_line(exc)
        del model
        if stage is None:
            try:
                reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
                row["reloads"] = bool(torch.isfinite(reloaded(ids).logits.float()).all())
            except Exception as exc:  # the saved config may not describe the pruned shapes
                row["reloads"], row["reload_error"] = False, _first_line(exc)
    return row


def _first_line(exc: Exception) -> str:
    """The first line of the error that started it all (transformers wraps a config's ValueError in its own)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines or [''])[0][:200]}"


STEPS = {"write": write, "stream": stream, "loaded": loaded, "layerwise": layerwise,
         "loaded_activation": loaded_activation, "torch_pruning": torch_pruning}
METHODS = {"stream": "prune_checkpoint", "loaded": "from_pretrained + prune(inplace) + save_pretrained",
           "layerwise": "prune_checkpoint(activation, calibration, reconstruct): one layer at a time",
           "loaded_activation": "from_pretrained + prune(activation, calibration, inplace) + save_pretrained",
           "torch_pruning": "Torch-Pruning LLM recipe (bf16 in memory) + save_pretrained"}


def _worker(step: str, *args, timeout: float | None = None) -> dict:
    """One step in a fresh process, killed after ``timeout`` seconds (the same for every library's step)."""
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", step, *args], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "class": "timeout", "step_s": time.perf_counter() - start}
    if out.returncode:
        kind = "memory" if out.returncode == -9 else "error"
        return {"error": (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1][:300], "class": kind,
                "step_s": time.perf_counter() - start}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if "failed" in row:  # pruned (and perhaps runs) but a later stage failed: the message says which
        row["class"] = "error"
    return row


def available_gb() -> float:
    """``MemAvailable`` of /proc/meminfo in GB (inf where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return float("inf")
    return int(fields["MemAvailable"].split()[0]) / 2 ** 20


def _case(size: str, calibration: str | None) -> str:
    return f"{size} calibration" if calibration else size


def render_run(run: dict) -> str:
    """One run's section: title, table, notes and the command, all from the log."""
    h, rows = run["header"], run["rows"]
    calibration, sizes = h.get("calibration"), h.get("sizes", "")
    title = "# prune_checkpoint on random LLaMA checkpoints (ratio 0.3, bfloat16)"
    if calibration:
        n, t = calibration.split("x")
        title = (f"# Layer-by-layer calibration of random LLaMA checkpoints (ratio 0.3, bfloat16, {n} sequences x {t} "
                 "tokens)")
    lines = [title, "", harness.describe_runs([run]), "", h.get("step_limit_note", ""), "",
             "| size | parameters | shards | method | seconds | peak RSS above start GB | process peak GB | "
             "pruned model |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            ran = f" (ran {r['step_s']:.0f} s)" if r.get("step_s") else ""
            lines.append(f"| {r['size']} | | | {r['method']} | {r.get('class', 'error')}: {r['error']}{ran} | | | |")
            continue
        result = [r["failed"]] if "failed" in r else []
        if "runs" in r:
            result.append(f"{r['parameters_after'] / 1e9:.2f}B parameters; runs: "
                          f"{'yes' if r['runs'] else 'no (' + r.get('run_error', '?') + ')'}")
        if "reloads" in r:
            result.append(f"reloads: {'yes' if r['reloads'] else 'no (' + r.get('reload_error', '?') + ')'}")
        result = "; ".join(result)
        lines.append(f"| {r['size']} | {r['parameters'] / 1e9:.2f}B | {r['shards']} | {r['method']} | "
                     f"{r['seconds']:.1f} | {r['rss_above_gb']:.2f} | {r['maxrss_gb']:.2f} | {result} |")
    if calibration:
        lines += ["", "Random weights: quality is meaningless, memory and time only. The loaded path runs without "
                  "reconstruct=True: its refit would hold the float64 Gram matrices of every consumer at once (" +
                  ", ".join(f"{s}: {gram_gb(s):.1f} GB" for s in sizes.split(",") if s in SIZES) + ")."]
    return "\n".join(lines) + "\n"


def render(runs: list[dict]) -> str:
    """Every run of the log, one section each (a run with Torch-Pruning's column, a calibrated run, ...)."""
    return "\n".join(render_run(run) if i == 0 else "#" + render_run(run) for i, run in enumerate(runs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1b,7b")
    parser.add_argument("--tmp", help="folder for the checkpoints (default: the system's temporary folder)")
    parser.add_argument("--out", help="markdown report (rendered from --log)")
    parser.add_argument("--log", help="the JSON-lines log (default: --out with .jsonl, else a temporary file)")
    parser.add_argument("--append", action="store_true", help="add this run to --log (a section of its own) "
                                                              "instead of starting a new log")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    parser.add_argument("--calibration", metavar="NxT",
                        help="the calibrated steps instead: N sequences of T tokens (e.g. 8x256)")
    parser.add_argument("--torch-pruning", action="store_true", help="add Torch-Pruning's LLM recipe (in memory)")
    harness.add_limit_arguments(parser)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row = STEPS[args.worker[0]](*args.worker[1:])
        row["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(json.dumps(row))
        return 0
    log_path = Path(args.log) if args.log else Path(args.out).with_suffix(".jsonl") if args.out else \
        Path(tempfile.mkdtemp(prefix="fxprune-checkpoint-")) / "checkpoint_streaming.jsonl"
    if args.render:
        harness.write_report(render, log_path, args.out)
        print(f"wrote {args.out} from {log_path}")
        return 0
    cases = [_case(size, args.calibration) for size in args.sizes.split(",")]
    header = harness.run_header("checkpoint_streaming.py", list(sys.argv[1:] if argv is None else argv),
                                sizes=args.sizes, calibration=args.calibration, torch_pruning=args.torch_pruning,
                                step_limit_note=harness.limits_note("checkpoint_streaming", cases, args.step_timeout))
    log = harness.Log(log_path, header, mode="a" if args.append else "w")
    start = time.perf_counter()
    for size in args.sizes.split(","):
        limit = harness.step_seconds("checkpoint_streaming", _case(size, args.calibration), args.step_timeout)
        root = Path(tempfile.mkdtemp(prefix=f"fxprune-{size}-", dir=args.tmp))
        try:
            made = _worker("write", str(root / "src"), size)
            steps = ("stream", "loaded") if size != "7b" else ("stream",)  # loading 7B for reference: 27 GB fp32
            extra = ()
            if args.calibration:
                steps, extra = ("layerwise", "loaded_activation") if size != "7b" else ("layerwise",), \
                    (args.calibration,)
            for step in steps:
                result = _worker(step, str(root / "src"), str(root / step), *extra, timeout=limit)
                row = {"size": size, "method": METHODS[step], **made, **result}
                log.write(row)
                print(json.dumps(row), flush=True)
            if args.torch_pruning and "error" not in made:
                method = METHODS["torch_pruning"]
                # the weights, and room for loading, Torch-Pruning's traced forward pass and saving
                need, free = 2 * made["parameters"] / 2 ** 30 + 8, available_gb()  # the 6.7B peaked at 20 GB
                if free < need:
                    result = {"error": f"not run: needs about {need:.0f} GB ({2 * made['parameters'] / 2 ** 30:.1f} "
                                       f"GB of bfloat16 weights), {free:.0f} GB available", "class": "memory"}
                else:
                    result = _worker("torch_pruning", str(root / "src"), str(root / "tp"), timeout=limit)
                row = {"size": size, "method": method, **made, **result}
                log.write(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    log.finish(wall_s=time.perf_counter() - start)
    harness.publish(harness.write_report(render, log_path, args.out), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
