"""The sections of the "Review dataset" dock (built here so widget.py holds behaviour only)."""

from __future__ import annotations

from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QLabel, QLineEdit, QProgressBar,
                            QVBoxLayout, QWidget)
from superqt import QCollapsible

from napari_cellseg.gui.dataset.table import QueueModel, make_view
from napari_cellseg.gui.layout import button, row_of

#: action -> (key, help). Bound on the viewer while the dock is open (napari's own keys and the
#: cells layer's Shift-D/M/N/R edit keys are left alone).
KEYS = {
    "accept": ("Shift-Enter", "Accept: write the masks to the CSV, open the next image to do"),
    "skip": ("Shift-S", "Skip to the next image to do (a draft keeps your edits)"),
    "previous": ("PageUp", "Previous image in the queue"),
    "next": ("PageDown", "Next image in the queue"),
    "doubtful": ("Shift-U", "Centre on the next most doubtful cell and highlight it"),
    "box": ("Shift-B", "Box tool: draw a box around a missed cell, the model segments it"),
    "click": ("Shift-K", "Click tool: click a missed cell, the model adds it"),
}


def key_help() -> str:
    return "\n".join(f"{key}: {text}" for key, text in KEYS.values())


def _picker(edit, title, slot):
    btn = button("…", title, slot)
    btn.setMaximumWidth(32)
    return row_of((edit, 1), btn)


def build_folder_box(w) -> QCollapsible:
    """The folder, output CSV, start CSV and ranking pickers, in a section that folds away once
    a folder is open (the queue and the image controls then fit a 1280x800 window)."""
    section = QCollapsible("Dataset: open a folder")
    box = QWidget()
    form = QFormLayout(box)
    form.setContentsMargins(0, 0, 0, 0)
    w.folder_combo = QComboBox()
    w.folder_combo.setEditable(True)
    w.folder_combo.setToolTip("Folder of images to review (recent folders in the list)")
    form.addRow("Images", _picker(w.folder_combo, "Choose the folder of images", w._on_browse_folder))
    w.out_edit = QLineEdit()
    w.out_edit.setPlaceholderText("reviewed.csv (train format)")
    w.out_edit.setToolTip("Accepted masks go here (id, annotation, width, height); drafts beside it in "
                          "<name>.drafts/. Open the same folder and CSV again to resume.")
    form.addRow("Output CSV", _picker(w.out_edit, "Choose the output CSV", w._on_browse_out))
    w.start_edit = QLineEdit()
    w.start_edit.setPlaceholderText("optional: cellseg predict output / train CSV")
    w.start_edit.setToolTip("Masks shown for the ids this CSV holds instead of running the model")
    form.addRow("Start CSV", _picker(w.start_edit, "Choose a start CSV", w._on_browse_start))
    w.rank_edit = QLineEdit()
    w.rank_edit.setPlaceholderText("optional: ranking.csv from cellseg rank")
    w.rank_edit.setToolTip("Orders the queue: the most doubtful images first")
    form.addRow("Ranking", _picker(w.rank_edit, "Choose a ranking.csv", w._on_browse_rank))
    w.open_btn = button("Open", "List the images (names only) and resume from the output CSV",
                        w._on_open_clicked)
    form.addRow(w.open_btn)
    section.addWidget(box)
    section.expand(animate=False)
    w.folder_section = section
    return section


def build_queue_box(w) -> QGroupBox:
    box = QGroupBox("Queue")
    lay = QVBoxLayout(box)
    w.counts_label = QLabel("open a folder of images")
    lay.addWidget(w.counts_label)
    w.table_model = QueueModel()
    w.table, w.table_proxy = make_view(w.table_model, w.show)
    lay.addWidget(w.table)
    w.rank_btn = button("Rank the to-do images", "Predict every image still to do in the background and "
                        "order the queue by uncertainty, most doubtful first", w.rerank, enabled=False)
    lay.addWidget(w.rank_btn)
    return box


