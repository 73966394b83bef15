"""inference/pipeline.py: the one prediction pipeline (size, tiling, batching, progress), driven
by PredictOptions, on a fake network runner that finds the bright squares of an image and
records every forward (no model: the rules are what is tested here)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_cellseg.inference.detections import Detections
from napari_cellseg.inference.pipeline import Pipeline, iter_sized
from napari_cellseg.inference.runner import PredictError
from napari_cellseg.options import TILE_OVERLAP, TILE_SIZE, PredictOptions, Thresholds, tile_settings
from napari_cellseg.progress import drain

SIDE = 10  # px: squares of 10x10


class FakeRunner:
    """The Runner interface the pipeline uses: squares found at any factor; forwards recorded."""

    reference_diameter = 30.0
    model = None

    def __init__(self, size_normalised=False, thresholds=None):
        self.size_normalised = size_normalised
        self.thresholds = Thresholds() if thresholds is None else thresholds
        self.forwards: list[tuple[list, list]] = []  # (shapes, factors) of each forward

    def base_factor(self, shape):
        return 1.0

    def iter_forward(self, arrays, factors, box_filter=None):
        from scipy import ndimage

        factors = list(factors) if isinstance(factors, (list, tuple)) else [float(factors)] * len(arrays)
        self.forwards.append(([a.shape[:2] for a in arrays], factors))
        yield {"stage": "backbone", "fraction": 0.5}
        out = []
        for a in arrays:
            lab, _ = ndimage.label(a[..., 0] > 0.5)
            boxes = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(lab)],
                             np.float32).reshape(-1, 4)
            if box_filter is not None:
                boxes = boxes[np.asarray(box_filter(boxes), bool)]
            n = len(boxes)
            out.append(Detections(boxes, np.linspace(0.99, 0.9, n, dtype=np.float32), np.ones((n, 28, 28), np.float32),
                                  a.shape[:2], labels=np.ones(n, np.int64)))
        yield {"stage": "masks", "fraction": 1.0}
        return out


def squares(shape=(120, 160), step=30, offset=5):
    image = np.zeros(shape, np.uint8)
    for y in range(offset, shape[0] - SIDE, step):
        for x in range(offset, shape[1] - SIDE, step):
            image[y:y + SIDE, x:x + SIDE] = 255
    return image


def _boxes(dets):
    return sorted(map(tuple, dets.boxes.round(3).tolist()))


# ---- options -> pipeline settings ----------------------------------------------------------------
def test_defaults_come_from_the_options_rules():
    pipe = Pipeline(FakeRunner())
    assert (pipe.tile_size, pipe.tile_overlap) == tile_settings() == (TILE_SIZE, TILE_OVERLAP)
    assert pipe.scale == 1.0 and pipe.batch_size == 1 and pipe.thresholds == Thresholds()
    assert Pipeline(FakeRunner(size_normalised=True)).scale == "auto"  # a model trained with --diameter
    small = Pipeline(FakeRunner(), PredictOptions(tile_size=128))
    assert (small.tile_size, small.tile_overlap) == tile_settings(128) == (128, 63)


def test_size_options_resolve_once():
    runner = FakeRunner(size_normalised=True)
    assert Pipeline(runner, PredictOptions(diameter=15)).scale == 2.0  # reference 30 / 15
    assert Pipeline(runner, PredictOptions(diameter=15, scale=0.5)).scale == 0.5  # scale wins
    assert Pipeline(FakeRunner(), PredictOptions(diameter="auto")).scale == "auto"
    with pytest.raises(PredictError, match="diameter 1000 px would resize"):
        Pipeline(runner, PredictOptions(diameter=1000))


def test_threshold_overrides_apply_to_the_checkpoints():
    runner = FakeRunner(thresholds=Thresholds(box_conf=0.7, min_area=3))
    pipe = Pipeline(runner, PredictOptions(mask_threshold=0.2, fill_holes=False))
    assert pipe.thresholds == Thresholds(box_conf=0.7, mask_threshold=0.2, min_area=3, fill_holes=False)
    dets = pipe.predict(squares())
    assert np.array_equal(pipe.labels(dets), dets.to_labels(pipe.thresholds))


# ---- the "auto" / factor dispatch (iter_sized) --------------------------------------------------
def test_a_factor_is_one_forward_at_that_factor():
    runner = FakeRunner()
    dets = drain(iter_sized(runner, [np.zeros((40, 40, 3), np.float32)] * 2, 0.5))
    assert runner.forwards == [([(40, 40), (40, 40)], [0.5, 0.5])] and [d.scale for d in dets] == [0.5, 0.5]


def test_auto_measures_then_predicts_at_the_reference_size():
    runner = FakeRunner(size_normalised=True)
    dets = Pipeline(runner).predict(squares())
    factors = [f[0] for _, f in runner.forwards]
    assert len(factors) == 2 and factors[0] == 1.0  # measured at x1, then predicted once more: settled
    assert 10 <= dets.diameter <= 15 and dets.diameter == round(dets.diameter)  # the rounded size
    assert factors[1] == pytest.approx(30 / dets.diameter) == dets.scale  # reference 30 / the size
    assert len(dets) == 20


@pytest.mark.parametrize("scale", ["big", 0, -1, 100, float("nan")])
def test_bad_scale_refused_before_any_forward(scale):
    runner = FakeRunner()
    with pytest.raises(PredictError, match="scale"):
        drain(iter_sized(runner, [np.zeros((8, 8, 3), np.float32)], scale))
    with pytest.raises(PredictError, match="scale"):
        Pipeline(runner).predict(np.zeros((8, 8), np.uint8), scale=scale)
    assert runner.forwards == []


# ---- batching, tiling, progress ----------------------------------------------------------------
def test_predict_many_batches_and_equals_one_by_one():
    runner = FakeRunner()
    pipe = Pipeline(runner, PredictOptions(batch_size=2))
    images = [squares(offset=o) for o in (3, 5, 7)]
    got = list(pipe.predict_many(images))
    assert [i for i, _ in got] == [0, 1, 2]
    assert [len(shapes) for shapes, _ in runner.forwards] == [2, 1]  # 2 images per forward
    for (_, d), image in zip(got, images):
        assert _boxes(d) == _boxes(pipe.predict(image))


def test_large_images_are_tiled_and_give_the_whole_images_cells():
    image = squares((300, 200))
    whole_runner, tiled_runner = FakeRunner(), FakeRunner()
    whole = Pipeline(whole_runner, PredictOptions(tile_size=0)).predict(image)  # 0 = never tile
    tiled = Pipeline(tiled_runner, PredictOptions(tile_size=128, tile_overlap=32)).predict(image)
    assert whole_runner.forwards == [([(300, 200)], [1.0])]
    shapes = [s[0] for s, _ in tiled_runner.forwards]
    assert len(shapes) == 6 and all(max(s) <= 128 for s in shapes)  # 3 rows x 2 columns
    assert _boxes(tiled) == _boxes(whole) and len(whole) == 70  # each cell once, in image coordinates
    assert Pipeline(FakeRunner(), PredictOptions(tile_size=128)).predict(image, tile=None).image_shape == (300, 200)


def test_progress_events_and_result():
    gen = Pipeline(FakeRunner(), PredictOptions(tile_size=128, tile_overlap=32)).iter_predict(squares((300, 200)))
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            dets = stop.value
            break
    assert events[0]["stage"] == "load" and any(e["stage"].startswith("tile 6/6") for e in events)
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert isinstance(dets, Detections) and dets.image_shape == (300, 200)
