"""napari reader contribution: an annotation / submission CSV -> one Labels layer per image id."""

from __future__ import annotations

from pathlib import Path


def get_reader(path):
    """Return a reader for a single ``.csv`` path, else ``None`` (napari tries other readers)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith(".csv"):
        return None
    return read_csv


def read_csv(path):
    """LayerData tuples for every image id in the CSV (sizes from width/height or open images)."""
    from napari_cellseg.gui.layers import csv_to_layer_data

    if isinstance(path, (list, tuple)):
        path = path[0]
    layers = ()
    try:
        import napari

        viewer = napari.current_viewer()
        layers = list(viewer.layers) if viewer is not None else ()
    except Exception:  # no Qt / no viewer: width/height columns are the only source of sizes
        layers = ()
    return csv_to_layer_data(Path(path), layers)
