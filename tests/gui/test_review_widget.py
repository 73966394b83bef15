"""The "Review" widget in a real napari viewer (run under ``xvfb-run -a``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_cellseg.gui.review import widget as _review  # noqa: E402
from napari_cellseg.gui.layers import Result, result_of  # noqa: E402
from napari_cellseg.inference.metrics import THRESHOLDS, evaluate_image  # noqa: E402
from napari_cellseg.options import Thresholds  # noqa: E402

TIMEOUT = 20_000


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_CELLSEG_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setattr(_review, "show_error", lambda msg: None)


def _hand_case():
    """GT: cells 1 (found), 2 (missed). Prediction: 5 matches GT 1, 7 is a false positive."""
    gt = np.zeros((40, 60), np.int32)
    gt[5:15, 5:15] = 1
    gt[25:35, 40:52] = 2
    pred = np.zeros_like(gt)
    pred[5:15, 6:15] = 5  # IoU 0.9 with GT 1
    pred[20:30, 15:25] = 7  # nothing there
    return gt, pred


def _review_widget(viewer, qtbot):
    w = _review.ReviewWidget(viewer)
    qtbot.addWidget(w)
    viewer.window.add_dock_widget(w)
    return w


def _wait_score(qtbot, w, check=lambda s: True):
    qtbot.waitUntil(lambda: w.score is not None and check(w.score), timeout=TIMEOUT)
    return w.score


def test_hand_made_tp_fp_fn_colours(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    gt, pred = _hand_case()
    viewer.add_labels(gt, name="truth")
    viewer.add_labels(pred, name="guess")
    w = _review_widget(viewer, qtbot)
    w.pred_combo.setCurrentText("guess")
    w.gt_combo.setCurrentText("truth")
    score = _wait_score(qtbot, w)
    assert (score.tp, score.fp, score.fn) == (1, 1, 1)
    overlay = viewer.layers["guess review"]
    o = overlay.data
    assert o[10, 10] == _review.TP and o[25, 20] == _review.FP and o[30, 45] == _review.FN
    assert o[2, 2] == 0 and o[5, 10] == 0  # background and cell border stay clear
    # the colours the layer paints: TP green, FP orange/red, FN magenta
    rgba = {k: np.asarray(overlay.colormap.map(np.array([k])))[0] for k in (1, 2, 3)}
    assert rgba[1][1] > 0.7 and rgba[1][0] < 0.3 and rgba[1][2] < 0.4  # green
    assert rgba[2][0] > 0.9 and rgba[2][2] < 0.2  # orange-red
    assert rgba[3][0] > 0.9 and rgba[3][2] > 0.9 and rgba[3][1] < 0.3  # magenta
    assert np.asarray(overlay.colormap.map(np.array([0])))[0][3] == 0  # background transparent
    text = w.summary.text()
    assert "TP 1" in text and "FP 1" in text and "missed 1" in text
    # chosen IoU 0.95: the 0.9-IoU match is no longer a TP
    w.iou_spin.setValue(0.95)
    score = _wait_score(qtbot, w, lambda s: s.iou == 0.95)
    assert (score.tp, score.fp, score.fn) == (0, 2, 2)
    o = viewer.layers["guess review"].data
    assert o[10, 10] == _review.FP  # the poorly placed prediction stays visible...
    assert o[5, 10] == o[14, 10] == _review.FN  # ...with the missed GT cell outlined on top


def test_numbers_equal_cellseg_evaluate(make_napari_viewer, qtbot, tmp_path, capsys):
    import tifffile

    from napari_cellseg.commands.main import main
    from napari_cellseg.io.synthetic import make_image

    _, gt = make_image("nuclei", shape=(120, 160), seed=3)
    pred = gt.copy()
    pred[:, :70] = np.roll(gt, 2, axis=0)[:, :70]  # shifted cells: lower IoUs
    pred[pred == pred.max()] = 0  # a missed cell
    pred[100:115, 140:155] = pred.max() + 5  # a false one
    for d, lab in (("gt", gt), ("pred", pred)):
        (tmp_path / d).mkdir()
        tifffile.imwrite(tmp_path / d / "img.tif", lab.astype(np.uint16))
    assert main(["evaluate", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred"),
                 "--json", "--iou", "0.7"]) == 0
    cli = json.loads(capsys.readouterr().out)["images"][0]

    viewer = make_napari_viewer()
    viewer.add_labels(gt, name="img gt")
    viewer.add_labels(pred, name="img pred")
    w = _review_widget(viewer, qtbot)
    w.pred_combo.setCurrentText("img pred")
    w.gt_combo.setCurrentText("img gt")
    w.iou_spin.setValue(0.7)
    score = _wait_score(qtbot, w, lambda s: s.iou == 0.7)
    assert 0.2 < score.map < 0.99
    assert score.map == pytest.approx(cli["map"], abs=1e-12)
    assert {f"{t:.2f}": v for t, v in score.per_threshold.items()} == pytest.approx(cli["per_threshold"])
    assert (score.tp, score.fp, score.fn, score.n_gt, score.n_pred) == (
        cli["tp"], cli["fp"], cli["fn"], cli["n_gt"], cli["n_pred"])
    assert f"mAP {cli['map']:.3f}" in w.summary.text()
    heights = [p.get_height() for p in w.bar_fig.axes[0].patches]
    assert heights == pytest.approx([cli["per_threshold"][f"{t:.2f}"] for t in THRESHOLDS])

    # a hand edit of the prediction (paint) updates the numbers (debounced)
    layer = viewer.layers["img pred"]
    layer.paint((60, 80), int(pred.max()) + 9, refresh=True)
    layer.brush_size = 30
    layer.paint((20, 20), 0, refresh=True)
    new = _wait_score(qtbot, w, lambda s: s is not score)
    assert new.map == pytest.approx(evaluate_image(gt, np.asarray(layer.data), iou=0.7).map)
    assert new.map != pytest.approx(score.map)


def _fake_detections(rng, shape=(96, 128), n=40):
    from napari_cellseg.inference.predictor import Detections

    h, w = shape
    x0, y0 = rng.uniform(-5, w - 10, n), rng.uniform(-5, h - 10, n)
    bw, bh = rng.uniform(8, 30, n), rng.uniform(8, 30, n)
    yy, xx = np.mgrid[0:28, 0:28]
    blob = np.exp(-(((yy - 13.5) / 9) ** 2 + ((xx - 13.5) / 9) ** 2))
    probs = np.clip(blob[None] * rng.uniform(0.6, 1.2, (n, 1, 1)) + rng.normal(0, 0.08, (n, 28, 28)), 0, 1)
    return Detections(boxes=np.stack([x0, y0, x0 + bw, y0 + bh], 1), scores=rng.uniform(0.01, 1.0, n),
                      probs=probs, image_shape=shape)


def test_sweep_heat_map_and_use_best(make_napari_viewer, qtbot):
    from napari_cellseg.gui.segment.widget import SegmentWidget
    from napari_cellseg.inference.tuning import sweep

    dets = _fake_detections(np.random.default_rng(7))
    gt = dets.to_labels(0.65, 0.35)  # the truth is the model at (0.65, 0.35): that pair scores 1
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((96, 128), np.float32), name="img")
    viewer.add_labels(gt, name="img truth", metadata={"image_id": "img"})
    cells = viewer.add_labels(dets.to_labels(0.5, 0.5), name="img cells")
    cells.metadata["napari_cellseg"] = Result(image_id="img", image_layer="img", detections=dets,
                                              thresholds=Thresholds(0.5, 0.5, 0))
    seg = SegmentWidget(viewer)
    qtbot.addWidget(seg)
    viewer.window.add_dock_widget(seg)
    seg.image_combo.setCurrentText("img")
    w = _review_widget(viewer, qtbot)
    assert w.pred_combo.currentText() == "img cells"  # a Segment result is preferred
    assert w.gt_combo.currentText() == "img truth"  # matched by image id
    before = _wait_score(qtbot, w)
    assert before.map < 1.0

    w.run_sweep()
    qtbot.waitUntil(lambda: w.sweep_result is not None and w._worker is None, timeout=TIMEOUT)
    res = w.sweep_result
    assert res.map.shape == (10, 10)
    np.testing.assert_allclose(res.map, sweep([(dets, gt)]).map)  # same numbers as the core
    i, j = np.unravel_index(np.argmax(res.map), res.map.shape)
    assert (res.best["box_conf"], res.best["mask_threshold"]) == (res.box_confs[i], res.mask_thresholds[j])
    assert (res.best["box_conf"], res.best["mask_threshold"]) == (0.65, 0.35)
    ax = w.heat_fig.axes[0]
    assert ax.get_xlabel() == "Mask threshold" and ax.get_ylabel() == "Box confidence"
    assert ax.images[0].get_array().shape == (10, 10)
    star = ax.lines[0].get_data()
    assert (star[0][0], star[1][0]) == (0.35, 0.65)
    assert "0.65" in w.sweep_label.text() and w.use_best_btn.isEnabled()

    w.use_best()  # sets the Segment sliders, which redraw the labels
    assert seg.box_slider.value() == pytest.approx(0.65)
    assert seg.mask_slider.value() == pytest.approx(0.35)
    np.testing.assert_array_equal(cells.data, gt)
    after = _wait_score(qtbot, w, lambda s: s.map == 1.0)
    assert (after.fp, after.fn) == (0, 0)
    # the slider path (in-place redraw + refresh) also updates the review
    seg.box_slider.setValue(0.2)
    lower = _wait_score(qtbot, w, lambda s: s.map < 1.0)
    assert lower.map == pytest.approx(evaluate_image(gt, dets.to_labels(0.2, 0.35)).map)
    assert result_of(cells).thresholds.box_conf == pytest.approx(0.2)


def test_sweep_uses_the_layers_post_processing(make_napari_viewer, qtbot):
    """The sweep scores masks the way the layer draws them: its fill_holes / keep_largest /
    min_area, not the defaults (as `cellseg tune` does)."""
    from napari_cellseg.inference.tuning import sweep

    dets = _fake_detections(np.random.default_rng(3))
    layer_th = {"box_conf": 0.5, "mask_threshold": 0.5, "min_area": 30, "fill_holes": False,
                "keep_largest": True}
    gt = dets.to_labels(Thresholds.from_dict({**layer_th, "box_conf": 0.65, "mask_threshold": 0.35}))
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((96, 128), np.float32), name="img")
    viewer.add_labels(gt, name="img truth", metadata={"image_id": "img"})
    cells = viewer.add_labels(dets.to_labels(Thresholds.from_dict(layer_th)), name="img cells")
    cells.metadata["napari_cellseg"] = Result(image_id="img", image_layer="img", detections=dets,
                                              thresholds=Thresholds.from_dict(layer_th))
    _, w = viewer.window.add_plugin_dock_widget("napari-cellseg", "Review")
    w.pred_combo.setCurrentText("img cells")
    w.gt_combo.setCurrentText("img truth")
    w.run_sweep()
    qtbot.waitUntil(lambda: w.sweep_result is not None and w._worker is None, timeout=TIMEOUT)
    res = w.sweep_result
    expected = sweep([(dets, gt)], base=Thresholds.from_dict(layer_th))
    np.testing.assert_allclose(res.map, expected.map)
    assert not np.allclose(res.map, sweep([(dets, gt)], min_area=30).map)  # defaults differ
    assert (res.best["box_conf"], res.best["mask_threshold"]) == (0.65, 0.35)


def test_sweep_without_segment_result_says_why(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    gt, pred = _hand_case()
    viewer.add_labels(gt, name="truth")
    viewer.add_labels(pred, name="guess")
    w = _review_widget(viewer, qtbot)
    w.pred_combo.setCurrentText("guess")
    w.gt_combo.setCurrentText("truth")
    w.run_sweep()
    assert w.sweep_result is None and "Segment cells" in w.sweep_label.text()


def test_plugin_menu_review_never_compares_a_layer_with_itself(make_napari_viewer, qtbot):
    """Docked from the Plugins menu with only a ground truth open, Review must
    not score it against itself (it showed mAP 1.000); the overlay keeps the layer selection;
    Use best reaches the Segment widget through the registry."""
    from napari_cellseg.gui import registry

    viewer = make_napari_viewer()
    gt, pred = _hand_case()
    viewer.add_labels(gt, name="nuclei ground truth", metadata={"image_id": "nuclei"})
    _, w = viewer.window.add_plugin_dock_widget("napari-cellseg", "Review")
    assert type(w.viewer).__name__ == "PublicOnlyProxy" and registry.lookup(viewer, "review") is w
    qtbot.wait(300)
    assert w.pred_combo.currentText() == "" and w.gt_combo.currentText() == "nuclei ground truth"
    assert w.score is None and "1.000" not in w.summary.text()
    # a prediction appears: it is paired with the ground truth, never with itself
    lyr = viewer.add_labels(pred, name="nuclei cells",
                            metadata={"napari_cellseg": Result("nuclei", "nuclei")})
    viewer.layers.selection.active = lyr
    score = _wait_score(qtbot, w)
    assert w.pred_combo.currentText() == "nuclei cells" and w.gt_combo.currentText() == "nuclei ground truth"
    assert (score.tp, score.fp, score.fn) == (1, 1, 1) and score.map < 1
    assert viewer.layers.selection.active.name == "nuclei cells"  # not the overlay
    for i in range(w.gt_combo.count()):
        assert w.gt_combo.itemText(i) != w.pred_combo.currentText()


def test_choose_pair_roles():
    """Ground truth (flagged, from a CSV, or named so) is never the prediction; a new result is;
    no layer is offered in one list while chosen in the other."""
    from napari_cellseg.gui.review.overlay import OTHER, RESULT, TRUTH, choose_pair, layer_kind

    assert layer_kind("nuclei ground truth", {}, False) == TRUTH
    assert layer_kind("img_gt", {}, False) == TRUTH
    assert layer_kind("img cells", {"source_csv": "train.csv"}, False) == TRUTH
    assert layer_kind("mine", {"ground_truth": True}, False) == TRUTH
    assert layer_kind("img cells", {}, True) == RESULT
    assert layer_kind("paint", {}, False) == OTHER
    assert layer_kind("gutter", {}, False) == OTHER  # "gt" inside a word is not a flag
    layers = [("truth", TRUTH, "img"), ("img cells", RESULT, "img")]
    for order in (layers, layers[::-1]):
        preds, gts, pred, gt = choose_pair(order)
        assert (pred, gt) == ("img cells", "truth") and preds == ["img cells"] and gts == ["truth"]
    # the user's choices are kept while valid; a new result takes over the prediction
    three = [("truth", TRUTH, "a"), ("a cells", RESULT, "a"), ("b cells", RESULT, "b")]
    assert choose_pair(three, "b cells", "truth")[2:] == ("b cells", "truth")
    assert choose_pair(three, "b cells", "truth", new=["a cells"])[2:] == ("a cells", "truth")
    # a stale choice that now names a result cannot stay ground truth
    assert choose_pair(three, None, "a cells")[2:] == ("a cells", "truth")
    # only ground truth: no prediction; a lone hand layer is ground truth, not both
    assert choose_pair([("truth", TRUTH, None)])[2:] == (None, "truth")
    assert choose_pair([("paint", OTHER, None)])[2:] == (None, "paint")
    preds, gts, pred, gt = choose_pair([("p", OTHER, None), ("q", OTHER, None)])
    assert pred != gt and pred not in gts and gt not in preds


def test_no_overlay_without_a_valid_pair(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    gt, pred = _hand_case()
    viewer.add_labels(gt, name="truth")
    _, w = viewer.window.add_plugin_dock_widget("napari-cellseg", "Review")
    qtbot.wait(300)
    assert [x.name for x in viewer.layers] == ["truth"]  # no "truth review"
    viewer.add_labels(pred, name="guess", metadata={"napari_cellseg": Result("img", "img")})
    _wait_score(qtbot, w)
    assert "guess review" in viewer.layers and "truth review" not in viewer.layers
    viewer.layers.remove("guess")
    qtbot.waitUntil(lambda: "guess review" not in viewer.layers, timeout=TIMEOUT)
    assert [x.name for x in viewer.layers] == ["truth"]


def test_overlay_equals_the_find_boundaries_definition():
    """The overlay (computed with shifts and look-up tables, fast on large images) is the
    skimage find_boundaries / isin definition, cells on the image border included."""
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(5)
    gt = np.zeros((60, 80), np.int32)
    pred = np.zeros_like(gt)
    for k in range(1, 25):
        y, x = rng.integers(0, 55), rng.integers(0, 75)
        h, w = rng.integers(4, 12, 2)
        gt[y:y + h, x:x + w] = k
        if k % 4:  # most cells found, a pixel or two off; every 4th missed
            dy, dx = rng.integers(0, 2, 2)
            pred[y + dy:y + h + dy, x + dx:x + w + dx] = 100 + k
    gt[0, :10] = 40
    pred[-3:, -5:] = 300
    for iou in (0.5, 0.75):
        score = evaluate_image(gt, pred, iou=iou)
        want = np.zeros(pred.shape, np.uint8)
        want[np.isin(pred, score.tp_pred)] = _review.TP
        want[np.isin(pred, score.fp_pred)] = _review.FP
        want[find_boundaries(pred, mode="inner")] = 0
        fn_labels = np.where(np.isin(gt, score.fn_gt), gt, 0)
        fn = fn_labels > 0
        want[fn & (pred == 0)] = _review.FN
        want[find_boundaries(fn_labels, mode="inner")] = 0
        want[find_boundaries(fn_labels, mode="thick") & (fn | (want == 0))] = _review.FN
        assert score.tp and score.fp and score.fn
        np.testing.assert_array_equal(_review.overlay_labels(gt, pred, score), want)
