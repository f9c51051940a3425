"""fxprune.distill: a pruned model trained to match the original gets closer on inputs it never saw.

Checked: distillation lowers the held-out student-teacher error of pruned MLPs and CNNs (three seeds) and never
changes the teacher; an in-place-pruned LLaMA with KL on logits (and hidden states when their shapes agree) still
generates and reloads; ``time_budget``.
"""

from __future__ import annotations

import importlib
import time
import warnings

import pytest
import torch
from torch import nn

import fxprune
from fxprune.calibration import distill_loss
from fxprune.testing import assert_same_state, state_snapshot
from tests import models


def _mlp():
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))


def _held_out_mse(student, teacher, x) -> float:
    """Squared error over the teacher's variance, computed here rather than by distill's own loss."""
    with torch.no_grad():
        expected = teacher(x)
        return ((student(x) - expected) ** 2).mean().item() / expected.var(unbiased=False).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_distill_lowers_the_held_out_loss_and_leaves_the_teacher_alone(name, seed):
    torch.manual_seed(seed)
    if name == "mlp":
        teacher, shape = _mlp().eval(), (16,)
    else:
        teacher, shape = models.ResidualCNN().eval(), (3, 8, 8)
    batches = [torch.randn(32, *shape) for _ in range(8)]
    held_out = torch.randn(256, *shape)
    student = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1)
    assert sum(p.numel() for p in student.parameters()) < 0.6 * sum(p.numel() for p in teacher.parameters())
    before, teacher_state = _held_out_mse(student, teacher, held_out), state_snapshot(teacher)
    assert before > 0.05  # pruning half the units did hurt: there is something to recover
    result = fxprune.distill(student, teacher, batches, steps=150, lr=3e-3, progress=False)
    after = _held_out_mse(student, teacher, held_out)
    assert result.steps == 150 and result.loss == "mse" and len(result.losses) == 150
    assert after < 0.7 * before, (before, after)
    assert result.last_loss < result.first_loss
    assert_same_state(teacher, teacher_state, "the teacher changed")
    assert not student.training and not teacher.training
    assert distill_loss(student, teacher, [held_out]) == pytest.approx(after, rel=1e-3)


def test_distill_works_on_tuple_and_dict_batches_and_restores_the_teachers_mode():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 32), nn.Linear(32, 3)

        def forward(self, x, scale):
            return self.b(torch.relu(self.a(x))) * scale

    torch.manual_seed(0)
    teacher = TwoInputs()  # left in training mode on purpose
    x, scale = torch.randn(16, 4), torch.ones(16, 1)
    student = fxprune.prune(teacher, 0.5, example_inputs=(x, scale), round_to=1)
    result = fxprune.distill(student, teacher, [(x, scale), {"x": x, "scale": scale}], steps=4, lr=1e-3,
                             progress=False)
    assert result.steps == 4 and teacher.training and not student.training


def test_time_budget_stops_the_loop_and_a_stop_is_required():
    torch.manual_seed(0)
    teacher = _mlp().eval()
    batches = [torch.randn(8, 16)]
    student = fxprune.prune(teacher, 0.5, example_inputs=(batches[0],), round_to=1)
    start = time.perf_counter()
    result = fxprune.distill(student, teacher, batches, steps=10 ** 9, time_budget=1.0, progress=False)
    assert time.perf_counter() - start < 5.0
    assert 1.0 <= result.seconds < 5.0 and 1 <= result.steps < 10 ** 9
    with pytest.raises(ValueError, match="steps .* or time_budget"):
        fxprune.distill(student, teacher, batches)
    with pytest.raises(ValueError, match="loss must be one of"):
        fxprune.distill(student, teacher, batches, steps=1, loss="l1")
    with pytest.raises(ValueError, match="the student is the teacher"):
        fxprune.distill(teacher, teacher, batches, steps=1)


