#!/usr/bin/env bash
# The ONE command a session with a lent GPU runs for issue 13 (docs/GPU.md): the acceptance run
# (scripts/gpu_check.sh --wheels .gpu_wheels), then the predict and data benchmarks, each step under
# its own time limit and all of it inside one overall budget, so one hung step cannot eat the lease.
# Every step's output is printed and saved under OUT ($OUT on the device machine; at most 8 files):
#   gpu_run.txt (everything)  env.txt  gpu_check.txt  bench_predict.txt  bench_data.txt
#   runs.tar.gz (log.csv / config.json / training logs of each check run; no checkpoints)  summary.txt
# summary.txt (the CHECK lines and the benchmarks' key figures) is printed last.
#
#   bash scripts/gpu_run.sh                          # on the GPU machine (expected ~6-7 min; budget 520 s)
#   bash scripts/gpu_run.sh --device cpu --out DIR   # rehearsal here: tiny gpu_check, CPU benchmarks, small
#   options: --budget S (overall seconds, default 520)  --steps "env check predict data" (a subset, to rerun)
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda; DEST="${OUT:-}"; BUDGET=520; STEPS="env check predict data"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2;; --out) DEST="$2"; shift 2;; --budget) BUDGET="$2"; shift 2;;
    --steps) STEPS="$2"; shift 2;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0;;
    *) echo "gpu_run.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[ -n "$DEST" ] || { echo "gpu_run.sh: no output folder: set OUT or pass --out DIR" >&2; exit 2; }
mkdir -p "$DEST" || exit 2
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
export PYTHON="$PY" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export GPU_CHECK_SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"  # where gpu_check.sh installs the wheels
export PYTHONPATH="$REPO:$GPU_CHECK_SITE:${PYTHONPATH:-}"      # so the benchmarks see them too
WORK=/tmp/gpu_run_work; rm -rf "$WORK"
ALL="$DEST/gpu_run.txt"; : >"$ALL"
START=$SECONDS
step() {  # step NAME LIMIT_S FILE CMD... : runs CMD under min(LIMIT_S, what is left of the budget)
  local name=$1 limit=$2 file=$3 left rc t0=$SECONDS; shift 3
  left=$((BUDGET - (SECONDS - START) - 25))  # 25 s kept for packing and the summary
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name: SKIPPED, the budget is spent" | tee -a "$ALL"; return; fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$ALL"
  set -o pipefail
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$DEST/$file" | tee -a "$ALL"
  rc=$?
  set +o pipefail
  echo "== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ", STOPPED at its time limit")" | tee -a "$ALL"
}
env_info() {
  date -u +%FT%TZ; uname -m; nproc; free -g | head -2
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$PYTHON" - <<'PY'
import importlib.util, sys
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}, bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
for m in ("torchvision", "timm", "skimage", "tifffile", "pandas", "matplotlib", "cv2", "yaml", "scipy", "numpy",
          "albumentations", "pydantic"):
    spec = importlib.util.find_spec(m)
    v = getattr(__import__(m), "__version__", "?") if spec else "MISSING"
    print(f"  {m} {v}")
PY
}
export -f env_info  # timeout runs programs: env_info goes through bash -c
for s in $STEPS; do
  case "$s" in
    env) step env 60 env.txt bash -c env_info;;
    check)
      if [ "$DEVICE" = cpu ]; then step check 600 gpu_check.txt bash scripts/gpu_check.sh --device cpu --work "$WORK"
      elif ls .gpu_wheels/*.whl >/dev/null 2>&1; then
        step check 380 gpu_check.txt bash scripts/gpu_check.sh --wheels .gpu_wheels --work "$WORK"
      else step check 380 gpu_check.txt bash scripts/gpu_check.sh --work "$WORK"; fi;;
    predict)
      if [ "$DEVICE" = cpu ]; then step predict 240 bench_predict.txt "$PY" benchmarks/bench_predict.py --repeat 1 --skip-memory
      else step predict 90 bench_predict.txt "$PY" benchmarks/bench_predict.py --device cuda --repeat 3 --throughput 200 --batch-size 8; fi;;
    data) step data 75 bench_data.txt "$PY" benchmarks/bench_data.py --quick;;
    *) echo "gpu_run.sh: unknown step $s (env check predict data)" | tee -a "$ALL";;
  esac
done
[ -d "$WORK" ] && tar -C "$WORK" -czf "$DEST/runs.tar.gz" --exclude='*.bin' --exclude='*.ckpt' --exclude='*.tif' . 2>/dev/null
{
  echo "gpu_run summary ($(date -u +%FT%TZ), device $DEVICE, $((SECONDS - START)) s in all):"
  grep -h "^gpu_check: torch\|^CHECK \|^gpu_check: done" "$DEST/gpu_check.txt" 2>/dev/null
  grep -hE "^device|same masks|predict\+labels|images/s|items/s|PASS|FAIL" "$DEST/bench_predict.txt" \
    "$DEST/bench_data.txt" 2>/dev/null | head -24
  grep -h "^== .*exit [^0]\|SKIPPED" "$ALL"
} | tee "$DEST/summary.txt"
