"""Peak memory of calibration statistics on a 1B-parameter LLaMA (random weights, CPU).

A TinyLlama-shaped model (hidden 2048, 22 layers, 32 heads, 4 key/value heads, MLP 5632, vocabulary
32000; 1.1B parameters, float32) is analysed, then ``fxprune.calibration.collect_statistics`` streams a
few batches of random token ids through it: once without Gram matrices (what the ``"activation"`` /
``"wanda"`` criteria need) and once with them (``reconstruct=True`` and ``"obs"``: one float64
``(d + 1)^2`` matrix per consumer: o_proj 2049^2, down_proj 5633^2). Each mode runs in a fresh process
so that its peak is its own. Reported: resident set size after loading and analysing, and the peak
above it while collecting (sampled every 5 ms, ``benchmarks/meter.py``), the accumulators' size, seconds.

Each mode gets ``harness.step_seconds("calibration_memory", "llama-1b")`` (1800 s). The log (``--log``, default
``--out`` with ``.jsonl``) names the run; the report is rendered from it (:func:`render`, also ``results.py``).

Run::

    python benchmarks/calibration_memory.py [--batches 4 --batch 2 --length 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def one(mode: str, batches: int, batch: int, length: int) -> dict:
    import transformers

    import fxprune
    from fxprune.calibration import collect_statistics
    from meter import Meter, rss_bytes

    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    model = model.to_empty(device="cpu").eval()  # uninitialised weights are as good as random here
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
    ids = torch.randint(0, SHAPE["vocab_size"], (batches, batch, length))
    start = time.perf_counter()
    dg = fxprune.analyze(model, (), kwargs={"input_ids": ids[0]})
    analysis = time.perf_counter() - start
    loaded = rss_bytes()
    with Meter() as m:
        stats = collect_statistics(dg, [{"input_ids": b} for b in ids], gram=mode == "gram", progress=False)
    size = sum(s.total.numel() * 2 + (s.gram_sum.numel() if s.gram_sum is not None else 0) for s in stats.values()) * 8
    return {"mode": mode, "parameters": sum(p.numel() for p in model.parameters()), "consumers": len(stats),
            "tokens": batches * batch * length, "rss after analysis GB": loaded / 1e9,
            "peak above it GB": m.rss_peak_mb * 2 ** 20 / 1e9, "accumulators GB": size / 1e9,
            "analysis s": analysis, "statistics s": m.seconds}


def render(runs: list[dict]) -> str:
    """The report of the log's last run: one row per mode."""
    run = runs[-1]
    rows = [r for r in run["rows"] if "error" not in r]
    failed = [r for r in run["rows"] if "error" in r]
    keys = list(rows[0]) if rows else []
    text = "# Calibration statistics of a 1.1B LLaMA: peak memory\n\n"
    text += f"{harness.describe_runs([run])}\n\n{run['header'].get('step_limit_note', '')}\n\n"
    if keys:
        text += "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
        text += "\n".join("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
                          + " |" for r in rows) + "\n"
    for r in failed:
        text += f"\n- {r['mode']}: {harness.describe_failure(r)}\n"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--mode", choices=("moments", "gram"), help="run one mode in this process")
    harness.add_limit_arguments(parser)
    parser.add_argument("--out", help="markdown report (default benchmarks/calibration_memory.md)")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(one(args.mode, args.batches, args.batch, args.length)))
        return 0
    out = Path(args.out) if args.out else HERE / "calibration_memory.md"
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        return 0
    limit = harness.step_seconds("calibration_memory", "llama-1b", args.step_timeout)
    log = harness.Log(log_path, harness.run_header(
        "calibration_memory.py", list(sys.argv[1:] if argv is None else argv),
        step_limit_note=harness.limits_note("calibration_memory", ["llama-1b"], args.step_timeout)))
    start = time.perf_counter()
    for mode in ("moments", "gram"):
        cmd = [sys.executable, __file__, "--mode", mode, "--batches", str(args.batches), "--batch", str(args.batch),
               "--length", str(args.length)]
        row = {"mode": mode}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            if proc.returncode:
                row.update(harness.failed("memory" if proc.returncode == -9 else "error",
                                          (proc.stderr.strip().splitlines() or ["?"])[-1][:240]), error=True)
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            row.update(harness.failed("timeout", f"timed out after {limit:.0f} s"), error=True)
        log.write(row)
        print(row, flush=True)
    log.finish(wall_s=time.perf_counter() - start)
    harness.publish(harness.write_report(render, log_path, out), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
