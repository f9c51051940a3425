"""The three benchmark scripts run end to end on their ``--quick`` lists, as subprocesses (as a user runs them).

Each script runs once per session; the fxprune checks and the
Torch-Pruning checks are separate tests, so a machine without ``torch-pruning``
(``pip install -e .[bench]``) skips only the latter, with the reason. timm rows
are left out of the coverage run when timm is not installed.

The scripts the selected tests need start together, two at a time, each at one torch thread, when the first of
those tests runs (``scripts``): a script spends much of its time importing torch on one core, and the suite has a
10-minute budget on 2 cores. Their timings are not asserted (only that each was measured).

Example::

    python -m pytest -q tests/test_benchmarks.py     # 112 s on the quiet 2-core machine (192 s one script at a time)

Also the Hugging Face sweep on LLaMA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HAS_TP = importlib.util.find_spec("torch_pruning") is not None
HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None
NO_TP = "torch-pruning is not installed (pip install -e .[bench]): the Torch-Pruning columns are skipped"
LIBRARIES = "fxprune,torch-pruning" if HAS_TP else "fxprune"


def _run(script: str, *args, timeout: float) -> str:
    cmd = [sys.executable, str(BENCH / script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two scripts share the 2 cores (module docstring)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _rows(log: Path) -> list[dict]:
    """Every record of a log: its run header (``{"@run": ...}``), rows, and end record (``{"@end": ...}``)."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def _measured(log: Path) -> list[dict]:
    """The rows of a log, without its run headers and end records."""
    return [r for r in _rows(log) if "@run" not in r and "@end" not in r]


def _quick_models() -> list[str]:
    sys.path.insert(0, str(BENCH))
    try:
        import zoo
    finally:
        sys.path.remove(str(BENCH))
    return [m for m in zoo.QUICK
            if (HAS_TIMM or not m.startswith("timm:")) and (HAS_HF or not m.startswith("hf:"))]


def _transformers_version() -> tuple[int, int]:
    import transformers

    return tuple(int(v) for v in transformers.__version__.split(".")[:2])


def _why_not(name: str) -> str | None:
    """Why script run ``name`` cannot run here (its tests skip with this reason), else None."""
    if name in ("speed", "hf_sweep", "checkpoint") and not HAS_HF:
        return "transformers is not installed: the run builds transformers models"
    if name == "checkpoint" and _transformers_version() < (5, 4):
        return "prune_checkpoint analyses a LLaMA on the meta device: transformers >= 5.4"
    if name == "checkpoint" and not HAS_TP:
        return NO_TP
    if name == "digits" and importlib.util.find_spec("sklearn") is None:
        return "scikit-learn is not installed: the digits task loads sklearn.datasets.load_digits"
    if name == "ecosystem" and not HAS_TIMM:
        return "timm is a benchmark extra (pip install timm)"
    return None


# name: (script, its arguments given its folder, timeout s, the tests that read it); the longest runs first
SCRIPTS = {
    "speed": ("speed.py", lambda d: ["--quick", "--libraries", LIBRARIES, "--step-timeout", 120, "--out",
                                     d / "speed.md", "--log", d / "speed.jsonl"], 400,
              {"test_speed_quick_fxprune_times_memory_and_meta_analysis", "test_speed_quick_torch_pruning_rows_and_ratios"}),
    "coverage": ("coverage.py", lambda d: ["--quick", "--models", ",".join(_quick_models()), "--libraries", LIBRARIES,
                                           "--step-timeout", 120, "--out", d / "coverage.md", "--log",
                                           d / "coverage.jsonl"], 400,
                 {"test_coverage_quick_fxprune_prunes_runs_and_is_exact", "test_coverage_quick_torch_pruning_column"}),
    "checkpoint": ("checkpoint_streaming.py", lambda d: ["--sizes", "tiny", "--calibration", "4x16", "--torch-pruning",
                                                         "--step-timeout", "240", "--tmp", d, "--out", d / "c.md"],
                   600, {"test_checkpoint_streaming_tiny_rows"}),
    "latency": ("latency.py", lambda d: ["--quick", "--out", d / "latency_cpu.md"], 300,  # --raw, --plot: md's stem
                {"test_latency_quick_writes_table_and_plot"}),
    "digits": ("quality.py", lambda d: ["--quick", "--tasks", "digits", "--log", d / "quality.jsonl", "--out",
                                        d / "quality.md"], 600, {"test_quality_quick_digits_rows"}),
    "hf_sweep": ("hf_sweep.py", lambda d: ["--models", "llama", "--sizes", "num_key_value_heads=1", "--step-timeout",
                                           200, "--out", d / "hf_sweep.md"], 600,
                 {"test_hf_sweep_llama_passes_every_fxprune_check"}),
    "ecosystem": ("ecosystem.py", lambda d: ["--cases", "timm-features", "--libraries", LIBRARIES, "--step-timeout",
                                             120, "--out", d / "ecosystem.md"], 400,
                  {"test_ecosystem_timm_features_row_checks_both_libraries"}),
}


