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

It logs one row per model to ``benchmarks/RESULTS_macs.jsonl`` and renders ``RESULTS_macs.md`` from it
(:func:`render`, also called by ``results.py``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from pathlib import Path

import torch
import torchvision

import fxprune

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

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


COLUMNS = ["model", "fxprune GMACs", "fvcore GMACs", "fxprune / fvcore", "thop GMACs (reference)"]
INTRO = ("Input 1x3x224x224, 299 for inception_v3; models in eval mode. fxprune follows fvcore's convention "
         "(conv/linear/matmul/einsum MACs, batch norm 1-2 and layer/group/instance norm 4-5 per element, adaptive "
         "average pooling 1 per input element, upsampling; activations, adds and max pooling count 0). fvcore has no "
         "handle for `scaled_dot_product_attention`; the benchmark gives it one counting the two matmuls, as fxprune "
         "does. thop hooks modules rather than ops (it misses functional matmuls, e.g. inside "
         "`nn.MultiheadAttention` and Swin's attention, and counts activations and pooling), so its column is for "
         "reference only.")


def render(runs: list[dict]) -> str:
    return harness.table_report("fxprune.count against fvcore (and thop) on torchvision models", runs, COLUMNS,
                                INTRO, {c: "{:.4f}" for c in COLUMNS})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--out", default=str(HERE / "RESULTS_macs.md"))
    parser.add_argument("--log", help="JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log")
    args = parser.parse_args(argv)
    log_path = Path(args.log) if args.log else Path(args.out).with_suffix(".jsonl")
    if not args.render:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        log = harness.Log(log_path, harness.run_header("macs_vs_fvcore.py", list(sys.argv[1:] if argv is None
                                                                                  else argv)))
        for name in args.models:
            kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
            model = getattr(torchvision.models, name)(**kwargs).eval()
            size = 299 if name == "inception_v3" else 224
            x = torch.randn(1, 3, size, size)
            ours, reference = fxprune.count(model, (x,))[0], fvcore_macs(model, x)
            thop_value = thop_macs(model, x)
            row = dict(zip(COLUMNS, [name, ours / 1e9, reference / 1e9, ours / reference,
                                     None if thop_value is None else thop_value / 1e9]))
            log.write(row)
            print(row, flush=True)
        log.finish()
    print(harness.write_report(render, log_path, args.out))


if __name__ == "__main__":
    main()
