#!/usr/bin/env bash
# Creates the project-local virtual environment .venv and installs monai_armed with its test dependencies.
# torch: an existing installation (visible through --system-site-packages) is left alone; otherwise the CPU build
# is installed on machines without an NVIDIA GPU, so no CUDA wheels are downloaded there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
    else
        "$VPY" -m pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
            || "$VPY" -m pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"$VPY" -m pip install -q -e ".[test]"
"$VPY" -c "import torch, monai, monai_armed; print(f'torch {torch.__version__}, monai {monai.__version__}, monai_armed {monai_armed.__version__}')"
