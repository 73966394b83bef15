"""docs/screenshot_channels.png: a 2-channel image (DAPI + cytoplasm, 8-bit, dim) opened with
napari's own reader and segmented with the bundled demo model from its DAPI channel, at 1280x800.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_channels.py [OUT_DIR]

The image: the held-out real nuclei plane z 34 of tests/data as "DAPI" (exported dim, 0-120 of
255) and a made-up "cytoplasm" stain around each nucleus, saved as a CxYxX OME-TIFF with its
channel names; the Segment cells dock lists those names in its channel picker.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def two_channel_tiff(path: Path) -> Path:
    import tifffile
    from scipy import ndimage

    stack = tifffile.imread(REPO / "tests/data/nuclei_z28-43_image.tif")
    dapi = stack[34 - 28].astype(np.float64)
    dapi = (dapi - dapi.min()) / np.ptp(dapi)
    cyto = ndimage.gaussian_filter((ndimage.grey_dilation(dapi, size=(9, 9)) > 0.35) * 1.0, 3)
    cyto = 0.6 * cyto + 0.1 * np.random.default_rng(0).random(cyto.shape)
    to8 = lambda f, top: np.round(np.clip(f, 0, 1) * top).astype(np.uint8)  # noqa: E731
    tifffile.imwrite(path, np.stack([to8(dapi, 120), to8(cyto, 200)]), ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "cytoplasm"]}})
    return path


def _pump(app, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def main(out="docs") -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cellseg.gui.compat import close_notifications

    out = Path(out)
    path = two_channel_tiff(Path(tempfile.mkdtemp()) / "dapi_cytoplasm.tif")
    viewer = napari.Viewer(title="napari-cellseg")
    app = QApplication.instance()
    viewer.window.resize(1280, 800)
    viewer.open(str(path), plugin="napari")
    _, seg = viewer.window.add_plugin_dock_widget("napari-cellseg", "Segment cells")
    seg.image_combo.setCurrentText("dapi_cytoplasm")
    seg.channel_combo.setCurrentIndex(seg.channel_combo.findData(1))  # "1: DAPI"
    start = time.monotonic()
    while not seg._torch_ready and time.monotonic() - start < 600:
        _pump(app, 0.1)
    seg.segment()
    while seg._worker is not None and time.monotonic() - start < 900:
        _pump(app, 0.1)
    print("channels offered:", [seg.channel_combo.itemText(i) for i in range(seg.channel_combo.count())])
    print("segment:", seg.status.text())
    viewer.window.resize(1280, 800)
    _pump(app, 0.5)
    viewer.reset_view()
    close_notifications(viewer)
    _pump(app, 0.5)
    target = out / "screenshot_channels.png"
    viewer.screenshot(str(target), canvas_only=False, flash=False)
    print("wrote", target, viewer.window.geometry())
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
