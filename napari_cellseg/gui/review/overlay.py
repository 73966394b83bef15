"""The numbers behind the napari Review widget (numpy only, no Qt): the TP/FP/FN overlay, which
layers to compare, and the threshold grid of a sweep."""

from __future__ import annotations

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
    false positive over it stays visible.
    """
    from skimage.segmentation import find_boundaries

    out = np.zeros(pred.shape, np.uint8)
    out[np.isin(pred, score.tp_pred)] = TP
    out[np.isin(pred, score.fp_pred)] = FP
    out[find_boundaries(pred, mode="inner")] = 0
    fn_labels = np.where(np.isin(gt, score.fn_gt), gt, 0)
    fn = fn_labels > 0
    out[fn & (pred == 0)] = FN
    out[find_boundaries(fn_labels, mode="inner")] = 0
    out[find_boundaries(fn_labels, mode="thick") & (fn | (out == 0))] = FN
    return out


def choose_pair(layers, pred: str | None = None, gt: str | None = None):
    """Which Labels layers the Review pickers offer and select.

    ``layers``: ``(name, is_model_result, image_id)`` in viewer order. Returns
    ``(prediction names, ground-truth names, chosen prediction, chosen ground truth)``; the two
    choices are never the same layer. Predictions: model results first, then other layers, but
    a lone hand-made/CSV layer is taken as ground truth, not as a prediction. Ground truth: the
    non-result layers except the prediction; ``gt`` is kept while valid, else the one whose
    image id matches the prediction's.
    """
    results = [n for n, is_res, _ in layers if is_res]
    others = [n for n, is_res, _ in layers if not is_res]
    preds = results + (others if results or len(others) > 1 else [])
    if pred not in preds:
        pred = preds[0] if preds else None
    gts = [n for n in others if n != pred]
    ids = {n: i for n, _, i in layers}
    if gt not in gts:  # keep the user's choice while it is valid; else the matching image id
        match = [n for n in gts if pred in results and ids.get(pred) in (ids.get(n), n)]
        gt = match[0] if match else (gts[0] if gts else None)
    return preds, gts, pred, gt
