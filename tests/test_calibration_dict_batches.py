"""Calibration batches as users pass them: a tokenizer's output (a ``BatchEncoding``, a dict) for a model analysed
with positional input ids (``example_inputs=(input_ids,)``) or with every key by name (``kwargs=``), and dict
batches with keys the model does not take (labels) for a traced model.

    python -m pytest -q tests/test_calibration_dict_batches.py      # about 15 s on 2 cores
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxprune
from fxprune.calibration.statistics import placeholder_values
from fxprune.testing import assert_same_outputs
from tests.models import MLP

TEXTS = ["the cat sat on the mat", "a big red dog ran far away", "the small house", "a green tree and a blue house"]


def _left_out(caught) -> list[str]:
    return [str(w.message) for w in caught if "left out" in str(w.message)]


def _bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import TINY, WORDS, tiny_tokenizer

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=len(WORDS), **TINY)).eval()
    return model, tiny_tokenizer(tmp_path)


def test_tokenizer_outputs_feed_the_input_ids_the_model_was_analysed_with(tmp_path):
    """``example_inputs=(input_ids,)`` and ``calibration=[tokenizer(text, ...), ...]`` failed with "a calibration
    batch gives 0 inputs where the model takes 1": the batches' ``input_ids`` now feed the input, and one warning
    says that ``attention_mask`` and ``token_type_ids`` are left out and what that means for padding."""
    model, tokenizer = _bert(tmp_path)
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]  # one example at batch 1, as users write it
    batches = [tokenizer(text, return_tensors="pt") for text in TEXTS]  # BatchEncoding: a dict of 3 keys
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.prune(model, 0.3, example_inputs=(ids,), calibration=batches, importance="activation")
    (said,) = _left_out(caught)  # once for the four batches
    assert "left out: attention_mask, token_type_ids (its inputs: input_ids)" in said
    assert "padded positions" in said and "example_inputs=(), kwargs=" in said
    by_ids = fxprune.prune(model, 0.3, example_inputs=(ids,), calibration=[b["input_ids"] for b in batches],
                           importance="activation")
    assert sum(p.numel() for p in pruned.parameters()) < 0.9 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # the same statistics, so the same units go
        assert_same_outputs(pruned(ids), by_ids(ids))
        assert pruned(ids).last_hidden_state.shape[:2] == ids.shape


def test_tokenizer_outputs_feed_every_key_of_a_model_analysed_with_them(tmp_path):
    """Analysed with the tokenizer's keys as keyword inputs (the fix the warning names), the batches feed all
    three inputs, the attention mask included, and nothing is said."""
    model, tokenizer = _bert(tmp_path)
    example = dict(tokenizer(TEXTS[0], return_tensors="pt"))
    batches = [tokenizer(text, return_tensors="pt") for text in TEXTS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.prune(model, 0.3, example_inputs=(), kwargs=example, calibration=batches,
                               importance="activation")
        dg = fxprune.analyze(model, (), kwargs=example)
        values = placeholder_values(dg.gm, batches[1])
    assert not _left_out(caught)
    assert len(values) == 3 and any(v is batches[1]["attention_mask"] for v in values)
    with torch.no_grad():
        assert pruned(**example).last_hidden_state.shape[:2] == example["input_ids"].shape


def test_a_dict_without_the_captured_input_names_its_keys_and_the_fix(tmp_path):
    model, tokenizer = _bert(tmp_path)
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=r"keys \['ids', 'mask'\].*positional inputs \['input_ids'\].*no 'input_ids'.*"
                                         r"example_inputs=\(\), kwargs="):
        fxprune.prune(model, 0.3, example_inputs=(ids,), calibration=[{"ids": ids, "mask": torch.ones_like(ids)}],
                      importance="activation")


def test_a_dict_with_labels_feeds_a_traced_model_by_name():
    """A traced ``forward(x)`` took ``{"x": ...}`` and failed on any other key: ``labels`` is left out, said once."""
    torch.manual_seed(0)
    model = MLP(3, 8, 2).eval()
    batches = [{"x": torch.randn(4, 3), "labels": torch.randint(0, 2, (4,))} for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 3),), calibration=batches,
                               importance="activation", round_to=1)
    (said,) = _left_out(caught)
    assert "left out: labels (its inputs: x)" in said and "padded" not in said
    same = fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 3),), calibration=[b["x"] for b in batches],
                         importance="activation", round_to=1)
    x = torch.randn(2, 3)
    assert pruned.fc1.out_features == 4
    assert_same_outputs(pruned(x), same(x))
