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


def segment_job(checkpoint, device, planes: dict, scale, cache):
    """Worker body: load (or reuse) the predictor, run it once per plane, return
    ``({plane prefix: Detections}, thresholds)``.

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
