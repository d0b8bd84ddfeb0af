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
#    and bench-mpt-1b (LLaVA-MPT the size of bench-1b) with its Q4_K pair (`kollava quantize`),
# 3. runs both runtimes on the same files, interleaved, 2 threads (scripts/bench_peers.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mkdir -p "${1:-$ROOT/target/peers}" && cd "${1:-$ROOT/target/peers}" && pwd)"
KOLLAVA="$ROOT/target/release/kollava"
(cd "$ROOT" && cargo build --release)
cd "$WORK"
"$ROOT/scripts/build-llama-cpp.sh" "$WORK"
[ -f bench-1b/model.safetensors ] || "$KOLLAVA" init-random --arch bench-1b --out bench-1b
[ -d gguf-f16 ] || "$KOLLAVA" quantize --type f16 bench-1b gguf-f16
[ -d gguf-bf16 ] || "$KOLLAVA" quantize --type bf16 bench-1b gguf-bf16
[ -f bench-mpt-1b-f16/config.json ] || "$KOLLAVA" init-random --arch bench-mpt-1b --out bench-mpt-1b-f16
[ -d gguf-mpt-q4k ] || "$KOLLAVA" quantize --type q4_k bench-mpt-1b-f16 gguf-mpt-q4k
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
