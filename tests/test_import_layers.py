"""Imports inside fxprune point downward only, and no module imports itself back through others.

Every ``import`` and ``from ... import`` of every module under ``fxprune/`` is read with ``ast`` (those inside
functions too, so a lazy import cannot hide an upward one) and attributed to a *unit*: the longest prefix of the
module's name listed in ``LAYERS``. A unit may import its own modules and any unit of a lower layer; units of the
same layer may not import each other. The order is what the code needs, bottom up:

- ``errors`` (the exception types every stage raises) and ``dotted`` (an attribute set by its dotted name), then
  ``modules`` (the torch modules a pruned graph calls: capture must know them as leaves and decompose registers a
  rule for their mask helper, so they sit below analysis)
- ``algebra`` (layouts, solver, what a rule sees), ``rules`` (the op table, stated in the algebra), ``analysis``
  (capture to groups, and what reads groups: shapes, MACs, reports, lineage)
- ``importance`` (scores of analysed groups), ``planning`` (ranks scores: selection imports importance's
  normalisers), ``rewriting`` (slices tensors along the solved layouts), ``calibration`` (statistics and refits:
  its criteria build on importance, its refit reads rewriting's kept sizes)
- ``huggingface`` (in-place pruning of transformers models), ``io`` (the plan and model formats, which the
  pipeline records), then ``pipeline`` (Job, passes) and ``api`` (public functions, argument checks)
- users of the pipeline, side by side: ``io.replay``, ``io.checkpoint`` (checkpoint streaming) and ``training``;
  then ``io.reload`` (``load_pruned``: a plan replayed on a fresh model)
- ``fxprune`` itself (the package ``__init__``, the public face), then ``cli`` and ``testing`` (clients of it)

Criteria that need calibration batches register themselves in ``fxprune.importance`` (``register_criterion``), as
rules register in ``fxprune.rules.registry``, so that ``importance`` never imports ``calibration``.

A second check finds cycles among modules (``a`` imports ``b`` which imports ``a``, through any path) whatever
their units, since a cycle inside one subpackage is no better than one between two.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "fxprune"

LAYERS = [
    ["fxprune.errors", "fxprune.dotted"],
    ["fxprune.modules"],
    ["fxprune.algebra"],
    ["fxprune.rules"],
    ["fxprune.analysis"],
    ["fxprune.importance"],
    ["fxprune.planning"],
    ["fxprune.rewriting"],
    ["fxprune.calibration"],
    ["fxprune.huggingface"],
    ["fxprune.io"],
    ["fxprune.pipeline"],
    ["fxprune.api"],
    ["fxprune.io.replay", "fxprune.io.checkpoint", "fxprune.training"],
    ["fxprune.io.reload"],  # replays plans on a fresh model (load_pruned)
    ["fxprune"],
    ["fxprune.cli", "fxprune.testing"],
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str | None:
    """The longest prefix of ``module`` that ``LAYERS`` lists (``fxprune.io.checkpoint.blocks``: ``io.checkpoint``)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LEVEL:
            return prefix
    return None


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, name: str, known: set) -> list[tuple[str, int]]:
    """``(imported fxprune module, line)`` for every import in the file, at any depth (functions included).
    ``from a import b`` imports module ``a.b`` when that is a module, else module ``a``."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "fxprune"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "fxprune":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in known else base, node.lineno))
    return out


def import_graph() -> nx.DiGraph:
    found = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(found)
    for name, path in found.items():
        for target, line in imports(path, name, set(found)):
            if target != name:
                graph.add_edge(name, target, line=line)
    return graph


def test_every_module_belongs_to_a_layer():
    assert [m for m in modules() if unit_of(m) is None] == []


def test_imports_point_downward():
    upward = []
    for source, target, data in import_graph().edges(data=True):
        a, b = unit_of(source), unit_of(target)
        if a != b and LEVEL[b] >= LEVEL[a]:
            upward.append(f"{source}:{data['line']} imports {target} ({a} may not import {b})")
    assert upward == [], "\n".join(upward)


def test_no_import_cycles():
    cycles = sorted(sorted(c) for c in nx.simple_cycles(import_graph()))
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_lazy_upward_imports(tmp_path, monkeypatch):
    """A lazy import of a higher unit inside a function is caught (what the three tests above rely on)."""
    package = tmp_path / "fxprune"
    (package / "analysis").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "api.py").write_text("from fxprune.analysis import capture\n")
    (package / "analysis" / "__init__.py").write_text("")
    (package / "analysis" / "capture.py").write_text("def f():\n    from fxprune.api import prune\n")
    monkeypatch.setitem(globals(), "ROOT", package)
    graph = import_graph()
    assert graph.has_edge("fxprune.analysis.capture", "fxprune.api")
    assert LEVEL[unit_of("fxprune.api")] > LEVEL[unit_of("fxprune.analysis.capture")]
    assert [sorted(c) for c in nx.simple_cycles(graph)] == [["fxprune.analysis.capture", "fxprune.api"]]
