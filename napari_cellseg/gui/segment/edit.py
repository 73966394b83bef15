"""Editing actions for a cell Labels layer: delete, merge, new id for the last stroke, renumber.

The numpy side (which pixels change to what) is in plain functions that tests call directly;
``apply_*`` wrappers write through ``Labels.data_setitem`` so napari's undo/redo keeps working.
Nothing here imports Qt; napari is only touched through the layer objects passed in.
"""

from __future__ import annotations

import weakref

import numpy as np

from napari_cellseg.gui.compat import unwrap

# real layer -> the last undo item napari reported in ``events.paint`` (public: event.value)
_LAST_STROKE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

#: action name -> (key, one-line help). Shown in the widget and bound on every result layer.
SHORTCUTS = {
    "delete": ("Shift-D", "delete the cell"),
    "merge": ("Shift-M", "merge it into the selected label"),
    "new_id": ("Shift-N", "give the last painted stroke a new id"),
    "renumber": ("Shift-R", "renumber ids 1..N"),
}


class EditError(ValueError):
    """An editing action that cannot be done here (message says why)."""


# ---------------------------------------------------------------- numpy helpers (pure)

def delete_indices(data: np.ndarray, label: int) -> tuple[np.ndarray, ...]:
    """Indices of the pixels of ``label`` (to be set to 0)."""
    if label == 0:
        raise EditError("no cell under the cursor (background)")
    idx = np.nonzero(np.asarray(data) == label)
    if idx[0].size == 0:
        raise EditError(f"label {label} is not in the layer")
    return idx


def merge_indices(data: np.ndarray, keep: int, absorb: int) -> tuple[np.ndarray, ...]:
    """Indices of ``absorb``'s pixels (to be set to ``keep``)."""
    if keep == 0 or absorb == 0:
        raise EditError("merge needs two cells: pick one (selected label), then point at the other")
    if keep == absorb:
        raise EditError(f"the cell under the cursor already has the selected label {keep}")
    idx = np.nonzero(np.asarray(data) == absorb)
    if idx[0].size == 0:
        raise EditError(f"label {absorb} is not in the layer")
    return idx


def renumber_values(data: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """``(indices, new_values)`` mapping the ids present to 1..N, keeping their order."""
    data = np.asarray(data)
    idx = np.nonzero(data)
    values = data[idx]
    uniq, inverse = np.unique(values, return_inverse=True)
    new = (inverse + 1).astype(data.dtype)
    changed = new != values
    return tuple(i[changed] for i in idx), new[changed]


def stroke_indices(history_item, shape) -> tuple[np.ndarray, ...]:
    """Pixel indices touched by one napari Labels undo-history item (a list of atoms)."""
    mask = np.zeros(shape, dtype=bool)
    for atom in history_item:
        if isinstance(atom, tuple) and len(atom) == 3:  # (indices, before, after)
            mask[tuple(np.asarray(i) for i in atom[0])] = True
        elif hasattr(atom, "slice_key"):  # napari's _MaskedPaintAtom
            region = mask[atom.slice_key]
            if atom.mask is None:
                region[...] = True
            else:
                region[np.asarray(atom.mask, dtype=bool)] = True
        else:
            raise EditError(f"unknown napari undo record {type(atom).__name__}")
    return np.nonzero(mask)


def next_free_id(data: np.ndarray) -> int:
    data = np.asarray(data)
    return int(data.max()) + 1 if data.size else 1


# ---------------------------------------------------------------- layer actions (undoable)

def label_under_cursor(layer, viewer) -> int:
    value = layer.get_value(viewer.cursor.position, world=True)
    if isinstance(value, tuple):  # multiscale returns (level, value)
        value = value[-1]
    return int(value) if value is not None else 0


def _plane_view(layer, viewer):
    """(array to edit, index prefix) — for a stack only the displayed plane."""
    data = layer.data
    if data.ndim <= 2:
        return data, ()
    prefix = tuple(int(i) for i in viewer.dims.current_step[: data.ndim - 2])
    return data[prefix], prefix


def _setitem(layer, prefix, idx, value):
    if idx[0].size == 0:
        return
    full = tuple(np.full(idx[0].shape, p, dtype=np.intp) for p in prefix) + tuple(idx)
    layer.data_setitem(full, value)


def delete_cell(layer, viewer) -> int:
    label = label_under_cursor(layer, viewer)
    plane, prefix = _plane_view(layer, viewer)
    _setitem(layer, prefix, delete_indices(plane, label), 0)
    return label


def merge_cells(layer, viewer) -> tuple[int, int]:
    keep = int(layer.selected_label)
    absorb = label_under_cursor(layer, viewer)
    plane, prefix = _plane_view(layer, viewer)
    _setitem(layer, prefix, merge_indices(plane, keep, absorb), keep)
    return keep, absorb


def track_strokes(layer) -> None:
    """Remember the layer's last paint/fill/erase stroke from its public ``paint`` event."""
    key = unwrap(layer)
    if key in _LAST_STROKE:
        return
    _LAST_STROKE[key] = None

    def remember(event):
        _LAST_STROKE[key] = list(getattr(event, "value", None) or [])

    layer.events.paint.connect(remember)  # a plain function: napari keeps a strong reference


def forget_last_stroke(layer) -> None:
    """Drop the remembered stroke: call whenever the layer's data is replaced (a redraw from
    the model, Reset to model, a new result), so the shortcut never relabels an old stroke's
    pixels in a drawing they no longer belong to."""
    key = unwrap(layer)
    if key in _LAST_STROKE:
        _LAST_STROKE[key] = None


def new_id_for_last_stroke(layer) -> int:
    stroke = _LAST_STROKE.get(unwrap(layer))
    if not stroke:
        raise EditError("nothing painted yet: paint a stroke first, then give it a new id")
    idx = stroke_indices(stroke, layer.data.shape)
    new = next_free_id(layer.data)
    # only pixels the stroke left non-zero (an erase stroke has nothing to relabel)
    keep = np.asarray(layer.data)[idx] != 0
    idx = tuple(i[keep] for i in idx)
    if idx[0].size == 0:
        raise EditError("the last stroke left no painted pixels")
    layer.data_setitem(idx, new)
    layer.selected_label = new
    return new


def renumber(layer) -> int:
    idx, values = renumber_values(layer.data)
    if idx[0].size:
        layer.data_setitem(idx, values)
    n = int(np.asarray(layer.data).max()) if layer.data.size else 0
    return n


def bind_edit_keys(layer, viewer, report) -> None:
    """Bind the SHORTCUTS on ``layer``; ``report(message, error: bool)`` shows the outcome."""
    track_strokes(layer)

    def wrap(name, fn):
        def handler(_layer):
            try:
                msg = fn()
            except EditError as exc:
                report(str(exc), True)
            else:
                report(msg, False)
        handler.__name__ = f"cellseg_{name}"
        layer.bind_key(SHORTCUTS[name][0], handler, overwrite=True)

    wrap("delete", lambda: f"deleted cell {delete_cell(layer, viewer)}")
    wrap("merge", lambda: "merged cell {1} into {0}".format(*merge_cells(layer, viewer)))
    wrap("new_id", lambda: f"last stroke is now cell {new_id_for_last_stroke(layer)}")
    wrap("renumber", lambda: f"renumbered: ids 1..{renumber(layer)}")
