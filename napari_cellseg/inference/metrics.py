"""The Kaggle Sartorius metric: mean over IoU thresholds 0.50:0.05:0.95 of TP / (TP + FP + FN).

A predicted instance is a hit at threshold t when its IoU with a ground-truth instance is > t.
Each ground-truth instance is matched at most once: a second prediction of the same cell (a
duplicate, or any mask overlapping the first) is a false positive. For t >= 0.5 a prediction can
match at most one ground-truth instance (they do not overlap), so TP is the number of
ground-truth instances with a hit. An image where both ground truth and prediction are empty
scores 1.0.

The prediction is a label image, or a :class:`MaskSet` (one mask per CSV row, masks may
overlap: ``cellseg evaluate`` scores each row as one prediction, as the competition did).

IoUs are sparse: only pairs of instances that share at least one pixel are counted
(:func:`overlaps`), from the pixels where both label images are non-zero, in chunks. Memory
follows the number of pixels, never gt x pred (100,000 cells: ~10 MiB, not 75 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["THRESHOLDS", "ImageScore", "Overlaps", "overlaps", "iou_matrix", "evaluate_image",
           "average_precision", "median_diameter", "MaskSet", "mask_overlaps"]

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)
_CHUNK = 2**22  # pixels per step: bounds the temporary arrays (~100 MiB) whatever the image size


def _check(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    for name, a in (("ground truth", gt), ("prediction", pred)):
        if a.ndim != 2 or a.dtype.kind not in "iub":
            raise ValueError(f"{name} must be a 2-D integer label image, got shape {a.shape} "
                             f"dtype {a.dtype}")
    if gt.size == 0:
        raise ValueError("empty label images")
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape[1]}x{gt.shape[0]} and prediction "
                         f"{pred.shape[1]}x{pred.shape[0]} (width x height) differ in size")
    return gt, pred


def _ids_and_areas(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted non-zero ids of a flat label image and their pixel counts."""
    lo, hi = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)
    if lo >= 0 and hi <= max(flat.size, 2**20):  # ids dense enough for a histogram
        counts = np.zeros(hi + 1, np.int64)
        for a in range(0, flat.size, _CHUNK):
            counts += np.bincount(flat[a:a + _CHUNK], minlength=hi + 1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        return ids.astype(flat.dtype, copy=False), counts[ids]
    return np.unique(flat[flat != 0], return_counts=True)  # negative or huge ids


@dataclass
class Overlaps:
    """Instances of two label images and the IoU of every pair that shares a pixel.

    ``gt_ids`` / ``pred_ids``: sorted non-zero ids; ``gt_index[k]``, ``pred_index[k]``: the pair
    k as positions in those arrays, with ``inter[k]`` shared pixels and ``iou[k]``. Pairs not
    listed have IoU 0.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    gt_index: np.ndarray
    pred_index: np.ndarray
    inter: np.ndarray
    iou: np.ndarray

    def best_for_pred(self) -> np.ndarray:
        """Each predicted instance's best IoU with any ground-truth instance (0 without overlap)."""
        best = np.zeros(len(self.pred_ids))
        np.maximum.at(best, self.pred_index, self.iou)
        return best

    def best_for_gt(self) -> np.ndarray:
        best = np.zeros(len(self.gt_ids))
        np.maximum.at(best, self.gt_index, self.iou)
        return best

    def dense(self) -> np.ndarray:
        """The full (gt x pred) IoU matrix: only for small images (memory is gt x pred)."""
        out = np.zeros((len(self.gt_ids), len(self.pred_ids)))
        out[self.gt_index, self.pred_index] = self.iou
        return out


def overlaps(gt, pred) -> Overlaps:
    """Sparse IoUs of two label images of the same size (0 = background; any integer ids)."""
    gt, pred = _check(gt, pred)
    g, p = gt.ravel(), pred.ravel()
    gt_ids, gt_area = _ids_and_areas(g)
    pred_ids, pred_area = _ids_and_areas(p)
    n_pred = max(len(pred_ids), 1)
    keys, counts = [], []
    for a in range(0, g.size, _CHUNK):
        gc, pc = g[a:a + _CHUNK], p[a:a + _CHUNK]
        both = (gc != 0) & (pc != 0)
        if not both.any():
            continue
        key = (np.searchsorted(gt_ids, gc[both]).astype(np.int64) * n_pred
               + np.searchsorted(pred_ids, pc[both]))
        k, c = np.unique(key, return_counts=True)
        keys.append(k)
        counts.append(c)
    if keys:
        key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        inter = np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64)
    else:
        key, inter = np.zeros(0, np.int64), np.zeros(0, np.int64)
    gi, pi = key // n_pred, key % n_pred
    union = gt_area[gi] + pred_area[pi] - inter
    return Overlaps(gt_ids, pred_ids, gt_area, pred_area, gi, pi, inter, inter / np.maximum(union, 1))


@dataclass
class MaskSet:
    """Predicted masks of one image that may overlap (one per CSV row): ``pixels`` (flat C-order
    indices of every mask's pixels, concatenated), ``mask_of_pixel`` (which mask, 0-based),
    ``n`` masks, image ``shape``."""

    pixels: np.ndarray
    mask_of_pixel: np.ndarray
    n: int
    shape: tuple

    @classmethod
    def from_rles(cls, rles, shape) -> "MaskSet":
        """From Kaggle RLE strings (validated against ``shape``; io.rle.RleError otherwise)."""
        from napari_cellseg.io.rle import parse_rles

        rles = list(rles)
        h, w = int(shape[0]), int(shape[1])
        starts, lengths, n_runs = parse_rles(rles, h * w)
        run_of_pixel = np.repeat(np.arange(len(lengths)), lengths)
        offset = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pixels = starts[run_of_pixel] + offset
        mask_of_pixel = np.repeat(np.arange(len(rles)), n_runs)[run_of_pixel]
        return cls(pixels.astype(np.int64), mask_of_pixel, len(rles), (h, w))

    def overlapping(self) -> int:
        """How many masks share at least one pixel with another mask."""
        if not self.n:
            return 0
        cover = np.bincount(self.pixels, minlength=self.shape[0] * self.shape[1])
        return int(len(np.unique(self.mask_of_pixel[cover[self.pixels] > 1])))


