"""The dead-unit oracle: plant units whose every slice is zero, prune exactly them, compare outputs.

A unit whose producer weights, bias, norm scale and shift and consumer weights
are all zero contributes nothing, so removing it must leave the output
unchanged (up to float rounding) — unless some op normalises over its axis
(LayerNorm, softmax, mean), which ``Group.normalized`` flags.

Tests call :func:`run_oracle`, the one oracle of the suite (its options cover what test files used to copy);
it does what this example spells out::

    >>> dg = fxprune.analyze(model, (x,))
    >>> removal = plant_dead_units(dg, seed=0)      # zeroes slices in the model itself
    >>> before = model(x)
    >>> pruned = fxprune.apply(dg, removal)
    >>> torch.testing.assert_close(pruned(x), before, atol=1e-5, rtol=0)
    >>> dg, removal, pruned = run_oracle(model, (x,), absolute=True)     # as above, with more checks
"""

from __future__ import annotations

import numpy as np
import torch

from fxprune.training.masking import zero_units


def oracle_groups(dg) -> list:
    """Prunable groups on which the oracle is exact (no normalisation over the group's axis)."""
    return [g for g in dg.prunable_groups if not g.normalized]


def group_ids(dg, name: str, axis: int) -> list[int]:
    """The ids of the groups that axis ``axis`` of tensor ``name`` belongs to, for comparing groups across tensors.

    Example::

        >>> group_ids(dg, "conv1.weight", 0) == group_ids(dg, "bn1.weight", 0)    # one group: conv1 and its norm
        True
    """
    return [g.id for g in dg.groups_of(name, axis)]


def kept_units(plan) -> dict:
    """``{group key: kept unit indices}`` of a :class:`fxprune.PruningPlan`: two plans keep the same units when
    these are equal (whatever order or settings they were written in).

    Example::

        >>> assert kept_units(fxprune.prune_checkpoint(src, out, ratio=0.5)) == kept_units(fxprune.plan_of(pruned))
    """
    return {str(g.key): g.kept for g in plan.groups}


def plant_dead_units(dg, groups=None, fraction: float = 0.34, seed: int = 0) -> dict:
    """Zero every member slice of some units of each group; return ``{group: units}`` to remove.

    ``groups`` defaults to :func:`oracle_groups`. Each group loses ``fraction`` of
    its units (at least one, never all), chosen at random with ``seed``.
    """
    rng = np.random.default_rng(seed)
    groups = oracle_groups(dg) if groups is None else list(groups)
    removal = {}
    for group in groups:
        count = min(group.units - group.min_kept, max(1, int(round(fraction * group.units))))
        if count < 1:
            continue
        removal[group] = np.sort(rng.choice(group.units, size=count, replace=False))
    zero_units(dg, removal)
    return removal


def exported(model, *inputs):
    """The aten graph fxprune itself would capture with ``torch.export`` (without export's guard call)."""
    program = torch.export.export(model, inputs, strict=False)  # as fxprune's own capture
    try:
        return program.module(check_guards=False)
    except TypeError:  # older torch: no guard module to leave out
        return program.module()


def assert_same_outputs(got, expected, rel: float = 1e-5, floor: float = 0.0) -> None:
    """Outputs of two code paths that compute the same function (a reloaded, replayed or regenerated graph).

    Bit-exactness cannot be promised across code paths: BLAS and oneDNN kernels may order a sum differently by
    memory alignment or layout. Float leaves must agree within ``rel`` times the largest magnitude of the
    expected leaf (a wrong weight moves outputs by about their own size, even outputs of 1e-10); every other leaf
    exactly. Tuples, lists and dicts (model outputs) are compared leaf by leaf. ``floor`` is the least scale.
    """
    _assert_leaves_close(got, expected, lambda b: rel * max(floor, b.detach().abs().max().item() if b.numel() else 0.0))


