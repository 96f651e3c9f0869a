#!/usr/bin/env bash
# Installs everything loom needs, idempotently: Debian packages and a Python venv
# outside the checkout (its torch wheel carries libtorch, loom's tensor library).
# Quick when everything is already there. Usage: launch/setup.sh
set -euo pipefail

LOOM_VENV=${LOOM_VENV:-$HOME/.cache/loom/venv}
TORCH_VERSION=2.11.0
DEBIAN_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  # LLVM's linker: links each libtorch executable ~5x faster than GNU ld.
  lld
  openmpi-bin libopenmpi-dev
  # `loom launch --slurm` and its e2e tests (a one-node cluster on localhost):
  # the daemons and clients, srun's pmix plugin (in basic-plugins) and munge.
  slurm-wlm slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge
  libhdf5-dev hdf5-tools
  libyaml-cpp-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev
  libpcre2-dev
  # The tokenizer's Unicode normalizers (NFC, NFKC...) and character properties.
  libicu-dev
  # Tests only: tests/interop/test_plot.py renders `loom plot`'s SVG to PNG with rsvg-convert.
  librsvg2-bin
  # fuzz/run.sh (the fuzz_smoke test): clang with libFuzzer and the sanitizers.
  clang-14 libclang-rt-14-dev
  bible-kjv bible-kjv-text
)
PYTHON_PACKAGES=(
  "torch==${TORCH_VERSION}" transformers safetensors tokenizers h5py numpy pytest
  # Tests only: its event reader checks the TensorBoard files loom writes.
  tensorboard
  # Tests only: transformers reads llama.cpp's GGUF vocabularies (real tokenizers) with it.
  gguf
)
# llama.cpp's C++ Jinja engine (chat templates for `loom prepare --chat`; with
# the common/json and common/unicode files it uses), its real chat templates
# and its GGUF test vocabularies, from the source
# distribution of llama-cpp-python on PyPI (Debian packages no Jinja engine for
# C++). Only those folders are extracted, outside the checkout.
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_DIR=${LOOM_LLAMA_CPP_DIR:-$HOME/.cache/loom/llama.cpp/$LLAMA_CPP_PYTHON_VERSION}

say() { echo "[setup] $*"; }

missing_debian_packages() {
  local p
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

install_debian_packages() {
  local missing
  missing=$(missing_debian_packages)
  [ -z "$missing" ] && return 0
  say "installing Debian packages: $(echo $missing)"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

python_for_venv() {
  # Any python3 >= 3.10 creates the venv; the pyenv one when present.
  command -v python3
}

install_venv() {
  local stamp="$LOOM_VENV/.loom-setup-done"
  local want
  want=$(printf '%s\n' "${PYTHON_PACKAGES[@]}" | sort | tr '\n' ' ')
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$LOOM_VENV/bin/python" ]; then
    say "creating venv at $LOOM_VENV"
    mkdir -p "$(dirname "$LOOM_VENV")"
    "$(python_for_venv)" -m venv "$LOOM_VENV"
  fi
  say "installing Python packages into $LOOM_VENV (torch is large: first time takes minutes)"
  "$LOOM_VENV/bin/python" -m pip install -q --upgrade pip
  "$LOOM_VENV/bin/python" -m pip install -q "${PYTHON_PACKAGES[@]}"
  "$LOOM_VENV/bin/python" -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"
  echo "$want" > "$stamp"
}

install_llama_cpp_sources() {
  local stamp="$LLAMA_CPP_DIR/.loom-setup-done" want="common/jinja common/json common/unicode models"
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  say "fetching llama-cpp-python $LLAMA_CPP_PYTHON_VERSION's source distribution (Jinja engine, chat templates)"
  local tmp
  tmp=$(mktemp -d)
  "$LOOM_VENV/bin/python" -m pip download -q --no-binary :all: --no-deps --no-build-isolation \
    --dest "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" 2>/dev/null ||
    "$LOOM_VENV/bin/python" -m pip download -q --no-binary :all: --no-deps --dest "$tmp" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  local top="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  tar -xzf "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$tmp" \
    --wildcards "$top/LICENSE" "$top/common/jinja/*" "$top/common/json.*" "$top/common/unicode.*" \
    "$top/models/templates/*" "$top/models/ggml-vocab-*"
  rm -rf "$LLAMA_CPP_DIR"
  mkdir -p "$(dirname "$LLAMA_CPP_DIR")"
  mv "$tmp/$top" "$LLAMA_CPP_DIR"
  rm -rf "$tmp"
  echo "$want" > "$stamp"
}

install_debian_packages
install_venv
install_llama_cpp_sources
say "ok: venv $LOOM_VENV, torch $("$LOOM_VENV/bin/python" -c 'import torch; print(torch.__version__)')"
