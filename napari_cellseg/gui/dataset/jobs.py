"""Worker bodies and numpy helpers of the "Review dataset" dock (no Qt; run in napari thread
workers, or drained synchronously by tests).

* :func:`predict_job`: read one image of the queue, run the Segment widget's pipeline
  (``segment.jobs.segment_job``: the same options, model cache and channel rule), score its
  uncertainty (``inference.uncertainty.score``); returns a :class:`Prediction`;
* :func:`box_job` / :func:`click_job`: one cell from a user's box or click with the model's own
  heads (``inference.prompts``); :func:`add_cell` paints it as one undoable edit;
* :func:`finetune_job`: "Train on accepted" (``training.finetune``) on the accepted images;
* :func:`doubtful_cells`: the shown cells, most doubtful first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_cellseg.gui.segment.jobs import pipeline_for, predict_options, segment_job


@dataclass
class Prediction:
    """One image predicted for the queue (memory: the dock keeps the shown image + the next)."""

    image_id: str
    raw: np.ndarray  # the image as stored (shown in the viewer, fed to the box tool)
    detections: Any  # Detections (None: not predicted, masks from a CSV or a draft)
    thresholds: Any  # options.Thresholds the masks were drawn with
    uncertainty: float | None
    cells: int
    checkpoint: str


def read_image(path) -> np.ndarray:
    """The image as stored, 2-D grey or RGB(A); a stack is refused (ImageError naming the file)."""
    from napari_cellseg.io.images import ImageError, layout, read_raw

    raw = read_raw(path)
    planes = layout(raw.shape, str(path))[0]
    if planes > 1:
        raise ImageError(f"{path}: a stack of {planes} planes; the Review dataset dock shows 2-D "
                         "images (save the planes as separate files)")
    return raw.reshape(raw.shape[-3:] if raw.ndim > 3 else raw.shape)


def image_shape(raw: np.ndarray) -> tuple[int, int]:
    from napari_cellseg.io.images import layout

    _, h, w, _ = layout(raw.shape)
    return h, w


def predict_job(image_id: str, path, checkpoint: str, device: str, cache: dict, second: bool = True):
    """Worker body: read, predict (progress events), score. Returns a :class:`Prediction`.

    ``second``: score with a horizontally flipped second pass too (``uncertainty.second_pass``
    at the first pass's scale), as ``cellseg rank`` does by default, so the dock's uncertainties
    and a ranking.csv's are on one scale."""
    from napari_cellseg.inference.uncertainty import score, second_pass

    raw = read_image(path)
    options = predict_options(checkpoint, device)
    out, thresholds = yield from segment_job(options, {(): raw}, cache)
    dets = out[()]
    other = None
    if second:
        yield {"stage": "second pass", "fraction": 0.5}
        other = second_pass(pipeline_for(options, cache), raw, scale=dets.scale)
    unc = score(dets, thresholds, second=other)
    return Prediction(image_id, raw, dets, thresholds, float(unc.image), int(len(unc.cells)),
                      str(checkpoint))


def doubtful_cells(prediction: Prediction | None, labels: np.ndarray) -> list[tuple[int, float]]:
    """``[(label id, uncertainty)]`` of the cells in ``labels``, most doubtful first (ids with
    no model output behind them last). Empty when the image has no model output."""
    from napari_cellseg.inference.uncertainty import score

    if prediction is None or prediction.detections is None or not np.any(labels):
        return []
    unc = score(prediction.detections, prediction.thresholds, labels=np.asarray(labels))
    present = set(np.unique(labels[labels > 0]).tolist())
    order = [int(i) for i in unc.doubtful_order() if int(i) in present]
    return [(i, float(unc.cells[i - 1])) for i in order]


def centre_of(labels: np.ndarray, label: int) -> tuple[float, float]:
    ys, xs = np.nonzero(np.asarray(labels) == label)
    return float(ys.mean()), float(xs.mean())


def typical_diameter(labels: np.ndarray, default: float = 30.0) -> float:
    """The median equivalent diameter of the shown cells (the click fallback's box side)."""
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    if not areas.size:
        return default
    return float(max(4.0, 2.0 * math.sqrt(float(np.median(areas)) / math.pi)))


def _pipeline(checkpoint, device, cache):
    return pipeline_for(predict_options(checkpoint, device), cache)


def box_job(raw, box, checkpoint, device, cache):
    """Worker body of the Box tool: the mask head on the user's box (y0, x0, y1, x1)."""
    from napari_cellseg.inference.prompts import segment_box

    yield {"stage": "segmenting the box", "fraction": 0.0}
    return segment_box(_pipeline(checkpoint, device, cache), raw, box), "box"


def click_job(prediction: Prediction | None, raw, labels, yx, checkpoint, device, cache):
    """Worker body of the Click tool: the best candidate below the threshold covering the click
    (``promote_click``); without one, the box path around the click. Returns (mask, how)."""
    from napari_cellseg.inference.prompts import box_around, promote_click, segment_box

    yield {"stage": "looking for a candidate", "fraction": 0.0}
    if prediction is not None and prediction.detections is not None:
        mask = promote_click(prediction.detections, prediction.thresholds, yx, labels=labels)
        if mask is not None:
            return mask, "candidate"
    box = box_around(yx, typical_diameter(labels), image_shape(raw))
    return segment_box(_pipeline(checkpoint, device, cache), raw, box), "box"


def add_cell(layer, mask) -> int:
    """Paint ``mask`` as a new cell (one undoable edit through ``Labels.data_setitem``) on the
    pixels no other cell has. Returns the new id; EditError when nothing is free."""
    from napari_cellseg.gui.segment.edit import EditError, next_free_id

    data = np.asarray(layer.data)
    mask = np.asarray(mask, bool)
    if mask.shape != data.shape:
        raise EditError(f"the new cell is {mask.shape}, the cells layer {data.shape}")
    idx = np.nonzero(mask & (data == 0))
    if idx[0].size == 0:
        raise EditError("no new cell there: the model found nothing, or only pixels of other cells")
    new = next_free_id(data)
    layer.data_setitem(idx, new)
    layer.selected_label = new
    return new


def finetune_job(images: list, labels: list, ids: list, checkpoint: str, out_root: Path,
                 minutes: float | None, device: str):
    """Worker body of "Train on accepted": ``training.finetune`` into a new folder under
    ``out_root`` (never over an earlier model). Yields progress dicts, returns its result."""
    from training.finetune import finetune

    out = Path(out_root) / time.strftime("finetune-%Y%m%d-%H%M%S")
    n = 1
    while out.exists():
        n += 1
        out = out.with_name(f"{out.name.split('_')[0]}_{n}")
    out.mkdir(parents=True)
    yield {"stage": "setup", "message": f"fine-tuning on {len(images)} accepted image(s) into {out}"}
    import torch

    # grad on, whatever the pooled worker thread was left in: a prediction worker quit while
    # suspended inside the runner's ``torch.inference_mode()`` leaves its thread in inference
    # mode, and the next job on that thread would train without gradients
    with torch.inference_mode(False), torch.enable_grad():
        return (yield from finetune(images, labels, checkpoint, out, minutes=minutes, device=device,
                                    ids=ids))
