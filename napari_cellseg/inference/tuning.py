"""Choose BOXES_CONF and MASK_THRESHOLD from measured mAP, not by eye.

One forward pass per image gives cached :class:`~napari_cellseg.inference.predictor.Detections`; the whole
box_conf x mask_threshold grid is then scored without touching the network again. Shared work is
reused across the grid:

* for one mask threshold the label image at any box_conf is the label image at the lowest
  box_conf with the lower-scoring instances removed (each pixel belongs to the highest-scoring
  instance covering it, so removing lower-scoring ones never re-assigns a pixel);
* an instance's best IoU with the ground truth does not depend on which other instances are kept;

so each mask threshold costs one ``to_labels`` and one sparse IoU pass per image, and every box_conf
is a cumulative count over instances sorted by score. This is exact without post-processing;
with ``fill_holes`` the label image is post-processed once at the lowest box_conf, so a
lower-scoring cell that a higher box_conf drops is not refilled by a cell whose hole it sat in
(rare; tests bound the difference).

Used by the training engine (thresholds stored in the checkpoint), ``cellseg tune`` and the
napari Review widget.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from napari_cellseg.inference.metrics import THRESHOLDS, overlaps
from napari_cellseg.options import Thresholds

DEFAULT_BOX_CONFS = tuple(np.round(np.arange(0.05, 1.0, 0.1), 2))  # 0.05 .. 0.95, 10 values
DEFAULT_MASK_THRESHOLDS = tuple(np.round(np.arange(0.05, 1.0, 0.1), 2))


def grid_values(n: int) -> tuple[float, ...]:
    """(also used by the Review widget) ``n`` evenly spaced bin centres in (0, 1): n=10 gives 0.05, 0.15, ..., 0.95."""
    if not 1 <= int(n) <= 100:
        raise ValueError(f"--grid must be between 1 and 100, got {n}")
    return tuple(float(v) for v in np.round((np.arange(int(n)) + 0.5) / int(n), 4))


@dataclass
class SweepResult:
    """Mean mAP over images for every (box_conf, mask_threshold) pair."""

    box_confs: np.ndarray  # (B,)
    mask_thresholds: np.ndarray  # (M,)
    map: np.ndarray  # (B, M) mean over images
    n_images: int
    best: dict = field(default_factory=dict)  # {"box_conf", "mask_threshold", "map"}

    def table(self) -> list[dict]:
        return [{"box_conf": float(b), "mask_threshold": float(m), "map": float(self.map[i, j])}
                for i, b in enumerate(self.box_confs) for j, m in enumerate(self.mask_thresholds)]

    def to_dict(self) -> dict:
        return {**self.best, "n_images": self.n_images, "table": self.table()}


def _map_per_box_conf(best_iou: np.ndarray, pred_scores: np.ndarray, n_gt: int,
                      box_confs: np.ndarray) -> np.ndarray:
    """mAP at each box_conf, from each predicted instance's best IoU and its score."""
    order = np.argsort(-pred_scores, kind="stable")
    best_iou, pred_scores = best_iou[order], pred_scores[order]
    # hits[t, j]: instance j matches some GT instance at IoU threshold t
    hits = best_iou[None, :] > THRESHOLDS[:, None]
    cum_tp = np.concatenate([np.zeros((len(THRESHOLDS), 1), np.int64), np.cumsum(hits, axis=1)], axis=1)
    # number of predicted instances kept at each box_conf (scores sorted descending)
    n_kept = np.searchsorted(-pred_scores, -np.asarray(box_confs), side="right")
    tp = cum_tp[:, n_kept]  # (T, B)
    denom = n_gt + n_kept[None, :] - tp
    ap = np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)  # both empty -> 1.0
    return ap.mean(axis=0)


def sweep_image(detections, gt_labels: np.ndarray, box_confs: Sequence[float] = DEFAULT_BOX_CONFS,
                mask_thresholds: Sequence[float] = DEFAULT_MASK_THRESHOLDS,
                min_area: int | None = None, base: Thresholds | None = None) -> np.ndarray:
    """(B, M) competition mAP of one image for every grid point. ``base``: the thresholds
    whose min_area and post-processing apply at every grid point (``min_area`` overrides)."""
    base = Thresholds.from_dict(base).with_overrides(min_area=min_area)
    box_confs = np.asarray(box_confs, np.float64)
    gt_labels = np.asarray(gt_labels)
    if tuple(gt_labels.shape) != tuple(detections.image_shape):
        raise ValueError(f"ground truth is {gt_labels.shape[0]}x{gt_labels.shape[1]} but the image "
                         f"is {detections.image_shape[0]}x{detections.image_shape[1]}")
    lowest = float(box_confs.min())
    out = np.zeros((len(box_confs), len(mask_thresholds)))
    for j, m in enumerate(mask_thresholds):
        th = replace(base, box_conf=lowest, mask_threshold=float(m))
        labels, rows = detections.to_labels(th, return_rows=True)
        ov = overlaps(gt_labels, labels)  # sparse: overlapping pairs only
        gt_ids, pred_ids, best = ov.gt_ids, ov.pred_ids, ov.best_for_pred()
        scores = detections.scores[rows[pred_ids - 1]] if len(pred_ids) else np.zeros(0)
        out[:, j] = _map_per_box_conf(best, scores.astype(np.float64), len(gt_ids), box_confs)
    return out


def sweep(pairs: Iterable, box_confs: Sequence[float] = DEFAULT_BOX_CONFS,
          mask_thresholds: Sequence[float] = DEFAULT_MASK_THRESHOLDS, min_area: int | None = None,
          base: Thresholds | None = None) -> SweepResult:
    """Mean mAP over ``(detections, gt_labels)`` pairs; ``best`` is the table's argmax.
    ``base`` / ``min_area``: as for :func:`sweep_image`.

    Ties go to the pair closest to the starter's defaults (0.5, 0.5).
    """
    box_confs = np.asarray(box_confs, np.float64)
    mask_thresholds = np.asarray(mask_thresholds, np.float64)
    total = np.zeros((len(box_confs), len(mask_thresholds)))
    n = 0
    for dets, gt in pairs:
        total += sweep_image(dets, gt, box_confs, mask_thresholds, min_area, base)
        n += 1
    if n == 0:
        raise ValueError("no images with ground truth to tune on")
    mean = total / n
    dist = (box_confs[:, None] - 0.5) ** 2 + (mask_thresholds[None, :] - 0.5) ** 2
    cand = np.flatnonzero(np.isclose(mean, mean.max(), rtol=0, atol=1e-12))
    i, j = np.unravel_index(cand[np.argmin(dist.ravel()[cand])], mean.shape)
    best = {"box_conf": float(box_confs[i]), "mask_threshold": float(mask_thresholds[j]),
            "map": float(mean[i, j])}
    return SweepResult(box_confs, mask_thresholds, mean, n, best)
