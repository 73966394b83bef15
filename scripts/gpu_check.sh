#!/usr/bin/env bash
# The project's GPU acceptance run. One summary line per check ("CHECK name: PASS|FAIL|SKIP ...");
# SKIP: the check cannot run here (no CUDA to compare with; the speed bar on a --tiny run), never a
# pass. Exit status = number of failed checks. No network (backbone from random weights); needs torch,
# torchvision, timm, scikit-image, tifffile, pandas, matplotlib; albumentations (+ its pure-Python
# dependencies) may come as wheels: --wheels DIR installs DIR/*.whl into a private folder first.
#
#   scripts/gpu_check.sh                      # CUDA, the default recipe on synthetic 704x520 images (<= 8 min on one GPU)
#   scripts/gpu_check.sh --device cpu         # rehearsal on CPU: tiny model, 64x64 images, 24 steps (~2-3 min)
#   options: --images N (train+val images, default 64)  --epochs N (3)  --batch N (4)  --workers N (8)
#            --work DIR (default: a temp folder)  --wheels DIR  --tiny (tiny model/sizes on any device)
#            --step-limit S (seconds for each training/predict process: 180 on the GPU recipe, 900 tiny)
#   environment: PYTHON (default python3: the interpreter that has torch), GPU_CHECK_SITE (where
#   --wheels installs, default /tmp/gpu_check_site)
#
# Checks: amp-auto and amp-fp16 (default recipe, 3 epochs: train loss falls >= 30% from epoch 1 to 3,
# GradScaler skipped < 10% of the steps, no non-finite steps), resume (one more epoch from last.ckpt),
# torchrun (--nproc_per_node=1: NCCL on CUDA, gloo on CPU), cuda-vs-cpu (a trained checkpoint predicts
# the same masks on CUDA and CPU: mean per-instance IoU >= 0.98), speed (train and predict images/s).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda; N=64; EPOCHS=3; BATCH=4; WORKERS=8; WORK=""; WHEELS=""; TINY=0; LIMIT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2;; --images) N="$2"; shift 2;; --epochs) EPOCHS="$2"; shift 2;;
    --batch) BATCH="$2"; shift 2;; --workers) WORKERS="$2"; shift 2;; --work) WORK="$2"; shift 2;;
    --wheels) WHEELS="$2"; shift 2;; --tiny) TINY=1; shift;; --step-limit) LIMIT="$2"; shift 2;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
# CPU: the rehearsal. One intra-op thread per process (unless OMP_NUM_THREADS says otherwise): the fp16 CPU
# convolutions run group by group, and two OpenMP threads on two busy cores made an fp16 step 10x slower.
[ "$DEVICE" = cpu ] && { TINY=1; export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; }
PY="${PYTHON:-python3}"  # the interpreter with torch (PYTHON=... to choose another)
if [ -n "$WHEELS" ]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: --wheels $WHEELS: no .whl files there (scripts/gpu_wheels.sh DIR makes them)" >&2; exit 2; }
  SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || { echo "gpu_check.sh: cannot install the wheels in $WHEELS" >&2; exit 2; }
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
# no network: no Hugging Face look-ups, no albumentations update check (a web request at every import)
export PYTHONPATH="$REPO:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
[ -n "$WORK" ] || WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
mkdir -p "$WORK"
SIZE="520 704"; KIND=cells; DIAMETER=""; ARGS=(--backbone-weights random --batch-size "$BATCH" --workers "$WORKERS"
  --device "$DEVICE" --val-fraction 0.125 --no-figures --max-val-images 4)
