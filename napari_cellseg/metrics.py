"""The Kaggle Sartorius metric: mean over IoU thresholds 0.50:0.05:0.95 of TP / (TP + FP + FN).

A predicted instance is a hit at threshold t when its IoU with a ground-truth instance is > t
(for t >= 0.5 a match is necessarily one-to-one). An image where both ground truth and
prediction are empty scores 1.0. IoUs come from one joint histogram of the paired labels (no
per-pair full-frame loops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["THRESHOLDS", "ImageScore", "iou_matrix", "evaluate_image", "average_precision", "median_diameter"]

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


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


def iou_matrix(gt, pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every ground-truth instance with every predicted one.

    Returns ``(iou, gt_ids, pred_ids)`` with ``iou`` of shape (len(gt_ids), len(pred_ids)).
    """
    gt, pred = _check(gt, pred)
    gt_ids, g = np.unique(gt.ravel(), return_inverse=True)
    pred_ids, p = np.unique(pred.ravel(), return_inverse=True)
    # index 0 of g / p is background when the image has background; make that explicit
    g_bg, p_bg = int(gt_ids[0] == 0), int(pred_ids[0] == 0)  # images are non-empty (_check)
    ng, npred = len(gt_ids), len(pred_ids)
    joint = np.bincount(g.ravel() * npred + p.ravel(), minlength=ng * npred).reshape(ng, npred)
    area_g, area_p = joint.sum(axis=1), joint.sum(axis=0)
    inter = joint[g_bg:, p_bg:].astype(np.float64)
    union = area_g[g_bg:, None] + area_p[None, p_bg:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, gt_ids[g_bg:], pred_ids[p_bg:]


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
    """Score one image: mAP, per-threshold values and TP/FP/FN instance ids at ``iou``."""
    if not 0.5 <= iou < 1.0:
        raise ValueError(f"iou threshold must be in [0.5, 1), got {iou}")
    ious, gt_ids, pred_ids = iou_matrix(gt, pred)
    ng, npred = len(gt_ids), len(pred_ids)
    best_for_pred = ious.max(axis=0) if ng else np.zeros(npred)
    per_threshold = {}
    for t in THRESHOLDS:
        if ng == 0 and npred == 0:
            per_threshold[float(t)] = 1.0
            continue
        tp = int(np.count_nonzero(best_for_pred > t))  # IoU > 0.5 matches are one-to-one
        per_threshold[float(t)] = tp / (ng + npred - tp)
    hit = ious > iou
    return ImageScore(
        map=float(np.mean(list(per_threshold.values()))),
        per_threshold=per_threshold,
        iou=float(iou),
        tp_pred=pred_ids[hit.any(axis=0)] if ng else pred_ids[:0],
        fp_pred=pred_ids[~hit.any(axis=0)] if ng else pred_ids,
        fn_gt=gt_ids[~hit.any(axis=1)] if npred else gt_ids,
        tp_gt=gt_ids[hit.any(axis=1)] if npred else gt_ids[:0],
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
