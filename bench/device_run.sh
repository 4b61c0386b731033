#!/usr/bin/env bash
# The GPU suite on a GPU machine without network access, in one command (bench/device_prepare.sh first,
# and the checkout copied there with its .whl/): the GPU families (matmul peak, encoding, training step,
# training memory) of `python -m bench`, with clipforge and the peers in that machine's one Python. The
# data pipeline and tokenizer are CPU work, measured on a CPU machine (docs/benchmarks.md); their data does
# not travel.
#
#   bash bench/device_run.sh [FAMILY ...]      # default: peak encode train memory
#
# Writes $OUT/benchmarks-gpu.{md,png,json} and $OUT/log. PY and DEVICE override python3 and cuda (a dry
# run elsewhere: PY=/path/to/python DEVICE=cpu bash bench/device_run.sh --quick peak).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PY:-python3}"
out="${OUT:-/tmp/clipforge-gpu}"
site="${SITE:-/tmp/site}"
mkdir -p "$out"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "installing the wheels in .whl/ failed (did bench/device_prepare.sh run, and was .whl/ copied?)"; exit 1; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# The suite runs the peers with <env>/bin/python: here that is the same interpreter.
peers="$(mktemp -d)"
mkdir -p "$peers/bin" && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$py")" > "$peers/bin/python"
chmod +x "$peers/bin/python"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ $# -eq 0 ]; then set -- peak encode train memory; fi
PYTHONUNBUFFERED=1 timeout "${LIMIT_S:-560}" "$py" -m bench "$@" --device "${DEVICE:-cuda}" \
    --peers-env "$peers" --ours-python "$(command -v "$py")" --contenders clipforge,openclip,hf,openai \
    --out "$out/benchmarks-gpu.md" 2>&1 | tee "$out/log"
