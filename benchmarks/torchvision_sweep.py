"""Prune every torchvision classification model at ratio 0.5 and check the result.

For each model (``weights=None``, eval mode) the sweep

1. prunes it with ``fxprune.prune(model, 0.5, example_inputs=(x,))`` (the 1000 logits are kept),
2. runs the pruned model on a real input and compares its output shape with the original's,
3. counts MACs and parameters before and after with ``fxprune.macs.count``,
4. runs the dead-unit oracle on a fresh copy: plant all-zero units in every prunable
   group, remove exactly them with ``fxprune.apply``, and report the largest output
   difference relative to the output's magnitude.

A model passes when it prunes, runs, keeps its output shape, keeps at most 50% of
its MACs and the oracle difference is at most ``ORACLE_TOL``. A model that
``torch.fx.symbolic_trace`` cannot trace is reported as ``untraceable`` with the reason
(fxprune itself would fall back to ``torch.export``). Every model runs in its own
subprocess (``--worker``), so a crash, a timeout or running out of memory is one row
of the table, not the end of the sweep.

Usage::

    python benchmarks/torchvision_sweep.py                      # the whole zoo (slow: ~70 min on 2 cores)
    python benchmarks/torchvision_sweep.py --quick              # the CI subset
    python benchmarks/torchvision_sweep.py --models resnet18,swin_t --size 64
    python benchmarks/torchvision_sweep.py --out results.md --log results.jsonl --timeout 1800
    python benchmarks/torchvision_sweep.py --render --log results.jsonl --out results.md   # from a log

The table (model | status | MACs kept | params kept | oracle max diff | seconds) is
printed and written to ``benchmarks/torchvision_results.md`` (``--out``) after every
model, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RATIO = 0.5
ORACLE_TOL = 1e-4  # max |pruned - original| / max |original| for the dead-unit oracle
QUICK = ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5", "regnet_x_400mf", "vit_b_16",
         "convnext_tiny", "efficientnet_b0", "squeezenet1_0", "swin_t"]
HERE = Path(__file__).resolve().parent


def input_spec(name: str, size: int | None = None) -> tuple[int, dict]:
    """(image size, constructor kwargs) for a model; ``size`` overrides the default where the model allows it.

    * inception_v3 wants 299 (its auxiliary head only runs in training mode, so it is not in the graph);
    * ViTs take ``image_size=`` (a multiple of the patch size); the large ones run smaller to save time;
    * MaxViT's partitions need a multiple of 224; Swin pads to its window, so any size from 32 works.
    """
    if name == "inception_v3":
        return (size or 299, {})
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        default = 112 if name in ("vit_h_14", "vit_l_16") else 224
        image = size or default
        image = max(patch, image // patch * patch)
        return (image, {"image_size": image})
    if name == "maxvit_t":
        return (224, {})
    return (size or 224, {})


INPUTS = ("Input: one 3x224x224 image; inception_v3 299x299; vit_h_14 and vit_l_16 built with image_size=112; "
          "weights=None, eval mode, constant-initialised parameters randomised (see randomize_constant_params).")


def randomize_constant_params(model) -> None:
    """Give parameters that were initialised to one constant (zeros, ones, 1e-6 layer scales) random values.

    torchvision zero-initialises ViT's head and starts ConvNeXt's layer scales at 1e-6;
    with those the oracle compares almost-constant outputs and proves little.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool(p.min() == p.max()):
                c = float(p.flatten()[0])
                noise = torch.randn(p.shape, generator=gen).to(p.dtype)
                p.copy_(0.2 * noise if abs(c) <= 1e-3 else c * (1 + 0.2 * noise))


