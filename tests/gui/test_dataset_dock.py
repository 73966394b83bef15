"""The "Review dataset" dock driven in a real napari viewer (run under ``xvfb-run -a``), opened
the way users open it: Plugins > Cell segmentation > Review dataset.

A tiny random-weight Mask R-CNN (convnext_atto, box_score_thresh 0: candidates below the
threshold are kept for the click tool; its scores lie in 0.517-0.533, so box_conf 0.52 draws about
half of them) predicts 96x128 images in about a second on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import tifffile  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402

from napari_cellseg.gui.dataset import widget as _widget  # noqa: E402
from napari_cellseg.gui.layers import result_of  # noqa: E402
from napari_cellseg.io.annotations import read_annotations  # noqa: E402

TIMEOUT = 120_000
SHAPE = (96, 128)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from napari_cellseg.gui.torch_guard import import_torch

    import_torch()  # as the widgets do: never a raw torch import next to OpenGL
    import torch

    from napari_cellseg.model.checkpoint import save_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32,
                      box_head_size=128, box_score_thresh=0.0, min_size=128, max_size=128,
                      box_detections_per_img=60)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.bin"
    save_checkpoint(path, build_model(cfg), cfg,
                    thresholds={"box_conf": 0.52, "mask_threshold": 0.4, "min_area": 0})
    return path


@pytest.fixture(autouse=True)
def errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_CELLSEG_CONFIG_DIR", str(tmp_path / "config"))
    found = []
    monkeypatch.setattr(_widget, "show_error", found.append)
    monkeypatch.setattr(_widget, "show_info", lambda msg: None)
    return found


def _image(seed):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, SHAPE)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    for cy, cx in rng.uniform(10, min(SHAPE) - 10, (8, 2)):
        img += 120 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 36)
    return img.astype(np.uint16)


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "images"
    path.mkdir()
    for i in range(3):
        tifffile.imwrite(path / f"cell{i}.tif", _image(i))
    return path


def _dock(make_napari_viewer, qtbot, model, viewer=None):
    viewer = viewer or make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-cellseg", "Review dataset")
    w.set_checkpoint(model)
    return viewer, w


def _predicted(qtbot, w, image_id=None):
    """Wait until the shown image (or ``image_id``) has the model's output."""
    target = image_id or w.current
    qtbot.waitUntil(lambda: target in w._preds and w._worker is None, timeout=TIMEOUT)


def _pipeline_of(model):
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.inference.runner import Runner
    from napari_cellseg.options import PredictOptions

    return Pipeline(Runner.from_checkpoint(model, device="cpu"), PredictOptions(checkpoint=str(model)))


def _paint(layer, yx, label):
    layer.brush_size = 5
    layer.paint(yx, label)  # napari's paint path: records history, fires events.paint


def test_open_paint_accept_writes_the_csv_and_moves_on(make_napari_viewer, qtbot, tiny_model, folder,
                                                        tmp_path, errors):
    out = tmp_path / "reviewed.csv"
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    assert w.open_folder(folder, out)
    assert w.counts_label.text() == "accepted 0 of 3"
    first = w.current
    assert first == "cell0" and first in viewer.layers and "cell0 cells" in viewer.layers
    _predicted(qtbot, w)
    cells = viewer.layers["cell0 cells"]
    assert result_of(cells).detections is not None and not result_of(cells).edited
    qtbot.waitUntil(lambda: "cell1" in w._preds, timeout=TIMEOUT)  # the next, in the background
    # the uncertainty is cellseg rank's: score() with the flipped second pass
    from napari_cellseg.inference.uncertainty import score, second_pass

    pred = w._preds["cell0"]
    pipe = _pipeline_of(tiny_model)
    expected = score(pred.detections, pred.thresholds,
                     second=second_pass(pipe, pred.raw, scale=pred.detections.scale)).image
    assert w.queue["cell0"].uncertainty == pytest.approx(expected)

    _paint(cells, (10, 10), 99)
    assert result_of(cells).edited  # the edit lock
    draft = tmp_path / "reviewed.drafts" / "cell0.npz"
    qtbot.waitUntil(draft.is_file, timeout=5000)  # saved as you go
    assert w.queue["cell0"].status == "edited"
    expected = np.array(cells.data)
    assert (expected == 99).sum() > 0

    w.accept()
    assert errors == []
    ann = read_annotations(out)
    assert ann.format == "train" and ann.ids == ["cell0"] and ann.shape("cell0") == SHAPE
    got = ann.labels("cell0")
    # the same cells (ids renumbered 1..N by the CSV, one row per cell)
    assert len(ann.rles("cell0")) == len(np.unique(expected)) - 1
    np.testing.assert_array_equal(got > 0, expected > 0)
    assert not draft.exists()
    assert w.queue["cell0"].status == "accepted"
    assert w.counts_label.text() == "accepted 1 of 3"
    assert w.current == "cell1"  # the next image to do, already predicted: shown at once
    assert result_of(viewer.layers["cell1 cells"]).detections is not None
    assert [x.name for x in viewer.layers].count("cell1") == 1 and "cell0" not in viewer.layers
    keys = {str(k) for k in viewer.keymap}
    assert {"Shift+Enter", "Shift+S", "PageUp", "PageDown", "Shift+U", "Shift+B", "Shift+K"} <= keys


