"""The ``cellseg predict`` command: stream many images (and stack planes) -> submission CSV.

* Items: every image file; a multi-page TIFF / 3-D stack gives one item per plane with id
  ``<stem>_<plane>`` (plane number zero-padded to 3 digits, more for stacks of >= 1000 planes).
* Streaming, constant memory: one batch of images is in memory at a time; each finished image's
  rows are appended as one JSON line to a side journal ``.<out name>.rank<R>.journal``.
* Crash safety: the CSV on disk is only ever replaced atomically (every ``FLUSH_EVERY`` images
  and at the end) by the rows already in it + the journal rows, so at every moment it is a
  complete, valid CSV. After a crash (even kill -9) ``--resume`` skips every id found in the CSV
  or in a journal (a torn last journal line is ignored), and the final flush folds them in.
* A bad image is reported on stderr and skipped; the exit status is 0 (all good), 1 (some
  images failed: "K of N images failed") or 2 (usage errors, bad checkpoint: raised as ValueError).
* torchrun: rank R predicts ``items[R::world]`` (minus ids already done) into its own journal;
  the small per-rank summaries are gathered on rank 0, which writes the CSV.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .images import plane_id
from .journal import Journal, _rank_of, done_ids, flush_csv, journal_path, journal_paths

FLUSH_EVERY = int(os.environ.get("CELLSEG_FLUSH_EVERY", 50))  # images between atomic CSV rewrites


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


@dataclass(frozen=True)
class Item:
    """One image to predict: a file, or one plane of a stack file (``plane`` not None)."""

    image_id: str
    path: Path
    plane: int | None = None

    def label(self) -> str:
        return str(self.path) if self.plane is None else f"{self.path} [plane {self.plane}]"


def dist_info() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---- items ------------------------------------------------------------------------------------
def _n_planes(path: Path) -> int | None:
    """Number of planes of a TIFF stack (3-D grey or 4-D colour), None for a single image."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            shape = tuple(tf.series[0].shape)
    except Exception:  # unreadable: reported (and skipped) when it is loaded
        return None
    squeezed = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
    if len(squeezed) == 4 or (len(squeezed) == 3 and squeezed[-1] not in (3, 4)):
        return int(squeezed[0])
    return None


def expand_items(files: Sequence[Path]) -> list[Item]:
    """Files -> items (stacks expanded to planes); duplicate ids are a usage error."""
    items: list[Item] = []
    for f in files:
        n = _n_planes(f)
        if n is None:
            items.append(Item(f.stem, f))
        else:
            items.extend(Item(plane_id(f.stem, (k,), (n,)), f, k) for k in range(n))
    seen: dict[str, Item] = {}
    for it in items:
        if it.image_id in seen:
            raise ValueError(f"{it.label()}: image id {it.image_id!r} also given by {seen[it.image_id].label()}")
        seen[it.image_id] = it
    return items


def load_item(item: Item):
    """float32 HxWx3 of an item (one plane of a stack read without loading the others)."""
    from .images import ImageError, load_image, to_rgb_float

    if item.plane is None:
        return load_image(item.path)
    import tifffile

    try:
        with tifffile.TiffFile(item.path) as tf:
            series = tf.series[0]
            if len(series.pages) == series.shape[0]:
                raw = series.pages[item.plane].asarray()
            else:
                raw = series.asarray()[item.plane]
    except Exception as exc:
        raise ImageError(f"{item.label()}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return to_rgb_float(raw, name=item.label())


# ---- the run ----------------------------------------------------------------------------------
def _report(message: str, bar) -> None:
    if bar is not None and hasattr(bar, "write"):
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _malloc_trim():
    """glibc's malloc_trim, or a no-op: hands freed heap back to the OS after each batch.

    Without it the varying tensor sizes (detections per image) fragment the heap and the RSS of a
    long folder run creeps up (measured: 1.36 -> 2.24 GiB over 400 images; with it: flat 0.78 GiB).
    """
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def predict_items(predictor, items: Sequence[Item], journal: Journal, box_conf: float,
                  mask_threshold: float, min_area: int, scale: float = 1.0, batch_size: int = 1,
                  labels_dir: Path | None = None, bar=None, on_done=None) -> list[str]:
    """Predict ``items`` a batch at a time, journal each finished image; returns failed labels.

    A file that cannot be read or predicted is reported on stderr and skipped; a batch whose
    forward fails is retried one image at a time so only the culprit fails.
    """
    failed: list[str] = []
    trim = _malloc_trim()

    def finish(item, dets):
        from .rle import labels_to_rles

        labels = dets.to_labels(box_conf, mask_threshold, min_area)
        if labels_dir is not None:
            _write_label_tiff(labels_dir / f"{item.image_id}.tif", labels)
        journal.add(item.image_id, labels.shape, labels_to_rles(labels))
        if bar is not None:
            bar.update(1)
        if on_done is not None:
            on_done()

    def fail(item, exc):
        failed.append(item.label())
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not message.startswith(str(item.path)):
            message = f"{item.label()}: {message}"
        _report(f"cellseg predict: skipped: {message}", bar)
        if bar is not None:
            bar.update(1)

    def run(batch):
        try:
            results = list(predictor.predict_many([a for _, a in batch], batch_size=len(batch), scale=scale))
        except (ValueError, RuntimeError, MemoryError) as exc:
            if len(batch) > 1:
                for one in batch:
                    run([one])
                return
            fail(batch[0][0], exc)
            return
        for (item, _), (_, dets) in zip(batch, results):
            finish(item, dets)
        del results
        trim()

    batch: list = []
    for item in items:
        try:
            batch.append((item, load_item(item)))
        except (ValueError, OSError, MemoryError) as exc:
            fail(item, exc)
            continue
        if len(batch) >= max(int(batch_size), 1):
            run(batch)
            batch = []
    if batch:
        run(batch)
    return failed


def _write_label_tiff(path: Path, labels) -> None:
    import io

    import numpy as np
    import tifffile

    from .atomic import atomic_write

    if labels.max(initial=0) <= np.iinfo(np.uint16).max:
        labels = labels.astype(np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, labels, compression="zlib")
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getvalue())


