#!/usr/bin/env bash
# Create scripts/reference/.venv (git-ignored): CPU-usable PyTorch + transformers + gguf + numpy + safetensors + sentencepiece,
# all versions pinned. Idempotent: a venv whose stamp matches this script and that imports cleanly is kept.
#
# Why the odd torch install: no CPU-only wheel index is reachable from here, and PyPI's Linux torch wheel links
# against the CUDA runtime libraries even to run on CPU. So torch is installed with --no-deps together with the
# nvidia-* wheels whose shared libraries libtorch_cuda.so links (cuBLAS, cuDNN, NCCL, ...), and its ordinary
# Python dependencies. triton, cuda-bindings, the cuda-toolkit meta package, nvtx and cccl are not needed on CPU
# and are skipped (pip check will name them as missing; that is expected). Anything torch-dependent
# (accelerate) is likewise installed with --no-deps, or pip would pull CUDA and triton back in.
# Download about 2.6 GiB; the venv is about 4.5 GiB.
#
#   scripts/reference/setup_venv.sh          # then use scripts/reference/.venv/bin/python
#   FORCE=1 scripts/reference/setup_venv.sh  # rebuild from scratch
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3}"

# Installed with --no-deps (torch and what links or imports it).
NODEPS_PINS=(
    torch==2.15.0
    nvidia-cublas==13.4.1.3
    nvidia-cuda-runtime==13.2.86
    nvidia-cuda-nvrtc==13.2.86
    nvidia-cuda-cupti==13.2.86
    nvidia-cufft==12.2.0.57
    nvidia-cufile==1.17.1.22
    nvidia-cusolver==12.2.0.11
    nvidia-cusparse==12.7.10.12
    nvidia-nvjitlink==13.5.37
    nvidia-cudnn-cu13==9.26.0.51
    nvidia-cusparselt-cu13==0.8.1
    nvidia-nccl-cu13==2.30.7
    nvidia-nvshmem-cu13==3.7.2
    accelerate==1.15.0
)

# Installed normally; none of these depends on torch. Fully pinned (the closure as resolved on 2026-11-29).
PINS=(
    # torch's ordinary dependencies
    filelock==4.3.1
    typing_extensions==4.16.0
    setuptools==84.2.1
    sympy==1.14.0
    mpmath==1.3.0
    networkx==3.6.1
    Jinja2==3.1.6
    MarkupSafe==3.0.4
    fsspec==2026.9.0
    # accelerate's
    psutil==7.2.2
    # the reference stack
    transformers==5.24.0
    tokenizers==0.23.3
    safetensors==0.8.0
    gguf==0.19.0
    numpy==2.4.6
    sentencepiece==0.2.3
    protobuf==7.36.2
    huggingface_hub==2.4.0
    # their dependencies
    annotated-doc==0.0.7
    annotated-types==0.8.0
    anyio==4.16.0
    certifi==2026.10.19.post1
    charset-normalizer==3.5.3
    click==8.5.1
    h11==0.16.0
    hf-xet==1.8.0
    httpcore2==2.16.2
    httpx2==2.16.2
    idna==3.20
    markdown-it-py==4.3.0
    mdurl==0.1.2
    packaging==26.4
    pydantic==2.14.4
    pydantic_core==2.50.5
    Pygments==2.21.0
    PyYAML==6.0.4
    regex==2026.11.19
    requests==2.34.2
    rich==15.0.0
    shellingham==1.5.4
    tqdm==4.70.1
    truststore==0.10.5
    typer==0.29.2
    typing-inspection==0.4.5
    urllib3==2.8.0
)

say() { echo "setup_venv: $*"; }

STAMP_WANT="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
STAMP_FILE="$VENV/.mode-setup-stamp"

if [ "${FORCE:-0}" = "1" ] && [ -d "$VENV" ]; then
    say "FORCE=1: removing $VENV"
    rm -rf "$VENV"
fi

if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP_WANT" ] \
    && "$VENV/bin/python" -c "import torch, transformers, gguf, numpy, safetensors, accelerate" 2>/dev/null; then
    say "up to date: $VENV"
    "$VENV/bin/python" -c "import torch, transformers; print('setup_venv: torch', torch.__version__, '/ transformers', transformers.__version__)"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

say "installing torch + CUDA runtime wheels + accelerate with --no-deps: ${NODEPS_PINS[*]}"
"${PIP[@]}" install --no-deps "${NODEPS_PINS[@]}"

say "installing pinned pure dependencies: ${PINS[*]}"
"${PIP[@]}" install "${PINS[@]}"

say "checking imports"
OMP_WAIT_POLICY=PASSIVE "$VENV/bin/python" - <<'PY'
import torch, transformers, gguf, numpy, safetensors, accelerate, tokenizers
x = torch.randn(64, 64)
assert torch.allclose(x @ torch.eye(64), x)
print("setup_venv: torch", torch.__version__, "| transformers", transformers.__version__,
      "| tokenizers", tokenizers.__version__, "| gguf", getattr(gguf, "__version__", "0.19.0"),
      "| numpy", numpy.__version__, "| safetensors", safetensors.__version__,
      "| accelerate", accelerate.__version__, "| MKL", torch.backends.mkl.is_available())
PY

echo "$STAMP_WANT" > "$STAMP_FILE"
say "done: $VENV"
