"""Latency of models pruned by fxprune at ratios 0.1..0.8 against the unpruned original, on CPU or CUDA.

Two settings are compared, each against the original (ratio 0): ``defaults``
(``fxprune.prune(model, ratio)``: aligned widths, whole attention heads) and
``round_to=1`` (alignment off). Models:

* ``resnet50``, ``vit_b_16`` (torchvision, random weights, 224 px): batches of
  ``--batches`` images (default 1 and 64); pruned out of place (a GraphModule).
* ``llama-7b``: the 7B-class LLaMA shape (hidden 4096, MLP 14336, 32 heads of 128,
  8 KV heads, 32 layers, vocab 32000), random weights, built directly on the device
  in ``--dtype`` (about 14 GB in bf16: GPU only). Prefill: one forward of
  ``input_ids`` of ``B x --seq`` tokens (default 1024) with ``use_cache=False`` and
  logits of the last token only (``logits_to_keep=1``), for B in ``--llama-batches``
  (default 1 and 4; the 4 x 1024 column stands where images have batch 64).
  Pruned in place (the Hugging Face model stays one), so every ratio builds a fresh
  model from the same seed.
* ``llama-7b/4``: the same proportions scaled for a 2-core CPU: hidden 1024, MLP 3584,
  8 heads of 128, 2 KV heads, 4 layers, vocab 32000; prefill of 1 and 4 x 128 tokens.
* ``resnet18`` (64 px) and ``llama-tiny`` (hidden 64, 2 layers, 16 tokens) for ``--quick``.

Latency is the median of ``--repeats`` forward passes under ``torch.inference_mode``
after warm-up: on CPU wall time (``perf_counter``) with ``torch.set_num_threads(--threads)``,
on CUDA ``torch.cuda.Event`` pairs after ``synchronize``. MACs come from
``fxprune.macs.count`` (torchvision models, one image) and from the module shapes for
LLaMA (one sequence of ``--seq`` tokens; the same convention: every linear, q @ k^T
and attn @ v over the full sequence, the LM head for one token). Each model runs in its own
worker process (``harness.py``); the worker emits its rows after every measurement, so
a model that crashes or runs out of time keeps the rows measured before.

Outputs (defaults depend on ``--device``; a temp dir with ``--quick``):
``benchmarks/latency_{cpu,cuda}.md`` (one table per model, a header with the date,
hardware, torch version and dtype), ``latency_{cpu,cuda}.jsonl`` (raw rows) and
``latency_{cpu,cuda}.png`` (speed-up against ratio, one panel per (model, batch), a line
per setting and a line at 1.0). ``benchmarks/results.py`` puts whichever exist in RESULTS.md.

Usage::

    python benchmarks/latency.py                    # CPU: resnet50, vit_b_16, llama-7b/4 (~25 min on 2 cores)
    python benchmarks/latency.py --device cuda      # GPU, bf16: resnet50, vit_b_16, llama-7b
    python benchmarks/latency.py --quick            # CI: resnet18 and llama-tiny, 2 ratios, < 60 s
    python benchmarks/latency.py --models resnet50 --ratios 0.3,0.6 --batches 1 --dtype bfloat16
    bash benchmarks/gpu_check.sh                    # the prepared GPU session (writes to $OUT)
    python benchmarks/latency.py --from-raw a.jsonl,b.jsonl --out benchmarks/latency_cuda.md   # merge runs

Format of a row (ratio, setting, MACs kept, GMACs, params, prune s, then ms and speed-up per batch, flag):
``| 0.5 | defaults | 26% | 1.06 | 6.9M | 0.4 | 23.9 | 2.27x | 256.2 | 3.94x | |``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
SETTINGS = {"defaults": None, "round_to=1": 1}  # setting name -> round_to passed to fxprune.prune
DEFAULT_MODELS = {"cpu": ["resnet50", "vit_b_16", "llama-7b/4"], "cuda": ["resnet50", "vit_b_16", "llama-7b"]}
QUICK = dict(models=["resnet18", "llama-tiny"], ratios=[0.3, 0.6], batches=[1, 4], llama_batches=[1, 2])
IMAGE_SIZE = {"resnet18": 64}  # others: 224
_LLAMA_COMMON = dict(vocab_size=32000, max_position_embeddings=4096, use_cache=False, tie_word_embeddings=False)
LLAMA = {  # name -> (config kwargs, default prefill length)
    "llama-7b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, **_LLAMA_COMMON), 1024),
    "llama-7b/4": (dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=128, **_LLAMA_COMMON), 128),
    "llama-tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64,
                        use_cache=False), 16),
}


# ---------------------------------------------------------------- timing


def latency_ms(fns: list, device: str, repeats: int, warmup: int) -> list[float]:
    """Median time of each ``fn()`` in milliseconds (CUDA events on a GPU, perf_counter on a CPU).

    Several functions are timed in turns (one run of each per repeat), so that a change in the
    machine's load during the measurement slows them alike: their ratio stays fair.
    """
    import torch

    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
        if device == "cuda":
            torch.cuda.synchronize()
        for _ in range(repeats):
            for fn, mine in zip(fns, times):
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    mine.append(start.elapsed_time(end))
                else:
                    start = time.perf_counter()
                    fn()
                    mine.append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------- models


class Case:
    """One model: how to build it, what to feed it per batch column, how to prune and count it."""

    def __init__(self, name: str, device: str, dtype, batches, llama_batches, seq: int | None):
        self.name, self.device, self.dtype = name, device, dtype
        self.llama = name in LLAMA
        if self.llama:
            config, default_seq = LLAMA[name]
            self.config, self.seq = config, seq or default_seq
            self.batches = list(llama_batches)
            self.labels = [f"{b}x{self.seq}" for b in self.batches]  # prefill: sequences x tokens
        else:
            self.size = IMAGE_SIZE.get(name, 224)
            self.batches = list(batches)
            self.labels = [f"b{b}" for b in self.batches]

    def build(self):
        import torch

        torch.manual_seed(0)
        if not self.llama:
            import torchvision

            return torchvision.models.get_model(self.name, weights=None).eval().to(self.device, self.dtype)
        import transformers as T

        config = T.LlamaConfig(**self.config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # random init directly in the target dtype, on the target device
        try:
            with torch.device(self.device):
                model = T.LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        return model.eval()

    def example(self):
        """The small input used to analyse and count (one image / one short sequence)."""
        import torch

        gen = torch.Generator().manual_seed(1)
        if self.llama:
            return torch.randint(0, self.config["vocab_size"], (1, min(self.seq, 64)), generator=gen).to(self.device)
        return torch.randn(1, 3, self.size, self.size, generator=gen).to(self.device, self.dtype)

    def runners(self, model) -> dict:
        """``{label: fn}``: one forward at each batch column."""
        import inspect

        import torch

        gen = torch.Generator().manual_seed(2)
        if not self.llama:
            x = torch.randn(1, 3, self.size, self.size, generator=gen).to(self.device, self.dtype)
            inputs = {label: x.expand(b, -1, -1, -1).contiguous() for label, b in zip(self.labels, self.batches)}
            return {label: (lambda x=x: model(x)) for label, x in inputs.items()}
        kwargs = {"use_cache": False}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # a 32000-wide logits tensor for the last token only
        ids = {label: torch.randint(0, self.config["vocab_size"], (b, self.seq), generator=gen).to(self.device)
               for label, b in zip(self.labels, self.batches)}
        return {label: (lambda i=i: model(input_ids=i, **kwargs)) for label, i in ids.items()}

    def prune(self, model, ratio: float, round_to):
        import fxprune

        return fxprune.prune(model, ratio, example_inputs=(self.example(),), round_to=round_to, inplace=self.llama)

    def macs(self, model) -> tuple[int, int]:
        """(MACs of one image / one sequence of ``seq`` tokens, parameters)."""
        params = sum(p.numel() for p in model.parameters())
        if not self.llama:
            from fxprune.analysis.macs import count

            return count(model, (self.example(),))[0], params
        return llama_macs(model, self.seq), params


def llama_macs(model, seq: int) -> int:
    """Prefill MACs of one sequence: every linear per token (the LM head for the last token only),
    plus q @ k^T and attn @ v per layer over the full sequence (fxprune.macs' convention for sdpa)."""
    import torch

    total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features * (1 if name.endswith("lm_head") else seq)
    for layer in model.model.layers:
        attn = layer.self_attn
        q_width = attn.q_proj.out_features  # heads x head_dim after pruning
        total += 2 * seq * seq * q_width
    return total


# ---------------------------------------------------------------- worker


def measure(case: Case, model, repeats: int, warmup: int, original=None) -> dict:
    """``{"ms": {label: ms}}``, plus ``"ms_original"`` timed in turns with ``original`` when given (``--paired``)."""
    if original is None:
        return {"ms": {label: latency_ms([fn], case.device, repeats, warmup)[0]
                       for label, fn in case.runners(model).items()}}
    mine, theirs = case.runners(model), case.runners(original)
    both = {label: latency_ms([theirs[label], mine[label]], case.device, repeats, warmup) for label in mine}
    return {"ms": {label: t[1] for label, t in both.items()}, "ms_original": {label: t[0] for label, t in both.items()}}


def run_model(spec: dict) -> None:
    """Worker: original, then every (setting, ratio); emits the cumulative rows after each one."""
    import gc
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    else:
        torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, spec["dtype"])
    case = Case(spec["model"], spec["device"], dtype, spec["batches"], spec["llama_batches"], spec["seq"])
    rows: list[dict] = []
    base = {"model": case.name, "device": case.device, "dtype": spec["dtype"], "labels": case.labels,
            "batches": case.batches, "seq": case.seq if case.llama else None, "hardware": hardware(case.device),
            "torch": torch.__version__,
            **{k: spec[k] for k in ("repeats", "warmup", "threads", "command", "started", "note")}}

    def record(row: dict) -> None:
        rows.append({**base, **row})
        print(_line(rows[-1]), flush=True)
        harness.emit({"rows": rows})

    def step(fn, *args):
        with harness.time_limit(harness.step_seconds("latency", spec["model"], spec["step_timeout"])):
            return fn(*args)

    start = time.perf_counter()
    model = step(case.build)
    build_s = time.perf_counter() - start
    macs0, params0 = case.macs(model)
    record(dict(setting="original", ratio=0.0, round_to=None, macs=macs0, macs_kept=1.0, params=params0,
                prune_s=0.0, build_s=build_s, **step(measure, case, model, spec["repeats"], spec["warmup"])))
    original = model if spec.get("paired") else None  # kept for timing in turns (in place: a second copy)
    for setting, round_to in SETTINGS.items():
        for ratio in spec["ratios"] if round_to is None else spec["round1_ratios"]:
            row = dict(setting=setting, ratio=ratio, round_to=round_to)
            try:
                if case.llama:  # pruned in place: a fresh model per ratio, same seed, same weights
                    model = target = None
                    gc.collect()
                    if case.device == "cuda":
                        torch.cuda.empty_cache()
                    start = time.perf_counter()
                    model = step(case.build)
                    row["build_s"] = time.perf_counter() - start
                    target = model
                else:
                    target = model
                start = time.perf_counter()
                pruned = step(case.prune, target, ratio, round_to)
                row["prune_s"] = time.perf_counter() - start
                macs, params = case.macs(pruned)
                row.update(macs=macs, macs_kept=macs / macs0, params=params)
                row.update(step(measure, case, pruned, spec["repeats"], spec["warmup"], original))
            except (Exception, harness.StepLimit) as exc:  # one failed ratio is a row, not the end of the sweep
                row["error"] = harness.first_line(exc)
            record(row)
            pruned = target = None
            gc.collect()


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['model']} {r['setting']} ratio {r['ratio']:.1f}: {r['error']}"
    lat = ", ".join(f"{label} {ms:.1f} ms" for label, ms in r["ms"].items())
    return (f"{r['model']} {r['setting']} ratio {r['ratio']:.1f}: MACs {100 * r['macs_kept']:.0f}%, "
            f"prune {r.get('prune_s', 0):.1f} s, {lat}")


