"""``prune_checkpoint``: prune a Hugging Face checkpoint folder without loading the model.

1. The model is built on the meta device from ``config.json`` (``config.architectures[0]``) and
   analysed as in-place pruning analyses it (:func:`fxprune.analyze` with ``inplace=True``: whole
   heads, kv heads, MLP units, hidden size).
2. Units are scored by a magnitude criterion one checkpoint tensor at a time
   (:mod:`fxprune.io.checkpoint.scores`), and planned by the ``plan`` and ``check`` passes of
   :func:`fxprune.prune` (alignment steps, ``ratios``, global ranking, MACs/parameter targets counted
   without weights), so the plan is the one ``fxprune.prune(loaded, ratio, inplace=True)`` makes. Or
   ``plan=`` gives it.
3. The meta model is pruned in place (:func:`fxprune.huggingface.inplace.prune_in_place`, without running
   it): its new shapes check every written tensor, and its updated config (with ``fxprune_shapes`` when
   widths are not uniform) is saved.
4. Every tensor is read again, sliced along its pruned axes to the kept indices
   (:func:`fxprune.rewriting.rewrite.changed_axes`, the rewrite pass's own) and written shard by shard
   (:mod:`fxprune.io.checkpoint.writer`). A tied ``lm_head`` is sliced like the embedding it shares.

With ``calibration`` batches, data-aware criteria (``"activation"``, ``"wanda"``, ``"obs"``) and
``reconstruct=True`` run the model one decoder layer at a time (:mod:`~fxprune.io.checkpoint.layerwise`): the meta
graph is cut into its repeated blocks, each block's tensors are read from the shards only while the batches' hidden
states go through it, and the refit (sequential, on the pruned model's own inputs) of each block's layers is
kept in a temporary file until the shards are written. Peak memory then: about one decoder layer's weights
(original and pruned), the calibration hidden states and one layer's statistics.

Peak memory: the meta analysis, plus one output shard and one source tensor. An output shard is at
most ``max_shard_size``; by default the largest source shard's size, capped at 1 GB, so that a
checkpoint published in 5-10 GB shards is not rewritten through shards that large. The other files of
the folder (tokenizer, generation config) are copied; weights in other formats are not.

Example::

    >>> plan = fxprune.prune_checkpoint("llama-7b", "llama-7b-pruned", ratio=0.3)
    >>> model = transformers.AutoModelForCausalLM.from_pretrained("llama-7b-pruned")   # uniform widths
    >>> model = fxprune.load_pretrained("llama-7b-pruned")          # any widths (config.fxprune_shapes)

Details. The analysis runs on ``int64`` example ids of one row of ``EXAMPLE_LENGTH`` tokens (with ``calibration``:
the first batch, and the dynamic capture ``prune`` makes with calibration, so that every batch runs through the
graph); head dims are frozen as in place. Slicing uses ``rewrite.sliced`` along the axes ``rewrite.changed_axes``
reports, by canonical name. With a refit, each segment's refit tensors go, in the checkpoint's dtype, into a
temporary safetensors file in ``out_dir`` that the writer reads instead of slicing. Checkpoints whose tensor names
transformers converts on loading (fused MoE experts) are refused with the names. Command line: ``fxprune prune
hf:DIR --streaming [--max-shard-size 2GB] [--calibration FILE --importance activation --reconstruct]``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from fxprune.api import check_prune_settings
from fxprune.huggingface import inplace as hf_inplace
from fxprune.errors import FxPruneError
from fxprune.huggingface.portable import fit_removal
from fxprune.io.checkpoint.scores import stream_scores, streamed_criterion
from fxprune.io.checkpoint.shards import INDEX, Checkpoint
from fxprune.io.checkpoint.writer import write_shards
from fxprune.importance import Magnitude, resolve_importance
from fxprune.io.plans import PruningPlan
from fxprune.pipeline import ANALYSIS, PRUNING, Job, Settings, run
from fxprune.analysis.removal import kept_units
from fxprune.rewriting.rewrite import Sizes, changed_axes, rewrite, sliced

# weights in formats this module does not rewrite: never copied next to the pruned shards
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
SHARD_CAP = 10**9  # default output shard size at most 1 GB (one output shard is held in memory)
EXAMPLE_LENGTH = 8  # tokens of the example input the graph is captured with (the plan does not depend on it)


def prune_checkpoint(src_dir, out_dir, ratio: float | None = None, *, plan=None, importance="l2", ignore=(),
                     round_to: int | None = None, global_pruning: bool = False, max_ratio: float = 0.9,
                     ratios: dict | None = None, target_macs: float | None = None,
                     target_params: float | None = None, calibration=None, reconstruct: bool = False,
                     damping: float | None = None, device=None, max_shard_size=None, progress=None,
                     isomorphic: bool = False, portable: bool = False) -> PruningPlan:
    """Prune the checkpoint in ``src_dir`` into ``out_dir``, one tensor at a time; returns the plan.

    ``src_dir`` holds ``config.json`` and ``*.safetensors`` shards (with ``model.safetensors.index.json``
    when sharded). ``ratio``, ``importance`` (``"l2"``, ``"l1"``, ``"lamp"`` or a
    :class:`fxprune.importance.Magnitude`: data-aware criteria need the model to run and are refused),
    ``ignore``, ``round_to``, ``global_pruning``, ``isomorphic``, ``max_ratio``, ``ratios``, ``target_macs`` and
    ``target_params`` mean what they mean for :func:`fxprune.prune` with ``inplace=True``, and give the same
    plan; so does ``portable=True`` (a plan ``config.json`` states: ``from_pretrained`` reloads ``out_dir``).
    ``plan`` (a :class:`fxprune.PruningPlan` or its JSON file, e.g. ``fxprune.plan_of(model)`` of a model pruned
    in place) replaces the scoring and planning. ``out_dir`` gets the pruned shards
    (at most ``max_shard_size`` each: bytes or a string such as ``"2GB"``; default the largest source shard's
    size, at most 1 GB: one output shard is held in memory), the index, the
    updated ``config.json`` and the folder's other files; it must hold no safetensors yet.
    ``progress``: ``True``/``False`` forces the tqdm bars over tensors on or off; ``None`` shows them on a
    terminal.

    ``calibration`` (a list of batches of model inputs: tensors, tuples or dicts of keyword tensors, as for
    :func:`fxprune.prune`) runs the model one decoder layer at a time (:mod:`fxprune.io.checkpoint.layerwise`) for
    ``importance="activation"``, ``"wanda"`` or ``"obs"`` (every group, the hidden size included, scored as in
    memory; the plan is ``fxprune.prune``'s with the same batches) and for ``reconstruct=True``: the layers that
    lose input columns are refit sequentially, each on the pruned model's own inputs after the layers before it
    were refit (``fxprune.prune(..., reconstruct=True, sequential=True)``), with ridge strength ``damping`` (None:
    chosen per layer on held-out calibration tokens, :mod:`fxprune.calibration.ridge`). The graph
    runs in the meta model's dtype (float32: the weights are cast when read, the refit weights written back in
    the checkpoint's dtype) on ``device`` (default ``"cpu"``; ``"cuda"`` puts one layer and the hidden states on
    the GPU).

    Example::

        >>> tiny_llama(hidden_size=64, num_hidden_layers=2).save_pretrained("llama", max_shard_size="20KB")
        >>> fxprune.prune_checkpoint("llama", "llama-half", ratio=0.5)
        PruningPlan(LlamaForCausalLM: 7 groups, 7 lose units)
        >>> fxprune.prune_checkpoint("llama", "llama-again", plan="plan.json")     # a plan saved earlier
        >>> fxprune.prune_checkpoint("llama", "llama-refit", ratio=0.3, importance="activation",
        ...                          calibration=[ids[i:i + 4] for i in range(0, 32, 4)], reconstruct=True)
    """
    src, out = Path(src_dir), Path(out_dir)
    checkpoint, config = _open(src, out)
    if plan is not None and (ratio is not None or target_macs is not None or target_params is not None):
        raise ValueError("give plan= or a ratio/target, not both (the plan already says which units go)")
    if isinstance(plan, (str, os.PathLike)):
        plan = PruningPlan.load(plan)
    if plan is not None and not isinstance(plan, PruningPlan):
        raise TypeError(f"plan must be a PruningPlan or the path of its JSON file, got {type(plan).__name__}")
    calibration = _calibration(calibration, importance, reconstruct, plan)
    criterion = None
    if plan is None:  # activation criteria run layer by layer; the others are magnitudes read tensor by tensor
        criterion = resolve_importance(importance, calibration) if calibration is not None and \
            _data_aware(importance) else streamed_criterion(importance)
    ratio, target, max_ratio = check_prune_settings(ratio, target_macs, target_params, round_to, max_ratio,
                                                    global_pruning=global_pruning, isomorphic=isomorphic)

    model = meta_model(config)
    # with calibration, the graph is captured with the first batch (dynamic sizes, as fxprune.prune does), so
    # that every batch runs through it
    example = (torch.zeros(1, EXAMPLE_LENGTH, dtype=torch.long),) if calibration is None else calibration[0]
    asked = Settings(ratio=ratio, importance=importance, ignore=tuple(ignore), round_to=round_to, inplace=True,
                     global_pruning=bool(global_pruning), isomorphic=bool(isomorphic), max_ratio=max_ratio,
                     ratios=ratios, target=target, calibration=calibration, portable=bool(portable))
    job = Job(model, example, settings=asked)
    dg = run(job, ANALYSIS).dg
    aliases = _tied_names(model, checkpoint)
    weights = None
    if calibration is not None:
        from fxprune.io.checkpoint.layerwise import Weights

        weights = Weights(checkpoint, aliases, _missing_buffers(dg.gm, model, checkpoint, aliases), device or "cpu")
    if plan is not None:
        job.removal = plan.removal(dg)
    elif isinstance(criterion, Magnitude):
        job.scores = stream_scores(dg, dg.prunable_groups, criterion, checkpoint, aliases, progress)
    else:
        from fxprune.io.checkpoint.layerwise import layerwise_scores

        job.scores = layerwise_scores(dg, weights, calibration, criterion, device or "cpu", progress)
    if plan is None:
        run(job, [(name, fn) for name, fn in PRUNING if name in ("plan", "check")])
    elif portable:  # a given plan: the config values it needs, or a PlanError naming what the config cannot state
        dg.config_fit = fit_removal(dg, job.removal)
    removal = job.removal
    sizes = Sizes(dg.solver, kept_units(dg, removal))
    changed = changed_axes(dg, sizes)

    def cut(name, tensor):  # a graph tensor (model name) sliced to its pruned shape
        return sliced(tensor, changed.get(dg.state.canonical.get(name, name), {}), sizes)

    refit_dir = _refit(dg, removal, weights, calibration, cut, damping, device, out, progress) if reconstruct \
        else None
    try:
        _write(dg, removal, model, checkpoint, sizes, changed, refit_dir, out, max_shard_size, progress)
    finally:
        if refit_dir is not None:
            refit_dir.cleanup()
    _copy_other_files(src, out)
    settings = {"ratio": job.ratio, "importance": importance if isinstance(importance, str) else
                type(importance).__name__, "round_to": round_to, "streamed": True} \
        if plan is None else {**plan.settings, "streamed": True}
    if reconstruct:
        settings.update(reconstruct=True, sequential=True)
    if portable:
        settings["portable"] = True
    return PruningPlan.from_removal(dg, removal, inplace=True, settings=settings)


def _write(dg, removal, model, checkpoint: Checkpoint, sizes, changed, refit_dir, out: Path, max_shard_size,
           progress) -> None:
    """Resize the meta model (shapes and config), then write every tensor sliced, or refit (``refit_dir``)."""
    hf_inplace.prune_in_place(dg, removal, run=False)  # the meta model: new shapes and config

    pruned = dict(model.named_buffers()) | dict(model.named_parameters(remove_duplicate=False))
    specs, axes = {}, {}
    for key in checkpoint.keys():
        if key not in pruned:
            raise FxPruneError(f"checkpoint tensor {key!r} is not a tensor of {type(model).__name__} built from "
                               "config.json (checkpoints whose names transformers converts on loading are not "
                               "supported)")
        axes[key] = changed.get(dg.state.canonical.get(key, key), {})
        shape = tuple(checkpoint.shape(key))
        for axis, layout in axes[key].items():
            shape = shape[:axis] + (sizes.new(layout),) + shape[axis + 1:]
        if shape != tuple(pruned[key].shape):
            raise FxPruneError(f"{key}: sliced to {shape} but the pruned model has {tuple(pruned[key].shape)} "
                               "(a bug in fxprune)")
        specs[key] = (shape, checkpoint.dtype(key))

    refit = Checkpoint(refit_dir.name) if refit_dir is not None and any(Path(refit_dir.name).iterdir()) else None

    def produce(key):
        if refit is not None and key in refit:  # written in the checkpoint's dtype by the refit pass
            return refit.read(key)
        return sliced(checkpoint.read(key), axes[key], sizes)

    write_shards(out, specs, produce, max_shard_size=max_shard_size or min(checkpoint.shard_bytes(), SHARD_CAP),
                 progress=progress)
    model.config.save_pretrained(out)


DATA_AWARE = ("activation", "wanda", "obs")


def _data_aware(importance) -> bool:
    from fxprune.calibration.criteria import ActivationCriterion

    return importance in DATA_AWARE if isinstance(importance, str) else isinstance(importance, ActivationCriterion)


def _calibration(calibration, importance, reconstruct: bool, plan):
    """The calibration batches as a list (read once per pass), after checking the options that need them."""
    if calibration is None:
        if reconstruct:
            raise ValueError("reconstruct=True needs calibration batches: pass calibration=[batch, ...] (a batch "
                             "is a tensor, a tuple of positional inputs or a dict of keyword inputs)")
        if plan is None and _data_aware(importance):
            raise ValueError(f"importance={importance!r} needs calibration batches: prune_checkpoint then runs the "
                             "model one decoder layer at a time (pass calibration=[batch, ...])")
        return None
    if not isinstance(calibration, (list, tuple)):
        calibration = list(calibration)
    if not calibration:
        raise ValueError("calibration data is empty: pass at least one batch")
    if not reconstruct and (plan is not None or not _data_aware(importance)):
        raise ValueError(f"calibration batches are read by importance={list(DATA_AWARE)} and reconstruct=True; "
                         f"importance={importance!r} without reconstruct=True would not use them")
    return list(calibration)


def _missing_buffers(gm, model, checkpoint: Checkpoint, aliases: dict) -> dict:
    """The buffers the graph reads and the checkpoint does not hold (non-persistent: rotary ``inv_freq``), built
    for real by the model's own constructor with every parameter on the meta device."""
    wanted = [n.target for n in gm.graph.find_nodes(op="get_attr")
              if n.target not in checkpoint and aliases.get(n.target) not in checkpoint]
    if not wanted:
        return {}
    from fxprune.huggingface.rebuild import parameters_on_meta

    with parameters_on_meta():
        real = type(model)(model.config)
    buffers = dict(real.named_buffers())
    return {name: buffers[name] for name in wanted if name in buffers and buffers[name].device.type != "meta"}


