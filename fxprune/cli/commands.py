"""The ``fxprune`` command: inspect, prune, replay and draw a model's dependency groups.

::

    fxprune inspect torchvision:resnet50                     # the group table
    fxprune prune torchvision:resnet50 --ratio 0.5 --out resnet50-pruned
    fxprune prune tests.models:ResidualCNN --ratio 0.5 --input-shape 1,3,32,32 --out pruned.pt
    fxprune prune hf:llama-folder --ratio 0.3 --calibration lines.txt --importance activation \
        --reconstruct --distill-seconds 600 --out llama-pruned
    fxprune prune hf:llama-70b --ratio 0.3 --streaming --out llama-70b-pruned   # shard by shard, not loaded
    fxprune replay resnet50-pruned/plan.json torchvision:resnet50 --out again
    fxprune graph torchvision:resnet18 --out groups.png

MODEL is ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH``, ``module.path:factory``,
a folder written by ``fxprune.save`` or a ``torch.save``'d model (see
:mod:`fxprune.cli.model_spec`). ``prune`` writes a folder (``fxprune.save``: JSON and
safetensors, no pickle, with ``plan.json``) unless ``--out`` ends in ``.pt``/``.pth``
(``torch.save`` of the whole module, plus ``NAME.plan.json`` beside it).

``--calibration PATH`` gives ``prune`` calibration batches (for ``--importance activation``/``wanda``/
``taylor``/``hessian`` and ``--reconstruct``): a ``.pt``/``.pth`` file holding a list of batches, or one
tensor split into ``--calibration-batch-size`` rows; for a Hugging Face model, a ``.txt`` file whose non-empty
lines are tokenized with the model folder's tokenizer into padded batches of keyword inputs (at most
``--calibration-max-length`` tokens), which then also serve as the example inputs (two rows) so that the
graph takes the same keywords (see :mod:`fxprune.calibration.batches`). ``--distill-steps``/
``--distill-seconds`` then train the pruned model to match the original on those batches
(``fxprune.distill``) before it is measured and saved.

``--streaming`` (``hf:DIR`` only) prunes the checkpoint's safetensors shards one tensor at a time on a
meta-device analysis (:func:`fxprune.prune_checkpoint`): the model is never loaded whole and there is no
before/after measurement; ``--out`` is the pruned checkpoint folder. Importance is a magnitude (l2, l1,
lamp), or with ``--calibration`` also activation, wanda or obs, and ``--reconstruct`` refits the layers
that lose inputs: the model then runs one decoder layer at a time (``.pt``/``.pth`` batches, or a ``.txt``
file tokenized with the folder's tokenizer).

Errors are printed as one paragraph; ``--debug`` shows the traceback instead.
Progress bars go to stderr when it is a terminal.

A ``.txt`` calibration file is tokenized with ``local_files_only``. ``--isomorphic`` needs ``--global`` (else an
error naming both flags), also with ``--streaming``. ``--distill-steps``/``--distill-seconds``/``--distill-lr`` run
``fxprune.distill`` on the pruned copy against the loaded, untouched original.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

PT_SUFFIXES = (".pt", ".pth")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place where any error becomes a message instead of a traceback
        if args.debug:
            raise
        print(error_paragraph(exc), file=sys.stderr)
        return 1


def error_paragraph(exc: BaseException) -> str:
    """``fxprune: error: <message>`` plus a pointer to ``--debug``; the type is named unless it is ours."""
    from fxprune.errors import FxPruneError

    message = str(exc).strip() or repr(exc)
    if not isinstance(exc, (FxPruneError, ValueError, FileNotFoundError)):
        message = f"{type(exc).__name__}: {message}"
    return f"fxprune: error: {message}\n(run again with --debug to see the traceback)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description="Structural pruning on torch.fx graphs.")
    parser.add_argument("--version", action="version", version=f"fxprune {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect_ = commands.add_parser("inspect", help="print the dependency groups of a model")
    _model_arguments(inspect_)
    inspect_.add_argument("--limit", type=int, default=6, help="members listed per group (default 6)")
    inspect_.set_defaults(run=run_inspect)

    prune = commands.add_parser("prune", help="prune a model, compare before/after, save it")
    _model_arguments(prune)
    prune.add_argument("--ratio", type=float, help="fraction of every prunable group's units to remove")
    prune.add_argument("--importance", default="l2",
                       help="unit importance criterion: l2 (default), l1, lamp, fpgm, bn_scale, random; "
                            "activation, wanda, taylor, hessian need --calibration")
    prune.add_argument("--target-macs", type=float, help="fraction of the MACs to keep (instead of --ratio)")
    prune.add_argument("--round-to", type=int, help="channel alignment: weight widths that were multiples of it stay "
                       "multiples (default 8; 1 turns it off)")
    prune.add_argument("--prune-head-dims", action="store_true",
                       help="also prune attention's per-head widths (default: whole heads only)")
    prune.add_argument("--target-latency", type=float,
                       help="fraction of the CPU latency to keep, measured on the example input (instead of --ratio)")
    prune.add_argument("--global", dest="global_pruning", action="store_true",
                       help="rank the units of all groups together instead of pruning each group by --ratio")
    prune.add_argument("--isomorphic", action="store_true",
                       help="with --global: rank units only among groups of the same structure (every layer's "
                            "heads, every same-width MLP), each such class losing --ratio of its units")
    prune.add_argument("--depth", type=float, metavar="FRACTION",
                       help="also remove this fraction of the removable residual branches (depth pruning)")
    prune.add_argument("--layers", type=int, metavar="K", help="also remove K whole layers (depth pruning)")
    prune.add_argument("--depth-importance", choices=("block_influence", "output_error", "magnitude"),
                       help="how removed branches or layers are chosen (default: block_influence with --calibration, "
                            "else magnitude)")
    prune.add_argument("--portable", action="store_true",
                       help="only widths the model's config can state (Hugging Face, diffusers): with --streaming, "
                            "transformers' own from_pretrained reloads the output folder")
    prune.add_argument("--ignore", action="append", default=[], metavar="NAME",
                       help="module or parameter name whose axes must not change (repeatable)")
    calibration = prune.add_argument_group("calibration and distillation")
    calibration.add_argument("--calibration", metavar="PATH",
                             help="calibration batches: a .pt/.pth file (a list of batches, or one tensor split "
                                  "into batches), or a .txt file of lines for an hf: model (its tokenizer)")
    calibration.add_argument("--calibration-batch-size", type=int, default=8, metavar="N",
                             help="rows (or lines) per calibration batch when splitting (default 8)")
    calibration.add_argument("--calibration-max-length", type=int, default=128, metavar="TOKENS",
                             help="tokens per line of a .txt calibration file, at most (default 128)")
    calibration.add_argument("--reconstruct", action="store_true",
                             help="refit the layers that lose inputs on the calibration batches (least squares)")
    calibration.add_argument("--distill-steps", type=int, metavar="N",
                             help="after pruning, train the pruned model N steps to match the original on the "
                                  "calibration batches (fxprune.distill)")
    calibration.add_argument("--distill-seconds", type=float, metavar="S",
                             help="distill for at most S seconds (with --distill-steps: whichever comes first)")
    calibration.add_argument("--distill-lr", type=float, default=1e-4, metavar="LR",
                             help="distillation learning rate (AdamW, default 1e-4)")
    streaming = prune.add_argument_group("checkpoints larger than memory")
    streaming.add_argument("--streaming", action="store_true",
                           help="hf:DIR only: prune the checkpoint's safetensors shards one tensor at a time without "
                                "loading the model (fxprune.prune_checkpoint; importance l2, l1 or lamp; with "
                                "--calibration also activation, wanda, obs and --reconstruct, one decoder layer at "
                                "a time); --out is the pruned checkpoint folder")
    streaming.add_argument("--max-shard-size", metavar="SIZE",
                           help="with --streaming: largest output shard, e.g. 2GB (default: the largest source "
                                "shard, at most 1GB)")
    _output_arguments(prune)
    prune.set_defaults(run=run_prune)

    replay = commands.add_parser("replay", help="apply a saved plan.json to the original model")
    replay.add_argument("plan_file", metavar="PLAN", help="a plan.json written by fxprune prune (or PruningPlan.save)")
    _model_arguments(replay)
    _output_arguments(replay)
    replay.set_defaults(run=run_replay)

    graph = commands.add_parser("graph", help="draw the dependency groups (png, svg, pdf or dot)")
    _model_arguments(graph)
    graph.add_argument("--out", default="groups.png", help="picture file; the suffix picks the format")
    graph.add_argument("--engine", choices=("auto", "graphviz", "matplotlib"), default="auto",
                       help="auto: Graphviz when installed, else networkx + matplotlib")
    graph.set_defaults(run=run_graph)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="torchvision:NAME, timm:NAME, hf:PATH, module.path:factory, or a saved model")
    parser.add_argument("--input-shape", action="append", default=[], metavar="SHAPE",
                        help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")
    parser.add_argument("--input-dtype", help="example input dtype (float32, int64, ...)")
    parser.add_argument("--model-kwargs", default="{}", metavar="JSON",
                        help="keyword arguments for the model constructor, as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output folder (fxprune.save), or a .pt/.pth file (torch.save); "
                                      "default: MODELNAME-pruned")
    parser.add_argument("--plan", dest="plan_out", metavar="PATH", help="also write the pruning plan to this JSON file")
    parser.add_argument("--latency-runs", type=int, default=10, help="timed CPU runs (0: skip latency)")
    parser.add_argument("--threads", type=int, help="CPU threads for the latency runs (default: torch's)")


# -- commands ---------------------------------------------------------------

def run_inspect(args) -> int:
    import fxprune

    with _steps(args, 2) as step:
        loaded = _load(args, step)
        step("analyze")
        start = time.perf_counter()
        dg = fxprune.analyze(loaded.model, loaded.example_inputs, kwargs=loaded.kwargs or None)
        elapsed = time.perf_counter() - start
    print(f"{loaded.name}: {len(dg.groups)} groups, {len(dg.prunable_groups)} prunable, "
          f"analysis {elapsed:.2f}s, input {_shapes(loaded.example_inputs)}")
    print(dg.report(limit=args.limit))
    return 0


def run_prune(args) -> int:
    import fxprune

    if args.isomorphic and not args.global_pruning:
        raise ValueError("--isomorphic ranks units globally within each class of same-structure groups: add "
                         "--global")
    if args.streaming:
        return run_streaming(args)
    if args.max_shard_size:
        raise ValueError("--max-shard-size sizes the shards --streaming writes; add --streaming")
    options = _prune_options(args)
    distilling = args.distill_steps is not None or args.distill_seconds is not None
    with _steps(args, 5 + bool(args.calibration) + distilling) as step:
        loaded = _load(args, step)
        if args.calibration:
            options["calibration"] = _calibration(args, loaded, step)
        before = _measure(args, loaded, loaded.model, step, "measure original")
        step("prune")
        start = time.perf_counter()
        pruned = fxprune.prune(loaded.model, example_inputs=loaded.example_inputs, kwargs=loaded.kwargs or None,
                               **options)
        elapsed = time.perf_counter() - start
        how = f"pruned in {elapsed:.2f}s ({_describe(options)})"
        if distilling:  # the original is intact (prune works on a copy): it is the teacher
            step("distill")
            result = fxprune.distill(pruned, loaded.model, options["calibration"], steps=args.distill_steps,
                                     time_budget=args.distill_seconds, lr=args.distill_lr,
                                     hidden_states=_is_hf(pruned), progress=False if args.quiet else None)
            how += (f", distilled {result.steps} steps in {result.seconds:.1f}s "
                    f"({result.loss} loss {result.first_loss:.4g} -> {result.last_loss:.4g})")
        after = _measure(args, loaded, pruned, step, "measure pruned")
        step("save")
        out = _save(args, pruned, loaded.name)
    _report(loaded, before, after, how, out)
    return 0


def run_streaming(args) -> int:
    """``prune hf:DIR --streaming``: the checkpoint pruned shard by shard (:func:`fxprune.prune_checkpoint`)."""
    import fxprune
    from fxprune.io.checkpoint import Checkpoint

    folder = _hf_folder(args.model)
    if folder is None:
        raise ValueError(f"--streaming prunes a Hugging Face checkpoint folder: give hf:DIR (a folder with a "
                         f"config.json), not {args.model!r}")
    unsupported = [flag for flag, on in (
        ("--distill-steps", args.distill_steps is not None), ("--distill-seconds", args.distill_seconds is not None),
        ("--target-latency", args.target_latency is not None), ("--prune-head-dims", args.prune_head_dims),
        ("--depth", args.depth is not None), ("--layers", args.layers is not None),
        ("--input-shape", args.input_shape)) if on]
    if unsupported:
        raise ValueError(f"--streaming reads the weights one tensor (or one decoder layer) at a time: "
                         f"{', '.join(unsupported)} need(s) the model loaded (drop --streaming)")
    if args.reconstruct and not args.calibration:
        raise ValueError("--reconstruct refits on calibration batches: add --calibration PATH")
    if args.ratio is None and args.target_macs is None:
        raise ValueError("give --ratio (fraction of units to remove) or --target-macs (fraction of MACs to keep)")
    out = Path(args.out or f"{Path(folder).name}-pruned")
    batches = _streaming_calibration(args, folder) if args.calibration else None
    start = time.perf_counter()
    plan = fxprune.prune_checkpoint(folder, out, args.ratio, importance=args.importance, ignore=tuple(args.ignore),
                                    round_to=args.round_to, global_pruning=args.global_pruning,
                                    isomorphic=args.isomorphic, target_macs=args.target_macs, calibration=batches,
                                    reconstruct=args.reconstruct, max_shard_size=args.max_shard_size,
                                    progress=False if args.quiet else None, portable=args.portable)
    elapsed = time.perf_counter() - start
    if args.plan_out:
        plan.save(args.plan_out)
    before, after = (_checkpoint_params(Checkpoint(f)) for f in (folder, out))
    print(f"{args.model}: pruned shard by shard in {elapsed:.2f}s; parameters {before:,} -> {after:,} "
          f"({after / before:.1%}); {sum(len(g.kept) < g.units for g in plan.groups)} of {len(plan.groups)} "
          f"groups lose units")
    print(f"saved to {out}/ (transformers' from_pretrained, or fxprune.load_pretrained when widths differ per layer)")
    return 0


def _streaming_calibration(args, folder) -> list:
    """``--calibration`` batches for ``--streaming``: a ``.pt``/``.pth`` file, or a ``.txt`` file tokenized with the
    folder's tokenizer (the first batch is the example the graph is captured with: every batch's keywords)."""
    from fxprune.calibration.batches import PT_SUFFIXES, load_batches, load_tokenizer, read_lines, text_batches

    path = Path(args.calibration)
    suffix = path.suffix.lower()
    if suffix in PT_SUFFIXES:
        return load_batches(path, args.calibration_batch_size)
    if suffix == ".txt":
        return text_batches(load_tokenizer(folder), read_lines(path), args.calibration_batch_size,
                            args.calibration_max_length)
    raise ValueError(f"--calibration {path}: use a .pt/.pth file (a list of batches or one tensor) or a .txt file "
                     "of lines")


def _checkpoint_params(checkpoint) -> int:
    import math

    return sum(math.prod(checkpoint.shape(k)) for k in checkpoint.keys())


def run_replay(args) -> int:
    import fxprune

    plan = fxprune.PruningPlan.load(args.plan_file)
    with _steps(args, 5) as step:
        loaded = _load(args, step)
        recorded, recorded_kwargs = plan.example_inputs()
        if recorded is not None and not args.input_shape:  # the inputs the plan was made with
            loaded.example_inputs, loaded.kwargs = tuple(recorded), dict(recorded_kwargs or {})
        before = _measure(args, loaded, loaded.model, step, "measure original")
        step("replay")
        start = time.perf_counter()
        pruned = fxprune.replay(plan, loaded.model, loaded.example_inputs, kwargs=loaded.kwargs or None)
        elapsed = time.perf_counter() - start
        after = _measure(args, loaded, pruned, step, "measure pruned")
        step("save")
        out = _save(args, pruned, loaded.name)
    _report(loaded, before, after, f"replayed {args.plan_file} in {elapsed:.2f}s", out)
    return 0


def run_graph(args) -> int:
    import fxprune
    from fxprune.cli.drawing import draw_groups

    with _steps(args, 3) as step:
        loaded = _load(args, step)
        step("analyze")
        dg = fxprune.analyze(loaded.model, loaded.example_inputs, kwargs=loaded.kwargs or None)
        step("draw")
        path = draw_groups(dg, args.out, engine=args.engine, title=f"{loaded.name}: dependency groups")
    print(f"{loaded.name}: {len(dg.prunable_groups)} prunable groups drawn to {path}")
    return 0


# -- helpers ----------------------------------------------------------------

def _prune_options(args) -> dict:
    """prune() keyword arguments from the flags; --target-macs only if this fxprune's prune() has it."""
    import fxprune

    depth = getattr(args, "depth", None) is not None or getattr(args, "layers", None) is not None
    if args.ratio is None and args.target_macs is None and args.target_latency is None and not depth:
        raise ValueError("give --ratio (fraction of units to remove), --target-macs (fraction of MACs to keep), "
                         "--target-latency (fraction of the latency to keep), --depth or --layers")
    if (args.reconstruct or args.distill_steps is not None or args.distill_seconds is not None) and \
            not args.calibration:
        raise ValueError("--reconstruct, --distill-steps and --distill-seconds need --calibration PATH "
                         "(a .pt file of batches, or a .txt file of lines for an hf: model)")
    for flag, value in (("--distill-steps", args.distill_steps), ("--distill-seconds", args.distill_seconds)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value:g}")
    options = {"importance": args.importance, "round_to": args.round_to, "ignore": tuple(args.ignore)}
    if args.reconstruct:
        options["reconstruct"] = True
    if args.prune_head_dims:
        options["prune_head_dims"] = True
    if args.ratio is not None:
        options["ratio"] = args.ratio
    for name in ("depth", "layers", "depth_importance"):  # depth pruning (with or without width)
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    supported = inspect.signature(fxprune.prune).parameters
    for flag, name, value in (("--target-macs", "target_macs", args.target_macs),
                              ("--target-latency", "target_latency", args.target_latency),
                              ("--global", "global_pruning", args.global_pruning or None),
                              ("--isomorphic", "isomorphic", args.isomorphic or None),
                              ("--portable", "portable", args.portable or None)):
        if value is None:
            continue
        if name not in supported:
            raise ValueError(f"{flag} is not supported by this version of fxprune.prune (it has no {name} "
                             "argument); use --ratio")
        options[name] = value
    return options


