"""The "Train model" widget: form -> TrainConfig, layers -> samples, progress, and real runs in a
napari viewer (run under ``xvfb-run -a``): a tiny run hands best_model.bin to Segment cells,
Cancel stops a run, bad input gives a notification and writes nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_cellseg.gui.train import form as _form  # noqa: E402
from training.config import ConfigError, TrainConfig  # noqa: E402
from training.data import DataError  # noqa: E402

TIMEOUT = 240_000
TINY_MODEL = dict(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
                  rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50, box_detections_per_img=50, box_batch_size_per_image=64,
                  anchor_sizes=(8, 16, 32, 64, 128))


# ---------------------------------------------------------------- plain logic (no viewer)
def test_form_to_config_maps_fields_one_to_one(tmp_path):
    ckpt = tmp_path / "m.bin"
    ckpt.write_bytes(b"x")
    form = {"source": "layers", "epochs": 3, "lr": 2e-4, "batch_size": 4, "device": "cpu", "crop_size": 96,
            "steps_per_epoch": 7, "val_fraction": 0.3, "out": str(tmp_path / "run"),
            "init_checkpoint": str(ckpt), "train_csv": "ignored.csv", "images": "ignored", "image_dir": "x",
            "label_dir": "y"}
    c = _form.form_to_config(form)
    assert (c.epochs, c.lr, c.batch_size, c.device, c.crop_size, c.steps_per_epoch, c.val_fraction) == \
        (3, 2e-4, 4, "cpu", 96, 7, 0.3)
    assert c.out == str(tmp_path / "run") and c.init_checkpoint == str(ckpt)
    assert (c.train_csv, c.images, c.image_dir, c.label_dir) == (None, None, None, None)  # layers: arrays
    assert (c.width, c.height) == (0, 0)  # native pixel size, as the Segment widget shows the image
    c = _form.form_to_config({**form, "source": "csv", "train_csv": " a.csv ", "images": "imgs",
                              "init_checkpoint": ""})
    assert (c.train_csv, c.images, c.image_dir, c.init_checkpoint) == ("a.csv", "imgs", None, None)
    c = _form.form_to_config({**form, "source": "folders"})
    assert (c.image_dir, c.label_dir, c.train_csv) == ("x", "y", None)
    assert _form.form_to_config({**form, "out": "~/r"}).out.startswith(str(__import__("pathlib").Path.home()))
    with pytest.raises(DataError, match="annotation CSV"):
        _form.form_to_config({**form, "source": "csv", "train_csv": ""})
    with pytest.raises(DataError, match="label folder"):
        _form.form_to_config({**form, "source": "folders", "label_dir": " "})
    with pytest.raises(DataError, match="not found"):
        _form.form_to_config({**form, "init_checkpoint": str(tmp_path / "missing.bin")})
    with pytest.raises(ConfigError, match="--epochs"):
        _form.form_to_config({**form, "epochs": 0})
    with pytest.raises(ConfigError, match="--crop-size"):
        _form.form_to_config({**form, "crop_size": 16})
    assert _form.default_out_dir("/h").parent == __import__("pathlib").Path("/h/cellseg-runs")


def _synthetic(seed=0, shape=(128, 128)):
    from napari_cellseg.io.synthetic import make_image

    return make_image("nuclei", shape, seed=seed)


def test_layer_samples_tiles_few_images_and_checks_input():
    img, lab = _synthetic()
    samples = _form.layer_samples([("a", img, lab)])
    assert [s.image_id for s in samples] == ["a@r0c0", "a@r0c1", "a@r1c0", "a@r1c1"]
    assert all(s.image.shape[:2] == (64, 64) for s in samples)
    assert sum(s.n_instances for s in samples) >= len(np.unique(lab)) - 1  # cut cells count twice
    four = _form.layer_samples([(f"i{k}", img, lab) for k in range(4)])
    assert [s.image_id for s in four] == ["i0", "i1", "i2", "i3"]  # enough images: no tiling
    with pytest.raises(DataError, match="empty"):
        _form.check_pairs([("a", img, np.zeros_like(lab))])
    with pytest.raises(DataError, match="128x128 but its labels are 64x128"):
        _form.check_pairs([("a", img, lab[:64])])
    with pytest.raises(DataError, match="no image"):
        _form.check_pairs([])


def test_progress_tracker():
    t = _form.ProgressTracker(epochs=2)
    t.update({"stage": "train", "epoch": 1, "step": 1, "total": 2, "loss": 3.0})
    assert t.fraction == pytest.approx(0.85 * 0.5 / 2) and t.steps == [(0.5, 3.0)]
    t.update({"stage": "val", "epoch": 1, "step": 1, "total": 1})
    assert t.fraction == pytest.approx(0.5)
    row = {"epoch": 1, "train_loss": 2.0, "val_loss": 1.5, "val_map": 0.1, "best": 1}
    t.update({"stage": "epoch", "epoch": 1, "epochs": 2, "row": row})
    assert t.epoch_rows == [row] and "best so far" in t.text
    assert _form.best_row([row, {**row, "epoch": 2, "best": 0}]) is row


def test_form_defaults_are_train_configs_and_backbone_choice(tmp_path):
    """One table of defaults (TrainConfig); backbone weights: imagenet / random / a file."""
    from training.config import TrainConfig

    d = TrainConfig()
    for key in ("epochs", "lr", "batch_size", "crop_size", "steps_per_epoch", "val_fraction", "device"):
        assert _form.form_defaults()[key] == getattr(d, key), key
    assert _form.backbone_weights("imagenet") == "imagenet"
    assert _form.backbone_weights("random") == "random"
    assert _form.default_backbone_choice() == d.backbone_weights == "imagenet"  # like the seed
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert _form.backbone_weights("file", str(weights)) == str(weights)
    with pytest.raises(DataError, match="backbone weights: .*not found"):
        _form.backbone_weights("file", str(tmp_path / "none.pth"))
    c = _form.form_to_config({"out": str(tmp_path / "r"), "backbone_weights": "imagenet"})
    assert c.backbone_weights == "imagenet"


@dataclasses.dataclass
class _ConfigWithWarmup(TrainConfig):
    """TrainConfig with one field more, as a future version would add it."""

    warmup_epochs: int = 3


def test_form_fields_are_generated_from_train_config(monkeypatch, tmp_path):
    """Every TrainConfig field is a form row (tooltip = the CLI's help, choices = the CLI's)
    unless it has a row of its own or is fixed; a new field appears with no widget code."""
    from training.config import CHOICES, HELP

    fields = {f.name: f for f in _form.form_fields()}
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(fields) == sorted(n for n in names if n not in _form.NOT_IN_FORM)
    assert [n for n in fields][:len(_form.MAIN_FIELDS)] == list(_form.MAIN_FIELDS)
    for name, f in fields.items():
        assert f.default == getattr(TrainConfig(), name) and f.tooltip == HELP[name], name
        if name in CHOICES:
            assert f.options["choices"] == list(CHOICES[name]), name
    c = _form.form_to_config({"out": str(tmp_path / "r"), "amp": "off", "seed": 7, "scale_range": [0.5, 2.0],
                              "augment": False})
    assert (c.amp, c.seed, c.scale_range, c.augment) == ("off", 7, (0.5, 2.0), False)
    monkeypatch.setattr(_form, "TrainConfig", _ConfigWithWarmup)
    monkeypatch.setitem(HELP, "warmup_epochs", "epochs of linear lr warm-up")
    new = {f.name: f for f in _form.form_fields()}["warmup_epochs"]
    assert (new.annotation, new.default, new.label, new.advanced) == (int, 3, "Warmup epochs", True)
    c = _form.form_to_config({"out": str(tmp_path / "r"), "warmup_epochs": 5})
    assert isinstance(c, _ConfigWithWarmup) and c.warmup_epochs == 5


def test_tracker_shows_epoch_zero_and_time_per_epoch():
    """The engine's epoch-0 validation of the starting model and its per-epoch estimate."""
    t = _form.ProgressTracker(epochs=3)
    start = {"epoch": 0, "val_loss": 2.5, "val_map": 0.613, "best": 0}
    t.update({"stage": "epoch", "epoch": 0, "epochs": 3, "row": start})
    assert t.start_row is start and "0.613" in t.text and "epoch 0" in t.text
    t.update({"stage": "train", "epoch": 1, "step": 5, "total": 10, "loss": 2.0,
              "elapsed_s": 30.0, "eta_epoch_s": 60.0})
    assert t.sec_per_epoch == 60.0 and "~60 s/epoch" in t.text
    assert "~3 min left" in t.text  # 2.5 epochs x 60 s
    row = {"epoch": 1, "train_loss": 2.0, "val_loss": 1.5, "val_map": 0.7, "best": 1}
    msg = _form.done_message([start, row], t.start_row)
    assert "epoch 1" in msg and "0.700" in msg and "starting model scored val mAP 0.613" in msg
    t2 = _form.ProgressTracker(epochs=1)  # an engine without the timing fields: no estimate
    t2.update({"stage": "train", "epoch": 1, "step": 1, "total": 2, "loss": 1.0})
    assert "epoch" in t2.text and "/epoch" not in t2.text


