"""The "Segment cells" widget driven in a real napari viewer (run under ``xvfb-run -a``).

A tiny random-weight Mask R-CNN (convnext_atto, box_score_thresh 0) gives plenty of detections
on a 96x128 image within a second on CPU.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_cellseg.gui.segment import widget as _widget  # noqa: E402
from napari_cellseg.gui.layers import result_of  # noqa: E402

TIMEOUT = 120_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from napari_cellseg.gui.torch_guard import import_torch

    import_torch()  # as the widget does: never a raw torch import next to OpenGL (see _torch_guard)
    import torch

    from napari_cellseg.model.checkpoint import save_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32,
                      box_head_size=128, box_score_thresh=0.0, min_size=128, max_size=128,
                      box_detections_per_img=60)
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.bin"
    save_checkpoint(path, model, cfg, thresholds={"box_conf": 0.3, "mask_threshold": 0.4, "min_area": 0})
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_CELLSEG_CONFIG_DIR", str(tmp_path / "config"))
    errors = []
    monkeypatch.setattr(_widget, "show_error", errors.append)
    monkeypatch.setattr(_widget, "show_info", lambda msg: None)
    # the two questions the widget asks (a modal dialog would block the test): a test that
    # meets one sets the answer; unanswered, Segment stops and Reset does nothing
    monkeypatch.setattr(_widget.SegmentWidget, "_ask_keep_edits", lambda self, name: None)
    monkeypatch.setattr(_widget.SegmentWidget, "_confirm", lambda self, question: False)
    return errors


@pytest.fixture
def errors(_isolated):
    return _isolated


@pytest.fixture
def forward_calls(monkeypatch):
    from napari_cellseg.inference.runner import Runner

    calls = []
    orig = Runner._forward

    def counted(self, *a, **k):
        calls.append(1)
        return (yield from orig(self, *a, **k))

    monkeypatch.setattr(Runner, "_forward", counted)
    return calls


def _image(seed=0, shape=(96, 128)):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for cy, cx in rng.uniform(10, min(shape) - 10, (8, 2)):
        img += 120 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 36)
    return img.astype(np.uint16)


def _widget_with(make_napari_viewer, qtbot, checkpoint, image=None, name="img"):
    """Open the widget the way users do: Plugins > Cell segmentation > Segment cells (napari
    then hands it a PublicOnlyProxy of the viewer)."""
    viewer = make_napari_viewer()
    if image is not False:
        viewer.add_image(_image() if image is None else image, name=name)
    _, w = viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
    if checkpoint is not None:
        w.set_checkpoint(checkpoint)
    qtbot.waitUntil(lambda: w._torch_ready, timeout=TIMEOUT)
    return viewer, w


def _segment(qtbot, w):
    qtbot.waitUntil(lambda: w._torch_ready, timeout=TIMEOUT)
    w.segment()
    qtbot.waitUntil(lambda: w._worker is None, timeout=TIMEOUT)


def test_segment_sliders_edit_export_roundtrip(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path,
                                               forward_calls, errors):
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    assert not w.box_slider.isEnabled()  # nothing to tune before Segment
    _segment(qtbot, w)
    assert errors == []
    lyr = viewer.layers["img cells"]
    assert len(forward_calls) == 1
    # sliders start at the checkpoint's stored thresholds
    assert w.box_slider.value() == pytest.approx(0.3)
    assert w.mask_slider.value() == pytest.approx(0.4)
    bound = {str(k) for k in lyr.keymap}
    assert {"Shift+D", "Shift+M", "Shift+N", "Shift+R"} <= bound, bound
    n0 = int(lyr.data.max())
    assert n0 > 0 and w.count_label.text() == f"{n0} cells"

    # box confidence: all detections at 0, none at 1
    w.box_slider.setValue(0.0)
    n_all = int(lyr.data.max())
    w.box_slider.setValue(1.0)
    assert int(lyr.data.max()) == 0 and w.count_label.text() == "0 cells"
    w.box_slider.setValue(0.0)
    assert int(lyr.data.max()) == n_all >= n0
    # mask threshold changes the drawing
    before = lyr.data.copy()
    w.mask_slider.setValue(0.95)
    assert not np.array_equal(before, lyr.data)
    w.mask_slider.setValue(0.4)
    w.area_spin.setValue(10_000)
    assert int(lyr.data.max()) == 0
    w.area_spin.setValue(0)
    assert len(forward_calls) == 1  # the network ran once for all of that

    # a second Segment reuses the cached model and the layer (not stacked up)
    _segment(qtbot, w)
    assert len(forward_calls) == 2 and len(w._predictors) == 1
    assert [x.name for x in viewer.layers] == ["img", "img cells"]

    # hand edit: paint a new cell; the sliders lock and the edit survives a slider move
    lyr.paint((5, 5), 999, refresh=True)
    n_edit = len(np.unique(lyr.data)) - 1
    qtbot.waitUntil(lambda: w.count_label.text().startswith(f"{n_edit} cells (hand-edited"))
    assert result_of(lyr).edited and not w.reset_btn.isHidden()
    assert not w.box_slider.isEnabled()
    edited = lyr.data.copy()
    w.box_slider.setValue(1.0)
    np.testing.assert_array_equal(lyr.data, edited)
    assert (lyr.data == 999).any()

    # Segment asks before touching hand edits (answered "Cancel" here: nothing runs)
    _segment(qtbot, w)
    assert "hand edits are unchanged" in w.status.text() and len(forward_calls) == 2
    np.testing.assert_array_equal(lyr.data, edited)

    # export, then re-open through napari's reader and compare
    out = tmp_path / "sub.csv"
    w._ask_save_path = lambda: str(out)
    w.export()
    assert out.is_file(), errors
    layers = viewer.open(str(out), plugin="napari-cellseg")
    assert len(layers) == 1 and layers[0] is not lyr
    np.testing.assert_array_equal(layers[0].data > 0, lyr.data > 0)
    ids = np.unique(lyr.data[lyr.data > 0])
    for new_id, old_id in enumerate(ids, start=1):  # exported in ascending id -> 1..N
        np.testing.assert_array_equal(layers[0].data == new_id, lyr.data == old_id)

    # Reset to model: the drawing comes back from Detections, sliders work again
    w._confirm = lambda question: True
    w.reset_to_model()
    assert w.reset_btn.isHidden() and w.box_slider.isEnabled()
    assert not (lyr.data == 999).any()
    assert len(forward_calls) == 2


def test_edit_actions_are_undoable(make_napari_viewer, qtbot):
    from napari_cellseg.gui.segment import edit as _edit

    viewer = make_napari_viewer()
    data = np.zeros((20, 20), np.int32)
    data[2:6, 2:6], data[10:15, 10:15], data[2:6, 12:16] = 3, 7, 9
    lyr = viewer.add_labels(data.copy(), name="x cells")
    _edit.track_strokes(lyr)  # the widget does this for its result layers (bind_edit_keys)
    viewer.cursor.position = (12, 12)
    assert _edit.delete_cell(lyr, viewer) == 7
    assert not (lyr.data == 7).any()
    lyr.undo()
    assert (lyr.data == 7).sum() == 25
    lyr.selected_label = 3
    assert _edit.merge_cells(lyr, viewer) == (3, 7)
    assert (lyr.data == 3).sum() == 16 + 25
    assert _edit.renumber(lyr) == 2
    assert set(np.unique(lyr.data)) == {0, 1, 2}
    lyr.undo(), lyr.undo()
    np.testing.assert_array_equal(lyr.data, data)
    lyr.selected_label = 3
    lyr.paint((17, 17), 3)
    new = _edit.new_id_for_last_stroke(lyr)
    assert new == 10 and (lyr.data == 10).any() and (lyr.data[2:6, 2:6] == 3).all()
    viewer.cursor.position = (0, 0)
    with pytest.raises(_edit.EditError, match="background"):
        _edit.delete_cell(lyr, viewer)


def test_cancel_running_job(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    from napari_cellseg.inference import pipeline

    def slow(self, image, scale=None, tile="auto"):
        for i in range(2000):
            time.sleep(0.01)
            yield {"stage": "slow", "fraction": i / 2000}
        raise AssertionError("not cancelled")

    monkeypatch.setattr(pipeline.Pipeline, "iter_predict", slow)  # the widget runs the Pipeline
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    w.segment()
    qtbot.waitUntil(lambda: w.status.text().startswith("Segmenting: slow"), timeout=TIMEOUT)
    assert w.cancel_btn.isEnabled() and not w.segment_btn.isEnabled()
    w.cancel()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10_000)
    assert "Cancelled" in w.status.text()
    assert "img cells" not in viewer.layers and w.segment_btn.isEnabled()


def test_stack_plane_and_3d_view(make_napari_viewer, qtbot, tiny_checkpoint, errors):
    stack = np.stack([_image(s) for s in range(3)])
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint, image=stack, name="stack")
    viewer.dims.ndisplay = 3
    w.segment()
    assert "stack" in errors[-1] and "2D view" in errors[-1] and w._worker is None
    viewer.dims.ndisplay = 2
    viewer.dims.set_current_step(0, 1)
    _segment(qtbot, w)
    lyr = viewer.layers["stack cells"]
    assert lyr.data.shape == stack.shape
    assert lyr.data[1].max() > 0 and lyr.data[0].max() == 0 and lyr.data[2].max() == 0
    w.box_slider.setValue(1.0)
    assert lyr.data[1].max() == 0


def test_all_planes_of_a_stack(make_napari_viewer, qtbot, tiny_checkpoint, forward_calls, tmp_path,
                               errors):
    from napari_cellseg.io.annotations import read_annotations

    stack = np.stack([_image(s) for s in range(3)])
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint, image=stack, name="stack")
    assert w.all_planes.isEnabled()
    events = []
    orig = w._on_progress
    w._on_progress = lambda e: (events.append(e), orig(e))
    w.all_planes.setChecked(True)
    viewer.dims.set_current_step(0, 1)
    _segment(qtbot, w)
    assert errors == [] and len(forward_calls) == 3  # once per plane
    lyr = viewer.layers["stack cells"]
    assert lyr.data.shape == stack.shape and all(lyr.data[z].max() > 0 for z in range(3))
    assert {e["stage"].split(":")[0] for e in events} >= {"plane 1/3", "plane 3/3"}
    r = result_of(lyr)
    assert sorted(r.segmented()) == [(0,), (1,), (2,)] and r.plane == (1,)  # review: plane shown
    n = sum(int(lyr.data[z].max()) for z in range(3))
    assert w.count_label.text() == f"{n} cells in 3 planes"
    w.box_slider.setValue(1.0)  # one slider redraws every plane, no new forward pass
    assert lyr.data.max() == 0 and len(forward_calls) == 3
    w.box_slider.setValue(0.0)
    assert all(lyr.data[z].max() > 0 for z in range(3))
    # export: one id per plane, named like `cellseg predict` names stack planes
    out = tmp_path / "stack.csv"
    w._ask_save_path = lambda: str(out)
    w.export()
    assert read_annotations(out).ids == ["stack_000", "stack_001", "stack_002"]
    # a 2D image: the option does not apply
    viewer.add_image(_image(), name="flat")
    w.image_combo.setCurrentText("flat")
    assert not w.all_planes.isEnabled()


def test_hand_edits_made_while_segment_runs_are_kept(make_napari_viewer, qtbot, tiny_checkpoint,
                                                    monkeypatch, errors):
    """Painting on the result layer while Segment runs must not be overwritten by the run."""
    from napari_cellseg.inference import pipeline

    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    _segment(qtbot, w)
    lyr = viewer.layers["img cells"]
    orig, gate = pipeline.Pipeline.iter_predict, []

    def gated(self, image, *a, **k):
        while not gate:
            time.sleep(0.01)
            yield {"stage": "gated", "fraction": 0.1}
        return (yield from orig(self, image, *a, **k))

    monkeypatch.setattr(pipeline.Pipeline, "iter_predict", gated)
    w.segment()
    qtbot.waitUntil(lambda: "gated" in w.status.text(), timeout=TIMEOUT)
    lyr.paint((5, 5), 999, refresh=True)
    edited = lyr.data.copy()
    assert (edited == 999).any()
    gate.append(1)
    qtbot.waitUntil(lambda: w._worker is None, timeout=TIMEOUT)
    np.testing.assert_array_equal(lyr.data, edited)
    assert result_of(lyr).edited and "Reset to model" in errors[-1]
    qtbot.waitUntil(lambda: not w.reset_btn.isHidden())


def test_new_id_for_last_stroke_forgets_strokes_when_the_data_is_replaced(make_napari_viewer, qtbot,
                                                                        tiny_checkpoint, errors):
    """After Reset to model (or any redraw) the old stroke's pixels belong to model cells: the
    shortcut must refuse instead of splitting them off as a new cell."""
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    w.box_slider.setValue(0.0)
    _segment(qtbot, w)
    lyr = viewer.layers["img cells"]
    assert lyr.data.max() > 0
    covered = tuple(np.argwhere(lyr.data > 0)[0])
    lyr.selected_label = int(lyr.data.max()) + 5
    lyr.paint(covered, lyr.selected_label, refresh=True)  # a stroke over a model cell
    qtbot.waitUntil(lambda: not w.reset_btn.isHidden())
    w._confirm = lambda question: True
    w.reset_to_model()
    drawn = lyr.data.copy()
    assert drawn[covered] > 0
    w._edit_action("new_id")
    assert errors and "nothing painted yet" in errors[-1]
    np.testing.assert_array_equal(lyr.data, drawn)
    # a new stroke is remembered again
    lyr.paint((2, 2), 77, refresh=True)
    w._edit_action("new_id")
    assert w.status.text().startswith("last stroke is now cell")


def test_segment_never_overwrites_a_foreign_layer_of_the_same_name(make_napari_viewer, qtbot,
                                                                    tiny_checkpoint, errors):
    # ground truth opened from a train.csv is named "<id> cells", like the result layer
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    gt = np.zeros((96, 128), np.int32)
    gt[10:20, 10:20] = 7
    viewer.add_labels(gt.copy(), name="img cells", metadata={"image_id": "img"})
    w.image_combo.setCurrentText("img")
    _segment(qtbot, w)
    assert errors == []
    np.testing.assert_array_equal(viewer.layers["img cells (kept)"].data, gt)
    assert result_of(viewer.layers["img cells"]) is not None
    assert "kept as 'img cells (kept)'" in w.status.text()


def test_cancel_all_planes_keeps_nothing(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch):
    from napari_cellseg.inference import pipeline

    calls = []

    def slow(self, image, scale=None, tile="auto"):
        calls.append(1)
        steps = 200 if len(calls) < 2 else 6000  # plane 2 runs until cancelled (60 s at most), so
        for i in range(steps):                   # a slow event loop cannot let plane 3 start first
            time.sleep(0.01)
            yield {"stage": "slow", "fraction": i / steps}
        return None

    monkeypatch.setattr(pipeline.Pipeline, "iter_predict", slow)  # the widget runs the Pipeline
    stack = np.stack([_image(s) for s in range(4)])
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint, image=stack, name="stack")
    w.all_planes.setChecked(True)
    w.segment()
    qtbot.waitUntil(lambda: w.status.text().startswith("Segmenting: plane 2/4"), timeout=TIMEOUT)
    w.cancel()
    qtbot.waitUntil(lambda: w._worker is None, timeout=10_000)
    assert "Cancelled" in w.status.text() and len(calls) == 2
    assert "stack cells" not in viewer.layers


def test_bad_input_notifies_and_writes_nothing(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path,
                                               errors):
    viewer, w = _widget_with(make_napari_viewer, qtbot, None, image=False)
    w.segment()
    assert "no image layer" in errors[-1]
    viewer.add_image(_image(), name="img")
    # no model: the bundled model may or may not be installed; an explicit bad file must fail
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    w.set_checkpoint(bad)
    _segment(qtbot, w)
    assert "Segmentation failed" in errors[-1] and "bad.bin" in errors[-1]
    assert "img cells" not in viewer.layers
    # export with nothing segmented
    out = tmp_path / "nothing.csv"
    w._ask_save_path = lambda: str(out)
    w.export()
    assert "nothing segmented" in errors[-1] and not out.exists()
    # a CSV without sizes for an image that is not open
    csv = tmp_path / "unknown.csv"
    csv.write_text("id,predicted\nnot_open,1 5\n")
    with pytest.raises(Exception, match="image size unknown"):
        viewer.open(str(csv), plugin="napari-cellseg")
    assert [x.name for x in viewer.layers] == ["img"]


def test_missing_model_message(make_napari_viewer, qtbot, monkeypatch, tmp_path, errors):
    from napari_cellseg.model import checkpoint

    monkeypatch.setattr(checkpoint, "bundled_model_path", lambda: tmp_path / "absent.bin")
    viewer, w = _widget_with(make_napari_viewer, qtbot, None)
    assert w.model_combo.count() == 0
    w.segment()
    assert "Browse" in errors[-1] and w._worker is None


def test_demo_setup(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_cellseg.gui.demo import setup_demo
    from napari_cellseg.commands.main import main

    viewer = make_napari_viewer()
    w = setup_demo(viewer, sample="nuclei", checkpoint=tiny_checkpoint)
    assert "Segment cells (napari-cellseg)" in viewer.window.dock_widgets
    assert w.image_combo.currentText() == "nuclei"
    assert w.model_combo.currentData() == str(tiny_checkpoint.resolve())
    assert viewer.layers["nuclei"].data.ndim == 2
    # the checkpoint choice is remembered by the next widget
    w2 = _widget.SegmentWidget(viewer)
    assert w2.model_combo.currentData() == str(tiny_checkpoint.resolve())
    w2.close()
    # a bad checkpoint fails before any window opens: one line, exit code 2
    assert main(["demo", "--no-run", "--checkpoint", "/no/such/model.bin"]) == 2


def test_rgb_image_segments(make_napari_viewer, qtbot, tiny_checkpoint, errors):
    rgb = np.stack([_image(5).astype(np.uint8)] * 3, axis=-1)
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint, image=rgb, name="rgb")
    assert viewer.layers["rgb"].rgb
    _segment(qtbot, w)
    assert errors == []
    lyr = viewer.layers["rgb cells"]
    assert lyr.data.shape == rgb.shape[:2] and lyr.data.max() > 0


def test_cell_diameter_control(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path, forward_calls, errors):
    import dataclasses

    from napari_cellseg.model.checkpoint import load_checkpoint, save_checkpoint

    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    assert w.diameter_spin.text() == "auto"  # default: the model's own size handling
    w.diameter_spin.setValue(15)  # the tiny model has no trained size: reference 30 px -> x2
    _segment(qtbot, w)
    res = result_of(viewer.layers["img cells"])
    assert errors == [] and res.detections.scale == pytest.approx(2.0) and len(forward_calls) == 1
    assert "Image resized x2." in w.status.text()
    # a size-normalised model: "auto" measures the cells first and says what it found
    model, cfg, thr, _ = load_checkpoint(tiny_checkpoint)
    sized = tmp_path / "sized.bin"
    save_checkpoint(sized, model, dataclasses.replace(cfg, diameter=20.0), thresholds=thr)
    w.set_checkpoint(sized)
    w.diameter_spin.setValue(0)
    _segment(qtbot, w)
    res = result_of(viewer.layers["img cells"])
    assert errors == [] and res.detections.diameter > 0 and len(forward_calls) >= 3
    assert res.detections.scale == pytest.approx(min(4.0, 20.0 / res.detections.diameter), rel=0.2)
    assert f"Cell size estimated at {res.detections.diameter:.0f} px" in w.status.text()


def test_plugin_menu_path_locks_edits_resets_and_never_warns(make_napari_viewer, qtbot, tiny_checkpoint,
                                                             errors):
    """Through napari's proxy, a paint or fill stroke (the layer's own
    path) locks the sliders and shows Reset; Segment names a button that is on screen; no
    FutureWarning from private attribute access."""
    import warnings

    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    assert type(w.viewer).__name__ == "PublicOnlyProxy"
    # the checkpoint's thresholds are on the sliders before the first run
    assert w.box_slider.value() == pytest.approx(0.3) and w.mask_slider.value() == pytest.approx(0.4)
    assert w.segment_btn.isEnabled()
    _segment(qtbot, w)
    lyr = viewer.layers["img cells"]
    status = w.status.text()
    assert "cells in img" in status
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        w.box_slider.setValue(0.0)
        w.mask_slider.setValue(0.5)
    assert w.status.text() == status  # slider moves do not clear the message
    assert w.reset_btn.isHidden()

    lyr.paint((5, 5), 999, refresh=True)
    qtbot.waitUntil(lambda: not w.reset_btn.isHidden())
    assert not w.box_slider.isEnabled() and "hand-edited" in w.count_label.text()
    edited = lyr.data.copy()
    w.box_slider.setValue(1.0)
    np.testing.assert_array_equal(lyr.data, edited)
    w.segment()  # the question is answered "Cancel": nothing runs, nothing changes
    assert "cancelled" in w.status.text() and not w.reset_btn.isHidden() and w._worker is None
    w.reset_to_model()  # asked first; answered "Cancel"
    np.testing.assert_array_equal(lyr.data, edited)
    assert result_of(lyr).edited
    w._confirm = lambda question: True
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        w.reset_to_model()
    assert w.box_slider.isEnabled() and w.reset_btn.isHidden() and not result_of(lyr).edited
    assert 999 not in lyr.data

    # a fill is an edit too; "New id for last stroke" takes the stroke from the paint event
    lyr.fill((90, 120), 555)
    qtbot.waitUntil(lambda: not w.reset_btn.isHidden())
    w._edit_action("new_id")
    new = int(lyr.data.max())
    assert 555 not in lyr.data and lyr.data[90, 120] == new
    assert w.status.text() == f"last stroke is now cell {new}"


def test_window_fits_a_small_saved_size(make_napari_viewer, qtbot):
    """A tiny saved window size is grown (bounded by the screen), via public napari API."""
    from napari_cellseg.gui.layout import available_screen, fit_size, fit_window

    assert fit_size((640, 480), (1280, 800)) == (1280, 800)
    assert fit_size((2000, 1500), (1280, 800)) == (1280, 800)
    assert fit_size((1400, 900), (1600, 1000)) == (1400, 900)
    viewer = make_napari_viewer()
    viewer.window.resize(640, 480)
    sw, sh = available_screen()
    assert fit_window(viewer) == (min(1280, sw), min(800, sh))
    assert tuple(viewer.window.geometry()[2:]) == (min(1280, sw), min(800, sh))


def test_three_docks_fit_a_laptop_screen(make_napari_viewer, qtbot, tmp_path):
    """Segment, Review and Train docked from the Plugins menu fit 1280x800:
    the docks scroll instead of growing the window, and the canvas keeps >= 400 px. Run under
    ``xvfb-run -s "-screen 0 1280x800x24"`` to see it on a laptop-sized screen (any larger
    screen works too: the window is set to 1280x800)."""
    from qtpy.QtWidgets import QApplication, QScrollArea

    from napari_cellseg.gui.layout import MIN_CANVAS, available_screen

    viewer = make_napari_viewer(show=True)
    viewer.add_image(_image(), name="img")
    viewer.window.resize(640, 480)  # a tiny saved window size
    docks = {}
    for name in ("Segment cells", "Review", "Train model"):
        _, docks[name] = viewer.window.add_plugin_dock_widget("napari-cellseg", name)
    sw, sh = available_screen()
    qtbot.waitUntil(lambda: tuple(viewer.window.geometry()[2:]) == (min(1280, sw), min(800, sh)),
                    timeout=10_000)  # re-fitted after docking
    viewer.window.resize(1280, 800)
    for _ in range(20):
        QApplication.processEvents()
    _, _, ww, wh = viewer.window.geometry()
    assert (ww, wh) == (1280, 800)  # docking did not grow the window
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    ratio = QApplication.primaryScreen().devicePixelRatio()
    assert canvas.shape[1] / ratio >= MIN_CANVAS, canvas.shape
    for name, w in docks.items():
        dock = viewer.window.dock_widgets[f"{name} (napari-cellseg)"].parent()
        assert dock.height() <= wh and dock.width() <= ww // 2, (name, dock.size())
        assert w.findChild(QScrollArea) is not None  # what does not fit scrolls
    viewer.screenshot(str(tmp_path / "laptop.png"), canvas_only=False, flash=False)
    assert (tmp_path / "laptop.png").stat().st_size > 10_000
    qtbot.waitUntil(lambda: docks["Segment cells"]._torch_ready, timeout=TIMEOUT)


def test_channel_picker_lists_a_files_channels_and_segments_them(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                 tmp_path, monkeypatch, errors):
    """A 2-channel CxYxX TIFF opened with napari's own reader: the picker offers its channels by
    the names in its metadata (before: red / green / blue for any image, and the file was a
    stack of two planes), and Segment predicts one image from the chosen cell + nuclear
    channels, as cellseg predict --channel 2 --channel2 1 does."""
    import tifffile

    from napari_cellseg.inference import pipeline
    from napari_cellseg.options import ImageInput

    seen = []
    orig = pipeline.Pipeline.as_image

    def record(self, image):
        seen.append((self.input, np.asarray(image).shape))
        return orig(self, image)

    monkeypatch.setattr(pipeline.Pipeline, "as_image", record)
    two = np.stack([_image(1), _image(2)])
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, two, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "actin"]}})
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint, image=False)
    viewer.open(str(path), plugin="napari")
    qtbot.waitUntil(lambda: w.image_combo.currentText() == "two", timeout=10_000)
    labels = [w.channel_combo.itemText(i) for i in range(w.channel_combo.count())]
    assert labels == ["all channels", "1: DAPI", "2: actin"]
    assert [w.channel2_combo.itemText(i) for i in range(w.channel2_combo.count())] == ["none", "1: DAPI", "2: actin"]
    w.channel_combo.setCurrentIndex(2)
    w.channel2_combo.setCurrentIndex(1)
    _segment(qtbot, w)
    assert errors == []
    assert seen == [(ImageInput(channel=2, channel2=1), (96, 128, 2))]
    assert viewer.layers["two cells"].data.shape == (96, 128)
    viewer.add_image(_image(3), name="grey")  # a grey image offers its one channel
    w.image_combo.setCurrentText("grey")
    assert [w.channel_combo.itemText(i) for i in range(w.channel_combo.count())] == [
        "grey image", "1: channel 1"]
    assert not w.channel2_combo.isEnabled()


def test_a_slider_on_one_image_never_changes_anothers_size_estimate(make_napari_viewer, qtbot, tmp_path,
                                                                   monkeypatch, errors):
    """The auto size measured the cells with the sliders' thresholds: box confidence 0.2 left
    from image A made image B's estimate 17 px instead of 40. It uses the model's own now."""
    import torch

    from napari_cellseg.inference import pipeline
    from napari_cellseg.model.checkpoint import save_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
                      box_score_thresh=0.0, box_detections_per_img=60, native_scale=True, diameter=40.0)
    ckpt = tmp_path / "sized.bin"
    save_checkpoint(ckpt, build_model(cfg), cfg, thresholds={"box_conf": 0.6, "mask_threshold": 0.45})
    used = []
    orig = pipeline._AutoSize.__init__

    def record(self, reference, thresholds):
        used.append((thresholds.box_conf, thresholds.mask_threshold))
        orig(self, reference, thresholds)

    monkeypatch.setattr(pipeline._AutoSize, "__init__", record)
    viewer, w = _widget_with(make_napari_viewer, qtbot, ckpt, name="A")
    viewer.add_image(_image(5), name="B")
    w.image_combo.setCurrentText("A")
    _segment(qtbot, w)
    w.box_slider.setValue(0.2)
    w.mask_slider.setValue(0.2)
    w.image_combo.setCurrentText("B")
    _segment(qtbot, w)
    assert errors == []
    assert result_of(viewer.layers["B cells"]).thresholds.box_conf == pytest.approx(0.2)  # shown at 0.2
    assert used == [(0.6, 0.45), (0.6, 0.45)]  # ...but sized with the model's own thresholds


def test_calibrate_writes_the_diameter_and_segment_agrees(make_napari_viewer, qtbot, tiny_checkpoint,
                                                          errors):
    """Calibrate measures the cells (the automatic size estimate), writes the diameter into the
    box, and the resize factor it reports is the one Segment then uses for that diameter."""
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    assert w.diameter_spin.text() == "auto"
    w.calibrate()
    qtbot.waitUntil(lambda: w._worker is None, timeout=TIMEOUT)
    assert errors == []
    d = w.diameter_spin.value()
    assert d > 0 and f"{d:.0f} px" in w.status.text()
    import re

    scale = float(re.search(r"resized x(\d+(?:\.\d+)?)", w.status.text()).group(1))
    _segment(qtbot, w)
    res = result_of(viewer.layers["img cells"])
    assert res.detections.scale == pytest.approx(scale, abs=0.006)


def test_segment_and_calibrate_run_the_pipeline_with_the_forms_options(make_napari_viewer, qtbot,
                                                                       tiny_checkpoint, monkeypatch, errors):
    """The widget builds PredictOptions from its form (device, diameter, thresholds)
    and predicts through pipeline.Pipeline, like the CLI, tune and training validation."""
    from napari_cellseg.inference import pipeline
    from napari_cellseg.options import PredictOptions

    seen = []
    orig = pipeline.Pipeline.__init__

    def record(self, runner, options=None):
        seen.append(options)
        orig(self, runner, options)

    monkeypatch.setattr(pipeline.Pipeline, "__init__", record)
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    w.device_combo.setCurrentText("cpu")
    w.diameter_spin.setValue(20)
    w.box_slider.setValue(0.1)  # not the checkpoint's 0.3
    w.largest_check.setChecked(True)
    _segment(qtbot, w)
    assert errors == []
    options = [o for o in seen if isinstance(o, PredictOptions) and o.checkpoint == str(tiny_checkpoint)]
    assert options, seen
    o = options[-1]
    assert (o.device, o.diameter, o.box_conf, o.keep_largest) == ("cpu", 20.0, pytest.approx(0.1), True)
    r = result_of(viewer.layers["img cells"])
    # the run used (and the sliders keep) the form's thresholds, not the checkpoint's
    assert r.thresholds.box_conf == pytest.approx(0.1) and r.thresholds.keep_largest is True
    assert w.box_slider.value() == pytest.approx(0.1) and w.largest_check.isChecked()
    seen.clear()
    w.calibrate()
    qtbot.waitUntil(lambda: w._worker is None, timeout=TIMEOUT)
    assert [o.diameter for o in seen if isinstance(o, PredictOptions)] == ["auto"]


def test_every_control_has_a_tooltip(make_napari_viewer, qtbot):
    """Every button, box, slider and field of the three docks explains itself
    (its own tooltip or that of the control group it sits in)."""
    from qtpy.QtWidgets import (QAbstractButton, QAbstractSlider, QAbstractSpinBox, QComboBox,
                                QLineEdit, QScrollBar)

    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="img")
    for name in ("Segment cells", "Review", "Train model"):
        _, dock = viewer.window.add_plugin_dock_widget("napari-cellseg", name)
        missing = []
        for kind in (QAbstractButton, QAbstractSlider, QAbstractSpinBox, QComboBox, QLineEdit):
            for c in dock.findChildren(kind):
                if isinstance(c, QScrollBar):
                    continue
                w, tip = c, ""
                while w is not None and w is not dock and not tip:
                    tip, w = w.toolTip(), w.parentWidget()
                if not tip:
                    missing.append(f"{type(c).__name__} {getattr(c, 'text', lambda: '')()!r}")
        assert not missing, (name, missing)
    qtbot.waitUntil(lambda: viewer.window.dock_widgets["Segment cells (napari-cellseg)"]._torch_ready,
                    timeout=TIMEOUT)


def test_segment_waits_for_pytorch_loading_on_a_worker(make_napari_viewer, qtbot, tiny_checkpoint,
                                                      monkeypatch):
    """PyTorch loads on a worker; meanwhile Segment (and Calibrate) are
    disabled with a message, and the GUI thread never imports it."""
    import threading

    from napari_cellseg.gui.segment import jobs as _jobs

    seen = []
    real = _jobs.load_torch_job

    def slow_job(checkpoint=None):
        seen.append(threading.current_thread() is threading.main_thread())
        return real(checkpoint)

    monkeypatch.setattr(_widget, "load_torch_job", slow_job)
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="img")
    _, w = viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
    assert not w._torch_ready  # the worker has not reported yet (no event loop ran)
    assert not w.segment_btn.isEnabled() and not w.calibrate_btn.isEnabled()
    assert w.segment_btn.toolTip() == _widget.BUSY_TIP
    w.segment()  # ignored while loading
    assert w._worker is None
    qtbot.waitUntil(lambda: w._torch_ready, timeout=TIMEOUT)
    assert seen and seen[0] is False  # ran off the GUI thread
    assert w.segment_btn.isEnabled() and w.segment_btn.toolTip() == _widget.SEGMENT_TIP


def test_napari_compat_adapter(make_napari_viewer, qtbot):
    """The one module touching napari internals works with the installed napari (see
    pyproject's napari pin): identity through the Plugins-menu proxy, undo reset, pop-ups."""
    import warnings

    from napari.utils._proxies import PublicOnlyProxy

    from napari_cellseg.gui.compat import close_notifications, reset_undo_history, same_layer, scene_canvas

    viewer = make_napari_viewer(show=True)  # a shown window, so a pop-up on it is visible
    from vispy.scene import SceneCanvas

    assert isinstance(scene_canvas(PublicOnlyProxy(viewer)), SceneCanvas)  # bench_slider's repaint
    lyr = viewer.add_labels(np.zeros((10, 10), np.int32), name="x")
    other = viewer.add_labels(np.zeros((10, 10), np.int32), name="y")
    proxy = PublicOnlyProxy(viewer)
    a, b = proxy.layers["x"], proxy.layers["x"]
    assert a is not b and same_layer(a, b) and same_layer(a, lyr) and not same_layer(a, other)
    assert not same_layer(a, None)
    lyr.paint((5, 5), 3)
    assert lyr.data[5, 5] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        reset_undo_history(a)
    lyr.undo()  # nothing left to undo: the stroke stays
    assert lyr.data[5, 5] == 3
    # a pop-up on the window (made the way napari's notification manager makes one) is closed
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    toast = NapariQtNotification("covering the canvas", "info", parent=viewer.window._qt_window)
    toast.show()
    qtbot.waitUntil(toast.isVisible, timeout=2000)
    assert close_notifications(proxy) == 1
    qtbot.waitUntil(lambda: not toast.isVisible(), timeout=2000)


# ---- the docks as a user meets them ----------------------------------------------------------
def _dock_from_menu(viewer, qtbot, name):
    """Trigger the Plugins menu's own action for ``name`` (what a user clicks)."""
    def actions(menu):
        for a in menu.actions():
            if a.menu() is not None:
                yield from actions(a.menu())
            else:
                yield a

    action = next(a for a in actions(viewer.window.plugins_menu) if a.text().replace("&", "") == name)
    action.trigger()
    docks = {k: v for k, v in viewer.window.dock_widgets.items() if k.startswith(name + " (")}
    assert len(docks) == 1, list(viewer.window.dock_widgets)
    return next(iter(docks.values()))


def _visible(widget) -> bool:
    """On screen: shown, inside its scroll area's viewport, not clipped away."""
    return widget.isVisible() and not widget.visibleRegion().isEmpty()


@pytest.mark.parametrize("path", ["menu", "api"])
def test_three_docks_are_tabbed_and_segment_keeps_its_controls(make_napari_viewer, qtbot, tiny_checkpoint,
                                                               path, tmp_path):
    """With Segment cells, Review and Train model docked at 1280x800 (the Plugins menu's actions,
    or add_plugin_dock_widget), the docks share one tab group: Segment cells keeps its Segment
    button and sliders on screen, names are readable, the canvas keeps >= 400 px."""
    from qtpy.QtWidgets import QApplication

    from napari_cellseg.gui.layout import MIN_CANVAS, dock_of

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1280, 800)
    viewer.add_image(_image(), name="img")
    docks = {}
    for name in ("Segment cells", "Review", "Train model"):
        if path == "menu":
            docks[name] = _dock_from_menu(viewer, qtbot, name)
        else:
            docks[name] = viewer.window.add_plugin_dock_widget("napari-cellseg", name)[1]
        QApplication.processEvents()
    seg = docks["Segment cells"]
    qtbot.waitUntil(lambda: seg._torch_ready, timeout=TIMEOUT)
    viewer.window.resize(1280, 800)
    main = dock_of(seg).parentWidget()
    tabbed = set(main.tabifiedDockWidgets(dock_of(seg)))
    assert {dock_of(docks["Review"]), dock_of(docks["Train model"])} <= tabbed
    dock_of(seg).raise_()
    for _ in range(20):
        QApplication.processEvents()
    assert dock_of(seg).height() >= 500, dock_of(seg).size()
    for control in (seg.segment_btn, seg.box_slider, seg.mask_slider, seg.count_label):
        assert _visible(control), control
    seg.set_checkpoint(tiny_checkpoint)
    titles = {dock_of(w).windowTitle() for w in docks.values()}
    assert titles == {"Segment cells", "Review", "Train model"}  # tab texts fit
    for combo in (seg.image_combo, seg.model_combo, seg.device_combo, seg.format_combo, seg.scope_combo):
        text_px = combo.fontMetrics().horizontalAdvance(combo.currentText())
        assert text_px + 24 <= combo.width(), (combo.currentText(), text_px, combo.width())
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert canvas.shape[1] / QApplication.primaryScreen().devicePixelRatio() >= MIN_CANVAS