@pytest.fixture(scope="module")
def scripts(request, tmp_path_factory):
    """``scripts(name)``: the stdout and folder of script run ``name`` of SCRIPTS, waiting for it; the runs that
    the session's selected tests of this module need start at the first call, two at a time."""
    selected = {item.originalname for item in request.session.items if getattr(item, "module", None) is request.module}
    tmp = tmp_path_factory.mktemp("scripts")
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {}
    for name, (script, arguments, timeout, tests) in SCRIPTS.items():
        if tests & selected and _why_not(name) is None:
            (tmp / name).mkdir()
            runs[name] = pool.submit(_run, script, *arguments(tmp / name), timeout=timeout)

    def result(name: str) -> tuple[str, Path]:
        reason = _why_not(name)
        if reason:
            pytest.skip(reason)
        return runs[name].result(), tmp / name

    yield result
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def coverage(scripts):
    _, folder = scripts("coverage")
    return _quick_models(), _measured(folder / "coverage.jsonl"), (folder / "coverage.md").read_text()


def test_coverage_quick_fxprune_prunes_runs_and_is_exact(coverage):
    models, rows, text = coverage
    assert [r["model"] for r in rows] == models
    for r in rows:
        fx = r["fxprune"]
        assert fx["status"] == "ok", (r["model"], fx)
        assert 0 < fx["macs_kept"] < 0.6, (r["model"], fx["macs_kept"])  # ratio 0.5 of every group
        assert r["oracle"]["status"] == "exact", (r["model"], r["oracle"])
    assert f"**fxprune {len(models)}/{len(models)}, Torch-Pruning" in text
    assert "| tv:resnet18 | 1x3x64x64 | ok |" in text


def test_coverage_quick_torch_pruning_column(coverage):
    if not HAS_TP:
        pytest.skip(NO_TP)
    _, rows, text = coverage
    by_model = {r["model"]: r["torch-pruning"] for r in rows}
    assert all("status" in result for result in by_model.values())
    # its README example: the recipe must give Torch-Pruning resnet18 (same output shape, about a quarter of the MACs)
    assert by_model["tv:resnet18"]["status"] == "ok", by_model["tv:resnet18"]
    assert 0.2 < by_model["tv:resnet18"]["macs_kept"] < 0.35
    assert "Torch-Pruning not installed" not in text


@pytest.fixture(scope="module")
def speed(scripts):
    _, folder = scripts("speed")  # the quick cases include BERT and LLaMA
    return _measured(folder / "speed.jsonl"), (folder / "speed.md").read_text()


