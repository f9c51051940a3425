"""Torch-Pruning's documented recipe, applied to any benchmark model, so that it is compared at its best.

Its README prunes with ``tp.pruner.BasePruner(model, example_inputs,
importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
ignored_layers=[final classifier])``. Torch-Pruning never protects a model's
outputs by itself, so :func:`output_layers` adds every layer that produces an
output (found by walking back from the outputs), and the extras of its examples are
applied wherever a model has what they are written for, found by one generic rule
(:func:`attention_modules`), never by the model's type:

* attention (examples/LLMs/prune_llm.py, examples/transformers/prune_hf_bert.py, prune_hf_vit.py,
  examples/timm_models): every module with query/key/value projections (``q_proj``, ``query``,
  DistilBERT's ``q_lin``, T5's ``q``, ... :data:`Q_NAMES`) or one fused projection (``qkv``,
  ``qkv_proj``, ``query_key_value``, ``Wqkv``, ... :data:`FUSED_NAMES`) gets ``num_heads``: its head
  count for the query (and a fused) projection, its key/value head count for the key and value
  projections; a fused gate/up projection gets ``out_channel_groups=2`` (prune_llm.py);
* Hugging Face models: whole heads, as its BERT and LLM examples (``prune_num_heads=True``,
  ``prune_head_dims=False``, ``head_pruning_ratio`` = the ratio), the first output traced
  (``output_transform``, as every Hugging Face example does); decoders with an ``lm_head``
  also ``round_to=4`` and ``lm_head`` ignored (prune_llm.py); timm: head dims, its example's default;
* after ``step()``, the attributes its examples patch (:func:`fix_attention`): every head-count
  attribute (``num_heads``, ``num_attention_heads``, ``n_heads``, ``n_head``), key/value head count
  (``num_key_value_heads``, ``num_kv_heads``, ``kv_heads``), ``num_key_value_groups``, head size
  (``head_dim``, ``attention_head_size``, ``head_size``, ``key_value_proj_dim``) and attention
  width (``all_head_size``, ``inner_dim``, ``embed_dim``, ``hidden_size``, ``split_size``, ``dim``,
  ``attn_dim``, ``kv_dim``) of each attention module, from the pruned widths (its examples read
  ``pruner.num_heads``, which can count heads it did not remove); and the config (``hidden_size``,
  ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``) where every layer agrees;
* torchvision ViT: ``round_to=num_heads`` and ``model.hidden_dim`` updated (examples/torchvision_models);
* RAFT: ``corr_block``, ``update_block`` and ``mask_predictor`` ignored (examples/torchvision_models).

Example::

    >>> model, args, kwargs = zoo.build("tv:resnet18")
    >>> prune("tv:resnet18", model, args, kwargs, 0.5)    # in place, like Torch-Pruning itself
    >>> model.fc.in_features
    256
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

# names of an attention module's projections and attributes, across libraries (lower case)
Q_NAMES = {"q", "q_proj", "query", "query_proj", "q_lin", "wq"}
K_NAMES = {"k", "k_proj", "key", "key_proj", "k_lin", "wk"}
V_NAMES = {"v", "v_proj", "value", "value_proj", "v_lin", "wv"}
FUSED_NAMES = {"qkv", "qkv_proj", "query_key_value", "wqkv", "w_pack", "c_attn"}
GATE_UP_NAMES = {"gate_up_proj", "gate_up"}
HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "kv_heads", "n_kv_heads")
GROUPS = ("num_key_value_groups",)
HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
WIDTH = ("all_head_size", "inner_dim", "embed_dim", "hidden_size", "split_size", "dim", "attn_dim")
KV_WIDTH = ("kv_dim",)


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


def prune(name: str, model: nn.Module, args, kwargs, ratio: float, round_to: int | None = None,
          outputs: str = "all") -> nn.Module:
    """Prune ``model`` in place with the recipe for ``name`` (``source:model``); returns it.

    ``outputs="all"`` keeps every output's shape (the layers producing them are ignored); ``"first"`` only the
    first output's (logits, or a base model's last hidden state), as a model pruned in place is checked.
    """
    import torch_pruning as tp

    recipe = Recipe.for_model(name, model, ratio)
    first = outputs == "first"
    ignored = _unique(output_layers(model, args, kwargs, first_only=first) + _classifiers(model) + recipe.ignored)
    extra = dict(recipe.arguments)
    if round_to:
        extra["round_to"] = round_to
    if first or _is_hf(model):
        extra["output_transform"] = _first_output
    with torch.enable_grad():  # Torch-Pruning traces the autograd graph of one forward pass
        pruner = tp.pruner.BasePruner(
            model, tp_inputs(model, args, kwargs),
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=ignored, **extra)
        pruner.step()
    recipe.after(model, pruner)
    return model


def analyze(model: nn.Module, args, kwargs):
    """Torch-Pruning's analysis step alone: ``tp.DependencyGraph().build_dependency``."""
    import torch_pruning as tp

    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=tp_inputs(model, args, kwargs),
                                                     verbose=False)


