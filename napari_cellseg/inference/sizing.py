"""Object size, like cellpose's diameter: the rules that turn a size into a resize factor.

A model trained with ``--diameter D`` (``ModelConfig.diameter``) saw cells ~D px across; other
models get DEFAULT_DIAMETER as their reference (``Runner.reference_diameter``). Typing a
diameter ``d`` means the factor ``reference / d``; ``scale="auto"`` measures the cells in a first
pass and predicts again (the loop is :func:`napari_cellseg.inference.pipeline.iter_auto_scale`; the
decisions are here: :func:`next_auto_scale`, :func:`clamp_scale`). The size messages users see
are written here too, so "estimated at 24 px: resized x1.67" is exactly what typing 24 gives.
The size estimate measures the cells with the model's own stored thresholds
(:func:`size_thresholds`), never the user's: a slider or ``--box-conf`` changes which cells are
kept, not the size the image is predicted at (so ``cellseg tune``'s mAP is what ``cellseg
predict`` gives with the thresholds tune reports).

Rules only: numbers in, numbers out. The functions that take ``predictor`` only read its
``reference_diameter`` / ``size_normalised`` / ``thresholds``; nothing here runs the network.
"""

from __future__ import annotations

import math

import numpy as np

from napari_cellseg.inference.runner import DEFAULT_DIAMETER, PredictError
from napari_cellseg.options import SCALE_RANGE, Thresholds, valid_diameter, valid_scale  # PredictOptions uses them too

__all__ = ["AUTO_PASSES", "AUTO_SCALE_RANGE", "SCALE_RANGE", "DEFAULT_DIAMETER", "check_scale",
           "clamp_scale", "scale_for_diameter", "diameter_for_scale", "resolve_scale",
           "describe_scale", "next_auto_scale", "size_message", "size_thresholds"]

AUTO_PASSES = 4  # scale="auto": most network passes per image
AUTO_SCALE_RANGE = (0.25, 4.0)  # the size-normalisation clamp: auto size and training's resize
_SETTLED = math.log(1.2)  # auto size stops when the next factor is within 20 % of this one


def size_thresholds(predictor) -> Thresholds:
    """The detection settings of the size estimate: the model's own (the checkpoint's stored
    thresholds), whatever thresholds the user predicts with."""
    stored = getattr(predictor, "thresholds", None)
    return Thresholds.from_dict(stored, where="the model's thresholds")


def check_scale(scale) -> None:
    """A scale is a finite factor within SCALE_RANGE, or "auto" (PredictError otherwise)."""
    if isinstance(scale, str):
        if scale != "auto":
            raise PredictError(f"scale must be a number or 'auto', got {scale!r}")
        return
    if valid_scale(scale) is None:
        raise PredictError(f"scale must be between {SCALE_RANGE[0]} and {SCALE_RANGE[1]:g}, got {scale}")


def clamp_scale(scale: float) -> float:
    """The 0.25-4 clamp of size normalisation (auto size; training's per-image resize)."""
    return float(np.clip(float(scale), *AUTO_SCALE_RANGE))


def scale_for_diameter(predictor, diameter: float) -> float:
    """The factor that brings objects of ``diameter`` image px to the model's size."""
    reference = predictor.reference_diameter
    if valid_diameter(diameter) is None:
        raise PredictError(f"diameter must be a positive number of pixels, got {diameter}")
    scale = reference / float(diameter)
    if valid_scale(scale) is None:
        raise PredictError(f"diameter {diameter:g} px would resize the image x{scale:.3g} for this "
                           f"model (objects ~{reference:.0f} px); give a diameter "
                           f"between {reference / SCALE_RANGE[1]:.3g} and "
                           f"{reference / SCALE_RANGE[0]:.0f} px")
    return scale


def diameter_for_scale(predictor, scale: float) -> float:
    """The diameter (image px) that :func:`scale_for_diameter` turns into ``scale``."""
    return predictor.reference_diameter / float(scale)


def resolve_scale(predictor, scale: float | None = None, diameter: float | str | None = None) -> float | str:
    """The CLI's and widget's size options -> a scale. An explicit ``scale`` wins; ``diameter``
    is the objects' size in image px or "auto"; with neither, "auto" for models trained with
    size normalisation (``config.diameter``, e.g. the demo), else 1."""
    if scale is not None:
        check_scale(scale)
        return float(scale)
    if diameter is None:
        return "auto" if predictor.size_normalised else 1.0
    if isinstance(diameter, str) and diameter == "auto":
        return "auto"
    return scale_for_diameter(predictor, float(diameter))


def describe_scale(predictor, scale: float | str) -> str:
    """One line for users: which object size the images are predicted at."""
    ref = predictor.reference_diameter
    if scale == "auto":
        why = f"the model was trained at objects ~{ref:.0f} px across" if predictor.size_normalised else \
            f"no trained size in this model: objects are brought to ~{ref:.0f} px"
        return f"estimated per image ({why})"
    if not predictor.size_normalised:
        return f"scale {float(scale):.3g}"
    return f"scale {float(scale):.3g} (objects ~{ref / float(scale):.0f} px across suit this model best)"


def next_auto_scale(reference: float, scale: float, diameter: float, tried) -> float | None:
    """Auto size: the factor of the next pass after measuring ``diameter`` (image px) at
    ``scale``, or None when the size has settled. The factor comes from the rounded diameter
    (``reference / round(diameter)``), so the size message's "estimated at N px" is exactly what
    typing N gives."""
    new = clamp_scale(reference / max(round(float(diameter)), 1))
    if abs(math.log(new / scale)) < _SETTLED or round(new, 3) in tried:
        return None
    return new


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def size_message(detections, reference: float, unit: str = "planes") -> str:
    """What users read after a run, from the Detections of one image or of every plane of a
    stack: the factor reported is the one used, and the size is the one that factor stands for
    (typing it gives the same factor). Stacks give their range and plane count (``unit``).
    Anything with ``.scale`` and ``.diameter`` will do (cellseg predict passes a summary per image)."""
    dets = [d for d in (detections if isinstance(detections, (list, tuple)) else [detections])
            if d is not None]
    if not dets:
        return ""
    scales = sorted(float(d.scale) for d in dets)
    auto = any(getattr(d, "diameter", None) for d in dets)
    lo, hi = scales[0], scales[-1]
    if len(dets) == 1 or round(lo, 2) == round(hi, 2):
        factor = f"x{_fmt(lo)}"
        size = f"{reference / lo:.0f} px"
    else:
        factor = f"x{_fmt(lo)}-x{_fmt(hi)}"
        size = f"{reference / hi:.0f}-{reference / lo:.0f} px"
    planes = f" ({len(dets)} {unit})" if len(dets) > 1 else ""
    if auto:
        return f"Cell size estimated at {size}: image resized {factor}{planes}."
    return f"Image resized {factor}{planes}." if (lo, hi) != (1.0, 1.0) else ""
