#!/usr/bin/env bash
# Prepares the GPU suite for a GPU machine without network access (see docs/benchmarks.md, "On a GPU"),
# run on a machine that has network. The GPU machine is expected to have Python 3.12 with CUDA torch,
# torchvision, transformers, timm, tokenizers, regex, pyarrow and safetensors; the other packages the suite
# needs (ftfy for clipforge's tokenizer; OpenCLIP and OpenAI's code as the peers) travel as wheels in .whl/,
# which git ignores. Copy the checkout with .whl/ to the GPU machine, then run there:
#
#   bash bench/device_run.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# The peers' versions of bench/setup_env.sh; setuptools < 80 for the pkg_resources that OpenAI's code imports.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl ftfy==6.3.1 wcwidth==0.2.13 open_clip_torch==3.3.0 clip-anytorch==2.6.0 "setuptools==79.0.1"
ls .whl && du -sh .whl