def test_speed_quick_fxprune_times_memory_and_meta_analysis(speed):
    rows, text = speed
    fx = {r["case"]: r for r in rows if r["library"] == "fxprune"}
    assert set(fx) == {"resnet18", "bert-tiny", "llama-tiny-meta"}
    for case in ("resnet18", "bert-tiny"):
        r = fx[case]
        assert r["analysis_s"] > 0 and r["prune_s"] > 0 and r["shapes_kept"], r
        assert r["analysis_py_mb"] > 0 and r["prune_py_mb"] > 0 and "analysis_rss_mb" in r
    passes = {"capture", "propagate", "decompose", "relate", "solve"}  # CPU seconds per pass, both analyses
    assert set(fx["bert-tiny"]["analysis_passes_cpu_s"]) == set(fx["bert-tiny"]["graph_analysis_passes_cpu_s"]) == passes
    assert fx["bert-tiny"]["graph_shapes"] == "dynamic" and fx["bert-tiny"]["graph_analysis_s"] > 0
    assert "### fxprune's passes (CPU seconds" in text
    # resnet18 loses every hidden width; BertModel returns its hidden states, so only heads and MLP shrink
    assert fx["resnet18"]["params_kept"] < 0.6 and fx["bert-tiny"]["params_kept"] < 0.8
    meta = fx["llama-tiny-meta"]
    assert meta["meta"] and meta["analysis_s"] > 0 and "prune_s" not in meta and meta["analysis_py_mb"] > 0
    assert "ok (analysis only, meta device)" in text


def test_speed_quick_torch_pruning_rows_and_ratios(speed):
    if not HAS_TP:
        pytest.skip(NO_TP)
    rows, text = speed
    tp = {r["case"]: r for r in rows if r["library"] == "torch-pruning"}
    assert tp["resnet18"]["shapes_kept"] and tp["resnet18"]["prune_s"] > 0
    ratios = text.split("### Ratios fxprune / Torch-Pruning")[1]
    resnet = next(line for line in ratios.splitlines() if line.startswith("| resnet18 |"))
    cells = [c.strip() for c in resnet.split("|")[2:-1]]
    assert len(cells) == 6 and all(float(c) > 0 for c in cells), resnet  # six ratios, all measured


def test_latency_quick_writes_table_and_plot(scripts):
    out, folder = scripts("latency")
    md, png = folder / "latency_cpu.md", folder / "latency_cpu.png"
    text = md.read_text()
    assert "Measured " in text and " UTC on CPU " in text and "dtype float32" in text
    rows = _rows(folder / "latency_cpu.jsonl")
    models = ["resnet18"] + (["llama-tiny"] if HAS_HF else [])
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        # the original, then ratios 0.3 and 0.6 with the defaults and with round_to=1
        assert [(r["setting"], r["ratio"]) for r in mine] == [("original", 0.0)] + [
            (s, ratio) for s in ("defaults", "round_to=1") for ratio in (0.3, 0.6)], mine
        assert all("error" not in r for r in mine), mine
        macs = [r["macs"] for r in mine]
        assert macs[0] > macs[1] > macs[2] and macs[0] > macs[3] > macs[4]
        labels = ["b1", "b4"] if model == "resnet18" else ["1x16", "2x16"]
        for r in mine:
            assert list(r["ms"]) == labels and all(ms > 0 for ms in r["ms"].values())
            assert r["speedup"] == pytest.approx({k: mine[0]["ms"][k] / v for k, v in r["ms"].items()})
        section = text.split(f"### {model}")[1].split("\n### ")[0]
        lines = [line for line in section.splitlines() if line.startswith("| 0.")]
        assert len(lines) == 5 and all(len(line.split("|")) == 2 + 6 + 2 * 2 + 1 for line in lines)
        for line, r in zip(lines, mine):  # the last column flags a pruned model slower than the original
            assert ("slower at" in line) == any(sp < 1 for sp in r["speedup"].values())
    assert "defaults: slower than the original:" in out
    again = folder / "merged.md"  # --from-raw rebuilds the same tables from the raw rows
    _run("latency.py", "--from-raw", folder / "latency_cpu.jsonl", "--out", again, timeout=120)
    assert again.read_text().split("\n###", 1)[1] == text.split("\n###", 1)[1]
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 10_000


