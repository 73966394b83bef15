"""``cellseg tune``: pick box_conf / mask_threshold from measured mAP against ground truth.

Each image goes through the network once (the pipeline, built from ``PredictOptions`` like
``cellseg predict``'s); the whole grid is then
scored from the kept Detections by :func:`napari_cellseg.inference.tuning.sweep` (the same code the
training engine and the napari Review widget use). ``--write`` stores the best pair into the
checkpoint atomically. Every input is checked before the (slow) prediction starts, and nothing is
written when anything fails.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from napari_cellseg.inference.tuning import grid_values

__all__ = ["grid_values", "run_tune", "format_table", "write_thresholds"]


def _check_values(values, flag: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    bad = [v for v in vals if not (np.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"{flag}: values must be between 0 and 1, got {bad[0]}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{flag}: repeated value")
    return tuple(sorted(vals))


def format_table(result) -> str:
    """The mAP table as a B x M grid (rows: box_conf, columns: mask_threshold), best marked *."""
    head = "box_conf \\ mask_thr " + " ".join(f"{m:>7.3g}" for m in result.mask_thresholds)
    lines = [head]
    bi = int(np.flatnonzero(result.box_confs == result.best["box_conf"])[0])
    bj = int(np.flatnonzero(result.mask_thresholds == result.best["mask_threshold"])[0])
    for i, b in enumerate(result.box_confs):
        cells = [f"{result.map[i, j]:.4f}" + ("*" if (i, j) == (bi, bj) else " ")
                 for j in range(len(result.mask_thresholds))]
        lines.append(f"{b:>19.3g} " + " ".join(f"{c:>7}" for c in cells))
    return "\n".join(lines)


def _is_bundled(path: Path) -> bool:
    from napari_cellseg.model.checkpoint import bundled_model_path

    bundled = bundled_model_path()
    try:
        return bundled.is_file() and Path(path).is_file() and os.path.samefile(path, bundled)
    except OSError:
        return False


def _check_writable_checkpoint(path: Path) -> None:
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
    from napari_cellseg.options import Thresholds

    path = Path(path)
    _check_writable_checkpoint(path)
    obj = read_checkpoint(path)
    old = Thresholds.from_dict(obj.get("thresholds"), where=f"{path}: thresholds")
    obj["thresholds"] = Thresholds.from_dict({**old.to_dict(), **dict(thresholds)}).to_dict()
    if info:
        obj["info"] = {**(obj.get("info") or {}), "tuned": dict(info)}
    atomic_torch_save(obj, path)
    return obj["thresholds"]


def run_tune(args, progress_factory=None) -> int:
    """The ``cellseg tune`` command (args from cli.py's parser)."""
    from napari_cellseg.io.annotations import NO_ROWS
    from napari_cellseg.model.checkpoint import resolve_checkpoint
    from napari_cellseg.options import PredictOptions
    from napari_cellseg.io.files import (IdConflict, LabelFiles, check_label_not_image, files_by_id, image_shape, label_source, resolve_ids)
    from napari_cellseg.io.images import read_plane
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.inference.tuning import DEFAULT_BOX_CONFS, DEFAULT_MASK_THRESHOLDS, sweep

    # ---- check everything before predicting
    if args.grid is not None:
        box_confs = mask_thresholds = grid_values(args.grid)
    else:
        box_confs = args.box_confs or DEFAULT_BOX_CONFS
        mask_thresholds = args.mask_thresholds or DEFAULT_MASK_THRESHOLDS
    box_confs = _check_values(box_confs, "--box-confs")
    mask_thresholds = _check_values(mask_thresholds, "--mask-thresholds")
    if args.write and args.checkpoint is None:
        raise ValueError("--write needs --checkpoint FILE; the bundled demo model is read-only: "
                         "copy it first and tune the copy; nothing written")
    options = PredictOptions.from_args(args)  # min_area and the size options checked here
    ckpt = resolve_checkpoint(args.checkpoint)  # CheckpointError when the bundled model is missing
    if args.write:
        _check_writable_checkpoint(ckpt)
    gt = label_source(args.gt)
    if not gt.ids:
        raise ValueError(f"{args.gt} {NO_ROWS}: no ground truth to tune on")
    images = files_by_id([args.images], "images")
    # each ground-truth id -> (file, plane or None): a file's id, or a plane of a stack named as
    # cellseg predict names planes (files.resolve_ids: stack_000 .. of stack.tif; both is refused)
    try:
        found, missing = resolve_ids(gt.ids, images)
    except IdConflict as exc:
        raise ValueError(f"{args.gt}: {exc}") from None
    sources, shapes = {}, {}
    for image_id, (path, plane, header) in found.items():
        if isinstance(gt, LabelFiles):  # --gt DIR = --images DIR: each image its own ground truth
            check_label_not_image(gt.files[image_id][0], path, image_id)
        sources[image_id] = (path, plane)
        # a whole stack for one id is an ImageError
        size = image_shape(path) if plane is None else (header.height, header.width)
        known = gt.shape(image_id)
        if known is not None and tuple(known) != size:
            where = path if plane is None else f"plane {plane} of {path}"
            raise ValueError(f"{where}: image is {size[0]}x{size[1]} (HxW) but the ground "
                             f"truth for {image_id!r} is {known[0]}x{known[1]}")
        shapes[image_id] = size
    ids = list(sources)
    if not ids:
        sample = ", ".join(list(gt.ids)[:3])
        raise ValueError(f"no image in {args.images} has a file stem matching a ground-truth id "
                         f"of {args.gt} (ids like {sample})")
    if missing:
        print(f"cellseg tune: note: {len(missing)} of {len(gt.ids)} ground-truth image(s) have no image in "
              f"{args.images} and are not used (e.g. {missing[0]!r})", file=sys.stderr)

    # ---- one forward pass per image, then the grid from the kept Detections
    if args.checkpoint is None:
        print("cellseg tune: no --checkpoint given, tuning the bundled demo model", file=sys.stderr)
    pipeline = Pipeline.from_options(options)
    base = pipeline.thresholds  # the checkpoint's, with --min-area / post-processing overrides
    bar = progress_factory(total=len(ids), desc="tune: predict") if progress_factory else None
    pairs = []
    try:
        print(f"cellseg tune: object size: {pipeline.describe()}", file=sys.stderr)
        inputs = (path if plane is None else read_plane(path, plane) for path, plane in sources.values())
        for k, dets in pipeline.predict_many(inputs):
            image_id = ids[k]
            labels = gt.labels(image_id, shapes[image_id])
            if tuple(labels.shape) != tuple(dets.image_shape):
                raise ValueError(f"{image_id}: ground truth {labels.shape} and prediction "
                                 f"{dets.image_shape} differ in size")
            pairs.append((dets, labels))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result = sweep(pairs, box_confs, mask_thresholds, base=base)
    min_area = base.min_area
    best = {**result.best, "min_area": min_area}

    if args.write:
        write_thresholds(ckpt, {k: best[k] for k in ("box_conf", "mask_threshold", "min_area")},
                         info={"map": best["map"], "n_images": result.n_images,
                               "gt": str(args.gt), "images": str(args.images)})
    if args.json:
        doc = {**best, "n_images": result.n_images, "checkpoint": str(ckpt),
               "box_confs": [float(b) for b in result.box_confs],
               "mask_thresholds": [float(m) for m in result.mask_thresholds],
               "table": result.table(), "written": bool(args.write)}
        json.dump(doc, sys.stdout, indent=1)
        print()
        return 0
    print(f"mAP over {result.n_images} images (rows: box_conf, columns: mask_threshold; "
          f"min_area {min_area}):")
    print(format_table(result))
    print(f"best: box_conf {best['box_conf']:.3g}  mask_threshold {best['mask_threshold']:.3g}  "
          f"mAP {best['map']:.4f}")
    if args.write:
        print(f"stored in {ckpt}")
    return 0