def build(name: str, size: int | None = None):
    import torch
    import torchvision

    image, kwargs = input_spec(name, size)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomize_constant_params(model)
    x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
    return model, x


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def relative_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(name: str, size: int | None = None, oracle: bool = True) -> dict:
    """Everything the table reports for one model (run inside a worker process)."""
    import torch

    import fxprune
    import fxprune.analysis.macs
    from fxprune.testing import plant_dead_units

    torch.set_grad_enabled(False)
    row = {"model": name}
    start = time.perf_counter()
    model, x = build(name, size)
    row["input"] = list(x.shape)
    row["build_s"] = time.perf_counter() - start
    try:
        torch.fx.symbolic_trace(model)
    except Exception as exc:  # fxprune would fall back to torch.export; the issue lists these in the README
        row.update(status="untraceable", reason=f"symbolic_trace: {type(exc).__name__}: {_first_line(exc)}")
        return row
    macs0, params0 = fxprune.analysis.macs.count(model, (x,))
    reference = model(x)
    t = time.perf_counter()
    pruned = fxprune.prune(model, RATIO, example_inputs=(x,))
    row["prune_s"] = time.perf_counter() - t
    out = pruned(x)
    row["shape"], row["expected_shape"] = list(out.shape), list(reference.shape)
    macs1, params1 = fxprune.analysis.macs.count(pruned, (x,))
    row.update(macs=macs0, params=params0, macs_pruned=macs1, params_pruned=params1,
               macs_kept=macs1 / macs0, params_kept=params1 / params0)
    del pruned, out
    if oracle:
        t = time.perf_counter()
        model_copy = copy.deepcopy(model)
        dg = fxprune.analyze(model_copy, (x,))
        row["groups"], row["prunable"] = len(dg.groups), len(dg.prunable_groups)
        row["unsupported"] = sorted({w for _, w in dg.state.unsupported})[:5]
        removal = plant_dead_units(dg, seed=0)
        before = dg.gm(x)
        after = fxprune.apply(dg, removal)(x)
        row["oracle_diff"] = relative_diff(after, before)
        row["oracle_groups"] = len(removal)
        row["oracle_s"] = time.perf_counter() - t
    row["status"] = status(row)
    return row


def status(row: dict) -> str:
    if row["shape"] != row["expected_shape"]:
        return "shape changed"
    problems = []
    if row["macs_kept"] > RATIO:
        problems.append("MACs kept > 50%")
    if row.get("oracle_diff", 0.0) > ORACLE_TOL:
        problems.append("oracle")
    return ", ".join(problems) or "ok"


def worker(name: str, size: int | None, oracle: bool) -> None:
    try:
        row = measure(name, size, oracle)
    except Exception as exc:  # one row of the table, with the exception's first line
        row = {"model": name, "status": "error",
               "reason": f"{type(exc).__name__}: {_first_line(exc)}",
               "traceback": traceback.format_exc()[-3000:]}
    print("@@RESULT@@" + json.dumps(row), flush=True)


