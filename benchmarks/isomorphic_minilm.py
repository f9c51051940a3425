"""Uniform against global against isomorphic ranking on the real all-MiniLM-L6-v2, right after pruning.

The model, calibration and evaluation sentences and the measures are those of ``benchmarks/quality.py``'s
``minilm`` task (mean cosine between the original and pruned sentence embeddings, nearest-neighbour
agreement); the hidden size is kept (``ignore`` the word embeddings), so heads and MLP units are pruned:

* uniform: ``prune(model, ratio)``: every layer loses ``ratio`` of its heads and of its MLP units;
* global: ``global_pruning=True``: the heads and MLP units of all layers ranked together (by count with a
  ratio, by score per parameter saved with ``target_params``);
* isomorphic: ``global_pruning=True, isomorphic=True``: the six layers' heads ranked together, their MLP
  units together (:mod:`fxprune.planning.isomorphic`), each class losing ``ratio`` (with ``target_params``,
  the one ratio that keeps that fraction of the parameters).

A ratio is not one parameter budget across rankings (global by count takes cheap MLP units rather than
heads), so ``--target-params`` rows compare them at equal size.

Columns: the measures, the parameters kept, the heads and MLP units left per layer.

Run (about 20 s per row on 2 shared cores; ``--ratios``/``--importances`` choose the rows)::

    python benchmarks/isomorphic_minilm.py --ratios 0.3 --target-params 0.85,0.7 --importances l2,activation

One row per line of the log (``--log``, default ``--out`` with ``.jsonl``) after a header naming the run; the
report is rendered from it (:func:`render`, also called by ``results.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import fxprune

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import harness  # noqa: E402
from quality import _neighbours, _sentence_embeddings, load_minilm, parameters  # noqa: E402

MODES = {"uniform": {}, "global": {"global_pruning": True},
         "isomorphic": {"global_pruning": True, "isomorphic": True}}


def setup():
    """The model, its tokenised calibration batches, evaluation batch and example (as quality.py's minilm)."""
    import pydoc_data.topics as topics
    from prune_minilm import SENTENCES, topic_sentences

    model, encode = load_minilm()
    names = sorted(topics.topics)
    evaluation_text = SENTENCES + topic_sentences(names[1::2])[:200]
    calibration_text = [s for s in topic_sentences(names[0::2]) if s not in set(evaluation_text)]

    calibration = [encode(calibration_text[i:i + 16]) for i in range(0, len(calibration_text), 16)]
    return model, calibration, encode(evaluation_text), encode(SENTENCES[:2])


def widths(model) -> tuple[list, list]:
    """Heads and MLP units left per layer."""
    params = dict(model.named_parameters())
    layers = range(sum(name.endswith("intermediate.dense.weight") for name in params))
    heads = [params[f"encoder.layer.{i}.attention.self.query.weight"].shape[0] // 32 for i in layers]  # head dim 32
    return heads, [params[f"encoder.layer.{i}.intermediate.dense.weight"].shape[0] for i in layers]


COLUMNS = ("importance", "budget", "ranking", "mean cosine", "NN agreement", "params kept", "heads per layer",
           "MLP units per layer", "seconds")


def render(runs: list[dict]) -> str:
    """The report of the log's last run."""
    run = runs[-1]
    fmt = {"mean cosine": "{:.4f}", "NN agreement": "{:.3f}", "params kept": "{:.3f}", "seconds": "{:.0f}"}
    lines = ["# Uniform, global and isomorphic ranking on all-MiniLM-L6-v2", "", harness.describe_runs([run]), "",
             "Right after pruning, no refit or distillation; hidden size kept, heads (their head dim kept whole) and "
             "MLP units pruned. Mean cosine between the original and pruned sentence embeddings of the evaluation "
             "sentences, nearest-neighbour agreement (see `benchmarks/quality.py`'s minilm task). `global` with a "
             "ratio ranks by count (it then keeps more parameters, not the same budget); with `target_params` by "
             "score per parameter saved. `isomorphic`: every layer's heads one class, every layer's MLP units "
             "another, each losing the ratio (with a target, the one searched ratio).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in run["rows"]:
        lines.append("| " + " | ".join(fmt.get(c, "{}").format(r[c]) if c in r else "" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.3")
    parser.add_argument("--target-params", default="0.85",
                        help="fractions of the parameters to keep, searched per ranking (global: by cost)")
    parser.add_argument("--importances", default="l2,activation")
    parser.add_argument("--out", default=str(HERE / "isomorphic_minilm.md"), help="markdown report")
    parser.add_argument("--log", help="the JSON-lines log the report is rendered from (default: --out with .jsonl)")
    parser.add_argument("--render", action="store_true", help="only render --out from --log, measuring nothing")
    args = parser.parse_args(argv)
    log_path = Path(args.log) if args.log else Path(args.out).with_suffix(".jsonl")
    if args.render:
        harness.write_report(render, log_path, args.out)
        return 0
    log = harness.Log(log_path, harness.run_header("isomorphic_minilm.py", list(sys.argv[1:] if argv is None
                                                                                else argv)))
    model, calibration, evaluation, example = setup()
    reference = _sentence_embeddings(model, evaluation)
    reference_nn, params0 = _neighbours(reference), parameters(model)
    budgets = [("ratio", float(r)) for r in args.ratios.split(",") if r] + \
              [("target_params", float(t)) for t in args.target_params.split(",") if t]
    start_all = time.perf_counter()
    for importance in args.importances.split(","):
        for budget, value in budgets:
            for mode, options in MODES.items():
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pruned = fxprune.prune(model, example_inputs=(), kwargs=example, importance=importance,
                                           calibration=calibration if importance != "l2" else None,
                                           ignore=[model.embeddings.word_embeddings], **{budget: value}, **options)
                seconds = time.perf_counter() - start
                e = _sentence_embeddings(pruned, evaluation)
                heads, mlp = widths(pruned)
                row = {"importance": importance, "budget": f"{budget}={value:g}", "ranking": mode,
                       "mean cosine": (e * reference).sum(-1).mean().item(),
                       "NN agreement": (_neighbours(e) == reference_nn).float().mean().item(),
                       "params kept": parameters(pruned) / params0, "heads per layer": heads,
                       "MLP units per layer": mlp, "seconds": seconds}
                log.write(row)
                print(row, flush=True)
    log.finish(wall_s=time.perf_counter() - start_all)
    print(harness.write_report(render, log_path, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