def assert_within(got, expected, atol: float = 1e-5) -> None:
    """Outputs equal up to the absolute tolerance ``atol`` (float leaves; every other leaf exactly).

    For a rule's table test whose outputs are of order 1: stricter than :func:`assert_close_to_scale` wherever an
    output exceeds 1. Example: ``assert_within(pruned(x), model(x))`` passes on ``1.000004`` against ``1.0`` and
    fails on ``100.0004`` against ``100.0``, which :func:`assert_close_to_scale` lets through.
    """
    _assert_leaves_close(got, expected, lambda b: atol)


def _assert_leaves_close(got, expected, tolerance) -> None:
    """Leaf by leaf: float tensors within ``tolerance(expected leaf)`` (an absolute tolerance), the rest equal."""
    from torch.utils._pytree import tree_flatten

    got_leaves, got_spec = tree_flatten(got)
    expected_leaves, expected_spec = tree_flatten(expected)
    assert got_spec == expected_spec, f"output structure {got_spec} != {expected_spec}"
    for i, (a, b) in enumerate(zip(got_leaves, expected_leaves)):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            torch.testing.assert_close(a, b, atol=tolerance(b), rtol=0, msg=lambda m: f"output leaf {i}: {m}")
        elif isinstance(b, torch.Tensor):
            assert torch.equal(a, b), f"output leaf {i} differs"
        else:
            assert a == b, f"output leaf {i}: {a!r} != {b!r}"


def assert_close_to_scale(got, expected, atol: float = 1e-5) -> None:
    """Tensors (or tuples of them) equal up to ``atol`` times the largest magnitude of ``expected`` (at least 1).

    For outputs of two code paths (decomposed and fused attention ...): never compare them bit for bit.
    """
    assert_same_outputs(got, expected, rel=atol, floor=1.0)


def another_batch(inputs, size: int = 3, seed: int = 0):
    """Inputs of batch ``size`` like ``inputs`` (a batch of one): every tensor of at least one dimension is
    repeated ``size`` times along its first axis, floating-point ones with noise (so the examples differ)."""
    generator = torch.Generator().manual_seed(seed)

    def grow(t):
        if not isinstance(t, torch.Tensor) or not t.ndim:
            return t
        out = torch.cat([t] * size)
        if out.is_floating_point():
            out = out + 0.5 * torch.randn(out.shape, generator=generator, dtype=out.dtype)
        return out

    return torch.utils._pytree.tree_map(grow, inputs)


@torch.no_grad()
def assert_in_place_matches_graph(model, graph, inputs: tuple, size: int = 3, atol: float = 1e-4) -> None:
    """``model`` (pruned in place) computes what ``graph`` (the same plan, ``inplace=False``) computes: on
    ``inputs`` (a batch of one) and on a batch of ``size`` (:func:`another_batch`), where the graph is run one
    example at a time (a graph exported from a batch of one may take only that size) and its outputs are
    concatenated along their first axis."""
    assert_close_to_scale(model(*inputs), graph(*inputs), atol=atol)
    batch = another_batch(inputs, size)
    one = [torch.utils._pytree.tree_map(lambda t: t[i:i + 1] if isinstance(t, torch.Tensor) and t.ndim else t,
                                        batch) for i in range(size)]
    outputs = [graph(*x) for x in one]
    leaves = [torch.utils._pytree.tree_flatten(o)[0] for o in outputs]
    joined = [torch.cat(parts) if isinstance(parts[0], torch.Tensor) and parts[0].ndim else parts[0]
              for parts in zip(*leaves)]
    expected = torch.utils._pytree.tree_unflatten(joined, torch.utils._pytree.tree_flatten(outputs[0])[1])
    assert_close_to_scale(model(*batch), expected, atol=atol)


