"""inference.prompts: a cell from a user's box (the demo model's mask head on a real nucleus) and
from a click (the best candidate below box_conf that covers it)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.inference.detections import Detections  # noqa: E402
from napari_cellseg.options import Thresholds  # noqa: E402

TH = Thresholds(box_conf=0.5, mask_threshold=0.5, fill_holes=False)
Z = 36  # a plane of tests/data with 20 hand-checked nuclei


@pytest.fixture(scope="module")
def demo():
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.inference.runner import Runner

    return Pipeline(Runner.from_checkpoint(None, device="cpu"))


def _iou(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _bbox(mask) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


@pytest.mark.slow
def test_segment_box_segments_real_nuclei_with_the_mask_head(demo, nuclei_planes):
    from napari_cellseg.inference.prompts import segment_box

    image, gt = nuclei_planes[Z]
    ious = []
    for cell in range(1, int(gt.max()) + 1):
        g = gt == cell
        mask = segment_box(demo, image, _bbox(g))
        assert mask.shape == gt.shape and mask.dtype == bool
        ious.append(_iou(mask, g))
    assert np.median(ious) > 0.6, np.round(ious, 2)
    assert ious[4] > 0.5  # the box of cell 5 (a round, isolated nucleus)
    # the cell is the one in the box: a box around empty background gives little or nothing
    assert _iou(segment_box(demo, image, _bbox(gt == 5)), gt == 1) == 0.0


@pytest.mark.slow
def test_segment_box_follows_the_object_size_like_prediction(demo, nuclei_planes):
    """The same nucleus in the image upsampled 2x (box 2x): the box sets the resize factor of a
    size-normalised model, so the mask is the same cell at twice the size."""
    import cv2

    from napari_cellseg.inference.prompts import segment_box

    image, gt = nuclei_planes[Z]
    g = gt == 5
    small = segment_box(demo, image, _bbox(g))
    big_image = cv2.resize(image, (512, 512), interpolation=cv2.INTER_LINEAR)
    y0, x0, y1, x1 = _bbox(g)
    big = segment_box(demo, big_image, (2 * y0, 2 * x0, 2 * y1, 2 * x1))
    assert _iou(big[::2, ::2], small) > 0.7


def test_segment_box_refuses_a_box_outside_the_image():
    from napari_cellseg.inference.prompts import PromptError, segment_box

    class NoRunner:  # the box is checked before the network is touched
        thresholds = TH

    for box in ((300, 300, 400, 400), (10, 10, 10, 40), (0, 0, float("nan"), 5), ("a", 1, 2, 3)):
        with pytest.raises(PromptError):
            segment_box(NoRunner(), np.zeros((64, 64), np.uint8), box)


def test_box_around_centres_a_box_on_the_click():
    from napari_cellseg.inference.prompts import PromptError, box_around

    assert box_around((50, 60), 20) == (40.0, 50.0, 60.0, 70.0)
    assert box_around((5, 60), 20, shape=(100, 65)) == (0.0, 50.0, 15.0, 65.0)
    with pytest.raises(PromptError, match="diameter"):
        box_around((5, 5), 0)


def _disc(cy, cx, r, shape=(64, 96)) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.hypot(yy - cy, xx - cx) < r


def _candidates():
    """Candidates as boxes + 28x28 disc masks: a drawn cell (0.9), two below box_conf at the
    same place (0.4 and 0.2, the better one smaller), and one below elsewhere (0.3)."""
    yy, xx = np.mgrid[:28, :28]
    disc = (np.hypot(yy - 13.5, xx - 13.5) < 12).astype(np.float32)
    boxes = [[4, 4, 24, 24], [40, 20, 60, 40], [36, 16, 64, 44], [70, 30, 90, 50]]
    return Detections(np.array(boxes, np.float32), [0.9, 0.4, 0.2, 0.3], np.stack([disc] * 4), (64, 96))


def test_promote_click_takes_the_best_candidate_below_the_threshold_under_the_click():
    from napari_cellseg.inference.prompts import promote_click

    dets = _candidates()
    mask = promote_click(dets, TH, (30, 50))  # inside the 0.4 candidate (and the 0.2 one)
    one = Detections(dets.boxes[1:2], [1.0], dets.probs[1:2], (64, 96)).to_labels(TH) > 0
    assert mask is not None and np.array_equal(mask, one)
    wide = promote_click(dets, TH, (22, 44))  # in the 0.4 candidate's box, not its mask: the 0.2 one
    assert wide is not None and wide[22, 44] and wide.sum() > mask.sum()
    assert promote_click(dets, TH, (40, 80)) is not None  # the 0.3 candidate
    assert promote_click(dets, TH, (5, 5)) is None  # nothing there (the drawn cell is not a candidate)
    assert promote_click(dets, TH, (14, 14)) is None  # the drawn cell: not below the threshold
    assert promote_click(dets, TH, (500, 5)) is None  # outside the image
    lower = promote_click(dets, TH.with_overrides(box_conf=0.35), (30, 50))  # 0.4 is drawn now
    assert lower is not None and lower.sum() > mask.sum()


def test_promote_click_leaves_shown_cells_alone():
    from napari_cellseg.inference.prompts import promote_click

    dets = _candidates()
    labels = np.zeros((64, 96), np.int32)
    labels[20:28, 40:60] = 7  # a shown cell overlapping the top of the candidate
    mask = promote_click(dets, TH, (30, 50), labels=labels)
    assert mask is not None and not (mask & (labels > 0)).any() and mask[30, 50]
    covered = np.zeros((64, 96), np.int32)
    covered[16:44, 36:64] = 3  # the candidates are duplicates of a shown cell
    assert promote_click(dets, TH, (30, 50), labels=covered) is None
