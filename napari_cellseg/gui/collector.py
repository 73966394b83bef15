"""Python's garbage collector in a napari session with PyTorch loaded.

A full (generation 2) collection scans every object the process tracks: after importing torch,
torchvision, timm and napari that is ~560,000 objects, and each full collection froze napari for
~235 ms (2-core CPU), at random moments: a slider move, a result being shown. ``gc.freeze()``
moves everything alive into a permanent generation that collections skip; what is made later is
collected as before (a full collection then costs ~22 ms).

The catch: a frozen object in a reference cycle is never collected. Modules, classes and
functions live as long as the process anyway, but the layers open at that moment are in cycles
(their events hold their methods): removed later, such a layer (and its image data) would stay
in memory. So the layers present when freezing are remembered, and removing one of them
unfreezes, collects once (the one full collection of that moment) and freezes again.
"""

from __future__ import annotations

import gc
import weakref

from napari_cellseg.gui.compat import unwrap

_frozen_layers: "weakref.WeakSet" = weakref.WeakSet()  # layers alive at the last freeze
_viewers: "weakref.WeakSet" = weakref.WeakSet()  # viewers whose removals are watched
_state = {"frozen": False}


def freeze_long_lived(viewer) -> bool:
    """Freeze what is alive now, once per process (call it once PyTorch is imported, on the GUI
    thread); watch ``viewer``'s layer removals. Returns whether it froze now."""
    real = unwrap(viewer)
    if real not in _viewers:
        _viewers.add(real)
        real.layers.events.removed.connect(_on_removed)
    if _state["frozen"]:
        return False
    _freeze()
    return True


def _freeze() -> None:
    gc.freeze()
    _state["frozen"] = True
    for viewer in list(_viewers):
        for layer in viewer.layers:
            _frozen_layers.add(unwrap(layer))


def _on_removed(event) -> None:
    layer = unwrap(getattr(event, "value", None))
    if layer is not None and layer in _frozen_layers:
        _frozen_layers.discard(layer)
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, refreeze)  # after napari has dropped its own references


def refreeze() -> None:
    """Collect what was frozen and has become garbage (a removed layer), then freeze again."""
    gc.unfreeze()
    gc.collect()
    _freeze()
