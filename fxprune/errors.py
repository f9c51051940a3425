"""Errors raised by fxprune. Every message names the node, op and source line where one exists."""

from __future__ import annotations


class FxPruneError(Exception):
    """Base class of every fxprune error."""


class CaptureError(FxPruneError):
    """The model could not be turned into a torch.fx graph."""


class ShapeError(FxPruneError):
    """Shapes could not be propagated (missing inputs, or a pruned graph that is inconsistent)."""


class DuplicateRuleError(FxPruneError):
    """A rule was registered twice for the same op."""


class PlanError(FxPruneError, ValueError):
    """A pruning request that cannot be honoured (all units of a group, a frozen group, ...)."""


def describe_node(node) -> str:
    """``node 'view_1' (call_method view) at model.py:42: x.view(B, H, D)`` — for error messages."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = source_line(node)
    return f"node '{node.name}' ({node.op} {target})" + (f" at {where}" if where else "")


def source_line(node) -> str:
    """The innermost user frame of a node's stack trace as ``file:line: code``, or ''.

    torch's own frames (the tracer, nn.Module plumbing) are skipped.
    """
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    frames = []
    for i, line in enumerate(lines):
        if line.startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            parts = line.split(",")
            path = parts[0][len("File "):].strip('"')
            lineno = parts[1].strip().replace("line ", "") if len(parts) > 1 else "?"
            frames.append((path, lineno, code))
    user = [f for f in frames if "/torch/" not in f[0].replace("\\", "/")] or frames
    if not user:
        return ""
    path, lineno, code = user[-1]
    return f"{path}:{lineno}" + (f": {code}" if code else "")