def test_outputs_of_another_shape_are_a_clear_error():
    torch.manual_seed(0)
    teacher, student = _mlp(), nn.Linear(16, 5)
    with pytest.raises(ValueError, match="do not match the teacher's"):
        fxprune.distill(student, teacher, [torch.randn(4, 16)], steps=1)


def test_shared_parameters_are_copied_so_the_teacher_never_moves():
    """A student that shares a tensor with the teacher (hand-made here) gets its own copy first; one that
    shares a whole module cannot be trained without changing the teacher, and says so."""
    torch.manual_seed(0)
    teacher = _mlp()
    first = nn.Linear(16, 64)
    first.weight = teacher[0].weight  # the same Parameter in a module of the student's own
    student = nn.Sequential(first, nn.GELU(), nn.Linear(64, 8))
    state = state_snapshot(teacher)
    fxprune.distill(student, teacher, [torch.randn(16, 16)], steps=3, lr=1e-2, progress=False)
    assert_same_state(teacher, state, "the teacher changed")
    assert not torch.equal(student[0].weight, teacher[0].weight)  # the student's copy did train
    optimizer = torch.optim.SGD(teacher.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="the optimizer holds parameters of the teacher"):
        fxprune.distill(student, teacher, [torch.randn(4, 16)], steps=1, optimizer=optimizer)
    with pytest.raises(ValueError, match="module '0' is one of the teacher's modules"):
        fxprune.distill(nn.Sequential(teacher[0], nn.GELU(), nn.Linear(64, 8)), teacher, [torch.randn(4, 16)],
                        steps=1)
    assert_same_state(teacher, state, "the teacher changed")


# -- Hugging Face ---------------------------------------------------------------

def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import DECODER

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)).eval()


def test_in_place_pruned_llama_distills_with_kl_generates_and_reloads(tmp_path):
    torch.manual_seed(0)
    teacher = _tiny_llama()
    student = _tiny_llama()
    student.load_state_dict(teacher.state_dict())
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (4, 12), generator=gen),
                "attention_mask": torch.ones(4, 12, dtype=torch.int64)} for _ in range(4)]
    batches[0]["attention_mask"][0, :5] = 0  # left padding: those positions are left out of the loss
    fxprune.prune(student, 0.5, example_inputs=(batches[0]["input_ids"][:1],), inplace=True)
    assert student.config.intermediate_size < teacher.config.intermediate_size
    state = state_snapshot(teacher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxprune.distill(student, teacher, batches, steps=30, lr=3e-3, progress=False)
    assert result.loss == "kl" and result.steps == 30
    assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5]), result.losses
    hidden_pruned = student.config.hidden_size < teacher.config.hidden_size
    # every layer boundary is matched; where the residual stream was pruned, through a learned map
    assert result.hidden_states == teacher.config.num_hidden_layers + 1
    assert result.mapped == (result.hidden_states if hidden_pruned else 0)
    assert not [w for w in caught if "fxprune.distill" in str(w.message)]
    assert_same_state(teacher, state, "the teacher changed")
    ids = batches[1]["input_ids"][:1]
    with torch.no_grad():
        tokens = student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        logits = student(ids).logits
    assert tokens.shape == (1, 16)
    student.save_pretrained(tmp_path)
    reloaded = fxprune.load_pretrained(str(tmp_path))
    with torch.no_grad():
        fxprune.testing.assert_close_to_scale(reloaded(ids).logits, logits)


def test_hidden_states_are_matched_when_shapes_agree():
    torch.manual_seed(0)
    teacher = _tiny_llama()
    student = _tiny_llama()
    student.load_state_dict(teacher.state_dict())
    ids = torch.randint(0, 100, (2, 8))
    fxprune.prune(student, 0.5, example_inputs=(ids[:1],), inplace=True, ignore=["model.norm"])
    assert student.config.hidden_size == teacher.config.hidden_size  # the residual stream kept its width
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxprune.distill")
        result = fxprune.distill(student, teacher, [ids], steps=2, lr=1e-3, progress=False)
    assert result.hidden_states == teacher.config.num_hidden_layers + 1
    without = fxprune.distill(student, teacher, [ids], steps=1, hidden_states=False, progress=False)
    assert without.hidden_states == 0


