#!/usr/bin/env bash
# Reproduce the bundled demo model (napari_cellseg/models/demo.bin) on a CPU:
#   1. synthetic nuclei/cells + the real nuclei planes of ../shared/data (a z block held out),
#   2. cellseg-train on native-scale 224x224 crops with scale augmentation,
#   3. package best_model.bin as the demo checkpoint (fp16 weights, thresholds tuned on val).
# Usage: bash scripts/train_demo.sh [DATA_DIR] [OUT_DIR]   (about 2 hours on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-runs/demo_data}
OUT=${2:-runs/demo}
[ -d "$DATA/train" ] || python scripts/make_demo_data.py --out "$DATA" --n-synthetic 200
cellseg-train --image-dir "$DATA/train/images" --label-dir "$DATA/train/labels" --out "$OUT" \
  --backbone convnext_atto --fpn-channels 64 --mask-head-channels 64 --box-head-size 256 \
  --crop-size 224 --scale-range 0.6 1.6 --batch-size 2 --steps-per-epoch 100 --epochs 10 \
  --rpn-pre-nms-top-n-train 1000 --rpn-post-nms-top-n-train 500 --box-batch-size-per-image 128 \
  --lr 3e-4 --val-fraction 0.1 --max-val-images 8 --device cpu --seed 2025 "${@:3}"