def test_image_picker_follows_the_active_and_the_new_image(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_image(0), name="a")
    viewer.add_image(_image(1), name="b")
    _, w = viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
    viewer.layers.selection.active = viewer.layers["a"]
    assert w.image_combo.currentText() == "a"
    viewer.add_image(_image(2), name="c")  # newly opened: the one to segment
    assert w.image_combo.currentText() == "c"
    viewer.layers.selection.active = viewer.layers["b"]
    assert w.image_combo.currentText() == "b"
    viewer.add_labels(np.zeros((96, 128), np.int32), name="paint")  # not an image: no change
    assert w.image_combo.currentText() == "b"
    qtbot.waitUntil(lambda: w._torch_ready, timeout=TIMEOUT)


def _paint_cell(lyr, box, value):
    y0, y1, x0, x1 = box
    for y in range(y0, y1):
        for x in range(x0, x1):
            lyr.paint((y, x), value, refresh=False)
    lyr.refresh()


def test_segment_again_keeps_the_hand_edited_cells_or_starts_over(make_napari_viewer, qtbot,
                                                                  tiny_checkpoint, tmp_path, errors):
    """After hand edits, Segment (e.g. with a new model from Train model) asks: keep the
    hand-edited cells and fill the rest from the model, start over, or cancel. Kept cells
    survive slider moves; Reset asks first."""
    import shutil

    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint)
    w.box_slider.setValue(0.0)
    _segment(qtbot, w)
    lyr = viewer.layers["img cells"]
    lyr.brush_size = 1
    _paint_cell(lyr, (40, 52, 60, 75), 900)  # a hand-drawn cell
    qtbot.waitUntil(lambda: not w.reset_btn.isHidden())
    hand = lyr.data == 900
    assert hand.sum() == 12 * 15
    untouched = lyr.data.copy()

    asked = []
    w._ask_keep_edits = lambda name: asked.append(name) or None
    w.segment()
    assert asked == ["img cells"] and w._worker is None
    np.testing.assert_array_equal(lyr.data, untouched)  # cancelled: nothing changed

    newer = tmp_path / "fine_tuned.bin"  # "a new model": another checkpoint file
    shutil.copy(tiny_checkpoint, newer)
    w.set_checkpoint(newer)
    w._ask_keep_edits = lambda name: _widget.KEEP
    _segment(qtbot, w)
    assert errors == []
    r = result_of(lyr)
    assert not r.edited and r.checkpoint == str(newer) and w.box_slider.isEnabled()
    assert lyr.data.dtype == np.uint16  # napari draws 16-bit labels without hashing each pixel
    cell = int(lyr.data[45, 65])
    assert cell > 0 and np.array_equal(lyr.data == cell, hand)  # the hand cell, whole, alone
    assert len(np.unique(lyr.data)) > 3  # ...with the model's cells around it
    assert "hand-edited cells kept" in w.status.text()
    w.box_slider.setValue(1.0)  # sliders redraw the model's cells, never the kept one
    assert np.array_equal(lyr.data > 0, hand)
    w.box_slider.setValue(0.0)
    assert np.array_equal(lyr.data == lyr.data[45, 65], hand)

    lyr.paint((2, 2), 901, refresh=True)  # edit again, then start over
    qtbot.waitUntil(lambda: not w.reset_btn.isHidden())
    w._ask_keep_edits = lambda name: _widget.RESTART
    _segment(qtbot, w)
    assert not result_of(lyr).kept and not result_of(lyr).edited
    assert 901 not in lyr.data and not np.array_equal(lyr.data == lyr.data[45, 65], hand)


