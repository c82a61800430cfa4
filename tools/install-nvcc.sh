#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler from the Python package registry into a private virtual
# environment (it compiles kernels on a machine without a GPU; nothing runs), libclang, which
# build.rs uses (bindgen) to turn the kernels' argument headers into Rust, and the NVTX headers
# (profiler ranges). Prints nvcc's path.
# build.rs finds both there by itself; or export NVCC to the printed path.
set -euo pipefail
venv="${RRRA_CACHE:-${HOME:-/tmp}/.cache/rrra}/nvcc-venv"
pip_install() {
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" >&2
}
nvcc=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1 || true)
if [ -z "$nvcc" ]; then
  echo "installing nvcc 13.0 into $venv ..." >&2
  pip_install nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-nvtx==13.0.85
  nvcc=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n 1)
fi
if ! ls "$venv"/lib/python3*/site-packages/clang/native/libclang.so >/dev/null 2>&1; then
  echo "installing libclang into $venv ..." >&2
  pip_install libclang==18.1.1
fi
if ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/include/nvtx3 >/dev/null 2>&1; then
  pip_install nvidia-nvtx==13.0.85
fi
echo "$nvcc"
