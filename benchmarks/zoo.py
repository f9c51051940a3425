"""The benchmark model catalogue: torchvision, timm and Hugging Face models with small example inputs.

A model is named ``source:name`` (``tv:resnet18``, ``timm:convnext_atto``,
``hf:llama``); :func:`build` returns ``(model, args, kwargs)`` with random
weights in eval mode, deterministic for a name. Inputs are small (64 px where a
model takes any size) because coverage is about structure, not accuracy.

Example::

    >>> model, args, kwargs = build("tv:resnet18")
    >>> args[0].shape, kwargs
    (torch.Size([1, 3, 64, 64]), {})
    >>> "timm:vit_tiny_patch16_224" in catalogue("full")
    True
"""

from __future__ import annotations

import os

# timm's fused attention hides q/k/v inside F.scaled_dot_product_attention; Torch-Pruning's timm
# recipe switches it off, and both libraries must see the same model.
os.environ.setdefault("TIMM_FUSED_ATTN", "0")

import torch  # noqa: E402

IMAGE = 64  # input side for every model that takes any size

# Torchvision detection models are data-dependent end to end (proposals, NMS): their backbones are benchmarked.
DETECTION = ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
             "fasterrcnn_resnet50_fpn_v2", "fcos_resnet50_fpn", "keypointrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",
             "maskrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "ssd300_vgg16",
             "ssdlite320_mobilenet_v3_large"]

# One or two sizes per torchvision family (and every segmentation, detection, video and flow architecture): the
# "standard" list, which fits a sweep of both libraries into about an hour on 2 shared cores. "full" is every model.
TV_STANDARD = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mnasnet1_0", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
    "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11_bn", "vit_b_16", "vit_b_32",
    "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn", "fcos_resnet50_fpn", "keypointrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
    "mc3_18", "r2plus1d_18", "r3d_18", "s3d", "mvit_v2_s", "swin3d_t", "raft_small",
]

TIMM = [  # 54 models, one or two per family (small variants: coverage is about structure)
    # ResNet family and relatives
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "resnest14d",
    # EfficientNet / NAS / mobile
    "efficientnet_b0", "tf_efficientnetv2_b0", "mobilenetv3_small_050", "mobilenetv3_large_100",
    "mobilenetv4_conv_small", "ghostnet_100", "ghostnetv2_100", "rexnet_100", "lcnet_050", "hardcorenas_a",
    "fasternet_t0", "starnet_s1",
    # ConvNeXt and other modern CNNs
    "convnext_atto", "convnextv2_atto", "inception_next_tiny", "hgnetv2_b0", "regnetx_002", "regnety_002",
    "regnetz_005", "densenet121", "dla34", "cspdarknet53", "ese_vovnet19b_dw", "repvgg_a0", "inception_v3",
    # Vision transformers and hybrids
    "vit_tiny_patch16_224", "vit_small_patch32_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "eva02_tiny_patch14_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "pit_ti_224", "swin_tiny_patch4_window7_224",
    "levit_128s", "coat_lite_tiny", "pvt_v2_b0", "twins_svt_small", "visformer_tiny", "efficientvit_b0",
    "efficientformerv2_s0", "mobilevit_xxs", "edgenext_xx_small", "fastvit_t8", "coatnet_nano_rw_224",
    # MLPs, pooling mixers, recurrent mixers
    "mixer_s32_224", "resmlp_12_224", "poolformer_s12", "sequencer2d_s",
]

HF = ["bert", "vit", "gpt2", "llama", "qwen2", "mistral", "t5"]

# CI: a residual CNN, a mobile net with SE and hardswish, timm ConvNeXt and DeiT, BERT (Torch-Pruning hangs on LLaMA)
QUICK = ["tv:resnet18", "timm:convnext_atto", "timm:deit_tiny_patch16_224", "hf:bert"]


def torchvision_names() -> list[str]:
    """Every model of the torchvision zoo except the quantized ones, as ``tv:name``."""
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    for module in (tvm.segmentation, tvm.detection, tvm.video, tvm.optical_flow):
        names += tvm.list_models(module=module)
    return [f"tv:{n}" for n in names]


def catalogue(selection: str = "standard") -> list[str]:
    """Model names for ``"quick"``, ``"standard"`` (:data:`TV_STANDARD`) or ``"full"`` (every torchvision model)."""
    if selection == "quick":
        return list(QUICK)
    tv = torchvision_names()
    if selection == "standard":
        tv = [f"tv:{n}" for n in TV_STANDARD]
    elif selection != "full":
        raise ValueError(f"unknown selection {selection!r}: quick, standard or full")
    return tv + [f"timm:{n}" for n in TIMM] + [f"hf:{n}" for n in HF]


