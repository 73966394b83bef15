"""Slider redraw speed in the real widget: 500 instances on a 704x520 image.

One slider move = ``Detections.to_labels`` + ``layer.data = labels`` + napari's refresh + the Qt
paint of the canvas (``processEvents``). The budget is one display frame at 60 Hz = 16.7 ms.
Detections are synthetic (500 boxes 10-40 px with Gaussian 28x28 probabilities), so no network
runs here; the first ``to_labels`` call (which pastes the per-box crops once, cached) is timed
separately. Baseline in the same run: the same redraw without the cached crops (cache cleared
each time), i.e. what a redraw would cost if every slider move re-pasted the masks.

Run: ``xvfb-run -a python benchmarks/bench_slider.py`` (prints ms per redraw and ratios);
``--large``: 2,000 instances of 20-80 px on a 3000x3000 image (the issue's large-image case;
the budget there is 50 ms per redraw and no single move over 200 ms).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, W, N = 520, 704, 500
SIZES = (10, 40)
if "--large" in sys.argv:
    H, W, N, SIZES = 3000, 3000, 2000, (20, 80)
FRAME_MS = 1000 / 60  # 16.7 ms


def make_detections(seed=0):
    from napari_cellseg.inference.predictor import Detections

    rng = np.random.default_rng(seed)
    size = rng.uniform(*SIZES, (N, 2))
    x0 = rng.uniform(0, W - 10, N)
    y0 = rng.uniform(0, H - 10, N)
    boxes = np.stack([x0, y0, np.minimum(x0 + size[:, 0], W), np.minimum(y0 + size[:, 1], H)], 1)
    g = np.linspace(-1, 1, 28)
    blob = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / 0.35)
    probs = np.clip(blob[None] * rng.uniform(0.8, 1.0, (N, 1, 1))
                    + rng.normal(0, 0.05, (N, 28, 28)), 0, 1)
    scores = rng.uniform(0.05, 1.0, N)
    return Detections(boxes, scores, probs, (H, W))


def main(repeats: int = 30) -> None:
    os.environ.setdefault("NAPARI_CELLSEG_CONFIG_DIR", str(Path("/tmp/bench_slider_cfg")))
    from napari_cellseg.gui.torch_guard import import_torch

    import_torch()  # before the GL context (see _torch_guard)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cellseg.gui.layers import Result
    from napari_cellseg.gui.segment.widget import SegmentWidget

    dets = make_detections()
    t = time.perf_counter()
    dets.to_labels(0.0, 0.5)
    first_ms = (time.perf_counter() - t) * 1000

    viewer = napari.Viewer()
    viewer.add_image(np.zeros((H, W), np.uint8), name="img")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    try:  # the result layer's dtype as Segment cells makes it (int32 before it chose one)
        from napari_cellseg.gui.layers import label_dtype
        dtype = label_dtype(N)
    except ImportError:
        dtype = np.int32
    lyr = viewer.add_labels(np.zeros((H, W), dtype), name="img cells")
    lyr.metadata["napari_cellseg"] = Result(image_id="img", image_layer="img", detections=dets)
    widget.image_combo.setCurrentText("img")
    widget._update_tune_panel()
    app = QApplication.instance()
    for _ in range(10):
        app.processEvents()

    values = np.linspace(0.05, 0.95, repeats)
    n_cells = []
    worst: list = []

    def timed(clear_cache: bool, slider) -> tuple[float, float]:
        """median ms of (slider move -> widget.redraw, i.e. to_labels + layer update), (GL paint)"""
        update, paint = [], []
        for v in values:
            if clear_cache:
                dets._cache = None
            t0 = time.perf_counter()
            slider.setValue(float(v))  # -> widget.redraw(): to_labels + in-place data + refresh
            t1 = time.perf_counter()
            app.processEvents()  # Qt/vispy paint of the canvas
            update.append(t1 - t0)
            paint.append(time.perf_counter() - t1)
            n_cells.append(int(lyr.data.max()))
        worst.append(max(update) * 1000)
        return float(np.median(update)) * 1000, float(np.median(paint)) * 1000

    widget.mask_slider.setValue(0.5)
    widget.fill_check.setChecked(False)
    box_ms = timed(False, widget.box_slider)
    mask_ms = timed(False, widget.mask_slider)
    widget.fill_check.setChecked(True)  # the demo model's default (cellpose fills holes too)
    widget.mask_slider.setValue(0.5)
    fill_box_ms = timed(False, widget.box_slider)
    fill_mask_ms = timed(False, widget.mask_slider)
    widget.fill_check.setChecked(False)
    to_labels_ms = float(np.median([_t(lambda: dets.to_labels(0.3, 0.5)) for _ in range(repeats)])) * 1000
    fill_ms = float(np.median([_t(lambda: dets.to_labels(0.3, 0.5, fill_holes=True))
                               for _ in range(max(repeats // 3, 3))])) * 1000
    widget.box_slider.setValue(0.05)
    nocache_ms = timed(True, widget.mask_slider)
    from napari_cellseg.gui.compat import scene_canvas

    canvas = scene_canvas(viewer)
    bare = []
    for _ in values:  # the same paint with no data change: the GL floor of this machine
        canvas.update()
        t0 = time.perf_counter()
        app.processEvents()
        bare.append(time.perf_counter() - t0)
    bare_ms = float(np.median(bare)) * 1000
    shown_ms = _result_shown(viewer, widget, app)
    viewer.close()

    print(f"slider redraw, {N} instances on {W}x{H}, layer dtype {lyr.data.dtype} (median of {repeats} moves; frame = {FRAME_MS:.1f} ms):")
    print(f"  first to_labels (pastes crops once, cached): {first_ms:8.1f} ms")
    print(f"  to_labels alone:                             {to_labels_ms:8.1f} ms")
    print(f"  to_labels with fill_holes (same threshold):  {fill_ms:8.1f} ms")
    for what, (upd, paint) in (("Box confidence", box_ms), ("Mask threshold", mask_ms),
                               ("Box confidence, fill holes", fill_box_ms),
                               ("Mask threshold, fill holes", fill_mask_ms)):
        print(f"  {what} move: redraw {upd:6.1f} ms = {upd / FRAME_MS:.2f} frame "
              f"(+ canvas paint {paint:6.1f} ms)")
    print(f"  slowest single cached move: {max(worst[:4]):6.1f} ms")
    print(f"  baseline, re-paste crops on every move: redraw {nocache_ms[0]:6.1f} ms "
          f"(cached is {nocache_ms[0] / max(mask_ms[0], 1e-9):.1f}x faster)")
    print(f"  bare canvas repaint, no data change:  {bare_ms:6.1f} ms "
          f"(OpenGL of this machine: {os.environ.get('DISPLAY') and 'Xvfb/Mesa llvmpipe' or '?'})")
    print(f"  cells drawn ranged {min(n_cells)}..{max(n_cells)}")
    print(f"  Segment's result shown (GUI thread: new layer, first drawing, first paint): {shown_ms:6.1f} ms")


def _result_shown(viewer, widget, app) -> float:
    """What the GUI thread does when a Segment run ends: the worker returns prepared Detections
    (``Detections.prepare``, off the GUI thread), then ``_on_done`` adds the result layer and
    draws it, and Qt paints it. Timed on a fresh image, as after a real run."""
    from napari_cellseg.options import Thresholds

    th = Thresholds(box_conf=0.3, mask_threshold=0.5, fill_holes=True)
    dets = make_detections(seed=1).prepare(th)  # the worker's part
    image = viewer.add_image(np.zeros((H, W), np.uint8), name="fresh")
    for _ in range(5):
        app.processEvents()
    t = time.perf_counter()
    widget._on_done(image, "bench.bin", None, ({(): dets}, th))
    app.processEvents()
    return (time.perf_counter() - t) * 1000


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main(15 if "--large" in sys.argv else 30)