def _refit(dg, removal, weights, calibration, cut, damping, device, out: Path, progress):
    """The layer-by-layer refit, each block's refit tensors saved (in the checkpoint's dtype) into a temporary
    folder inside ``out`` as soon as the block is done; returns the folder (a ``TemporaryDirectory``)."""
    from safetensors.torch import save_file

    from fxprune.io.checkpoint.layerwise import layerwise_refit

    out.mkdir(parents=True, exist_ok=True)
    folder = tempfile.TemporaryDirectory(prefix=".fxprune-refit-", dir=out)
    pruned_gm = rewrite(dg, removal)  # the pruned graph over meta tensors: its shapes and code

    def sink(segment, tensors):
        if tensors:
            keys = {weights.key(name): t for name, t in tensors.items()}
            save_file({k: t.to("cpu", weights.checkpoint.dtype(k)).contiguous() for k, t in keys.items()},
                      Path(folder.name) / f"segment-{segment.index:05d}.safetensors")

    try:
        layerwise_refit(dg, removal, pruned_gm, weights, calibration, sink, cut, damping, device or "cpu", progress)
    except BaseException:
        folder.cleanup()
        raise
    return folder


def meta_model(config) -> torch.nn.Module:
    """The model ``config`` describes, built on the meta device (no memory for weights), in eval mode.

    The class is ``config.architectures[0]``, as ``fxprune.load_pretrained`` picks it; a config without
    architectures gets ``AutoModelForCausalLM``'s class for its model type.
    """
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    with torch.device("meta"):
        if cls is None:
            return transformers.AutoModelForCausalLM.from_config(config).eval()
        return cls(config).eval()