# ---------------------------------------------------------------- in a viewer
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from napari_cellseg.gui.torch_guard import import_torch

    import_torch()  # never a raw torch import next to OpenGL (see _torch_guard)
    import torch

    from napari_cellseg.model.checkpoint import save_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_MODEL)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.bin"
    save_checkpoint(path, build_model(cfg), cfg)
    return path


@pytest.fixture
def notes(tmp_path, monkeypatch):
    from napari_cellseg.gui.train import widget as _widget

    monkeypatch.setenv("NAPARI_CELLSEG_CONFIG_DIR", str(tmp_path / "config"))
    got = {"error": [], "info": []}
    monkeypatch.setattr(_widget, "show_error", got["error"].append)
    monkeypatch.setattr(_widget, "show_info", got["info"].append)
    return got


@pytest.fixture
def docked(make_napari_viewer, tiny_checkpoint, notes, tmp_path):
    viewer = make_napari_viewer()
    img, lab = _synthetic()
    viewer.add_image(img, name="synth")
    viewer.add_labels(lab, name="synth cells")
    # as users open them: Plugins > Cell segmentation > ... (the widgets get a viewer proxy)
    _, seg = viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
    _, train = viewer.window.add_plugin_dock_widget("napari-cellseg", "Train model")
    train.start_from[0].setText(str(tiny_checkpoint))
    train.fields["epochs"].value = 1
    train.fields["steps_per_epoch"].value = 2
    train.fields["crop_size"].value = 64
    train.fields["batch_size"].value = 1
    train.fields["device"].value = "cpu"
    train.out[0].setText(str(tmp_path / "run"))
    return viewer, seg, train


