#!/usr/bin/env bash
# kollava against llama.cpp, side by side on this machine (see BENCHMARKS.md).
#   scripts/bench-peers.sh [WORK]      (WORK default: target/peers; ~25 min the first time)
#   ROUNDS=N (default 4), ONLY=Q4_K_M,BF16 (some configurations only)
#   HF=1: transformers bf16 beside them on BF16 (installs torch + transformers from PyPI into
#   WORK/hf-venv the first time: about 6 GB with torch's CUDA libraries)
# 1. builds llama.cpp (the llama-cpp-python 0.3.36 sdist from PyPI, as ../shared/peers does):
#    llama-mtmd-cli, llama-bench, llama-quantize and llama-server (scripts/bench_turns.py),
# 2. writes the bench-1b model with `kollava init-random`, then the GGUF pairs with
#    `kollava quantize` (F16, BF16) and llama.cpp's own `llama-quantize` (Q4_K_M from the F16),
# 3. runs both runtimes on the same files, interleaved, 2 threads (scripts/bench_peers.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mkdir -p "${1:-$ROOT/target/peers}" && cd "${1:-$ROOT/target/peers}" && pwd)"
KOLLAVA="$ROOT/target/release/kollava"
(cd "$ROOT" && cargo build --release)
cd "$WORK"
# (re)built when a tool is missing, e.g. llama-server in a build directory made before it was added
if [ ! -x llama-build/bin/llama-mtmd-cli ] || [ ! -x llama-build/bin/llama-server ]; then
  [ -x tools/bin/cmake ] || { python3 -m venv tools && tools/bin/pip install -q cmake ninja; }
  export PATH="$WORK/tools/bin:$PATH"
  SDIST=llama_cpp_python-0.3.36.tar.gz
  if [ ! -f "$SDIST" ]; then
    # the file the index lists, located through pip's own index constant (no registry host here)
    VER=0.3.36 OUTF="$SDIST" tools/bin/python - <<'PY'
import os, re, urllib.parse, urllib.request
from pip._internal.models.index import PyPI
v = os.environ["VER"]; simple = PyPI.simple_url.rstrip("/") + "/llama-cpp-python/"
page = urllib.request.urlopen(simple).read().decode()
href = re.search(r'href="([^"#]*llama_cpp_python-%s\.tar\.gz)' % re.escape(v), page).group(1)
urllib.request.urlretrieve(urllib.parse.urljoin(simple, href), os.environ["OUTF"] + ".part")
os.replace(os.environ["OUTF"] + ".part", os.environ["OUTF"])
PY
  fi
  [ -d llama_cpp_python-0.3.36 ] || tar -xzf "$SDIST"
  cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B llama-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
  ninja -C llama-build -j2 llama-mtmd-cli llama-bench llama-quantize llama-server
fi
[ -f bench-1b/model.safetensors ] || "$KOLLAVA" init-random --arch bench-1b --out bench-1b
[ -d gguf-f16 ] || "$KOLLAVA" quantize --type f16 bench-1b gguf-f16
[ -d gguf-bf16 ] || "$KOLLAVA" quantize --type bf16 bench-1b gguf-bf16
if [ ! -d gguf-q4km ]; then
  mkdir -p gguf-q4km.tmp && cp gguf-f16/mmproj-bench-1b-F16.gguf gguf-q4km.tmp/
  llama-build/bin/llama-quantize gguf-f16/bench-1b-F16.gguf gguf-q4km.tmp/bench-1b-Q4_K_M.gguf Q4_K_M 2
  mv gguf-q4km.tmp gguf-q4km
fi
HF_ARGS=()
if [ "${HF:-0}" = 1 ]; then
  hf-venv/bin/python -c 'import torch, transformers' 2>/dev/null || {
    python3 -m venv hf-venv
    hf-venv/bin/pip install -q torch==2.15.0 "transformers==5.24.*" safetensors pillow numpy
  }
  HF_ARGS=(--hf-python "$WORK/hf-venv/bin/python")
fi
python3 "$ROOT/scripts/bench_peers.py" --kollava "$KOLLAVA" --llama-bin llama-build/bin --work "$WORK" \
  --image "${IMAGE:-$ROOT/examples/shapes.png}" --threads 2 --repeat "${REPEAT:-3}" --rounds "${ROUNDS:-4}" \
  --out "$WORK/bench-peers.json" ${ONLY:+--only "$ONLY"} "${HF_ARGS[@]}"
