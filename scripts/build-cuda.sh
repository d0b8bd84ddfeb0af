#!/usr/bin/env bash
# Builds kollava with the `cuda` feature on a machine without a GPU (nvcc and the CUDA
# libraries from PyPI wheels, as the README describes) and leaves a stripped binary in
# target/gpu/kollava, small enough to carry to a GPU machine that has no Rust toolchain,
# where scripts/gpu-check.sh runs it.
#
#   scripts/build-cuda.sh            # ~30 min the first time on 2 cores, incremental after
#
# CUDA_COMPUTE_CAP (default 90, Hopper) picks the architecture candle's kernels are built for.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/cuda-venv
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
# Pinned to one minor version: a newer nvvm writes PTX that the 13.0 ptxas and older
# drivers reject.
"$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
  "nvidia-cublas==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
CU=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")

PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} LIBRARY_PATH=$CU/lib \
  NVCC_APPEND_FLAGS="-I$CU/include/cccl" CARGO_TARGET_DIR=target/cuda \
  cargo build --release --locked --features cuda -p kollava

mkdir -p target/gpu
strip -o target/gpu/kollava.tmp target/cuda/release/kollava
mv target/gpu/kollava.tmp target/gpu/kollava
echo "target/gpu/kollava: $(du -h target/gpu/kollava | cut -f1); its CUDA libraries:"
ldd target/gpu/kollava | grep -Ei 'cuda|cublas|curand|nvrtc' || echo "  (none linked: loaded at run time)"
