"""Torch-Pruning's documented recipe, applied to any benchmark model, so that it is compared at its best.

Its README prunes with ``tp.pruner.MetaPruner(model, example_inputs,
importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
ignored_layers=[final classifier])``. Torch-Pruning never protects a model's
outputs by itself, so :func:`output_layers` adds every layer that produces an
output (found by walking back from the outputs), and the per-family extras of
its examples are applied:

* torchvision ViT: ``round_to=num_heads`` and ``model.hidden_dim`` updated after pruning
  (examples/torchvision_models);
* timm attention (modules with ``num_heads`` and ``qkv``): ``num_heads={qkv: heads}``, then
  ``num_heads``/``head_dim`` updated (examples/timm_models), and ``attn_dim`` too, which newer timm reads;
* Hugging Face BERT/ViT: ``num_heads`` for query/key/value, ``prune_num_heads=True``,
  ``prune_head_dims=False``, ``head_pruning_ratio=0.5``, attention sizes updated (examples/transformers);
* Hugging Face LLaMA-style decoders: ``num_heads`` for q/k/v (kv heads for k/v),
  ``prune_num_heads=True``, ``prune_head_dims=False``, ``round_to=4``, ``lm_head`` ignored,
  attention and MLP sizes updated (examples/LLMs/prune_llm.py);
* RAFT: ``corr_block``, ``update_block`` and ``mask_predictor`` ignored (examples/torchvision_models).

Example::

    >>> model, args, kwargs = zoo.build("tv:resnet18")
    >>> prune("tv:resnet18", model, args, kwargs, 0.5)    # in place, like Torch-Pruning itself
    >>> model.fc.in_features
    256
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn


def available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def tp_inputs(model, args, kwargs):
    """Torch-Pruning calls ``model(x)``, ``model(*tuple)`` or ``model(**dict)``: keyword models get a dict."""
    if kwargs or _is_hf(model):
        return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    return args[0] if len(args) == 1 else tuple(args)


def prune(name: str, model: nn.Module, args, kwargs, ratio: float, round_to: int | None = None) -> nn.Module:
    """Prune ``model`` in place with the recipe for ``name`` (``source:model``); returns it."""
    import torch_pruning as tp

    extra, fixups = _family_recipe(name, model, ratio)
    ignored = _unique(output_layers(model, args, kwargs) + _classifiers(model) + extra.pop("ignored", []))
    if round_to:
        extra["round_to"] = round_to
    with torch.enable_grad():  # Torch-Pruning traces the autograd graph of one forward pass
        pruner = tp.pruner.MetaPruner(
            model, tp_inputs(model, args, kwargs),
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=ignored, **extra)
        pruner.step()
    for fix in fixups:
        fix(pruner)
    return model


def analyze(model: nn.Module, args, kwargs):
    """Torch-Pruning's analysis step alone: ``tp.DependencyGraph().build_dependency``."""
    import torch_pruning as tp

    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=tp_inputs(model, args, kwargs),
                                                     verbose=False)


def _classifiers(model: nn.Module) -> list:
    """The README's rule: the final classifier (a Linear with one output per class) is never pruned."""
    classes = getattr(model, "num_classes", 1000)
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]


def output_layers(model: nn.Module, args, kwargs) -> list:
    """Layers (and bare parameters) whose output channels reach a model output without another layer between."""
    try:
        return _output_layers_fx(model)
    except Exception:  # not symbolically traceable (Hugging Face, data-dependent code): watch one forward pass
        return _output_layers_hooks(model, args, kwargs)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _output_layers_fx(model: nn.Module) -> list:
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    found, seen = [], set()
    stack = list(gm.graph.find_nodes(op="output"))
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and _has_params(modules[node.target]):
            found.append(model.get_submodule(node.target))
            continue
        if node.op == "get_attr" and node.target in params:
            found.append(params[node.target])
            continue
        stack.extend(node.all_input_nodes)
    return found


def _output_layers_hooks(model: nn.Module, args, kwargs) -> list:
    """Leaf modules whose output storage is an output's, following parameter-free leaves (activations) back."""
    calls, keep = [], []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            ins = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
            calls.append((module, ins, output.untyped_storage().data_ptr()))
            keep.append(output)  # no storage is freed and reused while we match pointers

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    targets = {t.untyped_storage().data_ptr() for t in _tensors(out)}
    found = []
    for module, ins, ptr in reversed(calls):
        if ptr in targets:
            if _has_params(module):
                found.append(module)
            else:
                targets |= ins
    return found


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _unique(items: list) -> list:
    out, ids = [], set()
    for item in items:
        if id(item) not in ids:
            ids.add(id(item))
            out.append(item)
    return out


def _is_hf(model) -> bool:
    return any(c.__module__.startswith("transformers") for c in type(model).__mro__)


def _family_recipe(name: str, model: nn.Module, ratio: float) -> tuple[dict, list]:
    """(extra MetaPruner arguments, fix-ups run after ``step()``) from Torch-Pruning's examples."""
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        def fix_hidden(pruner):
            model.hidden_dim = model.conv_proj.out_channels
        return {"round_to": model.encoder.layers[0].num_heads}, [fix_hidden]
    if name.endswith(("raft_small", "raft_large")):
        raft = getattr(model, "raft", model)  # zoo wraps RAFT to fix its number of flow updates
        return {"ignored": [raft.corr_block, raft.update_block, raft.mask_predictor]}, []
    if name.startswith("timm:"):
        return _timm_attention(model)
    if _is_hf(model):
        return _hf_recipe(model, ratio)
    return {}, []


def _timm_attention(model: nn.Module) -> tuple[dict, list]:
    heads = {m.qkv: m.num_heads for m in model.modules()
             if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear)}
    if not heads:
        return {}, []

    def fix_heads(pruner):
        for m in model.modules():
            if getattr(m, "qkv", None) in heads:
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):  # timm >= 1.0.20 reshapes to attn_dim, which the recipe predates
                    m.attn_dim = m.num_heads * m.head_dim
    return {"num_heads": dict(heads)}, [fix_heads]


def _hf_recipe(model: nn.Module, ratio: float) -> tuple[dict, list]:
    config = model.config
    # a config without attention (ConvNeXt) has no head count: only attention modules below read it
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    heads, bert_like, separate = {}, [], []
    for m in model.modules():
        if all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads")):
            bert_like.append(m)
            heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                          m.value: m.num_attention_heads})
        elif all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim")):
            separate.append(m)  # LLaMA-style decoders, and ViT since transformers 5
            heads.update({m.q_proj: config.num_attention_heads, m.k_proj: kv_heads, m.v_proj: kv_heads})
    if not heads:
        return {}, []  # GPT-2, T5: no recipe in Torch-Pruning's examples; the generic one applies
    extra = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": ratio}
    lm_head = getattr(model, "lm_head", None)

    def fix_sizes(pruner):
        for m in bert_like:
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
        for m in separate:
            num_heads, kv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
            if hasattr(m, "num_attention_heads"):
                m.num_attention_heads = num_heads
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = num_heads // kv
            config.num_attention_heads = num_heads
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = kv
        if lm_head is not None and separate:
            config.hidden_size = lm_head.in_features
            ups = [m.up_proj for m in model.modules() if isinstance(getattr(m, "up_proj", None), nn.Linear)]
            if ups:
                config.intermediate_size = ups[0].out_features

    if lm_head is not None and separate:
        extra.update(round_to=4, ignored=[lm_head])
    return extra, [fix_sizes]
