"""The one place that touches napari internals (tested in tests/test_widget.py against the napari
version pyproject.toml declares).

Widgets docked from the Plugins menu get a ``PublicOnlyProxy`` of the viewer: every attribute
access returns a *new* proxy (so ``a is b`` is False for the same layer) and private attributes
warn. Everything else in the plugin uses napari's public API; what has no public equivalent is
here, applied to the unwrapped object so no FutureWarning is raised:

* :func:`same_layer` - identity of two (possibly proxied) layers;
* :func:`reset_undo_history` - after the sliders redraw a result layer, old strokes must not
  replay onto the new drawing (public fallback: re-assigning ``layer.data``);
* :func:`close_notifications` - pop-ups would cover the canvas in ``cellseg demo --screenshot``.
"""

from __future__ import annotations


def unwrap(obj):
    """The object behind a napari ``PublicOnlyProxy`` (``__wrapped__`` is public in wrapt)."""
    return getattr(obj, "__wrapped__", obj)


def same_layer(a, b) -> bool:
    """True when ``a`` and ``b`` are the same layer, proxied or not."""
    return a is not None and b is not None and unwrap(a) is unwrap(b)


def reset_undo_history(layer) -> None:
    """Drop the layer's undo/redo history (napari has no public call for it)."""
    real = unwrap(layer)
    reset = getattr(type(real), "_reset_history", None)
    if callable(reset):
        reset(real)
    else:  # public path: assigning data resets the history (a full refresh, slower)
        real.data = real.data


def scene_canvas(viewer):
    """The vispy SceneCanvas that draws the viewer's layers (benchmarks time its repaint), or
    None where this napari keeps it elsewhere."""
    qt_viewer = getattr(unwrap(getattr(unwrap(viewer), "window", None)), "_qt_viewer", None)
    canvas = getattr(qt_viewer, "canvas", None)
    return getattr(canvas, "_scene_canvas", None)


def close_notifications(viewer) -> int:
    """Close napari's notification pop-ups on the viewer's window; returns how many."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:  # moved in another napari version: nothing to close then
        return 0
    window = getattr(unwrap(getattr(unwrap(viewer), "window", None)), "_qt_window", None)
    if window is None:
        return 0
    toasts = window.findChildren(NapariQtNotification)
    for toast in toasts:
        toast.close()
    return len(toasts)
