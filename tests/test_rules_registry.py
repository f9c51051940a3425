"""Table test for fxprune/rules/registry.py: duplicates are errors, users add rules, a missing rule freezes."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from fxprune.rules.registry import RULES, lookup
from fxprune.testing import run_oracle


def gated(x, gate):
    """A user function that fx keeps as one call (wrapped below); it has a user rule."""
    return x * torch.sigmoid(gate)


def opaque(x):
    """A wrapped function with no rule: fxprune cannot see inside it."""
    return x.flip(-1)


torch.fx.wrap("gated")
torch.fx.wrap("opaque")


def test_duplicate_registration_is_an_error():
    with pytest.raises(fxprune.DuplicateRuleError, match="Linear"):
        fxprune.register_rule(nn.Linear)(lambda r: None)
    with pytest.raises(fxprune.DuplicateRuleError, match="relu"):
        fxprune.register_family(lambda r: None, "relu")
    assert RULES[nn.Linear].__name__ == "linear"


def test_a_failed_registration_registers_nothing():
    def fresh_target(x):
        return x

    with pytest.raises(fxprune.DuplicateRuleError):
        fxprune.register_rule(fresh_target, torch.relu)(lambda r: None)
    assert fresh_target not in RULES


def test_replace_overrides_deliberately():
    def target(x):
        return x

    def first(r):
        pass

    def second(r):
        pass

    fxprune.register_rule(target)(first)
    with pytest.raises(fxprune.DuplicateRuleError):
        fxprune.register_rule(target)(second)
    fxprune.register_rule(target, replace=True)(second)
    assert RULES[target] is second
    del RULES[target]


@fxprune.register_rule(gated)
def gated_rule(r):
    """``gated(x (B, C), gate (C,))``: x, gate and out share the channel axis."""
    x, gate, out = r.input(0), r.input(1), r.out
    for d in range(x.ndim):
        r.same(x[d], out[d])
    r.same(gate[0], out[-1])


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.gate = nn.Parameter(torch.randn(6))
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(gated(self.fc1(x), self.gate))


def test_user_rule_for_a_wrapped_function():
    x = torch.randn(2, 3)
    dg, removal, pruned = run_oracle(Gated(), (x,), prune_head_dims=False, absolute=True)
    node = next(n for n in dg.gm.graph.nodes if n.target is gated)
    assert node.op == "call_function" and node.meta["fxprune_rule"] == "gated_rule"
    g = dg.group_of("fc1.weight", 0)
    assert g.units == 6 and g.prunable
    assert dg.group_of("gate", 0) is g and dg.group_of("fc2.weight", 1) is g and dg.group_of("gated", 1) is g
    assert tuple(pruned.gate.shape) == (6 - len(removal[g]),)


class Scale(nn.Module):
    """A custom module the user's tracer keeps as a leaf (the registry docstring's example)."""

    def __init__(self, channels):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(channels))
        self.channels = channels

    def forward(self, x):
        return x * self.gain


@fxprune.register_rule(Scale)
def scale_rule(r):
    x, out = r.input(0), r.out
    for d in range(x.ndim):
        r.same(x[d], out[d])
    r.same(r.param("gain")[0], out[-1])
    r.module_attr("channels", out[-1])


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Scale) or super().is_leaf_module(m, qualname)


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.scale = Scale(5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.scale(self.fc1(x)))


def test_user_rule_for_a_custom_leaf_module():
    model = WithScale().eval()
    gm = fx.GraphModule(model, LeafTracer().trace(model))
    assert [n.op for n in gm.graph.nodes if n.target == "scale"] == ["call_module"]
    x = torch.randn(2, 3)
    dg, removal, pruned = run_oracle(gm, (x,), seed=1, prune_head_dims=False, absolute=True)
    assert lookup(next(n for n in dg.gm.graph.nodes if n.target == "scale"), gm.scale) is scale_rule
    g = dg.group_of("fc1.weight", 0)
    assert dg.group_of("scale.gain", 0) is g and dg.group_of("fc2.weight", 1) is g and g.prunable
    assert pruned.scale.channels == 5 - len(removal[g]) == pruned.scale.gain.shape[0]


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 2)

    def forward(self, x):
        y = self.fc2(torch.relu(self.fc1(x)))
        return self.fc3(opaque(y))


def test_an_op_without_a_rule_freezes_its_axes_and_is_reported():
    x = torch.randn(2, 3)
    dg = fxprune.analyze(Opaque().eval(), (x,))
    node = next(n for n in dg.gm.graph.nodes if n.target is opaque)
    assert node.meta["fxprune_rule"] == "<none>"
    # the op's input and output axes are frozen but unrelated (no rule says how they correspond)
    into, out_of = dg.group_of("fc2.weight", 0), dg.group_of("fc3.weight", 1)
    assert into is not out_of and dg.group_of("opaque", 1) is out_of
    for g in (into, out_of):
        assert any("no rule for this op" in w and "node 'opaque'" in w for w in g.frozen)
    # fc1's hidden units do not touch the op: still prunable
    assert [g.units for g in dg.prunable_groups] == [4] and dg.group_of("fc1.weight", 0).prunable
    report = dg.report()
    assert "ops without a rule (their axes are frozen):" in report
    line = next(ln for ln in report.splitlines() if "node 'opaque'" in ln and ln.startswith("  "))
    assert "test_rules_registry.py:" in line and "return self.fc3(opaque(y))" in line
    pruned = fxprune.prune(Opaque().eval(), 0.5, example_inputs=(x,))
    assert pruned(x).shape == (2, 2) and pruned.fc1.out_features == 2 and pruned.fc2.out_features == 4


def scaled(x):
    """A wrapped function whose rule is registered by name, as fxprune does for timm and torchvision."""
    return x * 3


torch.fx.wrap("scaled")


def test_rule_registered_by_qualified_name_matches_without_the_object():
    key = f"{__name__}:scaled"
    fxprune.register_family(fxprune.rules.elementwise.elementwise, key)
    try:
        class Uses(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

            def forward(self, x):
                return self.b(scaled(self.a(x)))

        dg = fxprune.analyze(Uses(), (torch.randn(2, 4),))
        node = next(n for n in dg.gm.graph.nodes if n.target is scaled)
        assert lookup(node) is RULES[key]
        assert [g.units for g in dg.prunable_groups] == [6]
    finally:
        del RULES[key]


def test_import_fxprune_imports_neither_timm_nor_torchvision():
    import subprocess
    import sys

    code = "import sys, fxprune; print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_required_argument_of_a_bound_aten_rule_has_a_schema_name():
    """A rule argument no schema name matches came back None (mm's ``mat2``, baddbmm's ``batch1``); now it raises
    at analysis. Check every registered tensor overload against the signature its rule binds."""
    import inspect
    import re

    from fxprune.algebra.context import _SCHEMA_ALIASES

    missing = []
    for target, rule in RULES.items():
        if not isinstance(target, torch._ops.OpOverload) or not target._schema.arguments:
            continue
        names = [a.name for a in target._schema.arguments]
        if str(target._schema.arguments[0].type) != "Tensor":  # TorchScript list/str ops, never in a graph
            continue
        for signature in re.findall(r"r\.bind\((\w+)\)", inspect.getsource(rule)):
            for name, p in inspect.signature(getattr(inspect.getmodule(rule), signature)).parameters.items():
                required = p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                if required and not any(c in names for c in (name,) + _SCHEMA_ALIASES.get(name, ())):
                    missing.append(f"{target}: {name}")
    assert not missing, missing


class Nested(nn.Module):
    """A custom leaf module whose parameters live in a submodule."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 5)

    def forward(self, x):
        return torch.relu(self.inner(x))


