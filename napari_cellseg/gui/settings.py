"""Small persistent settings (last checkpoint, recent files, last export) as a json file, and
the widget's size texts. No Qt here (the worker bodies are in ``_jobs``).

The file is ``$NAPARI_CELLSEG_CONFIG_DIR/settings.json`` (default ``~/.config/napari-cellseg``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def settings_path() -> Path:
    base = os.environ.get("NAPARI_CELLSEG_CONFIG_DIR") or Path.home() / ".config" / "napari-cellseg"
    return Path(base) / "settings.json"


def load_settings() -> dict:
    try:
        return json.loads(settings_path().read_text())
    except (OSError, ValueError):
        return {}


def save_settings(update: dict) -> None:
    from napari_cellseg.io.atomic import atomic_write

    data = {**load_settings(), **update}
    try:
        settings_path().parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(settings_path()) as f:
            json.dump(data, f, indent=1)
    except OSError:  # a read-only home must not break segmentation
        pass


MAX_RECENT = 5


def remember_checkpoint(path) -> str:
    """Put ``path`` first in the recent-checkpoints list and make it the last one used."""
    path = str(Path(path).resolve())
    recent = [path] + [p for p in load_settings().get("recent_checkpoints", []) if p != path]
    save_settings({"recent_checkpoints": recent[:MAX_RECENT], "last_checkpoint": path})
    return path


DIAMETER_TIP = ("Typical cell diameter in image pixels: the image is resized so cells have the size "
                "the model was trained at (like cellpose's diameter). 'auto' estimates it for each "
                "image from a first pass (models trained with --diameter, like the demo model; "
                "other models run at the image's own scale).")


def size_note(detections) -> str:
    """'Cell size ...' for the status line: the estimated diameter and the scale used."""
    import numpy as np

    dets = list(detections)
    diam = [d.diameter for d in dets if d.diameter]
    scales = sorted({round(d.scale, 2) for d in dets})
    scale = f"{scales[0]:g}" if len(scales) == 1 else f"{scales[0]:g}-{scales[-1]:g}"
    if diam:
        return f"Cell size estimated at {float(np.median(diam)):.0f} px: image resized x{scale}."
    return f"Image resized x{scale}." if scales != [1.0] else ""
