"""Predictor / Detections / `cellseg predict` / the torchrun split-merge, on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.model.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from napari_cellseg.model.maskrcnn import ModelConfig, build_model  # noqa: E402
from napari_cellseg.model.devices import DeviceError  # noqa: E402
from napari_cellseg.options import Thresholds  # noqa: E402
from napari_cellseg.inference.predictor import Detections, Predictor, PredictError, drain  # noqa: E402
from napari_cellseg.inference.runner import Runner  # noqa: E402

TINY = dict(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
            min_size=128, max_size=192, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=300,
            box_detections_per_img=150)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = ModelConfig(**TINY)
    model = build_model(config).eval()
    with torch.no_grad():  # random weights would give few boxes: make many pass box_conf 0.5
        model.roi_heads.box_predictor.cls_score.bias[1] = 4.0
    return model, config


def _image(shape, seed=0):
    return np.random.default_rng(seed).random((*shape, 3), dtype=np.float32)


def stock_labels(model, image, box_conf=0.5, mask_threshold=0.5):
    """torchvision's own forward (masks pasted full size) + starter overlap removal, on the
    image as the pipeline gives it to the network (images.py's one intensity rule)."""
    from napari_cellseg.io.images import to_rgb_float

    image = to_rgb_float(image)
    with torch.inference_mode():
        out = model([torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))])[0]
    scores, masks = out["scores"].numpy(), out["masks"][:, 0].numpy() > mask_threshold
    labels, taken, k = np.zeros(image.shape[:2], np.int32), np.zeros(image.shape[:2], bool), 0
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] >= box_conf and (masks[i] & ~taken).any():
            k += 1
            labels[masks[i] & ~taken] = k
            taken |= masks[i]
    return labels, out


def min_instance_iou(a, b):
    n = max(a.max(), b.max())
    inter = np.bincount(a[(a == b) & (a > 0)], minlength=n + 1)[1:]
    union = np.bincount(a.ravel(), minlength=n + 1)[1:] + np.bincount(b.ravel(), minlength=n + 1)[1:] - inter
    return float((inter / np.maximum(union, 1)).min())