def test_a_captured_student_of_a_hugging_face_teacher_matches_logits_and_the_residual_stream_from_the_graphs():
    """The student is a GraphModule (no hidden_states output): the residual boundaries are found in its graph and
    in the teacher's (captured here), two per decoder layer, and matched in order."""
    torch.manual_seed(0)
    teacher = _tiny_llama()
    ids = torch.randint(0, 100, (2, 8))
    student = fxprune.prune(teacher, 0.3, example_inputs=(ids,))  # a GraphModule returning the captured outputs
    state = state_snapshot(teacher)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxprune.distill")
        result = fxprune.distill(student, teacher, [ids], steps=2, lr=1e-3, progress=False)
    assert result.loss == "kl" and result.hidden_states == 2 * teacher.config.num_hidden_layers
    assert_same_state(teacher, state, "the teacher changed")


# -- intermediate states, schedule, CPU budget -----------------------------------------------------------------

@pytest.mark.parametrize("hidden", ["kept", "pruned"])
def test_intermediate_states_are_found_from_the_graph_and_distilling_them_lowers_a_held_out_loss(hidden):
    """A stack of three pre-norm transformer blocks (tests.models.BlockStack), half its heads and MLP units pruned
    (and with ``hidden="pruned"`` half its residual width too): the six residual boundaries (attention and MLP of
    each block) are found in both graphs and matched, through learned maps when the width was pruned; the held-out
    loss on the residual stream (and on the outputs) falls."""
    torch.manual_seed(0)
    teacher = models.BlockStack(mlps=(64, 64, 64)).eval()
    batches = [torch.randn(16, 6, 12) for _ in range(8)]
    held_out = [torch.randn(64, 6, 12)]
    ignore = [] if hidden == "pruned" else [teacher.embed]
    student = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1, ignore=ignore)
    assert (student.get_submodule("embed").out_features < 32) == (hidden == "pruned")
    before = distill_loss(student, teacher, held_out, hidden_states=True)
    outputs_before = distill_loss(student, teacher, held_out)
    result = fxprune.distill(student, teacher, batches, steps=120, lr=3e-3, progress=False)
    assert result.hidden_states == 6 and result.mapped == (6 if hidden == "pruned" else 0)
    assert distill_loss(student, teacher, held_out) < 0.7 * outputs_before
    if hidden == "kept":  # the states compare without maps: their held-out loss falls too
        assert distill_loss(student, teacher, held_out, hidden_states=True) < 0.7 * before


def test_the_schedule_warms_up_then_decays_and_a_cpu_budget_stops_the_loop():
    from fxprune.calibration.distill import _schedule

    assert [round(_schedule(p, 0.1, "cosine", 0.1), 3) for p in (0.0, 0.05, 0.1, 0.55, 1.0)] == \
        [0.1, 0.55, 1.0, 0.55, 0.1]
    assert _schedule(0.5, 0.1, "constant", 0.1) == 1.0
    torch.manual_seed(0)
    teacher = _mlp().eval()
    batches = [torch.randn(8, 16)]
    student = fxprune.prune(teacher, 0.5, example_inputs=(batches[0],), round_to=1)
    result = fxprune.distill(student, teacher, batches, cpu_budget=0.5, progress=False)
    assert 0.5 <= result.cpu_seconds < 5.0 and result.steps >= 1
    with pytest.raises(ValueError, match="schedule must be one of"):
        fxprune.distill(student, teacher, batches, steps=1, schedule="linear")