def _open(src: Path, out: Path):
    """``(Checkpoint, config)`` of ``src`` after checking both folders; errors say what is missing."""
    import transformers

    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} has no config.json: prune_checkpoint builds the model from it "
                                "(a folder written by save_pretrained)")
    checkpoint = Checkpoint(src)
    if out.resolve() == src.resolve():
        raise ValueError(f"out_dir is the source folder {src}: write the pruned checkpoint elsewhere")
    if out.exists() and any(out.glob("*.safetensors")):
        raise ValueError(f"{out} already holds safetensors files: choose an empty or new folder")
    return checkpoint, transformers.AutoConfig.from_pretrained(src)


def _tied_names(model: torch.nn.Module, checkpoint: Checkpoint) -> dict:
    """``{model tensor name: the checkpoint name it is saved under}`` for tied tensors saved once."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(tensor), []).append(name)
    out = {}
    for names in by_id.values():
        saved = [n for n in names if n in checkpoint]
        for name in names:
            if name not in checkpoint and saved:
                out[name] = saved[0]
    return out


def _copy_other_files(src: Path, out: Path) -> None:
    """Tokenizer, generation config and other small files; never weights, the index or the old config."""
    for path in src.iterdir():
        if path.is_file() and path.name not in ("config.json", INDEX) and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out / path.name)
