"""Worker bodies of the Segment widget (run in napari thread workers; no Qt here).

* :func:`load_torch_job` imports torch and the predictor off the GUI thread and reads the chosen
  checkpoint's thresholds (without building the model), so the sliders show them before any run;
* :func:`predict_options` turns the form into ``options.PredictOptions``;
* :func:`segment_job` loads (or reuses) the model and runs ``pipeline.Pipeline`` plane by plane;
* :func:`calibrate_job` measures the cells' diameter (the pipeline's "auto" size estimate).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def checkpoint_settings(checkpoint):
    """The thresholds and the image input (channels, invert, intensity: ``info.train_config``)
    stored in a checkpoint, defaults filled in, without building the model.

    Raises CheckpointError / OptionError naming the file."""
    from napari_cellseg.model.checkpoint import read_checkpoint, stored_train_config
    from napari_cellseg.options import ImageInput, Thresholds

    obj = read_checkpoint(checkpoint)
    stored = obj.get("thresholds") if "state_dict" in obj else None
    return (Thresholds.from_dict(stored, where=f"{checkpoint}: thresholds"),
            ImageInput.from_dict(stored_train_config(obj.get("info")),
                                 where=f"{checkpoint}: info.train_config"))


def load_torch_job(checkpoint=None):
    """Import torch + the predictor (slow the first time), then the checkpoint's settings.

    Returns ``(options.Thresholds or None, options.ImageInput or None, error message or None)``.
    ``_torch_guard.block_triton`` must have run in the GUI thread first."""
    from napari_cellseg.gui.torch_guard import import_torch

    import_torch()
    from napari_cellseg.inference import predictor as predict  # noqa: F401  (torchvision, timm: the slow part)
    # what napari imports when the first Labels layer is added (the first result): imported here,
    # off the GUI thread, they do not freeze napari then (271 -> 133 ms at 3000x3000)
    import pandas  # noqa: F401
    import scipy.linalg  # noqa: F401
    import skimage.color  # noqa: F401

    if not checkpoint:
        return None, None, None
    try:
        return (*checkpoint_settings(checkpoint), None)
    except ValueError as exc:  # CheckpointError / OptionError: one line naming the file
        return None, None, str(exc)


from napari_cellseg.progress import relay_map as relay  # noqa: E402  (the one relay loop: progress.py)


INPUT_KEYS = ("intensity", "channel", "channel2", "invert")


def predict_options(checkpoint, device, diameter=None, thresholds=None, image_input=None):
    """The Segment form -> ``options.PredictOptions`` (the one option type the CLI, tune, the
    widgets and training validation all build). ``diameter``: px, "auto" or None (the model's
    own size); ``thresholds``: the sliders' ``options.Thresholds`` (every field overrides the
    checkpoint's); ``image_input``: the channel picker (channel, channel2, invert: as --channel /
    --channel2 / --invert). Raises OptionError."""
    from dataclasses import fields

    from napari_cellseg.options import PredictOptions

    overrides = {f.name: getattr(thresholds, f.name) for f in fields(thresholds)} if thresholds else {}
    i = dict(image_input or {})
    return PredictOptions(checkpoint=str(checkpoint), device=str(device), diameter=diameter,
                          **overrides, **{k: i[k] for k in INPUT_KEYS if k in i})


def _runner(options, cache):
    """The network runner of ``options`` (checkpoint, device, precision), cached across runs."""
    from napari_cellseg.inference.runner import Runner

    path = Path(options.checkpoint)
    key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else 0, options.device,
           options.precision)
    runner = cache.get(key)
    if runner is None:
        runner = Runner.from_checkpoint(path, device=options.device, precision=options.precision)
        cache.clear()  # one model in memory at a time
        cache[key] = runner
    return runner


def _pipeline(options, cache):
    from napari_cellseg.inference.pipeline import Pipeline

    return Pipeline(_runner(options, cache), options)


def pipeline_for(options, cache):
    """The ``Pipeline`` of ``options`` over the cached model (the Review dataset dock's box and
    click tools use the model its predictions came from)."""
    return _pipeline(options, cache)


def segment_job(options, planes: dict, cache):
    """Worker body: load (or reuse) the model, run ``pipeline.Pipeline(runner, options)`` once
    per plane, return ``({plane prefix: Detections}, options.Thresholds)``. ``options``: the
    PredictOptions of the form (:func:`predict_options`): device, size (diameter / "auto" /
    the model's own), thresholds, tiling; the returned thresholds are the pipeline's (the
    checkpoint's with the form's overrides).

    ``planes`` maps a plane prefix (``()`` for a 2D image) to its 2D array; a plane is read only
    when its turn comes, so a lazy (dask/zarr) stack is never loaded whole. Each plane is given
    as stored (HxW or HxWxC): the pipeline picks its channels and scales its intensities by the
    options' channel / channel2 / invert (io.images' one rule). Progress events carry the overall
    fraction and "plane i/n"; the worker can be cancelled between any two events.
    """
    yield {"stage": "loading model", "fraction": 0.0}
    pipeline = _pipeline(options, cache)
    out, n = {}, len(planes)
    for i, (prefix, array) in enumerate(planes.items()):
        where = f"plane {i + 1}/{n}: " if n > 1 else ""
        gen = pipeline.iter_predict(np.asarray(array))
        out[prefix] = yield from relay(gen, lambda e, i=i, where=where: {
            **e, "stage": where + str(e.get("stage", "")), "fraction": (i + float(e.get("fraction", 0.0))) / n})
    yield {"stage": "masks", "fraction": 1.0}
    for dets in out.values():  # paste the masks here, off the GUI thread: the first slider
        dets.prepare(pipeline.thresholds)  # move then costs what every other move costs
    return out, pipeline.thresholds


def calibrate_job(options, image, cache):
    """Worker body of "Calibrate": the median cell diameter (image px) from the pipeline's
    automatic size estimate (``options`` with ``diameter="auto"``), and the resize factor that
    diameter gives (the same rule as typing it into the diameter box). Returns
    ``(diameter or None, scale or None, cells found)``."""
    from dataclasses import replace

    from napari_cellseg.inference.sizing import scale_for_diameter

    yield {"stage": "loading model", "fraction": 0.0}
    pipeline = _pipeline(replace(options, diameter="auto", scale=None), cache)
    gen = pipeline.iter_predict(np.asarray(image))
    dets = yield from relay(gen, lambda e: {**e, "stage": "measuring: " + str(e.get("stage", ""))})
    diameter = getattr(dets, "diameter", None)
    if not diameter:
        return None, None, 0
    diameter = float(round(diameter))
    n = int(pipeline.labels(dets).max())
    return diameter, float(scale_for_diameter(pipeline.runner, diameter)), n
