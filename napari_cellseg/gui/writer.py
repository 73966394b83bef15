"""napari writer contribution: File > Save Selected Layer(s) on a Labels layer -> ``.csv``.

Rows of other image ids already in the file are kept, this id's rows replaced (atomic write).
A new file is written in the train format (id, annotation, width, height) so it re-opens without
the image; an existing file keeps its own format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class _LayerLike:
    def __init__(self, data, meta):
        self.data = np.asarray(data)
        self.name = meta.get("name", "labels")
        self.metadata = meta.get("metadata") or {}


def write_labels(path, data, meta):
    """Single-layer writer: returns the list of written paths (napari convention)."""
    from napari_cellseg.gui.layers import export_csv, labels_items

    path = Path(path)
    if path.suffix.lower() != ".csv":
        path = path.with_suffix(".csv")
    fmt = "train"
    if path.exists():
        from napari_cellseg.io.annotations import read_annotations

        fmt = read_annotations(path).format
    items = labels_items(_LayerLike(data, meta))
    if not items:
        raise ValueError(f"{path}: the labels layer {meta.get('name')!r} is empty; nothing written")
    export_csv(path, items, fmt)
    return [str(path)]
