"""Parts of the Segment widget: the Edit and Export group boxes, and ``PanelActions`` (the model
picker, edit buttons and export of the widget, as a mixin so _widget.py stays readable)."""

from __future__ import annotations

import functools
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QPushButton, QVBoxLayout)

from napari_cellseg.gui.segment import edit as _edit
from napari_cellseg.gui.layers import CSV_FORMATS, InputError, export_csv, export_items
from napari_cellseg.gui.settings import load_settings, remember_checkpoint, save_settings


FORMAT_NAMES = {"kaggle": "Kaggle (id, predicted)", "starter": "Starter (idx, id, …)",
                "train": "Training (with size)"}


def build_edit_box(widget) -> QGroupBox:
    """Help text for napari's tools and our shortcuts, plus the two cursor-free actions."""
    edit = QGroupBox("Edit (on the cells layer)")
    ev = QVBoxLayout(edit)
    keys = "\n".join(f"{k}: {h}" for k, h in _edit.SHORTCUTS.values())
    from superqt import QCollapsible

    help_lbl = QLabel("Paint, fill, erase, pick: napari's layer tools (top left). "
                      "Keys, with the mouse over a cell:\n" + keys)
    help_lbl.setWordWrap(True)
    widget.edit_help = QCollapsible("How to edit (tools and keys)")
    widget.edit_help.addWidget(help_lbl)
    widget.edit_help.setToolTip("napari's paint/fill/erase tools and this plugin's shortcuts")
    ev.addWidget(widget.edit_help)
    row = QHBoxLayout()
    widget.newid_btn = QPushButton("New id for last stroke")
    widget.newid_btn.setToolTip("Paint a stroke with any label, then press this to make it a new cell")
    widget.newid_btn.clicked.connect(functools.partial(widget._edit_action, "new_id"))
    widget.renumber_btn = QPushButton("Renumber 1..N")
    widget.renumber_btn.setToolTip("Make the cell ids consecutive (undo with Ctrl+Z)")
    widget.renumber_btn.clicked.connect(functools.partial(widget._edit_action, "renumber"))
    row.addWidget(widget.newid_btn)
    row.addWidget(widget.renumber_btn)
    ev.addLayout(row)
    return edit


def build_export_box(widget) -> QGroupBox:
    exp = QGroupBox("Export")
    form = QFormLayout(exp)
    widget.format_combo = QComboBox()
    for key, text in CSV_FORMATS.items():  # short names fit the dock; the full one as tooltip
        widget.format_combo.addItem(FORMAT_NAMES[key], key)
        widget.format_combo.setItemData(widget.format_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole)
    widget.format_combo.setToolTip("CSV layout: Kaggle submission (id, predicted), the starter "
                                   "notebook's, or a training CSV with width/height")
    form.addRow("Format", widget.format_combo)
    widget.scope_combo = QComboBox()
    widget.scope_combo.addItems(["all segmented images", "current image only"])
    widget.scope_combo.setToolTip("An existing CSV keeps the rows of other images; rows of these "
                                  "images are replaced")
    form.addRow("Images", widget.scope_combo)
    widget.export_btn = QPushButton("Export CSV…")
    widget.export_btn.setToolTip("One row per cell, run-length encoded (Kaggle convention); "
                                 "re-open the CSV in napari to get the masks back")
    widget.export_btn.clicked.connect(widget.export)
    form.addRow(widget.export_btn)
    return exp


class PanelActions:
    """Model picker, edit buttons and export of SegmentWidget (uses its widgets and messages)."""

    def _refresh_models(self, select: str | None = None):
        from napari_cellseg.model.checkpoint import bundled_model_path

        self.model_combo.clear()
        bundled = bundled_model_path()
        if bundled.is_file():
            self.model_combo.addItem("Demo model", str(bundled))
            self.model_combo.setItemData(0, f"The demo model bundled with napari-cellseg: {bundled}",
                                         Qt.ItemDataRole.ToolTipRole)
        for p in load_settings().get("recent_checkpoints", []):
            if Path(p).is_file() and Path(p) != bundled:
                self.model_combo.addItem(Path(p).name, p)
                self.model_combo.setItemData(self.model_combo.count() - 1, p, Qt.ItemDataRole.ToolTipRole)
        if self.model_combo.count() == 0:
            self.model_combo.setPlaceholderText("no model yet: press Browse…")
        else:
            self.model_combo.setCurrentIndex(0)
        last = select or load_settings().get("last_checkpoint")
        for i in range(self.model_combo.count()):
            if self.model_combo.itemData(i) == last:
                self.model_combo.setCurrentIndex(i)

    def _ask_checkpoint_file(self) -> str:  # tests replace this
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "",
                                              "Checkpoints (*.bin *.pth *.pt *.ckpt);;All files (*)")
        return path

    def _on_browse(self):
        path = self._ask_checkpoint_file()
        if path:
            self.set_checkpoint(path)

    def set_checkpoint(self, path):
        self._refresh_models(select=remember_checkpoint(path))

    def _checkpoint(self) -> str:
        path = self.model_combo.currentData()
        if not path:
            raise InputError("no model chosen: the bundled demo model is not installed; press "
                             "Browse… and pick a checkpoint file")
        return path

    # ------------------------------------------------------------ editing buttons
    def _edit_report(self, msg, error):
        (self._error if error else self._info)(msg)

    def _edit_action(self, name, *_):
        lyr = self._result_layer()
        if lyr is None:
            self._error("segment an image first")
            return
        try:
            if name == "new_id":
                msg = f"last stroke is now cell {_edit.new_id_for_last_stroke(lyr)}"
            else:
                msg = f"renumbered: ids 1..{_edit.renumber(lyr)}"
        except _edit.EditError as exc:
            self._error(str(exc))
            return
        self._info(msg)

    # ------------------------------------------------------------ export
    def _ask_save_path(self) -> str:  # tests replace this
        start = load_settings().get("last_export", "")
        path, _ = QFileDialog.getSaveFileName(self, "Export CSV", start, "CSV (*.csv)")
        return path

    def export(self):
        fmt = self.format_combo.currentData()
        try:
            only = None
            if self.scope_combo.currentIndex() == 1:
                only = self._result_layer()
                if only is None:
                    raise InputError("the selected image has not been segmented: nothing to export")
            items = export_items(self.viewer.layers, only=only)
        except InputError as exc:
            self._error(str(exc))
            return
        path = self._ask_save_path()
        if not path:
            return
        if not path.lower().endswith(".csv"):
            path += ".csv"
        try:
            n = export_csv(path, items, fmt)
        except (ValueError, OSError) as exc:  # CsvError is a ValueError
            self._error(f"Export failed, nothing written: {exc}")
            return
        save_settings({"last_export": path})
        self._info(f"Wrote {n} cells of {len(items)} image(s) to {path}", notify=True)
