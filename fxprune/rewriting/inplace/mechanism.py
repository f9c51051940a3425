"""One in-place mechanism for any ``nn.Module``: the pruned graph written into the caller's own model, checked,
or the model put back exactly.

:func:`prune_in_place` rewrites a throwaway copy of the analysed graph (tensors shared where unchanged),
recomposes and verifies it, and hands it to :func:`write_into`, which, inside one transaction
(:class:`~fxprune.rewriting.inplace.snapshot.Snapshot`):

1. runs the pruned graph on the model's own inputs (it must run:
   :func:`~fxprune.rewriting.inplace.check.graph_outputs`);
2. sets every resized tensor into its owner by qualified name (:mod:`~fxprune.rewriting.inplace.tensors`); a
   tensor the graph resized that the model does not hold under that name means the model cannot be changed: an
   error, never a silent no-op;
3. updates the widths torch modules restate (:mod:`~fxprune.rewriting.inplace.torch_modules`) and the
   ``nn.MultiheadAttention`` modules (:mod:`~fxprune.rewriting.inplace.multihead`: widths, or a
   ``PrunedMultiheadAttention`` swapped in);
4. lets a library layer update what it knows (:class:`Extension`: the Hugging Face layer's head counts and
   attribute-name fallback), then the integer attributes the rewritten graph decides and, after the library's
   config update, those that follow a pruned width by value (:mod:`~fxprune.rewriting.inplace.restated`);
5. checks that the model's own forward computes what the pruned graph computes, on the example inputs and on a
   batch of two (:mod:`~fxprune.rewriting.inplace.check`), plus the library's own runs (``generate``); a guess
   that fails the check is taken back and the check runs again;
6. on any failure puts the model (and the library's objects: a config) back bit for bit and raises an
   :class:`~fxprune.errors.FxPruneError` that names the source lines and the attributes still holding an old
   width, and says that the pruned graph (``inplace=False``) works.

The model returned is the caller's own object.

A caller that changes the module tree itself (depth pruning removes layers) passes ``edit``: a function of the
model run first inside the same transaction, so that its changes are checked and put back with the rest.

Example::

    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    >>> fxprune.prune(model, 0.3, example_inputs=(x,), inplace=True) is model
    True
    >>> model.blocks[0].attn.num_heads                      # from the rewritten reshape(B, N, 3, 2, 64)
    2
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from fxprune.dotted import owner_of, set_attribute
from fxprune.errors import FxPruneError
from fxprune.rewriting.inplace import check
from fxprune.rewriting.inplace.multihead import update_multihead
from fxprune.analysis.attention_sites import attention_sites
from fxprune.rewriting.inplace.restated import (constant_changes, decide_from_constants, decide_head_counts,
                                               follow_widths, positional, unfollow)
from fxprune.rewriting.inplace.snapshot import Snapshot
from fxprune.rewriting.inplace.tensors import changed_widths, tensors_by_name, write_tensors
from fxprune.rewriting.inplace.torch_modules import owned, update_torch_modules

_PLAIN = (int, float, bool, str, tuple, type(None))


@dataclass
class Change:
    """What in-place pruning did to the caller's model so far (read by :class:`Extension` hooks and errors)."""

    model: nn.Module
    graph: fx.GraphModule  # the analysed graph
    pruned: fx.GraphModule  # the rewritten, verified graph
    original: dict  # {(id(module), attr): value} of every module's plain attributes before anything changed
    tensors: dict = field(default_factory=dict)  # {name: (old shape, new shape)} of the tensors set
    swapped: list = field(default_factory=list)  # paths of modules replaced (MultiheadAttention)
    decided: set = field(default_factory=set)  # "module.attr" set from the rewritten graph's arguments
    owned: set = field(default_factory=set)  # "module.attr" a torch class owns (set from its tensors)
    followed: dict = field(default_factory=dict)  # "module.attr" -> value before: guesses by value
    guesses: dict = field(default_factory=dict)  # "module.attr" -> value before: the library's guesses
    settled: dict = field(default_factory=dict)  # "module.attr" -> value before: set where the check failed
    ambiguous: dict = field(default_factory=dict)  # "module.attr" -> value before: head counts that may be another
    # value the ops also used (restated.decide_head_counts); put back in groups where the check fails
    tries: int = 0  # forward runs spent settling
    phase: str = "writing"  # "writing" back, or "checking" the model's own forward

    @property
    def widths(self) -> dict[int, set]:
        """``{old size: new sizes}`` of every axis of every tensor set."""
        return changed_widths(self.tensors)


