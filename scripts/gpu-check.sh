#!/usr/bin/env bash
# The GPU checks of issue 6 in one run, on a machine with an NVIDIA GPU, CUDA and PyTorch but
# no Rust toolchain (the device tool's machine). Build the binary first, here:
#
#   scripts/build-cuda.sh                       # leaves target/gpu/kollava.xz
#   # then, on the GPU machine, carrying target/gpu:
#   scripts/gpu-check.sh                        # results under $OUT
#
# In order of importance, each step under its own time limit so that a short lease still
# returns the first ones:
#   1. CUDA parity: `kollava verify --device cuda` on every fixture against its reference
#      (the same keys and tolerances the CPU passes);
#   2. `kollava bench` on a random-weight llava-1.5-7b (llava-hf layout) in bf16: time to
#      first token, decode tokens/s against the GPU's copy bandwidth;
#   3. transformers bf16 on the same checkpoint and GPU (scripts/bench_hf.py), the peer;
#   4. the same checkpoint quantized to q4_k, benched;
#   5. training on the GPU: the training benchmark's model (`init-random --arch bench-train`),
#      full finetuning on `data synth` data, batch 4, 6 steps (metrics.jsonl has samples/s);
#   6. with two GPUs, the same run on 2 ranks under `--shard full` (skipped on one).
# ARCH, REPEAT, WORK and BIN override the defaults below.
set -uo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-llava-1.5-7b}
REPEAT=${REPEAT:-3}
WORK=${WORK:-/tmp/kollava-gpu}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
if [ -z "${BIN:-}" ]; then
  BIN=$WORK/kollava
  python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" \
    target/gpu/kollava.xz "$BIN" && chmod +x "$BIN"
fi
LOG="$OUT/log.txt"
step() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

# The CUDA libraries candle loads: wherever the machine's CUDA and its Python wheels keep them.
wheel_libs=$(python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = {d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))}
dirs |= {d for r in roots for d in glob.glob(os.path.join(r, "torch", "lib"))}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${wheel_libs}:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

step "device"
nvidia-smi -L 2>&1 | tee "$OUT/gpu.txt"
ldd "$BIN" 2>&1 | grep -i "not found" | tee -a "$LOG"

step "1. CUDA parity on the fixtures"
for fx in tests/fixtures/llava-*; do
  name=$(basename "$fx")
  timeout 120 "$BIN" verify --device cuda --model "$fx" --reference "$fx" >"$OUT/verify-$name.txt" 2>&1
  echo "$name rc=$? $(tail -1 "$OUT/verify-$name.txt")" | tee -a "$LOG"
done

step "2. $ARCH in bf16"
MODEL="$WORK/$ARCH"
[ -f "$MODEL/config.json" ] || timeout 300 "$BIN" init-random --arch "$ARCH" --layout hf --dtype bf16 --out "$MODEL" 2>&1 | tail -1 | tee -a "$LOG"
timeout 300 "$BIN" bench --model "$MODEL" --image tests/fixtures/images/photo.jpg --dtype bf16 --repeat "$REPEAT" --json >"$OUT/bench-bf16.json" 2>"$OUT/bench-bf16.err"
echo "rc=$? $(cat "$OUT/bench-bf16.json")" | tee -a "$LOG"

step "3. transformers bf16 on the same GPU"
timeout 300 python3 scripts/bench_hf.py --model "$MODEL" --image tests/fixtures/images/photo.jpg \
  --device cuda --repeat "$REPEAT" >"$OUT/bench-hf.json" 2>"$OUT/bench-hf.err"
echo "rc=$? $(tail -1 "$OUT/bench-hf.json")" | tee -a "$LOG"

step "4. q4_k"
[ -d "$WORK/q4k" ] || timeout 300 "$BIN" quantize --type q4_k "$MODEL" "$WORK/q4k" 2>&1 | tail -1 | tee -a "$LOG"
timeout 300 "$BIN" bench --model "$WORK/q4k" --image tests/fixtures/images/photo.jpg --repeat "$REPEAT" --json >"$OUT/bench-q4k.json" 2>"$OUT/bench-q4k.err"
echo "rc=$? $(cat "$OUT/bench-q4k.json")" | tee -a "$LOG"
step "5. training on the GPU (bench-train, full finetuning)"
TRAIN="$WORK/bench-train"
[ -f "$TRAIN/config.json" ] || timeout 120 "$BIN" init-random --arch bench-train --out "$TRAIN" 2>&1 | tail -1 | tee -a "$LOG"
[ -d "$WORK/synth" ] || timeout 120 "$BIN" data synth --out "$WORK/synth" --count 32 --test-count 0 2>&1 | tail -1 | tee -a "$LOG"
train() {
  "$BIN" train --stage finetune --version llava_v1 --model "$TRAIN" --data "$WORK/synth/finetune.json" \
    --image-folder "$WORK/synth/images" --per-device-batch-size 4 --max-steps 6 "$@"
}
rm -rf "$WORK/train-1"
timeout 300 train --output-dir "$WORK/train-1" >"$OUT/train-1.txt" 2>&1
echo "rc=$? $(tail -1 "$WORK/train-1/metrics.jsonl" 2>/dev/null)" | tee -a "$LOG"
cp "$WORK/train-1/metrics.jsonl" "$OUT/train-1.jsonl" 2>/dev/null

step "6. two ranks, --shard full"
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  rm -rf "$WORK/train-2"
  timeout 300 train --nproc 2 --shard full --output-dir "$WORK/train-2" >"$OUT/train-2.txt" 2>&1
  echo "rc=$? $(tail -1 "$WORK/train-2/metrics.jsonl" 2>/dev/null)" | tee -a "$LOG"
  cp "$WORK/train-2/metrics.jsonl" "$OUT/train-2.jsonl" 2>/dev/null
else
  echo "skipped: one GPU" | tee -a "$LOG"
fi
step "done"
