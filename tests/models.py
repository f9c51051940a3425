"""Small models shared by the tests: hard cases of structural pruning, the importance and calibration MLPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


def skip_unless_symbolically_traceable(model: nn.Module) -> None:
    """Skip a test about symbolic_trace's graph where this torch cannot trace ``model``.

    torch 2.6 and 2.8 (not 2.11) reject a proxy inside the int list of a torch function
    (``torch.reshape(x, (B, N, 2, 4))``, ``F.avg_pool2d(y, window)``); fxprune then captures with
    torch.export, whose graph such tests do not describe.
    """
    from fxprune.analysis.capture import _Tracer

    try:
        _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means the export fallback
        pytest.skip(f"symbolic_trace cannot trace {type(model).__name__} here: {type(exc).__name__}")


class WorkedExample(nn.Module):
    """The worked example of docs/ARCHITECTURE.md: conv1 -> bn1 -> relu -> grouped conv2 + residual -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.conv2(y) + y, 1))


class ResidualCNN(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                   nn.Conv2d(24, width, 3, padding=1), nn.BatchNorm2d(width))
        self.down = nn.Conv2d(width, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        x = self.down(x)
        return self.head(x.mean((2, 3)))


class DenseBlock(nn.Module):
    """DenseNet-style: every layer sees the concatenation of all earlier feature maps."""

    def __init__(self, growth: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(8 + i * growth), nn.ReLU(), nn.Conv2d(8 + i * growth, growth, 3, padding=1))
            for i in range(3))
        self.head = nn.Conv2d(8 + 3 * growth, 5, 1)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.head(torch.cat(features, 1))


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1 = nn.Conv2d(c, c, 3, padding=1)
        self.cv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.cv2(F.silu(self.cv1(x)))


