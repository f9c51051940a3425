"""Random architectures for the property tests: hypothesis draws a list of block specs, ``build`` makes the model.

An architecture is an :class:`Arch`: an input kind, a list of blocks (frozen
dataclasses, so a failing example prints as code) and a head. ``build(arch)``
returns ``(model, inputs)``; the model's ``forward`` loops over a Python list of
block modules, so ``torch.fx.symbolic_trace`` follows it without any
data-dependent control flow. Every parameter and BatchNorm statistic is drawn
from a torch generator seeded with ``arch.seed`` so that a failure reproduces::

    >>> from tests.property.archs import *
    >>> model, inputs = build(Arch(...))      # paste the falsifying example here

Blocks on images ``(B, C, H, W)``: Conv (dense, grouped, depthwise; stride; + BN + act), BN, Act,
Residual, Concat (branches, identity allowed), Split (split / chunk into branches, merged by
cat, add or gating), Shuffle (channel shuffle with int, -1 or computed sizes), ChannelLN
(LayerNorm over channels), GroupNormB, SE (squeeze-excitation gating), Pool, ToTokens.
Blocks on tokens ``(B, N, D)``: Linear, LayerNormB, Attention (reshape to heads; fused or separate
q/k/v; sdpa or softmax(q @ k^T) @ v; GQA by sdpa's enable_gqa or expand + reshape), MHA
(nn.MultiheadAttention), MLP (plain or SwiGLU). Heads: flatten / reshape -> linear, mean -> linear,
adaptive pool -> linear; optionally the head's input as a second output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

BATCH = 2
CLASSES = 5
ACTS = ("relu", "gelu", "silu", "sigmoid", "relu_module", "gelu_module", "tanh")


# -- specs -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conv:
    cin: int
    cout: int
    k: int = 3
    groups: int = 1
    bias: bool = True
    bn: bool = False
    act: str | None = None
    stride: int = 1


@dataclass(frozen=True)
class BN:
    c: int


@dataclass(frozen=True)
class Act:
    name: str


@dataclass(frozen=True)
class Residual:
    body: tuple  # blocks mapping C -> C
    act: str | None = None


@dataclass(frozen=True)
class Concat:
    branches: tuple  # tuple of block tuples; () is the identity branch


@dataclass(frozen=True)
class Split:
    sizes: tuple  # channel sizes of the pieces
    how: str  # "split" (x.split(sizes, 1)), "chunk" (x.chunk(n, 1)), "torch_split" (torch.split)
    branches: tuple  # one block tuple per piece; () is the identity
    merge: str  # "cat", "add" (all branch outputs equal), "gate" (a * sigmoid(b), two pieces)


@dataclass(frozen=True)
class Shuffle:
    c: int
    groups: int
    mode: str  # view(B, g, C // g, H, W) with ints ("const"), with -1 ("minus1"), or computed from x.size() as
    # torchvision's ShuffleNet does ("computed": channels_per_group = x.size(1) // g)


@dataclass(frozen=True)
class ChannelLN:
    c: int


@dataclass(frozen=True)
class GroupNormB:
    c: int
    groups: int


@dataclass(frozen=True)
class SE:
    c: int
    hidden: int


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" | "avg"


@dataclass(frozen=True)
class ToTokens:
    how: str = "flatten"  # x.flatten(2).transpose(1, 2), or "reshape": x.reshape(B, C, H * W).permute(0, 2, 1)


@dataclass(frozen=True)
class Linear:
    din: int
    dout: int
    bias: bool = True
    act: str | None = None


@dataclass(frozen=True)
class LayerNormB:
    d: int


@dataclass(frozen=True)
class Attention:
    d: int
    heads: int
    head_dim: int
    v_head_dim: int
    fused: bool  # one qkv projection, chunked (equal parts) or split into q, k, v
    impl: str  # "sdpa" | "manual" (softmax(q @ k^T * scale) @ v)
    residual: bool
    shape: str  # view(B, N, H, D) with B, N from x.shape ("symbolic") or ints ("const"); "minus1": view(B, N, H, -1)
    kv_heads: int = 0  # 0: as many as heads; fewer: GQA (sdpa enable_gqa, or expand + reshape when manual)


@dataclass(frozen=True)
class MHA:
    d: int
    heads: int
    bias: bool
    residual: bool


@dataclass(frozen=True)
class MLP:
    d: int
    hidden: int
    act: str
    residual: bool
    glu: bool = False  # fc1 -> chunk(2) -> a * act(b) -> fc2 (SwiGLU)


@dataclass(frozen=True)
class Head:
    kind: str  # "flatten" | "view" (x.reshape(x.size(0), -1)) | "mean" (spatial or token mean) | "pool"
    features: int  # in_features of the final linear


@dataclass(frozen=True)
class Arch:
    input: tuple  # input shape without batch: (C, H, W) or (N, D)
    blocks: tuple
    head: Head
    seed: int
    aux: bool = False  # also return the head's input features (a second, frozen output)


# -- modules -----------------------------------------------------------------------------------------------
def activation(name: str | None):
    if name is None:
        return nn.Identity()
    if name == "relu_module":
        return nn.ReLU()
    if name == "gelu_module":
        return nn.GELU()
    return _Fn(name)


class _Fn(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        if self.name == "relu":
            return F.relu(x)
        if self.name == "gelu":
            return F.gelu(x)
        if self.name == "silu":
            return F.silu(x)
        if self.name == "sigmoid":
            return torch.sigmoid(x)
        return x.tanh()


class Seq(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(make(b) for b in blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class ConvM(nn.Module):
    def __init__(self, s: Conv):
        super().__init__()
        self.conv = nn.Conv2d(s.cin, s.cout, s.k, stride=s.stride, padding=s.k // 2, groups=s.groups, bias=s.bias)
        self.bn = nn.BatchNorm2d(s.cout) if s.bn else nn.Identity()
        self.act = activation(s.act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ResidualM(nn.Module):
    def __init__(self, s: Residual):
        super().__init__()
        self.body = Seq(s.body)
        self.act = activation(s.act)

    def forward(self, x):
        return self.act(x + self.body(x))


class ConcatM(nn.Module):
    def __init__(self, s: Concat):
        super().__init__()
        self.branches = nn.ModuleList(Seq(b) for b in s.branches)

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class SplitM(nn.Module):
    def __init__(self, s: Split):
        super().__init__()
        self.sizes, self.how, self.merge = list(s.sizes), s.how, s.merge
        self.branches = nn.ModuleList(Seq(b) for b in s.branches)

    def forward(self, x):
        if self.how == "chunk":
            pieces = x.chunk(len(self.sizes), dim=1)
        elif self.how == "torch_split":
            pieces = torch.split(x, self.sizes, dim=1)
        else:
            pieces = x.split(self.sizes, 1)
        outs = [branch(pieces[i]) for i, branch in enumerate(self.branches)]
        if self.merge == "gate":
            return outs[0] * torch.sigmoid(outs[1])
        if self.merge == "add":
            total = outs[0]
            for o in outs[1:]:
                total = total + o
            return total
        return torch.cat(outs, 1)


class ShuffleM(nn.Module):
    def __init__(self, s: Shuffle):
        super().__init__()
        self.c, self.g, self.mode = s.c, s.groups, s.mode

    def forward(self, x):
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        if self.mode == "const":
            y = x.view(b, self.g, self.c // self.g, h, w).transpose(1, 2)
            return y.reshape(b, self.c, h, w)
        if self.mode == "computed":
            c = x.size(1)
            y = x.view(b, self.g, c // self.g, h, w)
            y = torch.transpose(y, 1, 2).contiguous()
            return y.view(b, c, h, w)
        y = x.view(b, self.g, -1, h, w).transpose(1, 2).contiguous()
        return y.view(b, -1, h, w)


class ChannelLNM(nn.Module):
    def __init__(self, s: ChannelLN):
        super().__init__()
        self.ln = nn.LayerNorm(s.c)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SEM(nn.Module):
    def __init__(self, s: SE):
        super().__init__()
        self.reduce = nn.Conv2d(s.c, s.hidden, 1)
        self.expand = nn.Conv2d(s.hidden, s.c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class PoolM(nn.Module):
    def __init__(self, s: Pool):
        super().__init__()
        self.kind = s.kind

    def forward(self, x):
        return F.max_pool2d(x, 2) if self.kind == "max" else F.avg_pool2d(x, 2)


class ToTokensM(nn.Module):
    def __init__(self, s: ToTokens):
        super().__init__()
        self.how = s.how

    def forward(self, x):
        if self.how == "reshape":
            return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(0, 2, 1)
        return x.flatten(2).transpose(1, 2)


class LinearM(nn.Module):
    def __init__(self, s: Linear):
        super().__init__()
        self.fc = nn.Linear(s.din, s.dout, bias=s.bias)
        self.act = activation(s.act)

    def forward(self, x):
        return self.act(self.fc(x))


class AttentionM(nn.Module):
    def __init__(self, s: Attention, tokens: int):
        super().__init__()
        self.s, self.tokens = s, tokens
        self.kv = s.kv_heads or s.heads
        self.sizes = [s.heads * s.head_dim, self.kv * s.head_dim, self.kv * s.v_head_dim]
        if s.fused:
            self.qkv = nn.Linear(s.d, sum(self.sizes))
        else:
            self.q, self.k, self.v = (nn.Linear(s.d, n) for n in self.sizes)
        self.proj = nn.Linear(s.heads * s.v_head_dim, s.d)
        self.scale = 1.0 / math.sqrt(s.head_dim)  # a constant: pruning head dims must not change it

    def _heads(self, t, b, n, heads, head_dim):
        if self.s.shape == "minus1":
            t = t.view(b, n, heads, -1)
        else:
            t = t.view(b, n, heads, head_dim)
        return t.transpose(1, 2)

    def _repeat_kv(self, t, b, n, head_dim):
        """(B, KV, N, D) -> (B, KV * R, N, D), every kv head repeated R times (HF repeat_kv)."""
        r = self.s.heads // self.kv
        if self.s.shape == "minus1":
            return t[:, :, None].expand(-1, -1, r, -1, -1).flatten(1, 2)
        return t[:, :, None, :, :].expand(b, self.kv, r, n, head_dim).reshape(b, self.s.heads, n, head_dim)

    def forward(self, x):
        s = self.s
        if s.shape == "const":
            b, n = BATCH, self.tokens
        else:
            b, n = x.shape[0], x.shape[1]
        if s.fused and len(set(self.sizes)) == 1:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        elif s.fused:
            q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = self._heads(q, b, n, s.heads, s.head_dim)
        k = self._heads(k, b, n, self.kv, s.head_dim)
        v = self._heads(v, b, n, self.kv, s.v_head_dim)
        gqa = self.kv != s.heads
        if gqa and s.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            if gqa:
                k, v = self._repeat_kv(k, b, n, s.head_dim), self._repeat_kv(v, b, n, s.v_head_dim)
            if s.impl == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v)
            else:
                attn = (q @ k.transpose(-2, -1)) * self.scale
                o = attn.softmax(dim=-1) @ v
        o = o.transpose(1, 2)
        o = o.reshape(b, n, -1) if s.shape == "minus1" else o.reshape(b, n, s.heads * s.v_head_dim)
        o = self.proj(o)
        return x + o if s.residual else o


class MHAM(nn.Module):
    def __init__(self, s: MHA):
        super().__init__()
        self.mha = nn.MultiheadAttention(s.d, s.heads, bias=s.bias, batch_first=True)
        self.residual = s.residual

    def forward(self, x):
        y = self.mha(x, x, x, need_weights=False)[0]
        return x + y if self.residual else y


class MLPM(nn.Module):
    def __init__(self, s: MLP):
        super().__init__()
        self.fc1 = nn.Linear(s.d, 2 * s.hidden if s.glu else s.hidden)
        self.fc2 = nn.Linear(s.hidden, s.d)
        self.act, self.residual, self.glu = activation(s.act), s.residual, s.glu

    def forward(self, x):
        h = self.fc1(x)
        if self.glu:
            a, g = h.chunk(2, dim=-1)
            h = a * self.act(g)
        else:
            h = self.act(h)
        y = self.fc2(h)
        return x + y if self.residual else y


class Net(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        tokens = arch.input[0] if len(arch.input) == 2 else None
        blocks = []
        h = arch.input[1] if len(arch.input) == 3 else None
        for spec in arch.blocks:
            if isinstance(spec, Pool):
                h //= 2
            if isinstance(spec, Conv) and spec.stride > 1:
                h = (h - 1) // spec.stride + 1
            if isinstance(spec, ToTokens):
                tokens = h * h
            blocks.append(AttentionM(spec, tokens) if isinstance(spec, Attention) else make(spec))
        self.blocks = nn.ModuleList(blocks)
        self.head_kind = arch.head.kind
        self.tokens_out = tokens is not None
        self.fc = nn.Linear(arch.head.features, CLASSES)
        self.aux = arch.aux

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.head_kind == "flatten":
            x = torch.flatten(x, 1)
        elif self.head_kind == "view":
            x = x.reshape(x.size(0), -1)
        elif self.head_kind == "pool":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        elif self.tokens_out:
            x = x.mean(1)
        else:
            x = x.mean((2, 3))
        if self.aux:
            return self.fc(x), x
        return self.fc(x)


_MODULES = {Conv: ConvM, Residual: ResidualM, Concat: ConcatM, Split: SplitM, Shuffle: ShuffleM,
            ChannelLN: ChannelLNM, SE: SEM, Pool: PoolM, Linear: LinearM, MLP: MLPM, MHA: MHAM}


def make(spec) -> nn.Module:
    if isinstance(spec, BN):
        return nn.BatchNorm2d(spec.c)
    if isinstance(spec, Act):
        return activation(spec.name)
    if isinstance(spec, GroupNormB):
        return nn.GroupNorm(spec.groups, spec.c)
    if isinstance(spec, LayerNormB):
        return nn.LayerNorm(spec.d)
    if isinstance(spec, ToTokens):
        return ToTokensM(spec)
    return _MODULES[type(spec)](spec)


def build(arch: Arch):
    """``(model in eval mode, (input,))`` with every tensor drawn from ``arch.seed``."""
    torch.manual_seed(arch.seed)
    model = Net(arch)
    gen = torch.Generator().manual_seed(arch.seed)
    with torch.no_grad():
        for module in model.modules():
            _init(module, gen)
    model.eval()
    x = torch.randn((BATCH,) + tuple(arch.input), generator=gen)
    return model, (x,)


def _init(m: nn.Module, gen: torch.Generator) -> None:
    """LeCun-normal weights keep activations O(1); random norm statistics exercise buffer slicing."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in))
        if m.bias is not None:
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    elif isinstance(m, nn.MultiheadAttention):
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            w = getattr(m, name)
            if w is not None:
                w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1]))
        if m.in_proj_bias is not None:
            m.in_proj_bias.copy_(0.1 * torch.randn(m.in_proj_bias.shape, generator=gen))
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def describe(arch: Arch) -> str:
    """The architecture as nested text, one block a line (for failure messages)."""
    lines = [f"Arch(input={arch.input}, seed={arch.seed})"]

    def walk(blocks, indent):
        for b in blocks:
            if isinstance(b, Residual):
                lines.append(" " * indent + f"Residual(act={b.act})")
                walk(b.body, indent + 2)
            elif isinstance(b, (Concat, Split)):
                lines.append(" " * indent + (f"Split(sizes={b.sizes}, how={b.how}, merge={b.merge})"
                                             if isinstance(b, Split) else "Concat"))
                for i, branch in enumerate(b.branches):
                    lines.append(" " * (indent + 2) + f"branch {i}" + (" (identity)" if not branch else ""))
                    walk(branch, indent + 4)
            else:
                lines.append(" " * indent + repr(b))

    walk(arch.blocks, 2)
    lines.append("  " + repr(arch.head))
    return "\n".join(lines)