def _load(args, step):
    from fxprune.cli.model_spec import load_model, parse_shape

    step(f"load {args.model}")
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-kwargs is not JSON: {exc}") from None
    if not isinstance(model_kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    shapes = [parse_shape(s) for s in args.input_shape]
    return load_model(args.model, shapes or None, args.input_dtype, model_kwargs)


def _calibration(args, loaded, step) -> list:
    """The ``--calibration`` batches; text lines are tokenized with the Hugging Face model's own tokenizer and,
    unless ``--input-shape`` was given, the first two tokenized rows become the example input (as keywords), so
    the captured graph takes the keywords the batches hold."""
    import torch

    from fxprune.calibration.batches import PT_SUFFIXES as BATCH_FILES
    from fxprune.calibration.batches import load_batches, load_tokenizer, read_lines, text_batches

    step(f"read {args.calibration}")
    path = Path(args.calibration)
    suffix = path.suffix.lower()
    if suffix in BATCH_FILES:
        batches = load_batches(path, args.calibration_batch_size)
    elif suffix == ".txt":
        folder = _hf_folder(args.model)
        if folder is None or not _is_hf(loaded.model):
            raise ValueError(f"--calibration {path}: a .txt file needs a Hugging Face model (hf:PATH) whose folder "
                             "has a tokenizer; for other models save a list of batches as a .pt file")
        batches = text_batches(load_tokenizer(folder), read_lines(path), args.calibration_batch_size,
                               args.calibration_max_length)
    else:
        raise ValueError(f"--calibration {path}: use a .pt/.pth file (a list of batches or one tensor) or, for an "
                         "hf: model, a .txt file of lines")
    first = batches[0]
    if isinstance(first, dict) and not args.input_shape:  # keyword batches: capture with the same keywords
        loaded.example_inputs = ()
        # two rows, not one: export specialises a dimension of size 1, and the graph would take one row only
        loaded.kwargs = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in first.items()}
    return batches


