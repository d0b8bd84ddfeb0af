#!/usr/bin/env bash
# Builds kollava with the `cuda` feature on a machine without a GPU (nvcc and the CUDA
# libraries from PyPI wheels) and leaves a stripped, xz-compressed binary in
# target/gpu/kollava.xz, small enough to carry to a GPU machine that has no Rust toolchain,
# where scripts/gpu-check.sh unpacks and runs it.
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
"$VENV/bin/pip" install -q "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand==10.4.*"
CU=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")

# candle links the CUDA libraries by name (cudarc's dynamic-linking): the linker wants
# unversioned names, which the wheels do not ship, and the driver's libcuda, which comes
# with a GPU driver only. LINK gets the symlinks and a stub libcuda (soname libcuda.so.1,
# every driver symbol cudarc uses, empty): at run time the machine's real driver is loaded.
LINK=target/cuda-link
mkdir -p "$LINK"
for lib in cudart cublas cublasLt nvrtc curand; do
  ln -sf "$(ls "$CU"/lib/lib$lib.so.* | head -1)" "$LINK/lib$lib.so"
done
cuda_build() {
  PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} LIBRARY_PATH=$LINK:$CU/lib \
    NVCC_APPEND_FLAGS="-I$CU/include/cccl" CARGO_TARGET_DIR=target/cuda \
    cargo build --release --locked --features cuda "$@"
}
if [ ! -f "$LINK/libcuda.so" ]; then
  cuda_build -p kollava-model  # builds cudarc, whose rlib names the driver symbols
  nm -u target/cuda/release/deps/libcudarc-*.rlib 2>/dev/null | awk '{print $2}' | grep -E '^cu[A-Z]' |
    sort -u | sed 's/.*/void &(void) {}/' >"$LINK/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
fi
cuda_build -p kollava

# Stripped, the binary is about 73 MB (candle's kernels are in it); xz brings it to about
# 11 MB, under the device tool's 64 MiB carry limit. gpu-check.sh unpacks it.
mkdir -p target/gpu
strip -o target/gpu/kollava.tmp target/cuda/release/kollava
echo "its CUDA libraries (found on the GPU machine):"
ldd target/gpu/kollava.tmp | grep -Ei 'cuda|cublas|curand|nvrtc' || true
xz -T0 -6 -c target/gpu/kollava.tmp >target/gpu/kollava.xz.tmp
rm target/gpu/kollava.tmp
mv target/gpu/kollava.xz.tmp target/gpu/kollava.xz
echo "target/gpu/kollava.xz: $(du -h target/gpu/kollava.xz | cut -f1)"
