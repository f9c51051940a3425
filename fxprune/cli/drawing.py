"""A picture of the dependency groups: which layers must be pruned together.

Design: a bipartite graph with **one node per group** (a large disc, labelled
``G3`` and its unit count, coloured by group; frozen groups grey) and **one node
per module** that owns a parameter in a group (a small square, labelled with its
name). An edge joins a module to every group one of its parameter axes belongs
to, drawn in the group's colour: a conv is joined to the group of its output
channels *and* to the group of its input channels, so a chain of layers reads
as a chain of groups, and a residual stream is one disc that every block
touches. A module square is filled with the colour of its output-channel group
(the group of axis 0 of its first parameter).

Only groups that run along the data flow are drawn: groups with parameters,
more than one unit, and an activation axis (channels, hidden units, heads).
Kernel and other parameter-only axes would add one grey disc per conv and say
nothing. Modules are laid out in execution order along a serpentine path
(left to right, then right to left on the next row), and each group sits at the
mean position of its modules, so nearby layers stay nearby; a short spring
relaxation then separates overlapping nodes. This stays legible up to about
ResNet-18 / ResNet-34 size (tens of modules, tens of groups).

Output by file suffix: ``.png``, ``.svg``, ``.pdf`` (matplotlib; or graphviz's
``neato`` when ``engine="graphviz"`` or when it is installed and ``engine="auto"``),
``.dot`` (Graphviz source, no drawing library needed).

Example::

    >>> dg = fxprune.analyze(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
    >>> draw_groups(dg, "resnet18-groups.png")
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import networkx as nx

GREY = "#b8b8b8"
_FORMATS = (".png", ".svg", ".pdf", ".dot")


def group_graph(dg) -> nx.Graph:
    """The bipartite graph: ``("group", id)`` and ``("module", name)`` nodes, module-group edges."""
    graph = nx.Graph()
    order = _execution_order(dg)
    groups = [g for g in dg.groups if g.has_parameters and g.units > 1
              and any(m.kind == "activation" for m in g.members)]
    colours = _palette(sum(1 for g in groups if g.prunable))
    prunable_index = 0
    for group in groups:
        if group.prunable:
            colour, prunable_index = colours[prunable_index], prunable_index + 1
        else:
            colour = GREY
        status = "prunable" if group.prunable else ("frozen" if group.frozen else "fixed")
        graph.add_node(("group", group.id), kind="group", label=f"G{group.id}\n{group.units}", colour=colour,
                       status=status, units=group.units, why=group.frozen[0] if group.frozen else "")
        for member in group.members:
            if member.kind not in ("parameter", "buffer"):
                continue
            module = member.name.rpartition(".")[0] or member.name
            if ("module", module) not in graph:
                graph.add_node(("module", module), kind="module", label=module, colour="white",
                               order=order.get(module, len(order)))
            node = graph.nodes[("module", module)]
            if member.dim == 0 and member.kind == "parameter" and "out_group" not in node:
                node["out_group"] = group.id
                node["colour"] = colour
            graph.add_edge(("module", module), ("group", group.id), colour=colour)
    return graph


def draw_groups(dg, path, engine: str = "auto", title: str | None = None) -> Path:
    """Write the picture of ``dg``'s groups to ``path`` (suffix picks the format); returns the path."""
    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"cannot draw to {path.name}: use one of {', '.join(_FORMATS)}")
    graph = group_graph(dg)
    if not graph:
        raise ValueError("the model has no groups along its data flow to draw")
    if path.suffix.lower() == ".dot":
        path.write_text(to_dot(graph, title))
        return path
    if engine not in ("auto", "graphviz", "matplotlib"):
        raise ValueError(f"engine must be auto, graphviz or matplotlib, got {engine!r}")
    use_graphviz = engine == "graphviz" or (engine == "auto" and shutil.which("neato"))
    if use_graphviz:
        if not shutil.which("neato"):
            raise RuntimeError("engine='graphviz' needs Graphviz's neato on the PATH (apt-get install graphviz)")
        subprocess.run(["neato", f"-T{path.suffix[1:].lower()}", "-o", str(path)], input=to_dot(graph, title),
                       text=True, check=True, capture_output=True)
        return path
    _draw_matplotlib(graph, path, title)
    return path


def layout(graph: nx.Graph) -> dict:
    """Modules on a serpentine path in execution order, groups at their modules' centre, then relaxed."""
    modules = sorted((n for n, d in graph.nodes(data=True) if d["kind"] == "module"),
                     key=lambda n: (graph.nodes[n]["order"], n[1]))
    per_row = max(6, math.ceil(math.sqrt(len(modules) * 2.5)))
    pos = {}
    for i, node in enumerate(modules):
        row, col = divmod(i, per_row)
        x = col if row % 2 == 0 else per_row - 1 - col
        pos[node] = (float(x), -2.0 * row)
    for node, data in graph.nodes(data=True):
        if data["kind"] == "group":
            members = [pos[m] for m in graph.neighbors(node)]
            pos[node] = (sum(p[0] for p in members) / len(members), sum(p[1] for p in members) / len(members) - 0.7)
    # a short spring relaxation from the ordered layout pushes overlapping nodes apart
    pos = nx.spring_layout(graph, pos=pos, k=1.0, iterations=40, seed=0, scale=None)
    return _landscape(pos, modules)


