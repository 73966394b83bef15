"""The "Train model" dock widget (thin: reads the form, builds a TrainConfig, runs the engine in a
napari thread worker, draws the loss curves, hands best_model.bin to the Segment widget).

The Settings form is generated with magicgui from TrainConfig's fields (``form.form_fields``:
types, defaults, help and choices, the metadata the CLI flags come from); the values of the last
started run are remembered in settings.json.

Everything that is not Qt lives in :mod:`napari_cellseg.gui.train.form` (form -> TrainConfig,
layers -> samples, the worker body, progress bookkeeping); the ``training`` package stays headless.
Torch is imported only when Start is pressed. The Segment widget is found through
:mod:`napari_cellseg.gui.registry`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from magicgui.widgets import Container, create_widget
from qtpy.QtWidgets import (QAbstractItemView, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout,
                            QHeaderView, QLabel, QLineEdit, QProgressBar, QPushButton, QStackedWidget,
                            QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)
from superqt import QCollapsible
from training.config import HELP

from napari_cellseg.gui.train import form as _form
from napari_cellseg.gui import registry
from napari_cellseg.gui.layers import spatial_shape
from napari_cellseg.gui.layout import ScrollDock, button, row_of
from napari_cellseg.gui.settings import load_settings, remember_checkpoint, save_settings

NO_LABELS = "—"
SOURCE_TITLES = {"layers": "Open images + their cells layers", "csv": "Annotation CSV + image folder",
                 "folders": "Image folder + label folder"}


REMEMBERED = "train_settings"  # settings.json key: the Settings form's last used values
EMPTY_PLOT = "no data yet: press Start training\n(loss curves appear after the first steps)"


def find_segment_widget(viewer):
    """The docked "Segment cells" widget of this viewer, or None (public registry)."""
    return registry.lookup(viewer, "segment")


def _tip(widget, field, extra=""):
    widget.setToolTip(HELP.get(field, "") + extra)
    return widget


class TrainWidget(ScrollDock):
    """Dock widget: choose data and settings, Start / Cancel, live loss plot."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._job = None
        self._config = None
        self.tracker = None
        self.last_summary = None
        self._build()
        self.compact()
        registry.register(self.viewer, "train", self)
        self._refresh_layers()
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._refresh_layers)
        self.start_from[0].setText(self._default_checkpoint())

    # ------------------------------------------------------------ UI
    def _build(self):
        root = QVBoxLayout(self.content)
        hint = QLabel("Fine-tune on your corrected cells, then segment again with the new model.")
        hint.setWordWrap(True)
        root.addWidget(hint)
        root.addWidget(self._build_data())
        root.addWidget(self._build_settings())
        self._build_run(root)
        self._build_plot(root)
        root.addStretch(1)

    def _build_data(self) -> QGroupBox:
        """The data source: open layers (image + cells pairs), a CSV + images, or two folders."""
        data = QGroupBox("Training data")
        dl = QVBoxLayout(data)
        self.source_combo = QComboBox()
        self.source_combo.setToolTip("Where the training images and their cells come from")
        for key, title in SOURCE_TITLES.items():
            self.source_combo.addItem(title, key)
        dl.addWidget(self.source_combo)
        self.pages = QStackedWidget()
        self.source_combo.currentIndexChanged.connect(self.pages.setCurrentIndex)
        # page 0: layers
        self.pair_table = QTableWidget(0, 2)
        self.pair_table.setHorizontalHeaderLabels(["Image (tick to use)", "Cells layer"])
        self.pair_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.pair_table.verticalHeader().setVisible(False)
        self.pair_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.pair_table.setToolTip("Every 2D image layer; pick the Labels layer holding its cells "
                                   "(Segment cells makes '<image> cells'). Ticked rows are used. With "
                                   "fewer than 4 images each is cut into 2x2 tiles and one tile "
                                   "of them is held out for validation.")
        self.pair_table.setMinimumHeight(90)
        self.pair_table.setMaximumHeight(150)  # leave room for the plot on a laptop screen
        self.pages.addWidget(self.pair_table)
        # page 1: csv + images; page 2: image + label folders
        self.train_csv = self._path_row("train_csv", file_filter="CSV (*.csv)")
        self.csv_images = self._path_row("images", folder=True)
        self.image_dir = self._path_row("image_dir", folder=True)
        self.label_dir = self._path_row("label_dir", folder=True)
        for rows in ((("CSV", self.train_csv), ("Images", self.csv_images)),
                     (("Images", self.image_dir), ("Labels", self.label_dir))):
            page = QWidget()
            form = QFormLayout(page)
            form.setContentsMargins(0, 0, 0, 0)
            for label, (_, row) in rows:
                form.addRow(label, row)
            self.pages.addWidget(page)
        dl.addWidget(self.pages)
        return data

    def _build_settings(self) -> QGroupBox:
        """Start model, backbone, the fields generated from TrainConfig, the output folder."""
        box = QGroupBox("Settings")
        form = QFormLayout(box)
        self.start_from = self._path_row("init_checkpoint", file_filter="Checkpoints (*.bin *.pth *.pt *.ckpt)",
                                         placeholder="empty = random weights (slow to learn)")
        form.addRow("Start from", self.start_from[1])
        self._build_backbone(form)
        main, advanced = self._build_fields()
        form.addRow(main.native)
        self.advanced = QCollapsible("Advanced")
        self.advanced.setToolTip("The other training settings (as cellseg-train's flags)")
        self.advanced.addWidget(advanced.native)
        form.addRow(self.advanced)
        self.out = self._path_row("out", folder=True)
        self.out[0].setText(str(_form.default_out_dir()))
        form.addRow("Output folder", self.out[1])
        return box

    def _build_fields(self):
        """One magicgui widget per TrainConfig field of the form (``self.fields[name]``), the
        main ones and the advanced ones in two containers; remembered values restored."""
        main, advanced = Container(name="settings"), Container(name="advanced")
        self.fields = {}
        for f in _form.form_fields():
            w = create_widget(value=f.default, annotation=f.annotation, name=f.name, label=f.label,
                              options=dict(f.options))
            w.tooltip = f.tooltip
            (advanced if f.advanced else main).append(w)
            self.fields[f.name] = w
        for c in (main, advanced):
            c.margins = (0, 0, 0, 0)
        saved = load_settings().get(REMEMBERED)
        for name, value in (saved.items() if isinstance(saved, dict) else ()):
            if name in self.fields:
                try:
                    self.fields[name].value = tuple(value) if isinstance(value, list) else value
                except (ValueError, TypeError):  # a value this form no longer takes: the default
                    pass
        return main, advanced

    def _build_backbone(self, form: QFormLayout):
        """Backbone initialisation (imagenet / random / a file), used without a start model."""
        self.backbone_combo = QComboBox()
        for key, text in _form.BACKBONE_CHOICES.items():
            self.backbone_combo.addItem(text, key)
        self.backbone_combo.setToolTip("Backbone initialisation when 'Start from' is empty: "
                                       + HELP.get("backbone_weights", ""))
        self.backbone_file = self._path_row("backbone_weights", file_filter="Weights (*.pth *.bin *.safetensors)")
        self.backbone_file[1].setVisible(False)
        self.backbone_combo.currentIndexChanged.connect(
            lambda *_: self.backbone_file[1].setVisible(self.backbone_combo.currentData() == "file"))
        form.addRow("Backbone", self.backbone_combo)
        form.addRow("", self.backbone_file[1])
        self.backbone_combo.setCurrentIndex(self.backbone_combo.findData(_form.default_backbone_choice()))
        if _form.default_backbone_choice() == "file":
            self.backbone_file[0].setText(_form.default_backbone_weights())
        # a starting checkpoint brings its own backbone weights
        self.start_from[0].textChanged.connect(
            lambda text: self.backbone_combo.setEnabled(not text.strip()))

    def _build_run(self, root: QVBoxLayout):
        """Start / Cancel, the progress bar and the status line."""
        self.start_btn = button("Start training", "Train in the background; the loss plot and the status follow it",
                                self.start)
        self.cancel_btn = button("Cancel", "Stop after the current step; files already saved stay valid", self.cancel,
                                 enabled=False)
        root.addLayout(row_of((self.start_btn, 2), (self.cancel_btn, 1)))
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setVisible(False)
        root.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status.setToolTip("Progress of the run (select to copy)")
        root.addWidget(self.status)

    def _build_plot(self, root):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        fg, bg = "#d0d0d0", "#262930"  # napari's dark theme
        self.figure = Figure(figsize=(3.2, 2.3), facecolor=bg, layout="constrained")
        self.ax = self.figure.add_subplot()
        self.ax.set_facecolor(bg)
        for s in self.ax.spines.values():
            s.set_color("#6a6a6a")
        self.ax.tick_params(colors=fg, labelsize=7)
        self.ax.set_xlabel("epoch", color=fg, fontsize=8)
        self.ax.set_ylabel("loss", color=fg, fontsize=8)
        (self.step_line,) = self.ax.plot([], [], "-", lw=0.8, alpha=0.45, color="#4fa3ff", label="train (step)")
        (self.train_line,) = self.ax.plot([], [], "o-", ms=3, color="#4fa3ff", label="train (epoch)")
        (self.val_line,) = self.ax.plot([], [], "s-", ms=3, color="#ffa040", label="val (epoch)")
        (self.best_mark,) = self.ax.plot([], [], "*", ms=11, color="#ffe066", label="best_model.bin")
        self.ax.legend(fontsize=7, facecolor=bg, edgecolor="#6a6a6a", labelcolor=fg, loc="upper right")
        self.empty_text = self.ax.text(0.5, 0.5, EMPTY_PLOT, transform=self.ax.transAxes, ha="center",
                                       va="center", color=fg, fontsize=8)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.canvas.setToolTip("Training loss per step (thin), mean per epoch, and validation loss "
                               "(epoch 0: the starting model)")
        root.addWidget(self.canvas)
        self._set_empty(True)

    def _set_empty(self, empty: bool):
        """Before any data: a clear "no data yet" text instead of empty axes."""
        self.empty_text.set_visible(empty)
        self.ax.get_legend().set_visible(not empty)
        for axis in (self.ax.xaxis, self.ax.yaxis):
            axis.set_visible(not empty)
        self.canvas.draw_idle()

    def _path_row(self, field, folder=False, file_filter="All files (*)", placeholder=""):
        edit = _tip(QLineEdit(), field)
        edit.setPlaceholderText(placeholder)
        btn = QPushButton("…")
        btn.setFixedWidth(28)
        btn.setToolTip("Browse")
        btn.clicked.connect(lambda: self._browse(edit, folder, file_filter))
        row = QWidget()
        lay = QHBoxLayout(row)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(edit, 1)
        lay.addWidget(btn)
        return edit, row

    def _browse(self, edit, folder, file_filter):
        if folder:
            path = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text())
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Choose a file", edit.text(), file_filter)
        if path:
            edit.setText(path)

    # ------------------------------------------------------------ layers
    def _refresh_layers(self, event=None):
        ticked = {self.pair_table.item(r, 0).text(): self.pair_table.item(r, 0).checkState()
                  for r in range(self.pair_table.rowCount())}
        chosen = {self.pair_table.item(r, 0).text(): self.pair_table.cellWidget(r, 1).currentText()
                  for r in range(self.pair_table.rowCount())}
        images = [ly for ly in self.viewer.layers if isinstance(ly, Image) and len(spatial_shape(ly)) == 2]
        labels = [ly for ly in self.viewer.layers if isinstance(ly, Labels)]
        self.pair_table.setRowCount(len(images))
        for r, img in enumerate(images):
            fits = [ly.name for ly in labels if tuple(ly.data.shape) == spatial_shape(img)]
            combo = QComboBox()
            combo.addItems([NO_LABELS] + fits)
            want = chosen.get(img.name) or f"{img.name} cells"
            if want in fits:
                combo.setCurrentText(want)
            elif len(fits) == 1 and img.name not in chosen:
                combo.setCurrentText(fits[0])
            item = QTableWidgetItem(img.name)
            item.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
            default = Qt.CheckState.Checked if combo.currentText() != NO_LABELS else Qt.CheckState.Unchecked
            item.setCheckState(ticked.get(img.name, default))
            self.pair_table.setItem(r, 0, item)
            self.pair_table.setCellWidget(r, 1, combo)

    def layer_pairs(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(image name, image data, labels copy) for every ticked row; DataError otherwise."""
        from training.data import DataError

        pairs = []
        for r in range(self.pair_table.rowCount()):
            item = self.pair_table.item(r, 0)
            if item.checkState() != Qt.CheckState.Checked:
                continue
            lab_name = self.pair_table.cellWidget(r, 1).currentText()
            if lab_name == NO_LABELS or lab_name not in self.viewer.layers:
                raise DataError(f"{item.text()}: no cells layer chosen (segment it first, or untick it)")
            img = self.viewer.layers[item.text()]
            pairs.append((img.name, np.asarray(img.data), np.array(self.viewer.layers[lab_name].data)))
        _form.check_pairs(pairs)
        return pairs

    def _default_checkpoint(self) -> str:
        from napari_cellseg.model.checkpoint import bundled_model_path

        seg = find_segment_widget(self.viewer)
        if seg is not None and seg.model_combo.currentData():
            return str(seg.model_combo.currentData())
        last = load_settings().get("last_checkpoint")
        if last and Path(last).is_file():
            return str(last)
        bundled = bundled_model_path()
        return str(bundled) if bundled.is_file() else ""

    # ------------------------------------------------------------ form
    def form_values(self) -> dict:
        return {"source": self.source_combo.currentData(), **{n: w.value for n, w in self.fields.items()},
                "out": self.out[0].text(), "init_checkpoint": self.start_from[0].text(),
                "train_csv": self.train_csv[0].text(), "images": self.csv_images[0].text(),
                "image_dir": self.image_dir[0].text(), "label_dir": self.label_dir[0].text(),
                "backbone_choice": self.backbone_combo.currentData(),
                "backbone_file": self.backbone_file[0].text()}

    def read_config(self):
        """The form as a validated TrainConfig (ConfigError / DataError: one line naming the field)."""
        values = self.form_values()
        choice, path = values.pop("backbone_choice"), values.pop("backbone_file")
        # only used without a starting checkpoint (which brings its own backbone weights)
        values["backbone_weights"] = (_form.default_backbone_weights() if values["init_checkpoint"].strip()
                                      else _form.backbone_weights(choice, path))
        return _form.form_to_config(values)

    # ------------------------------------------------------------ run
    def start(self):
        from napari.qt.threading import create_worker

        if self._worker is not None:
            return
        try:
            config = self.read_config()
            save_settings({REMEMBERED: _form.remembered(self.form_values())})  # the next form opens with them
            pairs = self.layer_pairs() if self.source_combo.currentData() == "layers" else None
            if (Path(config.out) / "last.ckpt").exists():
                raise ValueError(f"{config.out}: already holds a run; choose another output folder")
        except ValueError as exc:  # ConfigError / DataError: one line naming the field
            self._error(str(exc))
            return
        from napari_cellseg.gui.torch_guard import block_triton, import_torch

        block_triton()  # in the GUI thread (instant); the slow imports run on the worker below
        self._config, self.tracker, self.last_summary = config, _form.ProgressTracker(config.epochs), None
        self._job = _form.train_job(config, pairs)
        job = self._job

        def body():  # the window stays responsive while PyTorch and the training code load
            yield {"stage": "setup", "message": "Loading PyTorch and the training code…"}
            import_torch()
            return (yield from job)

        worker = create_worker(body, _ignore_errors=True)
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_done)
        worker.errored.connect(lambda exc: self._error(f"Training failed: {exc}"))
        worker.aborted.connect(self._on_cancelled)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._clear_plot()
        self.start_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.status.setText(f"Starting: output in {config.out}")
        worker.start()

    def cancel(self):
        if self._worker is not None:
            self.status.setText("Cancelling after the current step…")
            self._worker.quit()

    def _on_event(self, event):
        if event.get("stage") == "warning":  # e.g. most steps did not update the weights
            show_warning(f"Train model: {event.get('message', '')}")
        self.tracker.update(event)
        self.progress.setValue(int(1000 * self.tracker.fraction))
        self.status.setText(self.tracker.text)
        if event.get("stage") in ("train", "epoch"):
            self._update_plot()

    def _clear_plot(self):
        for line in (self.step_line, self.train_line, self.val_line, self.best_mark):
            line.set_data([], [])
        self._set_empty(True)

    def _update_plot(self):
        t = self.tracker
        if t.steps:
            self.step_line.set_data(*zip(*t.steps))
        rows = t.epoch_rows
        trained = [r for r in rows if int(r["epoch"]) > 0 and "train_loss" in r]
        self.train_line.set_data([r["epoch"] for r in trained], [r["train_loss"] for r in trained])
        self.val_line.set_data([r["epoch"] for r in rows], [r.get("val_loss", np.nan) for r in rows])
        best = _form.best_row(rows)
        self.best_mark.set_data(*(([best["epoch"]], [best["val_loss"]]) if best else ([], [])))
        self.ax.relim()
        self.ax.autoscale_view()
        self.ax.set_xlim(-0.05 if t.start_row else 0, max(t.epochs, 1) + 0.05)
        self._set_empty(not (t.steps or rows))

    def _on_done(self, summary):
        self.last_summary = summary
        best = Path(summary["best_model"]).resolve()
        what = _form.done_message(summary.get("history", []), self.tracker.start_row if self.tracker else None)
        if summary.get("healthy") is False:  # never looks healthy: the weights never changed
            self._error(f"Training failed: the optimizer never stepped (every step was skipped; see "
                        f"skipped_batches / scaler_skipped in {Path(summary['out']) / 'log.csv'})")
            return
        if not best.is_file() or what is None:
            self._error(f"Training ended without a finite val loss: no best_model.bin in {summary['out']}")
            return
        seg = find_segment_widget(self.viewer)
        where = "is now selected in Segment cells"
        if seg is not None:
            seg.set_checkpoint(best)
        else:  # the Segment widget picks it up when it is opened
            remember_checkpoint(best)
            where = "will be selected when you open Segment cells"
        msg = f"Training finished: {what} {where}"
        self.status.setText(f"{msg}\n{best}")
        show_info(msg)
        self.out[0].setText(str(_form.default_out_dir()))  # the next run gets a fresh folder

    def _on_cancelled(self):
        out = Path(self._config.out)
        best = out / "best_model.bin"
        kept = f"best_model.bin so far is kept in {out}" if best.is_file() else "no epoch finished: nothing saved"
        self.status.setText(f"Cancelled: {kept}.")
        show_info(f"Training cancelled: {kept}.")

    def _on_finished(self):
        if self._job is not None:
            self._job.close()  # the engine's generator stops at its current step (files stay valid)
        self._worker = self._job = None
        self.progress.setVisible(False)
        self.start_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def _error(self, msg):
        self.status.setText(f"⚠ {msg}")
        show_error(msg)