def test_draft_kept_when_moving_away_and_reopen_resumes(make_napari_viewer, qtbot, tiny_model, folder,
                                                        tmp_path, errors):
    out = tmp_path / "reviewed.csv"
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    w.open_folder(folder, out)
    _predicted(qtbot, w)
    w.accept()  # cell0 accepted
    _predicted(qtbot, w)
    assert w.current == "cell1"
    cells = viewer.layers["cell1 cells"]
    _paint(cells, (40, 60), 77)
    painted = np.array(cells.data)
    w.next_image()  # moved away before the debounce: the draft is written at once
    assert w.current == "cell2"
    assert (tmp_path / "reviewed.drafts" / "cell1.npz").is_file()
    w.previous_image()
    assert w.current == "cell1"
    np.testing.assert_array_equal(viewer.layers["cell1 cells"].data, painted)
    assert result_of(viewer.layers["cell1 cells"]).edited  # sliders stay locked on a draft

    # close napari (a new viewer) and open the same folder + CSV: it resumes
    viewer2, w2 = _dock(make_napari_viewer, qtbot, tiny_model)
    assert w2.folder_combo.currentText() == str(folder)  # recent folders remembered, with their CSV
    assert w2.out_edit.text() == str(out)
    w2.open_btn.click()  # the dock's own Open
    assert {i: w2.queue[i].status for i in w2.queue.items} == {
        "cell0": "accepted", "cell1": "edited", "cell2": "to do"}
    assert w2.current == "cell1"  # the first image not accepted yet
    np.testing.assert_array_equal(viewer2.layers["cell1 cells"].data, painted)
    w2.show("cell0")  # reopen an accepted image to fix it again
    np.testing.assert_array_equal(viewer2.layers["cell0 cells"].data > 0,
                                  read_annotations(out).labels("cell0") > 0)
    assert errors == []


def test_box_and_click_tools_add_one_undoable_cell(make_napari_viewer, qtbot, tiny_model, folder,
                                                   tmp_path, errors):
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    w.open_folder(folder, tmp_path / "reviewed.csv")
    _predicted(qtbot, w)
    cells = viewer.layers["cell0 cells"]
    cells.data = np.zeros(SHAPE, np.int32)  # an empty drawing: every box finds room

    w.toggle_box_tool()
    shapes = viewer.layers["box: draw around a missed cell"]
    shapes.add_rectangles(np.array([[20.0, 30.0], [50.0, 70.0]]))  # as drawing one does
    qtbot.waitUntil(lambda: w._tool_worker is None and cells.data.max() > 0, timeout=TIMEOUT)
    assert errors == []
    new = int(cells.data.max())
    ys, xs = np.nonzero(cells.data == new)
    assert ys.min() >= 20 and ys.max() < 50 and xs.min() >= 30 and xs.max() < 70
    assert result_of(cells).edited  # an edit like a stroke: sliders lock, a draft is saved
    qtbot.waitUntil(lambda: w.queue["cell0"].status == "edited", timeout=5000)
    qtbot.waitUntil(lambda: len(shapes.data) == 0, timeout=5000)  # the box is used up
    cells.undo()
    assert cells.data.max() == 0
    draft = tmp_path / "reviewed.drafts" / "cell0.npz"  # the undo reaches the draft too
    qtbot.waitUntil(lambda: draft.is_file() and np.load(draft)["labels"].max() == 0, timeout=5000)

    # click a pixel of a candidate the threshold dropped: that candidate is promoted
    yx = _pixel_of_dropped_candidate(w._preds["cell0"])
    w.toggle_click_tool()
    points = viewer.layers["click: a missed cell"]
    points.add(np.array([yx], float))
    qtbot.waitUntil(lambda: w._tool_worker is None and cells.data.max() > 0, timeout=TIMEOUT)
    assert errors == []
    assert cells.data[yx] > 0 and "candidate below the threshold" in w.status.text()
    cells.undo()
    assert cells.data.max() == 0


