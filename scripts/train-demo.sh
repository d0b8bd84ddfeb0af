#!/usr/bin/env bash
# Reproduces the bundled demo model, models/kollava-demo, from nothing but this repository:
# synthetic data, a tokenizer, random weights, stage 1 (projector) and stage 2 (everything,
# the vision tower included), then the held-out accuracy. About 20 minutes on 2 CPU cores.
#
#   scripts/train-demo.sh [OUT]        (default OUT: models/kollava-demo)
#
# Intermediate files go to $WORK (default target/demo-work).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/kollava-demo}
WORK=${WORK:-target/demo-work}
EPOCHS=${EPOCHS:-10}
K=target/release/kollava

cargo build --release --locked
rm -rf "$WORK"
mkdir -p "$WORK"
start=$(date +%s)

# 1. Data: 6000 training images (captions + multi-turn Q&A) and a held-out split.
$K data synth --out "$WORK/data" --seed 1 --count 6000 --test-count 60
# 2. A BPE vocabulary for that text, in the format the model is trained with.
$K tokenizer train --data "$WORK/data/pretrain.json" --data "$WORK/data/finetune.json" \
  --template llava_v1 --vocab-size 1024 --out "$WORK/tokenizer"
# 3. Random weights: 4-layer LLaMA (128 wide), 64-px ViT with 8-px patches, mlp2x_gelu.
$K init-random --arch demo --tokenizer "$WORK/tokenizer" --dtype f32 --seed 1 --out "$WORK/init"
# 4. Stage 1: the projector alone on captions.
$K train --stage pretrain --model "$WORK/init" --data "$WORK/data/pretrain.json" \
  --image-folder "$WORK/data/images" --version plain --per-device-batch-size 16 \
  --epochs 1 --lr 2e-3 --output-dir "$WORK/stage1"
# 5. Stage 2: language model, projector and vision tower on the conversations.
$K train --stage finetune --model "$WORK/init" --projector "$WORK/stage1/mm_projector.safetensors" \
  --version llava_v1 --tune-vision-tower --data "$WORK/data/finetune.json" \
  --image-folder "$WORK/data/images" --per-device-batch-size 16 --epochs "$EPOCHS" --lr 1e-3 \
  --warmup-ratio 0.03 --save-steps 250 --save-total-limit 1 --save-dtype f16 \
  --output-dir "$WORK/stage2"
end=$(date +%s)

# 6. The result, without the training by-products, replaces OUT in one rename.
rm -rf "$OUT.partial"
mkdir -p "$OUT.partial"
for f in "$WORK/stage2"/*; do
  case "$(basename "$f")" in checkpoint-*|metrics.jsonl) ;; *) cp -r "$f" "$OUT.partial/" ;; esac
done
cp "$WORK/stage2/metrics.jsonl" "$OUT.partial/training-metrics.jsonl"
$K plot "$OUT.partial/training-metrics.jsonl" -o "$OUT.partial/training-curves.png"
rm -rf "$OUT"
mv "$OUT.partial" "$OUT"

# 7. Accuracy on questions about images generated with a seed never used in training.
$K data synth --out "$WORK/heldout" --seed 999 --count 0 --test-count 60
echo "training took $(( (end - start) / 60 )) min $(( (end - start) % 60 )) s"
du -sh "$OUT"
$K eval synth --model "$OUT" --data "$WORK/heldout"
