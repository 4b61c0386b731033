"""`clipforge convert`: every target written, read back exactly; bad input refused on one line, exit 2,
nothing written."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from clipforge.checkpoints import load_model, save
from clipforge.cli import main
from clipforge.convert import openclip
from clipforge.models.config import MODEL_CONFIGS
from clipforge.tokenizer import train_tokenizer
from conftest import randomized_model

MICRO = MODEL_CONFIGS["ViT-Micro-16-32"]  # QuickGELU, 64-wide heads: every format holds it
GELU = dataclasses.replace(MICRO, activation="gelu")  # OpenAI's code cannot rebuild it

TARGETS = [
    ("clipforge", "out", []),
    ("openai", "out.pt", []),
    ("openai", "out.safetensors", []),
    ("openclip", "out.pt", []),
    ("openclip", "hub", ["--hub"]),
    ("hf", "hf", []),
    ("onnx", "onnx", []),
]


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def listing(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def source(tmp_path):
    model = randomized_model(MICRO, layernorms=True)
    save(model, tmp_path / "src")
    return model, tmp_path / "src"


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    """The exit code and the printed lines: stdout's, or stderr's when the command failed."""
    code = main(["convert", *map(str, argv)])
    printed = capsys.readouterr()
    return code, (printed.err if code else printed.out).strip().splitlines()


@pytest.mark.needs_openai_bpe  # the hf and clipforge targets write OpenAI's tokenizer files
@pytest.mark.parametrize("to, name, extra", TARGETS)
def test_every_target_reads_back_exactly(tmp_path, capsys, source, to, name, extra):
    if to == "onnx" and importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx is not installed (pip install 'clipforge[interop]')")
    model, src = source
    code, out = run(capsys, src, tmp_path / name, "--to", to, *extra)
    assert code == 0, out
    assert out[0] == f"wrote {tmp_path / name} ({to}{' hub' if extra else ''}) from clipforge directory"
    if to == "onnx":
        assert (tmp_path / name / "image_encoder.onnx").is_file()
        return
    loaded = load_model(tmp_path / name)
    assert loaded.config == model.config and same_state(loaded, model)
    if to == "openclip":
        assert "open_clip.create_model('ViT-Micro-16-32'" not in out[-1]  # OpenCLIP has no such name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_gelu_models_keep_their_activation_through_openclip(tmp_path, capsys):
    model = randomized_model(GELU, layernorms=True)
    save(model, tmp_path / "src")
    for dst, extra in ((tmp_path / "g.pt", []), (tmp_path / "g-hub", ["--hub"])):
        assert run(capsys, tmp_path / "src", dst, "--to", "openclip", *extra)[0] == 0
        loaded = load_model(dst)
        assert loaded.config.activation == "gelu" and same_state(loaded, model)


def test_openclip_name_is_printed_for_registered_architectures(tmp_path, capsys, monkeypatch):
    # As if the micro model were registered with OpenCLIP (openclip_name itself: test_convert_openclip.py).
    monkeypatch.setattr(openclip, "openclip_name", lambda config: "ViT-B-32-quickgelu")
    model = randomized_model(MICRO, layernorms=True)
    save(model, tmp_path / "src")
    code, out = run(capsys, tmp_path / "src", tmp_path / "b32.pt", "--to", "openclip")
    assert code == 0
    assert (
        out[-1]
        == f"load it with open_clip.create_model('ViT-B-32-quickgelu', pretrained='{tmp_path / 'b32.pt'}')"
    )


def test_architecture_flag_names_what_a_file_cannot_tell(tmp_path, capsys, monkeypatch):
    model = randomized_model(GELU, layernorms=True)
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # shapes only: QuickGELU would be assumed
    code, _ = run(capsys, tmp_path / "plain.pt", tmp_path / "out", "--to", "clipforge")
    assert code == 0 and load_model(tmp_path / "out").config.activation == "quick_gelu"
    monkeypatch.setitem(MODEL_CONFIGS, "test/gelu-micro", GELU)
    argv = (
        tmp_path / "plain.pt",
        tmp_path / "out2",
        "--to",
        "clipforge",
        "--architecture",
        "test/gelu-micro",
    )
    code, _out = run(capsys, *argv)
    assert code == 0 and same_state(load_model(tmp_path / "out2"), model)
    assert load_model(tmp_path / "out2").config.activation == "gelu"


def test_an_openclip_checkpoint_without_its_run_is_converted_with_a_note(tmp_path, capsys):
    model = randomized_model(MICRO, layernorms=True)
    torch.save(
        {"epoch": 2, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "e.pt",
    )
    code, out = run(capsys, tmp_path / "e.pt", tmp_path / "out", "--to", "clipforge")
    assert code == 0
    assert out[0].startswith(f"note: {tmp_path / 'e.pt'}: an OpenCLIP training checkpoint without its run's")
    assert out[-1] == f"wrote {tmp_path / 'out'} (clipforge) from OpenCLIP checkpoint"
    assert same_state(load_model(tmp_path / "out"), model)


def _refused(capsys, tmp_path, *argv, match: str) -> None:
    before = listing(tmp_path)
    code, out = run(capsys, *argv)
    assert code == 2 and len(out) == 1, out
    assert out[0].startswith("clipforge convert: ") and match in out[0], out[0]
    assert listing(tmp_path) == before  # nothing written


def test_bad_input_is_refused_on_one_line_before_anything_is_written(tmp_path, capsys, source):
    _, src = source
    _refused(capsys, tmp_path, tmp_path / "nope", tmp_path / "o", "--to", "clipforge", match="nope")
    _refused(capsys, tmp_path, src, tmp_path / "o.txt", "--to", "openai", match="must end in .pt or .pth")
    _refused(capsys, tmp_path, src, tmp_path / "o.safetensors", "--to", "openclip", match="or pass --hub")
    _refused(capsys, tmp_path, src, tmp_path / "o", "--to", "hf", "--hub", match="use it with --to openclip")
    _refused(capsys, tmp_path, src, src, "--to", "clipforge", match="exists: pass --overwrite")
    _refused(capsys, tmp_path, src, src, "--to", "clipforge", "--overwrite", match="is the source itself")
    (tmp_path / "keep.pt").write_bytes(b"precious")
    _refused(capsys, tmp_path, src, tmp_path / "keep.pt", "--to", "openai", match="keep.pt exists")
    assert (tmp_path / "keep.pt").read_bytes() == b"precious"
    (tmp_path / "dir.pt").mkdir()
    _refused(
        capsys, tmp_path, src, tmp_path / "dir.pt", "--to", "openai", "--overwrite", match="is a directory"
    )
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02}q\x00.")  # a pickled empty dict: no tensors
    _refused(
        capsys, tmp_path, tmp_path / "garbage.pt", tmp_path / "o", "--to", "clipforge", match="garbage.pt"
    )


def test_models_a_format_cannot_hold_are_refused(tmp_path, capsys):
    gelu = randomized_model(GELU, layernorms=True)
    save(gelu, tmp_path / "gelu")
    _refused(
        capsys, tmp_path, tmp_path / "gelu", tmp_path / "o.pt", "--to", "openai", match="activation 'gelu'"
    )
    two_heads = dataclasses.replace(MICRO, text=dataclasses.replace(MICRO.text, heads=2))
    heads = randomized_model(two_heads, layernorms=True)
    save(heads, tmp_path / "heads")
    _refused(capsys, tmp_path, tmp_path / "heads", tmp_path / "o.pt", "--to", "openai", match="2 text heads")
    tokenizer = train_tokenizer([_captions(tmp_path)], vocab_size=600, min_frequency=1)
    save(randomized_model(MICRO, layernorms=True), tmp_path / "own-vocab", tokenizer)
    for to, dst in (("openclip", "o.pt"), ("openai", "o.pt")):
        _refused(
            capsys, tmp_path, tmp_path / "own-vocab", tmp_path / dst, "--to", to, match="its own tokenizer"
        )


def _captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(
        "\n".join(f"a photo of {n} red {c}" for n in range(50) for c in ("cats", "dogs", "birds"))
    )
    return path


def test_overwrite_replaces_only_like_with_like(tmp_path, capsys, source):
    _model, src = source
    assert run(capsys, src, tmp_path / "o.pt", "--to", "openclip")[0] == 0
    other = randomized_model(MICRO, seed=1, layernorms=True)
    save(other, tmp_path / "src2")
    assert run(capsys, tmp_path / "src2", tmp_path / "o.pt", "--to", "openclip", "--overwrite")[0] == 0
    assert same_state(load_model(tmp_path / "o.pt"), other)
    assert run(capsys, src, tmp_path / "hub", "--to", "openclip", "--hub")[0] == 0
    assert (
        run(capsys, tmp_path / "src2", tmp_path / "hub", "--to", "openclip", "--hub", "--overwrite")[0] == 0
    )
    assert same_state(load_model(tmp_path / "hub"), other)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    _refused(
        capsys,
        tmp_path,
        src,
        tmp_path / "notes",
        "--to",
        "clipforge",
        "--overwrite",
        match="not a clipforge save",
    )
    argv = (src, tmp_path / "notes", "--to", "openclip", "--hub", "--overwrite")
    _refused(capsys, tmp_path, *argv, match="not an OpenCLIP hub directory")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
