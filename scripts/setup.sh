#!/usr/bin/env bash
# Install everything napari-cellseg needs on a fresh Debian/Ubuntu machine:
# system libraries for Qt/OpenGL under Xvfb, then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES=(xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0
  libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1)
if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
fi
# torch first, at the build this machine has cached: the package asks only for ranges
# (torch>=2.4, torchvision>=0.19), and with these already installed pip keeps them instead of
# fetching another build. Override with TORCH_PINS="torch==X torchvision==Y" (or "" to let pip choose).
TORCH_PINS="${TORCH_PINS-torch==2.14.1 torchvision==0.29.1}"
if [ -n "$TORCH_PINS" ]; then
  # shellcheck disable=SC2086  # one word per requirement
  python3 -m pip install -q --disable-pip-version-check $TORCH_PINS
fi
# PyQt6: napari-cellseg pins no Qt binding; the "qt" extra brings the supported one
python3 -m pip install -q --disable-pip-version-check -e ".[test,qt]"