def build_image_box(w) -> QGroupBox:
    box = QGroupBox("Image")
    lay = QVBoxLayout(box)
    w.image_label = QLabel("—")
    w.image_label.setWordWrap(True)
    lay.addWidget(w.image_label)
    tip = {k: f"{text} ({key})" for k, (key, text) in KEYS.items()}
    w.prev_btn = button("◀ Previous", tip["previous"], w.previous_image, enabled=False)
    w.skip_btn = button("Skip", tip["skip"], w.skip, enabled=False)
    w.next_btn = button("Next ▶", tip["next"], w.next_image, enabled=False)
    lay.addLayout(row_of(w.prev_btn, w.skip_btn, w.next_btn))
    w.accept_btn = button("Accept ✓", tip["accept"], w.accept, enabled=False)
    w.accept_btn.setStyleSheet("QPushButton { font-weight: bold; }")
    lay.addWidget(w.accept_btn)
    w.doubt_btn = button("Next doubtful cell", tip["doubtful"], w.next_doubtful, enabled=False)
    w.box_btn = button("Box tool", tip["box"], w.toggle_box_tool, enabled=False)
    w.click_btn = button("Click tool", tip["click"], w.toggle_click_tool, enabled=False)
    for b in (w.box_btn, w.click_btn):
        b.setCheckable(True)
    lay.addLayout(row_of(w.doubt_btn))
    lay.addLayout(row_of(w.box_btn, w.click_btn))
    w.sliders_btn = button("Sliders and edit keys (Segment cells)", "Dock Segment cells: its sliders, "
                           "post-processing, edit lock and edit keys work on the image shown here",
                           w.open_segment_dock)
    lay.addWidget(w.sliders_btn)
    help_lbl = QLabel("Paint, fill, erase: napari's tools on the cells layer (edits are saved as a "
                      "draft as you go). Keys:\n" + key_help() + "\nShift-D delete, Shift-M merge, "
                      "Shift-N new id, Shift-R renumber (mouse over a cell). Box and click cells are "
                      "undone with Ctrl-Z like a stroke.")
    help_lbl.setWordWrap(True)
    w.key_help = QCollapsible("Keys and tools")
    w.key_help.addWidget(help_lbl)
    lay.addWidget(w.key_help)
    w.status = QLabel("")
    w.status.setWordWrap(True)
    lay.addWidget(w.status)
    return box


def build_model_box(w) -> QGroupBox:
    box = QGroupBox("Model and training")
    form = QFormLayout(box)
    w.model_combo = QComboBox()
    w.model_combo.setToolTip("The model that predicts the images (a checkpoint from cellseg-train, "
                             "or the bundled demo model)")
    w.model_browse = button("…", "Choose a checkpoint file", w._on_browse_model)
    w.model_browse.setMaximumWidth(32)
    form.addRow("Model", row_of((w.model_combo, 1), w.model_browse))
    w.minutes_spin = QDoubleSpinBox()
    w.minutes_spin.setRange(0.1, 600.0)
    w.minutes_spin.setValue(5.0)
    w.minutes_spin.setSuffix(" min")
    w.minutes_spin.setToolTip("Time budget of the fine-tuning (it stops after the last epoch that fits)")
    form.addRow("Budget", w.minutes_spin)
    w.train_btn = button("Train on accepted", "Fine-tune the model on the accepted images, then make it "
                         "the current model and re-rank the images to do", w.train_on_accepted,
                         enabled=False)
    w.cancel_btn = button("Cancel", "Stop the fine-tuning (the model stays as it was)", w.cancel_training,
                          enabled=False)
    form.addRow(row_of((w.train_btn, 2), (w.cancel_btn, 1)))
    w.progress = QProgressBar()
    w.progress.setRange(0, 100)
    w.progress.setVisible(False)
    form.addRow(w.progress)
    w.map_label = QLabel("")
    w.map_label.setWordWrap(True)
    form.addRow(w.map_label)
    return box


__all__ = ["KEYS", "key_help", "build_folder_box", "build_queue_box", "build_image_box",
           "build_model_box"]