# -- strategies --------------------------------------------------------------------------------------------
CHANNELS = (4, 6, 8, 12, 16)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_spec(draw, cin: int, cout: int | None = None):
    """A conv from ``cin`` channels: dense, grouped (not depthwise) or depthwise; ``cout`` fixed if given."""
    kinds = ["dense", "grouped", "depthwise"]
    kind = draw(st.sampled_from(kinds))
    if kind == "depthwise" and (cout is None or cout % cin == 0):
        groups = cin
        cout = cout if cout is not None else cin * draw(st.sampled_from([1, 2]))
    else:
        if cout is None:
            cout = draw(st.sampled_from(CHANNELS))
        common = [g for g in _divisors(math.gcd(cin, cout)) if 1 < g < cin]
        groups = draw(st.sampled_from(common)) if kind == "grouped" and common else 1
    return Conv(cin, cout, k=draw(st.sampled_from([1, 3])), groups=groups, bias=draw(st.booleans()),
                bn=draw(st.booleans()), act=draw(st.none() | st.sampled_from(ACTS)))


@st.composite
def branch_body(draw, cin: int, cout: int | None, depth: int):
    """1-2 blocks from ``cin`` to ``cout`` (any when None); returns (blocks, out channels)."""
    blocks, c = [], cin
    n = draw(st.integers(1, 2))
    for i in range(n):
        last = i == n - 1
        if depth > 0 and draw(st.integers(0, 3)) == 0:
            block, c2 = draw(image_block(c, depth - 1))
            if not last or cout is None or c2 == cout:
                blocks.append(block)
                c = c2
                continue
        spec = draw(conv_spec(c, cout if last else None))
        blocks.append(spec)
        c = spec.cout
    return tuple(blocks), c