# ---- same answer as stock torchvision ---------------------------------------------------------
@pytest.mark.parametrize("shape", [(128, 160), (100, 90)])  # not resized / upscaled by transform
def test_to_labels_matches_stock_torchvision(tiny, shape):
    model, config = tiny
    image = _image(shape)
    ref, out = stock_labels(model, image, 0.5, 0.5)
    dets = Predictor.from_model(model, config).predict(image)
    assert len(dets) == len(out["scores"]) > 50
    np.testing.assert_allclose(dets.boxes, out["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(dets.scores, out["scores"].numpy(), atol=1e-5)
    labels = dets.to_labels(0.5, 0.5)
    assert labels.shape == shape and labels.dtype == np.int32
    assert labels.max() == ref.max() > 20
    assert min_instance_iou(ref, labels) >= 0.98


def test_mask_threshold_and_box_conf_match_stock(tiny):
    model, config = tiny
    image = _image((128, 160), seed=3)
    dets = Predictor.from_model(model, config).predict(image)
    conf = float(np.median(dets.scores))
    ref, _ = stock_labels(model, image, conf, 0.7)
    labels = dets.to_labels(conf, 0.7)
    assert labels.max() == ref.max() and min_instance_iou(ref, labels) >= 0.98


# ---- Detections.to_labels semantics ----------------------------------------------------------
def _dets(boxes, scores, probs=None, shape=(40, 50)):
    probs = np.ones((len(scores), 28, 28), np.float32) if probs is None else probs
    return Detections(np.array(boxes, np.float32), np.array(scores, np.float32), probs, shape)


def test_overlap_goes_to_higher_score_and_ids_descend():
    d = _dets([[5, 5, 20, 20], [12, 12, 30, 30]], [0.6, 0.9])  # given out of order
    assert np.all(np.diff(d.scores) <= 0)
    lab = d.to_labels(0.5, 0.5)
    assert set(np.unique(lab)) == {0, 1, 2}
    assert lab[15, 15] == 1  # overlap: the 0.9 box (id 1) wins
    assert lab[25, 25] == 1 and lab[7, 7] == 2
    assert d.to_labels(0.7, 0.5).max() == 1  # box_conf drops the 0.6 detection


def test_min_area_empty_and_threshold():
    probs = np.full((3, 28, 28), 0.6, np.float32)
    probs[2] = 0.2  # never above threshold 0.5 -> empty -> dropped
    d = _dets([[0, 0, 30, 30], [2, 2, 5, 5], [30, 30, 45, 38]], [0.9, 0.8, 0.7], probs)
    lab = d.to_labels(0.5, 0.5)
    assert lab.max() == 1  # the small box lies inside the bigger, better one; the third is empty
    lab = d.to_labels(0.0, 0.1)
    assert lab.max() == 2 and np.count_nonzero(lab == 2) > 50
    assert d.to_labels(0.0, 0.1, min_area=10_000).max() == 0
    big = int(np.count_nonzero(lab == 1))
    lab = d.to_labels(0.0, 0.1, min_area=big)  # id 2 (smaller) dropped, ids stay consecutive
    assert lab.max() == 1 and np.count_nonzero(lab == 1) == big
    assert d.to_labels(0.5, 0.7).max() == 0
    empty = _dets(np.zeros((0, 4)), [], np.zeros((0, 28, 28), np.float32))
    assert empty.to_labels().shape == (40, 50) and empty.to_labels().max() == 0


def test_paste_geometry_equals_torchvision_paste_masks(tiny):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rng = np.random.default_rng(1)
    h, w = 60, 70
    boxes = np.array([[-4.3, 3.2, 20.7, 30.1], [50.5, 40.2, 75.0, 66.0], [10, 10, 10.4, 11],
                      [30.2, 5.9, 44.8, 20.2]], np.float32)
    probs = rng.random((4, 28, 28)).astype(np.float32)
    pasted = paste_masks_in_image(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes), (h, w))[:, 0]
    for i in range(4):  # one detection at a time: the pasted mask itself
        d = Detections(boxes[i:i + 1], [0.9], probs[i:i + 1], (h, w))
        for thr in (0.3, 0.5, 0.8):
            np.testing.assert_array_equal(d.to_labels(0.5, thr) > 0, pasted[i].numpy() > thr)


def test_crop_cache_is_reused():
    d = _dets([[5, 5, 20, 20]], [0.9])
    d.to_labels()
    cache = d._cache
    d.to_labels(0.1, 0.9)
    assert d._cache is cache


def test_slider_moves_on_cached_detections_equal_a_fresh_drawing():
    """The crops above a mask threshold are cached (a Box confidence move reuses them): any
    sequence of slider moves draws what a fresh Detections draws, rows included."""
    rng = np.random.default_rng(4)
    n, h, w = 40, 70, 90
    xy = rng.uniform(0, 60, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (n, 2))], 1)
    probs = rng.random((n, 28, 28)).astype(np.float32)
    scores = rng.uniform(0, 1, n)
    d = Detections(boxes, scores, probs, (h, w))
    for conf, thr, area in [(0.2, 0.5, 0), (0.6, 0.5, 0), (0.0, 0.5, 12), (0.6, 0.3, 0), (0.2, 0.5, 30),
                            (0.9, 0.5, 0), (0.0, 0.9, 0)]:
        fresh = Detections(boxes, scores, probs, (h, w))
        got, rows = d.to_labels(conf, thr, area, return_rows=True)
        want, want_rows = fresh.to_labels(conf, thr, area, return_rows=True)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(rows, want_rows)
        assert got.max() == len(rows) and set(np.unique(got[got > 0])) == set(range(1, len(rows) + 1))


def test_prepare_computes_what_every_slider_move_reuses():
    """Segment cells calls prepare() in its worker: the moves after it reuse its work."""
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 60, (30, 2))
    d = _dets(np.concatenate([xy, xy + 20], 1), rng.uniform(0, 1, 30), rng.random((30, 28, 28)))
    th = Thresholds(box_conf=0.3, mask_threshold=0.4, fill_holes=True)
    assert d.prepare(th) is d
    crops, state, mosaic = d._cache, d._kept, d._mosaic
    assert crops is not None and "enclosed" in state[1] and mosaic is not None
    for conf in (0.0, 0.5, 0.9):
        d.to_labels(Thresholds(box_conf=conf, mask_threshold=0.4, fill_holes=True))
        assert d._cache is crops and d._kept is state and d._mosaic is mosaic


