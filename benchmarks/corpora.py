"""Text sources for the quality and distillation benchmarks, split into disjoint, seeded parts (nothing downloads).

- ``"reference"``: Python's language reference shipped as ``pydoc_data.topics``: sentences of 30-200 characters
  of its topics (sorted by name).
- ``"english"``: general English from Debian's ``fortunes`` package (``apt-get install fortunes``; files under
  ``/usr/share/games/fortunes``): the entries (separated by lines holding ``%``) of the categories in
  ``FORTUNE_CATEGORIES``, attribution lines (``-- Author``) dropped, split into sentences of 30-200 characters
  that are mostly letters and not shouted (at most half capitals). The categories that are code, chat logs,
  ASCII art or nonsense (computers, linux, linuxcookie, perl, debian, knghtbrd, ascii-art, goedel, zippy,
  translate-me) are left out.
- ``"everyday"``: the 60 everyday sentences of ``examples/prune_minilm.py`` (evaluation only).

Each source's sentences (deduplicated, in file order) are shuffled once with ``random.Random(SEED)`` and cut
into consecutive, disjoint parts: ``split(source)`` returns ``{"calibration", "training", "evaluation"}`` (and, for
general English, ``"more training"``: 6000 more distillation sentences cut after the evaluation part).
Calibration text feeds statistics and refits, training text feeds distillation, evaluation text is only ever
scored. A sentence of one source that also occurs in another is removed from the other's parts, so no
evaluation sentence is seen in calibration or training whatever the sources.

Example::

    >>> parts = split("english")
    >>> len(parts["calibration"]), len(parts["training"]), len(parts["evaluation"])
    (4096, 4096, 512)
"""

from __future__ import annotations

import random
import re
import sys
from functools import lru_cache
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_CATEGORIES = ("art", "cookie", "definitions", "education", "ethnic", "food", "fortunes", "humorists",
                      "kids", "law", "literature", "love", "magic", "medicine", "men-women", "miscellaneous",
                      "news", "people", "pets", "platitudes", "politics", "pratchett", "riddles", "science",
                      "songs-poems", "sports", "startrek", "tao", "wisdom", "work", "disclaimer", "drugs",
                      "paradoxum")
SEED = 0
# sentences per part, in this order (the language reference has about 2100 sentences)
# "more training": sentences after the evaluation part (so the first three parts stay as they were), for recovery.py
PARTS = {"english": {"calibration": 4096, "training": 4096, "evaluation": 512, "more training": 6000},
         "reference": {"calibration": 1024, "training": 768, "evaluation": 300}}
SOURCES = ("english", "reference", "everyday")
NAMES = {"english": "general English (fortunes)", "reference": "Python language reference",
         "everyday": "everyday sentences"}


class MissingCorpus(RuntimeError):
    """A text source is not installed (Debian's ``fortunes``)."""


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 30 <= len(s) <= 200]


def _english_like(s: str) -> bool:
    letters = sum(c.isalpha() for c in s)
    upper = sum(c.isupper() for c in s)
    return letters >= 0.7 * len(s) and upper <= 0.5 * letters


@lru_cache(maxsize=None)
def fortune_sentences() -> tuple[str, ...]:
    """Every sentence of the chosen ``fortunes`` categories, in file order (categories sorted)."""
    missing = [c for c in FORTUNE_CATEGORIES if not (FORTUNES / c).is_file()]
    if missing:
        raise MissingCorpus(f"the general-English source needs Debian's fortunes package (apt-get install "
                            f"fortunes): {FORTUNES}/{missing[0]} is missing")
    out = []
    for name in sorted(FORTUNE_CATEGORIES):
        text = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%$", text, flags=re.M):
            lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
            out += [s for s in _sentences(" ".join(lines)) if _english_like(s)]
    return tuple(out)


@lru_cache(maxsize=None)
def reference_sentences() -> tuple[str, ...]:
    """Sentences of the language reference's topics (sorted by name), in order."""
    import pydoc_data.topics as topics

    return tuple(s for name in sorted(topics.topics) for s in _sentences(topics.topics[name]))


def everyday_sentences() -> tuple[str, ...]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from prune_minilm import SENTENCES

    return tuple(SENTENCES)


def _unique(sentences) -> list[str]:
    return list(dict.fromkeys(sentences))


@lru_cache(maxsize=None)
def split(source: str) -> dict[str, list[str]]:
    """``{"calibration", "training", "evaluation"}`` sentences of ``source`` (disjoint, seeded; see the module)."""
    if source == "everyday":
        return {"calibration": [], "training": [], "evaluation": list(everyday_sentences())}
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}: one of {', '.join(SOURCES)}")
    sentences = _unique(fortune_sentences() if source == "english" else reference_sentences())
    others = set(everyday_sentences())
    for other in SOURCES:  # a sentence that another source evaluates on is never calibrated or trained on here
        if other not in (source, "everyday"):
            try:
                others |= set(fortune_sentences() if other == "english" else reference_sentences())
            except MissingCorpus:
                pass
    sentences = [s for s in sentences if s not in others]
    random.Random(SEED).shuffle(sentences)
    out, start = {}, 0
    for part, size in PARTS[source].items():
        out[part] = sentences[start:start + size]
        start += size
    return out


if __name__ == "__main__":
    for source in SOURCES:
        try:
            parts = split(source)
        except MissingCorpus as exc:
            print(f"{source}: {exc}")
            continue
        print(source, {k: len(v) for k, v in parts.items()}, parts["evaluation"][:2])
