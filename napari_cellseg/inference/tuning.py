"""Choose BOXES_CONF and MASK_THRESHOLD from measured mAP, not by eye.

One forward pass per image gives cached :class:`~napari_cellseg.inference.predictor.Detections`; the whole
box_conf x mask_threshold grid is then scored without touching the network again. Shared work is
reused across the grid:

* for one mask threshold the label image at any box_conf is the label image at the lowest
  box_conf with the lower-scoring instances removed (each pixel belongs to the highest-scoring
  instance covering it, so removing lower-scoring ones never re-assigns a pixel);
* an instance's best IoU with the ground truth does not depend on which other instances are kept;

so each mask threshold costs one ``to_labels`` and one sparse IoU pass per image, and every box_conf
is a cumulative count over instances sorted by score. This is exact without post-processing;
with ``fill_holes`` the label image is post-processed once at the lowest box_conf, so a
lower-scoring cell that a higher box_conf drops is not refilled by a cell whose hole it sat in
(rare; tests bound the difference).

Used by the training engine (thresholds stored in the checkpoint), ``cellseg tune`` and the
napari Review widget. :func:`tune` is ``cellseg tune`` as a library function: ground truth and
images in, a :class:`TuneResult` out (the command only parses flags and prints it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from napari_cellseg.inference.metrics import THRESHOLDS, overlaps
from napari_cellseg.options import Thresholds

DEFAULT_BOX_CONFS = tuple(np.round(np.arange(0.05, 1.0, 0.1), 2))  # 0.05 .. 0.95, 10 values
DEFAULT_MASK_THRESHOLDS = tuple(np.round(np.arange(0.05, 1.0, 0.1), 2))


def grid_values(n: int) -> tuple[float, ...]:
    """(also used by the Review widget) ``n`` evenly spaced bin centres in (0, 1): n=10 gives 0.05, 0.15, ..., 0.95."""
    if not 1 <= int(n) <= 100:
        raise ValueError(f"--grid must be between 1 and 100, got {n}")
    return tuple(float(v) for v in np.round((np.arange(int(n)) + 0.5) / int(n), 4))


@dataclass
class SweepResult:
    """Mean mAP over images for every (box_conf, mask_threshold) pair."""

    box_confs: np.ndarray  # (B,)
    mask_thresholds: np.ndarray  # (M,)
    map: np.ndarray  # (B, M) mean over images
    n_images: int
    best: dict = field(default_factory=dict)  # {"box_conf", "mask_threshold", "map"}

    def table(self) -> list[dict]:
        return [{"box_conf": float(b), "mask_threshold": float(m), "map": float(self.map[i, j])}
                for i, b in enumerate(self.box_confs) for j, m in enumerate(self.mask_thresholds)]

    def to_dict(self) -> dict:
        return {**self.best, "n_images": self.n_images, "table": self.table()}


def _map_per_box_conf(best_iou: np.ndarray, pred_scores: np.ndarray, n_gt: int,
                      box_confs: np.ndarray) -> np.ndarray:
    """mAP at each box_conf, from each predicted instance's best IoU and its score."""
    order = np.argsort(-pred_scores, kind="stable")
    best_iou, pred_scores = best_iou[order], pred_scores[order]
    # hits[t, j]: instance j matches some GT instance at IoU threshold t
    hits = best_iou[None, :] > THRESHOLDS[:, None]
    cum_tp = np.concatenate([np.zeros((len(THRESHOLDS), 1), np.int64), np.cumsum(hits, axis=1)], axis=1)
    # number of predicted instances kept at each box_conf (scores sorted descending)
    n_kept = np.searchsorted(-pred_scores, -np.asarray(box_confs), side="right")
    tp = cum_tp[:, n_kept]  # (T, B)
    denom = n_gt + n_kept[None, :] - tp
    ap = np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)  # both empty -> 1.0
    return ap.mean(axis=0)


def sweep_image(detections, gt_labels: np.ndarray, box_confs: Sequence[float] = DEFAULT_BOX_CONFS,
                mask_thresholds: Sequence[float] = DEFAULT_MASK_THRESHOLDS,
                min_area: int | None = None, base: Thresholds | None = None) -> np.ndarray:
    """(B, M) competition mAP of one image for every grid point. ``base``: the thresholds
    whose min_area and post-processing apply at every grid point (``min_area`` overrides)."""
    base = Thresholds.from_dict(base).with_overrides(min_area=min_area)
    box_confs = np.asarray(box_confs, np.float64)
    gt_labels = np.asarray(gt_labels)
    if tuple(gt_labels.shape) != tuple(detections.image_shape):
        raise ValueError(f"ground truth is {gt_labels.shape[0]}x{gt_labels.shape[1]} but the image "
                         f"is {detections.image_shape[0]}x{detections.image_shape[1]}")
    lowest = float(box_confs.min())
    out = np.zeros((len(box_confs), len(mask_thresholds)))
    for j, m in enumerate(mask_thresholds):
        th = replace(base, box_conf=lowest, mask_threshold=float(m))
        labels, rows = detections.to_labels(th, return_rows=True)
        ov = overlaps(gt_labels, labels)  # sparse: overlapping pairs only
        gt_ids, pred_ids, best = ov.gt_ids, ov.pred_ids, ov.best_for_pred()
        scores = detections.scores[rows[pred_ids - 1]] if len(pred_ids) else np.zeros(0)
        out[:, j] = _map_per_box_conf(best, scores.astype(np.float64), len(gt_ids), box_confs)
    return out


