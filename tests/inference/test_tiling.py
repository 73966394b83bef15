"""Tiled prediction: grid geometry, the core rule, and tiled == whole on a synthetic image.

The stitching logic is checked with a deterministic fake "model" (connected components of the
thresholded image -> boxes, scores and 28x28 probabilities) that runs identically on a tile and on
the whole image, so any difference comes from the tiling itself. A tiny random Mask R-CNN then runs
the real tiled path end to end (boxes global, progress per tile, cancel between tiles).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from napari_cellseg.inference.tiling import axis_tiles, core_keep, tile_grid

torch = pytest.importorskip("torch")


def test_axis_tiles_cover_and_cores_partition():
    for length, tile, overlap in [(600, 256, 96), (1000, 256, 0), (257, 256, 100), (100, 256, 96)]:
        tiles = axis_tiles(length, tile, overlap)
        assert tiles[0][0] == 0 and tiles[-1][1] == length
        assert tiles[0][2] == 0 and tiles[-1][3] == length
        for (s0, e0, _, c1), (s1, e1, c0, _) in zip(tiles, tiles[1:]):
            assert e0 - s1 >= overlap  # neighbours overlap at least by `overlap`
            assert c1 == c0 and s1 <= c0 <= e0  # cores touch, inside the overlap
            # an object centred in the core is >= overlap/2 from the tile's inner edges
            assert c0 - s1 >= overlap / 2 - 0.5 and e0 - c1 >= overlap / 2 - 0.5
        assert all(e - s == min(tile, length) for s, e, _, _ in tiles)
    with pytest.raises(ValueError, match="tile size"):
        axis_tiles(500, 100, 100)


def test_core_rule_keeps_each_centre_exactly_once():
    shape = (600, 500)
    grid = tile_grid(shape, 256, 96)
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 1, (2000, 2)) * [shape[1], shape[0]]
    c[:10] = [[0, 0], [500, 600], [499.99, 10], [250, 300], [shape[1], 5], [3, shape[0]],
              [160, 160], [176, 176], [208, 208], [0, 600]]
    boxes = np.concatenate([c - 5, c + 5], 1).astype(np.float32)
    owners = np.stack([core_keep(boxes, t, shape) for t in grid])
    assert (owners.sum(0) == 1).all()


class FakeModelPredictor:
    """Runner stand-in for the pipeline: 'detects' connected bright regions of whatever window
    it is given (the runner interface the pipeline drives: base_factor, iter_forward, thresholds)."""

    def __init__(self, tile_size=256, tile_overlap=96):
        from napari_cellseg.model.maskrcnn import ModelConfig
        from napari_cellseg.options import DEFAULT_THRESHOLDS, PredictOptions
        from napari_cellseg.inference.pipeline import Pipeline

        self.config = ModelConfig(native_scale=True)
        self.model = None
        self.thresholds = DEFAULT_THRESHOLDS
        self.calls = []
        self.pipe = Pipeline(self, PredictOptions(scale=1.0, tile_size=tile_size, tile_overlap=tile_overlap))

    def base_factor(self, shape):
        return 1.0

    def predict(self, image, tile="auto"):
        return self.pipe.predict(image, tile=tile)

    def iter_forward(self, arrays, factors, box_filter=None):
        from scipy import ndimage
        from skimage.transform import resize

        from napari_cellseg.inference.predictor import Detections

        a = arrays[0]
        self.calls.append(a.shape[:2])
        yield {"stage": "backbone", "fraction": 0.1}
        lab, n = ndimage.label(a[..., 0] > 0.35)
        boxes, scores, probs = [], [], []
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            y, x = sl
            crop = (lab[sl] == i).astype(np.float32)
            if crop.sum() < 4:
                continue
            boxes.append([x.start, y.start, x.stop, y.stop])
            scores.append(0.5 + 0.5 * float(a[sl][..., 0][crop > 0].mean()))
            probs.append(resize(crop, (28, 28), order=1, anti_aliasing=False))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores, probs = np.asarray(scores, np.float32), np.asarray(probs, np.float32).reshape(-1, 28, 28)
        if box_filter is not None:
            keep = np.asarray(box_filter(boxes), bool)
            boxes, scores, probs = boxes[keep], scores[keep], probs[keep]
        yield {"stage": "masks", "fraction": 0.6}
        return [Detections(boxes, scores, probs, a.shape[:2], labels=np.ones(len(scores), np.int64))]


def test_tiled_equals_whole_with_a_deterministic_model():
    from napari_cellseg.inference.metrics import average_precision
    from napari_cellseg.io.synthetic import make_image

    image, gt = make_image("nuclei", shape=(600, 600), seed=3)
    fake = FakeModelPredictor(tile_size=256, tile_overlap=96)
    whole = fake.predict(image, tile=None)
    assert fake.calls == [(600, 600)]
    fake.calls.clear()
    tiled = fake.predict(image)  # "auto": 600 > 256 -> tiles
    assert len(fake.calls) == 16 and set(fake.calls) == {(256, 256)}
    assert len(tiled) == len(whole) > 10
    # same boxes (global coordinates), each cell once
    order_w = np.lexsort(whole.boxes.T[::-1])
    order_t = np.lexsort(tiled.boxes.T[::-1])
    np.testing.assert_allclose(tiled.boxes[order_t], whole.boxes[order_w])
    lw, lt = whole.to_labels(0.5, 0.5), tiled.to_labels(0.5, 0.5)
    assert lt.max() == lw.max()
    map_w, map_t = average_precision(gt, lw), average_precision(gt, lt)
    assert map_w > 0.3 and abs(map_w - map_t) <= 0.02
    assert average_precision(lw, lt) > 0.98
    # a cell straddling a tile boundary comes out once, whole
    cut = 160 + 96 / 2  # the first core boundary along x
    straddle = (whole.boxes[:, 0] < cut) & (whole.boxes[:, 2] > cut)
    assert straddle.any()


def _tiny_predictor(tile_size, overlap):
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model
    from napari_cellseg.inference.predictor import Predictor
    from napari_cellseg.options import PredictOptions

    torch.manual_seed(0)
    config = ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32,
                         box_head_size=128, native_scale=True, box_detections_per_img=100,
                         rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200)
    model = build_model(config)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = 4.0
    return Predictor.from_model(model, config, options=PredictOptions(tile_size=tile_size, tile_overlap=overlap))


def test_real_model_tiled_path_progress_and_cancel():
    from napari_cellseg.inference.predictor import drain

    p = _tiny_predictor(128, 32)
    rng = np.random.default_rng(1)
    image = (rng.random((300, 200)) * 255).astype(np.uint8)
    gen = p.iter_predict(image)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            dets = stop.value
            break
    tiles = {e["stage"].split(":")[0] for e in events if e["stage"].startswith("tile")}
    assert tiles == {f"tile {k}/6" for k in range(1, 7)}  # 3 rows x 2 columns
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert dets.image_shape == (300, 200) and len(dets) > 0
    assert dets.boxes[:, 2].max() > 128 and dets.boxes[:, 3].max() > 128  # global coordinates
    assert (dets.boxes[:, :2] >= -1).all() and (dets.boxes[:, 2] <= 201).all()
    labels = dets.to_labels(0.5, 0.5)
    assert labels.shape == (300, 200) and labels.max() > 0
    # cancel: closing the generator after the first tile stops it (no more forwards)
    gen = p.iter_predict(image)
    for event in gen:
        if event["stage"].startswith("tile 2/"):
            gen.close()
            break
    # whole-image prediction of a small image never tiles
    small = drain(p.iter_predict(image[:100, :100]))
    assert small.image_shape == (100, 100)
    with pytest.raises(ValueError, match="overlap"):
        type(p)(p.runner, replace(p.options, tile_size=64, tile_overlap=64))


def test_auto_size_progress_moves_with_the_tiles():
    """scale="auto" on a tiled image: the bar moves with every tile of the size pass and stands
    near its end when the pass is the last (it sat at <= 25% and then jumped to 100%)."""
    from napari_cellseg.inference.metrics import median_diameter
    from napari_cellseg.inference.pipeline import as_image, iter_auto_scale
    from napari_cellseg.io.synthetic import make_image

    image, gt = make_image("nuclei", shape=(600, 600), seed=3)
    fake = FakeModelPredictor(tile_size=256, tile_overlap=96)
    arr = as_image(image)
    # the fake's own cells at x1 are the reference size: the first pass settles there
    fake.reference_diameter = float(median_diameter(fake.predict(image).to_labels(fake.thresholds)))
    fake.calls.clear()
    events = []
    gen = iter_auto_scale(fake, [arr], tile_size=256, tile_overlap=96)
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            dets = stop.value[0]
            break
    assert len(fake.calls) == 16 and dets.scale == 1.0  # one pass of 16 tiles
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and max(fractions) <= 0.99
    last_of_tile = {}
    for e in events:
        if e["stage"].startswith("size pass 1 (x1.00): tile "):
            last_of_tile[int(e["stage"].split("tile ")[1].split("/")[0])] = e["fraction"]
    steps = np.diff([0.0] + [last_of_tile[k] for k in sorted(last_of_tile)])
    assert len(steps) == 16 and (steps > 0.02).all()  # every tile moves the bar
    assert fractions[-1] >= 0.75  # the end of the only pass is near the end of the bar