def build(name: str):
    """``(model, args, kwargs)`` for ``source:name``: random weights, eval mode, seeded."""
    import torch

    source, _, model_name = name.partition(":")
    torch.manual_seed(0)
    builders = {"tv": _torchvision, "timm": _timm, "hf": _hf}
    if source not in builders:
        raise KeyError(f"unknown model source {source!r} in {name!r} (tv:, timm: or hf:)")
    model, args, kwargs = builders[source](model_name)
    model.eval()
    return model, args, kwargs


def _image(side: int, batch: int = 1, frames: int | None = None):
    import torch

    gen = torch.Generator().manual_seed(1)
    shape = (batch, 3, frames, side, side) if frames else (batch, 3, side, side)
    return torch.randn(shape, generator=gen)


def _torchvision(name: str):
    """Classification at 64 px (ViTs take ``image_size``), segmentation whole, detection backbones, video, flow."""
    import torchvision.models as tvm

    if name in tvm.list_models(module=tvm.detection):
        # the full model needs proposals and NMS; its backbone (with FPN or extra SSD blocks) is the prunable part
        side = 320 if "ssd" in name else 128
        full = tvm.get_model(name, weights=None, weights_backbone=None)
        return full.backbone, (_image(side),), {}
    if name in tvm.list_models(module=tvm.segmentation):
        return tvm.get_model(name, weights=None, weights_backbone=None, aux_loss=False), (_image(IMAGE),), {}
    if name in tvm.list_models(module=tvm.video):
        # MViT's positional tables and S3D's pooling fix the clip size; the 3-d ResNets and Swin3D take any
        fixed = {"mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224), "s3d": (16, 224)}
        frames, side = fixed.get(name, (4, IMAGE))
        return tvm.get_model(name, weights=None), (_image(side, frames=frames),), {}
    if name in tvm.list_models(module=tvm.optical_flow):
        return FlowUpdates(tvm.get_model(name, weights=None), 2), (_image(128), _image(128)), {}
    kwargs, side = {}, IMAGE
    if name.startswith("vit_"):
        kwargs["image_size"] = side
    elif name in ("inception_v3", "googlenet"):
        kwargs.update(init_weights=True, aux_logits=False)
        side = 96 if name == "inception_v3" else IMAGE  # inception_v3 needs at least 75 px
    elif name == "maxvit_t":
        side = 224  # its window partitions need a multiple of 224
    return tvm.get_model(name, weights=None, **kwargs), (_image(side),), {}


class FlowUpdates(torch.nn.Module):
    """RAFT with ``num_flow_updates`` (a forward argument, 12 by default) fixed: 2 keeps the sweep fast."""

    def __init__(self, raft: torch.nn.Module, updates: int):
        super().__init__()
        self.raft, self.updates = raft, updates

    def forward(self, image1, image2):
        return self.raft(image1, image2, num_flow_updates=self.updates)


def _timm(name: str):
    """``pretrained=False``; models with a fixed input size get it, the others 64 px."""
    import timm

    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    side = cfg["input_size"][-1] if cfg.get("fixed_input_size") else IMAGE
    if name == "inception_v3":
        side = 96  # its stem needs at least 75 px
    return model, (_image(side),), {}


def hf_tiny(family: str):
    """A tiny random-init model of a Hugging Face family: hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 100."""
    import transformers as T

    tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    decoder = dict(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64, use_cache=False, **tiny)
    configs = {
        "bert": lambda: T.BertModel(T.BertConfig(vocab_size=100, **tiny)),
        "vit": lambda: T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **tiny)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4,
                                                       n_positions=64, use_cache=False)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**decoder)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**decoder)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**decoder)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128,
                                                              num_layers=2, num_heads=4, use_cache=False)),
    }
    if family not in configs:
        raise KeyError(f"unknown Hugging Face family {family!r}: {', '.join(configs)}")
    return configs[family]()


def _ids(batch: int = 1, length: int = 7, seed: int = 0):
    import torch

    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf(family: str):
    """One example of batch 1, as users call it."""
    model = hf_tiny(family)
    if family == "vit":
        return model, (_image(32),), {}
    if family == "t5":
        return model, (_ids(),), {"decoder_input_ids": _ids(1, 5, seed=1)}
    return model, (_ids(),), {}


def other_inputs(args: tuple, kwargs: dict, batch: int = 3, length: int = 5) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of another batch size (every tensor whose first axis is the example's batch) and, for
    token ids (2-d integer tensors), another length: the sizes a pruned model meets after its one example."""
    import torch

    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim >= 1]
    first = tensors[0].shape[0] if tensors else None

    def other(v):
        if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != first:
            return v
        v = torch.cat([v] * batch, 0)[:batch] if v.shape[0] else v
        if v.ndim == 2 and not v.is_floating_point():
            v = torch.cat([v] * length, 1)[:, :length]
        return v

    return tuple(other(a) for a in args), {k: other(v) for k, v in kwargs.items()}