@st.composite
def image_block(draw, c: int, depth: int):
    """One channel-mixing block on (B, c, H, W); returns (spec, out channels)."""
    kind = draw(st.sampled_from(["conv", "conv", "bn", "act", "residual", "residual", "concat", "concat", "split",
                                 "split", "shuffle", "channel_ln", "group_norm", "se"]))
    if kind == "bn":
        return BN(c), c
    if kind == "act":
        return Act(draw(st.sampled_from(ACTS))), c
    if kind == "residual":
        body, _ = draw(branch_body(c, c, depth))
        return Residual(body, draw(st.none() | st.sampled_from(ACTS))), c
    if kind == "concat":
        branches, total = [], 0
        for _ in range(draw(st.integers(2, 3))):
            if draw(st.integers(0, 3)) == 0:
                branches.append(())
                total += c
            else:
                body, co = draw(branch_body(c, None, depth))
                branches.append(body)
                total += co
        return Concat(tuple(branches)), total
    if kind == "split" and c >= 4:
        how = draw(st.sampled_from(["split", "chunk", "torch_split"]))
        if how == "chunk" and (c % 2 == 0 or c % 3 == 0):
            n = draw(st.sampled_from([d for d in (2, 3, 4) if c % d == 0]))
            sizes = (c // n,) * n
        else:
            how = "split" if how == "chunk" else how
            cut = draw(st.integers(1, c - 1))
            sizes = (cut, c - cut)
        equal = len(set(sizes)) == 1
        merge = draw(st.sampled_from(["cat", "add", "gate"] if equal and len(sizes) == 2 else
                                     ["cat", "add"] if equal else ["cat"]))
        branches, outs = [], []
        for size in sizes:
            target = None if merge == "cat" else sizes[0]
            if draw(st.integers(0, 2)) == 0:
                branches.append(())
                outs.append(size)
            else:
                body, co = draw(branch_body(size, target, depth))
                branches.append(body)
                outs.append(co)
        return Split(sizes, how, tuple(branches), merge), (sum(outs) if merge == "cat" else outs[0])
    if kind == "shuffle":
        options = [g for g in _divisors(c) if 1 < g < c]
        if options:
            return Shuffle(c, draw(st.sampled_from(options)), draw(st.sampled_from(["const", "minus1", "computed"]))), c
    if kind == "channel_ln":
        return ChannelLN(c), c
    if kind == "group_norm":
        return GroupNormB(c, draw(st.sampled_from(_divisors(c)))), c
    if kind == "se":
        return SE(c, draw(st.sampled_from([2, 4, 8]))), c
    spec = draw(conv_spec(c))
    return spec, spec.cout


@st.composite
def token_block(draw, d: int):
    kind = draw(st.sampled_from(["linear", "layer_norm", "attention", "attention", "mlp", "mha"]))
    if kind == "linear":
        dout = draw(st.sampled_from(CHANNELS))
        return Linear(d, dout, draw(st.booleans()), draw(st.none() | st.sampled_from(ACTS))), dout
    if kind == "layer_norm":
        return LayerNormB(d), d
    if kind == "mlp":
        return MLP(d, draw(st.sampled_from([8, 16, 24])), draw(st.sampled_from(ACTS)), draw(st.booleans()),
                   draw(st.booleans())), d
    if kind == "mha":
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
        return MHA(d, heads, draw(st.booleans()), draw(st.booleans())), d
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([0, 0] + [k for k in (1, 2) if k < heads and heads % k == 0]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    v_head_dim = draw(st.sampled_from([head_dim, head_dim, 2, 4, 8]))
    return Attention(d, heads, head_dim, v_head_dim, draw(st.booleans()), draw(st.sampled_from(["sdpa", "manual"])),
                     draw(st.booleans()), draw(st.sampled_from(["symbolic", "minus1", "const"])), kv_heads), d


@st.composite
def architectures(draw, max_blocks: int = 5):
    """A random :class:`Arch`: an image stem and blocks (maybe turning into tokens), or a token model."""
    seed = draw(st.integers(0, 2**31 - 1))
    blocks = []
    if draw(st.integers(0, 3)) == 0:  # a token model: (B, N, D) in
        n, d = draw(st.sampled_from([4, 6, 8])), draw(st.sampled_from(CHANNELS))
        shape = (n, d)
        for _ in range(draw(st.integers(1, max_blocks))):
            spec, d = draw(token_block(d))
            blocks.append(spec)
        head = draw(st.sampled_from(["flatten", "view", "mean"]))
        aux = draw(st.integers(0, 7)) == 0
        return Arch(shape, tuple(blocks), Head(head, d * n if head in ("flatten", "view") else d), seed, aux)
    shape = (3, 8, 8)
    stem = draw(conv_spec(3))
    if draw(st.integers(0, 5)) == 0:
        stem = Conv(stem.cin, stem.cout, stem.k, stem.groups, stem.bias, stem.bn, stem.act, stride=2)
    blocks.append(stem)
    c, h, tokens = stem.cout, 8 // stem.stride, False
    for _ in range(draw(st.integers(1, max_blocks))):
        if not tokens and h == 8 and draw(st.integers(0, 6)) == 0:
            blocks.append(Pool(draw(st.sampled_from(["max", "avg"]))))
            h = 4
            continue
        if not tokens and draw(st.integers(0, 6)) == 0:
            blocks.append(ToTokens(draw(st.sampled_from(["flatten", "reshape"]))))
            tokens = True
            continue
        spec, c = draw(token_block(c) if tokens else image_block(c, depth=1))
        blocks.append(spec)
    aux = draw(st.integers(0, 7)) == 0
    if tokens:
        head = draw(st.sampled_from(["flatten", "view", "mean"]))
        return Arch(shape, tuple(blocks), Head(head, c * h * h if head in ("flatten", "view") else c), seed, aux)
    head = draw(st.sampled_from(["flatten", "view", "mean", "pool"]))
    if isinstance(blocks[-1], GroupNormB):  # the spatial mean of a normalised map can be a constant
        head = "flatten"
    return Arch(shape, tuple(blocks), Head(head, c * h * h if head in ("flatten", "view") else c), seed, aux)
