"""WiSE-FT merging: the endpoints bit for bit, the mean, refusals that name the first difference, and
`clipforge merge` writing a loadable model (or nothing, with one line on stderr and exit code 2)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.finetune import check_alpha, merge_models, merge_state_dicts
from clipforge.models import create_model
from clipforge.models.config import get_config
from conftest import randomized_model  # with conftest's `eval_files`: a saved ViT-Micro and its tokenizer


def seeded(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name).eval()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return seeded("ViT-Micro-16-32", 0), seeded("ViT-Micro-16-32", 1)


@pytest.mark.parametrize("alpha, endpoint", [(0.0, 0), (1.0, 1)])
def test_the_endpoints_are_the_inputs_bit_for_bit(pair, alpha, endpoint) -> None:
    merged = merge_models(*pair, alpha).state_dict()
    expected = pair[endpoint].state_dict()
    assert list(merged) == list(expected)
    assert all(same_bits(merged[k], expected[k]) for k in expected)


def test_alpha_one_half_is_the_mean(pair) -> None:
    a, b = pair[0].state_dict(), pair[1].state_dict()
    merged = merge_models(*pair, 0.5).state_dict()
    for key in a:  # float32 (a + b) / 2 is correctly rounded, as the merge's float64 mix is
        assert torch.equal(merged[key], (a[key] + b[key]) / 2), key


def test_reduced_precision_tensors_are_mixed_wide_and_cast_back() -> None:
    a = {"w": torch.tensor([1.0, 2.0, float("inf")], dtype=torch.float16)}
    b = {"w": torch.tensor([2.0, 2.0, float("inf")], dtype=torch.float16)}
    merged = merge_state_dicts(a, b, 0.25)["w"]
    assert merged.dtype == torch.float16 and merged.tolist() == [1.25, 2.0, float("inf")]  # equal: copied


def test_the_endpoints_keep_signed_zeros_and_ignore_the_other_sides_nan_and_inf() -> None:
    a = {"w": torch.tensor([-0.0, float("inf"), 1.0])}
    b = {"w": torch.tensor([float("nan"), 1.0, -0.0])}
    assert same_bits(merge_state_dicts(a, b, 0.0)["w"], a["w"])
    assert same_bits(merge_state_dicts(a, b, 1.0)["w"], b["w"])


def test_integer_buffers_come_from_the_nearer_endpoint() -> None:
    a = randomized_model("RN-Tiny-64")
    b = randomized_model("RN-Tiny-64")
    counters = [k for k in a.state_dict() if k.endswith("num_batches_tracked")]
    assert counters
    with torch.no_grad():
        for k in counters:
            b.state_dict()[k].fill_(7)
    for alpha, want in ((0.3, 0), (0.5, 0), (0.7, 7), (1.0, 7)):
        merged = merge_models(a, b, alpha).state_dict()
        assert all(merged[k].item() == want for k in counters), alpha
        assert all(merged[k].dtype == torch.long for k in counters)


def test_different_architectures_are_refused_naming_the_first_config_field() -> None:
    with pytest.raises(ValueError, match="config field embed_dim is 64 in A, 128 in B"):
        merge_models(seeded("ViT-Micro-16-32", 0), seeded("ViT-Nano-16-64", 0), 0.5)
    config = get_config("ViT-Micro-16-32")
    deeper = replace(config, vision=replace(config.vision, layers=2))
    with pytest.raises(ValueError, match=r"config field vision\.layers is 1 in A, 2 in B"):
        merge_models(create_model(config), create_model(deeper), 0.5)


def test_a_tensor_of_another_shape_is_refused_naming_the_first_such_key(pair) -> None:
    a, b = pair[0].state_dict(), dict(pair[1].state_dict())
    keys = list(a)
    b[keys[3]] = torch.zeros(2, 2)
    b[keys[5]] = torch.zeros(2, 2)
    with pytest.raises(ValueError) as caught:
        merge_state_dicts(a, b, 0.5)
    message = str(caught.value)
    assert keys[3] in message and keys[5] not in message and "\n" not in message
    assert f"{tuple(a[keys[3]].shape)} float32 in A, (2, 2) float32 in B" in message


def test_a_missing_or_extra_key_is_refused_naming_it(pair) -> None:
    a, b = pair[0].state_dict(), dict(pair[1].state_dict())
    missing = list(a)[-1]
    del b[missing]
    with pytest.raises(ValueError, match=f"{missing} is .* in A, absent in B"):
        merge_state_dicts(a, b, 0.5)
    with pytest.raises(ValueError, match=r"extra is absent in A, .* in B"):
        merge_state_dicts(a, {**a, "extra": torch.zeros(1)}, 0.5)


def test_another_dtype_is_refused(pair) -> None:
    a = pair[0].state_dict()
    key = next(iter(a))
    with pytest.raises(ValueError, match=f"{key} is .* float32 in A, .* float16 in B"):
        merge_state_dicts(a, {**a, key: a[key].half()}, 0.5)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -0.1, 1.5, "half"])
def test_alpha_must_be_finite_and_within_0_1(alpha) -> None:
    with pytest.raises(ValueError, match="alpha"):
        check_alpha(alpha)


def test_extrapolation_is_allowed_when_asked_for() -> None:
    a, b = {"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}
    assert merge_state_dicts(a, b, 1.5, extrapolate=True)["w"].item() == 2.5
    assert merge_state_dicts(a, b, -1.0, extrapolate=True)["w"].item() == 0.0
    with pytest.raises(ValueError, match="finite"):
        check_alpha(math.inf, extrapolate=True)


# ---- clipforge merge ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tuned(eval_files, tmp_path_factory):
    """A second ViT-Micro with eval_files' tokenizer: stands for the fine-tuned model."""
    _, _, tokenizer = clipforge.load(eval_files["model"])
    path = tmp_path_factory.mktemp("ft") / "model"
    clipforge.save(seeded("ViT-Micro-16-32", 1), path, tokenizer)
    return path