def sweep(pairs: Iterable, box_confs: Sequence[float] = DEFAULT_BOX_CONFS,
          mask_thresholds: Sequence[float] = DEFAULT_MASK_THRESHOLDS, min_area: int | None = None,
          base: Thresholds | None = None) -> SweepResult:
    """Mean mAP over ``(detections, gt_labels)`` pairs; ``best`` is the table's argmax.
    ``base`` / ``min_area``: as for :func:`sweep_image`.

    Ties go to the pair closest to the starter's defaults (0.5, 0.5).
    """
    box_confs = np.asarray(box_confs, np.float64)
    mask_thresholds = np.asarray(mask_thresholds, np.float64)
    total = np.zeros((len(box_confs), len(mask_thresholds)))
    n = 0
    for dets, gt in pairs:
        total += sweep_image(dets, gt, box_confs, mask_thresholds, min_area, base)
        n += 1
    if n == 0:
        raise ValueError("no images with ground truth to tune on")
    mean = total / n
    dist = (box_confs[:, None] - 0.5) ** 2 + (mask_thresholds[None, :] - 0.5) ** 2
    cand = np.flatnonzero(np.isclose(mean, mean.max(), rtol=0, atol=1e-12))
    i, j = np.unravel_index(cand[np.argmin(dist.ravel()[cand])], mean.shape)
    best = {"box_conf": float(box_confs[i]), "mask_threshold": float(mask_thresholds[j]),
            "map": float(mean[i, j])}
    return SweepResult(box_confs, mask_thresholds, mean, n, best)


# ---- cellseg tune as a library function ---------------------------------------------------------
@dataclass
class TuneResult:
    """What :func:`tune` found: the sweep, the best pair (with the min_area it was scored at),
    the checkpoint tuned and whether the pair was stored in it."""

    sweep: SweepResult
    best: dict  # {"box_conf", "mask_threshold", "map", "min_area"}
    checkpoint: Path
    written: bool = False

    def to_dict(self) -> dict:
        return {**self.best, "n_images": self.sweep.n_images, "checkpoint": str(self.checkpoint),
                "box_confs": [float(b) for b in self.sweep.box_confs],
                "mask_thresholds": [float(m) for m in self.sweep.mask_thresholds],
                "table": self.sweep.table(), "written": bool(self.written)}


