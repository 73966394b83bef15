"""A cell from a user's box or click, with the model's own heads.

* :func:`segment_box`: Mask R-CNN's ROI path with a user box. The image is prepared exactly as
  prediction prepares it (images.py's normalisation, the runner's resize factor), the backbone
  runs once on a window around the box, and the box goes through ``roi_heads.mask_roi_pool``
  (torchvision's MultiScaleRoIAlign) and the mask head; the 28x28 probabilities are pasted with
  the geometry of every other prediction (``Detections.to_labels``).
* :func:`promote_click`: the best candidate below ``box_conf`` (kept in the Detections) whose mask
  covers the click; None when there is none, and the caller falls back to
  ``segment_box(runner, image, box_around(yx, diameter))``.
"""

from __future__ import annotations

import math

import numpy as np

from napari_cellseg.inference.detections import Detections
from napari_cellseg.options import Thresholds

__all__ = ["segment_box", "promote_click", "box_around", "PromptError"]

CONTEXT = 1.0  # the backbone window reaches this many box sizes beyond the box on each side
MIN_CONTEXT = 32  # ... and at least this many network pixels


class PromptError(ValueError):
    """A box or click that cannot be used (outside the image, empty, not finite)."""


def box_around(yx: tuple[float, float], diameter: float,
               shape: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """The (y0, x0, y1, x1) box of side ``diameter`` centred on the click ``yx`` (clipped to
    ``shape`` when given)."""
    d = float(diameter)
    if not math.isfinite(d) or d <= 0:
        raise PromptError(f"diameter must be a number of pixels > 0, got {diameter!r}")
    y, x = (float(v) for v in yx)
    box = (y - d / 2, x - d / 2, y + d / 2, x + d / 2)
    if shape is None:
        return box
    h, w = shape[:2]
    return (max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(h)), min(box[3], float(w)))


def _check_box(box, shape) -> tuple[float, float, float, float]:
    try:
        y0, x0, y1, x1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise PromptError(f"box must be four numbers (y0, x0, y1, x1), got {box!r}") from None
    if not all(math.isfinite(v) for v in (y0, x0, y1, x1)):
        raise PromptError(f"box must be finite, got {box!r}")
    y0, y1 = sorted((y0, y1))
    x0, x1 = sorted((x0, x1))
    h, w = shape
    y0, x0, y1, x1 = max(y0, 0.0), max(x0, 0.0), min(y1, float(h)), min(x1, float(w))
    if y1 - y0 < 1 or x1 - x0 < 1:
        raise PromptError(f"box {tuple(box)} is empty or outside the {w}x{h} image")
    return y0, x0, y1, x1


def _factor(runner, pipeline, shape, box, scale) -> float:
    """The resize factor prediction would use: an explicit ``scale``, else the pipeline's
    numeric scale, else (size-normalised models, scale "auto") the box's own size."""
    from napari_cellseg.inference.sizing import clamp_scale

    if scale is None and pipeline is not None and not isinstance(pipeline.scale, str):
        scale = pipeline.scale
    if scale is None or isinstance(scale, str):
        if runner.size_normalised:
            side = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
            scale = clamp_scale(runner.reference_diameter / max(side, 1.0))
        else:
            scale = 1.0
    return runner.base_factor(shape) * float(scale)


def segment_box(runner, image: np.ndarray, box: tuple[float, float, float, float], *,
                scale: float | None = None, thresholds: Thresholds | None = None) -> np.ndarray:
    """Bool (H, W) mask of the cell in ``box`` = (y0, x0, y1, x1) image pixels, by the mask head.

    ``runner``: a Runner / Predictor, or a Pipeline (its scale and thresholds are used).
    ``image``: the image as the user has it (any dtype; normalised here as for prediction)
    or a path. ``scale``: the object-size factor (default: the pipeline's; for "auto" and
    size-normalised models, the box's size). The mask keeps its largest piece and the pixels of
    the mask threshold (``thresholds`` or the pipeline's / runner's)."""
    import torch

    from napari_cellseg.inference.pipeline import Pipeline, as_image

    pipeline = runner if isinstance(runner, Pipeline) else None
    r = pipeline.runner if pipeline is not None else runner
    th = Thresholds.from_dict(thresholds if thresholds is not None else
                              (pipeline.thresholds if pipeline is not None else r.thresholds))
    arr = pipeline.as_image(image) if pipeline is not None else as_image(image)
    shape = arr.shape[:2]
    y0, x0, y1, x1 = _check_box(box, shape)
    factor = _factor(r, pipeline, shape, (y0, x0, y1, x1), scale)
    pad = max(CONTEXT * max(y1 - y0, x1 - x0), MIN_CONTEXT / factor)
    wy0, wx0 = int(max(0, math.floor(y0 - pad))), int(max(0, math.floor(x0 - pad)))
    wy1, wx1 = int(min(shape[0], math.ceil(y1 + pad))), int(min(shape[1], math.ceil(x1 + pad)))
    window = np.ascontiguousarray(arr[wy0:wy1, wx0:wx1])
    with torch.inference_mode():
        images, _ = r.prepare([window], [factor])
        feats = r.features(images)
        nh, nw = images.image_sizes[0]
        sy, sx = nh / window.shape[0], nw / window.shape[1]
        net_box = torch.tensor([[(x0 - wx0) * sx, (y0 - wy0) * sy, (x1 - wx0) * sx, (y1 - wy0) * sy]])
        probs = r.box_masks(images, feats, [net_box])
    dets = Detections(np.array([[x0, y0, x1, y1]], np.float32), np.ones(1, np.float32), probs, shape)
    return dets.to_labels(box_conf=0.0, mask_threshold=th.mask_threshold, fill_holes=th.fill_holes,
                          keep_largest=True) > 0


def promote_click(detections: Detections, thresholds: Thresholds, yx: tuple[float, float],
                  labels: np.ndarray | None = None) -> np.ndarray | None:
    """Bool (H, W) mask of the best-scoring candidate below ``box_conf`` whose mask (at the mask
    threshold) covers the click ``yx`` (image pixels), or None.

    With ``labels`` (the cells shown), the mask gives up the pixels of existing cells, and a
    candidate that would keep less than half of its pixels (a duplicate of a shown cell) is
    passed over."""
    th = Thresholds.from_dict(thresholds)
    h, w = detections.image_shape
    y, x = (float(v) for v in yx)
    if not (0 <= y < h and 0 <= x < w):
        return None
    iy, ix = int(y), int(x)
    if labels is not None and np.shape(labels) != (h, w):
        raise PromptError(f"labels {np.shape(labels)} and detections {(h, w)} differ in size")
    b = detections.boxes
    rows = np.flatnonzero((detections.scores < th.box_conf) & (b[:, 0] <= x + 1) & (b[:, 2] >= x)
                          & (b[:, 1] <= y + 1) & (b[:, 3] >= y))
    for row in rows:  # scores are sorted: the first that fits is the best
        one = Detections(b[row:row + 1], np.ones(1, np.float32), detections.probs[row:row + 1],
                         (h, w))
        mask = one.to_labels(box_conf=0.0, mask_threshold=th.mask_threshold,
                             fill_holes=th.fill_holes, keep_largest=True) > 0
        if not mask[iy, ix]:
            continue
        if labels is not None:
            free = mask & (np.asarray(labels) == 0)
            if not free[iy, ix] or free.sum() * 2 < mask.sum():
                continue
            mask = free
        return mask
    return None
