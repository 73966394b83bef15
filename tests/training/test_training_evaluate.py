"""training.evaluate / loops.evaluate: val Detections from the Predictor, thresholds from the
shared napari_cellseg.inference.tuning sweep, val mAP measured on the same Detections."""

from __future__ import annotations

import numpy as np

from napari_cellseg.options import Thresholds
import pytest

from napari_cellseg.inference.metrics import average_precision
from napari_cellseg.inference.predictor import Detections
from napari_cellseg.inference.tuning import sweep
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
    assert thr.to_dict()["box_conf"] == thr.box_conf  # what a checkpoint stores
    assert v_map == pytest.approx(1.0)

    other = [fake_detections(rng, n=20).to_labels(0.0, 0.5) for _ in dets]  # a different GT
    v_map, thr = ev.choose_thresholds(dets, other)
    best = sweep(zip(dets, other)).best
    assert (thr.box_conf, thr.mask_threshold) == (best["box_conf"], best["mask_threshold"])
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
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model
    from napari_cellseg.inference.predictor import Predictor
    from training.augment import test_pipeline
    from training.config import TrainConfig
    from training.data import array_samples
    from training.dataset import InstanceDataset
    from training.loops import evaluate

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
    ref = Predictor.from_model(model, mc_native).predict(ds.raw(0)[0], scale=1.0)
    np.testing.assert_allclose(dets[0].scores, ref.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dets[0].to_labels(0.5, 0.5), ref.to_labels(0.5, 0.5))
    model.train()


def _val_case(n=3, shape=(96, 128)):
    """A tiny model as the engine builds it (no resize in the transform) and ``n`` synthetic
    cell images of ``shape`` in a val InstanceDataset."""
    torch = pytest.importorskip("torch")
    from conftest import TINY_MODEL
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model
    from napari_cellseg.io.synthetic import make_image
    from training.augment import test_pipeline
    from training.data import array_samples
    from training.dataset import InstanceDataset
    from training.engine import _no_resize

    torch.manual_seed(0)
    mc = ModelConfig(**{**TINY_MODEL, "anchor_sizes": (8, 16, 32, 64, 128)})
    model = build_model(mc)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = 4.0  # random weights: make boxes pass
    model.transform.resize = _no_resize
    pairs = [make_image("cells", shape, seed=s, diameter=16) for s in range(n)]
    ds = InstanceDataset(array_samples([p[0] for p in pairs], [p[1] for p in pairs]), test_pipeline(0, 0))
    return model, mc, ds


def _two_pass(model, mc, ds, n_map, pipeline=None):
    """The validation of before the one-pass step: a train-mode forward of the whole model for
    the losses, then the val Pipeline's predict for the Detections (per image, in this order)."""
    import torch
    from training.dataset import expand_masks

    pipe = pipeline or ev.val_predictor(model, mc, "cpu")
    losses, dets = [], []
    for i in range(len(ds)):
        image, target = ds[i]
        with torch.no_grad():
            model.train()
            losses.append({k: float(v) for k, v in model([image], [expand_masks(target)]).items()})
        if i < n_map:
            model.eval()
            dets.append(pipe.predict(image.permute(1, 2, 0).numpy()))
    model.train()
    return losses, dets


def _same_detections(a, b, exact=True):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) > 0 and x.image_shape == y.image_shape and x.scale == y.scale
        if not exact:  # a batched backbone: the same numbers up to float rounding
            np.testing.assert_allclose(x.scores, y.scores, rtol=1e-5)
            np.testing.assert_allclose(x.boxes, y.boxes, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(x.probs, y.probs, atol=1e-4)
            continue
        np.testing.assert_array_equal(x.scores, y.scores)
        np.testing.assert_array_equal(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.probs, y.probs)
        np.testing.assert_array_equal(x.to_labels(0.5, 0.5), y.to_labels(0.5, 0.5))


def test_one_pass_validation_equals_the_two_pass_path():
    """loops.evaluate runs the backbone once per val image: the same val loss (fp tolerance:
    the backbone input is channels_last, as in the pipeline) and the same Detections, bit for bit,
    as the train-mode forward + Predictor path; images beyond max_val_images: loss only."""
    import torch
    from training.config import TrainConfig
    from training.loops import evaluate

    model, mc, ds = _val_case()
    torch.manual_seed(1)
    ref_losses, ref_dets = _two_pass(model, mc, ds, n_map=2)
    torch.manual_seed(1)  # the proposal sampling draws: the same draws in the same order
    calls = []
    hook = model.backbone.register_forward_hook(lambda *a: calls.append(1))
    gen = evaluate(model, ds, torch.device("cpu"), 1, TrainConfig(max_val_images=2, model=mc), None)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            loss, mask_loss, dets = stop.value
            break
    hook.remove()
    assert len(calls) == len(ds)  # one backbone forward per val image (two before)
    assert model.training
    assert loss == pytest.approx(np.mean([sum(r.values()) for r in ref_losses]), rel=1e-4)
    assert mask_loss == pytest.approx(np.mean([r["loss_mask"] for r in ref_losses]), rel=1e-4)
    _same_detections(dets, ref_dets)


def test_val_step_batched_per_image_losses_and_tiled_images_as_the_pipeline():
    """val_step over a batch of same-shape images: each image's losses are those of its own
    one-image forward (same sampling draws) and the Detections those of pipeline.predict (up to
    the float rounding of a batched backbone); one image: bit for bit; an image the pipeline
    tiles gets the pipeline's tiled Detections."""
    import torch
    from training.dataset import expand_masks

    model, mc, ds = _val_case()
    pipe = ev.val_predictor(model, mc, "cpu")
    torch.manual_seed(1)
    ref_losses, ref_dets = _two_pass(model, mc, ds, n_map=len(ds), pipeline=pipe)
    arrays = [ds[i][0].permute(1, 2, 0).numpy() for i in range(len(ds))]
    targets = [expand_masks(ds[i][1]) for i in range(len(ds))]
    torch.manual_seed(1)
    losses, dets = ev.val_step(pipe, arrays, targets)
    for got, ref in zip(losses, ref_losses):
        assert list(got) == list(ref)
        for k in ref:
            assert float(got[k]) == pytest.approx(ref[k], rel=1e-4, abs=1e-6)
    _same_detections(dets, ref_dets, exact=False)
    torch.manual_seed(1)
    _same_detections(ev.val_step(pipe, arrays[:1], targets[:1])[1], ref_dets[:1])
    assert ev.val_step(pipe, arrays[:1], targets[:1], detect=False)[1] is None

    pipe.tile_size, pipe.tile_overlap = 64, 16  # these images are now tiled by the pipeline
    tiled = [pipe.predict(a) for a in arrays[:1]]
    _, dets = ev.val_step(pipe, arrays[:1], targets[:1])
    _same_detections(dets, tiled)
    model.train()
