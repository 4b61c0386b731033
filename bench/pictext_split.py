"""A validation split of the pictext training shards, for choosing a training recipe without looking at
the Twitter evaluation.

    python -m bench.pictext_split --out runs/pictext-val/data

The Twitter evaluation asks a model trained on other styles to name emoji drawn in a style it never saw.
The split asks the same of the training data alone: the OpenMoji style is held out whole.
- `OUT/train-{0..5}.tar`: every training pair that is not an OpenMoji emoji (clip art, stamps, Google's
  emoji: 12,689 pairs), in the shards' own (shuffled) order, dealt round six shards;
- `OUT/val-openmoji.tar`: OpenMoji's plain images (no skin-tone variants) of the evaluation's 1,910 class
  names, with their labels: `configs/eval-pictext-val.toml` classifies them zero-shot over the 1,910 names;
- `OUT/captions.txt`: the captions of `OUT/train-*.tar`, one a line, and `OUT/captions-all.txt`: those of
  all nine training shards, for `clipforge tokenizer train` (a vocabulary learned from the training
  captions only: never from an evaluation set).
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tarfile
from pathlib import Path
from typing import Any

from bench.shards import add, samples

TRAIN_SHARDS = 6
HELD_OUT_STYLE = "openmoji"


def _is_held_out(meta: dict[str, Any]) -> bool:
    return meta.get("source") == "emoji" and meta.get("style") == HELD_OUT_STYLE


def _caption_line(members: dict[str, bytes]) -> str:
    # One caption per line: a caption's own line breaks would split it in two.
    return " ".join(members.get("txt", b"").decode("utf-8").split())


def split(pictext: Path, out: Path) -> dict[str, int]:
    """Write the split; returns the number of samples (or captions) in each file."""
    classes = set(json.loads((pictext / "classes-emoji.json").read_text()))
    shards = [f"train-{i}.tar" for i in range(TRAIN_SHARDS)]
    names = [*shards, "val-openmoji.tar", "captions.txt", "captions-all.txt"]
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
                    name = "val-openmoji.tar"
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
