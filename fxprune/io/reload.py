"""A pruned state dict back into a freshly built model of the original class: ``save_pruned`` / ``load_pruned``.

Any model whose library has no loader for pruned widths (torchvision, timm, a diffusers UNet whose config cannot
state the plan, your own module) ships as one safetensors file: the pruned model's state dict, the pruning plan
(metadata ``fxprune_plan``) and, for the check, the plan's example inputs and the pruned model's outputs on them.
:func:`load_pruned` builds nothing itself: the caller builds the original class as usual (``resnet18()``,
``UNet2DModel.from_config(config)``), and the plan is replayed on it in place (:func:`fxprune.replay`: the same
groups found again, every tensor resized by name, module attributes following), then the weights are loaded
strictly and its outputs are compared with the stored ones. If anything fails the fresh model is put back as it
was and a :class:`~fxprune.errors.FxPruneError` says what.

A plain state dict (no plan) resizes the tensors by name to the state dict's shapes and recomputes the torch.nn
width attributes (``in_features``, ``out_channels``, ``num_features`` ...): shapes are checked, and outputs too
when ``example_inputs`` and ``expected`` are given.

Example::

    >>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.3, example_inputs=(x,))
    >>> fxprune.save_pruned(pruned, "resnet18-pruned.safetensors")
    >>> model = fxprune.load_pruned(torchvision.models.resnet18(), "resnet18-pruned.safetensors")
    >>> type(model).__name__, model.fc.in_features       # the torchvision class, resized
    ('ResNet', 360)
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError, PlanError
from fxprune.io.plans import CONFIG_PLAN, PruningPlan, plan_of
from fxprune.io.replay import replay
from fxprune.rewriting.inplace import Snapshot
from fxprune.rewriting.inplace.tensors import set_tensor, tensors_by_name
from fxprune.rewriting.inplace.torch_modules import update_widths

PLAN_KEY = "fxprune_plan"  # safetensors metadata: the plan as JSON
CHECK = "fxprune_check."  # tensor keys of the check: CHECK + "args.0", CHECK + "kwargs.input_ids", CHECK + "out.0"


def save_pruned(model: nn.Module, path, example_inputs=None, *, kwargs=None) -> Path:
    """Write a pruned model (what ``fxprune.prune`` returned, or a model pruned in place) to one safetensors
    file: state dict, plan, and the outputs on the plan's example inputs (or ``example_inputs``/``kwargs``) for
    :func:`load_pruned` to compare with. The model runs once, in eval mode (its modes are put back)."""
    from safetensors.torch import save_file

    plan = plan_of(model)
    if example_inputs is None:
        example_inputs, recorded = plan.example_inputs()
        kwargs = recorded if kwargs is None else kwargs
    args = tuple(example_inputs or ())
    kwargs = dict(kwargs or {})
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    check = _example_tensors(args, kwargs)
    if check is not None:
        with _eval(model), torch.no_grad():
            out = model(*args, **kwargs)
        leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        check.update({f"{CHECK}out.{i}": t.detach().contiguous().clone() for i, t in enumerate(leaves)})
        tensors.update(check)
    path = Path(path)
    save_file(tensors, str(path), metadata={PLAN_KEY: json.dumps(plan.to_dict())})
    return path


def load_pruned(fresh: nn.Module, source, example_inputs=None, *, kwargs=None, expected=None,
                plan: PruningPlan | None = None) -> nn.Module:
    """Resize ``fresh`` (a newly built model of the original class) to a pruned state dict, load it, verify it.

    ``source``: a file written by :func:`save_pruned`, a ``.safetensors`` file or a folder holding one (its plan
    from ``config.json``'s ``_fxprune_plan``, which a diffusers model pruned in place saves, or ``plan.json``; else a
    plain state dict), or a state dict. ``plan``: the pruning plan, where ``source`` does not carry one. The
    check compares the model's outputs with the stored ones (or ``expected``, on ``example_inputs``/``kwargs``)
    within sqrt(eps) of their scale. Returns ``fresh`` itself, pruned, in eval mode.
    """
    state, stored_plan, check = _read(source)
    plan = plan if plan is not None else stored_plan
    saved = Snapshot(fresh)
    try:
        if plan is not None:
            _replay_in_place(plan, fresh, state)
        else:
            _resize_by_name(fresh, state)
        _load(fresh, state)
        fresh.eval()
        _verify(fresh, check, example_inputs, kwargs, expected)
    except Exception as exc:
        saved.restore()
        if isinstance(exc, FxPruneError):
            raise
        raise FxPruneError(f"load_pruned: {type(fresh).__name__} could not take the pruned state dict (the model "
                           f"was put back as built): {type(exc).__name__}: {exc}{_where(exc)}") from exc
    return fresh


def _read(source):
    """``(state dict, plan or None, check tensors)`` from a file, a folder or a dict."""
    if isinstance(source, dict):
        state = dict(source)
        return ({k: v for k, v in state.items() if not k.startswith(CHECK)}, None,
                {k: v for k, v in state.items() if k.startswith(CHECK)})
    path = Path(source)
    folder_plan = None
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FxPruneError(f"load_pruned: {path} holds {len(files)} .safetensors files; pass the file")
        folder_plan = _folder_plan(path)
        path = files[0]
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        plan = PruningPlan.from_dict(json.loads(metadata[PLAN_KEY])) if PLAN_KEY in metadata else None
    else:
        tensors, plan = torch.load(str(path), map_location="cpu", weights_only=True), None
    state = {k: v for k, v in tensors.items() if not k.startswith(CHECK)}
    return state, plan if plan is not None else folder_plan, {k: v for k, v in tensors.items() if k.startswith(CHECK)}


def _folder_plan(folder: Path) -> PruningPlan | None:
    """The plan a saved folder carries: ``config.json``'s ``_fxprune_plan`` (a diffusers model pruned in place and
    saved with ``save_pretrained``), or a ``plan.json`` next to the weights; None if neither."""
    config = folder / "config.json"
    if config.exists():
        data = json.loads(config.read_text()).get(CONFIG_PLAN)
        if data:
            return PruningPlan.from_dict(data)
    plan = folder / "plan.json"
    return PruningPlan.load(plan) if plan.exists() else None


def _replay_in_place(plan: PruningPlan, fresh: nn.Module, state: dict) -> None:
    """The plan replayed on ``fresh`` itself (:mod:`fxprune.rewriting.inplace`: checked against the pruned graph,
    or put back); then ``fresh`` has the state dict's shapes, or the error names the tensors that differ."""
    replay(plan, fresh, inplace=True)
    wrong = _shape_mismatches(fresh, state)
    if wrong:
        raise PlanError(f"load_pruned: after replaying the plan, {type(fresh).__name__} still differs from the "
                        f"state dict: {'; '.join(wrong[:5])}")