@torch.no_grad()
def state_snapshot(model) -> dict:
    """A detached copy of every parameter and buffer of ``model`` (its ``state_dict``), for
    :func:`assert_same_state` after something that must not change the model.

    Example::

        >>> before = state_snapshot(model)
        >>> pruned = fxprune.prune(model, 0.5, example_inputs=(x,))
        >>> assert_same_state(model, before, "prune modified the caller's model")
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, expected, what: str = "the state changed") -> None:
    """``model`` has exactly the tensors of ``expected`` (a :func:`state_snapshot` or another module): the same
    names in the same order, shapes and values (bit for bit: nothing may have computed them anew)."""
    before = expected.state_dict() if isinstance(expected, torch.nn.Module) else expected
    after = model.state_dict()
    assert list(after) == list(before), f"{what}: tensors added, removed or reordered: " \
        f"{sorted(set(after) ^ set(before)) or 'reordered'}"
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape, f"{what}: {name} changed shape {tensor.shape} -> {after[name].shape}"
        assert torch.equal(after[name], tensor), f"{what}: {name} changed values"


def forward_flops(model, inputs: tuple) -> int:
    """FLOPs of one run of ``model(*inputs)`` as torch's own ``FlopCounterMode`` counts them (matmuls,
    convolutions, attention): a measure of the model as it runs, independent of fxprune's graph and MAC counting,
    and with no capture (cheap on models whose export takes seconds). Gradients stay enabled, so that
    ``nn.MultiheadAttention`` takes its composite path, whose matmuls the counter sees (its fused inference
    kernel has no FLOP formula), and the counter's module hooks work.

    Example::

        >>> before = forward_flops(model, (x,))
        >>> fxprune.prune(model, 0.3, example_inputs=(x,), inplace=True)
        >>> forward_flops(model, (x,)) < 0.85 * before
        True
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(*inputs)
    return counter.get_total_flops()