class Extension:
    """What a library adds on top of the generic mechanism (the Hugging Face layer: its config and ``generate``);
    every hook does nothing here."""

    # integer attributes no other step changed follow a pruned width: where the rewritten graph's arguments show
    # it and by value (:mod:`~fxprune.rewriting.inplace.restated`), confirmed by the output check. A library that
    # can tell which attributes restate a width (the Hugging Face layer rebuilds the model from its updated config
    # and compares) turns this off: a position count equal to the hidden size is no width, and a wrong one would
    # survive the check (it is read only when a checkpoint is loaded)
    restate_unchanged = True

    def objects(self, model: nn.Module) -> tuple:
        """Objects saved and put back with the model (their fields are deep-copied): a config."""
        return ()

    def model_kwargs(self, kwargs: dict) -> dict:
        """The keyword inputs the model's own forward is compared with."""
        return kwargs

    def graph_kwargs(self, kwargs: dict) -> dict:
        """The keyword inputs the pruned graph takes."""
        return kwargs

    def update_attributes(self, change: Change) -> None:
        """Attributes the library knows how to restate, after the tensors and torch widths (before the graph's
        integer arguments correct them)."""

    def update_config(self, change: Change) -> dict:
        """After the attributes: a config. Returns guesses ``{"module.attr": value before}`` to take back
        (:meth:`undo`) when the model then computes something else."""
        return {}

    def undo(self, change: Change, guesses: dict) -> None:
        unfollow(change.model, guesses)

    def check(self, model: nn.Module, inputs: tuple, kwargs: dict) -> None:
        """More runs after the output check (``generate`` with a cache); raise to fail."""

    def explain(self, change: Change, exc: BaseException) -> str:
        """A likelier cause to name in the error, or ``""``."""
        return ""


def prune_in_place(dg, removal: dict, extension: Extension | None = None, run: bool = True) -> nn.Module:
    """Prune ``dg.model`` itself by ``removal`` (see module docstring); returns the model.

    ``run=False`` writes back without running anything (a model on the meta device, which
    :func:`fxprune.prune_checkpoint` resizes for its shapes and config); its shapes are still verified.
    """
    from fxprune.rewriting.recompose import recompose
    from fxprune.rewriting.rewrite import rewrite
    from fxprune.rewriting.verify import verify

    pruned = rewrite(dg, removal, share_tensors=True)
    recompose(pruned)
    verify(pruned, dg.example_inputs, dg.expected_shapes)  # also propagates the new shapes into pruned's nodes
    own_modules(dg.gm, dg.model)
    return write_into(dg.model, dg.gm, pruned, dg.model_inputs, dg.model_kwargs, extension=extension, run=run)


def own_modules(graph: nn.Module, model: nn.Module) -> None:
    """Give ``graph`` its own module objects where it calls the caller's (a symbolically traced graph calls the
    caller's torch modules): shallow copies with their own tables, the same tensors. Writing the pruned tensors
    into the caller then leaves the analysed graph as it was (a sequential refit rewrites it again)."""
    theirs = {id(m) for m in model.modules()}

    def visit(module: nn.Module) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            if id(child) in theirs:
                child = copy.copy(child)
                for table in ("_parameters", "_buffers", "_modules"):
                    vars(child)[table] = dict(vars(child)[table])
                module._modules[name] = child
            visit(child)

    if graph is not model:
        visit(graph)


