"""Regenerate docs/screenshot_review_dataset.png at 1280x800: the "Review dataset" dock in use.

    xvfb-run -a -s "-screen 0 1280x800x24" python scripts/screenshot_review_dataset.py [OUT_DIR]

The 16 real nuclei planes of tests/data saved as a folder of images, the bundled demo model,
the queue ranked (worst first), two images accepted, the next doubtful cell highlighted.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def make_folder(root: Path) -> Path:
    import tifffile

    stack = tifffile.imread(REPO / "tests" / "data" / "nuclei_z28-43_image.tif")
    folder = root / "nuclei"
    folder.mkdir()
    for i, plane in enumerate(stack):
        tifffile.imwrite(folder / f"nuclei_z{28 + i}.tif", plane)
    return folder


def main(out="docs"):
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_cellseg.gui.compat import close_notifications
    from napari_cellseg.gui.torch_guard import block_triton

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="review_dataset_"))
    folder = make_folder(root)
    viewer = napari.Viewer(title="napari-cellseg")
    app = QApplication.instance()
    viewer.window.resize(1280, 800)
    block_triton()
    _, dock = viewer.window.add_plugin_dock_widget("napari-cellseg", "Review dataset")
    dock.open_folder(folder, root / "nuclei_reviewed.csv")
    dock.rerank()  # every image predicted in the background, then worst first
    _wait(app, lambda: not dock._reranking and dock._worker is None)
    for _ in range(2):
        _wait(app, lambda: dock.current in dock._preds and dock._worker is None)
        dock.accept()
    _wait(app, lambda: dock.current in dock._preds and dock._worker is None)
    dock.next_doubtful()
    print("dataset:", dock.counts_label.text(), "|", dock.image_label.text(), "|", dock.status.text())
    viewer.window.resize(1280, 800)
    _pump(app, 0.5)
    viewer.reset_view()  # the whole image, the doubtful cell outlined
    close_notifications(viewer)
    _pump(app, 0.5)
    path = out / "screenshot_review_dataset.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print("wrote", path, "window", viewer.window.geometry()[2:])
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
