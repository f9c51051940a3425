"""fxprune.prune_checkpoint with calibration: data-aware scores and the sequential refit, one decoder layer at a
time from the shards.

Checked on a tiny LLaMA in 20KB shards (``fxprune.io.checkpoint.layerwise``, ``fxprune.io.checkpoint.blocks``): the
plan and reloaded logits equal ``prune(..., sequential=True, inplace=True)`` (activation, obs, l2); the graph cut
into head / layers / tail; no tensor of another layer alive when one is read (an instrumented ``Checkpoint.read``,
before writing); errors; ``--streaming --calibration --reconstruct`` on a bfloat16 checkpoint.
"""

from __future__ import annotations

import weakref

import pytest
import torch

import fxprune
from fxprune.io.checkpoint.shards import Checkpoint
from fxprune.testing import assert_same_outputs, kept_units, tiny_llama
from tests.models import CHECKPOINT_LLAMA, saved_tiny_llama

transformers = pytest.importorskip("transformers")
if tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 4):
    pytest.skip("a LLaMA on the meta device needs transformers >= 5.4 (README: tested versions)",
                allow_module_level=True)

def _batches(n=3, rows=2, length=9):
    return [torch.randint(0, 100, (rows, length), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("importance", ["activation", "obs", "l2"])  # wanda: activation's path, other columns
def test_layer_by_layer_equals_the_in_memory_sequential_refit(tmp_path, importance):
    """Same plan as fxprune.prune(..., inplace=True) on the loaded model, and the same logits as the in-memory
    sequential refit of that plan started from the sliced weights (the layer-by-layer refit has no one-shot refit
    to shrink towards): the same statistics (the original model's, layer after layer), the same consumers refit
    stage for stage on the same pairs of inputs, the same held-out tokens choosing the same strengths, in float32."""
    from fxprune.calibration import load_refit, plan_sequential, run_sequential
    from fxprune.rewriting.rewrite import rewrite

    src, out = tmp_path / "src", tmp_path / "out"
    model = saved_tiny_llama(src)
    original = tiny_llama(**CHECKPOINT_LLAMA)
    batches = _batches()
    plan = fxprune.prune_checkpoint(src, out, ratio=0.5, importance=importance, calibration=batches,
                                    reconstruct=True, progress=False)
    in_memory = fxprune.prune(tiny_llama(**CHECKPOINT_LLAMA), 0.5, example_inputs=(batches[0],),
                              importance=importance, calibration=batches, inplace=True)
    assert kept_units(plan) == kept_units(fxprune.plan_of(in_memory))
    assert any(len(g.kept) < g.units for g in plan.groups)
    assert plan.settings["sequential"] and plan.settings["streamed"]
    dg = fxprune.analyze(model, (batches[0],), inplace=True)
    removal = fxprune.plan_of(in_memory).removal(dg)
    sequential = plan_sequential(dg, removal, inplace=True)
    graph = rewrite(dg, removal)
    done = run_sequential(sequential, graph, batches)
    fxprune.apply(dg, removal, inplace=True)
    refit = dict(graph.named_parameters())
    load_refit(model, {name: refit[name].detach() for name in done})
    reloaded = fxprune.load_pretrained(str(out))
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    assert_same_outputs(_logits(reloaded, ids), _logits(model, ids))
    with pytest.raises(AssertionError):  # a tolerance that tells a pruned model from the original
        assert_same_outputs(_logits(original, ids), _logits(model, ids))


def test_only_one_decoder_layer_is_read_at_a_time(tmp_path, monkeypatch):
    from fxprune.io.checkpoint import meta_model
    from fxprune.io.checkpoint.blocks import segments_of

    src, out = tmp_path / "src", tmp_path / "out"
    model = saved_tiny_llama(src, num_hidden_layers=3)
    dg = fxprune.analyze(meta_model(model.config), (_batches()[0],), inplace=True)
    segments = segments_of(dg.gm, dg.model)
    assert [s.name for s in segments] == ["<head>", "model.layers.0", "model.layers.1", "model.layers.2", "<tail>"]
    assert len(segments[1].live_out) > 1  # hidden states and what else crosses a layer (rotary cos and sin)
    segment_of = {a.target: s.index for s in segments for a in s.attrs}
    sizes = {}
    for name in Checkpoint(src).keys():
        sizes[segment_of[name]] = sizes.get(segment_of[name], 0) + Checkpoint(src).read(name).nbytes
    alive, reads, peak, writing = [], [], [0], []
    read, write = Checkpoint.read, fxprune.io.checkpoint.streaming.write_shards

    def tracked(self, name):
        if writing:  # the writer holds one output shard (tests/test_checkpoint.py), whatever the layers
            return read(self, name)
        held = [(n, r()) for n, r in alive if r() is not None]
        others = {n for n, _ in held if segment_of[n] != segment_of[name]}
        assert not others, f"reading {name} while tensors of other layers are alive: {sorted(others)}"
        tensor = read(self, name)
        alive.append((name, weakref.ref(tensor)))
        reads.append(name)
        peak[0] = max(peak[0], tensor.nbytes + sum(t.nbytes for _, t in held))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", tracked)
    monkeypatch.setattr(fxprune.io.checkpoint.streaming, "write_shards",
                        lambda *a, **k: writing.append(1) or write(*a, **k))
    fxprune.prune_checkpoint(src, out, ratio=0.5, importance="activation", calibration=_batches(), reconstruct=True,
                             progress=False)
    layer = sizes[segment_of["model.layers.1.mlp.up_proj.weight"]]
    # scores, then the refit: every tensor is read twice before the writing
    assert sorted(reads) == sorted(Checkpoint(src).keys() * 2) and writing
    assert peak[0] <= max(sizes.values()) and sum(sizes.values()) > 3 * layer


def test_errors_name_what_is_missing(tmp_path):
    src = tmp_path / "src"
    saved_tiny_llama(src)
    with pytest.raises(ValueError, match="needs calibration batches"):
        fxprune.prune_checkpoint(src, tmp_path / "a", ratio=0.5, importance="wanda")
    with pytest.raises(ValueError, match="reconstruct=True needs calibration"):
        fxprune.prune_checkpoint(src, tmp_path / "a", ratio=0.5, reconstruct=True)
    with pytest.raises(ValueError, match="would not use them"):
        fxprune.prune_checkpoint(src, tmp_path / "a", ratio=0.5, calibration=_batches())
    with pytest.raises(ValueError, match="cannot be computed from a checkpoint"):
        fxprune.prune_checkpoint(src, tmp_path / "a", ratio=0.5, importance="taylor", calibration=_batches(),
                                 reconstruct=True)


def test_command_line_streaming_with_calibration(tmp_path, capsys):
    from fxprune.cli import commands as cli

    src, out = tmp_path / "src", tmp_path / "out"
    model = tiny_llama(**CHECKPOINT_LLAMA).to(torch.bfloat16)  # refit in float32, written back in bfloat16
    model.save_pretrained(src, max_shard_size="20KB")
    torch.save(torch.cat(_batches(4)), tmp_path / "ids.pt")
    code = cli.main(["prune", f"hf:{src}", "--ratio", "0.5", "--streaming", "--calibration", str(tmp_path / "ids.pt"),
                     "--calibration-batch-size", "2", "--importance", "activation", "--reconstruct", "--quiet",
                     "--out", str(out), "--plan", str(tmp_path / "plan.json")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert fxprune.PruningPlan.load(tmp_path / "plan.json").settings["reconstruct"] is True
    written = Checkpoint(out)
    assert {written.dtype(k) for k in written.keys()} == {torch.bfloat16}
    before = Checkpoint(src).read("model.layers.0.mlp.down_proj.weight")
    after = written.read("model.layers.0.mlp.down_proj.weight")
    kept = next(g for g in fxprune.PruningPlan.load(tmp_path / "plan.json").groups
                if "model.layers.0.mlp.down_proj.weight[1]" in g.members).kept
    hidden = next(g for g in fxprune.PruningPlan.load(tmp_path / "plan.json").groups
                  if "model.embed_tokens.weight[1]" in g.members).kept
    assert not torch.equal(after, before[hidden][:, kept])  # refit, not only sliced
    fxprune.load_pretrained(str(out))
    code = cli.main(["prune", f"hf:{src}", "--ratio", "0.5", "--streaming", "--reconstruct", "--quiet"])
    assert code == 1 and "add --calibration" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_by_layer_on_cuda_plans_as_on_cpu(tmp_path):
    src = tmp_path / "src"
    saved_tiny_llama(src)
    batches = _batches()
    on_cpu = fxprune.prune_checkpoint(src, tmp_path / "cpu", ratio=0.5, importance="activation",
                                      calibration=batches, reconstruct=True, progress=False)
    on_cuda = fxprune.prune_checkpoint(src, tmp_path / "cuda", ratio=0.5, importance="activation",
                                       calibration=batches, reconstruct=True, device="cuda", progress=False)
    assert kept_units(on_cuda) == kept_units(on_cpu)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    assert_same_outputs(_logits(fxprune.load_pretrained(str(tmp_path / "cuda")), ids),
                        _logits(fxprune.load_pretrained(str(tmp_path / "cpu")), ids))
