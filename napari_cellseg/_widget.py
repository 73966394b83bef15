"""The "Segment cells" dock widget (thin: reads the form, calls the core, puts results in layers).

Prediction runs in a napari thread worker (``predict.Predictor.iter_predict``, imported lazily so
napari start-up never imports torch). The network output (Detections) is kept in the result
layer's metadata; the sliders only call ``Detections.to_labels``.
"""

from __future__ import annotations

import functools

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox,
                            QHBoxLayout, QLabel, QProgressBar, QPushButton, QSpinBox,
                            QVBoxLayout, QWidget)
from superqt import QLabeledDoubleSlider

from . import _edit
from ._layers import (InputError, Result, image_id_for_layer,
                      image_plane, result_layer_name, result_of, spatial_shape, stack_planes)
from ._panels import PanelActions, build_edit_box, build_export_box
from ._settings import DIAMETER_TIP, save_settings, segment_job, size_note

ALL_PLANES_TIP = ("Segment all planes of a 3D/T stack in one run (progress per plane; Cancel keeps "
                  "nothing). Unticked: only the plane shown in the viewer")


class SegmentWidget(PanelActions, QWidget):
    """Dock widget: pick image + model, Segment, tune thresholds live, edit, export CSV."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._predictors: dict = {}
        self._worker = None
        self._bound: set[int] = set()
        self._build()
        self._refresh_images()
        self._refresh_models()
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._refresh_images)
        self._update_tune_panel()

    # ------------------------------------------------------------ UI
    def _build(self):
        root = QVBoxLayout(self)
        hint = QLabel("① pick image and model → ② Segment → ③ tune sliders, fix cells by hand "
                      "→ ④ Export CSV")
        hint.setWordWrap(True)
        root.addWidget(hint)

        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("2D grey or RGB image layer. For a stack, the plane shown in the "
                                    "viewer is segmented (or every plane: see Planes).")
        self.image_combo.currentIndexChanged.connect(self._update_tune_panel)
        form.addRow("Image", self.image_combo)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Checkpoint (.bin/.pth) written by cellseg-train, or the bundled "
                                    "demo model")
        self.browse_btn = QPushButton("Browse…")
        self.browse_btn.setToolTip("Choose a checkpoint file")
        self.browse_btn.clicked.connect(self._on_browse)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.browse_btn)
        form.addRow("Model", row)
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
        form.addRow("Cell diameter", self.diameter_spin)
        self.all_planes = QCheckBox("every plane of the stack")
        self.all_planes.setToolTip(ALL_PLANES_TIP)
        form.addRow("Planes", self.all_planes)
        root.addLayout(form)

        run_row = QHBoxLayout()
        self.segment_btn = QPushButton("Segment")
        self.segment_btn.setToolTip("Run the network once on the image (the sliders below then work "
                                    "without re-running it)")
        self.segment_btn.clicked.connect(self.segment)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        run_row.addWidget(self.segment_btn, 2)
        run_row.addWidget(self.cancel_btn, 1)
        root.addLayout(run_row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setVisible(False)  # shown while a job runs
        root.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        root.addWidget(self.status)

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
        self.count_label = QLabel("")
        tform.addRow("Cells", self.count_label)
        self.reset_btn = QPushButton("Edited by hand — Reset to model")
        self.reset_btn.setToolTip("The sliders are locked so hand edits are not lost. This discards "
                                  "the edits and redraws from the model output.")
        self.reset_btn.setStyleSheet("QPushButton { color: #ffb000; font-weight: bold; }")
        self.reset_btn.clicked.connect(self.reset_to_model)
        tform.addRow(self.reset_btn)
        root.addWidget(tune)
        self.tune_box = tune

        self.edit_box = build_edit_box(self)
        root.addWidget(self.edit_box)
        root.addWidget(build_export_box(self))
        root.addStretch(1)

    def _slider(self, tip):
        s = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        s.setRange(0.0, 1.0)
        s.setSingleStep(0.01)
        s.setDecimals(2)
        s.setValue(0.5)
        s.setToolTip(tip)
        s.valueChanged.connect(self.redraw)
        return s

    def sizeHint(self):  # keep the dock narrow; labels wrap
        from qtpy.QtCore import QSize

        return QSize(340, super().sizeHint().height())

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

    def _image_layer(self) -> Image:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no image layer: open an image (File > Open) and choose it under Image")
        return self.viewer.layers[name]

    def _result_layer(self) -> Labels | None:
        name = self.image_combo.currentText()
        target = result_layer_name(name) if name else None
        if target and target in self.viewer.layers:
            lyr = self.viewer.layers[target]
            if isinstance(lyr, Labels) and result_of(lyr) is not None:
                return lyr
        return None

    # ------------------------------------------------------------ segment / cancel
    def segment(self):
        from napari.qt.threading import create_worker

        if self._worker is not None:
            return
        try:
            layer = self._image_layer()
            if self.all_planes.isChecked() and len(spatial_shape(layer)) > 2:
                planes = stack_planes(layer)
                what = f" ({len(planes)} planes)"
            else:
                image, plane = image_plane(layer, self.viewer.dims.current_step, self.viewer.dims.ndisplay)
                planes = {plane: image}
                what = f" plane {plane}" if plane else ""
            checkpoint = self._checkpoint()
            existing = self._result_layer()
            if existing is not None and result_of(existing).edited:
                raise InputError(f"{existing.name!r} has hand edits: press 'Reset to model' to discard "
                                 "them (or rename that layer to keep them), then Segment again")
        except InputError as exc:
            self._error(str(exc))
            return
        save_settings({"last_checkpoint": checkpoint})
        self._preload_torch()
        diameter = float(self.diameter_spin.value()) or None  # 0 = "auto"
        worker = create_worker(segment_job, checkpoint, self.device_combo.currentText(), planes,
                               diameter, self._predictors,
                               _ignore_errors=True)  # errors are shown by _on_failed
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(functools.partial(self._on_done, layer, checkpoint))
        worker.errored.connect(self._on_failed)
        worker.aborted.connect(lambda: self._info("Cancelled: nothing changed.", notify=True))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.segment_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self._info(f"Segmenting {layer.name}{what}…")
        worker.start()

    def _preload_torch(self):
        """Import torch in the GUI thread, safely next to OpenGL (see _torch_guard). Once."""
        import sys

        if "napari_cellseg.predict" in sys.modules:
            return
        from qtpy.QtWidgets import QApplication

        from ._torch_guard import import_torch

        self._info("Loading PyTorch (first Segment only, a few seconds)…")
        QApplication.processEvents()
        import_torch()
        from . import predict  # noqa: F401

    def cancel(self):
        if self._worker is not None:
            self._info("Cancelling…")
            self._worker.quit()

    def _on_progress(self, event):
        self.progress.setValue(int(100 * float(event.get("fraction", 0.0))))
        self.status.setText(f"Segmenting: {event.get('stage', '')}…")

    def _on_failed(self, exc):
        self._error(f"Segmentation failed: {exc}")

    def _on_finished(self):
        self._worker = None
        self.progress.setVisible(False)
        self.segment_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def _on_done(self, image_layer, checkpoint, value):
        new, thresholds = value
        self.progress.setValue(100)
        name = result_layer_name(image_layer.name)
        shape = spatial_shape(image_layer)
        lyr = self.viewer.layers[name] if name in self.viewer.layers else None
        note = ""
        if lyr is not None and result_of(lyr) is None:
            # not ours (e.g. ground truth opened from a CSV, or painted by hand): never overwrite
            # it; give it another name so the result layer can take this one
            lyr.name = kept = self._free_name(f"{name} (kept)")
            note = f" The layer that was named {name!r} is kept as {kept!r}."
            lyr = None
        if lyr is None or tuple(lyr.data.shape) != shape:
            if lyr is not None:  # our own earlier result for an image of another shape
                self.viewer.layers.remove(lyr)
            lyr = self.viewer.add_labels(np.zeros(shape, np.int32), name=name, scale=image_layer.scale,
                                         translate=image_layer.translate)
        old = result_of(lyr)
        if old is not None and old.checkpoint == str(checkpoint):
            planes = {**old.segmented(), **new}  # other planes of the stack keep their output
        else:  # first run, or another model: start clean
            planes = dict(new)
            lyr.data[...] = 0
        try:
            current = image_plane(image_layer, self.viewer.dims.current_step, 2)[1]
        except InputError:
            current = None
        plane = current if current in planes else list(new)[-1]
        lyr.metadata["napari_cellseg"] = Result(
            image_id=image_id_for_layer(image_layer), image_layer=image_layer.name, plane=plane,
            detections=planes[plane], thresholds=dict(thresholds), checkpoint=str(checkpoint),
            planes=planes)
        if id(lyr) not in self._bound:
            self._bound.add(id(lyr))
            lyr.events.paint.connect(functools.partial(self._on_hand_edit, lyr))
            _edit.bind_edit_keys(lyr, self.viewer, self._edit_report)
        self.image_combo.setCurrentText(image_layer.name)
        for w, key in ((self.box_slider, "box_conf"), (self.mask_slider, "mask_threshold"),
                       (self.area_spin, "min_area")):
            w.blockSignals(True)
            w.setValue(type(w.value())(thresholds.get(key, w.value())))
            w.blockSignals(False)
        self._update_tune_panel()
        n = self.redraw()
        self.viewer.layers.selection.active = lyr
        kept = sum(len(d) for d in new.values())
        tip = " — lower Box confidence to see more" if n == 0 and kept else ""
        where = f" ({len(new)} planes)" if len(new) > 1 else ""
        size = size_note(new.values())
        self._info(f"{n} cells in {image_layer.name}{where} ({kept} candidates kept for the "
                   f"sliders){tip}.{' ' + size if size else ''}{note}", notify=True)

    def _free_name(self, base: str) -> str:
        names = {x.name for x in self.viewer.layers}
        return next(c for c in (base if i == 0 else f"{base} {i + 1}" for i in range(len(names) + 1))
                    if c not in names)

    # ------------------------------------------------------------ sliders
    def thresholds(self) -> dict:
        return {"box_conf": float(self.box_slider.value()),
                "mask_threshold": float(self.mask_slider.value()),
                "min_area": int(self.area_spin.value())}

    def redraw(self, *_):
        """Re-derive the labels from the kept Detections (never runs the network)."""
        lyr = self._result_layer()
        r = result_of(lyr) if lyr is not None else None
        if r is None or r.edited:
            return None
        t = self.thresholds()
        counts = {}
        for plane, dets in r.segmented().items():
            labels = dets.to_labels(t["box_conf"], t["mask_threshold"], t["min_area"])
            target = lyr.data[plane] if plane else lyr.data
            if isinstance(lyr.data, np.ndarray) and target.shape == labels.shape:
                np.copyto(target, labels, casting="unsafe")  # in place: 2-3x cheaper than .data = ...
            elif plane:
                lyr.data[plane] = labels
            else:
                lyr.data = labels
            counts[plane] = int(labels.max()) if labels.size else 0
        lyr.refresh(extent=False)
        if hasattr(lyr, "_reset_history"):
            lyr._reset_history()  # old strokes must not replay onto a different drawing
        r.thresholds = t
        self.status.setText("")
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
            if lyr is self._result_layer():
                # napari emits paint before the stroke is in .data: update once it is
                QTimer.singleShot(0, self._update_tune_panel)  # lock sliders, Reset, count

    def reset_to_model(self):
        lyr = self._result_layer()
        if lyr is None:
            return
        result_of(lyr).edited = False
        self._update_tune_panel()
        self.redraw()
        self._info("Hand edits discarded; labels redrawn from the model output.")
