"""Capture: model -> torch.fx.GraphModule (``symbolic_trace`` with source lines recorded).

Example::

    >>> gm = capture(torchvision.models.resnet18())
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["stack_trace"]  # doctest: +SKIP
    'File ".../resnet.py", line 268, in _forward_impl\\n    x = self.conv1(x)'

A model symbolic tracing cannot handle (data-dependent control flow, ...)
raises :class:`CaptureError` with the failing source line and a pointer to
``torch.export`` capture.
"""

from __future__ import annotations

import traceback

import torch
import torch.fx as fx

from fxprune.errors import CaptureError


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def iter(self, obj):
        """``list(x.chunk(2, 1))`` (YOLO's C2f): the piece count is in the call, so iterate it statically."""
        count = _static_length(obj.node)
        if count is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(count)])


class _Proxy(fx.Proxy):
    def __len__(self) -> int:
        count = _static_length(self.node)
        return count if count is not None else super().__len__()


def _static_length(node: fx.Node) -> int | None:
    """Number of results of a chunk/split call whose count does not depend on shapes."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args = list(node.args[1:]) + list(node.kwargs.values())
    if name == "chunk" and args and isinstance(args[0], int):
        return args[0]
    if name in ("split", "split_with_sizes") and args and isinstance(args[0], (list, tuple)):
        return len(args[0])
    return None


def capture(model: torch.nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule; a GraphModule is returned as it is."""
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxprune needs an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}")
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # any tracing failure becomes one clear error
        raise CaptureError(_explain(model, exc)) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _explain(model: torch.nn.Module, exc: Exception) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return (
        f"torch.fx.symbolic_trace could not trace {type(model).__name__}{where}\n"
        f"  {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}\n"
        "Symbolic tracing cannot follow data-dependent control flow. Capture the model with "
        "torch.export.export(model, args, strict=False).module() and pass that GraphModule to fxprune."
    )
