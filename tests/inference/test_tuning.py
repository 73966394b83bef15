import numpy as np
import pytest

from napari_cellseg.inference.metrics import average_precision
from napari_cellseg.options import Thresholds
from napari_cellseg.inference.predictor import Detections
from napari_cellseg.inference.tuning import sweep, sweep_image


def _fake_detections(rng, shape=(96, 128), n=40):
    """Detections with overlapping boxes, varied scores and blobby probability maps."""
    h, w = shape
    x0 = rng.uniform(-5, w - 10, n)
    y0 = rng.uniform(-5, h - 10, n)
    bw, bh = rng.uniform(6, 30, n), rng.uniform(6, 30, n)
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], 1)
    yy, xx = np.mgrid[0:28, 0:28]
    blob = np.exp(-(((yy - 13.5) / 9) ** 2 + ((xx - 13.5) / 9) ** 2))
    probs = np.clip(blob[None] * rng.uniform(0.6, 1.2, (n, 1, 1)) + rng.normal(0, 0.08, (n, 28, 28)), 0, 1)
    scores = rng.uniform(0.01, 1.0, n)
    return Detections(boxes=boxes, scores=scores, probs=probs, image_shape=shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sweep_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    dets = _fake_detections(rng)
    gt = _fake_detections(rng, n=25).to_labels(0.0, 0.5)  # a plausible, different GT
    confs, masks = [0.05, 0.2, 0.5, 0.8], [0.3, 0.5, 0.7]
    plain = Thresholds(fill_holes=False)  # exact without post-processing
    fast = sweep_image(dets, gt, confs, masks, min_area=3, base=plain)
    slow = np.array([[average_precision(gt, dets.to_labels(c, m, 3)) for m in masks] for c in confs])
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    assert fast.std() > 0  # the grid really changes the score
    # with fill_holes (the default): close; it differs only where a lower-scoring cell that a higher
    # box_conf drops sits inside a kept cell's hole (not refilled)
    filled = sweep_image(dets, gt, confs, masks, min_area=3)
    slow = np.array([[average_precision(gt, dets.to_labels(Thresholds(c, m, 3))) for m in masks]
                     for c in confs])
    np.testing.assert_allclose(filled, slow, atol=0.03)


def test_best_is_argmax_and_table():
    rng = np.random.default_rng(5)
    pairs = []
    for _ in range(3):
        dets = _fake_detections(rng)
        gt = dets.to_labels(0.6, 0.5)  # GT = the model at (0.6, 0.5): that pair must score 1.0
        pairs.append((dets, gt))
    res = sweep(pairs, [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7], base=Thresholds(fill_holes=False))
    i, j = np.unravel_index(np.argmax(res.map), res.map.shape)
    assert res.best["map"] == pytest.approx(res.map.max()) == pytest.approx(1.0)
    assert (res.best["box_conf"], res.best["mask_threshold"]) == (0.6, 0.5)
    assert (res.box_confs[i], res.mask_thresholds[j]) == (0.6, 0.5)
    table = res.to_dict()["table"]
    assert len(table) == 12 and max(r["map"] for r in table) == pytest.approx(res.best["map"])


def test_empty_cases():
    empty = Detections(boxes=np.zeros((0, 4)), scores=np.zeros(0), probs=np.zeros((0, 28, 28)), image_shape=(32, 32))
    gt = np.zeros((32, 32), np.int32)
    assert sweep_image(empty, gt, [0.5], [0.5])[0, 0] == 1.0
    gt[4:10, 4:10] = 1
    assert sweep_image(empty, gt, [0.5], [0.5])[0, 0] == 0.0
    with pytest.raises(ValueError, match="ground truth is 16x16"):
        sweep_image(empty, np.zeros((16, 16), np.int32), [0.5], [0.5])
    with pytest.raises(ValueError, match="no images"):
        sweep([], [0.5], [0.5])


def test_tune_is_a_library_call_returning_a_result(tmp_path):
    """cellseg tune's work without the CLI: PredictOptions + paths in, a TuneResult out."""
    import tifffile

    from conftest import tiny_checkpoint
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.inference.tuning import TuneResult, tune
    from napari_cellseg.io.synthetic import make_image
    from napari_cellseg.options import PredictOptions

    ckpt = tiny_checkpoint(tmp_path / "tiny.bin", thresholds={"box_conf": 0.3, "mask_threshold": 0.4,
                                                              "min_area": 0})
    options = PredictOptions(checkpoint=ckpt, device="cpu")
    images, gt = tmp_path / "images", tmp_path / "gt"
    images.mkdir()
    gt.mkdir()
    pipe = Pipeline.from_options(options)
    image, _ = make_image("nuclei", shape=(96, 128), seed=0)
    tifffile.imwrite(images / "img0.tif", image)
    truth = pipe.predict(images / "img0.tif").to_labels(0.5, 0.4)
    assert truth.max() > 2, "the tiny model must find some cells at the target pair"
    tifffile.imwrite(gt / "img0.tif", truth.astype(np.uint16))
    notes: list[str] = []
    found = tune(options, gt, images, box_confs=[0.3, 0.5], mask_thresholds=[0.4, 0.6], note=notes.append)
    assert isinstance(found, TuneResult) and not found.written
    assert (found.best["box_conf"], found.best["mask_threshold"]) == (0.5, 0.4)
    assert found.best["map"] == pytest.approx(1.0) and found.best["min_area"] == 0
    assert found.to_dict()["n_images"] == 1 and len(found.to_dict()["table"]) == 4
    assert any(n.startswith("object size:") for n in notes)
