"""The weights' moving average (optim.ema): its arithmetic, its checkpoints, its resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from clipforge.configs import ConfigError
from clipforge.models import create_model, get_config
from clipforge.train.checkpointing import list_checkpoints
from clipforge.train.ema import WeightAverage
from clipforge.train.loop import train
from conftest import tiny_config


def test_the_average_follows_the_ramped_decay_and_copies_buffers():
    torch.manual_seed(0)
    model = create_model(get_config("ViT-Micro-16-32"))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    average = WeightAverage(model, decay=0.9)
    expected = dict(start)
    for step in (1, 2, 3, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))  # 2/11, 3/12, 4/13, then the full 0.9
        expected = {n: d * expected[n] + (1 - d) * p.detach() for n, p in model.named_parameters()}
    for name, p in average.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-6, atol=1e-6)
        assert not p.requires_grad
    with torch.no_grad():
        for b in model.buffers():
            b.add_(1) if b.is_floating_point() else None
    average.update(model, 41)
    for mine, theirs in zip(average.model.buffers(), model.buffers(), strict=True):
        assert torch.equal(mine, theirs)


def test_checkpoints_hold_a_loadable_average_that_resumes_exactly(tmp_path, tokenizer_dir):
    from clipforge.checkpoints import load

    ema = ("--optim.ema", "0.5")
    train(tiny_config(tmp_path / "straight", tokenizer_dir, *ema))  # checkpoints at steps 4 and 8
    halfway, last = list_checkpoints(tmp_path / "straight")
    train(tiny_config(tmp_path / "resumed", tokenizer_dir, *ema), resume=str(halfway))
    averaged, trained = load_file(last / "ema/model.safetensors"), load_file(last / "model.safetensors")
    assert averaged.keys() == trained.keys()
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)
    resumed = load_file(list_checkpoints(tmp_path / "resumed")[-1] / "ema/model.safetensors")
    for name in averaged:
        assert torch.equal(averaged[name], resumed[name]), name
    model, _, tokenizer = load(last / "ema")
    assert model.encode_text(tokenizer(["two red circles"], context_length=16)).shape == (1, 64)


def test_a_sharded_run_refuses_the_average(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match=r"optim\.ema = 0\.9: needs run\.strategy = 'ddp'"):
        tiny_config(tmp_path, tokenizer_dir, "--optim.ema", "0.9", "--run.strategy", "fsdp")
    with pytest.raises(ConfigError, match=r"optim\.ema = 1\.0: must be in \[0, 1\)"):
        tiny_config(tmp_path, tokenizer_dir, "--optim.ema", "1.0")
