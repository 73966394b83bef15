"""Where the model is likely wrong: a per-image and a per-cell uncertainty from the network
output already kept (:class:`~napari_cellseg.inference.detections.Detections`: boxes, scores and
28x28 mask probabilities, candidates below ``box_conf`` included down to the model's
``box_score_thresh``), optionally with a second pass of the same image (horizontally flipped,
mapped back: :func:`second_pass`).

Per candidate (every row of the Detections) three signals in [0, 1]:

* **score**: how close its box score is to ``box_conf`` (a coin flip whether it is drawn);
* **mask**: the share of its mask in the ambiguous probability band (a soft, unsure outline);
* **pass**: 1 - its IoU with the best-matching cell of the second pass (no second pass: 0).

A drawn cell's uncertainty combines the three. The image's is an expected error rate: the
uncertainty of its drawn cells plus the weight of the candidates just below the threshold (cells
it may have missed) and the cells of the second pass this pass does not have, over the number
of cells. An image where nothing is drawn is as uncertain as its strongest candidate is close to
the threshold: "found nothing" is certain only when the model saw nothing at all.

numpy only (torch through Detections' pasting and the second pass's runner).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_cellseg.inference.detections import Detections
from napari_cellseg.options import Thresholds

__all__ = ["Uncertainty", "score", "second_pass", "flip_detections", "candidate_signals", "SCORE_BAND",
           "MISS_BAND", "MASK_BAND", "NOTHING_FOUND"]

SCORE_BAND = 0.35  # a drawn cell this far (in box score) above box_conf is no longer doubtful
MISS_BAND = 0.5  # a candidate this far below box_conf no longer counts as a cell maybe missed
MASK_BAND = 0.25  # mask probabilities within this of the mask threshold are ambiguous
NOTHING_FOUND = 0.9  # an image without any drawn cell: found nothing is no proof of no cell


@dataclass
class Uncertainty:
    """``image``: one number in [0, 1] (higher = more likely wrong); ``cells``: one per drawn
    cell, index ``i`` = label id ``i + 1`` (0 for a cell no detection explains)."""

    image: float
    cells: np.ndarray

    def doubtful_order(self) -> np.ndarray:
        """Label ids, most doubtful first (ties: lower id first)."""
        return np.argsort(-self.cells, kind="stable") + 1


def _score_closeness(scores: np.ndarray, box_conf: float) -> np.ndarray:
    return np.clip(1.0 - np.abs(scores - box_conf) / SCORE_BAND, 0.0, 1.0)


def _mask_ambiguity(probs: np.ndarray, mask_threshold: float) -> np.ndarray:
    """Per mask: ambiguous pixels (|p - t| < MASK_BAND) over the mask's area (p > t), in [0, 1]."""
    if len(probs) == 0:
        return np.zeros(0, np.float32)
    flat = probs.reshape(len(probs), -1)
    amb = np.count_nonzero(np.abs(flat - mask_threshold) < MASK_BAND, axis=1)
    area = np.count_nonzero(flat > mask_threshold, axis=1)
    return np.clip(amb / np.maximum(area, 1) / 2.0, 0.0, 1.0).astype(np.float32)


