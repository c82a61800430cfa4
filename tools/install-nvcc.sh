#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler from the Python package registry into a private virtual
# environment (it compiles kernels on a machine without a GPU; nothing runs). Prints nvcc's path.
# build.rs finds it there by itself; or export NVCC to the printed path.
set -euo pipefail
venv="${RRRA_CACHE:-${HOME:-/tmp}/.cache/rrra}/nvcc-venv"
nvcc=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1 || true)
if [ -z "$nvcc" ]; then
  echo "installing nvcc 13.0 into $venv ..." >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
  nvcc=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n 1)
fi
echo "$nvcc"
