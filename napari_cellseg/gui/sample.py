"""napari sample-data contributions (File > Open Sample > napari-cellseg).

Each sample opens the image plus its hand-checked / generated labels as a hidden
"<name> ground truth" layer, so a segmentation can be compared with it by toggling visibility.
"""

from __future__ import annotations


def _sample(name: str, description: str):
    from napari_cellseg.io.samples import load_sample

    image, labels = load_sample(name)
    return [
        (image, {"name": name, "metadata": {"description": description}}, "image"),
        (labels, {"name": f"{name} ground truth", "visible": False, "opacity": 0.5}, "labels"),
    ]


def nuclei_sample():
    """Real fluorescence nuclei (one 256x256 plane) with hand-checked labels."""
    return _sample("nuclei", "real fluorescence nuclei, 256x256 uint16")


def cells_sample():
    """Synthetic phase-contrast-like cells (520x704) with their generated labels."""
    return _sample("cells", "synthetic phase-contrast-like cells, 520x704")
