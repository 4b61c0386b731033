#!/usr/bin/env bash
# The benchmark suite on one CUDA GPU, in under 8 minutes: bf16 autocast (fp32 beside it), larger batches,
# encoding throughput of ViT-B/32 and ViT-L/14 (batch 1 and 256), training-step throughput and MFU of
# ViT-B/16 (batch 128) and of the pictext ViT-Mini (batch 512), training memory of ViT-B/16 by batch size,
# the data pipeline and the tokenizer (CPU work, as on any machine), and the GPU's matmul peak.
#
#   bench/gpu.sh [OUT.md]            # default docs/benchmarks-gpu.md (+ .png, .json beside it)
#
# clipforge needs a CUDA build of torch: OURS_PYTHON (default .venv/bin/python) is used if it sees a GPU,
# else a venv is made at $GPU_VENV (default .venv-gpu) with torch==$TORCH_OURS from the default index (a
# CUDA build on Linux) and this checkout. The peers' environment is bench/setup_env.sh's ($CLIPFORGE_BENCH_ENV,
# default ../benchenv), created if missing; its torch from PyPI is a CUDA build too.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-docs/benchmarks-gpu.md}"
peers_env="${CLIPFORGE_BENCH_ENV:-$root/../benchenv}"
ours="${OURS_PYTHON:-$root/.venv/bin/python}"
sees_gpu() { [ -x "$1" ] && "$1" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }

if ! sees_gpu "$ours"; then
    ours_venv="${GPU_VENV:-$root/.venv-gpu}"
    if ! sees_gpu "$ours_venv/bin/python"; then
        echo "making $ours_venv: clipforge with a CUDA build of torch"
        python3 -m venv "$ours_venv"
        "$ours_venv/bin/python" -m pip install --quiet "torch==${TORCH_OURS:-2.13.0}"
        "$ours_venv/bin/python" -m pip install --quiet -e .
    fi
    ours="$ours_venv/bin/python"
fi
sees_gpu "$ours" || { echo "no CUDA GPU visible to torch in $ours" >&2; exit 1; }
if ! sees_gpu "$peers_env/bin/python"; then
    bench/setup_env.sh "$peers_env"
fi
"$ours" -c "import torch; print('GPU:', torch.cuda.get_device_name())"

# One GPU; CPU threads for the data pipeline and tokenizer rows as the machine has them.
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
time "$ours" -m bench all --device cuda --peers-env "$peers_env" --ours-python "$ours" --out "$out"
