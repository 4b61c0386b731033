"""OpenCLIP's side of the parity tests (tests/test_convert_openclip.py): runs in the side environment
`.venv-ref` (`make setup-ref`: torch, torchvision and open_clip_torch, which cannot share clipforge's venv).

    python scripts/openclip_reference.py JOB.json

JOB names an image batch and a token batch (torch.save files) and a list of cases; for each, this script
builds a model with open_clip and writes its features of those batches to the case's "out" file:

    {"load": "checkpoint", "path", "model_cfg"}   open_clip.create_model(<cfg registered under a name>,
                                                  pretrained=path): a file clipforge wrote
    {"load": "hub", "path"}                       open_clip.create_model("local-dir:" + path)
    {"load": "openai", "path"}                    open_clip's copy of OpenAI's build_model on the state dict
                                                  (then the fp32 tensors again: build_model casts to fp16)
    {"make": "checkpoint" | "hub" | "hub-bin", "model_cfg", "path", "seed"}
                                                  a model open_clip initializes, saved as open_clip_train
                                                  saves checkpoints (with params.txt) or as a hub directory
    {"config": NAME}                              OpenCLIP's published model config of NAME

Only open_clip and torch are imported: nothing from clipforge.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip.factory import get_model_config
from open_clip.model import build_model_from_openai_state_dict
from open_clip.push_to_hf_hub import save_config_for_hf


def registered(model_cfg: dict, registry: Path, count: list[int]) -> str:
    """A name under which open_clip knows `model_cfg` (as add_model_config registers a JSON file)."""
    count[0] += 1
    name = f"clipforge-parity-{count[0]}"
    (registry / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(registry / f"{name}.json")
    return name


def made(case: dict, registry: Path, count: list[int]) -> torch.nn.Module:
    """A model open_clip builds and initializes, saved the way OpenCLIP saves it."""
    torch.manual_seed(case["seed"])
    name = registered(case["model_cfg"], registry, count)
    model = open_clip.create_model(name)
    with torch.no_grad():  # LayerNorms start at (1, 0): move them, so a swapped weight/bias shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    path = Path(case["path"])
    if case["make"] == "checkpoint":  # open_clip_train: <run>/checkpoints/epoch_N.pt beside <run>/params.txt
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent.parent / "params.txt").write_text(f"batch_size: 8\nmodel: {name}\nprecision: amp\n")
        state = {f"module.{k}": v for k, v in model.state_dict().items()}
        torch.save(
            {"epoch": 1, "name": "run", "state_dict": state, "optimizer": optimizer.state_dict()}, path
        )
    else:
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        if case["make"] == "hub":
            save_file(model.state_dict(), path / "open_clip_model.safetensors")
        else:
            torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
        save_config_for_hf(model, path / "open_clip_config.json", model_config=case["model_cfg"])
    return model


def build(case: dict, registry: Path, count: list[int]) -> torch.nn.Module:
    if "make" in case:
        return made(case, registry, count)
    if case["load"] == "checkpoint":
        return open_clip.create_model(registered(case["model_cfg"], registry, count), pretrained=case["path"])
    if case["load"] == "hub":
        return open_clip.create_model("local-dir:" + case["path"])
    state_dict = torch.load(case["path"], map_location="cpu", weights_only=True)
    model = build_model_from_openai_state_dict(dict(state_dict), cast_dtype=None)
    # build_model stores the weights in fp16, as OpenAI's does: the fp32 tensors again, into the
    # architecture it read from the shapes, to compare at fp32 rounding.
    model.float().load_state_dict(state_dict)
    return model


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    images = torch.load(job["images"], weights_only=True)
    tokens = torch.load(job["tokens"], weights_only=True)
    count = [0]
    with tempfile.TemporaryDirectory() as tmp:
        for case in job["cases"]:
            if "config" in case:
                Path(case["out"]).write_text(json.dumps(get_model_config(case["config"])))
                continue
            model = build(case, Path(tmp), count).float().eval()
            with torch.no_grad():
                features = {
                    "image": model.encode_image(images),
                    "text": model.encode_text(tokens),
                    "logit_scale": model.logit_scale.detach().clone(),
                }
            torch.save(features, case["out"])
    print(f"open_clip {open_clip.__version__}, torch {torch.__version__}: {len(job['cases'])} cases")


if __name__ == "__main__":
    main()