if [ "$TINY" = 1 ]; then
  # Tiny: convnext_atto on 64x64 synthetic nuclei of one size (12-18 px), 8 steps of 2 images per epoch,
  # lr 2e-3, fewer proposals/ROIs (the CPU step is dominated by RoIAlign's backward over 512 sampled ROIs;
  # fp16 convolutions have no fast CPU kernel: an fp16 step costs ~3x an fp32 one). The tiny model learns
  # this data within 24 steps: its train loss falls 45-58% over 3 epochs (model seeds 1-4 in fp32, 1-2 in
  # fp16; this script's seed: 47% fp32, 51% fp16), against 2% with lr 1e-8 (no learning). Before:
  # 128x128 "cells" of 12-60 px, 6 steps, lr 1e-3: 20-30%, under the bar.
  SIZE="64 64"; KIND=nuclei; DIAMETER="12 18"; [ "$N" = 64 ] && N=8; BATCH=2
  ARGS=(--backbone-weights random --batch-size 2 --workers 1 --device "$DEVICE" --val-fraction 0.25 --no-figures
        --backbone convnext_atto --fpn-channels 32 --mask-head-channels 32 --box-head-size 128
        --rpn-pre-nms-top-n-train 300 --rpn-post-nms-top-n-train 150 --box-batch-size-per-image 128
        --rpn-pre-nms-top-n-test 100 --rpn-post-nms-top-n-test 50 --box-detections-per-img 100
        --width 0 --height 0 --anchor-sizes 8 16 32 64 128 --steps-per-epoch 8 --lr 2e-3)
fi
[ -n "$LIMIT" ] || { [ "$TINY" = 1 ] && LIMIT=900 || LIMIT=180; }
T=(timeout -k 10 "$LIMIT")  # one hung process (a collective, a worker) costs LIMIT seconds, not the whole run
echo "gpu_check: $(date -u +%FT%TZ) device $DEVICE, $N synthetic $KIND ${SIZE/ /x} (HxW) images, work dir $WORK"
"$PY" - "$WORK/data" "$N" "$KIND" $SIZE $DIAMETER <<'PY' || { echo "gpu_check: cannot make the data" >&2; exit 2; }
import os, sys
from concurrent.futures import ProcessPoolExecutor
from napari_cellseg.io.synthetic import write_dataset
out, n, kind, h, w = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
opts = {"diameter": (float(sys.argv[6]), float(sys.argv[7])), "density": 0.3} if len(sys.argv) > 6 else {}
jobs = max(1, min(n, len(os.sched_getaffinity(0)), 16))  # image i depends only on (seed, i): any split
bounds = [n * k // jobs for k in range(jobs + 1)]
with ProcessPoolExecutor(jobs) as ex:
    done = [ex.submit(write_dataset, out, b - a, kind=kind, seed=0, shape=(h, w), start=a, **opts)
            for a, b in zip(bounds, bounds[1:]) if b > a]
    names = [name for f in done for name in f.result()]
assert len(set(names)) == n, names
import torch  # after the workers: CUDA is initialised in this process only
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}")
PY
DATA=(--image-dir "$WORK/data/images" --label-dir "$WORK/data/labels")
FAILS=0; SKIPS=0
verdict() {  # verdict NAME CMD... : prints the command's one summary line; counts a FAIL / SKIP
  local line; line="$("${@:2}" 2>>"$WORK/check.err")" || true
  [ -n "$line" ] || line="FAIL (no result; see $WORK/check.err)"
  echo "CHECK $1: $line"
  case "$line" in PASS*) ;; SKIP*) SKIPS=$((SKIPS + 1));; *) FAILS=$((FAILS + 1));; esac
}
logcheck() {  # logcheck OUT : loss fall and skip fractions from OUT/log.csv
  "$PY" - "$1" "$2" "$BATCH" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1] + "/log.csv")))
need = int(sys.argv[2])
first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
steps = sum(int(r["steps"]) for r in rows)
scaler = sum(int(r["scaler_skipped"]) for r in rows)
nonfinite = sum(int(r["skipped_batches"]) for r in rows)
fall = 1 - last / first
ok = len(rows) == need and fall >= 0.30 and scaler < 0.10 * steps and nonfinite == 0
batch = int(sys.argv[3])
imgs = (sum(int(r["steps"]) for r in rows[1:]) or steps) * batch
secs = sum(float(r["train_s"]) for r in rows[1:]) or sum(float(r["train_s"]) for r in rows)
print(f"{'PASS' if ok else 'FAIL'} amp {rows[0]['amp']}: train loss {first:.3f} -> {last:.3f} ({fall:.1%} fall, "
      f"need >= 30%), scaler skipped {scaler}/{steps}, non-finite {nonfinite}, val mAP {float(rows[-1]['val_map']):.3f}, "
      f"{imgs / secs:.2f} train images/s; epoch fixed costs: loader start {rows[-1]['loader_start_s']} s, "
      f"val {rows[-1]['val_s']} s, save {rows[-1]['save_s']} s")
