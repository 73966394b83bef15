"""napari reader contribution: an annotation / submission CSV -> one Labels layer per image id.

napari ships its own CSV reader (points / shapes tables), so with two readers File > Open on a
CSV asks which one to use, every time. :func:`prefer_csv_reader` records this plugin as the
reader for ``*.csv`` in napari's documented reader preference
(``napari.settings.get_settings().plugins.extension2reader``, the table in Preferences >
Plugins), once: when napari first activates this plugin (any of its docks, its sample images, or
this reader picked in napari's dialog: ``on_activate`` in napari.yaml), unless the user already
chose a reader for CSVs. A CSV that is not in our formats then fails with our one-line error,
and napari offers its other readers. napari runs no plugin code before that, so a File > Open on
a CSV in a napari that never used this plugin asks once (docs/napari.md: the setting to make).
"""

from __future__ import annotations

from pathlib import Path

PLUGIN = "napari-cellseg"
CSV_PATTERN = "*.csv"


def prefer_csv_reader() -> bool:
    """Make this plugin napari's reader for ``*.csv`` unless a choice exists. Returns whether
    the preference was set now."""
    try:
        from napari.settings import get_settings

        plugins = get_settings().plugins
        if CSV_PATTERN in plugins.extension2reader:
            return False  # the user's (or our earlier) choice stands
        plugins.extension2reader = {**plugins.extension2reader, CSV_PATTERN: PLUGIN}
        return True
    except Exception:  # settings unavailable (headless, read-only config): napari asks then
        return False


def activate(context=None) -> None:
    """napari.yaml's ``on_activate``: napari calls it the first time any contribution of this
    plugin is used in a session."""
    prefer_csv_reader()


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
