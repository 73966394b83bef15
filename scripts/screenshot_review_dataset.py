"""Regenerate docs/screenshot_review_dataset.png at 1280x800: the "Review dataset" dock in use.

    xvfb-run -a -s "-screen 0 1280x800x24" python scripts/screenshot_review_dataset.py [OUT_DIR] [--train]

The 16 real nuclei planes of tests/data saved as a folder of images, the bundled demo model,
the queue ranked (worst first), two images accepted, the next doubtful cell highlighted.
``--train`` also writes screenshot_review_dataset_train.png: four planes accepted from a start
CSV of their hand-checked labels, "Train on accepted" with a 1.5 minute budget, the val mAP
before -> after and the re-ranked queue (about 4 minutes on a 2-core CPU).
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


def make_start_csv(root: Path, ids) -> Path:
    """A train CSV of the hand-checked labels of ``ids`` (nuclei_z<N>)."""
    import tifffile

    from napari_cellseg.io.annotations import write_annotations

    labels = tifffile.imread(REPO / "tests" / "data" / "nuclei_z28-43_labels.tif")
    path = root / "ground_truth.csv"
    write_annotations(path, {i: labels[int(i.rsplit("z", 1)[1]) - 28].astype("int32") for i in ids},
                      format="train")
    return path


def train_shot(app, viewer, dock, root, out):
    from napari_cellseg.gui.compat import close_notifications

    ids = ["nuclei_z30", "nuclei_z34", "nuclei_z38", "nuclei_z42"]
    dock.open_folder(root / "nuclei", root / "nuclei_reviewed_gt.csv", start_csv=make_start_csv(root, ids))
    for image_id in ids:
        dock.show(image_id)
        dock.accept()
    dock.minutes_spin.setValue(1.5)
    t0 = time.monotonic()
    dock.train_on_accepted()
    _wait(app, lambda: dock._train_worker is None)
    _wait(app, lambda: not dock._reranking and dock._worker is None)
    print("train:", dock.map_label.text(), f"({time.monotonic() - t0:.0f} s with the re-ranking)")
    bar = dock.scroll.verticalScrollBar()
    bar.setValue(bar.maximum())
    close_notifications(viewer)
    _pump(app, 0.5)
    path = out / "screenshot_review_dataset_train.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print("wrote", path)


def main(out="docs", *flags):
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
    if "--train" in flags:
        train_shot(app, viewer, dock, root, out)
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
