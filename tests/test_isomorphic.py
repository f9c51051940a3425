"""Isomorphic pruning: classes of same-structure groups, each losing the ratio, ranked globally within it.

Checked: the isomorphic classes of a block stack (every layer's heads one class, same-width MLPs one, a wider MLP
its own) and of an exported LLaMA; plain global ranking leaving whole heads untouched where isomorphic prunes the
ratio of every class (exact unit counts); uneven dead units within each class found by the ranking across the class
(dead-unit oracle); raw scales 100x apart; a MACs target with one ratio for all classes; the iterative ``Pruner``;
errors (no ``global_pruning``, ``target_latency``, ``--isomorphic`` without ``--global``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxprune
from fxprune.cli import commands as cli
from fxprune.training.masking import zero_units
from fxprune.planning.isomorphic import class_ids, isomorphic_classes, isomorphic_plan
from fxprune.planning.selection import global_plan
from fxprune.testing import assert_close_to_scale
from tests import models

HEAD_DIM = 8


def stack(mlps=(64, 64, 128)):
    """Three blocks, the last with a wider MLP: its analysis and its groups by role."""
    model, x = models.BlockStack(mlps).eval(), torch.randn(2, 5, 12)
    dg = fxprune.analyze(model, (x,))
    heads = [dg.groups_of(f"blocks.{i}.attn.proj.weight", 1)[0] for i in range(len(mlps))]
    mlp = [dg.group_of(f"blocks.{i}.mlp.0.weight", 0) for i in range(len(mlps))]
    return model, x, dg, heads, mlp, dg.group_of("embed.weight", 0)


def widths(pruned, blocks: int = 3) -> dict:
    """Units left: heads and MLP units per block, residual channels."""
    params = dict(pruned.named_parameters())
    return {"heads": [params[f"blocks.{i}.attn.proj.weight"].shape[1] // HEAD_DIM for i in range(blocks)],
            "mlp": [params[f"blocks.{i}.mlp.0.weight"].shape[0] for i in range(blocks)],
            "residual": params["embed.weight"].shape[0]}


def test_classes_put_every_layers_heads_together_and_a_wider_mlp_apart():
    _, _, dg, heads, mlp, residual = stack()
    classes = isomorphic_classes(dg)
    assert sorted(sorted(g.id for g in c) for c in classes) == sorted(
        sorted(g.id for g in c) for c in ([residual], heads, mlp[:2], mlp[2:]))
    assert heads[0].structure == heads[2].structure  # the block with the wider MLP has the same heads
    assert mlp[0].structure == mlp[1].structure != mlp[2].structure
    assert heads[0].structure != mlp[0].structure
    ids = class_ids(dg)
    assert ids[mlp[0]] == ids[mlp[1]] != ids[mlp[2]]


def test_classes_of_an_exported_llama_span_its_layers():
    pytest.importorskip("transformers")
    model = fxprune.testing.tiny_llama(num_hidden_layers=2)
    # torch.export (static, as in-place pruning captures: faster): parameters read by get_attr nodes
    dg = fxprune.analyze(model, (torch.randint(0, 100, (1, 8)),), inplace=True)
    classes = isomorphic_classes(dg)
    assert sorted(len(c) for c in classes) == [1, 2, 2, 2]  # residual; kv heads, query heads per kv head, MLP
    for members in (c for c in classes if len(c) == 2):
        layers = [{m.name.split(".")[2] for m in g.parameters} for g in members]
        assert layers == [{"0"}, {"1"}]
        shapes = {tuple(sorted(m.name.split(".", 3)[3] for m in g.parameters)) for g in members}
        assert len(shapes) == 1  # the same parameters of each layer


def skewed(group, weights):
    """Whole heads score nearly alike (1 +- 0.15%); other units spread, most well below their group's mean."""
    units = np.arange(group.units, dtype=np.float64)
    if group.units == 4:
        return 1.0 + 1e-3 * units
    return 0.01 + (units / (group.units - 1)) ** 4


def test_plain_global_ranking_starves_one_class_where_isomorphic_prunes_the_ratio_of_each():
    model, x = models.BlockStack().eval(), torch.randn(2, 5, 12)
    common = dict(example_inputs=(x,), importance=skewed, round_to=1, global_pruning=True)
    plain = widths(fxprune.prune(model, 0.5, **common))
    assert plain["heads"] == [4, 4, 4]  # the spread scores of the other groups fill the whole budget
    iso = widths(fxprune.prune(model, 0.5, isomorphic=True, **common))
    assert sum(iso["heads"]) == 6 and sum(iso["mlp"][:2]) == 64 and iso["mlp"][2] == 64 and iso["residual"] == 16


