"""The one inference pipeline: images in, Detections out, driven by PredictOptions.

Above the network runner (:class:`napari_cellseg.inference.runner.Runner`: arrays at factors in,
Detections out) and below every user of prediction (``cellseg predict`` / ``tune``, the napari
widgets, training validation). It owns, each written once:

* the object size: an explicit scale, a diameter, or ``"auto"`` (measure the cells in a first
  pass with the model's own thresholds, never the user's, predict again at ``reference /
  diameter``; rules in :mod:`napari_cellseg.inference.sizing`);
* the image input: paths and arrays become the model's input by ``io.images``' one rule, with
  the checkpoint's ``ImageInput`` (intensity, channels, invert; :func:`checkpoint_input`) as the
  default and the options' overrides;
* tiling: images larger than ``tile_size`` network px run in overlapping tiles, stitched into one
  Detections (geometry in :mod:`napari_cellseg.inference.tiling`);
* batching across images: up to ``batch_size`` images per forward, each at its own factor; with
  ``"auto"`` size every pass is batched over the images still measuring;
* progress: generators yield ``{"stage", "fraction"}`` and return their result
  (:func:`napari_cellseg.progress.relay` maps a sub-job's events into the caller's range).

Nothing below this module imports it. ``napari_cellseg.inference.predictor.Predictor`` (the documented
entry point, above this module) is this class with a ``from_checkpoint`` / ``from_model`` constructor.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from napari_cellseg.inference.detections import Detections
from napari_cellseg.inference.metrics import median_diameter
from napari_cellseg.inference.runner import Runner
from napari_cellseg.options import ImageInput, OptionError, PredictOptions, Thresholds, tile_settings
from napari_cellseg.progress import drain, relay
from napari_cellseg.inference.sizing import (AUTO_PASSES, check_scale, describe_scale, next_auto_scale, resolve_scale, size_message, size_thresholds)
from napari_cellseg.inference.tiling import (TILE_OVERLAP, TILE_SIZE, core_keep, image_tiles, merge_detections, needs_tiling)

__all__ = ["Pipeline", "as_image", "checkpoint_input", "iter_tiled", "iter_at", "iter_auto_scale", "iter_sized",
           "iter_batches"]


def as_image(image, rule: ImageInput | None = None) -> np.ndarray:
    """A path or an array -> the model's float32 HxWx3 (images.py's rule; ``rule`` = the
    intensity / channel / invert choice, None = the defaults)."""
    from napari_cellseg.io import images

    if isinstance(image, np.ndarray):
        return images.to_rgb_float(image, rule=rule)
    return images.load_image(image, rule=rule)


def checkpoint_input(runner) -> ImageInput:
    """The ImageInput a model was trained with (its checkpoint's ``info.train_config``: intensity,
    channel, channel2, invert), validated; the defaults for a model that stores none. A bad
    stored value raises PredictError naming the checkpoint."""
    from napari_cellseg.inference.runner import PredictError
    from napari_cellseg.model.checkpoint import stored_train_config

    where = f"{getattr(runner, 'checkpoint_path', None) or 'checkpoint'}: info.train_config"
    try:
        return ImageInput.from_dict(stored_train_config(getattr(runner, "info", None)), where=where)
    except OptionError as exc:
        raise PredictError(str(exc)) from None


def iter_tiled(runner, array: np.ndarray, factor: float, tile: int = TILE_SIZE,
               overlap: int = TILE_OVERLAP, nms_iou: float | None = None):
    """Generator: per-tile progress events; returns the stitched Detections.

    ``array``: the whole normalised float32 HxWx3 image; ``factor``: the network resize factor
    of the whole image (every tile uses it, so tiled and whole predictions see the same pixels);
    ``tile`` / ``overlap`` in network pixels. ``nms_iou`` defaults to the model's ``nms_thresh``.
    """
    shape = array.shape[:2]
    grid = image_tiles(shape, factor, tile, overlap)
    if nms_iou is None:
        nms_iou = float(getattr(getattr(runner.model, "roi_heads", None), "nms_thresh", 0.5))
    parts = []
    for k, t in enumerate(grid):
        window = np.ascontiguousarray(array[t.y0:t.y1, t.x0:t.x1])
        offset = np.array([t.x0, t.y0, t.x0, t.y0], np.float32)
        gen = runner.iter_forward([window], factor,
                                  box_filter=lambda b, t=t, o=offset: core_keep(b + o, t, shape))
        dets = (yield from relay(gen, f"tile {k + 1}/{len(grid)}: ", k / len(grid), 1 / len(grid)))[0]
        parts.append(Detections(dets.boxes + offset, dets.scores, dets.probs, shape, labels=dets.labels))
        del gen, dets, window
    yield {"stage": "stitch", "fraction": 1.0}
    return merge_detections(parts, shape, nms_iou if len(grid) > 1 else None)


def iter_at(runner, arrays: list, scales: list, tile_size: int | None = TILE_SIZE,
            tile_overlap: int = TILE_OVERLAP):
    """Generator: every array at its own scale (times the model's own factor); the ones larger
    than ``tile_size`` network px tiled one by one, the rest in ONE batched forward. Returns the
    Detections in input order, each with ``.scale`` set."""
    out: list = [None] * len(arrays)
    factors = [runner.base_factor(a.shape) * float(s) for a, s in zip(arrays, scales)]
    big = [i for i, a in enumerate(arrays) if tile_size and needs_tiling(a.shape, factors[i], tile_size)]
    small = [i for i in range(len(arrays)) if i not in big]
    n_jobs = len(big) + (1 if small else 0)
    for k, i in enumerate(big):
        out[i] = yield from relay(iter_tiled(runner, arrays[i], factors[i], int(tile_size), int(tile_overlap)),
                                  "", k / n_jobs, 1 / n_jobs)
    if small:
        dets = yield from relay(runner.iter_forward([arrays[i] for i in small], [factors[i] for i in small]),
                                "", len(big) / n_jobs, 1 / n_jobs)
        for i, d in zip(small, dets):
            out[i] = d
    for d, s in zip(out, scales):
        d.scale = float(s)
    return out


class _AutoSize:
    """The auto-size state of one image: the scale of its next pass, or its result."""

    def __init__(self, reference: float, thresholds: Thresholds):
        self.reference, self.thresholds = reference, thresholds
        self.scale, self.first, self.found, self.result = 1.0, None, None, None
        self.tried: set = set()

    def update(self, dets: Detections) -> bool:
        """Take the pass at ``self.scale``; True when this image is done."""
        self.tried.add(round(self.scale, 3))
        self.first = dets if self.first is None else self.first  # (Detections is falsy when empty)
        dets.scale = self.scale
        diameter = median_diameter(dets.to_labels(self.thresholds))
        if not diameter:  # nothing found: retry at 2.5x (small objects), then 0.4x (large)
            nxt = None if self.found is not None else {1.0: 2.5, 2.5: 0.4}.get(self.scale)
            if nxt is None or len(self.tried) >= AUTO_PASSES:
                self.result = self.found if self.found is not None else self.first
                return True
            self.scale = nxt
            return False
        dets.diameter = self.reference / self.scale  # the size the used factor stands for
        self.found = dets
        nxt = next_auto_scale(self.reference, self.scale, diameter, self.tried)
        if nxt is None or len(self.tried) >= AUTO_PASSES:
            self.result = dets
            return True
        self.scale = nxt
        return False


FIRST_PASS_SHARE = 0.8  # of the progress bar: the first size pass is often the only one


def _pass_range(k: int) -> tuple[float, float]:
    """(start, span) of auto-size pass ``k`` (from 0) on the progress bar: the first pass, often
    the only one, gets FIRST_PASS_SHARE; each later pass half of what is left below 0.99. So the
    bar moves with every tile and the end jumps at most 1 - FIRST_PASS_SHARE."""
    if k == 0:
        return 0.0, FIRST_PASS_SHARE
    left = (0.99 - FIRST_PASS_SHARE) * 0.5 ** (k - 1)
    return 0.99 - left, left / 2


def iter_auto_scale(runner, arrays: list, *, tile_size: int | None = TILE_SIZE,
                    tile_overlap: int = TILE_OVERLAP):
    """scale="auto" for a batch of images: predict at 1, measure the median diameter of the
    masks kept by the model's own thresholds (``sizing.size_thresholds``: never the user's, so
    the size, and so the result, of a run never depends on the thresholds it is shown at),
    predict again at ``reference / diameter`` until the factor settles (within
    20 %, at most AUTO_PASSES passes). An image where nothing is found is retried at 2.5x and
    then 0.4x. Each pass runs the images still measuring together (grouped by factor).
    Returns one Detections per image (``.scale`` = the factor used, ``.diameter`` = the size it
    stands for; None when nothing was found)."""
    th = size_thresholds(runner)
    states = [_AutoSize(runner.reference_diameter, th) for _ in arrays]
    for k in range(AUTO_PASSES):
        active = [i for i, s in enumerate(states) if s.result is None]
        if not active:
            break
        groups: dict = {}
        for i in active:
            groups.setdefault(round(states[i].scale, 6), []).append(i)
        for g, (scale, idx) in enumerate(groups.items()):
            where = f"size pass {k + 1} (x{scale:.2f}): "
            start, span = _pass_range(k)
            dets = yield from relay(iter_at(runner, [arrays[i] for i in idx], [scale] * len(idx),
                                            tile_size, tile_overlap),
                                    where, start + span * g / len(groups), span / len(groups), cap=0.99)
            for i, d in zip(idx, dets):
                states[i].update(d)
    for s in states:
        if s.result is None:  # out of passes
            s.result = s.found if s.found is not None else s.first
    return [s.result for s in states]


def iter_sized(runner, arrays: list, scale: float | str, *, tile_size: int | None = TILE_SIZE,
               tile_overlap: int = TILE_OVERLAP):
    """Generator: the arrays at ``scale``: "auto" (:func:`iter_auto_scale`, which measures with
    the model's own thresholds) or one factor for all (:func:`iter_at`). Returns one Detections
    per array. The one place that tells the two apart (Pipeline, iter_batches and cellseg predict
    call it)."""
    check_scale(scale)
    if isinstance(scale, str):  # "auto" (check_scale refused any other string)
        return (yield from iter_auto_scale(runner, arrays, tile_size=tile_size, tile_overlap=tile_overlap))
    return (yield from iter_at(runner, arrays, [float(scale)] * len(arrays), tile_size, tile_overlap))


def iter_batches(runner, arrays: Iterable[np.ndarray], scale: float | str = 1.0, batch_size: int = 1,
                 tile_size: int | None = TILE_SIZE,
                 tile_overlap: int = TILE_OVERLAP) -> Iterator[tuple[int, Detections]]:
    """Yield ``(index, Detections)`` for every array, up to ``batch_size`` images of one size per
    forward (consecutive images of another size start a new batch)."""
    check_scale(scale)
    batch: list = []

    def run(batch):
        idx, arrs = zip(*batch)
        return zip(idx, drain(iter_sized(runner, list(arrs), scale, tile_size=tile_size, tile_overlap=tile_overlap)))

    for i, arr in enumerate(arrays):
        if batch and batch[-1][1].shape[:2] != arr.shape[:2]:  # one size per forward: a smaller
            yield from run(batch)  # image padded beside a larger one gets other detections
            batch = []
        batch.append((i, arr))
        if len(batch) >= max(int(batch_size), 1):
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


class Pipeline:
    """A runner + the options of one job: what the CLI, the widgets, tune and training
    validation use. ``options.thresholds`` override the checkpoint's (``self.thresholds``)."""

    def __init__(self, runner, options: PredictOptions | None = None):
        self.runner = runner
        self.options = options = options or PredictOptions()
        self.thresholds: Thresholds = options.thresholds(runner.thresholds)
        self.tile_size, self.tile_overlap = tile_settings(options.tile_size, options.tile_overlap)
        self.scale = resolve_scale(runner, options.scale, options.diameter)
        self.batch_size = options.batch_size
        self.input: ImageInput = options.image_input(checkpoint_input(runner))

    @classmethod
    def from_options(cls, options: PredictOptions) -> "Pipeline":
        """Load the checkpoint named by the options (None = the bundled demo model)."""
        runner = Runner.from_checkpoint(options.checkpoint, device=options.device,
                                        precision=options.precision)
        return cls(runner, options)

    def describe(self) -> str:
        """One line: which object size the images are predicted at."""
        return describe_scale(self.runner, self.scale)

    def size_message(self, detections, unit: str = "images") -> str:
        """After a run: the size estimated / the factor used (one image, or a range over many)."""
        return size_message(detections, self.runner.reference_diameter, unit)

    def _tile(self, tile):
        return self.tile_size if isinstance(tile, str) and tile == "auto" else (int(tile) if tile else 0)

    def as_image(self, image) -> np.ndarray:
        """A path or an array (one plane, as stored) -> the model's input by ``self.input``."""
        return as_image(image, self.input)

    def iter_predict(self, image, scale: float | str | None = None, tile="auto"):
        """Generator: progress events, returns the Detections of one image (path or array, as
        stored: ``self.input`` picks its channels and scales its intensities)."""
        yield {"stage": "load", "fraction": 0.0}
        arr = self.as_image(image)
        scale = self.scale if scale is None else scale
        return (yield from iter_sized(self.runner, [arr], scale, tile_size=self._tile(tile),
                                      tile_overlap=self.tile_overlap))[0]

    def predict(self, image, scale: float | str | None = None, tile="auto") -> Detections:
        return drain(self.iter_predict(image, scale, tile))

    def predict_many(self, images: Iterable, batch_size: int | None = None,
                     scale: float | str | None = None) -> Iterator[tuple[int, Detections]]:
        """``(index, Detections)`` for every image (paths or arrays), batched."""
        return iter_batches(self.runner, (self.as_image(i) for i in images),
                            self.scale if scale is None else scale,
                            self.batch_size if batch_size is None else batch_size,
                            self.tile_size, self.tile_overlap)

    def labels(self, detections: Detections) -> np.ndarray:
        return detections.to_labels(self.thresholds)
