"""A validation split of the pictext training shards, for choosing a training recipe without looking at
the Twitter evaluation.

    python -m bench.pictext_split --out runs/pictext-val/data

The Twitter evaluation asks a model to name emoji drawn in a style it never saw, from names it learned
with other styles' images. The split asks the same of the training data alone: a fixed fifth of the emoji
classes (by a hash of the name) lose their Google-style images, another fifth their OpenMoji ones, so
each held-out image shows an emoji the model met only in the other style.
- `OUT/train-{0..5}.tar`: every other training pair (clip art, stamps, the emoji left in), in the shards'
  own (shuffled) order, dealt round six shards;
- `OUT/val.tar`: the held-out plain images (no skin-tone variants; those are dropped), with their labels:
  `configs/eval-pictext-val.toml` classifies them zero-shot over the 1,910 names;
- `OUT/captions.txt`: the captions of `OUT/train-*.tar`, one a line, and `OUT/captions-all.txt`: those of
  all nine training shards, for `clipforge tokenizer train` (a vocabulary learned from the training
  captions only: never from an evaluation set).
Holding out a whole style instead (OpenMoji) leaves a task at chance for this model size: trained 400
steps on the rest, it names 0.08% of OpenMoji's emoji (chance 0.05%), which cannot rank recipes.
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

from bench.shards import add, samples

TRAIN_SHARDS = 6
HELD_OUT = {"google": (0.0, 0.2), "openmoji": (0.2, 0.4)}  # style -> the slice of classes it loses


def _class_position(label: str) -> float:
    """Where a class falls in [0, 1): the same on every machine (not Python's salted hash)."""
    return int(hashlib.sha256(label.encode()).hexdigest()[:8], 16) / 16**8


def _is_held_out(meta: dict[str, Any]) -> bool:
    low, high = HELD_OUT.get(meta.get("style"), (0.0, 0.0))
    return meta.get("source") == "emoji" and low <= _class_position(meta.get("label", "")) < high


def _caption_line(members: dict[str, bytes]) -> str:
    # One caption per line: a caption's own line breaks would split it in two.
    return " ".join(members.get("txt", b"").decode("utf-8").split())


def split(pictext: Path, out: Path) -> dict[str, int]:
    """Write the split; returns the number of samples (or captions) in each file."""
    classes = set(json.loads((pictext / "classes-emoji.json").read_text()))
    shards = [f"train-{i}.tar" for i in range(TRAIN_SHARDS)]
    names = [*shards, "val.tar", "captions.txt", "captions-all.txt"]
    out.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(names, 0)
    with contextlib.ExitStack() as stack:
        tars = {name: stack.enter_context(tarfile.open(out / f"{name}.partial", "w")) for name in names[:-2]}
        texts = {name: stack.enter_context(open(out / f"{name}.partial", "w")) for name in names[-2:]}
        for shard in sorted(pictext.glob("train-*.tar")):
            for key, members in samples(shard):
                meta = json.loads(members["json"])
                line = _caption_line(members) + "\n"
                texts["captions-all.txt"].write(line)
                counts["captions-all.txt"] += 1
                if not _is_held_out(meta):
                    name = shards[sum(counts[s] for s in shards) % TRAIN_SHARDS]
                    texts["captions.txt"].write(line)
                    counts["captions.txt"] += 1
                elif meta.get("skin") is None and meta.get("label") in classes:
                    name = "val.tar"
                else:
                    continue
                counts[name] += 1
                add(tars[name], key, members)
    for name in names:
        (out / f"{name}.partial").rename(out / name)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pictext", type=Path, default=Path("../shared/data/pictext"))
    parser.add_argument("--out", type=Path, default=Path("runs/pictext-val/data"))
    args = parser.parse_args(argv)
    if (args.out / "captions-all.txt").exists():
        print(f"{args.out}: the split exists")
        return 0
    print(json.dumps(split(args.pictext, args.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
