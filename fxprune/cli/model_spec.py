"""Turn a command-line model spec into a model and example inputs.

Specs:

=========================  ==========================================================================
``torchvision:resnet50``   ``torchvision.models.get_model(name, weights=None)``; input 1x3x224x224
``timm:convnext_tiny``     ``timm.create_model(name, pretrained=False)``; input from its pretrained_cfg
``hf:path/to/checkpoint``  a local Hugging Face folder, loaded with its ``config.architectures`` class
                           (else ``AutoModel``); input ids 1x16 (pixel values for vision configs)
``pkg.module:factory``     ``import pkg.module; factory(**model_kwargs)`` (the current folder is importable);
                           the factory may return ``model`` or ``(model, example_inputs)``
``pruned/``                a folder written by ``fxprune.save`` (inputs from its plan when it has one)
``model.pt``               a module saved with ``torch.save`` (unpickled: only load files you trust); its
                           plan (and so its input shapes) from ``model.plan.json`` beside it, if there
=========================  ==========================================================================

``input_shapes`` (one shape per positional input) overrides the default inputs.

Example::

    >>> spec = load_model("torchvision:resnet18", input_shapes=[(1, 3, 64, 64)])
    >>> spec.name, spec.example_inputs[0].shape
    ('resnet18', torch.Size([1, 3, 64, 64]))
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

import torch

from fxprune.errors import FxPruneError

DEFAULT_IMAGE = (1, 3, 224, 224)
DEFAULT_TOKENS = (1, 16)


class ModelSpecError(FxPruneError):
    """A model spec that does not name a loadable model."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example_inputs: tuple
    kwargs: dict = field(default_factory=dict)
    name: str = "model"


def load_model(spec: str, input_shapes=None, input_dtype: str | None = None, model_kwargs=None) -> LoadedModel:
    """Load the model a spec names (see the module docstring), in eval mode, with example inputs."""
    model_kwargs = dict(model_kwargs or {})
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "torchvision":
        loaded = _torchvision(rest, model_kwargs)
    elif sep and prefix == "timm":
        loaded = _timm(rest, model_kwargs)
    elif sep and prefix == "hf":
        loaded = _huggingface(rest, model_kwargs)
    elif os.path.exists(spec):
        loaded = _saved(spec, model_kwargs)
    elif sep and rest:
        loaded = _factory(prefix, rest, model_kwargs)
    else:
        raise ModelSpecError(f"{spec!r} is not a model spec: use torchvision:NAME, timm:NAME, hf:PATH, "
                             "module.path:factory, or the path of a saved model")
    loaded.model.eval()
    if input_shapes:
        dtype = _dtype(input_dtype) if input_dtype else _default_dtype(loaded.example_inputs)
        loaded.example_inputs = tuple(_example(shape, dtype) for shape in input_shapes)
    elif input_dtype:
        loaded.example_inputs = tuple(_example(tuple(x.shape), _dtype(input_dtype)) for x in loaded.example_inputs)
    return loaded


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ModelSpecError(f"--input-shape {text!r} is not a shape like 1,3,224,224")
    return shape


def _example(shape, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.randint(0, 2, shape, generator=generator).to(dtype)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelSpecError(f"--input-dtype {name!r} is not a torch dtype (float32, int64, ...)")
    return dtype


def _default_dtype(inputs) -> torch.dtype:
    return inputs[0].dtype if inputs and isinstance(inputs[0], torch.Tensor) else torch.float32


def _torchvision(name: str, model_kwargs: dict) -> LoadedModel:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, **model_kwargs)
    except ValueError as exc:
        raise ModelSpecError(f"torchvision has no model {name!r} ({exc})") from None
    size = model_kwargs.get("image_size", DEFAULT_IMAGE[-1])
    return LoadedModel(model, (_example((1, 3, size, size), torch.float32),), name=name)


def _timm(name: str, model_kwargs: dict) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise ModelSpecError("timm:NAME needs timm: pip install timm") from None
    try:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ModelSpecError(f"timm: {exc}") from None
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", DEFAULT_IMAGE[1:]))
    return LoadedModel(model, (_example((1, *size), torch.float32),), name=name)


def _huggingface(path: str, model_kwargs: dict) -> LoadedModel:
    import transformers

    if not os.path.isdir(path):
        raise ModelSpecError(f"hf:{path}: no such folder (a local checkpoint folder with a config.json)")
    config = transformers.AutoConfig.from_pretrained(path)
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, architecture, None) if architecture else None
    model = (cls or transformers.AutoModel).from_pretrained(path, **model_kwargs)
    kwargs = {}
    if hasattr(config, "image_size") and hasattr(config, "num_channels") and not hasattr(config, "vocab_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        inputs = (_example((1, config.num_channels, size, size), torch.float32),)
    else:
        vocab = getattr(config, "vocab_size", 2) or 2
        inputs = (torch.randint(0, vocab, DEFAULT_TOKENS, generator=torch.Generator().manual_seed(0)),)
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = inputs[0].clone()
    return LoadedModel(model, inputs, kwargs, name=os.path.basename(os.path.normpath(path)))


def _saved(path: str, model_kwargs: dict) -> LoadedModel:
    from fxprune.io.plans import plan_of
    from fxprune.io.serialize import is_saved_model, load

    if model_kwargs:
        raise ModelSpecError("--model-kwargs applies to models built by a factory, not to saved models")
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if os.path.isdir(path):
        if is_saved_model(path):
            model = load(path)
        elif os.path.isfile(os.path.join(path, "config.json")):
            return _huggingface(path, model_kwargs)
        else:
            raise ModelSpecError(f"{path} is neither a folder written by fxprune.save nor a Hugging Face checkpoint")
    else:
        model = torch.load(path, weights_only=False)  # a whole pickled module: the format torch.save gives
        if not isinstance(model, torch.nn.Module):
            raise ModelSpecError(f"{path} holds a {type(model).__name__}, not a model (a state dict needs the "
                                 "model's code: use module.path:factory and load the weights there)")
        plan_file = os.path.splitext(path)[0] + ".plan.json"
        if os.path.isfile(plan_file):  # pickling a GraphModule drops gm.meta, so fxprune prune writes it beside
            from fxprune.io.plans import PruningPlan, attach_plan

            attach_plan(model, PruningPlan.load(plan_file))
    try:
        args, kwargs = plan_of(model).example_inputs()
    except FxPruneError:
        args, kwargs = None, None
    return LoadedModel(model, tuple(args) if args else (_example(DEFAULT_IMAGE, torch.float32),),
                       dict(kwargs or {}), name=name)


def _factory(module_name: str, attr: str, model_kwargs: dict) -> LoadedModel:
    if os.getcwd() not in sys.path:  # console scripts do not put the current folder on sys.path
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} ({exc}); run from the folder that contains it "
                             "or install it") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    made = obj(**model_kwargs) if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
    if not isinstance(made, torch.nn.Module):
        raise ModelSpecError(f"{module_name}:{attr} gave a {type(made).__name__}, not an nn.Module")
    inputs = tuple(inputs) if inputs is not None else (_example(DEFAULT_IMAGE, torch.float32),)
    return LoadedModel(made, inputs, name=attr.split(".")[-1])
