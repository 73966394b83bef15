"""Object size, like cellpose's diameter: which scale to predict an image at.

A model trained with ``--diameter D`` (``ModelConfig.diameter``) saw cells ~D px across; other
models get DEFAULT_DIAMETER as their reference. ``scale="auto"`` measures the cells in a first pass
and predicts again at ``reference / diameter`` (``iter_auto_scale``).
"""

from __future__ import annotations

import numpy as np

from .metrics import median_diameter
from .predict import DEFAULT_DIAMETER, PredictError, _check_scale

__all__ = ["AUTO_PASSES", "AUTO_SCALE_RANGE", "DEFAULT_DIAMETER", "scale_for_diameter", "resolve_scale",
           "describe_scale", "iter_auto_scale"]

AUTO_PASSES = 4  # scale="auto": most network passes per image
AUTO_SCALE_RANGE = (0.25, 4.0)  # scale="auto" stays within these factors


def scale_for_diameter(predictor, diameter: float) -> float:
    """The object-size scale that brings objects of ``diameter`` image px to the model's size."""
    if not (np.isfinite(diameter) and diameter > 0):
        raise PredictError(f"diameter must be a positive number of pixels, got {diameter}")
    scale = predictor.reference_diameter / float(diameter)
    if not 0.05 <= scale <= 20:
        raise PredictError(f"diameter {diameter:g} px would resize the image x{scale:.3g} for this "
                           f"model (objects ~{predictor.reference_diameter:.0f} px); give a diameter "
                           f"between {predictor.reference_diameter / 20:.3g} and "
                           f"{predictor.reference_diameter / 0.05:.0f} px")
    return scale


def resolve_scale(predictor, scale: float | None = None, diameter: float | str | None = None) -> float | str:
    """The CLI's and widget's size options -> ``scale`` for predict. An explicit ``scale``
    wins; ``diameter`` is the objects' size in image px or "auto"; with neither, "auto" for
    models trained with size normalisation (``config.diameter``, e.g. the demo), else 1."""
    if scale is not None:
        _check_scale(scale)
        return float(scale)
    if diameter is None:
        return "auto" if getattr(predictor.config, "diameter", 0.0) else 1.0
    if isinstance(diameter, str) and diameter == "auto":
        return "auto"
    return scale_for_diameter(predictor, float(diameter))


def describe_scale(predictor, scale: float | str) -> str:
    """One line for users: which object size the images are predicted at."""
    ref = predictor.reference_diameter
    sized = bool(getattr(predictor.config, "diameter", 0.0))
    if scale == "auto":
        why = f"the model was trained at objects ~{ref:.0f} px across" if sized else \
            f"no trained size in this model: objects are brought to ~{ref:.0f} px"
        return f"estimated per image ({why})"
    if not sized:
        return f"scale {float(scale):.3g}"
    return f"scale {float(scale):.3g} (objects ~{ref / float(scale):.0f} px across suit this model best)"


def iter_auto_scale(predictor, arr: np.ndarray, tile="auto"):
    """Predict at scale 1, measure the median diameter of the confident masks and predict
    again at ``reference_diameter / diameter`` until the scale settles (within 20 %). An
    image where nothing is found is retried at 2.5x (small objects) and then 0.4x (large)."""
    th = predictor.thresholds
    scale, first, found, tried = 1.0, None, None, set()
    for k in range(AUTO_PASSES):
        tried.add(round(scale, 3))
        gen = predictor._predict_array(arr, scale, tile)
        while True:
            try:
                ev = next(gen)
            except StopIteration as stop:
                dets = stop.value
                break
            yield {**ev, "stage": f"size pass {k + 1} (x{scale:.2f}): {ev.get('stage', '')}",
                   "fraction": min(0.99, (k + float(ev.get("fraction", 0.0))) / AUTO_PASSES)}
        first = dets if first is None else first  # (Detections is falsy when empty)
        diameter = median_diameter(dets.to_labels(th["box_conf"], th["mask_threshold"],
                                                  th.get("min_area", 0)))
        dets.scale, dets.diameter = scale, diameter or None
        if not diameter:
            scale = None if found is not None else {1.0: 2.5, 2.5: 0.4}.get(scale)
            if scale is None:  # nothing at this size: the last pass that found cells, if any
                return found if found is not None else first
            continue
        found = dets
        new = float(np.clip(predictor.reference_diameter / diameter, *AUTO_SCALE_RANGE))
        if abs(np.log(new / scale)) < np.log(1.2) or round(new, 3) in tried:
            return dets
        scale = new
    return dets
