"""napari-cellseg: Mask R-CNN cell instance segmentation for napari.

Importing this package must stay cheap: napari scans plugins at start-up, so nothing here
imports torch, qtpy or napari. The public API below is imported on first use (module
``__getattr__``), so ``from napari_cellseg import Predictor`` works while ``import napari_cellseg``
stays torch-free. Internal modules may move; these names stay (docs/API.md).
"""

__version__ = "0.1.0"

_PUBLIC = {
    "Predictor": "napari_cellseg.inference.predictor",
    "Detections": "napari_cellseg.inference.detections",
    "Thresholds": "napari_cellseg.options",
    "PredictOptions": "napari_cellseg.options",
    "ModelConfig": "napari_cellseg.model.maskrcnn",
    "build_model": "napari_cellseg.model.maskrcnn",
    "save_checkpoint": "napari_cellseg.model.checkpoint",
    "load_checkpoint": "napari_cellseg.model.checkpoint",
    "rle_encode": "napari_cellseg.io.rle",
    "rle_decode": "napari_cellseg.io.rle",
    "labels_to_rles": "napari_cellseg.io.rle",
    "rles_to_labels": "napari_cellseg.io.rle",
    "average_precision": "napari_cellseg.inference.metrics",
    "read_annotations": "napari_cellseg.io.annotations",
    "write_annotations": "napari_cellseg.io.annotations",
    "load_image": "napari_cellseg.io.images",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_cellseg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # next access skips __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
