"""Regenerate docs/screenshot_*.png at 1280x800, every widget docked from the Plugins menu.

    xvfb-run -a -s "-screen 0 1280x800x24" python scripts/screenshots.py [OUT_DIR]

segment: the nuclei sample segmented with the bundled demo model; review: the same with the
sample's ground truth and the Review dock; docks: Segment cells, Review and Train model docked
together (one tab group; Segment cells raised); train: the Train model dock before a run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _pump(app, seconds=0.5):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def _wait(app, cond, timeout=900):
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError("timed out")
        _pump(app, 0.05)


def main(out="docs"):
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cellseg.gui.compat import close_notifications
    from napari_cellseg.gui.sample import nuclei_sample

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-cellseg")
    app = QApplication.instance()
    viewer.window.resize(1280, 800)
    for data, meta, kind in nuclei_sample():
        getattr(viewer, f"add_{kind}")(data, **meta)
    _, seg = viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
    seg.image_combo.setCurrentText("nuclei")
    _wait(app, lambda: seg._torch_ready)
    seg.segment()
    _wait(app, lambda: seg._worker is None)
    print("segment:", seg.status.text())

    def shot(name):
        viewer.window.resize(1280, 800)
        _pump(app, 0.5)
        viewer.reset_view()
        close_notifications(viewer)
        _pump(app, 0.5)
        path = out / f"screenshot_{name}.png"
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        canvas = viewer.screenshot(canvas_only=True, flash=False)
        docks = {n: w.parent().height() for n, w in viewer.window.dock_widgets.items()}
        print("wrote", path, "window", viewer.window.geometry()[2:], "canvas", canvas.shape[1::-1],
              "dock heights", docks)

    shot("segment")
    _, review = viewer.window.add_plugin_dock_widget("napari-cellseg", "Review")
    _wait(app, lambda: review.score is not None, 60)
    print("review:", review.summary.text())
    shot("review")
    from napari_cellseg.gui.layout import dock_of

    viewer.window.add_plugin_dock_widget("napari-cellseg", "Train model")
    _pump(app, 0.5)
    dock_of(seg).raise_()
    shot("docks")
    for name in ("Segment cells", "Review"):
        viewer.window.remove_dock_widget(viewer.window.dock_widgets[f"{name} (napari-cellseg)"].parent())
    review._timer.timeout.disconnect()  # the closed Review dock must not redraw its overlay
    viewer.layers.remove("nuclei cells review")
    _, train = viewer.window.add_plugin_dock_widget("napari-cellseg", "Train model")
    _pump(app, 0.5)
    bar = train.scroll.verticalScrollBar()
    bar.setValue(bar.maximum())  # show the settings, Start and the (empty) loss plot
    shot("train")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