def test_within_a_class_the_ranking_is_global_and_the_dead_unit_oracle_exact():
    model, x, dg, heads, mlp, _ = stack()
    rng = np.random.default_rng(0)
    # uneven dead units inside each class, half of every class: only a ranking across the class finds them all
    dead = {heads[0]: [1], heads[1]: [0, 2], heads[2]: [0, 1, 3], mlp[0]: rng.choice(64, 40, replace=False),
            mlp[1]: rng.choice(64, 24, replace=False), mlp[2]: rng.choice(128, 64, replace=False)}
    zero_units(dg, dead)  # the analysed graph shares the model's parameters
    expected = model(x)
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,), round_to=1, global_pruning=True, isomorphic=True,
                           ignore=["embed"])  # the residual stream is normalised over: not an oracle group
    assert widths(pruned) == {"heads": [3, 2, 1], "mlp": [24, 40, 64], "residual": 32}
    assert_close_to_scale(pruned(x), expected)
    assert fxprune.plan_of(pruned).settings["isomorphic"] is True


def test_isomorphic_plan_ranks_raw_class_scales_apart():
    # with scores as given (no per-group normalisation), class b's 100x scores keep plain global ranking off it
    _, _, dg, heads, mlp, _ = stack()
    groups = mlp
    scores = {mlp[0]: np.linspace(1, 2, 64), mlp[1]: np.linspace(1, 2, 64), mlp[2]: 100 * np.linspace(1, 2, 128)}
    plain = global_plan(groups, scores, 0.4, normalizer=None)
    assert mlp[2] not in plain
    classes = {mlp[0]: "a", mlp[1]: "a", mlp[2]: "b"}
    iso = isomorphic_plan(groups, scores, 0.4, classes)
    assert len(iso[mlp[0]]) + len(iso[mlp[1]]) == 51 and len(iso[mlp[2]]) == 51  # round(0.4 x 128) each
    per_class = isomorphic_plan(groups, scores, {"a": 0.25}, classes)  # a class missing from the dict keeps all
    assert [len(per_class.get(g, ())) for g in mlp] == [16, 16, 0]


def test_mask_plans_as_prune_does():
    model, x, dg, heads, mlp, residual = stack()
    plan = fxprune.mask(dg, 0.5, importance=skewed, round_to=1, global_pruning=True, isomorphic=True)
    removal = plan.removal(dg)
    lost = [sum(len(removal.get(g, ())) for g in c) for c in (heads, mlp[:2], mlp[2:], [residual])]
    assert lost == [6, 64, 64, 16]


def test_a_target_searches_one_ratio_for_every_class():
    model, x = models.BlockStack().eval(), torch.randn(2, 5, 12)
    before = fxprune.count(model, (x,))[0]
    pruned = fxprune.prune(model, example_inputs=(x,), round_to=1, global_pruning=True, isomorphic=True,
                           target_macs=0.6)
    assert abs(fxprune.count(pruned, (x,))[0] / before - 0.6) <= 0.02 * 0.6
    left = widths(pruned)
    fractions = [1 - sum(left["heads"]) / 12, 1 - sum(left["mlp"][:2]) / 128, 1 - left["mlp"][2] / 128,
                 1 - left["residual"] / 32]
    assert max(fractions) - min(fractions) <= 1 / 12 + 1e-9, fractions  # the heads class moves in twelfths


def test_iterative_pruner_keeps_each_class_at_its_share_of_the_original_units():
    model, x = models.BlockStack().eval(), torch.randn(2, 5, 12)
    pruner = fxprune.Pruner(model, (x,), ratio=0.5, steps=2, global_pruning=True, isomorphic=True, round_to=1,
                            importance=skewed)
    pruner.step()
    result = widths(pruner.step())
    assert sum(result["heads"]) == 6 and sum(result["mlp"][:2]) == 64 and result["mlp"][2] == 64
    assert result["residual"] == 16
    assert fxprune.plan_of(pruner.model).settings["isomorphic"] is True


def test_bad_arguments_are_clear_errors(capsys):
    model, x = models.BlockStack().eval(), torch.randn(2, 5, 12)
    with pytest.raises(ValueError, match="needs global_pruning=True"):
        fxprune.prune(model, 0.5, example_inputs=(x,), isomorphic=True)
    with pytest.raises(ValueError, match="not target_latency"):
        fxprune.prune(model, example_inputs=(x,), global_pruning=True, isomorphic=True, target_latency=0.5)
    with pytest.raises(ValueError, match="needs global_pruning=True"):
        fxprune.Pruner(model, (x,), ratio=0.5, isomorphic=True)
    spec = ["prune", "tests.models:ResidualCNN", "--input-shape", "1,3,16,16", "--ratio", "0.5", "--quiet"]
    assert cli.main([*spec, "--isomorphic"]) == 1
    assert "add --global" in capsys.readouterr().err
    options = cli._prune_options(cli.build_parser().parse_args([*spec, "--global", "--isomorphic"]))
    assert options["isomorphic"] is True and options["global_pruning"] is True
