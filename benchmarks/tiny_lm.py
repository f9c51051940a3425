"""A small LLaMA-architecture language model trained here, on text that ships with Python, for quality benchmarks.

Nothing downloads: the corpus is the standard library's source (``Lib/*.py``) and the language reference
shipped as ``pydoc_data.topics``. Tokens are bytes (vocabulary 256), so no tokenizer is needed. The topics
are split by name into three disjoint parts: training text (with the library source), calibration text
and evaluation text, so that calibration and evaluation never share a sentence.

The model: 4 decoder layers, hidden 256, 16 query heads and 8 key/value heads of 16 (grouped-query
attention), MLP 768, RoPE; trained with AdamW for a fixed number of steps (seeded) and cached under
``benchmarks/.cache`` so that the benchmark trains once (about 8 CPU minutes on one core).

Example::

    >>> model = trained_model()                       # trains on first use, then loads the cache
    >>> perplexity(model, evaluation_windows())      # bytes-level perplexity on held-out text
    3.9
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import transformers

CACHE = Path(__file__).resolve().parent / ".cache"
CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=8, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
TRAINING = dict(steps=1000, batch=16, length=128, lr=3e-3, warmup=30, seed=0)


def _topics() -> dict:
    import pydoc_data.topics as topics

    return dict(sorted(topics.topics.items()))


def _split_topics() -> tuple[list, list, list]:
    """Topic names for training, calibration and evaluation: every 5th name evaluates, the next one calibrates."""
    names = list(_topics())
    evaluation = names[0::5]
    calibration = names[1::5]
    training = [n for n in names if n not in set(evaluation) | set(calibration)]
    return training, calibration, evaluation


def _bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8", "replace")), dtype=torch.uint8).long()


def training_text() -> torch.Tensor:
    topics, (names, _, _) = _topics(), _split_topics()
    source = [Path(f).read_text("utf-8", "replace") for f in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))]
    return _bytes("\n\n".join([topics[n] for n in names] + source))


def _windows(text: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``length`` bytes, evenly spread over ``text``."""
    stride = max(length, (len(text) - length) // max(count, 1))
    starts = list(range(0, len(text) - length, stride))[:count]
    return torch.stack([text[s:s + length] for s in starts])


def calibration_windows(count: int = 64, length: int = 128) -> torch.Tensor:
    topics, (_, names, _) = _topics(), _split_topics()
    return _windows(_bytes("\n\n".join(topics[n] for n in names)), length, count)


def evaluation_windows(count: int = 96, length: int = 128) -> torch.Tensor:
    topics, (_, _, names) = _topics(), _split_topics()
    return _windows(_bytes("\n\n".join(topics[n] for n in names)), length, count)


def build(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def _key() -> str:
    return hashlib.sha256(json.dumps([CONFIG, TRAINING, transformers.__version__.split(".")[0]]).encode()).hexdigest()[:12]


def train(log=print) -> transformers.LlamaForCausalLM:
    """Train from scratch with the seeded ``TRAINING`` recipe (cosine schedule after a linear warm-up)."""
    t = TRAINING
    model = build(t["seed"]).train()
    text = training_text()
    generator = torch.Generator().manual_seed(t["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    start = time.perf_counter()
    for step in range(t["steps"]):
        scale = min(1.0, (step + 1) / t["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / t["steps"]))
        for group in optimizer.param_groups:
            group["lr"] = t["lr"] * scale
        starts = torch.randint(0, len(text) - t["length"] - 1, (t["batch"],), generator=generator)
        batch = torch.stack([text[s:s + t["length"]] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == t["steps"] - 1:
            log(f"tiny LM step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    return model.eval()


def trained_model(log=print) -> transformers.LlamaForCausalLM:
    """The trained model, from ``benchmarks/.cache`` when it was trained before with the same recipe."""
    folder = CACHE / f"tiny-lm-{_key()}"
    if (folder / "config.json").exists():
        return transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    model = train(log)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return model


def perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Byte-level perplexity: exp of the mean next-byte cross-entropy over all windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = windows[i:i + batch]
            out = model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out["logits"]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            total, count = total + loss.item(), count + ids[:, 1:].numel()
    return math.exp(total / count)


if __name__ == "__main__":
    torch.set_num_threads(1)
    m = trained_model()
    print(f"perplexity on evaluation text: {perplexity(m, evaluation_windows()):.3f}")