def _pixel_of_dropped_candidate(pred):
    from napari_cellseg.inference.detections import Detections

    d, t = pred.detections, pred.thresholds
    for row in np.flatnonzero(d.scores < t.box_conf):
        one = Detections(d.boxes[row:row + 1], np.ones(1, np.float32), d.probs[row:row + 1], d.image_shape)
        mask = one.to_labels(box_conf=0.0, mask_threshold=t.mask_threshold, keep_largest=True) > 0
        if mask.any():
            ys, xs = np.nonzero(mask)
            return int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    raise AssertionError("the tiny model kept no candidate below the threshold")


def test_next_doubtful_cell_centres_the_view(make_napari_viewer, qtbot, tiny_model, folder, tmp_path):
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    w.open_folder(folder, tmp_path / "reviewed.csv")
    _predicted(qtbot, w)
    cells = viewer.layers["cell0 cells"]
    assert cells.data.max() > 0
    first = w.next_doubtful()
    ys, xs = np.nonzero(cells.data == first)
    assert np.allclose(viewer.camera.center[-2:], (ys.mean(), xs.mean()))
    assert cells.selected_label == first and "doubtful cell" in viewer.layers
    second = w.next_doubtful()
    assert second != first or cells.data.max() == 1
    w.next_image()  # the outline belongs to the image it was drawn on
    assert len(viewer.layers["doubtful cell"].data) == 0


def test_segment_sliders_and_edit_lock_work_on_the_shown_image(make_napari_viewer, qtbot, tiny_model,
                                                               folder, tmp_path):
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    w.open_folder(folder, tmp_path / "reviewed.csv")
    _predicted(qtbot, w)
    w.open_segment_dock()
    from napari_cellseg.gui import registry

    seg = registry.lookup(viewer, "segment")
    assert seg is not None and seg.image_combo.currentText() == "cell0"
    cells = viewer.layers["cell0 cells"]
    seg.box_slider.setValue(0.0)
    n_all = int(cells.data.max())
    seg.box_slider.setValue(1.0)
    assert int(cells.data.max()) == 0 < n_all
    seg.box_slider.setValue(0.0)
    _paint(cells, (10, 10), 99)
    qtbot.waitUntil(lambda: not seg.box_slider.isEnabled(), timeout=5000)
    before = np.array(cells.data)
    seg.box_slider.setValue(1.0)  # locked: hand edits win
    np.testing.assert_array_equal(cells.data, before)


def test_ranking_orders_the_queue_worst_first(make_napari_viewer, qtbot, tiny_model, folder, tmp_path):
    ranking = tmp_path / "ranking.csv"
    ranking.write_text("id,uncertainty,cells,doubtful_cells,diameter,file\n"
                       "cell2,0.9,4,1,,\ncell1,0.5,5,0,,\ncell0,0.2,3,0,,\n")  # as cellseg rank writes it
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    w.open_folder(folder, tmp_path / "reviewed.csv", ranking_csv=ranking)
    assert w.current == "cell2" and w.table_model.ids == ["cell2", "cell1", "cell0"]
    model = w.table_proxy
    assert [model.index(r, 3).data() for r in range(3)] == ["0.900", "0.500", "0.200"]
    w.table.sortByColumn(2, Qt.SortOrder.DescendingOrder)  # sortable: by cells
    assert [model.index(r, 0).data() for r in range(3)] == ["cell1", "cell2", "cell0"]
    w.table.doubleClicked.emit(model.index(2, 0))  # double-click opens an image
    assert w.current == "cell0"
    w.skip()
    assert w.current == "cell2"  # the next to do, wrapping round the queue's order
    _press(viewer, "PageDown")  # the dock's keys are bound on the viewer
    assert w.current == "cell1"
    _press(viewer, "PageUp")
    assert w.current == "cell2"