def _hf_folder(spec: str):
    """The local folder of a Hugging Face model spec (``hf:PATH`` or a checkpoint folder), else None."""
    import os

    path = spec[3:] if spec.startswith("hf:") else spec
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def _is_hf(model) -> bool:
    from fxprune.analysis.capture import is_hf_model

    return is_hf_model(model)


def _measure(args, loaded, model, step, label):
    from fxprune.cli.comparison import measure

    step(label)
    with _bar(args, args.latency_runs, label) as bar:
        return measure(model, loaded.example_inputs, loaded.kwargs, runs=args.latency_runs, threads=args.threads,
                       progress=bar)


def _save(args, pruned, name: str) -> Path:
    import torch

    import fxprune

    out = Path(args.out or f"{name}-pruned")
    if out.suffix.lower() in PT_SUFFIXES:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pruned, out)
        if _has_plan(pruned):  # depth pruning alone leaves no plan of units to replay
            fxprune.plan_of(pruned).save(out.with_suffix(".plan.json"))
    else:
        fxprune.save(pruned, out)
    if args.plan_out:
        fxprune.plan_of(pruned).save(args.plan_out)
    return out


def _has_plan(pruned) -> bool:
    return isinstance(getattr(pruned, "meta", None), dict) and pruned.meta.get("fxprune_plan") is not None


