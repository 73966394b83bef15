import numpy as np
import pytest

from napari_cellseg.inference.metrics import THRESHOLDS, average_precision, evaluate_image, iou_matrix


def _reference(gt, pred):
    """Per-pair loop version of the Kaggle metric."""
    gi, pi = [i for i in np.unique(gt) if i], [i for i in np.unique(pred) if i]
    if not gi and not pi:
        return 1.0
    iou = np.array([[((gt == g) & (pred == p)).sum() / ((gt == g) | (pred == p)).sum()
                     for p in pi] for g in gi]).reshape(len(gi), len(pi))
    scores = []
    for t in THRESHOLDS:
        tp = int((iou > t).sum())
        scores.append(tp / (len(gi) + len(pi) - tp))
    return float(np.mean(scores))


def test_thresholds():
    assert np.allclose(THRESHOLDS, np.arange(0.5, 1.0, 0.05)) and len(THRESHOLDS) == 10


def test_hand_computed_example():
    gt = np.zeros((10, 10), int)
    gt[:5, :5] = 1
    gt[6:, 6:] = 2
    pred = np.zeros((10, 10), int)
    pred[:5, :4] = 3  # IoU 0.8 with gt 1: a hit below 0.8, not at 0.8 (strict >)
    pred[0, 9] = 9  # false positive
    score = evaluate_image(gt, pred)
    assert score.per_threshold[0.75] == pytest.approx(1 / 3)
    assert score.per_threshold[0.8] == 0.0
    assert score.map == pytest.approx(6 / 3 / 10)
    assert score.tp_pred.tolist() == [3] and score.fp_pred.tolist() == [9]
    assert score.fn_gt.tolist() == [2] and (score.tp, score.fp, score.fn) == (1, 1, 1)
    assert evaluate_image(gt, pred, iou=0.85).tp == 0


def test_edge_cases():
    empty = np.zeros((4, 4), int)
    full = np.ones((4, 4), int)
    assert average_precision(empty, empty) == 1.0
    assert average_precision(full, empty) == 0.0 and average_precision(empty, full) == 0.0
    assert average_precision(full, full * 7) == 1.0  # no background at all
    with pytest.raises(ValueError, match="differ in size"):
        average_precision(empty, np.zeros((4, 5), int))


def test_matches_reference_on_perturbed_nuclei(nuclei_label_slices):
    rng = np.random.default_rng(1)
    for gt in nuclei_label_slices.values():
        pred = np.roll(gt, 3, axis=1)  # shifted masks: IoUs spread over the thresholds
        pred[pred == rng.choice(np.unique(gt)[1:])] = 0  # one missed cell
        pred[:6, :6] = 999  # one false positive
        assert average_precision(gt, pred) == pytest.approx(_reference(gt, pred))
        assert average_precision(gt, gt) == 1.0


def test_iou_matrix():
    gt = np.array([[1, 1, 0], [2, 2, 2]])
    pred = np.array([[5, 0, 0], [5, 6, 6]])
    iou, gi, pi = iou_matrix(gt, pred)
    assert gi.tolist() == [1, 2] and pi.tolist() == [5, 6]
    assert np.allclose(iou, [[1 / 3, 0], [1 / 4, 2 / 3]])