class C2f(nn.Module):
    """YOLOv8-style: conv -> chunk(2) -> bottlenecks on the second half -> cat of every piece -> conv."""

    def __init__(self, c1: int = 3, c2: int = 12, n: int = 2):
        super().__init__()
        self.c = 8
        self.cv1 = nn.Conv2d(c1, 2 * self.c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = nn.Conv2d((2 + n) * self.c, c2, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class ChannelShuffle(nn.Module):
    """ShuffleNet-style: split, branch, concat, then view(B, g, C/g, H, W) -> transpose -> view."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat((a, self.branch(b)), dim=1)
        batch, channels, h, w = x.shape
        x = x.view(batch, 2, channels // 2, h, w).transpose(1, 2).contiguous().view(batch, channels, h, w)
        return self.head(x)


class GroupedConv(nn.Module):
    """groups=4, neither 1 nor depthwise."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 8, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.bn(self.conv2(F.relu(self.conv1(x))))))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class HardCodedDecoder(nn.Module):
    """A generator head with a hard-coded ``view(-1, 256, 4, 4)`` feeding a ConvTranspose2d."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 256 * 4 * 4)
        self.deconv1 = nn.ConvTranspose2d(256, 32, 4, stride=2, padding=1)
        self.deconv2 = nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1)

    def forward(self, z):
        x = F.relu(self.fc(z)).view(-1, 256, 4, 4)
        return self.deconv2(F.relu(self.deconv1(x)))


class ViTAttention(nn.Module):
    """timm-style attention: one qkv linear, ``reshape(B, N, 3, H, D)``, permute, unbind, hard-coded C."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.attn = ViTAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x)


class LSTMHead(nn.Module):
    def __init__(self, bidirectional: bool = True):
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(12 * (2 if bidirectional else 1), 4)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class MHAModel(nn.Module):
    def __init__(self, batch_first: bool = True, need_weights: bool = False):
        super().__init__()
        self.need_weights = need_weights
        self.embed = nn.Linear(10, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=self.need_weights)
        return self.fc(F.gelu(a))


class MHAPoolExported(nn.Module):
    """An attention-pooling head (a learnt query) in a model symbolic_trace rejects (``if x.dim() == 4``):
    captured with torch.export, nn.MultiheadAttention arrives as aten ops, its scores as ``aten.bmm(self, mat2)``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.query = nn.Parameter(torch.randn(1, 1, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        h = self.proj(x)
        pooled, _ = self.attn(self.query.expand(h.shape[0], -1, -1), h, h)
        return self.head(pooled[:, 0])


class PreNormBlock(nn.Module):
    """A pre-norm transformer block over :class:`ViTAttention`: heads, then an MLP of ``mlp`` units."""

    def __init__(self, dim: int = 32, heads: int = 4, mlp: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class BlockStack(nn.Module):
    """Blocks of one structure but for their MLP widths (``mlps``): isomorphic classes across layers."""

    def __init__(self, mlps=(64, 64, 128), dim: int = 32):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.Sequential(*[PreNormBlock(dim, 4, m) for m in mlps])
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def first_output(output):
    """A model output's first tensor: the tensor itself, the first of a tuple, or a ``ModelOutput``'s first field
    (logits or last hidden state).

    Example::

        >>> first_output(hf_model(ids)).shape        # (batch, length, vocabulary) for a causal LM
    """
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))


CHECKPOINT_LLAMA = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128)  # tiny_llama's sizes, ~300KB


def saved_tiny_llama(folder, **config):
    """A tiny LLaMA (:func:`fxprune.testing.tiny_llama` over :data:`CHECKPOINT_LLAMA` and ``config``) saved in
    ``folder`` in shards of at most 20KB, for checkpoint tests; returns the model. Needs transformers.

    Example::

        >>> model = saved_tiny_llama(tmp_path / "src")
        >>> fxprune.prune_checkpoint(tmp_path / "src", tmp_path / "out", ratio=0.5)
    """
    from fxprune.testing import tiny_llama

    model = tiny_llama(**{**CHECKPOINT_LLAMA, **config})
    model.save_pretrained(folder, max_shard_size="20KB")
    return model


def fixed_mlp():
    """Linear(3 -> 4) -> ReLU -> Linear(4 -> 2): one prunable group, the 4 hidden units."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1., 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]]))
        model[0].bias.copy_(torch.tensor([0.5, 0, 0, 0]))
        model[2].weight.copy_(torch.tensor([[1., 0, 0, 2], [0, 1, 0, 0]]))
        model[2].bias.zero_()
    return model


def bn_mlp(gamma):
    """Linear(3 -> 4) -> BatchNorm(gamma) -> ReLU -> Linear(4 -> 5) -> ReLU -> Linear(5 -> 2), eval mode."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(gamma))
    return model.eval()


class MLP(nn.Module):
    """Linear -> activation -> Linear; ``forward(x)`` so that dict batches say ``{"x": ...}``."""

    producer, consumer = "fc1", "fc2"  # for the redundant-unit oracle: the hidden units' producer and consumer

    def __init__(self, d_in=3, hidden=5, d_out=2, act=nn.ReLU, bias=True):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, hidden), act(), nn.Linear(hidden, d_out, bias=bias)
        self.sample = (d_in,)  # one input's shape

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x.view(-1, nx), weight)`` with the weight stored (in, out)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.nx, self.weight = nx, nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, self.nx), self.weight)


def tanh_cnn():
    """Conv -> BatchNorm -> tanh -> conv -> tanh -> flatten -> linear -> tanh -> linear, on (2, 6, 6) inputs."""
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(), nn.Conv2d(6, 4, 3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, 3))


def plant_redundant_units(model, planted: dict) -> None:
    """Make each planted hidden unit k redundant: ``planted[k] = m`` copies unit m's producer row and bias
    (and BatchNorm entries: equal activations), ``planted[k] = None`` makes its activation a constant (zero
    row, a bias). Before a grouped consumer, k and m are channel ranks within every block. ``model`` names its
    producer in ``model.producer`` (and ``producer_axis = 1`` where its weight is stored (in, out), ``bn`` a
    BatchNorm after it, ``blocks`` the consumer's groups), as :class:`MLP` does.

    Example: ``plant_redundant_units(MLP(4, 8, 3), {2: 5, 6: None})``: hidden unit 2 computes what unit 5 does and
    unit 6 is constant, so a consumer can absorb both (the redundant-unit oracle of reconstruction)."""
    producer, bn = getattr(model, model.producer), getattr(model, "bn", None)
    rows = producer.weight.T if getattr(model, "producer_axis", 0) else producer.weight  # unit k: rows[k]
    blocks = getattr(model, "blocks", 1)  # a grouped consumer: channel rank k of every block
    width = len(rows) // blocks
    planted = {b * width + k: None if m is None else b * width + m for k, m in planted.items() for b in range(blocks)}
    with torch.no_grad():
        for k, m in planted.items():
            if m is None:
                rows[k] = 0
                producer.bias[k] = 0.7
                continue
            rows[k] = rows[m]
            producer.bias[k] = producer.bias[m]
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if bn is not None else ():
                t[k] = t[m]


class ReadsValues(nn.Module):
    """A forward whose shapes depend on tensor values, as detection and token-dropping heads have: a bound read
    with ``.item()``, the pixels a mask from the data keeps, a count from ``nonzero``. FakeTensor cannot
    propagate it; fxprune runs those nodes for real on the example inputs. The 8 channels stay prunable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = self.mix(y).clamp(max=x.abs().amax().item()) + y      # a bound read from the data
        pixels = y.flatten(2).transpose(1, 2)                       # (B, HW, C)
        kept = pixels[pixels.amax(-1) > 0.1]                        # (N, C): N is data, C is not
        count = (x > 0).nonzero().shape[0]                          # a size read from the data
        return self.fc(kept).sum(0, keepdim=True) * (1 + count / 1000)


class CachingHead(nn.Module):
    """A head that caches on ``self`` what it computes, as ultralytics' Detect head caches its anchors and the
    input shape they were made for. ``branch=True``: behind a test on a size that symbolic_trace cannot follow
    (captured with torch.export); ``branch=False``: every call (traced)."""

    def __init__(self, branch: bool = True):
        super().__init__()
        self.branch = branch
        self.conv = nn.Conv2d(8, 2, 1)
        self.shape = None

    def forward(self, x):
        y = self.conv(x)
        if not self.branch:
            self.last = y
            return y
        if self.shape != y.shape:
            self.grid = torch.arange(y.shape[-1]).to(y)
            self.shape = y.shape
        return y + self.grid


class CachesOnSelf(nn.Module):
    """A convolution and a :class:`CachingHead`, a child module as ultralytics' Detect is (the torch.export of
    torch 2.6-2.9, at least, cannot capture a root module that adds attributes to itself: it compares the root's
    attributes)."""

    def __init__(self, branch: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = CachingHead(branch)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


# -- other libraries' models at tiny sizes (random weights, nothing downloaded; skipped without the library) --

def timm_vit() -> tuple[nn.Module, tuple]:
    """timm's ``vit_tiny_patch16_224`` at 32x32 pixels in patches of 8 (3 heads of 64, width 192), eval mode."""
    timm = pytest.importorskip("timm", reason="timm is a test extra (pip install timm)")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    return model.eval(), (torch.randn(1, 3, 32, 32),)


def diffusers_unet() -> tuple[nn.Module, tuple]:
    """diffusers' ``UNet2DConditionModel`` with blocks of 32 and 64 channels, cross-attention over 32-wide
    states, 16x16 latents, eval mode."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install diffusers)")
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
    return model.eval(), (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, 32))


def open_clip_vit() -> tuple[nn.Module, tuple]:
    """The vision tower of an ``open_clip.CLIP`` (width 64, 2 layers, heads of 16, 32x32 pixels), eval mode: its
    blocks call ``nn.MultiheadAttention`` and open_clip's own ``LayerNorm`` subclass."""
    open_clip = pytest.importorskip("open_clip", reason="open-clip-torch is a test extra (pip install open-clip-torch)")
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                                                         head_width=16, mlp_ratio=2.0),
                           text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    return model.visual.eval(), (torch.randn(1, 3, 32, 32),)


class FixedLength(nn.Module):
    """Token ids through an embedding plus a position table of exactly 8 rows: the sequence length is fixed at 8
    by the model's own forward (``(B, S, 16) + (8, 16)``). ``branch=True`` adds a branch on the rank that
    symbolic_trace rejects, so that fxprune captures it with torch.export (which then fixes the length)."""

    def __init__(self, branch: bool = False):
        super().__init__()
        self.branch = branch
        self.embed = nn.Embedding(50, 16)
        self.pos = nn.Parameter(torch.randn(8, 16))
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, ids):
        h = self.embed(ids)
        if self.branch and ids.dim() == 3:
            h = h.mean(2)
        return self.fc2(F.relu(self.fc1(h + self.pos)))


def tiny_transformers(name: str):
    """``(model in eval mode, example(batch, length) -> (args, kwargs))`` for a tiny random Hugging Face model
    (seeded): ``"bert"``, ``"gpt2"``, ``"llama"``, ``"vit"``, ``"swin"`` (the configuration of issue 23) or
    ``"whisper"`` (16 mel bins, 64 frames). ``length`` is the token sequence's (Whisper: the decoder's); an image
    or a spectrogram keeps its size. Needs transformers."""
    T = pytest.importorskip("transformers")
    from fxprune.testing import tiny_llama

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def ids(batch, length):
        return torch.randint(0, 100, (batch, length), generator=gen)

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if name == "bert":
        model = T.BertModel(T.BertConfig(vocab_size=100, **small))
        return model.eval(), lambda batch, length: ((ids(batch, length),), {})
    if name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64))
        return model.eval(), lambda batch, length: ((ids(batch, length),), {})
    if name == "llama":
        return tiny_llama(), lambda batch, length: ((ids(batch, length),), {})
    if name in ("vit", "swin"):
        if name == "vit":
            model = T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=3, **small))
        else:
            model = T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                                                              num_heads=[2, 4], window_size=4, num_labels=3))
        return model.eval(), lambda batch, length=None: ((torch.randn(batch, 3, 32, 32, generator=gen),), {})
    if name == "whisper":
        config = T.WhisperConfig(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1,
                                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                 decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32,
                                 max_target_positions=64, decoder_start_token_id=0, pad_token_id=0,
                                 begin_suppress_tokens=None, suppress_tokens=None)
        model = T.WhisperForConditionalGeneration(config)
        return model.eval(), lambda batch, length: ((torch.randn(batch, 16, 64, generator=gen),),
                                                    {"decoder_input_ids": ids(batch, length)})
    raise KeyError(name)
