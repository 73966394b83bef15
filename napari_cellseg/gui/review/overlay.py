"""The numbers behind the napari Review widget (numpy only, no Qt): the TP/FP/FN overlay, which
layers to compare, and the threshold grid of a sweep."""

from __future__ import annotations

import re

import numpy as np

from napari_cellseg.inference.tuning import grid_values  # noqa: F401  (one grid rule: cellseg tune --grid and the Review sweep)

OVERLAY_KEY = "napari_cellseg_review"  # metadata marker of the overlay layer
TP, FP, FN = 1, 2, 3
COLORS = {TP: (0.15, 0.85, 0.25, 1.0), FP: (1.0, 0.45, 0.0, 1.0), FN: (1.0, 0.1, 1.0, 1.0)}
NAMES = {TP: "true positive", FP: "false positive", FN: "missed (FN)"}


def overlay_labels(gt: np.ndarray, pred: np.ndarray, score) -> np.ndarray:
    """1 = true-positive prediction, 2 = false-positive prediction, 3 = missed GT cell.

    Predicted cells are filled (their borders left at 0 so touching cells stay apart); a missed
    GT cell is filled where no cell was predicted and always outlined on top, so a poorly placed
    false positive over it stays visible. Borders are skimage's ``find_boundaries`` (4-connected)
    computed with array shifts, and ids are mapped with look-up tables: a few passes over the
    image (3000x3000 with 2,000 cells: tens of ms instead of seconds).
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    out = _lookup(pred, {TP: score.tp_pred, FP: score.fp_pred})
    out[_boundaries(pred)] = 0
    fn_labels = np.where(_lookup(gt, {1: score.fn_gt}) > 0, gt, 0)
    fn = fn_labels > 0
    out[fn & (pred == 0)] = FN
    edge = _boundaries(fn_labels)
    out[edge & fn] = 0
    out[edge & (fn | (out == 0))] = FN
    return out


def _lookup(labels: np.ndarray, classes: dict) -> np.ndarray:
    """uint8 image: ``classes[k]`` where ``labels`` is one of the ids listed under ``k``."""
    ids = {k: np.asarray(v, np.int64).ravel() for k, v in classes.items()}
    top = int(labels.max()) if labels.size else 0
    if top > 50_000_000 or (labels.size and int(labels.min()) < 0):  # sparse huge ids: no table
        out = np.zeros(labels.shape, np.uint8)
        for k, v in ids.items():
            out[np.isin(labels, v)] = k
        return out
    table = np.zeros(top + 1, np.uint8)
    for k, v in ids.items():
        table[v[(v >= 0) & (v <= top)]] = k
    return table[labels]


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """skimage ``find_boundaries(labels, mode="thick")`` (connectivity 1): pixels whose value
    differs from one of their 4 neighbours inside the image."""
    b = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        d = labels[tuple(hi)] != labels[tuple(lo)]
        b[tuple(hi)] |= d
        b[tuple(lo)] |= d
    return b


RESULT, TRUTH, OTHER = "result", "truth", "other"  # what a Labels layer is, for the pickers
_TRUTH_NAME = re.compile(r"(^|[^a-z])(gt|ground[ _-]?truth|truth|true|annotations?|manual)([^a-z]|$)",
                         re.IGNORECASE)


def layer_kind(name: str, metadata, is_result: bool) -> str:
    """RESULT for a layer made by Segment cells; TRUTH for one flagged as ground truth
    (``metadata["ground_truth"]``), opened from an annotation CSV (``metadata["source_csv"]``) or
    named so ("gt", "ground truth", "truth", "annotation", "manual"); OTHER for the rest."""
    meta = metadata or {}
    if is_result:
        return RESULT
    if meta.get("ground_truth") or meta.get("source_csv") or _TRUTH_NAME.search(str(name)):
        return TRUTH
    return OTHER


def choose_pair(layers, pred: str | None = None, gt: str | None = None, new=()):
    """Which Labels layers the Review pickers offer and select.

    ``layers``: ``(name, kind, image_id)`` in viewer order, kind from :func:`layer_kind`;
    ``new``: names of result layers that just appeared (the newest becomes the prediction).
    Returns ``(prediction names, ground-truth names, chosen prediction, chosen ground truth)``.
    A layer is never chosen as both, nor offered in a list while chosen in the other.
    Predictions: results, then other layers (not ground truth); a lone other layer with no
    result is taken as ground truth. Ground truth: truth layers, then other layers; ``gt`` is
    kept while valid, else the one whose image id matches the prediction's.
    """
    results = [n for n, kind, _ in layers if kind == RESULT]
    truths = [n for n, kind, _ in layers if kind == TRUTH]
    others = [n for n, kind, _ in layers if kind == OTHER]
    candidates = results + (others if results or truths or len(others) > 1 else [])
    fresh = [n for n in new if n in results]
    if fresh:
        pred = fresh[-1]
    elif pred not in candidates:
        pred = candidates[0] if candidates else None
    gts = [n for n in truths + others if n != pred]
    ids = {n: i for n, _, i in layers}
    if gt not in gts:  # keep the user's choice while it is valid; else the matching image id
        match = [n for n in gts if pred is not None and ids.get(pred) and ids.get(pred) in (ids.get(n), n)]
        gt = (match or gts or [None])[0]
    preds = [n for n in candidates if n != gt]
    return preds, gts, pred, gt