def test_latency_llama_7b_config_is_7b_class_on_meta():
    if not HAS_HF:
        pytest.skip("transformers is not installed")
    import torch
    import transformers

    sys.path.insert(0, str(BENCH))
    import latency

    config, seq = latency.LLAMA["llama-7b"]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    params = sum(p.numel() for p in model.parameters())
    assert 7.0e9 < params < 7.5e9 and seq == 1024  # Mistral-7B's shape: 7.24B
    # prefill MACs of one sequence: about params x tokens (less the embedding and the LM head), plus attention
    linear = params - 2 * 32000 * 4096 - 65 * 4096  # embedding, LM head and the norms
    assert latency.llama_macs(model, seq) == linear * seq + 32000 * 4096 + 32 * 2 * seq * seq * 4096


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_quality_quick_digits_rows(scripts):
    """The quality benchmark's digits task end to end (4 training epochs, two fxprune rows, Torch-Pruning's)."""
    _, folder = scripts("digits")
    log = folder / "quality.jsonl"
    rows = {r["row"]: r for r in _measured(log)}
    assert rows["unpruned"]["accuracy"] > 0.9
    for name in ("L2", "activation + reconstruct"):
        assert abs(rows[name]["MACs kept"] - 0.5) < 0.03, rows[name]
    # no fine-tuning: plain L2 at half the MACs is near chance, the refit keeps most of the accuracy
    assert rows["activation + reconstruct"]["accuracy"] > rows["L2"]["accuracy"] + 0.3, rows
    if HAS_TP:
        assert "Torch-Pruning L2" in rows
    assert "| activation + reconstruct |" in (folder / "quality.md").read_text()


def test_tiny_lm_text_splits_are_disjoint():
    """Calibration and evaluation text of the small language model never share a topic (nor training text)."""
    sys.path.insert(0, str(BENCH))
    import tiny_lm

    training, calibration, evaluation = tiny_lm._split_topics()
    assert training and calibration and evaluation
    assert not (set(training) & set(calibration) or set(training) & set(evaluation) or
                set(calibration) & set(evaluation))
    assert tiny_lm.calibration_windows(4, 32).shape == (4, 32) == tiny_lm.evaluation_windows(4, 32).shape


@pytest.mark.skipif(not HAS_HF, reason="transformers is not installed: the scale benchmark plans a LLaMA")
def test_scale_plan_times_every_phase_of_a_tiny_meta_llama():
    # the 70B plan's function on the 2-layer config, in process: every phase timed, the plan made on meta weights
    sys.path.insert(0, str(BENCH))
    try:
        import scale
    finally:
        sys.path.remove(str(BENCH))
    model, args = scale.build_meta_llama(scale.LLAMA_TINY)
    row = scale.time_plan(model, args)
    assert list(row["phases"]) == list(scale.PHASES)
    for phase in row["phases"].values():
        assert phase["wall_s"] >= 0 and phase["cpu_s"] >= 0 and phase["rss_peak_mb"] >= 0
    assert row["phases"]["capture"]["cpu_s"] > 0 and row["cpu_s"] >= row["phases"]["capture"]["cpu_s"]
    assert row["reused_export_shapes"] and row["prunable"] > 0 and row["removed_units"] > 0
    assert model.model.layers[0].mlp.up_proj.weight.shape == (128, 64)  # planned, not rewritten
    text = scale.plan_table([dict(row, mode="plan-70b", config="llama-tiny", layers=2, capture="static",
                                  params_b=0.0, build_s=0.0, process_rss_peak_mb=1.0, worker_s=1.0)])
    assert all(f"| {phase} |" in text for phase in scale.PHASES + ("total",))


def test_checkpoint_streaming_tiny_rows(scripts):
    """The checkpoint benchmark end to end on a tiny LLaMA (one key/value head: Torch-Pruning loops forever on two
    query heads per key/value head, tp_hang.md), in one run (the suite's time): fxprune's calibrated layer-by-layer
    path and the loaded reference, and Torch-Pruning's, measured under the same limit; Torch-Pruning's model runs
    and is smaller; the report is rendered from the log."""
    out, folder = scripts("checkpoint")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["method"].split("(")[0] for r in rows] == ["prune_checkpoint", "from_pretrained + prune",
                                                         "Torch-Pruning LLM recipe "]
    assert all("error" not in r and r["seconds"] > 0 and r["shards"] >= 2 for r in rows[:2]), rows
    tp = rows[2]
    if "error" in tp:  # not started where less memory is free than the step asks for
        assert tp["class"] == "memory" and tp["error"].startswith("not run: needs about 8 GB"), tp
    else:
        assert tp["runs"] and tp["parameters_after"] < tp["parameters"], tp
    text = (folder / "c.md").read_text()
    assert "Gram matrices" in text and "at most 240 s" in text
    logged = [r for r in map(json.loads, (folder / "c.jsonl").read_text().splitlines()) if "@run" not in r
              and "@end" not in r]
    assert [r["method"] for r in logged] == [r["method"] for r in rows]