def check_values(values, name: str) -> tuple[float, ...]:
    """Grid values: each in [0, 1], none repeated; sorted. ValueError naming ``name``."""
    vals = tuple(float(v) for v in values)
    bad = [v for v in vals if not (np.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"{name}: values must be between 0 and 1, got {bad[0]}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{name}: repeated value")
    return tuple(sorted(vals))


def _is_bundled(path: Path) -> bool:
    from napari_cellseg.model.checkpoint import bundled_model_path

    bundled = bundled_model_path()
    try:
        return bundled.is_file() and Path(path).is_file() and os.path.samefile(path, bundled)
    except OSError:
        return False


def check_writable_checkpoint(path: Path) -> None:
    """CheckpointError unless ``path`` is a napari-cellseg checkpoint that may take thresholds
    (not the bundled demo model, not a bare state_dict)."""
    from napari_cellseg.model.checkpoint import CheckpointError, read_checkpoint

    if _is_bundled(path):  # shipped with the package: a write would replace the demo model for good
        raise CheckpointError(f"{path}: --write: the bundled demo model is read-only: copy it first "
                              f"(cp {path} my_model.bin) and pass --checkpoint my_model.bin; nothing written")
    obj = read_checkpoint(path)
    if not ("state_dict" in obj and "config" in obj):
        raise CheckpointError(f"{path}: --write needs a napari-cellseg checkpoint (a bare state_dict "
                              "has no place for thresholds); nothing written")


def write_thresholds(path, thresholds, info: dict | None = None) -> dict:
    """Store ``thresholds`` (a Thresholds or some of its fields) in a checkpoint, atomically;
    the checkpoint's other threshold fields are kept."""
    from napari_cellseg.io.atomic import atomic_torch_save
    from napari_cellseg.model.checkpoint import read_checkpoint

    path = Path(path)
    check_writable_checkpoint(path)
    obj = read_checkpoint(path)
    old = Thresholds.from_dict(obj.get("thresholds"), where=f"{path}: thresholds")
    obj["thresholds"] = Thresholds.from_dict({**old.to_dict(), **dict(thresholds)}).to_dict()
    if info:
        obj["info"] = {**(obj.get("info") or {}), "tuned": dict(info)}
    atomic_torch_save(obj, path)
    return obj["thresholds"]


@dataclass
class _TuneData:
    """Ground truth matched to images: ``sources[id] = (file, plane or None)``, ``shapes[id]``."""

    gt: object
    sources: dict
    shapes: dict


def _match_images(gt_path, images_dir, note: Callable[[str], None]) -> _TuneData:
    """Every ground-truth id -> its image (a file's id, or a plane of a stack named as cellseg
    predict names planes: files.resolve_ids), sizes checked on the headers; nothing predicted."""
    from napari_cellseg.io.annotations import NO_ROWS
    from napari_cellseg.io.files import (IdConflict, LabelFiles, check_label_not_image, files_by_id,
                                         image_shape, label_source, resolve_ids)

    gt = label_source(gt_path)
    if not gt.ids:
        raise ValueError(f"{gt_path} {NO_ROWS}: no ground truth to tune on")
    images = files_by_id([images_dir], "images")
    try:
        found, missing = resolve_ids(gt.ids, images)
    except IdConflict as exc:
        raise ValueError(f"{gt_path}: {exc}") from None
    data = _TuneData(gt, {}, {})
    for image_id, (path, plane, header) in found.items():
        if isinstance(gt, LabelFiles):  # --gt DIR = --images DIR: each image its own ground truth
            check_label_not_image(gt.files[image_id][0], path, image_id)
        data.sources[image_id] = (path, plane)
        size = image_shape(path) if plane is None else (header.height, header.width)  # a stack: ImageError
        known = gt.shape(image_id)
        if known is not None and tuple(known) != size:
            where = path if plane is None else f"plane {plane} of {path}"
            raise ValueError(f"{where}: image is {size[0]}x{size[1]} (HxW) but the ground "
                             f"truth for {image_id!r} is {known[0]}x{known[1]}")
        data.shapes[image_id] = size
    if not data.sources:
        sample = ", ".join(list(gt.ids)[:3])
        raise ValueError(f"no image in {images_dir} has a file stem matching a ground-truth id "
                         f"of {gt_path} (ids like {sample})")
    if missing:
        note(f"note: {len(missing)} of {len(gt.ids)} ground-truth image(s) have no image in "
             f"{images_dir} and are not used (e.g. {missing[0]!r})")
    return data


def _predict_pairs(pipeline, data: _TuneData, progress_factory=None) -> list:
    """One forward pass per image: ``(Detections, ground-truth labels)`` pairs."""
    from napari_cellseg.io.images import read_plane

    ids = list(data.sources)
    bar = progress_factory(total=len(ids), desc="tune: predict") if progress_factory else None
    pairs = []
    try:
        inputs = (path if plane is None else read_plane(path, plane)  # as stored: the pipeline's input rule
                  for path, plane in data.sources.values())
        for k, dets in pipeline.predict_many(inputs):
            image_id = ids[k]
            labels = data.gt.labels(image_id, data.shapes[image_id])
            if tuple(labels.shape) != tuple(dets.image_shape):
                raise ValueError(f"{image_id}: ground truth {labels.shape} and prediction "
                                 f"{dets.image_shape} differ in size")
            pairs.append((dets, labels))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return pairs


def tune(options, gt, images, box_confs=DEFAULT_BOX_CONFS, mask_thresholds=DEFAULT_MASK_THRESHOLDS,
         write: bool = False, progress_factory=None, note: Callable[[str], None] | None = None) -> TuneResult:
    """``cellseg tune``: predict every image of ``images`` (a folder; file stem = image id) that
    has ground truth in ``gt`` (a CSV or a label folder) once with ``options`` (PredictOptions),
    score the ``box_confs`` x ``mask_thresholds`` grid from the kept output, and (``write``)
    store the best pair in the checkpoint. Every input is checked before the (slow) prediction;
    nothing is written when anything fails. ``note(message)`` gets the one-line notes."""
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.model.checkpoint import resolve_checkpoint

    note = note or (lambda message: None)
    box_confs = check_values(box_confs, "--box-confs")
    mask_thresholds = check_values(mask_thresholds, "--mask-thresholds")
    ckpt = resolve_checkpoint(options.checkpoint)  # CheckpointError when the bundled model is missing
    if write:
        check_writable_checkpoint(ckpt)
    data = _match_images(gt, images, note)
    if options.checkpoint is None:
        note("no --checkpoint given, tuning the bundled demo model")
    pipeline = Pipeline.from_options(options)
    base = pipeline.thresholds  # the checkpoint's, with --min-area / post-processing overrides
    note(f"object size: {pipeline.describe()}")
    result = sweep(_predict_pairs(pipeline, data, progress_factory), box_confs, mask_thresholds, base=base)
    best = {**result.best, "min_area": base.min_area}
    if write:
        write_thresholds(ckpt, {k: best[k] for k in ("box_conf", "mask_threshold", "min_area")},
                         info={"map": best["map"], "n_images": result.n_images,
                               "gt": str(gt), "images": str(images)})
    return TuneResult(result, best, ckpt, written=write)
