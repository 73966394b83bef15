"""training.evaluate / engine.evaluate: val Detections from the Predictor, thresholds from the
shared napari_cellseg.tuning sweep, val mAP measured on the same Detections."""

from __future__ import annotations

import numpy as np

from napari_cellseg.options import Thresholds
import pytest

from napari_cellseg.metrics import average_precision
from napari_cellseg.predict import Detections
from napari_cellseg.tuning import sweep
from training import evaluate as ev


def fake_detections(rng, shape=(96, 128), n=30):
    h, w = shape
    x0, y0 = rng.uniform(-5, w - 10, n), rng.uniform(-5, h - 10, n)
    bw, bh = rng.uniform(6, 30, n), rng.uniform(6, 30, n)
    yy, xx = np.mgrid[0:28, 0:28]
    blob = np.exp(-(((yy - 13.5) / 9) ** 2 + ((xx - 13.5) / 9) ** 2))
    probs = np.clip(blob[None] * rng.uniform(0.6, 1.2, (n, 1, 1)) + rng.normal(0, 0.08, (n, 28, 28)), 0, 1)
    return Detections(boxes=np.stack([x0, y0, x0 + bw, y0 + bh], 1), scores=rng.uniform(0.01, 1.0, n),
                      probs=probs, image_shape=shape)


def test_choose_thresholds_is_the_sweep_argmax_and_map_is_measured():
    rng = np.random.default_rng(3)
    dets = [fake_detections(rng) for _ in range(3)]
    # GT = the model at (0.65, 0.35) with the default post-processing: must score 1.0
    gts = [d.to_labels(Thresholds(box_conf=0.65, mask_threshold=0.35)) for d in dets]
    v_map, thr = ev.choose_thresholds(dets, gts)
    assert (thr.box_conf, thr.mask_threshold) == (pytest.approx(0.65), pytest.approx(0.35))
    assert isinstance(thr, Thresholds)  # the checkpoint's "thresholds" content, one type everywhere
    assert {**thr}["box_conf"] == thr.box_conf  # still reads like the old dict
    assert v_map == pytest.approx(1.0)

    other = [fake_detections(rng, n=20).to_labels(0.0, 0.5) for _ in dets]  # a different GT
    v_map, thr = ev.choose_thresholds(dets, other)
    best = sweep(zip(dets, other)).best
    assert (thr["box_conf"], thr["mask_threshold"]) == (best["box_conf"], best["mask_threshold"])
    direct = np.mean([average_precision(g, d.to_labels(thr))
                      for d, g in zip(dets, other)])
    assert v_map == pytest.approx(direct)
    assert abs(best["map"] - direct) < 0.03  # the sweep's shortcut with fill_holes (tuning.py)

    v_fixed, thr_fixed = ev.choose_thresholds(dets, other, tune=False)
    assert thr_fixed == Thresholds(box_conf=0.5, mask_threshold=0.5)
    assert v_fixed == pytest.approx(np.mean([average_precision(g, d.to_labels(Thresholds()))
                                             for d, g in zip(dets, other)]))
    assert v_fixed <= v_map
    assert ev.choose_thresholds([], []) == (0.0, Thresholds())


def test_engine_evaluate_uses_predictor_once_per_image_and_restores_train_mode():
    torch = pytest.importorskip("torch")
    from napari_cellseg.model import ModelConfig, build_model
    from napari_cellseg.predict import Predictor
    from training.augment import test_pipeline
    from training.config import TrainConfig
    from training.data import InstanceDataset, array_samples
    from training.engine import evaluate

    torch.manual_seed(0)
    mc = ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
                     rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=50,
                     anchor_sizes=(8, 16, 32, 64, 128))
    model = build_model(mc)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = 4.0  # random weights: make boxes pass
    rng = np.random.default_rng(0)
    images = [rng.random((64, 64)).astype(np.float32) for _ in range(3)]
    labels = []
    for _ in range(3):
        lab = np.zeros((64, 64), np.int32)
        lab[10:30, 10:30], lab[35:55, 30:60] = 1, 2
        labels.append(lab)
    ds = InstanceDataset(array_samples(images, labels), test_pipeline(0, 0))
    config = TrainConfig(max_val_images=2, model=mc)
    model.train()
    gen = evaluate(model, ds, torch.device("cpu"), 1, config, labels)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            loss, mask_loss, dets = stop.value
            break
    assert [e["step"] for e in events] == [1, 2, 3] and all(e["stage"] == "val" for e in events)
    assert np.isfinite(loss) and np.isfinite(mask_loss)
    assert len(dets) == 2 and all(isinstance(d, Detections) and d.image_shape == (64, 64) for d in dets)
    assert len(dets[0]) > 0
    assert model.training  # back in train mode for the next epoch
    # same inference as the Segment widget's Predictor (native scale: the size trained on)
    mc_native = ModelConfig.from_dict({**mc.to_dict(), "native_scale": True})
    ref = Predictor(model, mc_native).predict(ds.raw(0)[0])
    np.testing.assert_allclose(dets[0].scores, ref.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dets[0].to_labels(0.5, 0.5), ref.to_labels(0.5, 0.5))
    model.train()