def mask_overlaps(gt, masks: MaskSet) -> Overlaps:
    """:func:`overlaps` of a label image and a :class:`MaskSet`: every mask is its own instance
    (ids 1..n in row order), overlapping masks included."""
    gt = _check(gt, np.zeros(masks.shape, np.uint8))[0]
    g = gt.ravel()
    gt_ids, gt_area = _ids_and_areas(g)
    n = max(masks.n, 1)
    pred_area = np.bincount(masks.mask_of_pixel, minlength=masks.n).astype(np.int64)
    values = g[masks.pixels]
    inside = values != 0
    key = np.searchsorted(gt_ids, values[inside]).astype(np.int64) * n + masks.mask_of_pixel[inside]
    key, inter = np.unique(key, return_counts=True)
    gi, pi = key // n, key % n
    union = gt_area[gi] + pred_area[pi] - inter
    return Overlaps(gt_ids, np.arange(1, masks.n + 1), gt_area, pred_area, gi, pi, inter.astype(np.int64),
                    inter / np.maximum(union, 1))


def iou_matrix(gt, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every ground-truth instance with every predicted one (dense: small images only;
    :func:`overlaps` is the sparse form that the metric uses).

    Returns ``(iou, gt_ids, pred_ids)`` with ``iou`` of shape (len(gt_ids), len(pred_ids)).
    """
    ov = overlaps(gt, pred)
    return ov.dense(), ov.gt_ids, ov.pred_ids


@dataclass
class ImageScore:
    """Score of one image. ``tp_pred``/``fp_pred``/``fn_gt`` are instance ids at ``iou``."""

    map: float
    per_threshold: dict[float, float]
    iou: float
    tp_pred: np.ndarray
    fp_pred: np.ndarray
    fn_gt: np.ndarray
    tp_gt: np.ndarray = field(repr=False)
    n_gt: int = 0
    n_pred: int = 0

    @property
    def tp(self) -> int:
        return len(self.tp_pred)

    @property
    def fp(self) -> int:
        return len(self.fp_pred)

    @property
    def fn(self) -> int:
        return len(self.fn_gt)

    def to_dict(self) -> dict:
        """JSON-friendly summary."""
        return {
            "map": self.map,
            "per_threshold": {f"{t:.2f}": v for t, v in self.per_threshold.items()},
            "iou": self.iou, "n_gt": self.n_gt, "n_pred": self.n_pred,
            "tp": self.tp, "fp": self.fp, "fn": self.fn,
        }


def evaluate_image(gt, pred, iou: float = 0.5) -> ImageScore:
    """Score one image: mAP, per-threshold values and TP/FP/FN instance ids at ``iou``.
    ``pred``: a label image or a :class:`MaskSet` (masks that may overlap, each one prediction)."""
    if not 0.5 <= iou < 1.0:
        raise ValueError(f"iou threshold must be in [0.5, 1), got {iou}")
    ov = mask_overlaps(gt, pred) if isinstance(pred, MaskSet) else overlaps(gt, pred)
    gt_ids, pred_ids = ov.gt_ids, ov.pred_ids
    ng, npred = len(gt_ids), len(pred_ids)
    best_for_gt = ov.best_for_gt()
    per_threshold = {}
    for t in THRESHOLDS:
        if ng == 0 and npred == 0:
            per_threshold[float(t)] = 1.0
            continue
        tp = int(np.count_nonzero(best_for_gt > t))  # each ground-truth cell matched once
        per_threshold[float(t)] = tp / (ng + npred - tp)
    hit = np.flatnonzero(ov.iou > iou)
    hit = hit[np.lexsort((ov.pred_index[hit], -ov.iou[hit]))]  # best IoU first, then row order
    _, first = np.unique(ov.gt_index[hit], return_index=True)
    hit = hit[first]  # one prediction per ground-truth cell: the others are false positives
    pred_hit = np.zeros(npred, bool)
    pred_hit[ov.pred_index[hit]] = True
    gt_hit = np.zeros(ng, bool)
    gt_hit[ov.gt_index[hit]] = True
    return ImageScore(
        map=float(np.mean(list(per_threshold.values()))),
        per_threshold=per_threshold,
        iou=float(iou),
        tp_pred=pred_ids[pred_hit],
        fp_pred=pred_ids[~pred_hit],
        fn_gt=gt_ids[~gt_hit],
        tp_gt=gt_ids[gt_hit],
        n_gt=ng,
        n_pred=npred,
    )


def average_precision(gt_labels, pred_labels) -> float:
    """The competition metric for one image (see the module docstring)."""
    return evaluate_image(gt_labels, pred_labels).map


def median_diameter(labels) -> float:
    """Median equivalent-circle diameter (px) of the instances of a label image, 0.0 without any.

    A 3-D array is a stack of label layers whose ids are independent (instances may overlap)."""
    arr = np.asarray(labels)
    layers = arr.reshape(-1, *arr.shape[-2:]) if arr.ndim >= 3 else arr[None]
    areas = np.concatenate([np.unique(la[la > 0], return_counts=True)[1] for la in layers])
    return float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas.size else 0.0
