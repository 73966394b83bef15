"""The "Review dataset" dock: a folder of images as a queue, one image at a time in the viewer.

Thin: the queue (order, statuses, the output CSV, drafts) is ``io.dataset.DatasetQueue``; the
network, uncertainty, box/click tools and fine-tuning run in napari thread workers
(``gui.dataset.jobs``). The shown image is an Image layer + a result Labels layer
(``gui.layers.Result``), so the Segment cells dock's sliders, post-processing, edit lock and edit
keys work on it (``SegmentWidget.follow``). Edits are saved as a draft on every paint event
(debounced), the next image is predicted in the background.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QVBoxLayout

from napari_cellseg.gui import registry
from napari_cellseg.gui.compat import reset_undo_history, unwrap
from napari_cellseg.gui.dataset import panels
from napari_cellseg.gui.dataset.jobs import Prediction, image_shape, predict_job, read_image
from napari_cellseg.gui.dataset.tools import ToolActions
from napari_cellseg.gui.dataset.loop import LoopActions
from napari_cellseg.gui.layers import META_KEY, Result, draw_labels, result_layer_name, result_of
from napari_cellseg.gui.layout import ScrollDock
from napari_cellseg.gui.segment import edit as _edit
from napari_cellseg.gui.settings import load_settings, save_settings
from napari_cellseg.io.dataset import DatasetError, DatasetQueue

DRAFT_DELAY_MS = 250  # a draft is written this long after the last paint event
MAX_RECENT = 8


class DatasetWidget(ToolActions, LoopActions, ScrollDock):
    """Dock widget: open a folder + output CSV, review the images worst first, accept, retrain."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.queue: DatasetQueue | None = None
        self.current: str | None = None
        self._preds: dict[str, Prediction] = {}  # the shown image and the next one only
        self._cache: dict = {}  # the model (segment.jobs cache: one model in memory)
        self._wanted: list[str] = []  # ids to predict, most urgent first
        self._rerank: list[str] = []  # to-do ids to re-predict for the ranking
        self._worker = None  # the one prediction worker
        self._predicting: str | None = None
        self._layer_names: tuple[str, str] | None = None  # (image, cells) of the shown image
        self._watched: set[int] = set()
        self._loading = False
        self._from_top = False  # set by a re-ranking: Accept/Skip go to the most doubtful image
        self._waiting = False  # the shown image waits for the model's masks
        self._draft_pending = False
        self._draft_timer = QTimer(self)
        self._draft_timer.setSingleShot(True)
        self._draft_timer.setInterval(DRAFT_DELAY_MS)
        self._draft_timer.timeout.connect(self.save_draft)
        self._init_tools()
        self._init_loop()
        root = QVBoxLayout(self.content)
        for build in (panels.build_folder_box, panels.build_queue_box, panels.build_image_box,
                      panels.build_model_box):
            root.addWidget(build(self))
        root.addStretch(1)
        self.compact()
        self._refresh_recent()
        self._refresh_models()
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self._bind_keys()
        registry.register(self.viewer, "dataset", self)

    # ------------------------------------------------------------ messages
    def _error(self, msg):
        self.status.setText(f"⚠ {msg}")
        show_error(msg)

    def _info(self, msg, notify=False):
        self.status.setText(msg)
        if notify:
            show_info(msg)

    def _bind_keys(self):
        actions = {"accept": self.accept, "skip": self.skip, "previous": self.previous_image,
                   "next": self.next_image, "doubtful": self.next_doubtful,
                   "box": self.toggle_box_tool, "click": self.toggle_click_tool}
        for name, (key, _) in panels.KEYS.items():
            def handler(_viewer, fn=actions[name]):
                if self.docked():
                    fn()
            handler.__name__ = f"cellseg_dataset_{name}"
            self.viewer.bind_key(key, handler, overwrite=True)

    def docked(self) -> bool:
        """False once the dock was closed (napari un-parents the widget, or Qt deleted it): the
        viewer keys bound here then do nothing."""
        try:
            return self.parent() is not None
        except RuntimeError:
            return False

    # ------------------------------------------------------------ opening
    def _refresh_recent(self):
        self.folder_combo.clear()
        recent = load_settings().get("recent_dataset_folders", [])
        self.folder_combo.addItems([r["images"] for r in recent])
        if recent:
            self._fill_from_recent(0)
        self.folder_combo.activated.connect(self._fill_from_recent)

    def _fill_from_recent(self, index):
        recent = load_settings().get("recent_dataset_folders", [])
        if 0 <= index < len(recent):
            entry = recent[index]
            self.folder_combo.setCurrentText(entry["images"])
            self.out_edit.setText(entry.get("output_csv", ""))
            self.start_edit.setText(entry.get("start_csv", ""))
            self.rank_edit.setText(entry.get("ranking_csv", ""))

    def _remember(self, entry: dict):
        recent = [entry] + [r for r in load_settings().get("recent_dataset_folders", [])
                            if r.get("images") != entry["images"]]
        save_settings({"recent_dataset_folders": recent[:MAX_RECENT]})

    def _ask(self, kind, title, filt=""):  # tests replace this
        if kind == "folder":
            return QFileDialog.getExistingDirectory(self, title)
        if kind == "save":
            return QFileDialog.getSaveFileName(self, title, "", filt)[0]
        return QFileDialog.getOpenFileName(self, title, "", filt)[0]

    def _on_browse_folder(self):
        path = self._ask("folder", "Folder of images to review")
        if path:
            self.folder_combo.setCurrentText(path)
            if not self.out_edit.text():
                self.out_edit.setText(str(Path(path).parent / f"{Path(path).name}_reviewed.csv"))

    def _on_browse_out(self):
        path = self._ask("save", "Output CSV (accepted masks, train format)", "CSV (*.csv)")
        if path:
            self.out_edit.setText(path if path.lower().endswith(".csv") else path + ".csv")

    def _on_browse_start(self):
        path = self._ask("open", "Start CSV (masks shown instead of the model's)", "CSV (*.csv)")
        if path:
            self.start_edit.setText(path)

    def _on_browse_rank(self):
        path = self._ask("open", "Ranking from cellseg rank", "CSV (*.csv)")
        if path:
            self.rank_edit.setText(path)

    def _on_open_clicked(self):
        images, out = self.folder_combo.currentText().strip(), self.out_edit.text().strip()
        if not images or not out:
            self._error("choose a folder of images and an output CSV first")
            return
        self.open_folder(images, out, self.start_edit.text().strip() or None,
                         self.rank_edit.text().strip() or None)

    def open_folder(self, images, output_csv, start_csv=None, ranking_csv=None) -> bool:
        """Open ``images`` (a folder, or a list of files) with ``output_csv``: resume where it
        was left (accepted = the CSV's ids, drafts beside it) and show the first image to do."""
        self.save_draft()
        warnings: list[str] = []
        try:
            queue = DatasetQueue.open(images, output_csv, start_csv, ranking_csv, warn=warnings.append)
        except DatasetError as exc:
            self._error(str(exc))
            return False
        for w in warnings:
            show_info(w)
        self.queue, self.current = queue, None
        self._preds.clear()
        self._wanted, self._rerank = [], []
        self.table_model.reset(queue)
        if isinstance(images, (str, Path)):
            self._remember({"images": str(images), "output_csv": str(output_csv),
                            "start_csv": str(start_csv or ""), "ranking_csv": str(ranking_csv or "")})
            self.folder_combo.setCurrentText(str(images))
        self.out_edit.setText(str(output_csv))
        name = Path(images).name if isinstance(images, (str, Path)) else f"{len(queue)} images"
        self.folder_section.setText(f"Dataset: {name} → {Path(output_csv).name}")
        self.folder_section.collapse(animate=False)
        for b in (self.prev_btn, self.skip_btn, self.next_btn, self.accept_btn, self.doubt_btn,
                  self.box_btn, self.click_btn, self.rank_btn):
            b.setEnabled(True)
        self._update_counts()
        first = queue.next_todo() or (queue.order()[0] if len(queue) else None)
        self._info(f"Opened {len(queue)} images; {queue.summary()}.")
        if first is not None:
            self.show(first)
        return True

    def _update_counts(self):
        self.counts_label.setText(self.queue.summary() if self.queue else "open a folder of images")
        self.train_btn.setEnabled(self.queue is not None and self._train_worker is None
                                  and self.queue.counts()["accepted"] > 0)

    # ------------------------------------------------------------ the shown image
    def _layers(self):
        """(image layer, cells layer) of the shown image, or (None, None) if the user removed them."""
        if self._layer_names is None:
            return None, None
        img_name, cells_name = self._layer_names
        layers = self.viewer.layers
        img = layers[img_name] if img_name in layers else None
        cells = layers[cells_name] if cells_name in layers else None
        return img, cells

    def cells_layer(self):
        return self._layers()[1]

    def show(self, image_id: str) -> bool:
        """Show one image of the queue (its draft, accepted masks, start CSV masks, or the
        model's prediction) and predict the next image to do in the background."""
        if self.queue is None or image_id not in self.queue:
            return False
        self.save_draft()
        item = self.queue[image_id]
        pred = self._preds.get(image_id)
        try:
            raw = pred.raw if pred is not None else read_image(item.path)
            labels, source = self.queue.saved_labels(image_id, image_shape(raw))
        except ValueError as exc:  # ImageError, DatasetError: one line naming the file
            self._error(str(exc))
            return False
        from_csv = source == "start CSV"
        dets = pred.detections if pred is not None and not from_csv else None
        thresholds = pred.thresholds if pred is not None else None
        if labels is None and pred is not None:
            labels, source = draw_labels(pred.detections, pred.thresholds), "model"
        waiting = labels is None
        if waiting:
            labels = np.zeros(image_shape(raw), np.int32)
        result = Result(image_id=image_id, image_layer=image_id, detections=dets,
                        thresholds=thresholds, checkpoint=pred.checkpoint if pred else "",
                        edited=source in ("draft", "accepted"))
        self.current, self._from_top, self._waiting = image_id, False, waiting
        self._put_layers(image_id, raw, labels, result)
        self.table_model.set_current(image_id)
        self._select_row(image_id)
        self._clear_doubtful()
        self._describe(source, waiting)
        self._plan_predictions()
        self._follow_segment()
        return True

    def _describe(self, source, waiting):
        item = self.queue[self.current]
        pos = (self.table_model.row_of(self.current) or 0) + 1
        what = {"draft": "your draft", "accepted": "the accepted masks", "start CSV": "the start CSV's masks",
                "model": "the model's masks"}.get(source, "predicting…" if waiting else "")
        unc = f", uncertainty {item.uncertainty:.2f}" if item.uncertainty is not None else ""
        self.image_label.setText(f"<b>{self.current}</b> ({pos} of {len(self.queue)}): {item.status}"
                                 f"{unc} — {what}")

    def _select_row(self, image_id):
        row = self.table_model.row_of(image_id)
        if row is not None:
            index = self.table_proxy.mapFromSource(self.table_model.index(row, 0))
            self.table.selectRow(index.row())
            self.table.scrollTo(index)

    def _put_layers(self, image_id, raw, labels, result):
        """Replace the shown image and cells layer data (the layers are kept, so the user's
        tool and mode stay; a grey/RGB change recreates the image layer)."""
        self._loading = True
        try:
            img, cells = self._layers()
            rgb = raw.ndim == 3 and raw.shape[-1] in (3, 4)
            if img is not None and bool(img.rgb) != rgb:
                self.viewer.layers.remove(img)
                img = None
            reset = img is None or tuple(img.data.shape[:2]) != tuple(raw.shape[:2])
            if img is None:
                img = self.viewer.add_image(raw, name=image_id, rgb=rgb)
            else:
                img.data = raw
                img.name = image_id
                img.reset_contrast_limits()
            if cells is None:
                cells = self.viewer.add_labels(labels.astype(np.int32), name=result_layer_name(img.name))
            else:
                cells.data = labels.astype(np.int32)
                cells.name = result_layer_name(img.name)
            result.image_layer = img.name
            cells.metadata[META_KEY] = result
            reset_undo_history(cells)
            _edit.forget_last_stroke(cells)
            self._layer_names = (img.name, cells.name)
            self._watch(cells)
            self.viewer.layers.selection.active = cells
            if reset:
                self.viewer.reset_view()
        finally:
            self._loading = False

    def _watch(self, cells):
        key = id(unwrap(cells))
        if key in self._watched:
            return
        self._watched.add(key)
        cells.events.paint.connect(self._on_paint)
        cells.events.set_data.connect(self._on_set_data)
        _edit.bind_edit_keys(cells, self.viewer, lambda msg, error: (self._error if error else self._info)(msg))

    def _follow_segment(self):
        seg = registry.lookup(self.viewer, "segment")
        if seg is not None and self._layer_names is not None:
            seg.follow(self._layer_names[0])

    def open_segment_dock(self):
        """Dock Segment cells (its sliders and edit lock then follow the shown image)."""
        if registry.lookup(self.viewer, "segment") is None:
            self.viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
        self._follow_segment()

    # ------------------------------------------------------------ drafts
    def _on_paint(self, event=None):
        if self._loading or self.current is None:
            return
        cells = self.cells_layer()
        r = result_of(cells) if cells is not None else None
        if r is not None:
            r.edited = True
        self._draft_pending = True
        self._draft_timer.start()  # napari emits paint before the stroke is in .data

    def _on_set_data(self, event=None):
        cells = self.cells_layer()
        r = result_of(cells) if cells is not None else None
        if not self._loading and r is not None and r.edited:
            self._draft_pending = True  # undo / redo: they emit set_data, no paint event
            self._draft_timer.start()

    def save_draft(self) -> bool:
        """Write the shown image's edits as a draft now (called by the paint timer and on moving)."""
        self._draft_timer.stop()
        if not self._draft_pending or self.current is None or self.queue is None:
            return False
        self._draft_pending = False
        cells = self.cells_layer()
        if cells is None:
            return False
        try:
            self.queue.save_draft(self.current, np.array(cells.data, copy=True))
        except (DatasetError, OSError) as exc:
            self._error(f"draft of {self.current} not saved: {exc}")
            return False
        self.table_model.changed(self.current)
        self._update_counts()
        return True

    # ------------------------------------------------------------ moving
    def accept(self):
        """Write the shown masks into the output CSV and open the next image to do."""
        if self.queue is None or self.current is None:
            return
        cells = self.cells_layer()
        if cells is None:
            self._error("the cells layer was removed: open the image again (double-click it)")
            return
        r = result_of(cells)
        if self._waiting and (r is None or not r.edited):
            self._info(f"{self.current}: the model is still predicting it; Accept once its masks "
                       "are shown (or paint the cells yourself)")
            return
        self._draft_timer.stop()
        self._draft_pending = False
        image_id = self.current
        try:
            n = self.queue.accept(image_id, np.asarray(cells.data))
        except DatasetError as exc:
            self._draft_pending = True
            self.save_draft()  # nothing is lost: the edits stay as a draft
            self._error(str(exc))
            return
        if r is not None:
            r.edited = True  # reviewed masks: the sliders never redraw them
        self.table_model.changed(image_id)
        self._update_counts()
        self._info(f"Accepted {image_id}: {n} cells written to {self.queue.output_csv.name} "
                   f"({self.queue.summary()}).")
        nxt = self._next_todo()
        if nxt is None:
            self._info(f"Every image is accepted ({self.queue.summary()}).", notify=True)
            return
        self.show(nxt)

    def skip(self):
        if self.queue is not None:
            nxt = self._next_todo()
            if nxt is not None:
                self.show(nxt)

    def _next_todo(self):
        """The image to do after the shown one in the queue's order; after a re-ranking, the
        most doubtful one (the order changed under the shown image)."""
        if self._from_top:
            first = self.queue.next_todo()
            if first is not None and first != self.current:
                return first
        return self.queue.next_todo(self.current)

    def previous_image(self):
        self._step(-1)

    def next_image(self):
        self._step(1)

    def _step(self, step):
        if self.queue is not None:
            target = self.queue.neighbour(self.current, step)
            if target is not None:
                self.show(target)

    # ------------------------------------------------------------ background prediction
    def _plan_predictions(self):
        """Predict the shown image if it has no masks yet, then the next one to do; keep only
        those two in memory."""
        wanted = []
        if self.current is not None and self.queue.needs_model(self.current) and self.current not in self._preds:
            wanted.append(self.current)
        nxt = self._next_todo()
        if nxt is not None and self.queue.needs_model(nxt) and nxt not in self._preds:
            wanted.append(nxt)
        self._wanted = wanted
        keep = {self.current, nxt}
        self._preds = {k: v for k, v in self._preds.items() if k in keep}
        self._kick()

    def _next_wanted(self):
        while self._wanted:
            image_id = self._wanted[0]
            if image_id in self._preds or image_id == self._predicting:
                self._wanted.pop(0)
                continue
            return image_id
        while self._rerank:
            image_id = self._rerank[0]
            if image_id == self._predicting or not self.queue.needs_model(image_id):
                self._rerank.pop(0)
                continue
            return image_id
        return None

    def _kick(self):
        from napari.qt.threading import create_worker

        if self._worker is not None or self.queue is None:
            return
        image_id = self._next_wanted()
        if image_id is None:
            if self._reranking:
                self._finish_rerank()
            return
        try:
            checkpoint = self.checkpoint()
        except ValueError as exc:
            self._wanted, self._rerank = [], []
            self._error(str(exc))
            return
        worker = create_worker(predict_job, image_id, self.queue[image_id].path, checkpoint, "auto",
                               self._cache, _ignore_errors=True)
        worker.returned.connect(self._on_predicted)
        worker.errored.connect(functools.partial(self._on_predict_failed, image_id))
        worker.finished.connect(self._on_predict_finished)
        self._worker, self._predicting = worker, image_id
        worker.start()

    def _on_predict_failed(self, image_id, exc):
        for lst in (self._wanted, self._rerank):
            if image_id in lst:
                lst.remove(image_id)
        self._error(f"{image_id}: prediction failed: {exc}")

    def _on_predict_finished(self):
        self._worker, self._predicting = None, None
        self._kick()

    def _on_predicted(self, pred: Prediction):
        if self.queue is None or pred.image_id not in self.queue:
            return
        try:
            stale = pred.checkpoint != self.checkpoint()
        except ValueError:
            stale = True
        if stale:  # the model changed while it ran: left in the lists, predicted again
            return
        for lst in (self._wanted, self._rerank):
            if pred.image_id in lst:
                lst.remove(pred.image_id)
        self.queue.set_prediction(pred.image_id, pred.cells, pred.uncertainty)
        self.table_model.changed(pred.image_id)
        nxt = self._next_todo() if self.current else None
        if pred.image_id in (self.current, nxt):
            self._preds[pred.image_id] = pred
        if pred.image_id == self.current:
            self._fill_current(pred)

    def _fill_current(self, pred: Prediction):
        """The shown image's prediction arrived: draw it, unless the user edited meanwhile."""
        cells = self.cells_layer()
        r = result_of(cells) if cells is not None else None
        if r is None or r.image_id != pred.image_id or not self.queue.needs_model(pred.image_id):
            return
        r.detections, r.thresholds, r.checkpoint = pred.detections, pred.thresholds, pred.checkpoint
        self._waiting = False
        if r.edited:
            self._info(f"{pred.image_id}: predicted; your edits are kept (nothing redrawn).")
            return
        self._loading = True
        try:
            cells.data = draw_labels(pred.detections, pred.thresholds).astype(np.int32)
            reset_undo_history(cells)
            _edit.forget_last_stroke(cells)
        finally:
            self._loading = False
        self._describe("model", False)
        self._follow_segment()
        self._info(f"{pred.image_id}: {pred.cells} cells, uncertainty {pred.uncertainty:.2f}.")