def test_empty_plot_says_no_data_and_widgets_find_each_other(docked):
    from napari_cellseg.gui import registry

    viewer, seg, train = docked
    assert train.empty_text.get_visible() and "no data yet" in train.empty_text.get_text()
    assert not train.ax.xaxis.get_visible()
    assert registry.lookup(viewer, "segment") is seg and registry.lookup(train.viewer, "train") is train
    train.tracker = _form.ProgressTracker(1)
    train.tracker.update({"stage": "train", "epoch": 1, "step": 1, "total": 2, "loss": 1.0})
    train._update_plot()
    assert not train.empty_text.get_visible() and train.ax.xaxis.get_visible()


def test_layer_table_pairs_image_with_its_cells_layer(docked):
    viewer, _, train = docked
    assert train.pair_table.rowCount() == 1
    assert train.pair_table.cellWidget(0, 1).currentText() == "synth cells"
    name, img, lab = train.layer_pairs()[0]
    assert name == "synth" and img.shape == lab.shape == (128, 128)
    viewer.add_image(np.zeros((32, 32)), name="other")  # no labels of its size: listed, unticked
    assert train.pair_table.rowCount() == 2
    assert train.pair_table.cellWidget(1, 1).currentText() == "—"
    assert len(train.layer_pairs()) == 1


def test_start_from_defaults_to_segment_widgets_checkpoint(docked, tiny_checkpoint):
    from napari_cellseg.gui.train.widget import TrainWidget

    viewer, seg, _ = docked
    seg.set_checkpoint(tiny_checkpoint)
    assert TrainWidget(viewer).start_from[0].text() == str(tiny_checkpoint.resolve())


def test_new_config_field_appears_in_the_form(make_napari_viewer, notes, monkeypatch, tmp_path):
    """A field added to TrainConfig is in the dock's Settings (advanced part), with the CLI's
    help as its tooltip, and reaches the config: no widget code names it."""
    from training.config import HELP

    monkeypatch.setattr(_form, "TrainConfig", _ConfigWithWarmup)
    monkeypatch.setitem(HELP, "warmup_epochs", "epochs of linear lr warm-up")
    viewer = make_napari_viewer()
    _, train = viewer.window.add_plugin_dock_widget("napari-cellseg", "Train model")
    w = train.fields["warmup_epochs"]
    assert w.value == 3 and w.tooltip == "epochs of linear lr warm-up" and w.label == "Warmup epochs"
    assert w.native.parent() is not None and train.advanced.isAncestorOf(w.native)
    w.value = 5
    train.start_from[0].setText("")
    train.backbone_combo.setCurrentIndex(train.backbone_combo.findData("random"))
    train.out[0].setText(str(tmp_path / "run"))
    config = train.read_config()
    assert isinstance(config, _ConfigWithWarmup) and config.warmup_epochs == 5
    assert config.backbone_weights == "random" and (config.width, config.height) == (0, 0)