def _resize_by_name(fresh: nn.Module, state: dict) -> None:
    """No plan: every tensor takes the state dict's shape (empty, to be loaded), torch.nn attributes follow."""
    own = tensors_by_name(fresh)
    for name, tensor in state.items():
        old = own.get(name)
        if old is not None and old.shape != tensor.shape:
            set_tensor(fresh, name, torch.empty(tensor.shape, dtype=old.dtype, device=old.device))
    for module in fresh.modules():
        update_widths(module)


def _shape_mismatches(model: nn.Module, state: dict) -> list[str]:
    own = dict(model.state_dict())
    return [f"{n}: {tuple(own[n].shape)} in the model, {tuple(t.shape)} saved" for n, t in state.items()
            if n in own and own[n].shape != t.shape]


def _load(fresh: nn.Module, state: dict) -> None:
    result = fresh.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys]
    unexpected = [k for k in result.unexpected_keys if not k.rpartition(".")[2].startswith("_fxprune")]
    if missing or unexpected:
        raise FxPruneError(f"load_pruned: the state dict does not fit {type(fresh).__name__}: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}")


def _example_tensors(args: tuple, kwargs: dict) -> dict | None:
    """The inputs as check tensors, or None when one of them is not a tensor (the check is then shapes only)."""
    out = {}
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            return None
        out[f"{CHECK}args.{i}"] = a.detach().contiguous().clone()
    for k, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            return None
        out[f"{CHECK}kwargs.{k}"] = v.detach().contiguous().clone()
    return out


def _verify(model: nn.Module, check: dict, example_inputs, kwargs, expected) -> None:
    if example_inputs is None and kwargs is None and check:
        args = [check[k] for k in sorted((k for k in check if k.startswith(f"{CHECK}args.")),
                                         key=lambda k: int(k.rpartition(".")[2]))]
        kwargs = {k[len(f"{CHECK}kwargs."):]: v for k, v in check.items() if k.startswith(f"{CHECK}kwargs.")}
        outs = sorted((k for k in check if k.startswith(f"{CHECK}out.")), key=lambda k: int(k.rpartition(".")[2]))
        expected = [check[k] for k in outs]
        example_inputs = tuple(args)
    if example_inputs is None and kwargs is None:
        return  # shapes only: the strict load checked them
    with torch.no_grad():
        got = model(*(example_inputs or ()), **(kwargs or {}))
    if expected is None:
        return
    got, want = _first_float(got), _first_float(expected)
    if got is None or want is None or got.shape != want.shape:
        raise FxPruneError(f"load_pruned: {type(model).__name__} returns {None if got is None else tuple(got.shape)}"
                           f" where the pruned model returned {None if want is None else tuple(want.shape)}")
    scale = max(want.abs().max().item(), 1.0)
    tolerance = max(1e-4, torch.finfo(want.dtype).eps ** 0.5) * scale
    error = (got.float() - want.float()).abs().max().item()
    if error > tolerance:
        raise FxPruneError(f"load_pruned: {type(model).__name__} computes something else than the pruned model "
                           f"(largest difference {error:.3g}, allowed {tolerance:.3g}): a module attribute that "
                           f"restates a pruned width did not follow (see fxprune.prune(..., inplace=True))")


def _first_float(output):
    leaves = torch.utils._pytree.tree_leaves(output)
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


def _where(exc: BaseException) -> str:
    """`` at file.py:line: source`` of the innermost frame outside torch.nn's call machinery (the model's own
    line that refused the widths: diffusers' ``assert hidden_states.shape[1] == self.channels``), or ``""``."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "torch/nn/modules/module.py" not in frame.filename:
            return f" at {frame.filename}:{frame.lineno}: {frame.line}"
    return ""


class _eval:
    """Eval mode inside, every module's own mode back afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training
        return False

