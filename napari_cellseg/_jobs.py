"""Worker bodies of the Segment widget (run in napari thread workers; no Qt here).

* :func:`load_torch_job` imports torch and the predictor off the GUI thread and reads the chosen
  checkpoint's thresholds (without building the model), so the sliders show them before any run;
* :func:`segment_job` loads (or reuses) the predictor and runs it plane by plane;
* :func:`calibrate_job` measures the cells' diameter (the pipeline's "auto" size estimate).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .channels import prepare


def checkpoint_thresholds(checkpoint) -> dict:
    """The thresholds stored in a checkpoint (defaults filled in), without building the model.

    Raises CheckpointError / OptionError naming the file."""
    from .checkpoint import read_checkpoint
    from .options import Thresholds

    obj = read_checkpoint(checkpoint)
    stored = obj.get("thresholds") if "state_dict" in obj else None
    return Thresholds.from_dict(stored, where=f"{checkpoint}: thresholds").to_dict()


def load_torch_job(checkpoint=None):
    """Import torch + the predictor (slow the first time), then the checkpoint's thresholds.

    Returns ``(thresholds dict or None, error message or None)``. ``_torch_guard.block_triton``
    must have run in the GUI thread first."""
    from ._torch_guard import import_torch

    import_torch()
    from . import predict  # noqa: F401  (torchvision, timm: the slow part)

    if not checkpoint:
        return None, None
    try:
        return checkpoint_thresholds(checkpoint), None
    except ValueError as exc:  # CheckpointError / OptionError: one line naming the file
        return None, str(exc)


from .progress import relay_map as relay  # noqa: E402  (the one relay loop: progress.py)


def _predictor(checkpoint, device, cache):
    from .predict import Predictor

    path = Path(checkpoint)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0, device)
    predictor = cache.get(key)
    if predictor is None:
        predictor = Predictor.from_checkpoint(path, device=device)
        cache.clear()  # one model in memory at a time
        cache[key] = predictor
    return predictor


def segment_job(checkpoint, device, planes: dict, diameter, cache, channel="all", invert=False):
    """Worker body: load (or reuse) the predictor, run it once per plane, return
    ``({plane prefix: Detections}, thresholds)``. ``diameter``: cell size in image px, "auto",
    or None for the model's default (see ``Predictor.resolve_scale``).

    ``planes`` maps a plane prefix (``()`` for a 2D image) to its 2D array; a plane is read only
    when its turn comes, so a lazy (dask/zarr) stack is never loaded whole. Each plane goes
    through ``channels.prepare(channel, invert)`` first. Progress events carry the overall
    fraction and "plane i/n"; the worker can be cancelled between any two events.
    """
    yield {"stage": "loading model", "fraction": 0.0}
    predictor = _predictor(checkpoint, device, cache)
    scale = predictor.resolve_scale(None, diameter)
    out, n = {}, len(planes)
    for i, (prefix, array) in enumerate(planes.items()):
        where = f"plane {i + 1}/{n}: " if n > 1 else ""
        gen = predictor.iter_predict(prepare(np.asarray(array), channel, invert), scale=scale)
        out[prefix] = yield from relay(gen, lambda e, i=i, where=where: {
            **e, "stage": where + str(e.get("stage", "")), "fraction": (i + float(e.get("fraction", 0.0))) / n})
    return out, dict(predictor.thresholds)


def calibrate_job(checkpoint, device, image, cache, channel="all", invert=False):
    """Worker body of "Calibrate": the median cell diameter (image px) from the pipeline's
    automatic size estimate, and the resize factor that diameter gives (the same rule as typing
    it into the diameter box). Returns ``(diameter or None, scale or None, cells found)``."""
    yield {"stage": "loading model", "fraction": 0.0}
    predictor = _predictor(checkpoint, device, cache)
    gen = predictor.iter_predict(prepare(np.asarray(image), channel, invert), scale="auto")
    dets = yield from relay(gen, lambda e: {**e, "stage": "measuring: " + str(e.get("stage", ""))})
    diameter = getattr(dets, "diameter", None)
    if not diameter:
        return None, None, 0
    diameter = float(round(diameter))
    th = predictor.thresholds
    n = int(dets.to_labels(th["box_conf"], th["mask_threshold"], th.get("min_area", 0)).max())
    return diameter, float(predictor.scale_for_diameter(diameter)), n