def write_into(model: nn.Module, graph: fx.GraphModule, pruned: fx.GraphModule, inputs, kwargs=None, *,
               extension: Extension | None = None, edit=None, run: bool = True) -> nn.Module:
    """Make ``model`` the pruned model ``pruned`` (rewritten from ``graph``, the graph analysed from ``model``),
    checked on ``inputs``/``kwargs``; put back exactly and an :class:`FxPruneError` on failure.

    ``edit(model)``: changes of the caller's own (removing layers), run first in the same transaction.
    """
    ext = extension or Extension()
    inputs, kwargs = tuple(inputs or ()), dict(kwargs or {})
    expected = check.graph_outputs(pruned, inputs, ext.graph_kwargs(kwargs)) if run else None
    saved = Snapshot(model, *ext.objects(model))
    change = Change(model, graph, pruned, {})
    try:
        if edit is not None:
            edit(model)
        # what the edit set (renumbered layer indices) is where the model starts from, not a guess to correct
        change.original = {(id(m), k): v for m in model.modules() for k, v in vars(m).items()
                           if isinstance(v, _PLAIN)}
        _write(change, ext)
        if isinstance(model, fx.GraphModule):  # a GraphModule's forward is its graph: it takes the pruned one
            _take_graph(model, pruned)
        if run:
            change.phase = "checking"
            _checked(change, ext, saved, inputs, kwargs, expected)
    except Exception as exc:  # never a half-modified model: everything back as it was
        error = _failure(change, ext, exc)  # read what still holds an old width before putting it back
        saved.restore()
        raise error from exc
    return model


def _write(change: Change, ext: Extension) -> None:
    model, graph, pruned = change.model, change.graph, change.pruned
    change.tensors = write_tensors(model, pruned)
    _nothing_unreached(change)
    update_torch_modules(model, pruned)
    changes = constant_changes(graph, pruned)
    change.swapped = update_multihead(model, graph, pruned, change.tensors, changes)
    change.owned = {f"{n}.{a}" if n else a for n, m in model.named_modules() for a in owned(m)}
    ext.update_attributes(change)
    heads = decide_head_counts(model, attention_sites(graph), attention_sites(pruned), changes, change.original,
                               change.owned, ambiguous=change.ambiguous)
    change.decided = heads | decide_from_constants(model, graph, pruned, change.original, change.owned | heads,
                                                   unchanged=ext.restate_unchanged)
    guesses = ext.update_config(change) or {}
    if ext.restate_unchanged:
        change.followed = follow_widths(model, change.tensors, change.owned | change.decided | set(guesses),
                                        change.original)
    change.guesses = guesses


def _nothing_unreached(change: Change) -> None:
    """Every tensor the rewrite resized must be one the model holds under that name, else the model cannot be
    changed to compute the pruned graph (a constant the trace made, a tensor kept under another name)."""
    before = {name: tuple(t.shape) for name, t in tensors_by_name(change.graph).items()}
    after = tensors_by_name(change.pruned)
    mine = tensors_by_name(change.model)
    missing = [name for name, t in after.items() if name in before and before[name] != tuple(t.shape)
               and name not in mine]
    if missing:
        raise FxPruneError(f"the pruned graph resizes tensors that {type(change.model).__name__} does not hold "
                           f"under those names ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}), "
                           f"so the model itself cannot be made to compute it")


def _take_graph(model: fx.GraphModule, pruned: fx.GraphModule) -> None:
    """A GraphModule caller takes the pruned graph (its modules and tensors were updated by name), and whatever
    the pruned graph reads that the caller lacks (a constant rewriting made)."""
    for node in pruned.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        try:
            model.get_submodule(node.target) if node.op == "call_module" else operator.attrgetter(node.target)(model)
        except AttributeError:
            set_attribute(model, node.target, operator.attrgetter(node.target)(pruned))
    model.graph = pruned.graph
    model.recompile()


class InPlaceError(FxPruneError):
    """In-place pruning failed and the model was put back. ``modules``: paths of the model's modules on the
    failing traceback, innermost first (empty when the model ran but computed something else, or writing back
    failed): where its own code cannot hold the plan."""

    def __init__(self, message: str, modules=()):
        super().__init__(message)
        self.modules = list(modules)


class _Mismatch(FxPruneError):
    """The model ran but computes something else than the pruned graph."""


_MAX_TRIES = 24  # forward runs spent settling ambiguous attributes after a failure


def _checked(change: Change, ext: Extension, saved: Snapshot, inputs: tuple, kwargs: dict, expected) -> None:
    """The output check, settling what it shows (see :func:`_settle`); when it fails with guesses, again without
    them (taken back)."""
    def attempt():
        try:
            _check(change, ext, saved, inputs, kwargs, expected)
        except Exception as exc:
            return exc
        return None

    error, undone = attempt(), False
    while error is not None:
        error, progressed = _settle(change, error, attempt)
        if progressed:
            continue
        error, progressed = _untangle(change, ext, error, attempt)
        if progressed:
            continue
        guesses = {**change.guesses, **change.followed}
        if undone or not guesses:
            raise error
        ext.undo(change, change.guesses)
        unfollow(change.model, change.followed)
        change.followed, change.guesses, undone = {}, {}, True
        error = attempt()


