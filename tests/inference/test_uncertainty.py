"""inference.uncertainty: what raises a cell's and an image's doubt (constructed Detections), and
that the image score tracks the real error of the demo model (rank correlation with 1 - mAP)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # Detections paste their masks with torch

from napari_cellseg.inference.detections import Detections  # noqa: E402
from napari_cellseg.options import Thresholds  # noqa: E402

TH = Thresholds(box_conf=0.5, mask_threshold=0.5, fill_holes=False)


def _disc_probs(sharp: bool = True) -> np.ndarray:
    """28x28 mask probabilities of a centred disc: crisp (0/1) or soft (a wide ramp)."""
    yy, xx = np.mgrid[:28, :28]
    r = np.hypot(yy - 13.5, xx - 13.5)
    if sharp:
        return (r < 10).astype(np.float32) * 0.98 + 0.01
    return np.clip(1.0 - (r - 2) / 14, 0.0, 1.0).astype(np.float32)


def _dets(specs, shape=(64, 128)) -> Detections:
    """``specs``: (x0, score, sharp) per detection; 20 px boxes on one row."""
    boxes = [[x, 20, x + 20, 40] for x, _, _ in specs]
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), [s for _, s, _ in specs],
                      np.stack([_disc_probs(sh) for _, _, sh in specs]) if specs else np.zeros((0, 28, 28)),
                      shape)


def _u(specs, **kw):
    from napari_cellseg.inference.uncertainty import score

    return score(_dets(specs), TH, **kw)


def test_confident_crisp_cells_are_certain_and_each_signal_raises_the_doubt():
    base = _u([(5, 0.99, True), (40, 0.98, True), (80, 0.99, True)])
    assert base.image < 0.2 and base.cells.shape == (3,) and base.cells.max() < 0.2
    # (ids follow the score order: the changed cell is the last, id 3)
    near = _u([(5, 0.99, True), (40, 0.98, True), (80, 0.55, True)])  # just above box_conf
    assert near.cells[2] > base.cells[2] + 0.5 and near.image > base.image
    soft = _u([(5, 0.99, True), (40, 0.98, True), (80, 0.97, False)])  # an unsure outline
    assert soft.cells[2] > base.cells[2] + 0.2 and soft.image > base.image
    missed = _u([(5, 0.99, True), (40, 0.98, True), (80, 0.99, True), (105, 0.45, True)])
    assert len(missed.cells) == 3 and missed.image > base.image + 0.1  # a cell maybe missed
    far_below = _u([(5, 0.99, True), (40, 0.98, True), (80, 0.99, True), (105, 0.06, True)])
    assert far_below.image < 0.1 < missed.image - far_below.image  # far below the threshold: little


def test_nothing_found_is_not_certain():
    from napari_cellseg.inference.uncertainty import NOTHING_FOUND

    for specs in ([], [(5, 0.1, True)], [(5, 0.45, True)]):
        u = _u(specs)
        assert u.image >= NOTHING_FOUND and u.cells.shape == (0,)
    assert _u([(5, 0.45, True)]).image > _u([(5, 0.1, True)]).image
    assert _u([]).image > _u([(5, 0.99, True), (40, 0.99, True)]).image


def test_second_pass_disagreement_raises_the_doubt_of_the_cell_it_moves():
    first = _dets([(5, 0.99, True), (40, 0.99, True), (80, 0.99, True)])
    same = _dets([(5, 0.99, True), (40, 0.99, True), (80, 0.99, True)])
    moved = _dets([(5, 0.99, True), (50, 0.99, True), (80, 0.99, True)])  # cell 2 shifted 10 px
    extra = _dets([(5, 0.99, True), (40, 0.99, True), (80, 0.99, True), (105, 0.99, True)])
    from napari_cellseg.inference.uncertainty import score

    agree, differ = score(first, TH, second=same), score(first, TH, second=moved)
    assert agree.cells.max() < 0.2
    assert int(np.argmax(differ.cells)) == 1 and differ.cells[1] > 0.4
    assert differ.image > agree.image
    assert score(first, TH, second=extra).image > agree.image  # a cell only the second pass saw


def test_cells_follow_the_label_ids_of_an_edited_label_image():
    from napari_cellseg.inference.uncertainty import score

    dets = _dets([(5, 0.99, True), (40, 0.99, True), (80, 0.55, True)])
    drawn = dets.to_labels(TH)
    edited = np.zeros_like(drawn)
    edited[drawn == 3] = 1  # the doubtful cell is now id 1 ...
    edited[drawn == 1] = 3  # ... the first cell id 3
    edited[2:8, 2:8] = 2  # and id 2 was painted by hand
    u = score(dets, TH, labels=edited)
    assert u.cells.shape == (3,)
    assert u.cells[0] > 0.5 and u.cells[1] == 0.0 and u.cells[2] < 0.2
    assert list(u.doubtful_order()[:1]) == [1]
    with pytest.raises(ValueError, match="differ in size"):
        score(dets, TH, labels=np.zeros((5, 5), np.int32))


def test_flip_detections_maps_boxes_and_masks_back():
    from napari_cellseg.inference.uncertainty import flip_detections

    dets = _dets([(5, 0.99, False)], shape=(64, 128))
    dets.probs[0, :, :5] = 0.0  # an asymmetric mask
    flipped = flip_detections(flip_detections(dets))
    assert np.allclose(flipped.boxes, dets.boxes) and np.array_equal(flipped.probs, dets.probs)
    once = flip_detections(dets)
    assert once.boxes[0].tolist() == [103.0, 20.0, 123.0, 40.0]
    assert np.array_equal(once.to_labels(TH)[:, ::-1] > 0, dets.to_labels(TH) > 0)


# ---- the real error: demo model on real nuclei planes in varied conditions --------------------
@pytest.fixture(scope="module")
def demo_pipeline():
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.inference.runner import Runner
    from napari_cellseg.options import PredictOptions

    return Pipeline(Runner.from_checkpoint(None, device="cpu"), PredictOptions(scale=1.0))


def _conditions(nuclei_planes):
    """Eight real planes, clean, blurred, noisy or inverted (the error ranges from ~0.2 to 1).
    Empty images are in benchmarks/bench_uncertainty.py: the model finding nothing on one is
    right, but ranked high by design (nothing found is no proof of no cell)."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    out = []
    for k, z in enumerate(sorted(nuclei_planes)[::2][:8]):
        raw, gt = nuclei_planes[z]
        x = raw.astype(np.float32)
        x = (x - x.min()) / (x.max() - x.min())
        cond = ("clean", "blur", "noise", "inverted")[k % 4]
        if cond == "blur":
            x = ndimage.gaussian_filter(x, 2.0 + k / 2)
        elif cond == "noise":
            x = np.clip(x + rng.normal(0, 0.05 + 0.03 * k, x.shape), 0, 1)
        elif cond == "inverted":
            x = 1.0 - x
        out.append((x.astype(np.float32), np.asarray(gt, np.int32)))
    return out