def _report(loaded, before, after, how: str, out: Path) -> None:
    from fxprune.cli.comparison import comparison_table

    print(f"{loaded.name}: {how}, input {_inputs(loaded)}")
    print(comparison_table(before, after))
    planned = (out.with_suffix(".plan.json") if out.suffix.lower() in PT_SUFFIXES else out / "plan.json").exists()
    if out.suffix.lower() in PT_SUFFIXES:
        print(f"saved to {out} (torch.load(path, weights_only=False))"
              + (f" and {out.with_suffix('.plan.json')}" if planned else ""))
    else:
        print(f"saved to {out}/ (fxprune.load(path)" + (f"; plan in {out / 'plan.json'})" if planned else ")"))


def _describe(options: dict) -> str:
    shown = {k: f"{len(v)} batches" if k == "calibration" else v for k, v in options.items()}
    return ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None and not (isinstance(v, tuple) and not v))


def _inputs(loaded) -> str:
    """The example inputs' shapes; keyword inputs as ``name=shape``."""
    named = " ".join(f"{k}={_shapes((v,))}" for k, v in (loaded.kwargs or {}).items())
    return " ".join(part for part in (_shapes(loaded.example_inputs), named) if part)


def _shapes(inputs) -> str:
    return " ".join("x".join(str(s) for s in getattr(x, "shape", ())) or type(x).__name__ for x in inputs)


@contextmanager
def _steps(args, total: int):
    """A progress bar over a command's steps; ``step(label)`` advances it and names the current step."""
    with _bar(args, total, "fxprune") as bar:
        first = [True]

        def step(label: str) -> None:
            if bar is None:
                return
            if not first[0]:
                bar.update(1)
            first[0] = False
            bar.set_description_str(label)

        yield step
        if bar is not None:
            bar.update(1)


@contextmanager
def _bar(args, total: int, label: str):
    if args.quiet or total <= 0:
        yield None
        return
    from tqdm.auto import tqdm

    # disable=None: bars only when stderr is a terminal, so logs and pipes stay clean
    with tqdm(total=total, desc=label, file=sys.stderr, leave=False, disable=None,
              bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]") as bar:
        yield bar


def _version() -> str:
    from fxprune import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
