"""ONNX export: the graphs onnxruntime runs compute what the PyTorch model computes, at any batch size.

Tolerances come from `rounding_budget` / `rounding_tolerance` (conftest): two fp32 computations of the
same function that differ only in summation order and in their exp/erf/sqrt kernels (onnxruntime's MLAS
against oneDNN/ATen, fused or not) differ by ~eps * sqrt(terms) per product, adding up over the chain.
For these tiny towers that is below 1e-4 of the largest output, which the tests check too; a wrong head
count, scale, mask or pooling position moves outputs by percents.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from clipforge.convert.onnx import METADATA_FILE, OnnxExportError, export_onnx
from clipforge.models import CLIPConfig, TextConfig, VisionConfig, for_inference
from clipforge.models.int8 import Int8Linear
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD
from conftest import randomized_model
from tolerances import rounding_budget, rounding_rtol, rounding_tolerance

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
InvalidArgument = ort.capi.onnxruntime_pybind11_state.InvalidArgument  # a shape the graph does not take

TEXT = TextConfig(context_length=20, vocab_size=500, width=32, heads=2, layers=2)
CONFIGS = {
    "vit-quickgelu": CLIPConfig(24, VisionConfig("vit", 32, 32, 2, heads=2, patch_size=8), TEXT),
    "vit-gelu": CLIPConfig(
        24, VisionConfig("vit", 32, 32, 2, heads=2, patch_size=8), TEXT, activation="gelu"
    ),
    # The attention pool runs on 32 x 8 = 256 channels: 4 heads of 64, over a 2 x 2 grid.
    "resnet": CLIPConfig(24, VisionConfig("resnet", 64, 8, (1, 1, 1, 1), heads=4), TEXT),
}


def session(path: Path) -> ort.InferenceSession:
    return _session(str(path), path.stat().st_mtime_ns)


@functools.cache
def _session(path: str, mtime_ns: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def images(config: CLIPConfig, batch: int, seed: int = 0) -> torch.Tensor:
    size = config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tokens(config: CLIPConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Random ids below the EOT id, an EOT at a different place in every row (first, last, in between),
    zeros after it; the last row has two EOTs, where both PyTorch and ONNX's ArgMax take the first."""
    g = torch.Generator().manual_seed(seed)
    T, eot = config.text.context_length, config.text.vocab_size - 1
    out = torch.randint(1, eot, (batch, T), generator=g)
    for row in range(batch):
        end = [0, T - 1, 1 + row * 5 % (T - 2)][min(row, 2)]
        out[row, end] = eot
        out[row, end + 1 :] = 0
    if batch > 1:
        out[-1, 3], out[-1, 9] = eot, eot
    return out


def run(path: Path, name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session(path).run(None, {name: x.numpy()})[0])