def test_removing_the_image_cancels_its_job(make_napari_viewer, qtbot, tiny_checkpoint, monkeypatch,
                                            errors):
    """The image layer removed while Segment runs: the job is cancelled with one message; no
    empty layer later, no "None cells"."""
    from napari_cellseg.inference import pipeline

    def slow(self, image, scale=None, tile="auto"):
        for i in range(2000):
            time.sleep(0.01)
            yield {"stage": "slow", "fraction": i / 2000}
        raise AssertionError("not cancelled")

    monkeypatch.setattr(pipeline.Pipeline, "iter_predict", slow)
    viewer, w = _widget_with(make_napari_viewer, qtbot, tiny_checkpoint, name="big3000")
    w.segment()
    qtbot.waitUntil(lambda: w.status.text().startswith("Segmenting: slow"), timeout=TIMEOUT)
    viewer.layers.remove("big3000")
    qtbot.waitUntil(lambda: w._worker is None, timeout=10_000)
    qtbot.wait(200)
    assert len(errors) == 1 and "'big3000' was removed" in errors[0] and "cancelled" in errors[0]
    assert len(viewer.layers) == 0 and "None" not in w.status.text()


def test_csv_opens_with_our_reader_without_asking(make_napari_viewer, qtbot, tmp_path):
    """napari's own CSV reader competes for *.csv: once a widget of ours is open, our reader is
    napari's documented preference for *.csv (a choice already made is left alone)."""
    from napari.settings import get_settings

    from napari_cellseg.io.annotations import write_annotations

    labels = np.zeros((30, 40), np.int32)
    labels[5:10, 5:12] = 1
    labels[20:25, 30:38] = 2
    path = tmp_path / "cells.csv"
    write_annotations(path, {"cells": labels}, format="train")
    viewer = make_napari_viewer()
    prefs = get_settings().plugins
    prefs.extension2reader = {}
    from napari.errors import MultipleReaderError

    with pytest.raises(MultipleReaderError):  # today: napari would ask which reader to use
        viewer.open(path, plugin=None)
    try:
        viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
        assert prefs.extension2reader.get("*.csv") == "napari-cellseg"
        # plugin=None is File > Open's choice: the preference, else the only reader; with two
        # readers and no preference napari raises MultipleReaderError (the GUI asks)
        added = viewer.open(path, plugin=None)
        assert [a.name for a in added] == ["cells cells"]
        np.testing.assert_array_equal(viewer.layers["cells cells"].data, labels)
        prefs.extension2reader = {"*.csv": "napari"}  # the user's own choice stands
        viewer.window.add_plugin_dock_widget("napari-cellseg", "Review")
        assert prefs.extension2reader == {"*.csv": "napari"}
    finally:
        prefs.extension2reader = {}
    seg = viewer.window.dock_widgets["Segment cells (napari-cellseg)"]
    qtbot.waitUntil(lambda: seg._torch_ready, timeout=TIMEOUT)


