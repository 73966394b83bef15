"""The bundled demo model (napari_cellseg/models/demo.bin): shipped, safe to load, and accurate.

Accuracy floors sit a safe margin below what was measured when the model was packaged (README,
"The demo model"); a broken checkpoint, wrong normalisation, wrong scale handling or lost
thresholds all drop far below them.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_cellseg.model.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from napari_cellseg.inference.metrics import average_precision  # noqa: E402
from napari_cellseg.io.samples import load_sample  # noqa: E402

# measured at packaging time (stored thresholds 0.75 / 0.65, auto size): nuclei sample (real plane
# z35, held out) 0.515 mAP, 18 of 20 nuclei; cells sample (synthetic 520x704) 0.557 mAP, 127 of 151
MIN_MAP = {"nuclei": 0.42, "cells": 0.45}


@pytest.fixture(scope="module")
def predictor():
    from napari_cellseg.inference.predictor import Predictor

    return Predictor.from_checkpoint(None, device="cpu")  # None = the bundled model


def test_shipped_small_and_weights_only():
    path = bundled_model_path()
    assert path.is_file(), f"{path} missing: the demo model must ship in the package"
    assert path.stat().st_size <= 25 * 2**20
    obj = torch.load(path, map_location="cpu", weights_only=True)  # no code can run
    assert obj["config"]["backbone"] == "convnext_atto"
    assert {t.dtype for t in obj["state_dict"].values() if t.is_floating_point()} == {torch.float16}
    model, config, thresholds, info = load_checkpoint(path)
    assert config.native_scale and config.diameter == 40.0  # size-normalised: predict sizes images
    assert 0 < thresholds["box_conf"] < 1 and 0 < thresholds["mask_threshold"] < 1
    assert "not a substitute" in info["description"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # cast back on load


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nuclei", "cells"])
def test_segments_the_packaged_samples(predictor, name):
    image, gt = load_sample(name)
    t = predictor.thresholds
    det = predictor.predict(image)  # the model's default size: auto (trained with --diameter)
    labels = det.to_labels(t)  # the checkpoint's thresholds with the default post-processing
    score = average_precision(gt, labels)
    assert score >= MIN_MAP[name], f"{name}: mAP {score:.3f} < {MIN_MAP[name]}"
    n_gt, n_pred = int(gt.max()), len(np.unique(labels)) - 1
    assert 0.4 * n_gt <= n_pred <= 1.5 * n_gt, (n_gt, n_pred)


@pytest.mark.slow
def test_cli_predict_without_checkpoint_uses_it(tmp_path):
    import tifffile

    from napari_cellseg.io.annotations import read_annotations
    from napari_cellseg.io.samples import sample_path

    img = tmp_path / "nuclei plane.tif"
    img.write_bytes(sample_path("nuclei").read_bytes())
    out = tmp_path / "sub.csv"
    res = subprocess.run([sys.executable, "-m", "napari_cellseg.commands.main", "predict", str(img), "--out", str(out),
                          "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "bundled demo model" in res.stderr
    ann = read_annotations(out)
    gt = tifffile.imread(sample_path("nuclei", labels=True)).astype(np.int32)
    pred = ann.labels("nuclei plane", shape=gt.shape)
    assert average_precision(gt, pred) >= MIN_MAP["nuclei"]
