#!/usr/bin/env bash
# Creates the peers' environment for the benchmark suite (python -m bench): OpenCLIP, HF transformers,
# OpenAI's clip (clip-anytorch) and instant-clip-tokenizer, with torchvision, which they need and clipforge
# does not. clipforge itself also runs in it, from this checkout's src/ (the "clipforge on the peers' torch"
# column), so it gets clipforge's runtime dependencies too. The versions are the ones the published results
# were measured with; override them with the variables below.
#
#   bench/setup_env.sh [ENV_DIR]     # default: $CLIPFORGE_BENCH_ENV, else ../benchenv (beside the checkout)
#   PYTHON=python3.11 TORCH="torch==2.14.1 torchvision==0.29.1" bench/setup_env.sh /tmp/benchenv
#   python -m bench all --peers-env ENV_DIR --out docs/benchmarks.md
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_dir="${1:-${CLIPFORGE_BENCH_ENV:-$root/../benchenv}}"
python="${PYTHON:-python3}"
torch_spec="${TORCH:-torch==2.14.1 torchvision==0.29.1}"
peers_spec="${PEERS:-open_clip_torch==3.3.0 transformers==5.24.0 clip-anytorch==2.6.0 instant-clip-tokenizer==0.1.1}"
# OpenAI's clip imports pkg_resources, which setuptools 81 removed.
peers_spec="$peers_spec setuptools<81"
# OpenCLIP's trainer (bench/openclip_baseline.py) needs these; open_clip_train 3.3.0 fails with
# webdataset >= 0.2.96 (KeyError 'fname' on its end-of-shard marker: webdataset#384, open_clip#935).
peers_spec="$peers_spec braceexpand pandas webdataset==0.2.86"
# clipforge's runtime dependencies (pyproject.toml), minus webdataset/matplotlib/tqdm: the suite's driver
# and the data-pipeline benchmark run in clipforge's own environment.
clipforge_deps="numpy pillow safetensors tokenizers ftfy regex pyarrow"

echo "creating the peers' environment in $env_dir with $("$python" --version 2>&1)"
"$python" -m venv "$env_dir"
pip=("$env_dir/bin/python" -m pip install --quiet)
"${pip[@]}" --upgrade pip
# torch first and alone, so that the libraries below cannot pull in a different build.
# shellcheck disable=SC2086  # the specs are lists of requirements
"${pip[@]}" $torch_spec
# shellcheck disable=SC2086
"${pip[@]}" $peers_spec $clipforge_deps

"$env_dir/bin/python" - <<'PY'
import clip, instant_clip_tokenizer, open_clip, open_clip_train, torch, torchvision, transformers  # noqa: F401
print(f"ok: torch {torch.__version__}, torchvision {torchvision.__version__}, open_clip {open_clip.__version__}, "
      f"transformers {transformers.__version__}")
PY
echo "run: python -m bench all --peers-env $env_dir --out docs/benchmarks.md"
