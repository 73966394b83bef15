"""``cellseg tune`` reports an mAP; ``cellseg predict`` with the thresholds tune reports gives
that mAP (``cellseg evaluate``), as subprocesses with the bundled demo model on tests/data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest


def _cellseg(*args):
    out = subprocess.run([sys.executable, "-m", "napari_cellseg.commands.main", *map(str, args)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_predict_with_the_tuned_thresholds_gives_the_tuned_map(tmp_path, nuclei_planes):
    """Before: predict's auto size measured the cells at the user's thresholds, tune's at the
    checkpoint's, so predict at tune's best pair gave another size and another mAP (0.396 for
    tune's 0.420). Both now size with the model's own thresholds."""
    import tifffile

    images, gt = tmp_path / "images", tmp_path / "gt"
    images.mkdir()
    gt.mkdir()
    for z in (31, 33, 35):  # held-out planes of the demo model (at 0.2 / 0.3 z33 and z35 size otherwise)
        image, labels = nuclei_planes[z]
        tifffile.imwrite(images / f"z{z}.tif", image)
        tifffile.imwrite(gt / f"z{z}.tif", labels.astype(np.uint16))
    tuned = json.loads(_cellseg("tune", "--gt", gt, "--images", images, "--device", "cpu", "--json",
                                "--box-confs", 0.2, "--mask-thresholds", 0.3))
    box, mask = tuned["box_conf"], tuned["mask_threshold"]  # far from the demo model's own 0.75 / 0.65
    assert (box, mask) == (0.2, 0.3)
    csv = tmp_path / "pred.csv"
    _cellseg("predict", images, "--out", csv, "--device", "cpu", "--box-conf", box, "--mask-threshold", mask)
    scored = json.loads(_cellseg("evaluate", "--gt", gt, "--pred", csv, "--json"))
    assert scored["n_images"] == 3
    assert scored["mean_map"] == pytest.approx(tuned["map"], abs=0.01), (tuned, scored["mean_map"])
