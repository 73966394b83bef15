"""The Edit and Export group boxes of the Segment widget (layout only; actions live on it)."""

from __future__ import annotations

import functools

from qtpy.QtWidgets import (QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton,
                            QVBoxLayout)

from . import _edit
from ._layers import CSV_FORMATS


def build_edit_box(widget) -> QGroupBox:
    """Help text for napari's tools and our shortcuts, plus the two cursor-free actions."""
    edit = QGroupBox("Edit (on the cells layer)")
    ev = QVBoxLayout(edit)
    keys = "\n".join(f"{k}: {h}" for k, h in _edit.SHORTCUTS.values())
    help_lbl = QLabel("Paint, fill, erase, pick: napari's layer tools (top left). "
                      "Keys, with the mouse over a cell:\n" + keys)
    help_lbl.setWordWrap(True)
    ev.addWidget(help_lbl)
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
    for key, text in CSV_FORMATS.items():
        widget.format_combo.addItem(text, key)
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