PY
}
run_train() {  # run_train OUT extra-args... ; the training output goes to OUT.log
  "${T[@]}" "$PY" -m training "${DATA[@]}" "${ARGS[@]}" --out "$1" "${@:2}" >"$1.log" 2>&1
}
for AMP in auto fp16; do
  if run_train "$WORK/amp-$AMP" --amp "$AMP" --epochs "$EPOCHS"; then verdict "amp-$AMP" logcheck "$WORK/amp-$AMP" "$EPOCHS"
  else echo "CHECK amp-$AMP: FAIL (exit $?; tail of $WORK/amp-$AMP.log:) $(tail -2 "$WORK/amp-$AMP.log" | tr '\n' ' ')"; FAILS=$((FAILS + 1)); fi
done
resume_check() {
  run_train "$WORK/amp-auto" --amp auto --epochs $((EPOCHS + 1)) --resume || { echo "FAIL exit $? ($(tail -1 "$WORK/amp-auto.log"))"; return; }
  "$PY" - "$WORK/amp-auto" "$((EPOCHS + 1))" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1] + "/log.csv")))
ok = [int(r["epoch"]) for r in rows] == list(range(1, int(sys.argv[2]) + 1))
print(f"{'PASS' if ok else 'FAIL'} resumed to epoch {rows[-1]['epoch']}, train loss {float(rows[-1]['train_loss']):.3f}")
PY
}
verdict resume resume_check
torchrun_check() {
  local out="$WORK/torchrun"
  "${T[@]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m training "${DATA[@]}" "${ARGS[@]}" --out "$out" --epochs 1 \
    >"$out.log" 2>&1 || { echo "FAIL exit $? ($(tail -1 "$out.log"))"; return; }
  "$PY" - "$out" <<'PY'
import sys, torch
from napari_cellseg.model.checkpoint import load_checkpoint
_, _, _, info = load_checkpoint(sys.argv[1] + "/best_model.bin")
want = "nccl" if info["device"].startswith("cuda") else "gloo"
got = info.get("ddp_backend")  # the process group the run really used (None: it ran without DDP)
print(f"{'PASS' if got == want else 'FAIL'} torchrun --nproc_per_node=1: DDP over {got} (need {want}), "
      f"world_size {info['world_size']}, device {info['device']}")
PY
}
verdict torchrun torchrun_check
predict_check() {
  "${T[@]}" "$PY" - "$WORK/amp-auto/best_model.bin" "$WORK/data/images" "$DEVICE" <<'PY'
import sys, time, glob
import numpy as np, torch
from napari_cellseg.io.images import to_rgb_float
from napari_cellseg.inference.predictor import Predictor
import tifffile
ckpt, folder, device = sys.argv[1:]
images = [to_rgb_float(tifffile.imread(p)) for p in sorted(glob.glob(folder + "/*.tif"))[:8]]
def run(dev, n):  # (predictor, detections, images/s of predict + labels at the checkpoint's thresholds)
    pred = Predictor.from_checkpoint(ckpt, device=dev)
    pred.predict(images[0])  # warm-up
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    dets = []
    for im in images[:n]:
        dets.append(pred.predict(im))
        dets[-1].to_labels(pred.thresholds.box_conf, pred.thresholds.mask_threshold)
    return pred, dets, n / (time.perf_counter() - t0)
def mean_iou(a, b):  # per-instance IoU, each instance matched to its best partner; unmatched count 0
    ious = []
    for x, y in ((a, b), (b, a)):
        ids = np.unique(x)[1:]
        for i in ids:
            m = x == i
            partners, counts = np.unique(y[m], return_counts=True)
            best = 0.0
            for p, c in zip(partners, counts):
                if p:
                    best = max(best, c / np.logical_or(m, y == p).sum())
            ious.append(best)
    return float(np.mean(ious)) if ious else 1.0, len(np.unique(a)) - 1, len(np.unique(b)) - 1
pred, dets, ips = run(device, len(images))
th = pred.thresholds
# compare real cells: the checkpoint's tuned box_conf, lowered while the first 2 images show < 5 cells
# (after 3 epochs from random weights the scores can sit low); none at all is a failure, not a match
conf = next((c for c in (th.box_conf, 0.3, 0.1, 0.05) if c <= th.box_conf and sum(d.count(c) for d in dets[:2]) >= 5),
            min(th.box_conf, 0.05))
found = sum(d.count(conf) for d in dets[:2])
if not device.startswith("cuda"):  # nothing to compare with: SKIP, unless predict itself found nothing
    print(f"{'SKIP' if found else 'FAIL'} CUDA vs CPU masks need CUDA (device {device}); predict ran: "
          f"{ips:.2f} images/s, {found} cells in 2 images at box_conf {conf:g}")
    sys.exit()
_, cpu_dets, cps = run("cpu", 2)
res = [mean_iou(a.to_labels(conf, th.mask_threshold), b.to_labels(conf, th.mask_threshold))
       for a, b in zip(dets[:2], cpu_dets)]
iou = min(r[0] for r in res)
ok = iou >= 0.98 and found > 0
print(f"{'PASS' if ok else 'FAIL'} CUDA vs CPU masks: mean per-instance IoU {iou:.4f} (need >= 0.98), "
      f"cells {[r[1] for r in res]} vs {[r[2] for r in res]} at box_conf {conf:g}; predict {ips:.2f} images/s "
      f"on {device}, {cps:.2f} on CPU")
PY
}
verdict cuda-vs-cpu predict_check
speed_check() {  # end-to-end train images/s (amp-auto, epochs after the first) vs the GPU-bound rate: the same
  # steps on one batch already on the device (no loader), as training.engine runs them
  "${T[@]}" "$PY" - "$WORK/amp-auto" "$BATCH" "$TINY" "$EPOCHS" <<'PY'
import csv, json, math, sys, time
import torch
from training.config import TrainConfig
from training.engine import build_run_model
from training.loops import resolve_amp, train_one_epoch
from training.runstate import seed_everything
from training.augment import train_pipeline
from training.data import load_samples
from training.dataset import InstanceDataset, collate
run, batch, tiny, epochs = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
rows = [r for r in csv.DictReader(open(run + "/log.csv")) if int(r["epoch"]) <= epochs]  # the resumed epoch aside
later = rows[1:] or rows
e2e = sum(int(r["steps"]) for r in later) * batch / sum(float(r["train_s"]) for r in later)
cfg = TrainConfig.from_dict(json.load(open(run + "/config.json")))
cfg.resume, cfg.init_checkpoint, cfg.out = False, None, run + "-speed"
device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else cfg.device)
amp = resolve_amp(cfg.amp, device)
seed_everything(cfg.seed)  # the training's cudnn settings (deterministic, no benchmark): a fair bound
model = build_run_model(cfg, device)
samples = load_samples(cfg)
ds = InstanceDataset(samples, train_pipeline(cfg.width, cfg.height, cfg.crop_size, tuple(cfg.scale_range), cfg.augment))
one = collate([ds[(1, i)] for i in range(batch)])
n = 12
opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, foreach=True)
scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
gen = train_one_epoch(model, [one] * (n + 2), opt, scaler, device, 1, cfg, amp)
for k, _ in enumerate(gen):
    if k == 1:  # after 2 warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
if device.type == "cuda":
    torch.cuda.synchronize()
bound = n * batch / (time.perf_counter() - t0)
ratio = e2e / bound
if tiny:  # the 80% bar is the GPU recipe's: a tiny run (CPU shared with other jobs) only measures both -> SKIP
    ok = all(math.isfinite(x) and x > 0 for x in (e2e, bound))
    print(f"{'SKIP' if ok else 'FAIL'} the >= 80% bar applies to the full GPU recipe, not --tiny; measured train "
          f"{e2e:.2f} images/s end to end vs {bound:.2f} device-bound ({ratio:.0%}), amp {amp}, batch {batch}")
else:
    print(f"{'PASS' if ratio >= 0.8 else 'FAIL'} train {e2e:.2f} images/s end to end vs {bound:.2f} GPU-bound "
          f"({ratio:.0%}, need >= 80%), amp {amp}, batch {batch}")
PY
}
verdict speed speed_check
echo "gpu_check: done, $FAILS failed check(s), $SKIPS skipped; logs and runs in $WORK"
exit "$FAILS"