def assert_parity(got: torch.Tensor, want: torch.Tensor, config: CLIPConfig, tower: str) -> None:
    depth, terms = rounding_budget(config, tower)
    tol = rounding_tolerance(want, depth, terms)
    assert rounding_rtol(torch.float32, depth, terms) < 1e-4
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= tol


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """Each config's model and its one export (fp32, default opset, dynamic batch)."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, config in CONFIGS.items():
        model = randomized_model(config)
        out[name] = (model, *export_onnx(model, root / name))
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_image_graph_matches_encode_image_at_batch_1_and_7(exported, name: str) -> None:
    model, image_path, _ = exported[name]
    (dim,) = onnx.load(str(image_path)).graph.input[0].type.tensor_type.shape.dim[:1]
    assert dim.dim_param == "N"  # one graph, every batch size
    for batch in (1, 7):
        x = images(model.config, batch, seed=batch)
        with torch.no_grad():
            want = model.encode_image(x)
        assert_parity(run(image_path, "image", x), want, model.config, "image")


@pytest.mark.parametrize("name", CONFIGS)
def test_text_graph_matches_encode_text_at_batch_1_and_7(exported, name: str) -> None:
    model, _, text_path = exported[name]
    graph = onnx.load(str(text_path)).graph
    assert "ArgMax" in {node.op_type for node in graph.node}  # the EOT position is computed, not traced
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for batch in (1, 7):
        x = tokens(model.config, batch, seed=batch)
        with torch.no_grad():
            want = model.encode_text(x)
        assert_parity(run(text_path, "tokens", x), want, model.config, "text")


def test_graphs_pass_the_checker_with_the_documented_interface(exported) -> None:
    _, image_path, text_path = exported["vit-quickgelu"]
    for path, name, dtype, output in (
        (image_path, "image", onnx.TensorProto.FLOAT, "image_embeds"),
        (text_path, "tokens", onnx.TensorProto.INT64, "text_embeds"),
    ):
        graph = onnx.load(str(path))
        onnx.checker.check_model(graph, full_check=True)
        assert graph.opset_import[0].version == 17
        (inp,), (out,) = graph.graph.input, graph.graph.output
        assert (inp.name, inp.type.tensor_type.elem_type) == (name, dtype)
        assert (out.name, out.type.tensor_type.elem_type) == (output, onnx.TensorProto.FLOAT)
    dims = onnx.load(str(text_path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == TEXT.context_length


def test_image_graph_holds_only_image_weights(exported) -> None:
    model, image_path, _ = exported["vit-quickgelu"]
    stored = sum(math.prod(t.dims) for t in onnx.load(str(image_path)).graph.initializer)
    assert stored <= sum(p.numel() for p in model.tower_parameters("image"))


def test_metadata_says_how_to_preprocess(exported) -> None:
    model, image_path, _ = exported["resnet"]
    meta = json.loads((image_path.parent / METADATA_FILE).read_text())
    assert CLIPConfig.from_dict(meta["model"]) == model.config
    assert meta["opset"] == 17 and meta["weights_dtype"] == "float32"
    assert meta["image"]["image_size"] == 64 and meta["image"]["input_shape"] == ["N", 3, 64, 64]
    assert meta["image"]["mean"] == list(OPENAI_MEAN) and meta["image"]["std"] == list(OPENAI_STD)
    assert meta["text"]["context_length"] == TEXT.context_length and meta["text"]["input"] == "tokens"
    assert meta["logit_scale"] == pytest.approx(model.logit_scale.exp().item())


def test_export_leaves_the_model_as_it_was(tmp_path) -> None:
    model = randomized_model(CONFIGS["resnet"]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "out")
    assert model.training and model.dtype == torch.float32
    # A trace in training mode would have moved the BatchNorm statistics.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_for_inference_copy_exports_the_same_function(tmp_path) -> None:
    model = randomized_model(CONFIGS["resnet"])
    image_path, _ = export_onnx(for_inference(model), tmp_path / "out")  # BatchNorms folded, NHWC
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(image_path)).graph.node}
    x = images(model.config, 3)
    with torch.no_grad():
        want = model.encode_image(x)
    assert_parity(run(image_path, "image", x), want, model.config, "image")


@pytest.mark.parametrize("name", ["vit-quickgelu", "resnet"])
def test_fp16_export_is_close_to_fp32(tmp_path, name: str) -> None:
    """float16 keeps 11 significant bits (eps = 2^-10). With the budget above in float16 as the norm-
    relative error d of the embeddings, cos(fp16, fp32) >= 1 - d^2 / 2. Under 0.99 for these towers:
    loose, since it allows every sum to accumulate in float16; measured values are in docs/onnx.md."""
    config = CONFIGS[name]
    model = randomized_model(config)
    image_path, text_path = export_onnx(model, tmp_path / "out", fp16=True)
    for path in (image_path, text_path):
        # Nearly all weights in float16; LayerNorm parameters stay float32, as the model computes them.
        weights = onnx.load(str(path)).graph.initializer
        half = sum(math.prod(t.dims) for t in weights if t.data_type == onnx.TensorProto.FLOAT16)
        assert half >= 0.9 * sum(math.prod(t.dims) for t in weights)
    for path, name_in, x, tower in (
        (image_path, "image", images(config, 5), "image"),
        (text_path, "tokens", tokens(config, 5), "text"),
    ):
        with torch.no_grad():
            want = model.encode_image(x) if tower == "image" else model.encode_text(x)
        got = run(path, name_in, x)  # float32 in, float32 out: the casts are in the graph
        assert got.dtype == torch.float32
        d = rounding_rtol(torch.float16, *rounding_budget(config, tower))
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert cos.min().item() >= 1 - d**2 / 2
        assert torch.isfinite(got).all()


def test_static_image_batch_and_the_newest_opset(tmp_path) -> None:
    model = randomized_model(CONFIGS["vit-gelu"])
    image_path, text_path = export_onnx(model, tmp_path / "out", opset=20, image_batch_dim_dynamic=False)
    graph = onnx.load(str(image_path))
    assert graph.opset_import[0].version == 20
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    x = images(model.config, 1)
    with torch.no_grad():
        assert_parity(run(image_path, "image", x), model.encode_image(x), model.config, "image")
    with pytest.raises(InvalidArgument, match=r"(?i)dimension|shape"):
        run(image_path, "image", images(model.config, 2))
    assert run(text_path, "tokens", tokens(model.config, 3)).shape == (3, 24)


# ---- refusals: one line, before anything is written --------------------------------------------------


def one_line_error(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    return randomized_model(CONFIGS["vit-quickgelu"])


def test_refuses_what_is_not_a_clip_model(tmp_path) -> None:
    with pytest.raises(TypeError) as error:
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "out")
    assert "CLIP" in one_line_error(error) and "Linear" in one_line_error(error)
    assert leftovers(tmp_path) == []


def test_refuses_an_int8_model(tmp_path, small) -> None:
    model = for_inference(small)
    block = model.transformer.resblocks[0]
    block.mlp.c_fc = Int8Linear.from_linear(block.mlp.c_fc)
    with pytest.raises(OnnxExportError) as error:
        export_onnx(model, tmp_path / "out")
    assert "int8" in one_line_error(error)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("opset", [16, 21, "17", 17.0, True])
def test_refuses_an_opset_outside_17_to_20(tmp_path, small, opset) -> None:
    with pytest.raises(OnnxExportError) as error:
        export_onnx(small, tmp_path / "out", opset=opset)
    assert "opset" in one_line_error(error)
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(tmp_path, small) -> None:
    dst = tmp_path / "out"
    export_onnx(small, dst)
    first = (dst / "image_encoder.onnx").stat().st_mtime_ns
    with pytest.raises(OnnxExportError) as error:
        export_onnx(small, dst)
    assert "overwrite=True" in one_line_error(error)
    assert (dst / "image_encoder.onnx").stat().st_mtime_ns == first
    export_onnx(small, dst, overwrite=True, fp16=True)  # an earlier export is replaced
    assert json.loads((dst / METADATA_FILE).read_text())["weights_dtype"] == "float16"
    assert leftovers(tmp_path) == ["out"]  # no temporary or set-aside directory left


def test_overwrite_never_replaces_a_directory_that_is_not_an_export(tmp_path, small) -> None:
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "cat.jpg").write_bytes(b"precious")
    with pytest.raises(OnnxExportError) as error:
        export_onnx(small, dst, overwrite=True)
    assert "not a clipforge ONNX export" in one_line_error(error)
    assert (dst / "cat.jpg").read_bytes() == b"precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OnnxExportError, match="not a directory"):
        export_onnx(small, tmp_path / "file", overwrite=True)


def test_unwritable_destination_is_a_one_line_error(tmp_path, small) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OnnxExportError) as error:
        export_onnx(small, tmp_path / "file" / "out")
    assert str(tmp_path / "file") in one_line_error(error)
    with pytest.raises(OnnxExportError) as error:
        export_onnx(small, tmp_path / "file" / "deeper" / "out")
    assert "cannot write" in one_line_error(error)
    assert leftovers(tmp_path) == ["file"]


def test_a_failed_export_leaves_the_earlier_one(tmp_path, small, monkeypatch) -> None:
    dst = tmp_path / "out"
    export_onnx(small, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("exporter broke\nsecond line")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(OnnxExportError) as error:
        export_onnx(small, dst, overwrite=True)
    assert one_line_error(error).endswith("exporter broke")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert leftovers(tmp_path) == ["out"]
