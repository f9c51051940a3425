"""The ``fxprune`` command, run as subprocesses on a small model (tests.models:ResidualCNN).

Each subprocess spends most of its time importing torch, so independent commands
run concurrently: one wave for inspect/prune/graph/an error, then replay, which
needs prune's plan. Argument checks run in-process.

Also calibration files, ``--reconstruct``, distillation, and a ``.txt`` file for an ``hf:`` folder with a tokenizer
built offline in process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxprune
from fxprune.cli import commands as cli
from tests import models

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["tests.models:ResidualCNN", "--input-shape", "1,3,16,16"]


def command() -> list[str]:
    """The console script installed with this interpreter when there is one (it is what users run), else
    ``python -m``. Not the first ``fxprune`` on PATH: in a virtual environment that is not activated
    (``.ci/lower-bound``'s) that is another installation, with another torch."""
    script = Path(sys.executable).parent / "fxprune"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fxprune.cli"]


def run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    running = {name: subprocess.Popen(command() + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, args in commands.items()}
    done = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    first = run_all({
        "inspect": ["inspect", *MODEL],
        "prune": ["prune", *MODEL, "--ratio", "0.5", "--out", str(tmp / "pruned"), "--plan", str(tmp / "plan.json"),
                  "--latency-runs", "3"],
        "graph": ["graph", *MODEL, "--out", str(tmp / "groups.png"), "--engine", "matplotlib"],
        "bad model": ["inspect", "tests.models:NoSuchModel"],
    })
    second = run_all({
        "replay": ["replay", str(tmp / "plan.json"), "tests.models:ResidualCNN", "--out", str(tmp / "replayed.pt"),
                   "--latency-runs", "0"],
    })
    return {**first, **second, "tmp": tmp}


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_inspect_prints_the_group_table(runs):
    out = ok(runs["inspect"])
    assert "ResidualCNN: " in out and "3 prunable" in out and "input 1x3x16x16" in out
    assert "G10     16  prunable" in out  # the residual stream: stem, block output and down's input
    assert "why: graph input" in out and "why: graph output" in out


def test_prune_prints_before_and_after_and_saves_model_and_plan(runs):
    out = ok(runs["prune"])
    for row in ("params", "MACs", "latency"):
        assert any(line.startswith(row) and "%" in line for line in out.splitlines()), row
    tmp = runs["tmp"]
    assert {p.name for p in (tmp / "pruned").iterdir()} == {"code.py", "model.json", "plan.json",
                                                          "weights.safetensors"}
    pruned = fxprune.load(tmp / "pruned")
    x = torch.randn(1, 3, 16, 16)
    assert pruned(x).shape == (1, 10)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in models.ResidualCNN().parameters())
    assert fxprune.PruningPlan.load(tmp / "plan.json").to_dict() == fxprune.plan_of(pruned).to_dict()


def test_replay_gives_the_weights_prune_gave(runs):
    out = ok(runs["replay"])
    assert "replayed" in out
    tmp = runs["tmp"]
    replayed = torch.load(tmp / "replayed.pt", weights_only=False)
    assert (tmp / "replayed.plan.json").is_file()
    pruned = fxprune.load(tmp / "pruned")
    # the factory builds random weights, so compare shapes: the same units were kept in every group
    assert {k: v.shape for k, v in replayed.state_dict().items()} == {k: v.shape for k, v in
                                                                      pruned.state_dict().items()}


def test_inspect_reads_a_saved_folder_with_its_recorded_input(runs, capsys):
    assert cli.main(["inspect", str(runs["tmp"] / "pruned"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pruned: " in out and "input 1x3x16x16" in out and "prunable" in out


def test_inspect_reads_a_torch_saved_file(runs, capsys):
    assert cli.main(["inspect", str(runs["tmp"] / "replayed.pt"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "replayed: " in out and "input 1x3x16x16" in out  # the plan pickled with the module has the shape


def test_graph_writes_a_png(runs):
    out = ok(runs["graph"])
    assert "3 prunable groups drawn to" in out
    picture = runs["tmp"] / "groups.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


def test_errors_are_one_paragraph_without_a_traceback(runs):
    run = runs["bad model"]
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("fxprune: error: ") and "NoSuchModel" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) <= 3


def test_debug_lets_the_exception_through():
    from fxprune.cli.model_spec import ModelSpecError

    with pytest.raises(ModelSpecError, match="NoSuchModel"):
        cli.main(["inspect", "tests.models:NoSuchModel", "--debug"])


# in-process: argument checking and model specs, without paying for a subprocess each

def test_prune_needs_ratio_or_target_macs(capsys):
    assert cli.main(["prune", *MODEL, "--quiet"]) == 1
    assert "give --ratio" in capsys.readouterr().err


def test_alignment_head_dim_and_latency_flags_become_prune_options():
    options = cli._prune_options(cli.build_parser().parse_args(
        ["prune", *MODEL, "--target-latency", "0.5", "--round-to", "1", "--prune-head-dims"]))
    assert options["target_latency"] == 0.5 and options["round_to"] == 1 and options["prune_head_dims"] is True


def test_target_macs_flag_reaches_prune_or_says_it_is_unsupported(tmp_path, capsys):
    import inspect

    code = cli.main(["prune", *MODEL, "--target-macs", "0.5", "--quiet", "--latency-runs", "0",
                     "--out", str(tmp_path / "out")])
    if "target_macs" in inspect.signature(fxprune.prune).parameters:
        assert code == 0 and "target_macs=0.5" in capsys.readouterr().out
    else:
        assert code == 1 and "--target-macs is not supported" in capsys.readouterr().err


def test_bad_input_shape_is_a_clear_error(capsys):
    assert cli.main(["inspect", "tests.models:ResidualCNN", "--input-shape", "1,three"]) == 1
    assert "is not a shape like 1,3,224,224" in capsys.readouterr().err


def test_unknown_spec_lists_the_accepted_forms(capsys):
    assert cli.main(["inspect", "resnet50"]) == 1
    assert "torchvision:NAME, timm:NAME, hf:PATH" in capsys.readouterr().err


def test_torchvision_spec_and_model_kwargs():
    from fxprune.cli.model_spec import load_model

    loaded = load_model("torchvision:resnet18", [(1, 3, 32, 32)], model_kwargs={"num_classes": 7})
    assert loaded.name == "resnet18" and loaded.model.fc.out_features == 7
    assert loaded.example_inputs[0].shape == (1, 3, 32, 32) and not loaded.model.training


def test_hugging_face_folder_spec(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fxprune.cli.model_spec import load_model

    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, architectures=["BertModel"])
    transformers.BertModel(config).save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.example_inputs[0].dtype == torch.int64 and loaded.example_inputs[0].max() < 30


def test_group_picture_as_graphviz_source(tmp_path):
    from fxprune.cli.drawing import draw_groups, group_graph

    dg = fxprune.analyze(models.ResidualCNN().eval(), (torch.randn(1, 3, 8, 8),))
    graph = group_graph(dg)
    groups = {n for n, d in graph.nodes(data=True) if d["kind"] == "group"}
    # prunable: stream (16), block (24), down (32); frozen and grey: input channels (3) and logits (10)
    assert sorted(graph.nodes[n]["units"] for n in groups) == [3, 10, 16, 24, 32]
    assert {graph.nodes[n]["colour"] for n in groups if graph.nodes[n]["status"] != "prunable"} == {"#b8b8b8"}
    stream = dg.group_of("stem.0.weight", 0).id
    assert {m[1] for m in graph.neighbors(("group", stream))} == {"stem.0", "stem.1", "block.0", "block.3",
                                                                  "block.4", "down"}
    text = draw_groups(dg, tmp_path / "groups.dot").read_text()
    assert text.startswith("graph groups {") and f'label="G{stream}\\n16"' in text and " -- " in text


def test_group_picture_with_graphviz_when_installed(tmp_path):
    if not shutil.which("neato"):
        pytest.skip("Graphviz is not installed")
    from fxprune.cli.drawing import draw_groups

    dg = fxprune.analyze(models.ResidualCNN().eval(), (torch.randn(1, 3, 8, 8),))
    assert draw_groups(dg, tmp_path / "groups.svg", engine="graphviz").read_text().lstrip().startswith("<?xml")


# calibration files, reconstruction and distillation

def test_calibration_file_activation_reconstruct_and_distill(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(torch.randn(20, 3, 16, 16), tmp_path / "calib.pt")  # one tensor: split into batches of 8, 8, 4
    out = tmp_path / "pruned"
    code = cli.main(["prune", *MODEL, "--ratio", "0.5", "--calibration", str(tmp_path / "calib.pt"),
                     "--importance", "activation", "--reconstruct", "--distill-steps", "3", "--distill-lr", "1e-3",
                     "--quiet", "--latency-runs", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "importance=activation" in captured.out and "reconstruct=True" in captured.out
    assert "calibration=3 batches" in captured.out and "tensor(" not in captured.out
    assert "distilled 3 steps" in captured.out and "mse loss" in captured.out
    pruned = fxprune.load(out)
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in models.ResidualCNN().parameters())
    assert fxprune.plan_of(pruned).settings["reconstruct"] is True


def test_calibration_flags_are_checked(tmp_path, capsys):
    assert cli.main(["prune", *MODEL, "--ratio", "0.5", "--reconstruct", "--quiet"]) == 1
    assert "need --calibration PATH" in capsys.readouterr().err
    (tmp_path / "lines.txt").write_text("hello\n")
    assert cli.main(["prune", *MODEL, "--ratio", "0.5", "--calibration", str(tmp_path / "lines.txt"), "--quiet",
                     "--latency-runs", "0"]) == 1
    assert "a .txt file needs a Hugging Face model" in capsys.readouterr().err
    assert cli.main(["prune", *MODEL, "--ratio", "0.5", "--calibration", str(tmp_path / "x.csv"), "--quiet"]) == 1
    assert "use a .pt/.pth file" in capsys.readouterr().err


def test_load_batches_splits_one_tensor_and_keeps_a_list(tmp_path):
    from fxprune.calibration.batches import load_batches

    torch.save(torch.randn(20, 4), tmp_path / "one.pt")
    assert [b.shape[0] for b in load_batches(tmp_path / "one.pt", 8)] == [8, 8, 4]
    torch.save([(torch.randn(2, 4), torch.ones(2, 1)), {"x": torch.randn(3, 4)}], tmp_path / "list.pth")
    batches = load_batches(tmp_path / "list.pth", 8)
    assert len(batches) == 2 and isinstance(batches[0], tuple) and batches[1]["x"].shape == (3, 4)
    torch.save({"input_ids": torch.zeros(5, 3, dtype=torch.int64)}, tmp_path / "tokens.pt")
    assert [b["input_ids"].shape[0] for b in load_batches(tmp_path / "tokens.pt", 2)] == [2, 2, 1]
    torch.save([], tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="holds an empty list"):
        load_batches(tmp_path / "empty.pt")


def _tiny_tokenizer(pad: bool = True):
    """A word-level tokenizer built offline with the tokenizers library (nothing downloads)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = "the a cat dog sat on mat ran far away and then slept".split()
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                **({"pad_token": "[PAD]"} if pad else {}))


def test_text_batches_pad_truncate_and_leave_the_tokenizer_alone():
    from fxprune.calibration.batches import text_batches

    lines = ["the cat sat on the mat", "a dog ran", "", "the dog ran far away and then slept on a mat"]
    batches = text_batches(_tiny_tokenizer(), lines, batch_size=2, max_length=8)
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (1, 8)]  # the empty line is dropped
    assert batches[0]["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batches[0]["input_ids"][1].tolist()[3:] == [1, 1, 1]  # [PAD]
    no_pad = _tiny_tokenizer(pad=False)
    assert text_batches(no_pad, lines[:2], batch_size=2)[0]["input_ids"][1].tolist()[3:] == [0, 0, 0]  # [UNK]
    assert no_pad.pad_token is None


def test_text_batches_by_length_group_similar_lines_and_pad_less():
    """``by_length=True``: every line in exactly one batch, batches of lines of similar length (fewer padded
    positions than in text order), their order shuffled by the seed, not short to long."""
    from fxprune.calibration.batches import text_batches

    words = "the a cat dog sat on mat ran far away and then slept".split()
    lines = [" ".join(words[(3 * i) % 13:(3 * i) % 13 + 1 + (5 * i) % 8]) for i in range(24)]
    tok = _tiny_tokenizer()
    plain = text_batches(tok, lines, batch_size=4)
    grouped = text_batches(tok, lines, batch_size=4, by_length=True, seed=1)
    rows = lambda bs: sorted(tuple(r[m.bool()].tolist()) for b in bs  # noqa: E731
                             for r, m in zip(b["input_ids"], b["attention_mask"]))
    assert rows(grouped) == rows(plain) and len(grouped) == len(plain) == 6
    padded = lambda bs: sum(int((b["attention_mask"] == 0).sum()) for b in bs)  # noqa: E731
    assert padded(grouped) < padded(plain) / 2
    widths = [b["input_ids"].shape[1] for b in grouped]
    assert widths != sorted(widths) and sorted(widths) == [b["input_ids"].shape[1] for b in
                                                            text_batches(tok, sorted(lines, key=lambda t: len(
                                                                t.split())), batch_size=4)]
    assert widths == [b["input_ids"].shape[1] for b in text_batches(tok, lines, 4, by_length=True, seed=1)]


def test_text_calibration_for_a_hugging_face_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import DECODER

    torch.manual_seed(0)
    folder = tmp_path / "llama"
    config = transformers.LlamaConfig(**{**DECODER, "vocab_size": 16}, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (tmp_path / "lines.txt").write_text("the cat sat on the mat\n\na dog ran far away\nthe dog slept\n")
    code = cli.main(["prune", f"hf:{folder}", "--ratio", "0.3", "--calibration", str(tmp_path / "lines.txt"),
                     "--quiet", "--latency-runs", "0", "--out", str(tmp_path / "pruned")])
    assert code == 1 and "has no tokenizer" in capsys.readouterr().err
    _tiny_tokenizer().save_pretrained(folder)
    code = cli.main(["prune", f"hf:{folder}", "--ratio", "0.3", "--calibration", str(tmp_path / "lines.txt"),
                     "--calibration-batch-size", "2", "--importance", "wanda", "--distill-steps", "2", "--quiet",
                     "--latency-runs", "0", "--out", str(tmp_path / "pruned")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "distilled 2 steps" in captured.out and "kl loss" in captured.out
    assert "input_ids=2x6" in captured.out and "attention_mask=2x6" in captured.out  # keyword example inputs
    pruned = fxprune.load(tmp_path / "pruned")
    for ids in (torch.tensor([[2, 3, 4, 5]]), torch.randint(2, 16, (3, 9))):  # any batch size and length
        assert pruned(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (*ids.shape, 16)