def stream_worker(cmd: list[str], timeout: float) -> tuple[list[dict], str | None]:
    """Run a worker, echo its progress lines, return (its last emitted rows, why it stopped early or None)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    rows: list[dict] = []
    try:
        for line in proc.stdout:
            if line.startswith(harness.MARK):
                rows = json.loads(line[len(harness.MARK):])["rows"]
            else:
                print("  " + line.rstrip(), flush=True)
        proc.wait()
    finally:
        expired = not timer.is_alive() and proc.returncode != 0
        timer.cancel()
    drain.join(5)
    if proc.returncode == 0:
        return rows, None
    if expired:
        return rows, f"worker timed out after {timeout:.0f} s"
    tail = (err[-1].strip() if err else "")[:200]
    return rows, f"worker died (exit {proc.returncode}): {tail}"


# ---------------------------------------------------------------- report


def hardware(device: str) -> str:
    if device == "cuda":
        import torch

        return f"GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    import torch

    return f"CPU {name} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores"


def speedups(rows: list[dict]) -> None:
    """Add ``speedup[label]`` = original ms / pruned ms to every measured row (the original timed in turns
    with this row when ``--paired``, else the original's own row)."""
    base = {r["model"]: r["ms"] for r in rows if r["setting"] == "original" and "ms" in r}
    for r in rows:
        ref = r.get("ms_original") or base.get(r["model"])
        if "ms" in r and ref:
            r["speedup"] = {k: ref[k] / v for k, v in r["ms"].items()}


def _column(label: str) -> str:
    return f"batch {label[1:]}" if label.startswith("b") else f"prefill {label} tokens"


def table(rows: list[dict]) -> str:
    """One markdown table per model (batch columns differ between images and prefill)."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        labels = mine[0]["labels"]
        title = f"### {name}"
        if name in LLAMA:
            cfg = LLAMA[name][0]
            title += (f" (LlamaForCausalLM, hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, "
                      f"{cfg['num_attention_heads']} heads of {cfg['head_dim']}, "
                      f"{cfg['num_key_value_heads']} KV heads, "
                      f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}; prefill of "
                      f"{' and '.join(labels)} tokens, MACs per sequence)")
            if name == "llama-7b/4":
                title += ": the 7B-class shape scaled down by 4 in width and 8 in depth for a CPU, NOT the 7B model"
        cols = " | ".join(f"{_column(lb)} ms | speed-up {lb}" for lb in labels)
        lines = [title, "",
                 f"| ratio | setting | MACs kept | GMACs | params | prune s | {cols} | slower than original |",
                 "| ---: | --- | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * len(labels) + " --- |"]
        for r in mine:
            if "error" in r:
                lines.append(f"| {r['ratio']:.1f} | {r['setting']} | | | | | " + " | |" * len(labels)
                             + f" failed: {r['error']} |".replace("\n", " "))
                continue
            cells = []
            for lb in labels:
                sp = r.get("speedup", {}).get(lb)
                cells.append(f"{r['ms'][lb]:.1f} | {'' if sp is None else f'{sp:.2f}x'}")
            slower = [lb for lb in labels if r.get("speedup", {}).get(lb, 1.0) < 1.0]
            flag = ("**slower at " + ", ".join(slower) + "**") if slower else ""
            lines.append(f"| {r['ratio']:.1f} | {r['setting']} | {100 * r['macs_kept']:.0f}% | {r['macs'] / 1e9:.2f} | "
                         f"{r['params'] / 1e6:.1f}M | {r.get('prune_s', 0):.1f} | " + " | ".join(cells)
                         + f" | {flag} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def summary(rows: list[dict]) -> str:
    """The issue's questions in a few lines: which pruned rows are slower, and the speed-ups at ratio 0.5."""
    lines = []
    for setting in SETTINGS:
        slow = [f"{r['model']} {r['ratio']:.1f} {lb} ({sp:.2f}x)" for r in rows if r["setting"] == setting
                for lb, sp in r.get("speedup", {}).items() if sp < 1.0]
        failed = [f"{r['model']} {r['ratio']}" for r in rows if r["setting"] == setting and "error" in r]
        lines.append(f"{setting}: slower than the original: {', '.join(slow) or 'none'}"
                     + (f"; failed: {', '.join(failed)}" if failed else ""))
    for r in rows:
        if r["ratio"] == 0.5 and "speedup" in r:
            cells = ", ".join(f"{lb} {sp:.2f}x" for lb, sp in r["speedup"].items())
            lines.append(f"ratio 0.5 {r['setting']} {r['model']}: {cells}")
    return "\n".join(lines)


def header(rows: list[dict]) -> str:
    """Date, hardware, torch version, dtype and commands, from the rows (a merged report names every run)."""
    first = rows[0]

    def every(key):
        return ", ".join(str(v) for v in dict.fromkeys(r.get(key) for r in rows if r.get(key) is not None))

    threads = f", {every('threads')} torch threads" if first["device"] == "cpu" else ""
    commands = "\n".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows if r.get("command")))
    notes = " ".join(dict.fromkeys(r["note"] for r in rows if r.get("note")))
    return (f"# Latency of pruned models against the original ({first['device'].upper()}, {every('dtype')})\n\n"
            f"{commands}\n\n"
            f"Measured {every('started')} on {every('hardware')}{threads}; torch {every('torch')}, dtype "
            f"{every('dtype')}; median of {every('repeats')} runs after {every('warmup')} warm-up runs; "
            "random weights. " + (notes + " " if notes else "") +
            "Settings: `defaults` = `fxprune.prune(model, ratio)` (aligned widths, whole heads), `round_to=1` = "
            "alignment off; ratio 0.0 is the unpruned original. Speed-up = original latency / pruned latency; the "
            "last column flags a pruned model slower than the original. Images are 224 px (resnet18: 64 px)."
            + (" The original is timed in turns with each pruned model (`--paired`) and its latency in the "
               "speed-ups is that paired one." if any(r.get("ms_original") for r in rows) else "") + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, lb) for name in dict.fromkeys(r["model"] for r in rows)
              for lb in next(r for r in rows if r["model"] == name)["labels"]]
    ncols = min(4, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.8 * nrows), squeeze=False)
    styles = {"defaults": dict(color="tab:blue", marker="o"), "round_to=1": dict(color="tab:orange", marker="s")}
    for ax, (name, lb) in zip(axes.flat, panels):
        mine = [r for r in rows if r["model"] == name and "speedup" in r]
        for setting, style in styles.items():
            pts = sorted((r["ratio"], r["speedup"][lb]) for r in mine if r["setting"] in (setting, "original"))
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.8, ms=5, label=setting, **style)
        ax.axhline(1.0, color="gray", ls="--", lw=1, label="original")
        ax.set_title(f"{name}, {_column(lb)}", fontsize=10)
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("speed-up over the original")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    hw = ", ".join(dict.fromkeys(r["hardware"] for r in rows if r.get("hardware")))
    fig.suptitle(f"fxprune: speed-up of pruned models over the original, {hw}, "
                 f"{', '.join(dict.fromkeys(r['dtype'] for r in rows if r.get('dtype')))}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def readme_summary(runs: list[dict]) -> str:
    """The README's sentence on this report: which pruned models are slower than the original, per setting."""
    rows = [r for run in runs for r in run["rows"]]
    speedups(rows)
    parts = []
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting and "speedup" in r]
        slow = [f"{r['model']} {r['ratio']:.1f} {lb} ({sp:.2f}x)" for r in mine for lb, sp in r["speedup"].items()
                if sp < 1.0]
        ratios = sorted({r["ratio"] for r in mine})
        if ratios:
            parts.append(f"{setting}: {len(mine)} pruned models (ratios {ratios[0]:g}..{ratios[-1]:g}), slower than "
                         f"the original: {', '.join(slow) or 'none'}")
    return "; ".join(parts) + "."