def test_drawing_equals_painting_every_crop_lowest_score_first():
    """The won pixels come from each crop pixel's best earlier probability (no drawing per
    threshold): the labels must equal painting each detection's crop above the threshold, the
    lowest score first, at thresholds equal to probabilities that occur (exact comparisons)."""
    rng = np.random.default_rng(7)
    n, h, w = 50, 60, 70
    xy = rng.uniform(-5, 55, (n, 2))
    d = Detections(np.concatenate([xy, xy + rng.uniform(3, 35, (n, 2))], 1), rng.uniform(0, 1, n),
                   rng.random((n, 28, 28)).astype(np.float32) ** 3, (h, w))
    pix, ids, prob, offsets = d._crops()[:4]
    for t in (0.0, 0.5, float(prob[len(prob) // 3]), float(prob[len(prob) // 2]), float(np.float32(1e-4))):
        want = np.zeros(h * w, np.int64)
        for r in reversed(range(n)):
            a, z = offsets[r], offsets[r + 1]
            want[pix[a:z][prob[a:z] > np.float32(t)]] = r + 1
        got, got_rows = d.to_labels(0.0, t, return_rows=True)
        np.testing.assert_array_equal(got_rows[got.ravel()[want > 0] - 1], want[want > 0] - 1)
        assert ((got.ravel() > 0) == (want > 0)).all()


def test_post_processing_fill_holes_and_keep_largest():
    """A ring (hole in the middle) with a stray fragment, and a second cell elsewhere."""
    probs = np.zeros((2, 28, 28), np.float32)
    probs[0, 4:24, 4:24] = 0.9
    probs[0, 10:18, 10:18] = 0.1  # the hole
    probs[0, 0:2, 26:28] = 0.9  # a fragment in the corner, apart from the ring
    probs[1, 10:18, 10:18] = 0.8  # cell 2, elsewhere: must stay as it is
    d = _dets([[0, 0, 28, 28], [40, 10, 48, 18]], [0.9, 0.8], probs)
    plain = d.to_labels(0.5, 0.5)
    ring = plain == 1
    from scipy import ndimage

    assert ndimage.label(ring, structure=np.ones((3, 3)))[1] == 2  # ring + fragment
    assert (ndimage.binary_fill_holes(ring) & ~ring).sum() > 20  # a hole
    filled = d.to_labels(0.5, 0.5, fill_holes=True)
    assert np.array_equal(filled == 1, ndimage.binary_fill_holes(ring))
    assert not (ndimage.binary_fill_holes(filled == 1) & ~(filled == 1)).any()
    largest = d.to_labels(0.5, 0.5, keep_largest=True)
    assert ndimage.label(largest == 1, structure=np.ones((3, 3)))[1] == 1
    assert (largest == 1).sum() < ring.sum() and ((largest == 1) <= ring).all()
    assert (largest == 2).sum() == (plain == 2).sum()  # other cells untouched
    both = d.to_labels(Thresholds(box_conf=0.5, mask_threshold=0.5, fill_holes=True, keep_largest=True))
    assert np.array_equal(both, d.to_labels(0.5, 0.5, fill_holes=True, keep_largest=True))
    assert (both == 1).sum() > (largest == 1).sum()


def test_post_processing_leaves_other_cells_pixels():
    """A cell inside another's hole keeps its pixels when the outer one's holes are filled."""
    probs = np.zeros((2, 28, 28), np.float32)
    probs[0, 2:26, 2:26] = 0.9
    probs[0, 9:19, 9:19] = 0.0
    probs[1] = 0.9
    d = _dets([[0, 0, 30, 30], [12, 12, 18, 18]], [0.9, 0.8], probs)
    plain, filled = d.to_labels(0.5, 0.5), d.to_labels(0.5, 0.5, fill_holes=True)
    assert np.array_equal(plain == 2, filled == 2) and (plain == 2).sum() > 20
    assert (filled == 1).sum() > (plain == 1).sum()  # the rest of the hole is filled


# ---- Predictor --------------------------------------------------------------------------------
def test_iter_predict_progress_and_result(tiny):
    model, config = tiny
    gen = Predictor(Runner(model, config, mask_chunk=16)).iter_predict(_image((64, 80)))
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        dets = stop.value
    assert isinstance(dets, Detections) and dets.image_shape == (64, 80)
    stages = [e["stage"] for e in events]
    assert stages[0] == "load" and stages[-1] == "done" and stages.count("masks") >= 2
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert dets.probs.shape == (len(dets), 28, 28) and dets.probs.dtype == np.float32
    assert 0 <= dets.probs.min() and dets.probs.max() <= 1


def test_cancel_between_stages(tiny):
    model, config = tiny
    gen = Predictor.from_model(model, config).iter_predict(_image((64, 80)))
    assert next(gen)["stage"] == "load" and next(gen)["stage"] == "backbone"
    gen.close()  # what a napari worker.quit() amounts to: no further stage runs
    with pytest.raises(StopIteration):
        next(gen)


def test_scale_maps_boxes_to_original_pixels(tiny):
    model, config = tiny
    image = _image((128, 160), seed=2)
    pred = Predictor.from_model(model, config)
    full, half = pred.predict(image), pred.predict(image, scale=0.5)
    assert half.image_shape == full.image_shape == (128, 160)
    assert half.boxes[:, [0, 2]].max() <= 160 and half.boxes[:, [1, 3]].max() <= 128
    assert half.boxes[:, 2].max() > 100  # boxes were scaled back up, not left at half size
    assert not np.allclose(np.sort(half.scores)[:10], np.sort(full.scores)[:10])
    assert half.to_labels(0.5, 0.5).shape == (128, 160)
    with pytest.raises(PredictError):
        pred.predict(image, scale=0)


def test_predict_many_batches_equal_single(tiny):
    model, config = tiny
    images = [_image((96, 128), seed=s) for s in range(3)]
    pred = Predictor.from_model(model, config)
    got = list(pred.predict_many(images, batch_size=2))
    assert [i for i, _ in got] == [0, 1, 2]
    for (_, d), image in zip(got, images):
        single = pred.predict(image)
        np.testing.assert_allclose(d.scores, single.scores, atol=1e-4)
        assert min_instance_iou(single.to_labels(), d.to_labels()) >= 0.98


def test_predict_many_gives_each_size_the_detections_it_gets_alone(tiny):
    """A smaller image padded beside a larger one in one forward got other detections; a batch
    now holds images of one size only."""
    model, config = tiny
    images = [_image((96, 128), seed=0), _image((64, 80), seed=1), _image((96, 128), seed=2)]
    pipe = Predictor.from_model(model, config)
    got = dict(pipe.predict_many(images, batch_size=3))
    for k, image in enumerate(images):
        single = pipe.predict(image)
        assert np.array_equal(got[k].scores, single.scores) and np.array_equal(got[k].boxes, single.boxes)


def test_precision_and_device_errors(tiny):
    model, config = tiny
    with pytest.raises(PredictError, match="fp16"):
        Predictor.from_model(model, config, device="cpu", precision="fp16")
    with pytest.raises(PredictError, match="precision"):
        Predictor.from_model(model, config, precision="int8")
    with pytest.raises(DeviceError):
        Predictor.from_model(model, config, device="nonsense")
    assert Predictor.from_model(model, config, device="cpu", precision="auto").runner.precision in ("fp32", "bf16")


def test_from_checkpoint_keeps_thresholds(tiny, tmp_path):
    model, config = tiny
    path = tmp_path / "m.bin"
    save_checkpoint(path, model, config, thresholds={"box_conf": 0.6, "mask_threshold": 0.4, "min_area": 3})
    pred = Predictor.from_checkpoint(path, device="cpu")
    assert pred.thresholds == Thresholds(box_conf=0.6, mask_threshold=0.4, min_area=3)
    assert pred.runner.config == config
    image = _image((64, 80))
    np.testing.assert_allclose(pred.predict(image).scores, Predictor.from_model(model, config).predict(image).scores,
                               atol=1e-5)
    with pytest.raises(CheckpointError):
        Predictor.from_checkpoint(tmp_path / "missing.bin", device="cpu")


def test_thresholds_changed_by_assignment_and_validated(tiny):
    """Thresholds are read-only; the documented way to change them is assigning a new value."""
    from napari_cellseg.options import OptionError

    model, config = tiny
    pred = Runner(model, config, thresholds={"box_conf": 0.6})
    with pytest.raises(AttributeError):  # frozen
        pred.thresholds.box_conf = 0.3
    pred.thresholds = pred.thresholds.with_overrides(box_conf=0.3)
    assert pred.thresholds == Thresholds(box_conf=0.3)
    pred.thresholds = {"box_conf": 0.4, "min_area": 5}  # a dict is validated into Thresholds
    assert isinstance(pred.thresholds, Thresholds) and pred.thresholds.min_area == 5
    with pytest.raises(OptionError, match="box_conf"):
        pred.thresholds = {"box_conf": 2.0}
    assert pred.thresholds.box_conf == 0.4  # a refused value changes nothing


def test_drain_returns_generator_value():
    def job():
        yield {"stage": "a", "fraction": 0.5}
        return 42
    assert drain(job()) == 42


class _SizedRunner(Runner):
    """Finds square objects of SIZE image px, but only when they look 15..80 px to the network."""

    SIZE = 8.0
    WINDOW = (15, 80)

    def __init__(self):
        super().__init__(torch.nn.Identity(), ModelConfig(diameter=40.0, native_scale=True),
                         {"box_conf": 0.5, "mask_threshold": 0.5, "min_area": 0})
        self.calls = []

    def _forward(self, arrays, scale=1.0, factor=None, box_filter=None):
        scale = factor[0] if factor is not None else scale  # native scale: the factor is the scale
        self.calls.append(scale)
        yield {"stage": "forward", "fraction": 0.5}
        h, w = arrays[0].shape[:2]
        s = self.SIZE
        corners = [(x, y) for y in range(4, h - int(s), 2 * int(s)) for x in range(4, w - int(s), 2 * int(s))]
        if not self.WINDOW[0] <= s * scale <= self.WINDOW[1]:
            corners = []
        boxes = np.array([[x, y, x + s, y + s] for x, y in corners], np.float32).reshape(-1, 4)
        n = len(boxes)
        return [Detections(boxes, np.full(n, 0.9), np.ones((n, 28, 28)), (h, w))]


def test_auto_scale_estimates_size_and_predicts_at_the_model_size():
    image = np.zeros((96, 96, 3), np.float32)
    run = _SizedRunner()
    run.SIZE = 20.0  # found at scale 1: square 20 px = 22.6 px disk-equivalent -> x1.77
    det = Predictor(run).predict(image)  # a model trained with a diameter: "auto" by default
    assert run.calls[0] == 1.0 and len(run.calls) == 2
    assert abs(det.diameter - 2 * 20 / np.sqrt(np.pi)) < 0.5
    assert det.scale == pytest.approx(40 / det.diameter, rel=1e-3) and len(det) == 4
    run = _SizedRunner()
    run.SIZE = 8.0  # too small to be seen at scale 1: retried larger, then refined
    det = Predictor(run).predict(image, scale="auto")
    assert run.calls[:2] == [1.0, 2.5] and len(run.calls) == 3 and len(det) > 4
    assert det.scale == pytest.approx(40 / det.diameter, rel=0.2) and det.scale > 3
    run = _SizedRunner()
    run.WINDOW = (15, 25)  # seen at 2.5x, lost again at the refined 3.5x: the 2.5x result is kept
    det = Predictor(run).predict(image, scale="auto")
    # (the next factor comes from the rounded diameter, 11 px: what typing 11 gives)
    assert run.calls == [1.0, 2.5, pytest.approx(40 / 11)] and det.scale == 2.5 and len(det) > 4
    run = _SizedRunner()
    run.SIZE = 2.0  # never seen: every retry, then the first (empty) result
    det = Predictor(run).predict(image, scale="auto")
    assert run.calls == [1.0, 2.5, 0.4] and len(det) == 0 and det.diameter is None


def test_resolve_scale_and_diameter():
    from napari_cellseg.inference.sizing import resolve_scale

    plain = Runner(torch.nn.Identity(), ModelConfig())
    sized = Runner(torch.nn.Identity(), ModelConfig(diameter=40.0))
    assert resolve_scale(plain) == 1.0 and resolve_scale(sized) == "auto"
    assert Predictor(plain).scale == 1.0 and Predictor(sized).scale == "auto"  # the pipeline's default
    assert resolve_scale(sized, diameter=20) == 2.0 and resolve_scale(plain, diameter=60) == 0.5
    assert resolve_scale(sized, scale=1.5, diameter=20) == 1.5
    assert resolve_scale(sized, diameter="auto") == "auto"
    with pytest.raises(PredictError, match="diameter 1 px would resize the image x40"):
        resolve_scale(sized, diameter=1)
    for bad in (dict(diameter=0), dict(diameter=-3), dict(scale=0), dict(scale="big")):
        with pytest.raises(PredictError):
            resolve_scale(sized, **bad)


def test_size_messages_say_the_factor_used_and_typing_the_size_gives_it():
    """"estimated at N px: resized xF" where typing N gives exactly xF."""
    from napari_cellseg.inference.pipeline import _AutoSize
    from napari_cellseg.inference.sizing import size_message

    from napari_cellseg.inference.sizing import resolve_scale

    sized = Runner(torch.nn.Identity(), ModelConfig(diameter=40.0, native_scale=True))

    def auto_result(measured_px_at_each_pass):
        """Drive one image's auto size with fake measurements -> (Detections, message)."""
        state = _AutoSize(sized.reference_diameter, Thresholds())
        passes = iter(measured_px_at_each_pass)
        while state.result is None:
            d = next(passes)
            side = int(round(d * np.sqrt(np.pi) / 2))  # a square whose disk-equivalent is ~d
            h = 4 * side
            dets = Detections([[side, side, 2 * side, 2 * side]], [0.99], np.ones((1, 28, 28)), (h, h))
            state.update(dets)
        return state.result, size_message(state.result, sized.reference_diameter)

    for measured in (24, 43, 12, 90):
        dets, message = auto_result([measured] * 4)
        typed = resolve_scale(sized, diameter=dets.diameter)
        assert typed == pytest.approx(dets.scale), (measured, message)
        assert f"estimated at {dets.diameter:.0f} px" in message
        factor = message.split("resized x")[1].rstrip(".")
        assert float(factor) == pytest.approx(dets.scale, abs=0.005)
        if abs(measured - 40) / 40 < 0.15:  # close to the model's size: x1, and then it says 40 px
            assert dets.scale == 1.0 and "estimated at 40 px: image resized x1." in message
        else:
            assert dets.scale != 1.0 and not message.endswith("x1.")
    # a stack: planes at different factors give a clear range (size and factor) and the count
    planes = [Detections(np.zeros((0, 4)), [], np.zeros((0, 28, 28)), (8, 8), scale=s, diameter=40 / s)
              for s in (0.4, 1.0, 4.0)]
    assert size_message(planes, 40.0) == "Cell size estimated at 10-100 px: image resized x0.4-x4 (3 planes)."
    assert size_message([Detections(np.zeros((0, 4)), [], np.zeros((0, 28, 28)), (8, 8))], 40.0) == ""


def _naive_postprocess(labels, fill_holes, keep_largest):
    """Every cell, one by one, over the whole image (the definition): first every cell keeps
    its largest piece, then every cell takes the background it encloses."""
    from scipy import ndimage

    out = labels.copy()
    for i in range(1, labels.max() + 1):
        own = out == i
        pieces, n = ndimage.label(own, structure=np.ones((3, 3)))
        if keep_largest and n > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            out[own & (pieces != np.argmax(sizes))] = 0
    for i in range(1, labels.max() + 1):
        own = out == i
        if fill_holes and own.any():
            out[ndimage.binary_fill_holes(own) & ~own & (out == 0)] = i
    return out


@pytest.mark.parametrize("seed", range(6))
def test_post_processing_equals_the_per_cell_definition(seed):
    from napari_cellseg.inference.detections import postprocess

    rng = np.random.default_rng(seed)
    labels = np.zeros((64, 80), np.int32)
    for i in range(1, 25):  # rings, blobs with holes and stray pieces, overlapping
        y, x = rng.integers(0, 60), rng.integers(0, 76)
        r = rng.integers(2, 9)
        yy, xx = np.ogrid[:64, :80]
        d2 = (yy - y) ** 2 + (xx - x) ** 2
        shape = (d2 <= r * r) & (d2 >= rng.integers(0, 2) * (r - 2) ** 2)
        labels[shape & (rng.random((64, 80)) > 0.08)] = i
    for fill, largest in ((True, False), (False, True), (True, True)):
        np.testing.assert_array_equal(postprocess(labels.copy(), fill, largest),
                                      _naive_postprocess(labels, fill, largest))


@pytest.mark.parametrize("seed", range(4))
def test_slider_moves_with_post_processing_equal_the_definition(seed):
    """to_labels computes each cell's won pixels and chosen piece once per mask threshold and
    fills holes only where the drawing has them: every slider sequence must still draw what the
    definition draws (plain drawing -> per-cell keep_largest / fill_holes -> min_area)."""
    rng = np.random.default_rng(seed)
    n, h, w = 60, 90, 110
    xy = rng.uniform(-5, 100, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (n, 2))], 1)
    g = np.linspace(-1, 1, 28)
    r = np.sqrt(g[:, None] ** 2 + g[None, :] ** 2)
    rings = np.exp(-((r - rng.uniform(0.2, 0.7, (n, 1, 1))) ** 2) / 0.05)  # cells with holes
    probs = np.clip(rings + rng.normal(0, 0.15, (n, 28, 28)), 0, 1).astype(np.float32)
    d = Detections(boxes, rng.uniform(0, 1, n), probs, (h, w))
    for conf, thr, area, fill, largest in [(0.0, 0.5, 0, True, False), (0.5, 0.5, 0, True, False),
                                           (0.2, 0.3, 20, True, True), (0.7, 0.3, 0, False, True),
                                           (0.1, 0.6, 5, True, True), (0.1, 0.6, 0, False, False)]:
        got, rows = d.to_labels(conf, thr, area, return_rows=True, fill_holes=fill, keep_largest=largest)
        fresh = Detections(d.boxes, d.scores, d.probs, (h, w))
        plain, plain_rows = fresh.to_labels(conf, thr, return_rows=True)
        want = _naive_postprocess(plain, fill, largest)
        sizes = np.bincount(want.ravel(), minlength=len(plain_rows) + 1)
        keep = np.flatnonzero(sizes[1:] >= max(area, 1))
        lut = np.zeros(len(plain_rows) + 1, np.int32)
        lut[keep + 1] = np.arange(1, len(keep) + 1)
        np.testing.assert_array_equal(got, lut[want], err_msg=str((conf, thr, area, fill, largest)))
        np.testing.assert_array_equal(rows, plain_rows[keep])
        assert fill is False or not (got == 0).all()


def test_auto_size_batched_over_images_equals_one_by_one(tiny):
    """cellseg predict batches every auto-size pass over the images still measuring: same
    factors and detections as predicting each image alone."""
    from napari_cellseg.inference.pipeline import iter_auto_scale

    model, config = tiny
    pred = Runner(model, config)
    arrays = [_image((96, 128), seed=s) for s in (5, 6, 7)]
    together = drain(iter_auto_scale(pred, arrays))
    for array, d in zip(arrays, together):
        alone = drain(iter_auto_scale(pred, [array]))[0]
        assert d.scale == alone.scale and d.image_shape == alone.image_shape
        np.testing.assert_allclose(d.scores, alone.scores, atol=1e-4)
        assert min_instance_iou(alone.to_labels(), d.to_labels()) >= 0.98
    # images of different sizes share a forward too (zero-padded like torchvision's own batching)
    mixed = [_image((96, 128), seed=5), _image((64, 64), seed=6)]
    together = drain(iter_auto_scale(pred, mixed))
    assert [d.image_shape for d in together] == [(96, 128), (64, 64)]
    assert [d.scale for d in together] == [drain(iter_auto_scale(pred, [a]))[0].scale
                                           for a in mixed]


def test_a_forward_stopped_early_leaves_its_thread_out_of_inference_mode(tiny):
    """Inference mode is thread-local: the forward generator must not hold it across a yield,
    or a cancelled napari worker leaves its pooled thread in inference mode and the next
    training job on it fails ("does not require grad")."""
    model, config = tiny
    runner = Predictor.from_model(model, config).runner
    gen = runner.iter_forward([_image((64, 80))], [1.0])
    events = [next(gen), next(gen)]  # stopped mid-forward, as a cancelled worker stops
    assert events[0]["stage"] == "backbone" and not torch.is_inference_mode_enabled()
    gen.close()
    assert not torch.is_inference_mode_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()  # autograd works on this thread afterwards
    assert x.grad is not None
    # and a full forward still runs without grad
    dets = drain(runner.iter_forward([_image((64, 80))], [1.0]))
    assert len(dets) == 1 and not torch.is_inference_mode_enabled()