def _best_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For every id 1..a.max() of label image ``a``: the best IoU with a cell of ``b``."""
    n = int(a.max())
    out = np.zeros(n, np.float64)
    if n == 0 or not b.any():
        return out
    fa, fb = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    area_a = np.bincount(fa, minlength=n + 1)
    area_b = np.bincount(fb)
    both = (fa > 0) & (fb > 0)
    pair = fa[both] * (int(fb.max()) + 1) + fb[both]
    keys, inter = np.unique(pair, return_counts=True)
    ia, ib = keys // (int(fb.max()) + 1), keys % (int(fb.max()) + 1)
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    np.maximum.at(out, ia - 1, iou)
    return out


def candidate_signals(detections: Detections, thresholds: Thresholds) -> dict:
    """The per-row signals ``score`` and ``mask`` (arrays over ``len(detections)``)."""
    return {"score": _score_closeness(detections.scores, thresholds.box_conf),
            "mask": _mask_ambiguity(detections.probs, thresholds.mask_threshold)}


def _cell_rows(detections: Detections, thresholds: Thresholds, labels):
    """``(label image, row of each label id or -1)``: ``labels`` if given (each id mapped to the
    detection row whose drawn cell overlaps it most), else drawn from ``detections``."""
    drawn, rows = detections.to_labels(thresholds, return_rows=True)
    if labels is None:
        return drawn, np.asarray(rows, np.int64)
    labels = np.asarray(labels)
    if labels.shape != drawn.shape:
        raise ValueError(f"labels {labels.shape} and detections {drawn.shape} differ in size")
    n = int(labels.max(initial=0))
    out = np.full(n, -1, np.int64)
    if n and drawn.any():
        fl, fd = labels.ravel().astype(np.int64), drawn.ravel().astype(np.int64)
        both = (fl > 0) & (fd > 0)
        m = int(fd.max()) + 1
        keys, counts = np.unique(fl[both] * m + fd[both], return_counts=True)
        order = np.lexsort((-counts, keys // m))  # per label id, the largest overlap first
        first = np.unique(keys[order] // m, return_index=True)[1]
        best = keys[order][first]
        out[best // m - 1] = np.asarray(rows)[best % m - 1]
    return labels, out


def score(detections: Detections, thresholds: Thresholds, *, labels: np.ndarray | None = None,
          second: Detections | None = None) -> Uncertainty:
    """Image and per-cell uncertainty of ``detections`` drawn with ``thresholds``.

    ``labels``: the label image shown (drawn from these detections, possibly edited; default:
    drawn here); ``second``: Detections of a second pass of the same image (:func:`second_pass`).

    cell = 1 - (1 - score)(1 - mask)(1 - pass); image = 1 - (1 - cells)(1 - missed), where
    cells = the mean cell uncertainty (the second pass's cells this pass lacks count as doubtful
    cells too) and missed = the candidates below box_conf, each weighted by its closeness to
    it (MISS_BAND), as a share of the cells. Nothing drawn: NOTHING_FOUND, raised towards 1 by
    the strongest candidate.
    """
    th = Thresholds.from_dict(thresholds)
    lab, rows = _cell_rows(detections, th, labels)
    sig = candidate_signals(detections, th)
    n_cells = len(rows)
    known = rows >= 0
    per = {k: np.zeros(n_cells) for k in ("score", "mask", "pass")}
    per["score"][known] = sig["score"][rows[known]]
    per["mask"][known] = sig["mask"][rows[known]]
    lacking = 0.0
    if second is not None:
        other = second.to_labels(th)
        per["pass"] = np.where(known, 1.0 - _best_iou(lab, other), 0.0)
        theirs = 1.0 - _best_iou(other, lab)  # the second pass's cells, unmatched here
        lacking = float(theirs.sum())
    cells = 1.0 - (1.0 - per["score"]) * (1.0 - per["mask"]) * (1.0 - per["pass"])
    cells[~known] = 0.0  # a cell no detection explains was drawn by hand
    below = detections.scores < th.box_conf
    near = np.clip(1.0 - (th.box_conf - detections.scores[below]) / MISS_BAND, 0.0, 1.0)
    if n_cells == 0:  # nothing drawn: doubtful, the more so the closer a candidate came
        strongest = float(near.max(initial=0.0))
        return Uncertainty(NOTHING_FOUND + (1.0 - NOTHING_FOUND) * strongest, np.zeros(0, np.float32))
    cell_part = (float(cells.sum()) + lacking) / (n_cells + lacking)
    missed = float(near.sum())
    image = 1.0 - (1.0 - cell_part) * (1.0 - missed / (n_cells + missed))
    return Uncertainty(float(np.clip(image, 0.0, 1.0)), cells.astype(np.float32))


def second_pass(runner_or_pipeline, image, *, scale: float | str | None = None) -> Detections:
    """The image predicted again horizontally flipped, the boxes and masks mapped back.

    ``runner_or_pipeline``: a :class:`~napari_cellseg.inference.pipeline.Pipeline` (its size,
    tiling and thresholds), or a Runner / Predictor (wrapped in a default Pipeline).
    ``image``: an array or a path, as ``Pipeline.predict`` takes it. ``scale``: the first
    pass's (``detections.scale``: no second size search), default the pipeline's."""
    from napari_cellseg.inference.pipeline import Pipeline

    pipe = runner_or_pipeline if isinstance(runner_or_pipeline, Pipeline) else Pipeline(runner_or_pipeline)
    from napari_cellseg.io.images import read_raw

    raw = np.asarray(image) if isinstance(image, np.ndarray) else read_raw(image)
    # the image as stored, flipped (X is axis 1 of HxW and HxWxC): the pipeline's input rule
    # then sees the same values as in the first pass
    dets = pipe.predict(np.ascontiguousarray(raw[:, ::-1]), scale=scale)
    return flip_detections(dets)


def flip_detections(dets: Detections) -> Detections:
    """Detections of a horizontally flipped image, mapped back onto the original."""
    w = dets.image_shape[1]
    boxes = dets.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - dets.boxes[:, 2], w - dets.boxes[:, 0]
    out = Detections(boxes, dets.scores, dets.probs[:, :, ::-1].copy(), dets.image_shape,
                     labels=dets.labels, scale=dets.scale)
    out.diameter = dets.diameter
    return out
