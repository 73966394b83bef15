"""Small persistent settings (last checkpoint, recent files, last export) as a json file, and
the worker body of a Segment run. No Qt here.

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
    from .atomic import atomic_write

    data = {**load_settings(), **update}
    try:
        settings_path().parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(settings_path()) as f:
            json.dump(data, f, indent=1)
    except OSError:  # a read-only home must not break segmentation
        pass


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


def segment_job(checkpoint, device, planes: dict, diameter, cache):
    """Worker body: load (or reuse) the predictor, run it once per plane, return
    ``({plane prefix: Detections}, thresholds)``. ``diameter``: cell size in image px, "auto",
    or None for the model's default (see ``Predictor.resolve_scale``).

    ``planes`` maps a plane prefix (``()`` for a 2D image) to its 2D array; a plane is read only
    when its turn comes, so a lazy (dask/zarr) stack is never loaded whole. Progress events carry
    the overall fraction and "plane i/n"; the worker can be cancelled between any two events.
    """
    import numpy as np

    from .predict import Predictor

    path = Path(checkpoint)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0, device)
    predictor = cache.get(key)
    if predictor is None:
        yield {"stage": "loading model", "fraction": 0.0}
        predictor = Predictor.from_checkpoint(path, device=device)
        cache.clear()  # one model in memory at a time
        cache[key] = predictor
    scale = predictor.resolve_scale(None, diameter)
    out, n = {}, len(planes)
    for i, (prefix, array) in enumerate(planes.items()):
        where = f"plane {i + 1}/{n}: " if n > 1 else ""
        gen = predictor.iter_predict(np.asarray(array), scale=scale)
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                out[prefix] = stop.value
                break
            frac = (i + float(event.get("fraction", 0.0))) / n
            yield {**event, "stage": where + str(event.get("stage", "")), "fraction": frac}
    return out, dict(predictor.thresholds)