def test_hf_sweep_llama_passes_every_fxprune_check(scripts):
    """The Hugging Face sweep on LLaMA (one key/value head: Torch-Pruning loops forever on two query heads per
    key/value head, tp_hang.md): one row, every fxprune check a ✓, Torch-Pruning's recipe runs, one limit."""
    _, folder = scripts("hf_sweep")
    out, log = folder / "hf_sweep.md", folder / "hf_sweep.jsonl"
    records = _rows(log)
    assert records[0]["@run"]["sizes"] == {"num_key_value_heads": 1} and "@end" in records[-1]
    rows, text = records[1:-1], out.read_text()
    assert [r["model"] for r in rows] == ["llama"]
    row = rows[0]
    for check in ("analysis", "oracle", "prune", "prune_other", "inplace", "reload", "generate"):
        assert row[check]["status"] == "ok", (check, row[check])
    assert row["reload"]["relative_diff"] <= 1e-5 and 0 < row["inplace"]["params_kept"] < 0.8
    header = next(line for line in text.splitlines() if line.startswith("| model type |"))
    for column in ("analysis", "oracle", "prune", "other batch/length", "in place", "reload", "generate",
                   "Torch-Pruning", "params kept fxprune", "params kept Torch-Pruning", "plain from_pretrained",
                   "portable=True: plain from_pretrained", "params kept portable"):
        assert f"| {column} |" in header, column
    # pruned with portable=True, saved, reloaded by LlamaForCausalLM.from_pretrained alone: the same outputs
    assert row["portable"]["class"] == "ok" and row["portable"]["relative_diff"] <= 1e-5, row["portable"]
    assert 0 < row["portable"]["params_kept"] < 0.8
    assert "Reloaded by plain from_pretrained (no fxprune at load time): " in text
    assert "| llama | decoder | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ |" in text
    assert "**fxprune: 1/1 all checks; Torch-Pruning: " in text
    assert "at most 200 s (--step-timeout)" in text
    if HAS_TP:
        assert row["torch-pruning"]["class"] == "ok", row["torch-pruning"]
        assert 0 < row["torch-pruning"]["params_kept"] < 0.8
    else:
        assert row["torch-pruning"]["status"] == "skipped"


def test_ecosystem_timm_features_row_checks_both_libraries(scripts):
    """The ecosystem benchmark on one row (timm ``features_only``): both libraries prune in place under the same
    limit, every check is logged with its class, fxprune's caller-forward check and reload pass, and the report
    is rendered from the log."""
    _, folder = scripts("ecosystem")
    out, log = folder / "ecosystem.md", folder / "ecosystem.jsonl"
    records = _rows(log)
    assert "@run" in records[0] and "@end" in records[-1]
    (row,) = _measured(log)
    fx = row["fxprune"]
    assert fx["class"] in ("ok", "error"), fx  # the library's own loader rebuilds resnet18 at full width
    for check in ("outputs", "pruned", "class", "own", "reload_pruner"):
        assert fx["checks"][check]["status"] == "ok", (check, fx["checks"][check])
    assert fx["macs_kept"] < 0.9 and fx["returned_caller"]
    text = out.read_text()
    assert "| timm features_only | fxprune |" in text and "at most 120 s (--step-timeout)" in text
    if HAS_TP:
        assert set(row["torch-pruning"]["checks"]) == {"outputs", "pruned", "class", "reload", "reload_pruner"}
    else:
        assert row["torch-pruning"]["status"] == "skipped"
