#!/usr/bin/env bash
# Install (scripts/setup.sh) and open napari with a sample image and the Segment cells widget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# qtpy would pick an older PyQt5 left in the environment first; napari deprecates it
export QT_API="${QT_API:-pyqt6}"
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
  echo "no display found: starting napari on a virtual screen (xvfb-run)" >&2
  exec xvfb-run -a -s "-screen 0 1600x1000x24" cellseg demo "$@"
fi
exec cellseg demo "$@"
