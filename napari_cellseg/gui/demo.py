"""``cellseg demo``: napari with a sample image and the "Segment cells" widget docked.

``setup_demo(viewer, ...)`` is the testable part; ``run_demo`` creates the viewer and enters
the Qt event loop.
"""

from __future__ import annotations

from pathlib import Path

from napari_cellseg.model.checkpoint import missing_checkpoint


def setup_demo(viewer, sample: str = "nuclei", checkpoint=None, image=None):
    """Open ``image`` (a file) or the packaged ``sample``, dock the widget, pre-select a model.

    Returns the widget. ``checkpoint=None`` keeps the widget's choice: the bundled demo model
    when installed, else the last checkpoint used.
    """
    from napari_cellseg.gui.layout import fit_window
    from napari_cellseg.gui.sample import cells_sample, nuclei_sample

    if image is not None:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image file not found")
        layers = viewer.open(str(path))
    else:
        samples = {"nuclei": nuclei_sample, "cells": cells_sample}
        if sample not in samples:
            raise ValueError(f"unknown sample {sample!r}; choose one of {', '.join(samples)}")
        layers = [getattr(viewer, f"add_{kind}")(data, **meta) for data, meta, kind in samples[sample]()]
    fit_window(viewer)  # napari's saved window size may be tiny
    # the same path as Plugins > Cell segmentation > Segment cells
    _, widget = viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
    if checkpoint is not None:
        widget.set_checkpoint(checkpoint)
    images = [lyr for lyr in layers if type(lyr).__name__ == "Image"]
    if images:
        viewer.layers.selection.active = images[0]
        widget.image_combo.setCurrentText(images[0].name)
    return widget


def segment_and_screenshot(viewer, widget, path, timeout: float = 600.0, size=(1280, 800)) -> str:
    """Press Segment, wait for the result (Qt events keep flowing), save a window screenshot."""
    import time

    from qtpy.QtWidgets import QApplication

    from napari_cellseg.gui.compat import close_notifications

    app = QApplication.instance()
    viewer.window.resize(*size)
    app.processEvents()
    viewer.reset_view()  # fit the image to the resized canvas
    start = time.monotonic()
    while not widget._torch_ready and time.monotonic() - start < timeout:
        app.processEvents()  # PyTorch loads on a worker
        time.sleep(0.05)
    widget.segment()
    while widget._worker is not None and time.monotonic() - start < timeout:
        app.processEvents()
        time.sleep(0.05)
    if widget._worker is not None:
        widget.cancel()
        raise TimeoutError(f"segmentation did not finish within {timeout:.0f} s")
    close_notifications(viewer)  # pop-ups would cover the canvas
    for _ in range(10):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(path), canvas_only=False)
    return widget.status.text()


def run_demo(sample: str = "nuclei", checkpoint=None, image=None, run: bool = True, screenshot=None):
    """Open the demo; ``screenshot=PATH`` segments once, saves the window and closes instead."""
    import napari

    if checkpoint is not None and missing_checkpoint(checkpoint):
        raise FileNotFoundError(missing_checkpoint(checkpoint))
    viewer = napari.Viewer(title="napari-cellseg demo")
    widget = setup_demo(viewer, sample=sample, checkpoint=checkpoint, image=image)
    if screenshot is not None:
        print(segment_and_screenshot(viewer, widget, screenshot))
        viewer.close()
    elif run:
        napari.run()
    return viewer, widget