def test_loading_freezes_long_lived_objects_and_frees_layers_removed_later(make_napari_viewer, qtbot):
    """A full garbage collection scanned every object torch, timm and napari had made (~500k:
    235 ms of frozen napari at random moments); once PyTorch is loaded they are frozen
    (gc.freeze). A layer open at that moment is frozen too: removing it later must still free
    it (and its image), and a layer made after the freeze is freed as usual."""
    import gc
    import weakref

    from napari_cellseg.gui import collector
    from napari_cellseg.gui.compat import unwrap

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((300, 300), np.float32), name="before")
    collector._state["frozen"] = False  # as in a fresh napari process
    _, w = viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
    qtbot.waitUntil(lambda: w._torch_ready, timeout=TIMEOUT)
    assert gc.get_freeze_count() > 50_000 and collector._state["frozen"]
    assert len(gc.get_objects(generation=2)) < gc.get_freeze_count()
    viewer.add_image(np.zeros((300, 300), np.float32), name="after")
    refs = [weakref.ref(unwrap(viewer.layers[name])) for name in ("before", "after")]
    for name in ("before", "after"):
        viewer.layers.remove(name)
    qtbot.wait(50)
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert gc.get_freeze_count() > 50_000  # frozen again after the collection


def test_the_models_own_channels_are_preselected(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    """A model trained on channel 2 with nuclei in 3, inverted (its checkpoint's train_config):
    the pickers show that, as cellseg predict uses it by default; a grey image shows grey, and
    the RGB image again the model's channels."""
    import torch

    obj = torch.load(tiny_checkpoint, weights_only=True)
    obj["info"] = {"train_config": {"channel": 2, "channel2": 3, "invert": True}}
    path = tmp_path / "green.bin"
    torch.save(obj, path)
    rgb = np.stack([_image(1), _image(2), _image(3)], -1).clip(0, 255).astype(np.uint8)
    viewer, w = _widget_with(make_napari_viewer, qtbot, path, image=rgb)
    assert (w.channel_combo.currentText(), w.channel2_combo.currentText()) == ("2: green", "3: blue")
    assert w._input_options() == {"channel": 2, "channel2": 3, "invert": True}
    viewer.add_image(_image(), name="grey")
    w.image_combo.setCurrentText("grey")
    assert w.channel_combo.currentText() == "grey image" and w.channel2_combo.currentData() == 0
    w.image_combo.setCurrentText("img")
    assert w._input_options() == {"channel": 2, "channel2": 3, "invert": True}


@pytest.mark.parametrize("first_use", ["reader picked in napari's dialog", "sample image"])
def test_first_use_of_the_plugin_makes_our_reader_the_csv_choice(make_napari_viewer, tmp_path, first_use):
    """napari activates the plugin (napari.yaml on_activate) the first time any contribution is
    used, docks or not: from then on File > Open on a CSV uses our reader without asking."""
    import npe2
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    from napari_cellseg.io.annotations import write_annotations

    labels = np.zeros((30, 40), np.int32)
    labels[5:10, 5:12] = 1
    path = tmp_path / "cells.csv"
    write_annotations(path, {"cells": labels}, format="train")
    npe2.PluginManager.instance().deactivate("napari-cellseg")  # a napari that never used it
    prefs = get_settings().plugins
    prefs.extension2reader = {}
    viewer = make_napari_viewer()
    try:
        with pytest.raises(MultipleReaderError):  # never used: napari asks, once
            viewer.open(path, plugin=None)
        assert "*.csv" not in prefs.extension2reader
        if first_use == "sample image":
            viewer.open_sample("napari-cellseg", "nuclei")
        else:  # what napari's "Choose reader" dialog does with the user's pick
            viewer.open(path, plugin="napari-cellseg")
        assert prefs.extension2reader.get("*.csv") == "napari-cellseg"
        viewer.layers.clear()
        added = viewer.open(path, plugin=None)  # File > Open: no dialog now
        np.testing.assert_array_equal(added[0].data, labels)
    finally:
        prefs.extension2reader = {}


@pytest.mark.parametrize("order", ["review first", "segment first"])
def test_review_pairs_the_new_result_with_the_ground_truth(make_napari_viewer, qtbot, tiny_checkpoint,
                                                           order, errors):
    """Review docked before or after Segment cells (Plugins menu): the ground truth (opened from
    a CSV, so named "img cells" like the result) stays Ground truth, the new "img cells" becomes
    the Prediction, never one layer as both, and the only overlay is the valid pair's."""
    from napari_cellseg.gui.review.overlay import OVERLAY_KEY

    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="img")
    gt = np.zeros((96, 128), np.int32)
    gt[10:30, 10:30] = 1
    gt[50:70, 60:90] = 2
    viewer.add_labels(gt, name="img cells", metadata={"image_id": "img", "source_csv": "train.csv"})
    names = ["Review", "Segment cells"] if order == "review first" else ["Segment cells", "Review"]
    docks = {n: _dock_from_menu(viewer, qtbot, n) for n in names}
    seg, rv = docks["Segment cells"], docks["Review"]
    overlays = lambda: sorted(x.name for x in viewer.layers if x.metadata.get(OVERLAY_KEY))  # noqa: E731
    qtbot.wait(200)
    assert rv.gt_combo.currentText() == "img cells" and rv.pred_combo.currentText() == ""
    assert overlays() == []  # no pair, no overlay
    seg.set_checkpoint(tiny_checkpoint)
    seg.box_slider.setValue(0.0)
    _segment(qtbot, seg)
    assert errors == []
    qtbot.waitUntil(lambda: rv.score is not None, timeout=TIMEOUT)
    assert rv.pred_combo.currentText() == "img cells" and result_of(viewer.layers["img cells"])
    assert rv.gt_combo.currentText() == "img cells (kept)"
    preds = {rv.pred_combo.itemText(i) for i in range(rv.pred_combo.count())}
    gts = {rv.gt_combo.itemText(i) for i in range(rv.gt_combo.count())}
    assert "img cells" not in gts and "img cells (kept)" not in preds
    assert rv.score.n_gt == 2
    assert overlays() == ["img cells review"]
    viewer.layers.remove("img cells")  # the prediction goes: so does its overlay
    qtbot.waitUntil(lambda: overlays() == [], timeout=TIMEOUT)
    assert rv.pred_combo.currentText() == "" and rv.gt_combo.currentText() == "img cells (kept)"
