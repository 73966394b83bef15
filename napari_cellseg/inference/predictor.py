"""The documented scripting entry point: ``Predictor`` (and ``Detections``, what it returns).

``Predictor`` is the :class:`~napari_cellseg.inference.pipeline.Pipeline` (size, tiling, batching,
thresholds: the same code ``cellseg predict`` and the napari widgets run) with two constructors:

* ``Predictor.from_checkpoint(path, device="auto", precision="fp32")`` (``path=None``: the
  bundled demo model), and
* ``Predictor.from_model(model, config)`` for a model already in memory;

then ``.predict(image)`` (a path or an array) -> :class:`Detections`, and
``Detections.to_labels(predictor.thresholds)`` (or ``to_labels(box_conf=, mask_threshold=, ...)``).
The object size is the model's default (``"auto"`` for models trained with ``--diameter``, else
1), as in ``cellseg predict``; ``options=PredictOptions(...)`` or ``predict(image, scale=...)``
choose another. The network runner is ``predictor.runner``.
"""

from __future__ import annotations

from dataclasses import replace

from napari_cellseg.inference.detections import Detections
from napari_cellseg.inference.pipeline import Pipeline
from napari_cellseg.inference.runner import PredictError, Runner
from napari_cellseg.options import PredictOptions
from napari_cellseg.progress import drain

__all__ = ["Predictor", "Detections", "PredictError", "drain"]


class Predictor(Pipeline):
    """A :class:`Pipeline` built from a checkpoint or a model (see the module docstring)."""

    @classmethod
    def from_checkpoint(cls, path=None, device: str = "auto", precision: str = "fp32",
                        options: PredictOptions | None = None) -> "Predictor":
        """Load ``path`` (None = the bundled demo model) on ``device`` at ``precision``; the
        other ``options`` (size, tiles, threshold overrides) as in ``cellseg predict``.
        Raises CheckpointError / PredictError / DeviceError / OptionError."""
        options = replace(options or PredictOptions(), checkpoint=None if path is None else str(path),
                          device=str(device), precision=precision)
        return cls.from_options(options)

    @classmethod
    def from_model(cls, model, config=None, thresholds=None, device: str = "cpu", precision: str = "fp32",
                   options: PredictOptions | None = None) -> "Predictor":
        """A model built by ``build_model(config)`` (``thresholds``: its Thresholds, default
        the standard ones)."""
        return cls(Runner(model, config, thresholds, device=device, precision=precision), options)