def run_predict(args, progress_factory=None) -> int:
    """The ``cellseg predict`` command (args from cli.py's parser). Returns the exit status."""
    from .images import list_images
    from .predict import Predictor
    from .sizing import describe_scale

    rank, world = dist_info()
    out = Path(args.out)
    resume = bool(getattr(args, "resume", False))
    files = list_images(args.images)
    if not files:
        raise ValueError(f"no images found in {', '.join(map(str, args.images))}")
    if str(out.parent) and not out.parent.is_dir():
        raise ValueError(f"{out}: folder {out.parent} does not exist")
    items = expand_items(files)
    mine = [it for _, it in shard(items, rank, world)]
    if resume:
        done = done_ids(out)
        mine = [it for it in mine if it.image_id not in done]
    else:
        done = set()  # a fresh run: forget journals of an earlier crashed run (each rank its own)
        stale = [journal_path(out, rank)] + ([j for j in journal_paths(out) if _rank_of(j) >= world]
                                              if rank == 0 else [])
        for j in stale:
            j.unlink(missing_ok=True)
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
    scale = predictor.resolve_scale(args.scale, getattr(args, "diameter", None))  # fail before writing
    if getattr(args, "tile_size", None) is not None:
        predictor.tile_size = int(args.tile_size)
    if getattr(args, "tile_overlap", None) is not None:
        predictor.tile_overlap = int(args.tile_overlap)
    if predictor.tile_size < 0:
        raise ValueError(f"--tile-size must be >= 0 (0 = never tile), got {predictor.tile_size}")
    if predictor.tile_size and not 0 <= predictor.tile_overlap < predictor.tile_size:
        raise ValueError(f"--tile-overlap must be >= 0 and < --tile-size ({predictor.tile_size})")
    th = predictor.thresholds
    box_conf = th["box_conf"] if args.box_conf is None else args.box_conf
    mask_threshold = th["mask_threshold"] if args.mask_threshold is None else args.mask_threshold
    min_area = th.get("min_area", 0) if args.min_area is None else args.min_area
    if args.labels_dir is not None:
        args.labels_dir.mkdir(parents=True, exist_ok=True)
    if resume and rank == 0 and done:
        print(f"cellseg predict: resuming, {len(done)} images already done", file=sys.stderr)
    journal = Journal(journal_path(out, rank))
    flushed = [resume]  # after the first flush the CSV holds this run's rows: keep them
    count = [0]

    def periodic_flush():
        count[0] += 1
        if world == 1 and count[0] % FLUSH_EVERY == 0:
            journal.close()
            flush_csv(out, args.format, keep_existing=flushed[0])
            flushed[0] = True
            journal.__init__(journal.path)

    if rank == 0:
        print(f"cellseg predict: object size: {describe_scale(predictor, scale)}", file=sys.stderr)
    bar = progress_factory(total=len(mine), desc=f"predict (rank {rank})" if world > 1 else "predict") \
        if progress_factory else None
    try:
        failed = predict_items(predictor, mine, journal, box_conf, mask_threshold, int(min_area),
                               scale=scale, batch_size=args.batch_size,
                               labels_dir=args.labels_dir, bar=bar, on_done=periodic_flush)
    finally:
        journal.close()
        if bar is not None:
            bar.close()
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world if rank == 0 else None
        dist.gather_object(failed, parts, dst=0)  # also the barrier before rank 0 reads journals
        if rank != 0:
            return 1 if failed else 0
        failed = [f for p in parts for f in p]
    n_images = flush_csv(out, args.format, keep_existing=flushed[0])
    print(f"wrote {n_images} images to {out} ({args.format} format)"
          f"{f'; label images in {args.labels_dir}' if args.labels_dir else ''}")
    if failed:
        print(f"cellseg predict: {len(failed)} of {len(items)} images failed (skipped; rerun with "
              f"--resume to retry only them)", file=sys.stderr)
        return 1
    return 0