def test_residual_boundaries_are_the_adds_of_a_branch_with_weights():
    """x + f(x) with a Linear on the branch is a boundary; the tanh GELU's x + 0.044715 x^3 (no weights between)
    and the add of two unrelated branches are not. GPT-2: two boundaries per decoder layer (LLaMA's: the captured
    student test above)."""
    import torch.fx as fx

    from fxprune.calibration.boundaries import residual_boundaries

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.side = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = x + self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))
            return h, torch.tanh(h) + self.side(x)  # two branches of x meet: not the stream plus a branch of it

    gm = fx.symbolic_trace(nn.Sequential(Block()))
    assert [n.name for n in residual_boundaries(gm)] == ["add"]
    ids = torch.randint(0, 100, (2, 7))
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                                bos_token_id=0, eos_token_id=0)).eval()
    boundaries = residual_boundaries(fxprune.prune(gpt2, 0.3, example_inputs=(ids,)))
    assert len(boundaries) == 4  # the GELU's adds are not among them
    assert all("residual" in n.meta.get("stack_trace", "").splitlines()[-1] for n in boundaries)


# -- the teacher's outputs cached per batch ----------------------------------------------------------------------

def test_cache_teacher_runs_the_teacher_once_per_batch_and_trains_as_without_it():
    """``cache_teacher=True``: over three passes of four batches the teacher runs once per batch (plus the first
    batch's look at its outputs), and the losses are those of the same run without the cache (a tolerance, not
    bit for bit); on a graph student with matched residual states too; ``cache_dtype`` stores bfloat16 and the
    losses stay close."""
    torch.manual_seed(0)
    teacher = _mlp().eval()
    batches = [torch.randn(8, 16) for _ in range(4)]
    student = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    runs = {}
    for cache in (False, True):
        calls.clear()
        copy_ = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1)
        copy_.load_state_dict(student.state_dict())
        runs[cache] = fxprune.distill(copy_, teacher, batches, steps=12, lr=3e-3, progress=False,
                                      cache_teacher=cache).losses
        assert len(calls) == (1 + 4 if cache else 1 + 12)
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    assert runs[True][-1] < runs[True][0]

    teacher = models.BlockStack(mlps=(64, 64, 64)).eval()
    batches = [torch.randn(8, 6, 12) for _ in range(3)]
    student = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1, ignore=[teacher.embed])
    losses = {}
    for cache, dtype in ((False, None), (True, None), (True, torch.bfloat16)):
        copy_ = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1, ignore=[teacher.embed])
        copy_.load_state_dict(student.state_dict())
        result = fxprune.distill(copy_, teacher, batches, steps=9, lr=3e-3, progress=False, cache_teacher=cache,
                                 cache_dtype=dtype)
        assert result.hidden_states == 6
        losses[cache, dtype] = result.losses
    assert losses[True, None] == pytest.approx(losses[False, None], rel=1e-4)
    assert losses[True, torch.bfloat16] == pytest.approx(losses[False, None], rel=3e-2)
    with pytest.raises(ValueError, match="cache_dtype must be"):
        fxprune.distill(copy_, teacher, batches, steps=1, cache_teacher=True, cache_dtype=torch.int8)