@pytest.mark.slow
def test_image_uncertainty_tracks_the_real_error_of_the_demo_model(demo_pipeline, nuclei_planes):
    from scipy.stats import spearmanr

    from napari_cellseg.inference.metrics import average_precision
    from napari_cellseg.inference.uncertainty import score

    th = demo_pipeline.thresholds
    u, err = [], []
    for image, gt in _conditions(nuclei_planes):
        dets = demo_pipeline.predict(image)
        u.append(score(dets, th).image)
        err.append(1.0 - average_precision(gt, dets.to_labels(th)))
    assert np.std(err) > 0.1, err  # the set really has easy and hard images
    rho = spearmanr(u, err).statistic
    # the bar is 0.6 (benchmarks/bench_uncertainty.py: 0.78 on 34 images); these 8 give
    # 0.77 with the demo model fine-tuned for the percentile rule
    assert rho >= 0.7, (rho, np.round(u, 3).tolist(), np.round(err, 3).tolist())
    # what a constant or a random score would give on the same set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about the constant input
        assert np.isnan(spearmanr(np.full(len(err), 0.5), err).statistic)
    rng = np.random.default_rng(0)
    random_rho = [spearmanr(rng.random(len(err)), err).statistic for _ in range(200)]
    assert rho > np.quantile(random_rho, 0.95)
