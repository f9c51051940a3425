"""The documents say what the code does: docs/ARCHITECTURE.md names only modules and keys that exist, the README's
first screen holds the set-up commands and a use example that runs as written, its ``prune`` signature is the
code's, and its generated benchmark block is what the logs give.

Runs in about 10 s on 2 cores (the README's use example prunes a ResNet-50 at 224 px: most of it).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

import torch

import fxprune
from tests import models

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
INSTALL = 'pip install -c constraints.txt -e ".[dev]" && python examples/prune_resnet.py'
TESTS = "python -m pytest -q"


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _library_source() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "fxprune").rglob("*.py"))


def test_architecture_is_a_short_map():
    lines = ARCHITECTURE.read_text().splitlines()
    assert len(lines) <= 300, f"docs/ARCHITECTURE.md has {len(lines)} lines: move details into module docstrings"
    assert max(len(line) for line in lines) <= 400, "a table row grew into a log: move it into the module docstring"


def _unresolved_paths(doc: Path, bare_names_too: bool) -> list[str]:
    """Backticked ``something.py`` (or ``.sh``) names of ``doc`` that exist nowhere: a name is a path from the
    repository root, from ``fxprune/``, or from a ``fxprune/...`` folder named on the same line (the layout
    table's rows); a ``tests/x.py::test`` reference must name a test that exists. Bare names (no folder) count
    only with ``bare_names_too``."""
    missing = []
    for line in doc.read_text().splitlines():
        folders = [ROOT / f for f in re.findall(r"`(fxprune/[\w/]*)`", line)]
        for name, test in re.findall(r"`([\w./-]+\.(?:py|sh))(?:::(\w+))?`", line):
            candidates = [ROOT / name, ROOT / "fxprune" / name, *(f / name for f in folders)]
            found = next((c for c in candidates if c.exists()), None)
            if found is None and (bare_names_too or "/" in name):
                missing.append(name)
            elif found is not None and test and f"def {test}(" not in found.read_text():
                missing.append(f"{name}::{test}")
    return missing


def test_every_module_path_in_the_architecture_map_exists():
    missing = _unresolved_paths(ARCHITECTURE, bare_names_too=True)
    assert not missing, f"docs/ARCHITECTURE.md names what the repository does not hold: {missing}"


def test_every_path_in_the_readme_and_docs_exists():
    missing = {doc.name: m for doc in DOCS if (m := _unresolved_paths(doc, bare_names_too=False))}
    assert not missing, f"named in the docs but not in the repository: {missing}"


def test_every_meta_key_named_in_the_docs_is_used_by_the_code():
    source = _library_source()
    unused = sorted({key for doc in DOCS for key in re.findall(r"`[^`]*?\b(fxprune_[a-z_]+)\b[^`]*`", doc.read_text())
                     if key not in source})
    assert not unused, f"keys the docs name that no module of fxprune/ uses: {unused}"


def test_readme_first_screen_has_purpose_setup_and_use():
    first = "\n".join(README.read_text().splitlines()[:60])
    assert "structural pruning" in first.lower()
    assert INSTALL in _code_blocks(first, "bash")[0]
    assert any(TESTS in block for block in _code_blocks(first, "bash"))
    assert any("fxprune.prune(" in block for block in _code_blocks(first, "python"))


def test_readme_install_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-c constraints.txt -e ".[dev]"' in ci and (ROOT / "constraints.txt").exists()
    assert (ROOT / "examples" / "prune_resnet.py").exists()


def _readme_signature() -> ast.arguments:
    block = next(b for b in _code_blocks(README.read_text(), "python") if b.lstrip().startswith("fxprune.prune(model"))
    source = "def " + block.strip().removeprefix("fxprune.") + ": pass"
    return ast.parse(source).body[0].args


def test_readme_prune_signature_is_the_code_s():
    args = _readme_signature()
    written = [(a.arg, "positional") for a in args.args] + [(a.arg, "keyword") for a in args.kwonlyargs]
    defaults = dict(zip([a.arg for a in args.args][len(args.args) - len(args.defaults):],
                        [ast.literal_eval(d) for d in args.defaults]))
    defaults.update({a.arg: ast.literal_eval(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
    actual = inspect.signature(fxprune.prune).parameters.values()
    kind = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional", inspect.Parameter.KEYWORD_ONLY: "keyword"}
    assert written == [(p.name, kind[p.kind]) for p in actual]
    assert defaults == {p.name: p.default for p in actual if p.default is not inspect.Parameter.empty}


def test_readme_parameter_table_names_every_parameter():
    text = README.read_text()
    table = text[text.index("| parameter | meaning |"):]
    table = table[:table.index("\n\n")]
    named = set(re.findall(r"`(\w+)`", "\n".join(row.split("|")[1] for row in table.splitlines()[2:])))
    assert named == set(inspect.signature(fxprune.prune).parameters)


def test_readme_use_example_runs_as_written(tmp_path, monkeypatch):
    text = README.read_text()
    use = text[text.index("## Use"):]
    block = _code_blocks(use, "python")[0]
    monkeypatch.chdir(tmp_path)
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace: dict = {}
        exec(compile(block, "README.md (Use)", "exec"), namespace)
    (macs0, params0), (macs1, params1) = printed[0]
    assert 0.2 < macs1 / macs0 < 0.35 and params1 < params0
    assert (tmp_path / "resnet50-pruned").is_dir()


def test_readme_generated_blocks_are_what_the_logs_give():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import harness
        import results
        _check_generated_blocks(results, harness)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _check_generated_blocks(results, harness):
    text = README.read_text()
    assert text.count(results.BEGIN) == 1 and text.count(results.END) == 1
    block = text.split(results.BEGIN, 1)[1].split(results.END, 1)[0].strip()
    assert block == results.readme_block(ROOT / "benchmarks").strip(), \
        "run `python benchmarks/results.py --readme`"
    for begin, end, log, script, function in results.README_BLOCKS:  # the other generated blocks, from their logs
        assert text.count(begin) == 1 and text.count(end) == 1, begin
        module = importlib.import_module(script)
        expected = getattr(module, function)(harness.read_runs(ROOT / "benchmarks" / log)).strip()
        assert text.split(begin, 1)[1].split(end, 1)[0].strip() == expected, "run `python benchmarks/results.py --readme`"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_local_links_in_the_docs_resolve():
    """Every relative link names a file that exists and, with a ``#anchor``, a heading of that file."""
    broken = []
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", doc.read_text()):
            path = doc.parent / target if target else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and path.suffix == ".md":
                headings = {_slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}
                if anchor not in headings:
                    broken.append(f"{doc.name}: {target}#{anchor}")
    assert not broken, broken


def test_worked_example_end_to_end():
    """Every value docs/ARCHITECTURE.md states in its worked example, stage by stage."""
    torch.manual_seed(0)
    model = models.WorkedExample().eval()
    x = torch.randn(1, 3, 4, 4)
    dg = fxprune.analyze(model, (x,))
    nodes = {n.name: n for n in dg.gm.graph.nodes}
    # capture
    assert list(nodes) == ["x", "conv1", "bn1", "relu", "conv2", "add", "flatten", "fc", "output"]
    shapes = dg.gm.meta["fxprune_input_shapes"]
    assert shapes["capture"] == "torch.fx.symbolic_trace"
    assert [(d["input"], d["axis"], d["role"], d["size"], d["static"]) for d in shapes["dims"]] == \
        [("x", 0, "batch", 1, False)]
    # propagate
    assert [tuple(nodes[n].meta["val"].shape) for n in ("conv2", "flatten", "fc")] == [(1, 8, 4, 4), (1, 128), (1, 10)]
    # decompose: nothing; relate
    assert not any("fxprune_decomposed" in n.meta for n in nodes.values())
    rules = {n: nodes[n].meta["fxprune_rule"] for n in ("conv1", "conv2", "bn1", "relu", "add", "flatten", "fc")}
    assert rules == {"conv1": "conv", "conv2": "conv", "bn1": "batch_norm", "relu": "elementwise",
                     "add": "elementwise", "flatten": "reshape_family", "fc": "linear"}
    # solve
    group_a, group_b = dg.groups_of("conv1.weight", 0)
    assert (group_a.units, group_b.units) == (2, 4) and {g.id for g in dg.prunable_groups} == {group_a.id, group_b.id}
    assert dg.groups_of("conv2.weight", 1) == [group_b] and dg.groups_of("fc.weight", 1)[:2] == [group_a, group_b]
    assert any("graph input" in why for why in dg.group_of("conv1.weight", 1).frozen)
    assert any("graph output" in why for why in dg.group_of("fc.weight", 0).frozen)
    assert all(g.frozen and any("spatial" in why for why in g.frozen) for g in dg.groups_of("fc.weight", 1)[2:])
    # score, plan, rewrite, verify, record
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,), round_to=1)
    assert (pruned.conv1.in_channels, pruned.conv1.out_channels, pruned.bn1.num_features) == (3, 2, 2)
    assert (pruned.conv2.in_channels, pruned.conv2.out_channels, pruned.conv2.groups) == (2, 2, 1)
    assert (pruned.fc.in_features, pruned.fc.out_features) == (32, 10)
    assert pruned(torch.randn(3, 3, 4, 4)).shape == (3, 10)
    plan = pruned.meta["fxprune_plan"]
    assert sorted((g.units, len(g.kept)) for g in plan.groups) == [(2, 1), (4, 2)]
    from fxprune.pipeline import PIPELINE
    assert set(pruned.meta["fxprune_times"]["wall"]) == {name for name, _ in PIPELINE}
