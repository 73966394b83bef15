"""The dock's model and its loop (a mixin of DatasetWidget): the model picker, "Train on
accepted" (``training.finetune`` in a thread worker, progress + cancel), then the new model
becomes current and the images to do are re-predicted and re-ranked in the background."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt

from napari_cellseg.gui.dataset.jobs import finetune_job, read_image
from napari_cellseg.gui.settings import load_settings, remember_checkpoint


class LoopActions:
    """Model picker, training and re-ranking of the Review dataset dock."""

    def _init_loop(self):
        self._train_worker = None
        self._reranking = False
        self._train_t0 = 0.0

    # ------------------------------------------------------------ the model
    def _refresh_models(self, select: str | None = None):
        from napari_cellseg.model.checkpoint import bundled_model_path

        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        bundled = bundled_model_path()
        if bundled.is_file():
            self.model_combo.addItem("Demo model (bundled)", str(bundled))
        for p in load_settings().get("recent_checkpoints", []):
            if Path(p).is_file() and Path(p) != bundled:
                self.model_combo.addItem(Path(p).name, p)
                self.model_combo.setItemData(self.model_combo.count() - 1, p, Qt.ItemDataRole.ToolTipRole)
        last = select or load_settings().get("last_checkpoint")
        for i in range(self.model_combo.count()):
            if self.model_combo.itemData(i) == last:
                self.model_combo.setCurrentIndex(i)
        self.model_combo.blockSignals(False)

    def checkpoint(self) -> str:
        path = self.model_combo.currentData()
        if not path:
            raise ValueError("no model chosen: pick a checkpoint with the … button next to Model")
        return str(path)

    def set_checkpoint(self, path) -> None:
        """Make ``path`` the dock's model (remembered with the recent checkpoints)."""
        self._refresh_models(select=remember_checkpoint(path))
        self._on_model_changed()

    def _on_browse_model(self):
        path = self._ask("open", "Choose a checkpoint", "Checkpoints (*.bin *.pth *.pt *.ckpt);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def _on_model_changed(self, *_):
        """Another model: forget the old predictions (accepted masks and drafts stay)."""
        self._preds.clear()
        if self.queue is not None and self.current is not None:
            self._plan_predictions()

    # ------------------------------------------------------------ train on accepted
    def train_on_accepted(self):
        from napari.qt.threading import create_worker

        if self.queue is None or self._train_worker is not None:
            return
        self.save_draft()
        ids = self.queue.accepted_ids()
        if not ids:
            self._error("accept some images first: training uses the accepted masks")
            return
        try:
            checkpoint = self.checkpoint()
            images = [read_image(self.queue[i].path) for i in ids]
            labels = [self.queue.accepted_labels(i, np.shape(im)[:2]) for i, im in zip(ids, images)]
        except ValueError as exc:
            self._error(str(exc))
            return
        out_root = self.queue.output_csv.parent / f"{self.queue.output_csv.stem}.models"
        worker = create_worker(finetune_job, images, labels, ids, checkpoint, out_root,
                               float(self.minutes_spin.value()), "auto", _ignore_errors=True)
        worker.yielded.connect(self._on_train_event)
        worker.returned.connect(self._on_trained)
        worker.errored.connect(lambda exc: self._error(f"Training failed (the model is unchanged): {exc}"))
        worker.aborted.connect(lambda: self._info("Training cancelled: the model is unchanged.", notify=True))
        worker.finished.connect(self._on_train_finished)
        self._train_worker = worker
        self._train_t0 = time.perf_counter()
        self.train_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.map_label.setText(f"fine-tuning on {len(ids)} accepted image(s)…")
        worker.start()

    def cancel_training(self):
        if self._train_worker is not None:
            self.map_label.setText("cancelling…")
            self._train_worker.quit()

    def _on_train_event(self, event):
        budget = 60.0 * float(self.minutes_spin.value())
        elapsed = time.perf_counter() - self._train_t0
        self.progress.setValue(min(99, int(100 * elapsed / budget)))
        stage = event.get("stage")
        if stage == "epoch":
            row = event.get("row") or {}
            val = row.get("val_map")
            self.map_label.setText(f"epoch {event.get('epoch')}: val mAP "
                                   f"{float(val):.3f}" if val is not None else f"epoch {event.get('epoch')}")
        elif stage in ("setup", "warning") and event.get("message"):
            self.map_label.setText(str(event["message"]))
        elif stage == "train":
            self.map_label.setText(f"training: epoch {event.get('epoch')}, step {event.get('step')}/"
                                   f"{event.get('total')}")

    def _on_train_finished(self):
        self._train_worker = None
        self.cancel_btn.setEnabled(False)
        self.progress.setVisible(False)
        self._update_counts()

    def _on_trained(self, result):
        minutes = float(result.seconds) / 60.0
        self.last_training = result
        self.map_label.setText(f"val mAP {result.val_map_before:.3f} → {result.val_map_after:.3f} "
                               f"({result.epochs} epochs, {minutes:.1f} min); now the current model: "
                               f"{result.checkpoint}")
        self.set_checkpoint(result.checkpoint)
        self.rerank()
        self._info(f"New model {Path(result.checkpoint).parent.name}: val mAP "
                   f"{result.val_map_before:.3f} → {result.val_map_after:.3f}; re-predicting the "
                   "images to do in the background.", notify=True)

    # ------------------------------------------------------------ re-rank
    def rerank(self):
        """Predict every image to do with the current model in the background (the shown one
        and the next first), then order the queue by the new uncertainties."""
        if self.queue is None:
            return
        self._rerank = self.queue.todo_ids()
        self._reranking = bool(self._rerank)
        if self._reranking:
            self._info(f"ranking {len(self._rerank)} images to do in the background…")
        self._kick()

    def _finish_rerank(self):
        self._reranking = False
        self._from_top = True
        self.queue.resort()
        self.table_model.reset(self.queue)
        if self.current is not None:
            self.table_model.set_current(self.current)
            self._select_row(self.current)
        self._info(f"Queue re-ranked: most doubtful first ({self.queue.summary()}).")
