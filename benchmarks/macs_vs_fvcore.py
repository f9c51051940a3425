"""``fxprune.count`` against fvcore's ``FlopCountAnalysis`` (and thop, for reference) on torchvision models.

fxprune follows fvcore's convention (see :mod:`fxprune.macs`). fvcore has no
handle for ``scaled_dot_product_attention``, so it is given one that counts the
two matmuls, as fxprune does; without it fvcore misses the attention matmuls
of ViT-style models. thop hooks modules instead of ops and counts differently
(activations and pooling, no functional matmuls), so its column is shown for
reference only.

Run::

    pip install fvcore thop      # fvcore is in the dev extras
    python benchmarks/macs_vs_fvcore.py > out.txt

and paste the table into benchmarks/RESULTS_macs.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings

import torch
import torchvision

import fxprune

MODELS = ["alexnet", "vgg11", "resnet18", "resnet50", "densenet121", "googlenet", "inception_v3", "mobilenet_v2",
          "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x1_0", "squeezenet1_0", "efficientnet_b0",
          "regnet_x_400mf", "convnext_tiny", "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"]


def fvcore_macs(model, x) -> float:
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

    def sdpa(inputs, outputs):
        q, k, v = (get_shape(i) for i in inputs[:3])
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])

    analysis = FlopCountAnalysis(model, x).set_op_handle("aten::scaled_dot_product_attention", sdpa)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis.total()


def thop_macs(model, x) -> float | None:
    try:
        import thop
    except ImportError:
        return None
    return thop.profile(model, (x,), verbose=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print("| model | fxprune GMACs | fvcore GMACs | fxprune / fvcore | thop GMACs (reference) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models:
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = getattr(torchvision.models, name)(**kwargs).eval()
        size = 299 if name == "inception_v3" else 224
        x = torch.randn(1, 3, size, size)
        ours, reference = fxprune.count(model, (x,))[0], fvcore_macs(model, x)
        thop_value = thop_macs(model, x)
        thop_text = "-" if thop_value is None else f"{thop_value / 1e9:.4f}"
        print(f"| {name} | {ours / 1e9:.4f} | {reference / 1e9:.4f} | {ours / reference:.4f} | {thop_text} |",
              flush=True)


if __name__ == "__main__":
    main()
