"""The "Segment cells" dock widget (thin: reads the form, calls the core, puts results in layers).

Prediction runs in a napari thread worker (``pipeline.Pipeline`` built from the form's
``options.PredictOptions``, imported lazily so
napari start-up never imports torch). The network output (Detections) is kept in the result
layer's metadata; the sliders only call ``Detections.to_labels``.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QLabel, QMessageBox, QProgressBar,
                            QSpinBox, QVBoxLayout)
from superqt import QLabeledDoubleSlider

from napari_cellseg.gui.segment import edit as _edit
from napari_cellseg.gui import registry
from napari_cellseg.gui.collector import freeze_long_lived
from napari_cellseg.gui.reader import prefer_csv_reader
from napari_cellseg.gui.segment.jobs import calibrate_job, load_torch_job, predict_options, segment_job
from napari_cellseg.gui.layers import (META_KEY, InputError, Result, draw_labels, hand_cells, image_id_for_layer, label_dtype, image_plane, result_layer_name, result_of, spatial_shape, stack_planes)
from napari_cellseg.gui.layout import ScrollDock, button, row_of
from napari_cellseg.gui.compat import reset_undo_history, same_layer, unwrap
from napari_cellseg.gui.segment.panels import PanelActions, build_edit_box, build_export_box
from napari_cellseg.gui.settings import DIAMETER_TIP, save_settings, size_note
from napari_cellseg.options import OptionError, Thresholds

SEGMENT_TIP = ("Run the network once on the image (the sliders below then work without "
               "re-running it)")
ALL_PLANES_TIP = ("Segment all planes of a 3D/T stack in one run (progress per plane; Cancel keeps "
                  "nothing). Unticked: only the plane shown in the viewer")


KEEP, RESTART = "keep", "restart"  # answers of SegmentWidget._ask_keep_edits
LOADING = "Loading PyTorch in the background (first start only, a few seconds)…"
BUSY_TIP = "Wait: PyTorch is still loading (see the status line)"


class SegmentWidget(PanelActions, ScrollDock):
    """Dock widget: pick image + model, Segment, tune thresholds live, edit, export CSV."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._predictors: dict = {}
        self._worker = None
        self._loader = None
        self._model_input = None  # the chosen model's own channels (options.ImageInput), once read
        self._torch_ready = False
        self._bound: set[int] = set()
        self._job_layer = None  # the image layer the running job reads
        self._applying = None  # a finished run's result, drawn on the next event-loop turn
        self._cancel_reason = ""  # why the running job was cancelled, when not by Cancel
        self._build()
        self.compact()
        self._refresh_images()
        self._refresh_models()
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._refresh_images)
        ev.removed.connect(self._on_layer_removed)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self._update_tune_panel()
        registry.register(self.viewer, "segment", self)
        prefer_csv_reader()  # File > Open on our CSVs without napari's "which reader?" dialog
        self._start_torch_loader()

    # ------------------------------------------------------------ UI
    def _build(self):
        root = QVBoxLayout(self.content)
        hint = QLabel("① pick image and model → ② Segment → ③ tune sliders, fix cells by hand "
                      "→ ④ Export CSV")
        hint.setWordWrap(True)
        root.addWidget(hint)
        root.addLayout(self._build_inputs())
        root.addLayout(self._build_run())
        self.tune_box = self._build_tune_box()
        root.addWidget(self.tune_box)
        self.edit_box = build_edit_box(self)
        root.addWidget(self.edit_box)
        self.export_box = build_export_box(self)
        root.addWidget(self.export_box)
        root.addStretch(1)

    def _build_inputs(self) -> QFormLayout:
        """Image, model, device, cell diameter, channel, planes."""
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("2D grey or RGB image layer. For a stack, the plane shown in the "
                                    "viewer is segmented (or every plane: see Planes).")
        self.image_combo.currentIndexChanged.connect(self._update_tune_panel)
        form.addRow("Image", self.image_combo)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Checkpoint (.bin/.pth) written by cellseg-train, or the bundled "
                                    "demo model")
        self.browse_btn = button("Browse…", "Choose a checkpoint file", self._on_browse)
        form.addRow("Model", row_of((self.model_combo, 1), self.browse_btn))
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.setToolTip("auto = GPU if one is available, else CPU")
        form.addRow("Device", self.device_combo)
        self.diameter_spin = QDoubleSpinBox()
        self.diameter_spin.setRange(0.0, 1000.0)
        self.diameter_spin.setDecimals(0)
        self.diameter_spin.setSingleStep(5.0)
        self.diameter_spin.setSuffix(" px")
        self.diameter_spin.setSpecialValueText("auto")
        self.diameter_spin.setValue(0.0)
        self.diameter_spin.setToolTip(DIAMETER_TIP)
        self.calibrate_btn = button("Calibrate", "Measure the cells' diameter in this image (the automatic size "
                                    "estimate) and write it into the box, like cellpose's calibrate", self.calibrate)
        form.addRow("Cell diameter", row_of((self.diameter_spin, 1), self.calibrate_btn))
        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip("Cell channel (cellpose's 'chan to segment'; cellseg predict "
                                      "--channel): the image's own channels, named as its file names them")
        self.invert_check = QCheckBox("invert")
        self.invert_check.setToolTip("Dark cells on a bright background (brightfield, histology): "
                                     "invert so the cells are bright, as the model expects")
        form.addRow("Channel", row_of((self.channel_combo, 1), self.invert_check))
        self.channel2_combo = QComboBox()
        self.channel2_combo.setToolTip("Optional nuclear channel (cellpose's chan2; --channel2): the cell "
                                       "channel goes to the model's red + green inputs, this one to blue")
        form.addRow("Nuclei", self.channel2_combo)
        self.image_combo.currentIndexChanged.connect(self._refresh_channels)
        self.all_planes = QCheckBox("every plane of the stack")
        self.all_planes.setToolTip(ALL_PLANES_TIP)
        form.addRow("Planes", self.all_planes)
        return form

    def _build_run(self) -> QVBoxLayout:
        """Segment / Cancel, the progress bar and the status line."""
        box = QVBoxLayout()
        self.segment_btn = button("Segment", SEGMENT_TIP, self.segment)
        self.cancel_btn = button("Cancel", "Stop the running job; nothing changes in the layers", self.cancel,
                                 enabled=False)
        box.addLayout(row_of((self.segment_btn, 2), (self.cancel_btn, 1)))
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setVisible(False)  # shown while a job runs
        box.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        box.addWidget(self.status)
        return box

    def _build_tune_box(self) -> QGroupBox:
        """The live thresholds: sliders, min area, post-processing, cell count, Reset."""
        tune = QGroupBox("Tune (instant, no re-run)")
        tform = QFormLayout(tune)
        self.box_slider = self._slider("Detections scoring below this are dropped")
        self.mask_slider = self._slider("Pixel probability above which a pixel belongs to the cell")
        tform.addRow("Box confidence", self.box_slider)
        tform.addRow("Mask threshold", self.mask_slider)
        self.area_spin = QSpinBox()
        self.area_spin.setRange(0, 1_000_000)
        self.area_spin.setSuffix(" px")
        self.area_spin.setToolTip("Cells with fewer pixels are dropped")
        self.area_spin.valueChanged.connect(self.redraw)
        tform.addRow("Min area", self.area_spin)
        self.fill_check = QCheckBox("fill holes")
        self.fill_check.setToolTip("Fill holes inside each cell (cellpose does this by default)")
        self.largest_check = QCheckBox("keep largest")
        self.largest_check.setToolTip("Keep only the largest connected piece of each cell")
        for c in (self.fill_check, self.largest_check):
            c.toggled.connect(self.redraw)
        tform.addRow("Masks", row_of(self.fill_check, self.largest_check))
        self.count_label = QLabel("")
        self.count_label.setWordWrap(True)
        tform.addRow("Cells", self.count_label)
        self.reset_btn = button("Edited by hand — Reset to model", "The sliders are locked so hand edits are not "
                                "lost. This discards the edits and redraws from the model output.", self.reset_to_model)
        self.reset_btn.setStyleSheet("QPushButton { color: #ffb000; font-weight: bold; }")
        tform.addRow(self.reset_btn)
        return tune

    def _slider(self, tip):
        s = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        s.setRange(0.0, 1.0)
        s.setSingleStep(0.01)
        s.setDecimals(2)
        s.setValue(0.5)
        s.setToolTip(tip)
        s.valueChanged.connect(self.redraw)
        return s

    # ------------------------------------------------------------ messages
    def _error(self, msg):
        self.status.setText(f"⚠ {msg}")
        show_error(msg)

    def _info(self, msg, notify=False):
        self.status.setText(msg)
        if notify:
            show_info(msg)

    # ------------------------------------------------------------ pickers
    def _refresh_images(self, event=None):
        current = self.image_combo.currentText()
        added = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        if isinstance(added, Image):  # a newly opened image is the one to segment
            current = added.name
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        names = [lyr.name for lyr in self.viewer.layers if isinstance(lyr, Image)]
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        elif names:
            sel = self.viewer.layers.selection.active
            self.image_combo.setCurrentText(sel.name if isinstance(sel, Image) else names[-1])
        self.image_combo.blockSignals(False)
        self.image_combo.setPlaceholderText("open an image first")
        self._update_tune_panel()
        self._refresh_channels()

    # ------------------------------------------------------------ channels
    def _channels_of(self, layer) -> tuple[int, tuple[str, ...], int | None]:
        """(channels, names, axis of the channels in the layer's data or None = last / none):
        an RGB layer's colours, a file-backed CxYxX / YxXxC layer's channels (images.stored_channels:
        the file's axes metadata), else one grey channel."""
        from napari_cellseg.io.images import stored_channels

        if getattr(layer, "rgb", False):
            return min(int(layer.data.shape[-1]), 3), (), None
        path = getattr(getattr(layer, "source", None), "path", None)
        if path and not getattr(layer, "multiscale", False):
            axis, names = stored_channels(path, layer.data.shape)
            if axis is not None and axis >= layer.data.ndim - 3:  # CxYxX / YxXxC (one plane)
                return int(layer.data.shape[axis]), names, axis
        return 1, (), None

    def _refresh_channels(self, *_):
        from napari_cellseg.io.images import channel_labels

        try:
            n, names, _ = self._channels_of(self._image_layer())
        except InputError:
            n, names = 1, ()
        keep = (self.channel_combo.currentData(), self.channel2_combo.currentData())
        rgb = None if n != 3 or names else True
        for combo, items in ((self.channel_combo, channel_labels(n, names, rgb)),
                             (self.channel2_combo, [(0, "none")] + channel_labels(n, names, rgb)[1:])):
            combo.blockSignals(True)
            combo.clear()
            for number, label in items:
                combo.addItem(label, number)
            combo.blockSignals(False)
        model = self._model_input
        for combo, old, own in zip((self.channel_combo, self.channel2_combo), keep,
                                   (model.channel, model.channel2) if model else (0, 0)):
            if not old:  # "all channels" / "none" (the default) follows the model's own channel
                old = own
            i = combo.findData(old) if old is not None else -1
            combo.setCurrentIndex(max(i, 0))
        self.channel2_combo.setEnabled(n > 1)

    def _channel_planes(self, layer, axis: int) -> dict:
        """The plane of a CxYxX / YxXxC layer with its channels last, for the pipeline."""
        return {(): np.moveaxis(np.asarray(layer.data), axis, -1)}

    def _on_active_layer(self, event=None):
        """The Image picker follows the image layer selected in the layer list."""
        layer = self.viewer.layers.selection.active
        if isinstance(layer, Image) and self.image_combo.findText(layer.name) >= 0:
            self.image_combo.setCurrentText(layer.name)

    def _image_layer(self) -> Image:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no image layer: open an image (File > Open) and choose it under Image")
        return self.viewer.layers[name]

    def _result_layer(self) -> Labels | None:
        """The result layer of the chosen image (a napari proxy when docked from the Plugins
        menu: compare it with ``same_layer``, never ``is``)."""
        name = self.image_combo.currentText()
        target = result_layer_name(name) if name else None
        if target and target in self.viewer.layers:
            lyr = self.viewer.layers[target]
            if isinstance(lyr, Labels) and result_of(lyr) is not None:
                return lyr
        return None

    # ------------------------------------------------------------ torch, thresholds
    def _start_torch_loader(self):
        """Import torch on a worker (Segment disabled meanwhile), then show the checkpoint's
        thresholds on the sliders before any run."""
        from napari.qt.threading import create_worker

        from napari_cellseg.gui.torch_guard import block_triton

        if self._loader is not None:
            return
        block_triton()  # in the GUI thread, before any torch import (see _torch_guard)
        ready = "napari_cellseg.inference.predictor" in sys.modules
        worker = create_worker(load_torch_job, self.model_combo.currentData(), _ignore_errors=True)
        worker.returned.connect(functools.partial(self._on_torch_ready, self.model_combo.currentData()))
        worker.errored.connect(lambda exc: self._error(f"PyTorch could not be loaded: {exc}"))
        self._loader = worker
        if not ready:
            self._info(LOADING)
        self._set_busy()
        worker.start()

    def _on_torch_ready(self, checkpoint, value):
        thresholds, image_input, problem = value
        self._torch_ready, self._loader = True, None
        try:
            self.model_combo.currentData()
        except RuntimeError:  # the widget was closed while PyTorch loaded
            return
        freeze_long_lived(self.viewer)  # PyTorch is imported: no more 235 ms full collections
        if checkpoint != self.model_combo.currentData():  # the model changed meanwhile
            self._on_model_changed()
            return
        if self.status.text() == LOADING:
            self._info("Ready: press Segment.")
        if problem:
            self._error(problem)
        else:
            if thresholds is not None and self._result_layer() is None:
                self._show_thresholds(thresholds)
            self._show_input(image_input)
        self._set_busy()

    def _on_model_changed(self, *_):
        if self._torch_ready and self._worker is None and self._result_layer() is None:
            self._torch_ready = False
            self._start_torch_loader()  # torch is loaded: this only reads the thresholds

    def _show_input(self, image_input):
        """Put the model's own channels and invert (its checkpoint's ``options.ImageInput``) on
        the pickers, where the image has those channels: cellseg predict's defaults."""
        self._model_input = image_input
        if image_input is None:
            return
        for combo, number in ((self.channel_combo, image_input.channel), (self.channel2_combo, image_input.channel2)):
            i = combo.findData(number)
            if i >= 0:
                combo.setCurrentIndex(i)
        self.invert_check.setChecked(image_input.invert)

    def _show_thresholds(self, thresholds: Thresholds):
        """Put an ``options.Thresholds`` on the controls without redrawing."""
        widgets = ((self.box_slider, thresholds.box_conf), (self.mask_slider, thresholds.mask_threshold),
                   (self.area_spin, thresholds.min_area), (self.fill_check, thresholds.fill_holes),
                   (self.largest_check, thresholds.keep_largest))
        for w, value in widgets:
            w.blockSignals(True)
            if isinstance(w, QCheckBox):
                w.setChecked(value)
            else:
                w.setValue(value)
            w.blockSignals(False)

    def _set_busy(self):
        idle = self._worker is None and self._torch_ready
        for b in (self.segment_btn, self.calibrate_btn):
            b.setEnabled(idle)
        self.segment_btn.setToolTip(SEGMENT_TIP if self._torch_ready else BUSY_TIP)
        self.cancel_btn.setEnabled(self._worker is not None)

    # ------------------------------------------------------------ segment / cancel
    def _input_options(self) -> dict:
        """The channel picker as PredictOptions fields (numbered from 1, 0 = all / none)."""
        return {"channel": int(self.channel_combo.currentData() or 0),
                "channel2": int(self.channel2_combo.currentData() or 0),
                "invert": self.invert_check.isChecked()}

    def segment(self):
        from napari.qt.threading import create_worker

        if self._worker is not None or not self._torch_ready:
            return
        try:
            layer = self._image_layer()
            axis = self._channels_of(layer)[2]
            if axis is not None:  # the channels of a file's CxYxX plane: one image, not planes
                planes, what = self._channel_planes(layer, axis), ""
            elif self.all_planes.isChecked() and len(spatial_shape(layer)) > 2:
                planes = stack_planes(layer)
                what = f" ({len(planes)} planes)"
            else:
                image, plane = image_plane(layer, self.viewer.dims.current_step, self.viewer.dims.ndisplay)
                planes = {plane: image}
                what = f" plane {plane}" if plane else ""
            checkpoint = self._checkpoint()
            diameter = float(self.diameter_spin.value()) or None  # 0 = the model's own size
            options = predict_options(checkpoint, self.device_combo.currentText(), diameter,
                                      self.thresholds(), self._input_options())
        except (InputError, OptionError) as exc:
            self._error(str(exc))
            return
        existing = self._result_layer()
        plan = None
        if existing is not None and result_of(existing).edited:
            plan = self._ask_keep_edits(existing.name)
            if plan is None:
                self._info("Segment cancelled: your hand edits are unchanged.")
                return
        save_settings({"last_checkpoint": checkpoint})
        worker = create_worker(segment_job, options, planes, self._predictors,
                               _ignore_errors=True)  # errors are shown by _on_failed
        worker.returned.connect(functools.partial(self._on_done, layer, checkpoint, plan, channel_axis=axis))
        self._job_layer = layer
        self._run(worker, f"Segmenting {layer.name}{what}…", "Segmentation")

    def _ask_keep_edits(self, name: str) -> str | None:  # tests replace this
        """KEEP (hand-edited cells stay, the new model fills the rest), RESTART (discard the
        edits) or None (do not segment)."""
        box = QMessageBox(self)
        box.setWindowTitle("Hand edits")
        box.setText(f"{name!r} has cells you edited by hand.")
        box.setInformativeText("Keep them and fill the rest from this model, or start over from "
                               "the model's output?")
        keep = box.addButton("Keep my cells", QMessageBox.ButtonRole.AcceptRole)
        restart = box.addButton("Start over", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        box.exec()
        return {id(keep): KEEP, id(restart): RESTART}.get(id(box.clickedButton()))

    def _confirm(self, question: str) -> bool:  # tests replace this
        answer = QMessageBox.question(self, "napari-cellseg", question,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
                                      QMessageBox.StandardButton.Cancel)
        return answer == QMessageBox.StandardButton.Yes

    def _run(self, worker, message, what):
        worker.yielded.connect(self._on_progress)
        worker.errored.connect(lambda exc: self._error(f"{what} failed: {exc}"))
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_busy()
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self._info(message)
        worker.start()

    def calibrate(self):
        """Measure the cells' diameter on the shown plane and write it into the diameter box."""
        from napari.qt.threading import create_worker

        if self._worker is not None or not self._torch_ready:
            return
        try:
            layer = self._image_layer()
            axis = self._channels_of(layer)[2]
            if axis is not None:
                image = next(iter(self._channel_planes(layer, axis).values()))
            else:
                image, _ = image_plane(layer, self.viewer.dims.current_step, self.viewer.dims.ndisplay)
            checkpoint = self._checkpoint()
            options = predict_options(checkpoint, self.device_combo.currentText(), "auto",
                                      self.thresholds(), self._input_options())
        except (InputError, OptionError) as exc:
            self._error(str(exc))
            return
        worker = create_worker(calibrate_job, options, image, self._predictors, _ignore_errors=True)
        worker.returned.connect(functools.partial(self._on_calibrated, layer.name))
        self._run(worker, f"Calibrating: measuring the cells in {layer.name}…", "Calibration")

    def _on_calibrated(self, name, value):
        diameter, scale, n = value
        if not diameter:
            self._error(f"Calibrate found no cells in {name}: type the diameter, or try another "
                        "channel / invert")
            return
        self.diameter_spin.setValue(diameter)
        self._info(f"Cell diameter measured in {name}: {diameter:.0f} px ({n} cells); written into "
                   f"the box. At this diameter the image is resized x{round(scale, 2):g}. Press Segment.",
                   notify=True)

    def cancel(self):
        if self._worker is not None:
            self._info("Cancelling…")
            self._worker.quit()

    def _on_aborted(self):
        if self._cancel_reason:
            self._error(self._cancel_reason)
        else:
            self._info("Cancelled: nothing changed.", notify=True)

    def _on_layer_removed(self, event=None):
        """The image a job reads was removed: cancel that job, with one message."""
        job = self._job_layer
        if self._worker is None or job is None or any(same_layer(x, job) for x in self.viewer.layers):
            return
        self._cancel_reason = (f"{job.name!r} was removed while it was being segmented: the job is "
                               "cancelled and nothing was added.")
        self._info("Cancelling…")
        self._worker.quit()

    def _on_progress(self, event):
        self.progress.setValue(int(100 * float(event.get("fraction", 0.0))))
        self.status.setText(f"Segmenting: {event.get('stage', '')}…")

    def _on_finished(self):
        if self._applying is not None:  # the result is drawn on the next turn: finish after it
            QTimer.singleShot(1, self._on_finished)
            return
        self._worker = None
        self._job_layer, self._cancel_reason = None, ""
        self.progress.setVisible(False)
        self._set_busy()

    def _on_done(self, image_layer, checkpoint, plan, value, channel_axis=None):
        new, thresholds = value
        self.progress.setValue(100)
        if not any(same_layer(x, image_layer) for x in self.viewer.layers):
            self._error(f"{image_layer.name!r} was removed while it was being segmented: nothing "
                        "was added.")
            return
        name = result_layer_name(image_layer.name)
        shape = spatial_shape(image_layer)
        keep = [i for i in range(len(shape)) if i != channel_axis]  # a file's channel axis: not in the result
        shape, where = tuple(shape[i] for i in keep), {k: np.asarray(getattr(image_layer, k))[keep]
                                                       for k in ("scale", "translate")}
        lyr, note = self._result_target(name, shape)
        if lyr is not None and result_of(lyr).edited and plan is None:
            # painted on while the network ran: the hand edits win; this run is not applied
            self._update_tune_panel()
            self._error(f"{name!r} was edited by hand while Segment ran: your edits are kept and "
                        "this run's result was not applied. Segment again to keep them and fill "
                        "the rest, or press 'Reset to model'")
            return
        old = result_of(lyr) if lyr is not None else None
        if lyr is not None:
            self._apply_result(image_layer, checkpoint, plan, new, thresholds, lyr, old, note)
            return
        # a new layer: napari's own work (the layer, its visuals, the first paint: ~190 ms at
        # 3000x3000) and the drawing go in two turns of the event loop, so neither freezes
        # napari for their sum; the job counts as running until the drawing is in (_on_finished)
        dtype = label_dtype(max(len(d) for d in new.values()))
        lyr = self.viewer.add_labels(np.zeros(shape, dtype), name=name, **where)
        self._applying = functools.partial(self._apply_result, image_layer, checkpoint, plan, new,
                                           thresholds, lyr, None, note)
        QTimer.singleShot(1, self._apply_pending)  # a real timer: the paint and other events come first

    def _apply_pending(self):
        apply, self._applying = self._applying, None
        if apply is not None:
            apply()

    def _apply_result(self, image_layer, checkpoint, plan, new, thresholds, lyr, old, note):
        """Put a run's Detections on its result layer ``lyr`` (``old``: the layer's earlier
        Result, None for a new layer) and draw them."""
        if not any(same_layer(x, lyr) for x in self.viewer.layers):
            return  # removed in between: nothing to draw on
        planes, kept = dict(new), {}
        if old is not None and plan == KEEP:  # every plane keeps its hand-edited cells
            planes = {**old.segmented(), **new}
            kept = {p: hand_cells(lyr.data[p] if p else lyr.data, self._drawing(old, p), old.kept.get(p))
                    for p in planes}
        elif old is not None and plan is None and old.checkpoint == str(checkpoint):
            planes, kept = {**old.segmented(), **new}, dict(old.kept)  # other planes keep theirs
        else:  # first run, another model, or "start over": start clean
            lyr.data[...] = 0
        top = max(len(d) for d in planes.values()) + max((int(k.max()) for k in kept.values()), default=0)
        if np.iinfo(lyr.data.dtype).max <= top:  # more ids than the layer's dtype holds
            lyr.data = np.asarray(lyr.data).astype(label_dtype(top))
        try:
            current = image_plane(image_layer, self.viewer.dims.current_step, 2)[1]
        except InputError:
            current = None
        plane = current if current in planes else list(new)[-1]
        lyr.metadata[META_KEY] = Result(
            image_id=image_id_for_layer(image_layer), image_layer=image_layer.name, plane=plane,
            detections=planes[plane], thresholds=thresholds, checkpoint=str(checkpoint),
            planes=planes, kept={p: k for p, k in kept.items() if k.any()})
        self._bind(lyr)
        self.image_combo.setCurrentText(image_layer.name)
        self._show_thresholds(thresholds)
        self._update_tune_panel()
        n = self.redraw()
        self.viewer.layers.selection.active = lyr
        self._report_run(image_layer.name, new, n, note + self._kept_note(kept))

    def _result_target(self, name: str, shape) -> tuple:
        """Our result layer ``name`` for an image of ``shape`` (None: make one) and a note. A
        layer of that name that is not ours (ground truth, painted by hand) is never overwritten:
        it is renamed. Our own earlier result of another shape is removed."""
        lyr = self.viewer.layers[name] if name in self.viewer.layers else None
        note = ""
        if lyr is not None and result_of(lyr) is None:
            lyr.name = kept = self._free_name(f"{name} (kept)")
            note = f" The layer that was named {name!r} is kept as {kept!r}."
            lyr = None
        if lyr is not None and tuple(lyr.data.shape) != tuple(shape):
            self.viewer.layers.remove(lyr)
            lyr = None
        return lyr, note

    @staticmethod
    def _drawing(result, plane):
        """What the model (and earlier kept cells) drew on ``plane`` at the layer's thresholds;
        zeros on a plane it never segmented (all its cells are hand-made)."""
        dets = result.segmented().get(plane)
        if dets is None:
            return 0
        return draw_labels(dets, result.thresholds or Thresholds(), result.kept.get(plane))

    @staticmethod
    def _kept_note(kept: dict) -> str:
        n = sum(len(np.unique(k[k > 0])) for k in kept.values())
        return f" {n} hand-edited cells kept; the rest is from this model." if n else ""

    def _bind(self, lyr):
        if id(unwrap(lyr)) not in self._bound:
            self._bound.add(id(unwrap(lyr)))
            lyr.events.paint.connect(functools.partial(self._on_hand_edit, lyr))
            _edit.bind_edit_keys(lyr, self.viewer, self._edit_report)

    def _report_run(self, image_name: str, new: dict, n, note: str):
        kept = sum(len(d) for d in new.values())
        tip = " — lower Box confidence to see more" if n == 0 and kept else ""
        where = f" ({len(new)} planes)" if len(new) > 1 else ""
        size = size_note(new.values())
        self._info(f"{n} cells in {image_name}{where} ({kept} candidates kept for the "
                   f"sliders){tip}.{' ' + size if size else ''}{note}", notify=True)

    def follow(self, image_name: str) -> None:
        """Put the sliders, edit lock and edit keys on ``image_name`` and its result layer made
        by another dock (the Review dataset dock shows one image at a time this way)."""
        self._refresh_images()
        self.image_combo.setCurrentText(image_name)
        lyr = self._result_layer()
        if lyr is not None:
            self._bind(lyr)
            if result_of(lyr).thresholds is not None:
                self._show_thresholds(result_of(lyr).thresholds)
        self._update_tune_panel()
        if lyr is not None and not result_of(lyr).edited:
            self.count_label.setText(f"{len(np.unique(lyr.data)) - 1} cells")

    def _free_name(self, base: str) -> str:
        names = {x.name for x in self.viewer.layers}
        return next(c for c in (base if i == 0 else f"{base} {i + 1}" for i in range(len(names) + 1))
                    if c not in names)

    # ------------------------------------------------------------ sliders
    def thresholds(self) -> Thresholds:
        """The controls as one ``options.Thresholds`` (validated here, once)."""
        return Thresholds(box_conf=float(self.box_slider.value()),
                          mask_threshold=float(self.mask_slider.value()),
                          min_area=int(self.area_spin.value()), fill_holes=self.fill_check.isChecked(),
                          keep_largest=self.largest_check.isChecked())

    def redraw(self, *_):
        """Re-derive the labels from the kept Detections (never runs the network). The status
        line is left as it is (it reports the last run)."""
        lyr = self._result_layer()
        r = result_of(lyr) if lyr is not None else None
        if r is None or r.edited:
            return None
        t = self.thresholds()
        counts = {}
        for plane, dets in r.segmented().items():
            labels = draw_labels(dets, t, r.kept.get(plane))
            target = lyr.data[plane] if plane else lyr.data
            if isinstance(lyr.data, np.ndarray) and target.shape == labels.shape:
                np.copyto(target, labels, casting="unsafe")  # in place: 2-3x cheaper than .data = ...
            elif plane:
                lyr.data[plane] = labels
            else:
                lyr.data = labels
            counts[plane] = int(labels.max()) if labels.size else 0
        lyr.refresh(extent=False)
        reset_undo_history(lyr)  # old strokes must not replay onto a different drawing
        _edit.forget_last_stroke(lyr)  # ...nor be given a new id there
        r.thresholds = t
        n = sum(counts.values())
        if len(counts) > 1:
            self.count_label.setText(f"{n} cells in {len(counts)} planes")
        else:
            self.count_label.setText(f"{n} cells")
        return n

    def _update_tune_panel(self, *_):
        lyr = self._result_layer()
        r = result_of(lyr) if lyr is not None else None
        live = r is not None and not r.edited
        for w in (self.box_slider, self.mask_slider, self.area_spin):
            w.setEnabled(live)
        self.reset_btn.setVisible(r is not None and r.edited)
        for c in (self.fill_check, self.largest_check):
            c.setEnabled(live)
        self.edit_box.setEnabled(r is not None)
        if r is None:
            self.count_label.setText("— press Segment first")
        elif r.edited:
            n = sum(len(np.unique(lyr.data[p] if p else lyr.data)) - 1 for p in r.segmented())
            self.count_label.setText(f"{n} cells (hand-edited; sliders locked)")
        name = self.image_combo.currentText()
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        is_stack = layer is not None and len(spatial_shape(layer)) > 2
        self.all_planes.setEnabled(is_stack)
        self.all_planes.setToolTip(ALL_PLANES_TIP if is_stack else
                                   "The chosen image is 2D (this applies to 3D/T stacks)")

    def _on_hand_edit(self, lyr, event=None):
        r = result_of(lyr)
        if r is not None:
            r.edited = True
            if same_layer(lyr, self._result_layer()):
                # napari emits paint before the stroke is in .data: update once it is
                QTimer.singleShot(0, self._update_tune_panel)  # lock sliders, Reset, count

    def reset_to_model(self):
        """Discard the hand edits (after asking: it cannot be undone) and redraw from the model."""
        lyr = self._result_layer()
        if lyr is None:
            return
        if not self._confirm(f"Discard every hand edit in {lyr.name!r} and redraw it from the "
                             "model output? This cannot be undone."):
            return
        r = result_of(lyr)
        r.edited, r.kept = False, {}
        self._update_tune_panel()
        self.redraw()
        self._info("Hand edits discarded; labels redrawn from the model output.")
