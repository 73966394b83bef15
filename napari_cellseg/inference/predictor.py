"""The documented prediction entry point: ``Predictor`` and ``Detections``.

Layers (each imports only the ones below it; docs/ARCHITECTURE.md):

* :mod:`napari_cellseg.inference.detections` - ``Detections`` and ``to_labels`` (Thresholds, post-processing);
* :mod:`napari_cellseg.inference.runner` - ``Runner``, the network runner: arrays at factors -> Detections;
* :mod:`napari_cellseg.inference.pipeline` - size (auto / diameter), tiling, batching across images, progress;
* this module - ``Predictor``: a ``Runner`` that also answers the pipeline questions old scripts
  and the widgets ask it (``predict(image)``, ``iter_predict``, ``predict_many``,
  ``resolve_scale``), by handing them to a :class:`~napari_cellseg.inference.pipeline.Pipeline`. It sits
  ABOVE the pipeline, so nothing calls up. New code: ``Pipeline(runner, PredictOptions(...))``.

Stable API: ``Predictor.from_checkpoint(path, device, precision)``, ``.predict(image)``,
``Detections.to_labels(box_conf=, mask_threshold=, min_area=)`` or ``to_labels(Thresholds)``.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Iterator

from napari_cellseg.inference.detections import Detections
from napari_cellseg.inference.runner import (DEFAULT_DIAMETER, MASK_CHUNK, PRECISIONS, PredictError, Runner, cpu_has_bf16, resized_size)
from napari_cellseg.options import PredictOptions
from napari_cellseg.inference.pipeline import Pipeline, as_image
from napari_cellseg.progress import drain

__all__ = ["Predictor", "Detections", "PredictError", "drain", "cpu_has_bf16", "PRECISIONS",
           "MASK_CHUNK", "DEFAULT_DIAMETER", "resized_size", "as_image"]


class Predictor(Runner):
    """A :class:`~napari_cellseg.inference.runner.Runner` with the pipeline conveniences.

    ``tile_size`` / ``tile_overlap``: network px (None = the pipeline defaults 1024 / 128)."""

    def __init__(self, model, config=None, thresholds=None, device="cpu", precision: str = "fp32",
                 mask_chunk: int = MASK_CHUNK, tile_size: int | None = None,
                 tile_overlap: int | None = None):
        super().__init__(model, config, thresholds, device=device, precision=precision,
                         mask_chunk=mask_chunk)
        from napari_cellseg.inference.tiling import TILE_OVERLAP, TILE_SIZE

        self.tile_size = TILE_SIZE if tile_size is None else int(tile_size)
        self.tile_overlap = TILE_OVERLAP if tile_overlap is None else int(tile_overlap)
        if self.tile_size and not 0 <= self.tile_overlap < self.tile_size:
            raise PredictError(f"tile overlap must be >= 0 and < tile size {self.tile_size}, "
                               f"got {self.tile_overlap}")

    def pipeline(self, batch_size: int = 1) -> Pipeline:
        """A Pipeline over this runner with its tile settings (the size is given per call)."""
        pipe = Pipeline(self, PredictOptions(scale=1.0, batch_size=batch_size))
        pipe.tile_size, pipe.tile_overlap = self.tile_size, self.tile_overlap
        return pipe

    # -- stable entry points --------------------------------------------------------------------
    def predict(self, image, scale: float | str = 1.0, tile="auto") -> Detections:
        """One image (path or array) -> Detections. ``scale``: a factor or "auto";
        ``tile``: "auto" (tiles above ``tile_size``), an int, or None/0 (never)."""
        return drain(self.iter_predict(image, scale, tile=tile))

    def iter_predict(self, image, scale: float | str = 1.0, tile="auto"):
        """Generator form of :meth:`predict` (progress events; returns Detections).
        Prefer ``Pipeline.iter_predict``."""
        return (yield from self.pipeline().iter_predict(image, scale, tile))

    def predict_many(self, images: Iterable, batch_size: int = 1, scale: float | str = 1.0
                     ) -> Iterator[tuple[int, Detections]]:
        """Deprecated: ``Pipeline.predict_many``. Yields ``(index, Detections)``."""
        warnings.warn("Predictor.predict_many is deprecated; use napari_cellseg.inference.pipeline.Pipeline",
                      DeprecationWarning, stacklevel=2)
        return self.pipeline().predict_many(images, batch_size=batch_size, scale=scale)

    def resolve_scale(self, scale: float | None = None, diameter: float | str | None = None):
        """The CLI's and widget's size options -> a scale (see sizing.resolve_scale)."""
        from napari_cellseg.inference.sizing import resolve_scale

        return resolve_scale(self, scale, diameter)

    def scale_for_diameter(self, diameter: float) -> float:
        from napari_cellseg.inference.sizing import scale_for_diameter

        return scale_for_diameter(self, diameter)