def test_median_diameter_of_disks_and_layers():
    from napari_cellseg.inference.metrics import median_diameter

    yy, xx = np.mgrid[:100, :100]
    lab = np.zeros((100, 100), np.int32)
    for i, (cy, cx, r) in enumerate([(20, 20, 5), (50, 50, 10), (80, 80, 15)], 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    assert abs(median_diameter(lab) - 20) < 1.0  # the middle disk, 2 r
    assert median_diameter(np.zeros((5, 5), np.int32)) == 0.0
    # label layers: the same id in two layers is two instances
    layers = np.stack([lab == 1, lab == 3]).astype(np.uint16)
    assert abs(median_diameter(layers) - 20) < 1.5  # mean of 10 and 30


# ---- sparse IoU (overlapping pairs only) ------------------------------------------
def _grid_labels(n_side: int, cell: int, shift: int = 0):
    """n_side^2 square cells of cell x cell px; ``shift`` moves the prediction right by px."""
    size = n_side * cell
    ids = (np.arange(size) // cell)
    gt = (ids[:, None] * n_side + ids[None, :] + 1).astype(np.int32)
    pred = np.roll(gt, shift, axis=1) * 3  # other ids; each cell overlaps two predictions
    return gt, pred


def test_100k_cells_in_bounded_memory():
    """100,000 x 100,000 cells was a 74.5 GiB dense matrix; now memory follows the pixels."""
    import tracemalloc

    from napari_cellseg.inference.metrics import overlaps

    gt, pred = _grid_labels(317, 3, shift=1)  # 100,489 cells of 3x3 px, 951x951 image
    tracemalloc.start()
    try:
        score = evaluate_image(gt, pred)
        ov = overlaps(gt, pred)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert score.n_gt == score.n_pred == 317 ** 2
    # every gt cell of 3 columns overlaps its own prediction on 2 of them (IoU 2/4 = 0.5, not
    # > 0.5) and its left neighbour's on 1: no hit at any threshold
    assert score.map == 0.0 and score.tp == 0
    assert len(ov.iou) == 2 * 317 ** 2  # overlapping pairs only (np.roll wraps: 2 per cell)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_sparse_matches_dense_reference():
    rng = np.random.default_rng(7)
    for _ in range(20):
        gt = rng.integers(0, 6, (12, 15))
        pred = np.where(rng.random((12, 15)) < 0.8, gt * 2, rng.integers(0, 9, (12, 15)))
        assert average_precision(gt, pred) == pytest.approx(_reference(gt, pred))
        ious, gi, pi = iou_matrix(gt, pred)
        ref = np.array([[((gt == g) & (pred == p)).sum() / ((gt == g) | (pred == p)).sum()
                         for p in pi] for g in gi]).reshape(len(gi), len(pi))
        assert np.allclose(ious, ref)


def test_overlaps_best_iou_and_odd_ids():
    from napari_cellseg.inference.metrics import overlaps

    gt = np.array([[-4, -4, 0], [2**40, 2**40, 2**40]], np.int64)  # negative and huge ids
    pred = np.array([[5, 0, 0], [5, 6, 6]], np.uint16)
    ov = overlaps(gt, pred)
    assert ov.gt_ids.tolist() == [-4, 2**40] and ov.pred_ids.tolist() == [5, 6]
    assert np.allclose(ov.best_for_pred(), [1 / 3, 2 / 3])
    assert np.allclose(ov.best_for_gt(), [1 / 3, 2 / 3])
    assert np.allclose(ov.dense(), [[1 / 3, 0], [1 / 4, 2 / 3]])


def test_duplicate_and_overlapping_masks_are_predictions_of_their_own():
    """Scored as a label image, a duplicate mask vanished (the earlier row won); as a MaskSet each
    mask is one prediction: a duplicate is a false positive."""
    from napari_cellseg.inference.metrics import MaskSet
    from napari_cellseg.io.rle import labels_to_rles

    gt = np.zeros((20, 30), np.int32)
    gt[2:8, 2:8], gt[10:18, 10:20] = 1, 2
    rles = labels_to_rles(gt)
    once, twice = MaskSet.from_rles(rles, gt.shape), MaskSet.from_rles(rles + rles[:1], gt.shape)
    assert once.overlapping() == 0 and twice.overlapping() == 2
    assert evaluate_image(gt, once).map == 1.0
    score = evaluate_image(gt, twice)
    assert (score.n_pred, score.tp, score.fp, score.fn) == (3, 2, 1, 0)
    assert score.map == pytest.approx(2 / 3)
    assert evaluate_image(gt, gt).map == 1.0  # a label image as before