def run_one(name: str, size: int | None, oracle: bool, timeout: float, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    if size:
        cmd += ["--size", str(size)]
    if not oracle:
        cmd.append("--no-oracle")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = proc.stdout
        rows = [json.loads(line[len("@@RESULT@@"):]) for line in text.splitlines() if line.startswith("@@RESULT@@")]
        if rows:
            row = rows[-1]
        else:
            tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            row = {"model": name, "status": "error", "reason": f"worker died (exit {proc.returncode}): {tail[:300]}"}
    except subprocess.TimeoutExpired:
        row = {"model": name, "status": "error", "reason": f"timed out after {timeout:.0f} s"}
    row["seconds"] = time.perf_counter() - start
    if log is not None:
        log.write(json.dumps(row) + "\n")
        log.flush()
    return row


def fmt_pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def table(rows: list[dict], total: int | None = None) -> str:
    lines = ["| model | status | MACs kept | params kept | oracle max diff | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        state = r["status"] if r["status"] in ("ok",) or "reason" not in r else f"{r['status']}: {r['reason']}"
        diff = f"{r['oracle_diff']:.1e}" if "oracle_diff" in r else ""
        lines.append(f"| {r['model']} | {state.replace('|', '/')} | {fmt_pct(r.get('macs_kept'))} | "
                     f"{fmt_pct(r.get('params_kept'))} | {diff} | {r.get('seconds', 0):.0f} |")
    ok = [r for r in rows if r["status"] == "ok"]
    untraceable = [r for r in rows if r["status"] == "untraceable"]
    failed = [r for r in rows if r["status"] not in ("ok", "untraceable")]
    measured = [r for r in rows if "macs_kept" in r]
    lines.append("")
    lines.append(f"**{len(ok)}/{len(rows)} ok**" + (f" ({total} models in the selection)" if total else "")
                 + f"; {len(untraceable)} untraceable by symbolic_trace; {len(failed)} failing.")
    if measured:
        macs0 = sum(r["macs"] for r in measured)
        macs1 = sum(r["macs_pruned"] for r in measured)
        worst = max(measured, key=lambda r: r["macs_kept"])
        lines.append(f"MACs kept: median {fmt_pct(sorted(r['macs_kept'] for r in measured)[len(measured) // 2])}, "
                     f"worst {fmt_pct(worst['macs_kept'])} ({worst['model']}), "
                     f"all models together {fmt_pct(macs1 / macs0)}.")
    diffs = [r["oracle_diff"] for r in rows if "oracle_diff" in r]
    if diffs:
        lines.append(f"Largest oracle difference (relative to the output's magnitude): {max(diffs):.1e}.")
    lines.append(f"Total time: {sum(r.get('seconds', 0) for r in rows) / 60:.1f} min.")
    return "\n".join(lines)


def all_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def render(runs: list[dict]) -> str:
    """The report from the log: the latest row per model over its runs."""
    rows, _ = harness.latest_rows(runs, "model")
    size = runs[-1]["header"].get("size") if runs else None
    return (f"# torchvision sweep: prune at ratio {RATIO}\n\n{harness.describe_runs(runs, 'model')}\n\n"
            + (f"Input: {size}x{size} where the model accepts it.\n\n" if size else f"{INPUTS}\n\n")
            + table(rows, len(rows)) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the CI subset: " + ", ".join(QUICK))
    parser.add_argument("--models", help="comma-separated model names (default: every classification model)")
    parser.add_argument("--skip", default="", help="comma-separated model names to leave out")
    parser.add_argument("--size", type=int, help="input size for every model that accepts it (default 224)")
    parser.add_argument("--no-oracle", action="store_true", help="skip the dead-unit oracle")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model (default 1800)")
    parser.add_argument("--out", default=str(HERE / "torchvision_results.md"), help="markdown file for the table")
    parser.add_argument("--log", default=None, help="the JSON-lines log (default: --out with .jsonl)")
    parser.add_argument("--append", action="store_true", help="add this run to --log (its rows replace earlier ones)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.size, not args.no_oracle)
        return 0
    log_path = Path(args.log) if args.log else Path(args.out).with_suffix(".jsonl")
    if args.render:
        print(harness.write_report(render, log_path, args.out))
        return 0
    names = QUICK if args.quick else (args.models.split(",") if args.models else all_models())
    skip = set(filter(None, args.skip.split(",")))
    names = [n for n in names if n not in skip]
    log = harness.Log(log_path, harness.run_header("torchvision_sweep.py", list(argv if argv is not None
                                                                                else sys.argv[1:]), size=args.size),
                      mode="a" if args.append else "w")
    rows = []

    class _Sink:  # run_one writes JSON text lines; the log wants rows
        def write(self, text):
            log.write(json.loads(text))

        def flush(self):
            pass

    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        row = run_one(name, args.size, not args.no_oracle, args.timeout, _Sink())
        rows.append(row)
        extra = "" if row["status"] == "ok" else f" ({row.get('reason', '')})"
        print(f"[{i}/{len(names)}] {name}: {row['status']}{extra}, MACs kept {fmt_pct(row.get('macs_kept'))}, "
              f"oracle {row.get('oracle_diff', float('nan')):.1e}, {row['seconds']:.0f} s", flush=True)
        harness.write_report(render, log_path, args.out)
    log.finish(wall_s=time.perf_counter() - start)
    print(harness.write_report(render, log_path, args.out))
    return 0 if all(r["status"] in ("ok", "untraceable") for r in rows) else 1


def _versions() -> str:
    import torch
    import torchvision

    return f"{torch.__version__}, torchvision {torchvision.__version__}"


if __name__ == "__main__":
    sys.exit(main())