def module_snapshot(model) -> dict:
    """Every module's attributes and its parameter, buffer and submodule tables (the objects themselves, not
    copies) and a copy of every tensor, for :func:`assert_same_modules` after something that must leave the model
    exactly as it was, or put it back so (in-place pruning that fails).

    Example::

        >>> before = module_snapshot(model)
        >>> with pytest.raises(fxprune.FxPruneError):
        ...     fxprune.prune(model, 0.5, example_inputs=(x,), inplace=True)
        >>> assert_same_modules(model, before)
    """
    return {"modules": {name: (dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
                        for name, m in model.named_modules()},
            "values": {name: t.detach().clone()
                       for name, t in {**dict(model.named_parameters(remove_duplicate=False)),
                                       **dict(model.named_buffers(remove_duplicate=False))}.items()}}


def assert_same_modules(model, snapshot: dict) -> None:
    """``model`` is what :func:`module_snapshot` saw: the same modules under the same names, each holding the very
    same objects in its attributes and tables (plain values equal), and every tensor equal bit for bit."""
    now = module_snapshot(model)
    assert now["modules"].keys() == snapshot["modules"].keys(), "modules added or removed"
    for name, tables in snapshot["modules"].items():
        for saved, current in zip(tables, now["modules"][name]):
            assert saved.keys() == current.keys(), f"{name or 'the model'}: {sorted(saved.keys() ^ current.keys())}"
            changed = [k for k, v in saved.items() if not (current[k] is v or (
                type(v) in (int, float, bool, str, tuple) and current[k] == v))]
            assert not changed, f"{name or 'the model'}: {changed} are other objects"
    assert now["values"].keys() == snapshot["values"].keys(), "tensors added or removed"
    assert all(torch.equal(now["values"][k], v) for k, v in snapshot["values"].items()), "tensor values changed"


def run_oracle(model, inputs: tuple, groups=None, fraction: float = 0.34, seed: int = 0,
               prune_head_dims: bool = True, *, min_groups: int = 1, atol: float = 1e-5, absolute: bool = False,
               all_supported: bool = False):
    """Analyse ``model`` (eval), plant dead units, prune exactly them and check the outputs did not change.

    The one dead-unit oracle of the suite. It checks that at least ``min_groups`` groups got dead units, that the
    unpruned output is not trivially small (else the comparison says nothing), that the pruned graph computes the
    model's output (with the dead units planted) on ``inputs``, and that the pruned graph has fewer parameters.
    Returns ``(dg, removal, pruned)``; ``model`` may be a ``torch.fx.GraphModule`` (a graph from :func:`exported`,
    run as given: an exported graph cannot switch to eval mode). Example::

        >>> dg, removal, pruned = run_oracle(model, (x,))            # every group the oracle is exact on

    Options, each with an example:

    - ``groups``: the groups to plant dead units in (as for :func:`plant_dead_units`), or a function of the
      dependency graph returning them, for groups found only once the model is analysed::

        >>> run_oracle(model, (x,), lambda dg: dg.groups_of("conv1.weight", 0)[1:])   # conv1's per-group channels

    - ``fraction`` and ``seed``: how many units of each group die, and which (as for :func:`plant_dead_units`)::

        >>> run_oracle(Chunk(), (x,), fraction=0.5, seed=3)          # half of each group, another draw

    - ``prune_head_dims``: head dims are prunable by default here (the oracle checks the engine, not the speed
      policy); ``False`` plants dead units only where ``fxprune.prune`` prunes by default::

        >>> run_oracle(swin_block, (x,), prune_head_dims=False)      # heads die, head dims stay whole

    - ``min_groups``: at least this many groups get dead units (a block with heads and MLP units gives more than
      one; fewer means the analysis froze something it should not have)::

        >>> run_oracle(models.ViTBlock(), (x,), min_groups=3)

    - ``atol`` and ``absolute``: outputs must agree within ``atol`` (default 1e-5) times the largest magnitude of
      the expected output (at least 1), the tolerance of two code paths (BLAS may order a sum differently); with
      ``absolute=True`` within ``atol`` itself (:func:`assert_within`), which a rule's table test whose outputs
      are of order 1 asks for: it is stricter wherever an output exceeds 1::

        >>> run_oracle(FunctionalConvs(), (x,), absolute=True)       # |pruned(x) - model(x)| <= 1e-5 everywhere
        >>> run_oracle(mlp, (x,), atol=1e-6, absolute=True)          # ... <= 1e-6

    - ``all_supported``: also fail, with the report, when some node of the graph has no rule
      (``dg.state.unsupported``), for a test whose point is that an op is covered rather than frozen around::

        >>> run_oracle(exported(Gathered().eval(), x), (x,), absolute=True, all_supported=True)
    """
    from fxprune.api import analyze, apply

    if not isinstance(model, torch.fx.GraphModule):
        model.eval()
    dg = analyze(model, inputs, prune_head_dims=prune_head_dims)
    if all_supported:
        assert not dg.state.unsupported, dg.report()
    removal = plant_dead_units(dg, groups(dg) if callable(groups) else groups, fraction=fraction, seed=seed)
    assert removal, "no group to plant dead units in: the test model is too small"
    assert len(removal) >= min_groups, f"dead units in {len(removal)} groups, expected {min_groups}:\n{dg.report()}"
    expected = model(*inputs)
    leaves = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor) and t.numel()]
    assert max(t.abs().max().item() for t in leaves) > 1e-3, "a trivially small output would make the oracle vacuous"
    pruned = apply(dg, removal)
    (assert_within if absolute else assert_close_to_scale)(pruned(*inputs), expected, atol=atol)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (dg.gm, pruned))
    assert after < before, f"the pruned graph has {after} parameters, no fewer than the model's {before}"
    return dg, removal, pruned


# -- the depth oracle ------------------------------------------------------------------------------------------