def test_form_remembers_the_last_values(docked, notes, tmp_path):
    """Start remembers the Settings (even when the data is not ready); the next form opens
    with them; a remembered value the form no longer takes leaves that field's default."""
    from napari_cellseg.gui.settings import save_settings
    from napari_cellseg.gui.train.widget import REMEMBERED, TrainWidget

    viewer, _, train = docked
    train.fields["lr"].value = 3e-4
    train.fields["amp"].value = "off"
    train.fields["scale_range"].value = (0.5, 2.0)
    viewer.layers["synth cells"].data = np.zeros((128, 128), np.int32)  # no cells: Start refuses
    train.start_btn.click()
    assert train._worker is None and "empty" in notes["error"][-1]
    again = TrainWidget(viewer)
    assert again.fields["lr"].value == pytest.approx(3e-4) and again.fields["amp"].value == "off"
    assert again.fields["scale_range"].value == (0.5, 2.0) and again.fields["epochs"].value == 1
    save_settings({REMEMBERED: {"amp": "nonsense", "lr": 2e-4, "gone": 1}})
    third = TrainWidget(viewer)
    assert third.fields["amp"].value == TrainConfig().amp and third.fields["lr"].value == pytest.approx(2e-4)


@pytest.mark.slow
def test_tiny_run_hands_best_model_to_segment(docked, qtbot, notes, tmp_path):
    _, seg, train = docked
    train.start_btn.click()
    assert train._worker is not None and not train.start_btn.isEnabled()
    qtbot.waitUntil(lambda: train._worker is None, timeout=TIMEOUT)
    best = (tmp_path / "run" / "best_model.bin").resolve()
    assert not notes["error"], notes["error"]
    assert best.is_file() and (tmp_path / "run" / "last.ckpt").is_file()
    assert seg.model_combo.currentData() == str(best)
    assert notes["info"] and "best_model.bin" in notes["info"][-1] and "Segment cells" in notes["info"][-1]
    assert train.tracker.epoch_rows and len(train.tracker.steps) == 2
    # val points: epoch 0 (the --init-checkpoint model, validated before training) and epoch 1
    assert list(train.val_line.get_xdata()) == [0, 1] and len(train.step_line.get_xdata()) == 2
    assert train.out[0].text() != str(tmp_path / "run")  # the next run gets a fresh folder
    from napari_cellseg.model.checkpoint import load_checkpoint

    _, cfg, thresholds, info = load_checkpoint(best)
    assert cfg.backbone == "convnext_atto" and cfg.native_scale and info["n_val"] == 1


@pytest.mark.slow
def test_start_loads_pytorch_off_the_gui_thread(docked, qtbot, notes, monkeypatch):
    """Start keeps the window responsive: the slow imports run on the worker, with a message."""
    import threading

    from napari_cellseg.gui import torch_guard as _torch_guard

    real, seen = _torch_guard.import_torch, []

    def spy():
        seen.append(threading.current_thread() is threading.main_thread())
        real()

    monkeypatch.setattr(_torch_guard, "import_torch", spy)
    _, _, train = docked
    train.fields["steps_per_epoch"].value = 500
    train.start_btn.click()
    assert train.status.text().startswith(("Starting", "Loading"))
    qtbot.waitUntil(lambda: bool(seen), timeout=TIMEOUT)
    assert seen == [False]  # never in the GUI thread
    train.cancel_btn.click()
    qtbot.waitUntil(lambda: train._worker is None, timeout=60_000)
    assert not notes["error"]


@pytest.mark.slow
def test_cancel_stops_a_running_job(docked, qtbot, notes, tmp_path):
    _, seg, train = docked
    before = seg.model_combo.currentData()
    train.fields["epochs"].value = 3
    train.fields["steps_per_epoch"].value = 500
    train.start_btn.click()
    qtbot.waitUntil(lambda: train.tracker is not None and len(train.tracker.steps) >= 1, timeout=TIMEOUT)
    train.cancel_btn.click()
    qtbot.waitUntil(lambda: train._worker is None, timeout=60_000)
    assert len(train.tracker.steps) < 20 and [r["epoch"] for r in train.tracker.epoch_rows] == [0]  # start model only
    assert train.status.text().startswith("Cancelled") and not notes["error"]
    assert not (tmp_path / "run" / "best_model.bin").exists()  # no epoch finished
    assert seg.model_combo.currentData() == before
    assert train.start_btn.isEnabled() and not train.cancel_btn.isEnabled()


def test_bad_input_notifies_and_writes_nothing(docked, qtbot, notes, tmp_path):
    viewer, _, train = docked
    viewer.layers["synth cells"].data = np.zeros((128, 128), np.int32)
    train.start_btn.click()
    assert train._worker is None and notes["error"] and "empty" in notes["error"][-1]
    assert not (tmp_path / "run").exists()
    viewer.layers["synth cells"].data = _synthetic()[1]
    train.source_combo.setCurrentIndex(2)  # folders, none given
    train.start_btn.click()
    assert "label folder" in notes["error"][-1] and not (tmp_path / "run").exists()
    # an output folder that cannot be created: the engine's error arrives as a notification
    train.source_combo.setCurrentIndex(0)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    train.out[0].setText(str(blocker / "run"))
    train.start_btn.click()
    qtbot.waitUntil(lambda: train._worker is None, timeout=TIMEOUT)
    assert "not writable" in notes["error"][-1] and blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "config"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