def test_keys_of_a_closed_dock_do_nothing(make_napari_viewer, qtbot, tiny_model, folder, tmp_path):
    out = tmp_path / "reviewed.csv"
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    w.open_folder(folder, out)
    _press(viewer, "Shift+Enter")  # Accept by key: refused while the model still predicts it
    assert not out.exists() and w.current == "cell0" and "still predicting" in w.status.text()
    _predicted(qtbot, w)
    _press(viewer, "Shift+Enter")
    assert out.is_file() and w.current == "cell1"
    out.unlink()
    qtbot.waitUntil(lambda: w._worker is None, timeout=TIMEOUT)
    viewer.window.remove_dock_widget(viewer.window.dock_widgets["Review dataset (napari-cellseg)"].parent())
    assert not w.docked()
    _press(viewer, "Shift+Enter")
    assert not out.exists()


def _press(viewer, key):
    """Run what napari runs for ``key`` on the viewer (its keymap entry)."""
    handler = next(f for k, f in viewer.keymap.items() if str(k) == key)
    handler(viewer)


def test_bad_folder_is_one_notification_and_nothing_changes(make_napari_viewer, qtbot, tiny_model,
                                                            tmp_path, errors):
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    assert not w.open_folder(tmp_path / "missing", tmp_path / "reviewed.csv")
    assert len(errors) == 1 and "missing" in errors[0] and "not found" in errors[0]
    assert w.queue is None and len(viewer.layers) == 0


@pytest.mark.slow
def test_train_on_accepted_makes_a_new_current_model_and_reranks(make_napari_viewer, qtbot, tiny_model,
                                                                 folder, tmp_path, errors):
    out = tmp_path / "reviewed.csv"
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    w.open_folder(folder, out)
    for _ in range(2):  # accept cell0 and cell1 as the model drew them
        _predicted(qtbot, w)
        w.accept()
    assert w.current == "cell2" and w.train_btn.isEnabled()
    accepted = out.read_bytes()
    w.minutes_spin.setValue(0.1)  # the budget: one epoch after the starting model's evaluation
    w.train_on_accepted()
    assert w._train_worker is not None and w.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: w._train_worker is None, timeout=600_000)
    assert errors == []
    result = w.last_training
    assert result.checkpoint.is_file() and result.checkpoint.parent.parent == tmp_path / "reviewed.models"
    assert w.checkpoint() == str(result.checkpoint)  # the new model is current
    assert "val mAP" in w.map_label.text() and "→" in w.map_label.text()
    # the images to do are re-predicted with it in the background, then the queue re-sorted
    qtbot.waitUntil(lambda: not w._reranking and w._worker is None, timeout=TIMEOUT)
    assert w._preds["cell2"].checkpoint == str(result.checkpoint)
    assert w.queue["cell2"].uncertainty is not None
    assert out.read_bytes() == accepted  # accepted images are never overwritten
    assert w.queue.counts()["accepted"] == 2


def test_cancel_training_keeps_the_model(make_napari_viewer, qtbot, tiny_model, folder, tmp_path, errors):
    viewer, w = _dock(make_napari_viewer, qtbot, tiny_model)
    w.open_folder(folder, tmp_path / "reviewed.csv")
    _predicted(qtbot, w)
    w.accept()
    w.train_on_accepted()
    w.cancel_training()
    qtbot.waitUntil(lambda: w._train_worker is None, timeout=TIMEOUT)
    assert w.checkpoint() == str(tiny_model) and not hasattr(w, "last_training")
    assert w.train_btn.isEnabled() and not w.cancel_btn.isEnabled()
    assert errors == []


@pytest.mark.slow
def test_finetune_job_trains_in_a_worker_thread_left_in_inference_mode(tiny_model, tmp_path):
    """A worker quit while a prediction was suspended inside ``torch.inference_mode()`` leaves
    its pooled thread in inference mode; the next job there (Train on accepted) must still train."""
    import torch

    from napari_cellseg.gui.dataset.jobs import finetune_job
    from napari_cellseg.progress import drain

    images = [_image(i) for i in range(2)]
    from scipy import ndimage

    labels = [ndimage.label(img > 180)[0].astype(np.int32) for img in images]
    with torch.inference_mode():  # the state such a thread is left in
        result = drain(finetune_job(images, labels, ["a", "b"], str(tiny_model), tmp_path / "models",
                                    0.05, "cpu"))
    assert result.checkpoint.is_file() and result.epochs >= 1
