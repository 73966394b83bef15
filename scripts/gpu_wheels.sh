#!/usr/bin/env bash
# Download (here, where the package registry is reachable) the wheels that a GPU machine without
# network needs for scripts/gpu_check.sh: albumentations and the dependencies such a machine lacks,
# for CPython 3.12 on manylinux x86-64. The machine's image already has numpy, scipy, PyYAML,
# opencv-python-headless, torch, torchvision, timm, scikit-image, tifffile, pandas and matplotlib
# (/work/.library/device/KINDS.md lists it), so those do not travel.
#
#   scripts/gpu_wheels.sh DIR        # then: scripts/gpu_check.sh --wheels DIR  (or scripts/gpu_run.sh)
#
# Versions: the ones this project's test environment runs (pyproject.toml leaves albumentations
# unpinned; albumentations 2.0.8 pins albucore 0.0.24). typing-extensions travels too: pydantic 2.13
# needs >= 4.14.1, and the machine's own version is not known here. One version of each: pip
# --no-deps installs them all into a private folder that only gpu_check's processes see.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: scripts/gpu_wheels.sh DIR" >&2; exit 2; }
DIR="$1"
WHEELS=(
  albumentations==2.0.8   # needs numpy scipy PyYAML opencv-python-headless (on the machine) + pydantic albucore
  albucore==0.0.24        # needs numpy opencv-python-headless (on the machine) + stringzilla simsimd
  stringzilla==5.3.2
  simsimd==6.5.16
  pydantic==2.13.4        # needs annotated-types pydantic-core typing-extensions typing-inspection
  pydantic-core==2.46.4
  typing-inspection==0.4.2
  annotated-types==0.7.0
  typing-extensions==4.16.0
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p "$DIR"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" \
  -d "$DIR" "${WHEELS[@]}"
# exactly one wheel per name (two versions of one stop the whole install there), each for cp312/py3
python3 - "$DIR" "${#WHEELS[@]}" <<'PY'
import collections, pathlib, sys
names = collections.Counter()
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version, *_, py, abi, plat = w.stem.split("-")
    names[name.lower().replace("_", "-")] += 1
    ok = (py in ("py3", "cp312") or "cp312" in py.split(".")) and ("x86_64" in plat or plat == "any")
    print(f"  {w.name}  {w.stat().st_size / 1e6:.2f} MB{'' if ok else '  <- NOT cp312 x86-64'}")
    if not ok:
        sys.exit(f"gpu_wheels.sh: {w.name} is not a CPython 3.12 x86-64 wheel")
extra = [n for n, c in names.items() if c > 1]
if extra or len(names) != int(sys.argv[2]):
    sys.exit(f"gpu_wheels.sh: want {sys.argv[2]} names once each, got {dict(names)}")
PY
echo "gpu_wheels.sh: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
