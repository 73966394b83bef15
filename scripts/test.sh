#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite, GUI tests included, on a virtual screen.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_API="${QT_API:-pyqt6}"  # the binding setup.sh installs (qtpy would prefer a PyQt5 already there)
export CELLSEG_NO_SKIPS=1  # everything is installed: a skipped test is a failure
exec xvfb-run -a -s "-screen 0 1600x1000x24" python3 -m pytest -ra "$@"
