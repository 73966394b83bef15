"""The "Review" dock widget: score a prediction against ground truth, see where it is wrong, and
pick the two thresholds from measured mAP.

* mAP and TP/(TP+FP+FN) per IoU threshold come from ``metrics.evaluate_image`` (the numbers of
  ``cellseg evaluate``); an overlay Labels layer colours true positives, false positives and
  missed ground-truth cells at the chosen IoU. It updates (debounced) whenever the prediction or
  the ground truth layer is redrawn (Segment widget sliders) or edited by hand.
* Sweep: ``tuning.sweep`` scores a box_conf x mask_threshold grid from the Detections the Segment
  widget keeps (no new forward pass), shown as a heat map; "Use best" sets the Segment sliders.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QPushButton, QSpinBox, QVBoxLayout)

from napari_cellseg.gui.segment import edit as _edit
from napari_cellseg.gui import registry
from napari_cellseg.gui.reader import prefer_csv_reader
from napari_cellseg.gui.layers import InputError, draw_labels, image_plane, result_of
from napari_cellseg.gui.layout import ScrollDock
from napari_cellseg.gui.compat import same_layer, unwrap
from napari_cellseg.options import Thresholds
from napari_cellseg.gui.review.plots import draw_bars, draw_heat, figure
from napari_cellseg.gui.review.overlay import (COLORS, FN, FP, NAMES, OVERLAY_KEY, RESULT, TP, choose_pair, grid_values, layer_kind, overlay_labels)  # noqa: F401


class ReviewWidget(ScrollDock):
    """Dock widget: prediction vs ground truth, TP/FP/FN overlay, threshold sweep."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.score = None  # metrics.ImageScore of the last update
        self.sweep_result = None  # tuning.SweepResult of the last sweep
        self._sweep_pred = None  # the prediction layer the sweep was run for
        self._watched: list = []
        self._named: set[int] = set()  # layers whose name events are connected
        self._seen_results: set[str] = set()  # result layers the pickers have seen
        self._worker = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.update_review)
        self._build()
        self.compact()
        registry.register(self.viewer, "review", self)
        prefer_csv_reader()  # File > Open on our CSVs without napari's "which reader?" dialog
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._refresh_later)
        self.viewer.dims.events.current_step.connect(self.schedule)
        self._refresh_layers()

    # ------------------------------------------------------------ UI
    def _build(self):
        root = QVBoxLayout(self.content)
        root.addLayout(self._build_pair())
        self.summary = QLabel("choose a prediction and a ground-truth Labels layer")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        root.addWidget(self.summary)
        self.bar_fig, self.bar_canvas = figure(1.7)
        root.addWidget(self.bar_canvas)
        root.addWidget(self._build_sweep_box())
        root.addStretch(1)
        self._draw_bars()
        self._draw_heat()

    def _build_pair(self) -> QFormLayout:
        """The two layer pickers and the IoU of the overlay."""
        form = QFormLayout()
        self.pred_combo = QComboBox()
        self.pred_combo.setToolTip("Labels layer with the predicted cells (e.g. '<image> cells')")
        self.gt_combo = QComboBox()
        self.gt_combo.setToolTip("Labels layer with the true cells (e.g. opened from train.csv)")
        self.iou_spin = QDoubleSpinBox()
        self.iou_spin.setRange(0.5, 0.95)
        self.iou_spin.setSingleStep(0.05)
        self.iou_spin.setDecimals(2)
        self.iou_spin.setValue(0.5)
        self.iou_spin.setToolTip("A predicted cell is a true positive when its IoU with a true "
                                 "cell is above this")
        self.pred_combo.currentIndexChanged.connect(self._on_pred_picked)
        self.gt_combo.currentIndexChanged.connect(self._on_choice)
        self.iou_spin.valueChanged.connect(self.schedule)
        form.addRow("Prediction", self.pred_combo)
        form.addRow("Ground truth", self.gt_combo)
        form.addRow("Colour at IoU >", self.iou_spin)
        return form

    def _build_sweep_box(self) -> QGroupBox:
        """Grid size, scope, Sweep / Use best, the result line and the heat map."""
        box = QGroupBox("Threshold sweep (no re-run)")
        bl = QVBoxLayout(box)
        row = QHBoxLayout()
        self.grid_spin = QSpinBox()
        self.grid_spin.setRange(2, 20)
        self.grid_spin.setValue(10)
        self.grid_spin.setPrefix("N = ")
        self.grid_spin.setToolTip("grid of N × N threshold pairs")
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(["this image", "all segmented images with GT"])
        self.scope_combo.setToolTip("Other images are paired with a ground-truth layer whose "
                                    "image id (or name) equals their image id")
        self.sweep_btn = QPushButton("Sweep")
        self.sweep_btn.setToolTip("mAP for every box confidence × mask threshold pair, without "
                                  "re-running the network (needs a layer made by Segment cells)")
        self.sweep_btn.clicked.connect(self.run_sweep)
        row.addWidget(self.grid_spin)
        row.addWidget(self.scope_combo, 1)
        root_row = QHBoxLayout()
        root_row.addWidget(self.sweep_btn, 1)
        self.use_best_btn = QPushButton("Use best")
        self.use_best_btn.setEnabled(False)
        self.use_best_btn.setToolTip("Set the Segment cells sliders to the best pair")
        self.use_best_btn.clicked.connect(self.use_best)
        root_row.addWidget(self.use_best_btn, 1)
        bl.addLayout(row)
        bl.addLayout(root_row)
        self.sweep_label = QLabel("")
        self.sweep_label.setWordWrap(True)
        bl.addWidget(self.sweep_label)
        self.heat_fig, self.heat_canvas = figure(2.6)
        bl.addWidget(self.heat_canvas)
        return box

    # ------------------------------------------------------------ layers
    def _labels_layers(self):
        return [lyr for lyr in self.viewer.layers
                if isinstance(lyr, Labels) and not lyr.metadata.get(OVERLAY_KEY)]

    def _refresh_layers(self, *_, keep_gt=True):
        """Fill both pickers (see ``overlay.choose_pair``): a new Segment result becomes the
        prediction; ground truth stays ground truth; never one layer as both. Runs again once
        the event is over, so a layer whose metadata or name is set just after it was added
        (Segment's result, a renamed ground truth) is seen as what it is."""
        labels = self._labels_layers()
        for lyr in labels:  # a rename changes what the pickers hold
            if id(unwrap(lyr)) not in self._named:
                self._named.add(id(unwrap(lyr)))
                lyr.events.name.connect(self._refresh_later)
        layers = [(lyr.name, layer_kind(lyr.name, lyr.metadata, result_of(lyr) is not None),
                   result_of(lyr).image_id if result_of(lyr) is not None else lyr.metadata.get("image_id"))
                  for lyr in labels]
        results = {n for n, kind, _ in layers if kind == RESULT}
        new = [n for n, kind, _ in layers if kind == RESULT and n not in self._seen_results]
        self._seen_results = results
        preds, gts, pred, gt = choose_pair(layers, self.pred_combo.currentText() or None,
                                           (self.gt_combo.currentText() or None) if keep_gt else None,
                                           new)
        for combo, names, chosen in ((self.pred_combo, preds, pred), (self.gt_combo, gts, gt)):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            combo.setCurrentIndex(names.index(chosen) if chosen in names else -1)
            combo.blockSignals(False)
        self._on_choice()

    def _refresh_later(self, *_):
        self._refresh_layers()
        QTimer.singleShot(0, self._refresh_if_alive)

    def _refresh_if_alive(self):
        try:
            self._refresh_layers()
        except RuntimeError:  # the dock was closed meanwhile
            pass

    def _on_pred_picked(self, *_):
        """A new prediction choice: re-pair the ground truth (never the same layer)."""
        self._refresh_layers(keep_gt=False)

    def _layer(self, combo):
        name = combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_choice(self, *_):
        for lyr, cb in self._watched:
            for e in ("data", "paint", "labels_update", "set_data"):
                getattr(lyr.events, e).disconnect(cb)
        self._watched = []
        for lyr in {id(x): x for x in (self._layer(self.pred_combo), self._layer(self.gt_combo))
                    if x is not None}.values():
            for e in ("data", "paint", "labels_update", "set_data"):
                getattr(lyr.events, e).connect(self.schedule)
            self._watched.append((lyr, self.schedule))
        self.schedule()

    def schedule(self, *_):
        """Debounced update: many slider steps / paint strokes -> one evaluation."""
        self._timer.start()

    # ------------------------------------------------------------ evaluation
    def _planes(self):
        pred, gt = self._layer(self.pred_combo), self._layer(self.gt_combo)
        if pred is None or gt is None:
            raise InputError("choose a prediction and a ground-truth Labels layer")
        if same_layer(pred, gt):
            raise InputError("prediction and ground truth are the same layer: choose another")
        if pred.data.shape != gt.data.shape:
            raise InputError(f"{pred.name!r} is {'x'.join(map(str, pred.data.shape))} but "
                             f"{gt.name!r} is {'x'.join(map(str, gt.data.shape))}")
        step, nd = self.viewer.dims.current_step, self.viewer.dims.ndisplay
        p, plane = image_plane(pred, step, nd)
        g, _ = image_plane(gt, step, nd)
        return pred, gt, np.asarray(p), np.asarray(g), plane

    def update_review(self):
        """Score the chosen pair now and redraw the overlay, the text and the bar plot."""
        from napari_cellseg.inference.metrics import evaluate_image

        try:
            pred, gt, p, g, plane = self._planes()
            score = evaluate_image(g, p, iou=round(float(self.iou_spin.value()), 2))
        except (InputError, ValueError) as exc:
            self.score = None
            self._drop_overlays()  # no valid pair: no overlay either
            self.summary.setText(f"⚠ {exc}" if self.pred_combo.count() else
                                 "open or segment an image: needs two Labels layers")
            self._draw_bars()
            return None
        self.score = score
        self._drop_overlays(keep=f"{pred.name} review")
        self._set_overlay(pred, overlay_labels(g, p, score), plane)
        hexes = {k: "#%02x%02x%02x" % tuple(int(255 * c) for c in v[:3]) for k, v in COLORS.items()}
        self.summary.setText(
            f"<b>mAP {score.map:.3f}</b> &nbsp;({score.n_gt} true cells, {score.n_pred} predicted)<br>"
            f"at IoU &gt; {score.iou:.2f}: "
            f"<span style='color:{hexes[TP]}'>■ TP {score.tp}</span> &nbsp;"
            f"<span style='color:{hexes[FP]}'>■ FP {score.fp}</span> &nbsp;"
            f"<span style='color:{hexes[FN]}'>■ missed {score.fn}</span>")
        self._draw_bars()
        return score

    def _set_overlay(self, pred, classes, plane):
        from napari.utils.colormaps import DirectLabelColormap

        name = f"{pred.name} review"
        lyr = self.viewer.layers[name] if name in self.viewer.layers else None
        shape = pred.data.shape
        if not (isinstance(lyr, Labels) and lyr.metadata.get(OVERLAY_KEY) and lyr.data.shape == shape):
            if lyr is not None:
                self.viewer.layers.remove(lyr)
            active = self.viewer.layers.selection.active
            cmap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), **COLORS})
            lyr = self.viewer.add_labels(np.zeros(shape, np.uint8), name=name, opacity=0.55,
                                         colormap=cmap, scale=pred.scale, translate=pred.translate,
                                         metadata={OVERLAY_KEY: True}, blending="translucent")
            lyr.editable = False
            if active is not None:  # keep painting on the user's layer, not on the overlay
                self.viewer.layers.selection.active = active
        data = lyr.data
        if plane:
            data[...] = 0
        np.copyto(data[plane] if plane else data, classes)
        lyr.refresh(extent=False)

    def _drop_overlays(self, keep: str | None = None):
        """Remove the overlay layers this widget made, except ``keep``."""
        for lyr in [x for x in self.viewer.layers if x.metadata.get(OVERLAY_KEY) and x.name != keep]:
            self.viewer.layers.remove(lyr)

    def _draw_bars(self):
        draw_bars(self.bar_fig, self.score)
        self.bar_canvas.draw_idle()

    # ------------------------------------------------------------ sweep
    def _pairs(self):
        """(Detections, GT plane, result layer) for the chosen scope."""
        pred, gt = self._layer(self.pred_combo), self._layer(self.gt_combo)
        r = result_of(pred) if pred is not None else None
        if r is None or r.detections is None or gt is None:
            raise InputError("the sweep needs a prediction made by 'Segment cells' (it keeps the "
                             "network output) and a ground-truth layer")
        pairs = [(d, np.asarray(gt.data[p] if p else gt.data), pred) for p, d in r.segmented().items()]
        if self.scope_combo.currentIndex() == 1:
            gts = [g for g in self._labels_layers() if result_of(g) is None]
            for lyr in self._labels_layers():
                rr = result_of(lyr)
                if same_layer(lyr, pred) or rr is None or rr.detections is None:
                    continue
                match = [g for g in gts if rr.image_id in (g.metadata.get("image_id"), g.name)]
                if match:
                    g = match[0].data
                    pairs += [(d, np.asarray(g[p] if p else g), lyr) for p, d in rr.segmented().items()]
        return pairs

    def run_sweep(self):
        from napari.qt.threading import create_worker

        if self._worker is not None:
            return
        try:
            pairs = self._pairs()
        except InputError as exc:
            self.sweep_label.setText(f"⚠ {exc}")
            show_error(str(exc))
            return
        values = grid_values(self.grid_spin.value())
        # the layer's min_area and post-processing apply at every grid point (as in tune)
        base = result_of(pairs[0][2]).thresholds or Thresholds()
        self._sweep_pred = pairs[0][2]

        def job():
            from napari_cellseg.inference.tuning import sweep

            return sweep([(d, g) for d, g, _ in pairs], values, values, base=base)

        self._worker = create_worker(job, _ignore_errors=True)
        self._worker.returned.connect(self._on_sweep_done)
        self._worker.errored.connect(lambda exc: self.sweep_label.setText(f"⚠ sweep failed: {exc}"))
        self._worker.finished.connect(self._on_sweep_finished)
        self.sweep_btn.setEnabled(False)
        self.sweep_label.setText(f"sweeping {len(values)}×{len(values)} pairs over "
                                 f"{len(pairs)} image(s)…")
        self._worker.start()

    def _on_sweep_finished(self):
        self._worker = None
        self.sweep_btn.setEnabled(True)

    def _on_sweep_done(self, result):
        self.sweep_result = result
        b = result.best
        self.sweep_label.setText(f"best over {result.n_images} image(s): box confidence "
                                 f"{b['box_conf']:.2f}, mask threshold {b['mask_threshold']:.2f} "
                                 f"→ mAP {b['map']:.3f}")
        self.use_best_btn.setEnabled(True)
        self._draw_heat()

    def _draw_heat(self):
        draw_heat(self.heat_fig, self.sweep_result)
        self.heat_canvas.draw_idle()

    def _segment_widget(self):
        return registry.lookup(self.viewer, "segment")

    def use_best(self):
        """Set the Segment widget's sliders (which redraw the labels) to the best pair."""
        res, lyr = self.sweep_result, self._sweep_pred
        if res is None or lyr is None or not any(same_layer(x, lyr) for x in self.viewer.layers):
            return
        r = result_of(lyr)
        if r is None or r.edited:
            self.sweep_label.setText(f"⚠ {lyr.name!r} has hand edits: press 'Reset to model' in "
                                     "Segment cells first (the sliders are locked)")
            return
        b, m = res.best["box_conf"], res.best["mask_threshold"]
        seg = self._segment_widget()
        if seg is not None and seg.image_combo.findText(r.image_layer) >= 0:
            seg.image_combo.setCurrentText(r.image_layer)
            seg.box_slider.setValue(b)
            seg.mask_slider.setValue(m)  # each setValue redraws the labels
        else:  # no Segment widget docked: redraw the layer the same way it does
            t = replace(r.thresholds or Thresholds(), box_conf=b, mask_threshold=m)
            for p, d in r.segmented().items():
                labels = draw_labels(d, t)
                if p:
                    lyr.data[p] = labels
                else:
                    lyr.data = labels
            lyr.refresh()
            _edit.forget_last_stroke(lyr)
            r.thresholds = t
        self.schedule()
