"""Validation helpers: predictions -> label images, threshold grid search for the best val mAP,
and the run's figures (loss curve, augmented samples, validation overlays). No Qt here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# same grid as napari_cellseg.tuning (0.05 .. 0.95 in steps of 0.1)
BOX_CONF_GRID = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))
MASK_THRESHOLD_GRID = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))


def _fallback_average_precision(gt: np.ndarray, pred: np.ndarray) -> float:
    """Kaggle mAP over IoU 0.50:0.05:0.95 (used only until napari_cellseg.metrics exists)."""
    gt_ids, g = np.unique(gt, return_inverse=True)
    pr_ids, p = np.unique(pred, return_inverse=True)
    ng, npr = len(gt_ids), len(pr_ids)
    inter = np.bincount(g.ravel() * npr + p.ravel(), minlength=ng * npr).reshape(ng, npr)
    g0, p0 = int(gt_ids[0] == 0), int(pr_ids[0] == 0)
    area_g, area_p = inter.sum(1, keepdims=True), inter.sum(0, keepdims=True)
    inter, area_g, area_p = inter[g0:, p0:], area_g[g0:], area_p[:, p0:]
    n_gt, n_pred = inter.shape
    if n_gt == 0 and n_pred == 0:
        return 1.0
    iou = inter / np.maximum(area_g + area_p - inter, 1)
    scores = []
    for t in np.arange(0.5, 1.0, 0.05):
        tp = int((iou > t).sum())
        scores.append(tp / max(tp + (n_pred - tp) + (n_gt - tp), 1))
    return float(np.mean(scores))


def average_precision(gt, pred) -> float:
    try:
        from napari_cellseg.metrics import average_precision as ap
    except ImportError:
        ap = _fallback_average_precision
    return float(ap(np.asarray(gt), np.asarray(pred)))


def to_labels(scores: np.ndarray, probs: np.ndarray, box_conf: float, mask_threshold: float) -> np.ndarray:
    """Pasted full-size mask probabilities (N,H,W), scores descending -> int32 labels; the
    higher-scoring cell keeps a contested pixel; ids 1..K in score order."""
    keep = scores >= box_conf
    h, w = probs.shape[1:]
    if not keep.any():
        return np.zeros((h, w), np.int32)
    binary = probs[keep] > mask_threshold
    first = binary.argmax(axis=0)
    labels = np.where(binary.any(axis=0), first + 1, 0).astype(np.int32)
    return labels


def tune_thresholds(predictions, gts, box_grid=BOX_CONF_GRID, mask_grid=MASK_THRESHOLD_GRID):
    """predictions: list of (scores desc, probs (N,H,W) float); gts: list of int label images.
    Returns (best mean mAP, {"box_conf", "mask_threshold"}, grid dict).

    Scores are sorted, so a box_conf keeps a prefix of the detections; the first covering
    detection of each pixel is computed once per mask threshold and every box_conf is O(H*W)."""
    sums = {(bc, mt): 0.0 for bc in box_grid for mt in mask_grid}
    for (scores, probs), gt in zip(predictions, gts):
        h, w = gt.shape
        for mt in mask_grid:
            if len(scores):
                binary = probs > mt
                first = np.where(binary.any(axis=0), binary.argmax(axis=0), len(scores))
            else:
                first = np.full((h, w), 0)
            for bc in box_grid:
                k = int((scores >= bc).sum())
                labels = np.where(first < k, first + 1, 0).astype(np.int32)
                sums[(bc, mt)] += average_precision(gt, labels)
    n = max(len(predictions), 1)
    grid = {key: v / n for key, v in sums.items()}
    (bc, mt), best = max(grid.items(), key=lambda kv: (kv[1], -abs(kv[0][0] - 0.5) - abs(kv[0][1] - 0.5)))
    return best, {"box_conf": float(bc), "mask_threshold": float(mt)}, grid


# ---------------------------------------------------------------- figures
def _save(fig, path: Path) -> None:
    from napari_cellseg.atomic import atomic_write

    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)


def _overlay(ax, image, labels, title):
    from skimage.segmentation import find_boundaries

    ax.imshow(image)
    if labels is not None and labels.any():
        b = find_boundaries(labels, mode="inner")
        rgba = np.zeros((*labels.shape, 4), np.float32)
        rgba[b] = (1.0, 0.2, 0.2, 1.0)
        ax.imshow(rgba)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss")
    ax.plot(ep, [r["val_loss"] for r in history], "o-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [r["val_map"] for r in history], "s--", color="tab:green", label="val mAP")
    ax2.set_ylabel("val mAP")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_samples(items, path: Path, title: str = "") -> None:
    """items: list of (image HxWx3, labels HxW or None, caption)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(items), 1)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    for ax, (img, lab, cap) in zip(axes[0], items):
        _overlay(ax, img, lab, cap)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def masks_to_labels(masks: np.ndarray) -> np.ndarray:
    """(N,H,W) instance masks -> label image (for showing augmented samples)."""
    if len(masks) == 0:
        return None
    ids = np.arange(1, len(masks) + 1, dtype=np.int32)[:, None, None]
    return (masks.astype(bool) * ids).max(axis=0)
