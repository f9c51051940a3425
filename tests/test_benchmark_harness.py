"""The benchmarks' shared rules, in process and fast: one time limit for every library, failures sorted into
classes, every report rendered from its log, and Torch-Pruning's recipe telling every attention module its heads.

Example::

    python -m pytest -q tests/test_benchmark_harness.py     # about 20 s on 2 cores
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
harness = importlib.import_module("harness")
results = importlib.import_module("results")

HAS_TP = importlib.util.find_spec("torch_pruning") is not None


def test_one_step_limit_for_every_library_in_every_benchmark():
    """No script has a time limit of its own for one library (the old ``--tp-timeout`` and ``TP_SECONDS``), and every
    script that compares the libraries takes its limit from the harness."""
    for script in BENCH.glob("*.py"):
        text = script.read_text()
        assert "tp-timeout" not in text and "TP_SECONDS" not in text, script.name
    for name in ("coverage", "hf_sweep", "speed", "quality", "checkpoint_streaming"):
        assert f'harness.step_seconds("{name}"' in (BENCH / f"{name}.py").read_text(), name
    assert harness.step_seconds("hf_sweep", "llama") == harness.STEP_SECONDS == 300
    assert harness.step_seconds("checkpoint_streaming", "7b") == 900  # a case that needs more, with its reason
    assert harness.step_seconds("checkpoint_streaming", "7b", 12) == 12  # --step-timeout: for every library
    assert all(why for _, why in harness.LONGER_STEPS.values())
    assert "7b: 900 s" in harness.limits_note("checkpoint_streaming", ["1b", "7b"])


def test_a_step_past_its_limit_is_a_timeout_with_its_time():
    def spin():
        while True:
            time.sleep(0.01)

    start = time.perf_counter()
    with harness.time_limit(0.3):
        row = harness.guarded(spin)
    assert time.perf_counter() - start < 5
    assert row["class"] == "timeout" and row["step_s"] >= 0.25 and "timed out after 0 s" in row["reason"]
    assert harness.describe_failure(row).startswith("timeout: ran 0 s")


def test_an_exception_is_an_error_naming_where_it_was_raised():
    def fail():
        raise IndexError("index 64 is out of bounds")

    row = harness.guarded(fail)
    assert row["class"] == "error" and row["reason"] == "IndexError: index 64 is out of bounds"
    assert row["where"].startswith("tests/test_benchmark_harness.py:") and row["where"].endswith("in fail")


def test_outputs_classified_shape_changed_and_non_finite():
    measure = importlib.import_module("measure")
    ok = harness.classify_outputs((torch.ones(2, 3), torch.ones(2, 4)), [[2, 3], [2, 4]], measure)
    assert ok["class"] == "ok"
    shape = harness.classify_outputs((torch.ones(2, 3), torch.ones(2, 5)), [[2, 3], [2, 4]], measure)
    assert shape["class"] == "shape changed" and "[2, 5]" in shape["reason"]
    # only the first output is checked where only its shape is promised (a model pruned in place)
    assert harness.classify_outputs((torch.ones(2, 3), torch.ones(2, 5)), [[2, 3], [2, 4]], measure,
                                    first_only=True)["class"] == "ok"
    nan = harness.classify_outputs(torch.tensor([1.0, float("nan")]), [[2]], measure)
    assert nan["class"] == "wrong output" and "non-finite" in nan["reason"]


def test_classes_of_rows_logged_before_classes():
    assert harness.failure_class({"status": "error", "reason": "StepLimit: timed out after 60 s"}) == "timeout"
    assert harness.failure_class({"status": "error", "reason": "memory above 8 GiB"}) == "memory"
    assert harness.failure_class({"status": "shape changed", "reason": "[[1]] != [[2]]"}) == "shape changed"
    assert harness.failure_class({"status": "inexact"}) == "wrong output"
    assert harness.failure_class({"status": "forward failed", "reason": "RuntimeError: shape"}) == "error"
    assert harness.failure_class({"status": "exact"}) == "ok"


def test_log_runs_and_the_latest_row_per_model(tmp_path):
    path = tmp_path / "x.jsonl"
    first = harness.Log(path, harness.run_header("x.py", ["--a"], "first run"))
    first.write({"model": "a", "v": 1})
    first.write({"model": "b", "v": 2})
    first.finish(wall_s=60.0)
    again = harness.Log(path, harness.run_header("x.py", ["--redo", "b"]), mode="a")
    again.write({"model": "b", "v": 3})
    runs = harness.read_runs(path)
    assert [r["header"]["command"] for r in runs] == ["python benchmarks/x.py --a", "python benchmarks/x.py --redo b"]
    assert runs[0]["end"]["wall_s"] == 60.0 and runs[1]["end"] == {}
    rows, source = harness.latest_rows(runs, "model")
    assert rows == [{"model": "a", "v": 1}, {"model": "b", "v": 3}] and source == {"a": 0, "b": 1}
    text = harness.describe_runs(runs, "model")
    assert "rows kept from it: 1 (a)" in text and "rows kept from it: 1 (b)" in text and "first run" in text
    harness.Log(path, harness.run_header("x.py", []))  # mode "w": a new log
    assert len(harness.read_runs(path)) == 1


def test_hf_sweep_and_coverage_reports_render_classes_from_a_log(tmp_path):
    hf_sweep, coverage = importlib.import_module("hf_sweep"), importlib.import_module("coverage")
    path = tmp_path / "hf.jsonl"
    log = harness.Log(path, harness.run_header("hf_sweep.py", [], step_limit_note="Limits."))
    ok = {"status": "ok", "class": "ok"}
    row = {"model": "llama", "kind": "decoder", **{c: dict(ok) for c in hf_sweep.CHECKS},
           "torch-pruning": {**harness.failed("timeout", "timed out after 300 s"), "step_s": 300.2}}
    log.write(row)
    log.write({**row, "model": "opt", "torch-pruning": {**harness.failed("error", "forward failed: RuntimeError: x",
                                                                         stage="forward"), "prune_s": 0.1}})
    text = hf_sweep.render(harness.read_runs(path))
    assert "| llama | decoder | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ | ✗ timeout |" in text
    assert "**Torch-Pruning**: 2 failing (1 timeout, 1 error):" in text
    assert "- llama: timeout: ran 300 s (timed out after 300 s)" in text
    assert "**fxprune: 2/2 all checks; Torch-Pruning: 0/2 runs**" in text
    path = tmp_path / "coverage.jsonl"
    log = harness.Log(path, harness.run_header("coverage.py", []))
    log.write({"model": "tv:resnet18", "input": [[1, 3, 64, 64]],
               "fxprune": {"status": "ok", "class": "ok", "prune_s": 1.0, "macs_kept": 0.3},
               "oracle": {"status": "exact", "class": "ok", "oracle_diff": 1e-7},
               "torch-pruning": {**harness.failed("memory", "memory above 8 GiB"), "step_s": 12.0}})
    text = coverage.render(harness.read_runs(path))
    assert "| tv:resnet18 | 1x3x64x64 | ok | 30% | 1e-07 | 1.0 | memory |  | (12) |" in text
    assert "**Torch-Pruning**: 1 failing (1 memory):" in text


def test_speed_report_gives_medians_of_the_repeats(tmp_path):
    speed = importlib.import_module("speed")
    path = tmp_path / "speed.jsonl"
    log = harness.Log(path, harness.run_header("speed.py", [], threads=2))
    for repeat, seconds in enumerate((3.0, 1.0, 2.0)):
        log.write({"case": "resnet18", "library": "fxprune", "params": 1e7, "analysis_s": seconds, "prune_s": 1.0,
                   "shapes_kept": True, "repeat": repeat})
    text = speed.render(harness.read_runs(path))
    assert "median over 3 repeats" in text
    assert "| resnet18 | 10.0M | fxprune | 2.00 |" in text  # the median, not the last repeat (2.0 of 3.0, 1.0, 2.0)


def test_quality_and_recovery_reports_show_every_run_of_a_log_measured_in_parts(tmp_path):
    """A subset measured as several runs (``--append``) renders as one report: every run named, every task's table,
    a later row replacing an earlier one of the same task, method and ratio."""
    quality, recovery = importlib.import_module("quality"), importlib.import_module("recovery")
    path = tmp_path / "quality.jsonl"
    first = harness.Log(path, harness.run_header("quality.py", ["--tasks", "minilm"], threads=1, ratio=0.3))
    first.write({"task": "minilm:english", "row": None, "meta": {"calibration": "general English, 16 sentences"}})
    first.write({"task": "minilm:english", "row": "L2", "everyday: everyday sentences": 0.61})
    first.write({"task": "minilm:english", "row": "obs + reconstruct", "everyday: everyday sentences": 0.81})
    first.finish(wall_s=60.0)
    again = harness.Log(path, harness.run_header("quality.py", ["--tasks", "lm", "--append"], threads=1), mode="a")
    again.write({"task": "minilm:english", "row": "obs + reconstruct", "everyday: everyday sentences": 0.83})
    again.write({"task": "lm:english", "row": "L2", "ratio": 0.2, "other text: reference": 1.07})
    again.write({"task": "minilm:english@4096", "row": "obs + reconstruct", "everyday: everyday sentences": 0.85})
    text = quality.render(harness.read_runs(path))
    assert "calibrated on general English (fortunes), 4096 sentences\n" in text  # another count: its own table
    assert "| obs + reconstruct | 0.8500 |" in text and "(4096 sentences): everyday 0.85" in quality.summary(
        harness.read_runs(path))
    assert "--tasks minilm`" in text and "--tasks lm --append`" in text and "general English, 16 sentences" in text
    assert "| obs + reconstruct | 0.8300 |" in text and "0.8100" not in text and "| L2 | 0.2000 | 1.0700 |" in text
    assert "everyday 0.83 (obs + reconstruct)" in quality.summary(harness.read_runs(path))

    path = tmp_path / "recovery.jsonl"
    first = harness.Log(path, harness.run_header("recovery.py", ["--tasks", "minilm"], threads=1))
    first.write({"task": "minilm", "ratio": 0.3, "budget (CPU s)": 300, "everyday (other)": 0.93})
    again = harness.Log(path, harness.run_header("recovery.py", ["--tasks", "lm", "--append"], threads=1), mode="a")
    again.write({"task": "lm", "ratio": 0.5, "budget (CPU s)": 300, "general English (other)": 1.12})
    runs = harness.read_runs(path)
    text = recovery.render(runs)
    assert "### all-MiniLM" in text and "### small LLaMA" in text and "--tasks lm --append`" in text
    assert recovery.summary(runs) == ("minilm at 30%, everyday (other): 300 CPU s: 0.930; "
                                      "lm at 50%, general English (other): 300 CPU s: 1.120.")


def test_results_rebuilds_every_report_that_has_a_log():
    """Every script that renders a report is in results.REPORTS, and every report in benchmarks/ is one of REPORTS
    (rendered from its log) or prose without measurements."""
    listed = {script for _, _, script, _, _ in results.REPORTS}
    for script in BENCH.glob("*.py"):
        if re.search(r"^def render\(runs", script.read_text(), re.M):
            assert script.stem in listed, script.name
    reports = {report for report, *_ in results.REPORTS}
    prose = {"RESULTS.md", "README_torchvision.md", "results_notes.md", "latency.md"}
    for md in BENCH.glob("*.md"):
        assert md.name in reports or md.name in prose, md.name


def _tiny(family: str):
    import transformers

    sizes = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 ffn_dim=128, max_position_embeddings=64, num_heads=4, attention_types=[[["global"], 2]],
                 dim=64, hidden_dim=128, n_layers=2, n_heads=4, pad_token_id=0)
    config = transformers.AutoConfig.for_model(family, **{k: v for k, v in sizes.items()
                                                          if hasattr(transformers.AutoConfig.for_model(family), k)})
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


@pytest.mark.parametrize("family", ["gpt_neo", "opt", "distilbert"])
def test_tp_recipe_tells_every_attention_its_heads_and_the_pruned_model_runs(family):
    """GPT-Neo and OPT read ``self.num_heads``, DistilBERT names its projections ``q_lin``: the recipe finds each
    attention module, gives Torch-Pruning its heads, and sets the head counts after pruning, so the model runs."""
    if not HAS_TP:
        pytest.skip("torch-pruning is not installed (pip install -e .[bench])")
    pytest.importorskip("transformers")
    tp_recipe = importlib.import_module("tp_recipe")
    model = _tiny(family)
    attentions = tp_recipe.attention_modules(model)
    assert len(attentions) == 2 and all(a.heads == 4 and a.head_dim == 16 for a in attentions)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)[0].shape
    tp_recipe.prune(f"hf:{family}", model, (ids,), {}, 0.5, outputs="first")
    heads = [tp_recipe._int_attr(a.module, tp_recipe.HEADS) for a in attentions]
    widths = [a.q.out_features for a in attentions]
    assert all(h * 16 == w for h, w in zip(heads, widths)) and min(heads) < 4, (heads, widths)
    with torch.no_grad():
        assert model(ids)[0].shape == before
