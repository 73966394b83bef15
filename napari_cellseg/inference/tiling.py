"""Predict images much larger than the model size in overlapping tiles, stitch the instances.

The image is normalised once (as a whole, so every tile sees the same intensity scale), then cut
into ``tile x tile`` windows (in network pixels, i.e. after the model's resize and ``scale``)
that overlap by ``overlap`` pixels. The grid's *core* regions partition the image: the boundary
between two neighbouring tiles lies in the middle of their overlap. A detection is kept only by
the tile whose core holds its box centre, so a cell on a tile border comes out once, from the
tile that sees it whole (true whenever ``overlap`` >= the largest object). A final class-agnostic
box NMS across tiles (the model's own ``nms_thresh``) removes what is left of objects larger than
the overlap. The result is ONE :class:`~napari_cellseg.inference.predictor.Detections` in global image
coordinates (boxes, scores, 28x28 probabilities), so ``to_labels`` and the sliders work
unchanged. Only one tile's features exist at a time: memory is bounded by the tile size.

Geometry and stitching only: the loop that runs the network tile by tile is
:func:`napari_cellseg.inference.pipeline.iter_tiled`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from napari_cellseg.options import TILE_OVERLAP, TILE_SIZE  # defaults: with options.tile_settings

__all__ = ["TILE_SIZE", "TILE_OVERLAP", "Tile", "tile_grid", "axis_tiles", "core_keep",
           "merge_detections", "needs_tiling", "image_tiles"]



@dataclass(frozen=True)
class Tile:
    """One window ``[y0:y1, x0:x1]`` and its core ``[cy0:cy1, cx0:cx1]`` (image pixels)."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: float
    cy1: float
    cx0: float
    cx1: float


def axis_tiles(length: int, tile: int, overlap: int) -> list[tuple[int, int, float, float]]:
    """Windows along one axis: ``(start, end, core_start, core_end)``; cores partition [0, length]."""
    length, tile, overlap = int(length), int(tile), int(overlap)
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"tile size must be > overlap >= 0, got tile {tile}, overlap {overlap}")
    if length <= tile:
        return [(0, length, 0.0, float(length))]
    step = tile - overlap
    n = math.ceil((length - tile) / step) + 1
    starts = [min(i * step, length - tile) for i in range(n)]
    ends = [s + tile for s in starts]
    cuts = [0.0] + [(starts[i + 1] + ends[i]) / 2.0 for i in range(n - 1)] + [float(length)]
    return [(starts[i], ends[i], cuts[i], cuts[i + 1]) for i in range(n)]


def tile_grid(shape, tile: int, overlap: int) -> list[Tile]:
    """Row-major grid of overlapping tiles covering an image of ``shape`` (H, W)."""
    rows = axis_tiles(shape[0], tile, overlap)
    cols = axis_tiles(shape[1], tile, overlap)
    return [Tile(y0, y1, x0, x1, cy0, cy1, cx0, cx1)
            for y0, y1, cy0, cy1 in rows for x0, x1, cx0, cx1 in cols]


def core_keep(boxes: np.ndarray, t: Tile, shape) -> np.ndarray:
    """Bool mask of global ``boxes`` whose centre lies in the tile's core (half-open, last closed)."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    in_x = (cx >= t.cx0) & ((cx < t.cx1) | (t.cx1 >= shape[1]))
    in_y = (cy >= t.cy0) & ((cy < t.cy1) | (t.cy1 >= shape[0]))
    return in_x & in_y


def merge_detections(parts: list, shape, nms_iou: float | None = 0.5):
    """Concatenate per-tile Detections (already global and core-filtered) -> one Detections."""
    from napari_cellseg.inference.detections import Detections

    parts = [p for p in parts if len(p)]
    if not parts:
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 28, 28)), shape,
                          labels=np.zeros(0, np.int64))
    boxes = np.concatenate([p.boxes for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    probs = np.concatenate([p.probs for p in parts])
    labels = np.concatenate([p.labels if p.labels is not None else np.ones(len(p), np.int64)
                             for p in parts])
    if nms_iou is not None and len(parts) > 1 and len(scores) > 1:
        import torch
        from torchvision.ops import nms

        keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), float(nms_iou)).numpy()
        keep.sort()
        boxes, scores, probs, labels = boxes[keep], scores[keep], probs[keep], labels[keep]
    return Detections(boxes, scores, probs, shape, labels=labels)


def needs_tiling(shape, factor: float, tile: int | None) -> bool:
    """True when the image, resized by ``factor``, is larger than ``tile`` on either side."""
    return bool(tile) and max(shape[0], shape[1]) * factor > int(tile)


def image_tiles(shape, factor: float, tile: int = TILE_SIZE, overlap: int = TILE_OVERLAP) -> list[Tile]:
    """The grid in image pixels for ``tile`` / ``overlap`` given in network pixels at ``factor``."""
    tile_img = max(int(round(tile / factor)), 1)
    overlap_img = min(int(round(overlap / factor)), tile_img - 1)
    return tile_grid(shape, tile_img, overlap_img)
