from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clipforge.configs import ConfigError, apply_overrides, dump_toml, from_dict, load_toml
from clipforge.train.config import TrainConfig


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float | None = None
    name: str = "x"


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = 10
    flag: bool = False


def test_overrides_convert_to_the_field_types():
    cfg = apply_overrides(Outer(), ["--inner.lr", "5e-4", "--steps=20", "--flag", "--inner.betas", "0.8,0.9"])
    assert cfg == Outer(Inner(5e-4, (0.8, 0.9)), 20, True)
    assert apply_overrides(cfg, ["--inner.eps", "1e-8"]).inner.eps == 1e-8
    assert apply_overrides(cfg, ["--inner.eps", "none"]).inner.eps is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--inner.lrr", "1"], "unknown option --inner.lrr"),
        (["--steps", "ten"], "steps = 'ten': expected int"),
        (["--steps", "1.5"], r"steps = '1\.5': expected int"),
        (["--flag", "maybe"], "flag = 'maybe': expected true/false"),
        (["--inner.betas", "0.9"], r"inner\.betas = '0\.9': expected 2 values"),
        (["steps"], "expected an option"),
        (["--inner.betas", "[0.9"], r"inner\.betas = '\[0\.9': not a JSON list"),
    ],
)
def test_bad_overrides_name_the_field(args, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Outer(), args)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1.5, True])
def test_a_toml_number_that_is_no_int_is_an_error_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"^steps = .*: expected int"):
        from_dict(Outer, {"steps": value})


def test_unknown_keys_in_a_file_are_errors(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[optim]\nlr = 1e-3\nlearning_rate = 2\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_toml(TrainConfig, path)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(TrainConfig, tmp_path / "missing.toml")


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = apply_overrides(
        TrainConfig(), ["--optim.lr", "3e-4", "--data.crop_scale", "0.8,1.0", "--run.seed", "3"]
    )
    path = tmp_path / "resolved.toml"
    path.write_text(dump_toml(cfg))
    assert load_toml(TrainConfig, path) == cfg


def test_from_dict_builds_nested_sections():
    cfg = from_dict(Outer, {"inner": {"lr": 2, "name": "y"}, "steps": 3})
    assert cfg.inner.lr == 2.0 and isinstance(cfg.inner.lr, float) and cfg.inner.name == "y"


def _flat(cfg: object, prefix: str = "") -> dict:
    out = {}
    for name, value in vars(cfg).items():
        if hasattr(value, "__dataclass_fields__"):
            out |= _flat(value, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = value
    return out


def test_the_pictext_recipe_is_the_reference_in_bf16_at_batch_256_with_the_steps_its_wall_clock_holds():
    # docs/learning.md compares the two as "the reference's settings, with bf16, batch 256 and more samples".
    configs = Path(__file__).resolve().parents[1] / "configs"
    reference = _flat(load_toml(TrainConfig, configs / "pictext-reference.toml"))
    recipe = _flat(load_toml(TrainConfig, configs / "pictext-recipe.toml"))
    changed = {key for key in reference if reference[key] != recipe[key]}
    assert changed == {
        "schedule.steps", "data.batch_size", "run.precision", "run.out_dir", "run.checkpoint_every"
    }  # fmt: skip
    assert (reference["run.precision"], recipe["run.precision"]) == ("fp32", "bf16")
    assert (reference["data.batch_size"], recipe["data.batch_size"]) == (128, 256)
    assert recipe["schedule.steps"] * 256 > reference["schedule.steps"] * 128  # more samples seen