@fxprune.register_rule(Nested)
def nested_rule(r):
    x, out, w = r.input(0), r.out, r.param("inner.weight")
    r.same(w[1], x[-1])
    r.same(w[0], out[-1])
    r.same(r.param("inner.bias")[0], out[-1])
    for d in range(x.ndim - 1):
        r.same(x[d], out[d])
    r.module_attr("inner.in_features", x[-1])
    r.module_attr("inner.out_features", out[-1])


class Careless(Scale):
    """Scale, with a user rule that forgets that the gain follows the channels."""


@fxprune.register_rule(Careless)
def careless_rule(r):
    r.same(r.input(0)[0], r.out[0])
    r.same(r.input(0)[1], r.out[1])


def _traced(model, leaf):
    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaf) or super().is_leaf_module(m, qualname)

    return fx.GraphModule(model, Tracer().trace(model))


def test_user_rule_reaches_nested_parameters_of_a_leaf_module():
    model = nn.Sequential(nn.Linear(3, 5), Nested(), nn.Linear(5, 2)).eval()
    gm, x = _traced(model, Nested), torch.randn(2, 3)
    dg, removal, pruned = run_oracle(gm, (x,), seed=2, prune_head_dims=False, absolute=True)
    g1, g2 = dg.group_of("0.weight", 0), dg.group_of("1.inner.weight", 0)
    assert dg.group_of("1.inner.weight", 1) is g1 and dg.group_of("2.weight", 1) is g2
    assert g1.prunable and g2.prunable
    inner = pruned.get_submodule("1.inner")
    assert (inner.out_features, inner.in_features) == tuple(inner.weight.shape) == (5 - len(removal[g2]),
                                                                                  5 - len(removal[g1]))


def test_verify_failure_under_a_user_rule_names_the_rule():
    model = nn.Sequential(nn.Linear(3, 5), Careless(5), nn.Linear(5, 2)).eval()
    gm, x = _traced(model, Careless), torch.randn(2, 3)
    dg = fxprune.analyze(gm, (x,))
    with pytest.raises(fxprune.ShapeError, match="careless_rule") as info:
        fxprune.apply(dg, {dg.group_of("0.weight", 0): [0]})
    assert "bug in fxprune" not in str(info.value)


class Misnamed(Nested):
    """Nested, with a user rule that names a parameter the module does not have."""


@fxprune.register_rule(Misnamed)
def misnamed_rule(r):
    r.same(r.param("inner.wieght")[1], r.input(0)[-1])  # no such parameter: r.param returns None


def test_a_user_rule_that_raises_is_named_with_its_node():
    model = nn.Sequential(nn.Linear(3, 5), Misnamed(), nn.Linear(5, 2)).eval()
    message = r"user rule .*misnamed_rule failed at node '_1' \(call_module 1\): TypeError"
    with pytest.raises(fxprune.FxPruneError, match=message):
        fxprune.analyze(_traced(model, Misnamed), (torch.randn(2, 3),))