def _settle(change: Change, error: BaseException, attempt) -> tuple:
    """An attribute the failure points at: the model's forward failed inside a module of its own (the innermost
    frame of the traceback in the model's files whose ``self`` is one of its modules) that still holds, in an
    integer attribute, an old width its tensors shrank to several new sizes (diffusers' ``Upsample2D.channels``,
    64, where its convolution's input went to 56 and its output to 48; ``assert hidden_states.shape[1] ==
    self.channels``, which export dropped). Each new size is tried; kept when the failure moves on (or the check
    passes), else put back. Returns ``(error now or None, whether it moved on)``."""
    site = _failure_site(change, error)
    if site is None:
        return error, False
    module, path, signature, stale = site
    for attr, old, candidates in stale:
        for new in candidates:
            if change.tries >= _MAX_TRIES:
                return error, False
            change.tries += 1
            setattr(module, attr, new)
            again = attempt()
            if again is None or _signature(change, again) != signature:
                change.settled[f"{path}.{attr}" if path else attr] = old
                return again, True
            setattr(module, attr, old)
    return error, False


def _untangle(change: Change, ext: Extension, error: BaseException, attempt) -> tuple:
    """Head counts set where the module's ops also used the same value for a size rewriting kept
    (``change.ambiguous``): each group of them (one attribute of the modules of one class, as in every layer) is
    put back in turn, and stays back when the check then passes (``ext.undo`` then records it, as a guess taken
    back). Tried once. Returns ``(error now or None, whether it passed)``."""
    groups: dict[tuple, list] = {}
    for key, old in change.ambiguous.items():
        module, attr = owner_of(change.model, key)
        groups.setdefault((type(module), attr), []).append((module, attr, key, old))
    change.ambiguous = {}
    for members in groups.values():
        if change.tries >= _MAX_TRIES:
            break
        change.tries += 1
        now = [getattr(module, attr) for module, attr, _, _ in members]
        for module, attr, _, old in members:
            setattr(module, attr, old)
        again = attempt()
        if again is None:
            change.decided.difference_update(key for _, _, key, _ in members)
            ext.undo(change, {key: old for _, _, key, old in members})
            return None, True
        for (module, attr, _, _), value in zip(members, now):
            setattr(module, attr, value)
    return error, False


def _failure_site(change: Change, error: BaseException):
    """``(module, path, signature, [(attr, old value, new sizes to try)])`` of the innermost module on the
    failure's traceback holding untried old widths, or None."""
    cause = error.__cause__ if isinstance(error, FxPruneError) else error
    if cause is None or isinstance(error, _Mismatch):
        return None
    names = {id(m): n for n, m in change.model.named_modules()}
    indices = positional(change.model)
    for _, _, module in reversed(check._model_frames(cause)):
        if not isinstance(module, nn.Module) or id(module) not in names:
            continue
        path = names[id(module)]
        widths = changed_widths(change.tensors, path) or change.widths
        stale = []
        for attr, value in vars(module).items():
            key = f"{path}.{attr}" if path else attr
            if attr.startswith("_") or type(value) is not int or value < 2 or (id(module), attr) in indices:
                continue
            if change.original.get((id(module), attr)) != value or key in change.settled:
                continue
            candidates = sorted(widths.get(value, ()) or change.widths.get(value, ()))
            if candidates:
                stale.append((attr, value, candidates))
        if stale:
            return module, path, _signature(change, error), stale
    return None


def _signature(change: Change, error: BaseException) -> tuple:
    """Where a failure happened: its type and the innermost frame of the model's files (with its module)."""
    cause = error.__cause__ if isinstance(error, FxPruneError) and error.__cause__ is not None else error
    frames = check._model_frames(cause)
    last = frames[-1] if frames else (None, None, None)
    return type(cause).__name__, last[0], last[1], id(last[2])