def render(runs: list[dict]) -> str:
    """The report from the raw rows of a log (each row names its command and start; results.py calls this)."""
    rows = [r for run in runs for r in run["rows"]]
    speedups(rows)
    return header(rows) + "\n" + table(rows) + "\n"


def write(rows: list[dict], out: Path, raw: Path, png: Path | None) -> None:
    speedups(rows)
    out.write_text(header(rows) + "\n" + table(rows) + "\n")
    raw.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    if png is not None:
        try:
            plot(rows, png)
        except ImportError:  # matplotlib is a benchmark extra: the table is still the result
            print("matplotlib is not installed (pip install -e .[bench]): no plot")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: resnet18 (64 px) and llama-tiny, ratios 0.3 and 0.6")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--models", help="comma-separated: resnet50, vit_b_16, llama-7b, llama-7b/4, resnet18, "
                                         "llama-tiny (default: resnet50, vit_b_16 and llama-7b on CUDA / "
                                         "llama-7b/4 on CPU)")
    parser.add_argument("--ratios", help="comma-separated ratios (default 0.1..0.8)")
    parser.add_argument("--round1-ratios", help="ratios for the round_to=1 setting (default: --ratios)")
    parser.add_argument("--batches", help="image batch sizes (default 1,64)")
    parser.add_argument("--llama-batches", help="prefill sequences per batch (default 1,4)")
    parser.add_argument("--seq", type=int, help="prefill tokens per sequence (default 1024 for llama-7b, 128 for "
                                                "llama-7b/4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--paired", action="store_true",
                        help="time the original in turns with every pruned model (twice the timing; fair speed-ups "
                             "on a machine whose load changes; keeps a second LLaMA in memory)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--step-timeout", type=float, help="seconds per build, prune or measurement (default "
                                                          "harness.step_seconds: 300 s, 900 s for llama-7b)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per model (one worker process)")
    parser.add_argument("--out", help="markdown (default benchmarks/latency_DEVICE.md; a temp dir with --quick)")
    parser.add_argument("--raw", help="JSON lines of the rows (default: --out with .jsonl)")
    parser.add_argument("--plot", help="PNG (default: --out with .png)")
    parser.add_argument("--from-raw", help="comma-separated .jsonl files of earlier runs: write the report "
                                           "(--out, --raw, --plot) from their rows, measuring nothing")
    parser.add_argument("--note", default="", help="conditions of the run for the report (e.g. pinned to a core)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_model(json.loads(args.worker))
        return 0
    cuda = args.device == "cuda"
    cfg = dict(device=args.device, dtype=args.dtype or ("bfloat16" if cuda else "float32"), threads=args.threads,
               models=DEFAULT_MODELS[args.device], ratios=RATIOS, batches=[1, 64], llama_batches=[1, 4],
               seq=args.seq, repeats=args.repeats or (20 if cuda else 5), warmup=args.warmup or (3 if cuda else 1),
               step_timeout=args.step_timeout, paired=args.paired, note=args.note)
    if args.quick:
        cfg.update(QUICK, repeats=args.repeats or 2)
        if importlib.util.find_spec("transformers") is None:  # LLaMA needs transformers: images only
            cfg["models"] = [m for m in cfg["models"] if m not in LLAMA]
    cfg["round1_ratios"] = None
    for key, cast in (("models", str), ("ratios", float), ("round1_ratios", float), ("batches", int),
                      ("llama_batches", int)):
        value = getattr(args, key)
        if value:
            cfg[key] = [cast(v) for v in value.split(",")]
    cfg["round1_ratios"] = cfg["round1_ratios"] or cfg["ratios"]
    unknown = [m for m in cfg["models"] if m not in LLAMA and m not in ("resnet18", "resnet50", "vit_b_16")]
    if unknown:
        parser.error(f"unknown models {unknown}")
    out = Path(args.out) if args.out else harness.default_out(args.quick, f"latency_{args.device}.md")
    raw = Path(args.raw) if args.raw else out.with_suffix(".jsonl")
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    for path in (out, raw, png):
        path.parent.mkdir(parents=True, exist_ok=True)
    if args.from_raw:
        merged: dict[tuple, dict] = {}  # a model measured again in a later file replaces the earlier rows
        for f in args.from_raw.split(","):
            if not Path(f).exists():
                print(f"{f} is missing: its models are left out")
                continue
            got = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
            for model in {r["model"] for r in got}:
                merged = {k: v for k, v in merged.items() if k[0] != model}
            merged.update({(r["model"], r["setting"], r["ratio"]): r for r in got})
        rows = list(merged.values())
        if not rows:
            print("no rows to report")
            return 1
        write(rows, out, raw, png)
        print(summary(rows))
        print(f"wrote {out}, {raw}" + (f", {png}" if png.exists() else ""))
        return 0
    cfg["command"] = "python benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg["started"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[dict] = []
    for name in cfg["models"]:
        spec = {k: v for k, v in cfg.items() if k != "models"} | {"model": name}
        print(f"{name} on {args.device} ({cfg['dtype']}):", flush=True)
        start = time.perf_counter()
        got, problem = stream_worker([harness.python(), __file__, "--worker", json.dumps(spec)], args.timeout)
        if problem:
            print(f"  {name}: {problem}", flush=True)
            got = got or [{"model": name, "setting": "original", "ratio": 0.0, "labels": [], "error": problem,
                           **{k: cfg[k] for k in ("device", "dtype", "command", "started")}}]
            if got[-1].get("error") != problem:
                got.append({**got[-1], "setting": "(stopped)", "ratio": float("nan"), "error": problem})
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
        rows += got
        write(rows, out, raw, None)  # partial results survive a later model's crash
    write(rows, out, raw, png)
    print(summary(rows))
    print(f"wrote {out}, {raw}" + (f", {png}" if png.exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
