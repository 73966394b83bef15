"""Batch prediction over image files -> submission CSV (+ label TIFFs), single process or torchrun.

Under ``torchrun --nproc_per_node=N`` (env WORLD_SIZE > 1) every rank predicts
``files[rank::world]``; the per-image results (RLE strings, small) are gathered on rank 0 with
``torch.distributed.gather_object``, which writes the merged CSV in input order. Nothing is written
until every image has been predicted, so a bad image leaves no partial output. Errors on any rank
are gathered too and raised on rank 0 (no rank hangs waiting for a dead one).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence


def shard(items: Sequence, rank: int, world: int) -> list:
    """The share of ``items`` of one rank: ``items[rank::world]`` (with input positions)."""
    return [(i, items[i]) for i in range(rank, len(items), world)]


def merge_shards(shards: Iterable[Iterable[tuple[int, object]]], n: int) -> list:
    """Inverse of :func:`shard`: ``(index, value)`` lists of all ranks -> values in input order."""
    out: list = [None] * n
    seen = [False] * n
    for part in shards:
        for i, value in part:
            if seen[i]:
                raise ValueError(f"item {i} was predicted by two ranks")
            out[i], seen[i] = value, True
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise ValueError(f"{len(missing)} items were not predicted (first: {missing[0]})")
    return out


@dataclass
class ImageResult:
    image_id: str
    shape: tuple[int, int]
    rles: list[str]


class _ResultLabels(Mapping):
    """id -> label image, decoded from RLEs on access (rank 0 never holds all label images)."""

    def __init__(self, results: list[ImageResult]):
        self._by_id = {r.image_id: r for r in results}

    def __getitem__(self, image_id):
        from .rle import rles_to_labels

        r = self._by_id[image_id]
        return rles_to_labels(r.rles, r.shape)

    def __iter__(self):
        return iter(self._by_id)

    def __len__(self):
        return len(self._by_id)


def dist_info() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def predict_shard(predictor, files: Sequence[Path], rank: int, world: int, box_conf: float,
                  mask_threshold: float, min_area: int, scale: float = 1.0, batch_size: int = 1,
                  progress: Callable | None = None) -> list[tuple[int, ImageResult]]:
    """Predict this rank's share; ``(input index, ImageResult)`` pairs."""
    from .rle import labels_to_rles

    mine = shard(list(files), rank, world)
    out = []
    results = predictor.predict_many((p for _, p in mine), batch_size=batch_size, scale=scale)
    for (index, path), (_, dets) in zip(mine, results):
        labels = dets.to_labels(box_conf, mask_threshold, min_area)
        out.append((index, ImageResult(Path(path).stem, dets.image_shape, labels_to_rles(labels))))
        if progress is not None:
            progress(1)
    return out


def gather_results(local: list, error: str | None, rank: int, world: int, n: int):
    """Gather every rank's results (and errors) on rank 0 -> results in input order (rank 0)."""
    if world == 1:
        if error:
            raise ValueError(error)
        return merge_shards([local], n)
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    dist.gather_object((local, error), parts, dst=0)
    if rank != 0:
        return None
    errors = [e for _, e in parts if e]
    if errors:
        raise ValueError(errors[0])
    return merge_shards([p for p, _ in parts], n)


def write_outputs(results: list[ImageResult], out: Path, fmt: str, labels_dir: Path | None) -> None:
    """The CSV (atomic) and optionally one label TIFF per image (each atomic)."""
    import io

    import numpy as np
    import tifffile

    from .annotations import write_annotations
    from .atomic import atomic_write
    from .rle import rles_to_labels

    write_annotations(out, _ResultLabels(results), format=fmt)
    if labels_dir is not None:
        labels_dir.mkdir(parents=True, exist_ok=True)
        for r in results:
            labels = rles_to_labels(r.rles, r.shape)
            if labels.max(initial=0) <= np.iinfo(np.uint16).max:
                labels = labels.astype(np.uint16)
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, labels, compression="zlib")
            with atomic_write(labels_dir / f"{r.image_id}.tif", "wb") as fh:
                fh.write(buffer.getvalue())


def run_predict(args, progress_factory=None) -> int:
    """The ``cellseg predict`` command (args from cli.py's parser)."""
    from .images import list_images
    from .predict import Predictor

    rank, world = dist_info()
    files = list_images(args.images)
    if not files:
        raise ValueError(f"no images found in {', '.join(map(str, args.images))}")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"{f}: image id {f.stem!r} also given by {stems[f.stem]}")
        stems[f.stem] = f
    if not Path(args.out).parent.is_dir() and str(Path(args.out).parent):
        raise ValueError(f"{args.out}: folder {Path(args.out).parent} does not exist")
    if world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
        device = args.device
        if device in (None, "auto") and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    else:
        device = args.device or "auto"
    if args.checkpoint is None and rank == 0:
        print("cellseg predict: no --checkpoint given, using the bundled demo model", file=sys.stderr)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=device, precision=args.precision)
    th = predictor.thresholds
    box_conf = th["box_conf"] if args.box_conf is None else args.box_conf
    mask_threshold = th["mask_threshold"] if args.mask_threshold is None else args.mask_threshold
    min_area = th.get("min_area", 0) if args.min_area is None else args.min_area
    local, error = [], None
    bar = progress_factory(total=len(shard(files, rank, world)), desc=f"predict (rank {rank})"
                           if world > 1 else "predict") if progress_factory else None
    try:
        local = predict_shard(predictor, files, rank, world, box_conf, mask_threshold, int(min_area),
                              scale=args.scale, batch_size=args.batch_size,
                              progress=bar.update if bar is not None else None)
    except (ValueError, OSError) as exc:
        if world == 1:
            raise
        error = str(exc)
    finally:
        if bar is not None:
            bar.close()
    results = gather_results(local, error, rank, world, len(files))
    if rank == 0:
        write_outputs(results, Path(args.out), args.format, args.labels_dir)
        cells = sum(len(r.rles) for r in results)
        print(f"wrote {len(results)} images, {cells} cells to {args.out} ({args.format} format)"
              f"{f'; label images in {args.labels_dir}' if args.labels_dir else ''}")
    return 0