def test_cli_writes_a_loadable_model_holding_the_merge(eval_files, fine_tuned, tmp_path, capsys) -> None:
    out = tmp_path / "wise"
    code = main(["merge", str(eval_files["model"]), str(fine_tuned), "--alpha", "0.25", "--out", str(out)])
    assert code == 0 and str(out) in capsys.readouterr().out
    model, _, tokenizer = clipforge.load(out)
    a, _, tokenizer_a = clipforge.load(eval_files["model"])
    b = clipforge.load(fine_tuned)[0]
    expected = merge_models(a, b, 0.25).state_dict()
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert tokenizer.identity == tokenizer_a.identity != "openai"


def run_bad(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipforge merge: ")
    return lines[0]


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(
    eval_files, fine_tuned, tmp_path, capsys
) -> None:
    a, b, out = str(eval_files["model"]), str(fine_tuned), tmp_path / "out"
    other = tmp_path / "nano"
    clipforge.save(seeded("ViT-Nano-16-64", 0), other)
    assert "alpha" in run_bad(["merge", a, b, "--alpha", "nan", "--out", str(out)], capsys)
    assert "outside [0, 1]" in run_bad(["merge", a, b, "--alpha", "1.2", "--out", str(out)], capsys)
    assert "model B" in run_bad(
        ["merge", a, str(tmp_path / "none"), "--alpha", "0.5", "--out", str(out)], capsys
    )
    assert "embed_dim" in run_bad(["merge", a, str(other), "--alpha", "0.5", "--out", str(out)], capsys)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nano"]  # no temporary directory left either
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in run_bad(["merge", a, b, "--alpha", "0.5", "--out", str(out)], capsys)
    assert "not a clipforge" in run_bad(
        ["merge", a, b, "--alpha", "0.5", "--out", str(out), "--overwrite"], capsys
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