def plant_zero_branches(dg, branches=None, fraction: float = 0.5, seed: int = 0) -> list:
    """Zero the output projection (:func:`last_projection`) of some removable branches, in the model itself;
    return the branches whose output is now exactly zero (removing them must not change the outputs).

    ``branches`` defaults to ``fraction`` of the removable branches (at least one), chosen with ``seed``.
    """
    rng = np.random.default_rng(seed)
    if branches is None:
        candidates = [b for b in dg.branches if b.removable]
        count = max(1, int(round(fraction * len(candidates))))
        branches = [candidates[i] for i in sorted(rng.choice(len(candidates), size=count, replace=False))]
    from fxprune.analysis.branches import last_projection

    tensors = dict(dg.gm.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for branch in branches:
            for name in last_projection(dg.gm, branch):
                tensors[name].zero_()
    return list(branches)


@torch.no_grad()
def run_depth_oracle(model, inputs: tuple = (), kwargs: dict | None = None, fraction: float = 0.5,
                     seed: int = 0):
    """The depth oracle: analyse ``model`` (eval), zero the output projection of ``fraction`` of its removable
    residual branches, remove exactly those branches and check the outputs did not change.

    Returns ``(dg, branches, pruned)``.

    Example::

        >>> dg, removed, pruned = run_depth_oracle(torchvision.models.resnet50(), (x,))
    """
    from fxprune.api import analyze
    from fxprune.rewriting.depth import remove_depth
    from fxprune.rewriting.verify import verify

    model.eval()
    kwargs = kwargs or {}
    dg = analyze(model, inputs, kwargs=kwargs)
    removed = plant_zero_branches(dg, fraction=fraction, seed=seed)
    assert removed, "no removable branch to plant a zero branch in"
    expected = model(*inputs, **kwargs)
    pruned = remove_depth(dg, removed)
    verify(pruned, dg.example_inputs, dg.expected_shapes)
    got = pruned(*dg.example_inputs)
    expected = expected if isinstance(got, (tuple, list)) or not isinstance(expected, (tuple, list, dict)) else \
        torch.utils._pytree.tree_leaves(expected)[0]
    if isinstance(got, (tuple, list)) and not isinstance(expected, (tuple, list)):
        got = got[0]
    leaves = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    assert max(t.abs().max().item() for t in leaves) > 1e-3, "a trivially small output would make the oracle vacuous"
    assert_close_to_scale(_first(got), _first(expected))
    return dg, removed, pruned


def _first(output):
    """The first tensor of a model output (logits, last hidden state)."""
    if isinstance(output, torch.Tensor):
        return output
    return next(t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor))


def tiny_llama(seed: int = 0, **config):
    """A small random ``LlamaForCausalLM`` in eval mode (vocabulary 100, hidden 32, one layer, 4 heads over 2
    key/value heads, MLP 64, unless ``config`` says otherwise), seeded, for tests; needs transformers.

    Example::

        >>> model = tiny_llama(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
        >>> model.config.num_key_value_heads
        2
    """
    import transformers

    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**sizes, **config})).eval()


def tiny_moe(name: str = "mixtral", implementation: str | None = None, seed: int = 0):
    """A small random mixture-of-experts decoder in eval mode, seeded, for tests (needs transformers): one layer,
    hidden 32, 4 heads over 2 key/value heads, 4 experts, top-2. ``name``: ``"mixtral"`` (expert MLP 48),
    ``"qwen2_moe"`` (expert MLP 24 and a shared expert of 40) or ``"qwen3_moe"`` (expert MLP 24, no shared expert,
    q/k norms over an explicit head_dim of 8). ``implementation`` sets ``config._experts_implementation``
    (``"grouped_mm"``, ``"batched_mm"``, ``"eager"``; None: transformers' default).

    Example::

        >>> model = tiny_moe("qwen2_moe", "batched_mm")
        >>> tuple(model.model.layers[0].mlp.experts.down_proj.shape)      # (experts, hidden, expert MLP)
        (4, 32, 24)
    """
    import transformers

    torch.manual_seed(seed)
    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                 num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    if name == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, **sizes)
        cls = transformers.MixtralForCausalLM
    elif name == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4, head_dim=8,
                                             **sizes)
        cls = transformers.Qwen3MoeForCausalLM
    elif name == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                             shared_expert_intermediate_size=40, **sizes)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        raise ValueError(f"tiny_moe: unknown family {name!r}: use 'mixtral', 'qwen2_moe' or 'qwen3_moe'")
    if implementation:
        config._experts_implementation = implementation
    return cls(config).eval()