def _check(change: Change, ext: Extension, saved: Snapshot, inputs: tuple, kwargs: dict, expected) -> None:
    model, pruned = change.model, change.pruned
    model_kwargs = ext.model_kwargs(kwargs)
    got = check.run(model, inputs, model_kwargs)
    problems = check.compare(got, expected)
    if problems:
        raise _Mismatch("its own forward computes something else than the pruned graph: " + "; ".join(problems[:3]))
    ext.check(model, inputs, kwargs)
    inputs2, model_kwargs2 = check.doubled((inputs, model_kwargs))
    references = [check.doubled(expected)]
    try:
        got2, error = check.run(model, inputs2, model_kwargs2), None
    except Exception as exc:
        got2, error = None, exc
    if error is None and not check.compare(got2, references[0]):
        return  # the example's outputs repeated: the graph is not run there too (one forward less per prune)
    try:  # the graph's own outputs at that size, where it takes the size
        references.insert(0, check.run(pruned, inputs2, check.doubled(ext.graph_kwargs(kwargs))))
    except Exception:  # a graph captured for the example's size only: the example's outputs repeated stay the
        pass  # reference, and the model is still compared with them below (nothing is skipped)
    if error is None and any(not check.compare(got2, r) for r in references):
        return
    why = _second_size_does_not_apply(change, ext, saved, inputs, inputs2, model_kwargs, model_kwargs2,
                                      graph_ran=len(references) > 1)
    if why:
        warnings.warn(f"fxprune: {type(model).__name__} pruned in place was checked at the example's batch size "
                      f"only: {why}", stacklevel=6)
        return
    if error is not None:
        raise error
    problems = min((check.compare(got2, r) for r in references), key=len)
    raise _Mismatch("at a batch of two (the example repeated), its own forward computes something else than the "
                    "pruned graph: " + "; ".join(problems[:3]))


def _second_size_does_not_apply(change, ext, saved, inputs, inputs2, kwargs, kwargs2, graph_ran: bool) -> str:
    """Why the example repeated along its first axis is no test of this model ("" when it is): the original model
    itself fails there, or (when the pruned graph did not take the size) does not compute the example's outputs
    twice there (its first axis is not a batch: sequence-first inputs, or a batch that mixes examples)."""
    after = Snapshot(change.model, *ext.objects(change.model))
    saved.restore()
    try:
        try:
            twice = check.run(change.model, inputs2, kwargs2)
        except Exception as exc:
            return (f"the original model itself does not run on the example repeated along its first axis "
                    f"({type(exc).__name__}: {check._first_line(exc)})")
        if not graph_ran and check.compare(twice, check.doubled(check.run(change.model, inputs, kwargs))):
            return ("the original model's outputs on the example repeated along its first axis are not its "
                    "outputs on the example repeated (the first axis is not a batch of independent examples), "
                    "and the pruned graph takes only the example's batch size")
        return ""
    finally:
        after.restore()


def _unchanged(change: Change):
    """Whether ``module.attr`` (by object and name) still holds its value from before and is no torch width."""
    def unchanged(module: nn.Module, attr: str, value) -> bool:
        return change.original.get((id(module), attr)) == value and attr not in owned(module)
    return unchanged


def _failure(change: Change, ext: Extension, exc: BaseException) -> FxPruneError:
    if isinstance(exc, FxPruneError):
        what = str(exc)
    elif change.phase == "checking":
        what = f"its own forward raises {type(exc).__name__}: {check._first_line(exc)}"
    else:
        what = f"writing back its tensors and attributes raised {type(exc).__name__}: {check._first_line(exc)}"
    details = [d for d in (ext.explain(change, exc),
                           check.explain(exc.__cause__ if isinstance(exc, FxPruneError) else exc, change.model,
                                         change.tensors, change.widths, _unchanged(change))) if d]
    modules = []
    if change.phase == "checking" and not isinstance(exc, _Mismatch):
        cause = exc.__cause__ if isinstance(exc, FxPruneError) else exc
        names = {id(m): n for n, m in change.model.named_modules()}
        modules = list(dict.fromkeys(names[id(s)] for _, _, s in reversed(check._model_frames(cause) if cause else [])
                                     if isinstance(s, nn.Module) and id(s) in names))
    return InPlaceError(f"pruning {type(change.model).__name__} in place failed (the model was put back as it "
                        f"was): {what}" + (f". {'. '.join(details)}" if details else "")
                        + ". fxprune.prune(..., inplace=False) returns the pruned graph, which computes the pruned "
                          "model (verified)", modules)