def test_cache_teacher_warns_once_when_the_cache_passes_its_limit(monkeypatch):
    """The cache has no cap, so past its limit (a quarter of the machine's memory; lowered here to just under
    what three of four batches hold) distill warns once, with the size and the batches cached, and names the
    remedies; below it, no warning. The MLP caches only its output, the same size for every batch."""
    module = importlib.import_module("fxprune.calibration.distill")  # the package's name `distill` is the function
    torch.manual_seed(0)
    teacher = _mlp().eval()
    batches = [torch.randn(8, 16) for _ in range(4)]
    student = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1)
    per_batch = teacher(batches[0]).numel() * 4
    monkeypatch.setattr(module, "cache_warning_bytes", lambda: 3 * per_batch - 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxprune.distill(student, teacher, batches, steps=8, progress=False, cache_teacher=True)
    said = [str(w.message) for w in caught if "cache_teacher holds" in str(w.message)]
    assert len(said) == 1 and "after 3 batches" in said[0] and "cache_dtype=torch.bfloat16" in said[0]
    monkeypatch.setattr(module, "cache_warning_bytes", lambda: 4 * per_batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxprune.distill(student, teacher, batches, steps=8, progress=False, cache_teacher=True)
    assert not [w for w in caught if "cache_teacher holds" in str(w.message)]


def _tiny_bert_with_padding(transformers):
    """A tiny BertModel (the teacher, in eval mode), its config, and two batches of 4 x 6 tokens, the second with
    its last two positions padded."""
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    teacher = transformers.BertModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
               for _ in range(2)]
    batches[1]["attention_mask"][:, 4:] = 0
    return config, teacher, batches


def test_cache_teacher_on_a_hugging_face_embedding_model_matches_the_uncached_losses():
    """A tiny BERT (the teacher returns hidden states, so the pooled cosine is on; its ``ModelOutput`` is cached as
    its tensors, the hidden states as the matched states): cached and uncached runs give the same losses."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config, teacher, batches = _tiny_bert_with_padding(transformers)
    losses = {}
    for cache in (False, True):
        student = transformers.BertModel(config).eval()
        student.load_state_dict(teacher.state_dict())
        with torch.no_grad():
            student.encoder.layer[0].intermediate.dense.weight.mul_(0.5)
        result = fxprune.distill(student, teacher, batches, steps=6, lr=1e-3, progress=False, cache_teacher=cache)
        assert result.pooled and result.hidden_states == 3
        losses[cache] = result.losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_autocast_runs_the_student_in_bfloat16_with_float32_weights_and_losses_close_to_float32s():
    """``autocast=torch.bfloat16``: the student's layers compute in bfloat16 (a hook sees their outputs) while its
    parameters stay float32; on a graph student whose residual width was pruned (learned maps) the losses stay within
    5% of the float32 run's and fall, and so on a tiny BERT (attention, pooled cosine, teacher cached); another
    dtype is a clear error."""
    torch.manual_seed(0)
    teacher = models.BlockStack(mlps=(64, 64, 64)).eval()
    batches = [torch.randn(8, 6, 12) for _ in range(3)]
    student = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1)
    losses, seen = {}, []
    for dtype in (None, torch.bfloat16):
        copy_ = fxprune.prune(teacher, 0.5, example_inputs=(batches[0][:1],), round_to=1)
        copy_.load_state_dict(student.state_dict())
        copy_.get_submodule("head").register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        result = fxprune.distill(copy_, teacher, batches, steps=12, lr=3e-3, progress=False, autocast=dtype)
        assert result.mapped == 6
        assert all(p.dtype == torch.float32 for p in copy_.parameters())
        losses[dtype] = result.losses
    assert seen[-1] == torch.bfloat16 and torch.bfloat16 not in seen[:len(seen) // 2]
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=5e-2)
    assert losses[torch.bfloat16][-1] < 0.7 * losses[torch.bfloat16][0]
    assert copy_(batches[0]).dtype == torch.float32  # autocast ends with the run
    with pytest.raises(ValueError, match="autocast must be one of"):
        fxprune.distill(copy_, teacher, batches, steps=1, autocast=torch.float64)

    transformers = pytest.importorskip("transformers")
    config, teacher, batches = _tiny_bert_with_padding(transformers)
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)  # a student of other random weights: losses far above bfloat16's rounding
        student = transformers.BertModel(config).eval()
        student.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        result = fxprune.distill(student, teacher, batches, steps=6, lr=1e-3, progress=False, cache_teacher=True,
                                 autocast=dtype)
        assert result.pooled
        losses[dtype] = result.losses
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=5e-2)
    assert seen[-1] == torch.bfloat16 and losses[torch.bfloat16][-1] < losses[torch.bfloat16][1]