def _landscape(pos: dict, ordered: list) -> dict:
    """Rotate so that the longest extent is horizontal (pictures are wider than tall), in [0, 1.6] x [0, 1].

    The picture is mirrored, if needed, so that the first modules are on the left.
    """
    import numpy as np

    nodes = list(pos)
    xy = np.array([pos[n] for n in nodes], dtype=float)
    xy -= xy.mean(axis=0)
    if len(nodes) > 2:
        _, vectors = np.linalg.eigh(np.cov(xy.T))
        xy = xy @ vectors[:, ::-1]  # principal axis first
    span = np.ptp(xy, axis=0)
    span[span == 0] = 1.0
    xy = (xy - xy.min(axis=0)) / span * np.array([1.6, 1.0])
    index = {n: i for i, n in enumerate(nodes)}
    if len(ordered) > 1 and np.corrcoef(np.arange(len(ordered)), [xy[index[n], 0] for n in ordered])[0, 1] < 0:
        xy[:, 0] = 1.6 - xy[:, 0]
    return {n: (float(x), float(y)) for n, (x, y) in zip(nodes, xy)}


def _draw_matplotlib(graph: nx.Graph, path: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pos = layout(graph)
    width = max(9.0, min(36.0, 2.3 * math.sqrt(graph.number_of_nodes())))
    fig, ax = plt.subplots(figsize=(width, width / 1.6))
    groups = [n for n, d in graph.nodes(data=True) if d["kind"] == "group"]
    modules = [n for n, d in graph.nodes(data=True) if d["kind"] == "module"]
    edges = list(graph.edges(data=True))
    nx.draw_networkx_edges(graph, pos, ax=ax, edgelist=[(u, v) for u, v, _ in edges],
                           edge_color=[d["colour"] for _, _, d in edges], width=1.6, alpha=0.75)
    sizes = [700 + 900 * math.log2(graph.nodes[n]["units"]) / 10 for n in groups]
    nx.draw_networkx_nodes(graph, pos, ax=ax, nodelist=groups, node_size=sizes, linewidths=1.2,
                           node_color=[graph.nodes[n]["colour"] for n in groups], edgecolors="#333333")
    nx.draw_networkx_labels(graph, pos, ax=ax, labels={n: graph.nodes[n]["label"] for n in groups}, font_size=8.5,
                            font_weight="bold")
    nx.draw_networkx_nodes(graph, pos, ax=ax, nodelist=modules, node_shape="s", node_size=90, linewidths=0.8,
                           node_color=[graph.nodes[n]["colour"] for n in modules], edgecolors="#333333")
    for node in modules:
        x, y = pos[node]
        ax.annotate(graph.nodes[node]["label"], (x, y), xytext=(0, -9), textcoords="offset points", ha="center",
                    va="top", fontsize=7.5, color="#222222",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
    prunable = sum(1 for n in groups if graph.nodes[n]["status"] == "prunable")
    handles = [Line2D([], [], marker="o", ls="", mfc="#4c72b0", mec="#333333", ms=11,
                      label=f"prunable group ({prunable}): id, units"),
               Line2D([], [], marker="o", ls="", mfc=GREY, mec="#333333", ms=11,
                      label=f"frozen group ({len(groups) - prunable})"),
               Line2D([], [], marker="s", ls="", mfc="white", mec="#333333", ms=7,
                      label="module, filled with its output group's colour")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, 1.0), fontsize=8, frameon=True)
    ax.set_title(title or "dependency groups", fontsize=11)
    ax.axis("off")
    ax.margins(0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_dot(graph: nx.Graph, title: str | None = None) -> str:
    """Graphviz source of the group graph (for ``neato``)."""
    lines = ["graph groups {", "  overlap=false; splines=true; outputorder=edgesfirst;",
             f'  label="{title or "dependency groups"}"; labelloc=t;']
    ids = {node: f"n{i}" for i, node in enumerate(graph.nodes)}
    for node, data in graph.nodes(data=True):
        label = data["label"].replace("\n", "\\n")
        ink = "white" if _is_dark(data["colour"]) else "black"
        if data["kind"] == "group":
            lines.append(f'  {ids[node]} [label="{label}", shape=circle, style=filled, fillcolor="{data["colour"]}",'
                         f' fontcolor={ink}, fontsize=10];')
        else:
            lines.append(f'  {ids[node]} [label="{label}", shape=box, style="rounded,filled", '
                         f'fillcolor="{data["colour"]}", fontcolor={ink}, fontsize=8, height=0.2];')
    for u, v, data in graph.edges(data=True):
        lines.append(f'  {ids[u]} -- {ids[v]} [color="{data["colour"]}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _is_dark(colour: str) -> bool:
    import matplotlib

    r, g, b = matplotlib.colors.to_rgb(colour)
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.5


def _execution_order(dg) -> dict[str, int]:
    """Module name -> position of its first use in the graph (call_module or get_attr of one of its tensors)."""
    order: dict[str, int] = {}
    for node in dg.gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
            name = node.target if node.op == "call_module" else node.target.rpartition(".")[0] or node.target
            order.setdefault(name, len(order))
    return order


def _palette(n: int) -> list[str]:
    """``n`` distinguishable colours (tab20, then a hue wheel), none of them grey."""
    import matplotlib

    base = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    base = [c for i, c in enumerate(base) if i not in (14, 15)]  # tab20's greys mean "frozen" here
    if n <= len(base):
        return base[:n]
    return base + [matplotlib.colors.to_hex(matplotlib.colors.hsv_to_rgb((i / (n - len(base)), 0.6, 0.85)))
                   for i in range(n - len(base))]