def _first_output(out):
    """The first output tensor (``logits``, ``last_hidden_state``), as Torch-Pruning's examples trace ``out.logits``."""
    return _tensors(out)[0]


# ---------------------------------------------------------------------------------------------- attention

@dataclass
class Attention:
    """One attention module as the recipe sees it: its projections, and its head counts and size before pruning."""

    module: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    fused: nn.Module | None
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def query(self) -> nn.Module:
        return self.fused if self.fused is not None else self.q

    def num_heads(self) -> dict:
        """Torch-Pruning's ``num_heads`` entries: the query (or fused) projection's heads, key/value heads."""
        if self.fused is not None:
            return {self.fused: self.heads}  # as prune_llm.py: num_heads[qkv_proj] = num_attention_heads
        return {self.q: self.heads, self.k: self.kv_heads, self.v: self.kv_heads}


def _int_attr(module, names) -> int | None:
    for n in names:
        value = getattr(module, n, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _out(linear) -> int:
    return linear.out_features if hasattr(linear, "out_features") else linear.weight.shape[-1]  # transformers Conv1D


def attention_modules(model: nn.Module) -> list[Attention]:
    """Every module with query/key/value projections (or one fused projection) among its children, with head
    counts from its attributes, else from its widths and head size, else from the model's config."""
    config = getattr(model, "config", None)
    found = []
    for module in model.modules():
        children = {n.lower(): c for n, c in module.named_children() if isinstance(c, nn.Linear)
                    or type(c).__name__ == "Conv1D"}
        pick = lambda names: next((children[n] for n in names if n in children), None)  # noqa: E731
        q, k, v, fused = pick(Q_NAMES), pick(K_NAMES), pick(V_NAMES), pick(FUSED_NAMES)
        if not ((q is not None and k is not None and v is not None) or fused is not None):
            continue
        if fused is not None and not isinstance(fused, nn.Linear):
            continue  # transformers' Conv1D (GPT-2): Torch-Pruning has no pruner for it; nothing to tell it
        heads, kv, dim = _int_attr(module, HEADS), _int_attr(module, KV_HEADS), _int_attr(module, HEAD_DIM)
        if fused is None:
            heads = heads or (q.out_features // dim if dim else None)
            kv = kv or (k.out_features // dim if dim and k.out_features != q.out_features else heads)
        elif heads is None and dim:  # fused [q | k | v] or heads x (q, k, v): heads + 2 kv heads of dim each
            heads = fused.out_features // dim - 2 * kv if kv else fused.out_features // (3 * dim)
        heads = heads or getattr(config, "num_attention_heads", None)
        if not heads:
            continue  # no head count anywhere: not something the recipe can describe to Torch-Pruning
        kv = kv or heads
        dim = dim or _out(q if fused is None else fused) // (heads if fused is None else heads + 2 * kv)
        found.append(Attention(module, q, k, v, fused, heads, kv, dim))
    return found


def _set(module, names, value) -> None:
    """Set every attribute in ``names`` that ``module`` has as an int (plain attributes only, not properties)."""
    for n in names:
        if n in vars(module) and isinstance(vars(module)[n], int) and not isinstance(vars(module)[n], bool):
            setattr(module, n, value)


def fix_attention(model: nn.Module, attentions: list[Attention], pruner, head_dims_pruned: bool) -> list[tuple]:
    """After ``step()``: each attention module's head counts, head size and widths, as its examples set them;
    returns ``(heads, kv heads)`` per module.

    Whole heads pruned: the head size is kept and the head counts are the pruned widths over it. Head dims
    pruned: the head counts are kept and the head size is the pruned width over them. The examples read the
    head count from ``pruner.num_heads`` instead; that count can disagree with the widths (MPNet, Cohere: it
    counts heads it did not remove), and a model given the widths' count runs where the other does not.
    """
    counts = []
    for a in attentions:
        m = a.module
        if a.fused is None:
            if head_dims_pruned:
                heads, kv = a.heads, a.kv_heads
                dim = a.q.out_features // heads
            else:
                dim = a.head_dim
                heads, kv = a.q.out_features // dim, a.k.out_features // dim
        else:  # one projection: [q | k | v] or heads x (q, k, v); key/value heads shrink with the heads if equal
            if head_dims_pruned:
                heads, kv = a.heads, a.kv_heads
                dim = a.fused.out_features // (heads + 2 * kv)
            else:
                dim = a.head_dim
                units = a.fused.out_features // dim  # heads + 2 kv heads
                heads = units // 3 if a.kv_heads == a.heads else units - 2 * a.kv_heads
                kv = heads if a.kv_heads == a.heads else a.kv_heads
        _set(m, HEADS, heads)
        _set(m, KV_HEADS, kv)
        _set(m, GROUPS, max(heads // max(kv, 1), 1))
        _set(m, HEAD_DIM, dim)
        _set(m, WIDTH, heads * dim)
        _set(m, KV_WIDTH, kv * dim)
        counts.append((heads, kv))
    return counts


def fix_config(model: nn.Module, counts: list[tuple], intermediate: list[nn.Linear]) -> None:
    """The config fields prune_llm.py updates, where every layer agrees: hidden size (the input embedding's width),
    head counts, MLP width (the Linears that had ``intermediate_size`` outputs)."""
    config = getattr(model, "config", None)
    if config is None:
        return

    def agreed(values):
        values = set(values)
        return values.pop() if len(values) == 1 else None

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    updates = {"hidden_size": getattr(embeddings, "embedding_dim", None),
               "num_attention_heads": agreed(h for h, _ in counts),
               "num_key_value_heads": agreed(kv for _, kv in counts),
               "intermediate_size": agreed(m.out_features for m in intermediate)}
    for field, value in updates.items():
        try:
            if value and isinstance(getattr(config, field, None), int):
                setattr(config, field, value)
        except (AttributeError, TypeError):  # a read-only property of this config: nothing to keep in step
            pass


# ---------------------------------------------------------------------------------------------- recipes

@dataclass
class Recipe:
    """Extra ``MetaPruner`` arguments, layers to ignore, and what to update after ``step()``."""

    arguments: dict
    ignored: list
    after_steps: list

    def after(self, model, pruner) -> None:
        for fix in self.after_steps:
            fix(model, pruner)

    @classmethod
    def for_model(cls, name: str, model: nn.Module, ratio: float) -> "Recipe":
        from torchvision.models.vision_transformer import VisionTransformer

        if isinstance(model, VisionTransformer):  # nn.MultiheadAttention: Torch-Pruning prunes it by itself
            def fix_hidden(model, pruner):
                model.hidden_dim = model.conv_proj.out_channels
            return cls({"round_to": model.encoder.layers[0].num_heads}, [], [fix_hidden])
        raft = getattr(model, "raft", model)  # zoo wraps RAFT to fix its number of flow updates
        if all(hasattr(raft, n) for n in ("corr_block", "update_block", "mask_predictor")):
            return cls({}, [raft.corr_block, raft.update_block, raft.mask_predictor], [])
        return attention_recipe(model, ratio, whole_heads=_is_hf(model))


def attention_recipe(model: nn.Module, ratio: float, whole_heads: bool) -> Recipe:
    """``num_heads`` (and gate/up groups) for every attention module found; whole heads or head dims; the fix-ups."""
    attentions = attention_modules(model)
    arguments, ignored = {}, []
    groups = {m: 2 for n, m in model.named_modules() if n.rsplit(".", 1)[-1].lower() in GATE_UP_NAMES
              and isinstance(m, nn.Linear)}
    if groups:
        arguments["out_channel_groups"] = groups
    if not attentions:
        return Recipe(arguments, ignored, [])
    arguments["num_heads"] = {p: n for a in attentions for p, n in a.num_heads().items()}
    if whole_heads:
        arguments.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
    config = getattr(model, "config", None)
    width = getattr(config, "intermediate_size", None)
    intermediate = [m for m in model.modules() if isinstance(m, nn.Linear) and width and m.out_features == width
                    and m.in_features != width]
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Linear):  # prune_llm.py
        arguments["round_to"] = 4
        ignored.append(lm_head)

    def fix(model, pruner):
        fix_config(model, fix_attention(model, attentions, pruner, head_dims_pruned=not whole_heads), intermediate)
    return Recipe(arguments, ignored, [fix])


# ---------------------------------------------------------------------------------------------- outputs

def _classifiers(model: nn.Module) -> list:
    """The README's rule: the final classifier (a Linear with one output per class) is never pruned."""
    classes = getattr(model, "num_classes", 1000)
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]


def output_layers(model: nn.Module, args, kwargs, first_only: bool = False) -> list:
    """Layers (and bare parameters) whose output channels reach a model output without another layer between
    (only the first output with ``first_only``)."""
    try:
        return _output_layers_fx(model, first_only)
    except Exception:  # not symbolically traceable (Hugging Face, data-dependent code): watch one forward pass
        return _output_layers_hooks(model, args, kwargs, first_only)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _output_layers_fx(model: nn.Module, first_only: bool) -> list:
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    params = dict(gm.named_parameters())
    found, seen = [], set()
    stack = list(gm.graph.find_nodes(op="output"))
    if first_only:
        stack = [_first_node(stack[0].args[0])]
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, torch.fx.Node):
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


def _first_node(value):
    if isinstance(value, dict):
        return _first_node(next(iter(value.values())))
    if isinstance(value, (list, tuple)):
        return _first_node(value[0])
    return value


def _output_layers_hooks(model: nn.Module, args, kwargs, first_only: bool) -> list:
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
    outs = _tensors(out)[:1] if first_only else _tensors(out)
    targets = {t.untyped_storage().data_ptr() for t in outs}
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
