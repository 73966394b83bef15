"""Shared pytest fixtures. Add new fixtures in a section of their own, with a docstring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# ---- real data (../shared/data) -----------------------------------------------------------
@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with nuclei3d_image.tif / nuclei3d_labels.tif; skips the test when missing."""
    if not (SHARED_DATA / "nuclei3d_labels.tif").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nuclei_labels(shared_data) -> np.ndarray:
    """The 60x256x256 instance-label stack (read-only)."""
    import tifffile

    labels = tifffile.imread(shared_data / "nuclei3d_labels.tif")
    labels.flags.writeable = False
    return labels


@pytest.fixture(scope="session")
def nuclei_label_slices(nuclei_labels) -> dict[str, np.ndarray]:
    """A few 2-D slices with many labelled nuclei, keyed by an image id."""
    counts = [(len(np.unique(s)) - 1, z) for z, s in enumerate(nuclei_labels)]
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
