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
  the small per-rank summaries (failed images, the size used per image) are gathered on every
  rank, so the end-of-run counts and the size summary cover all ranks and every rank exits
  with the run's status; rank 0 alone reports and writes the CSV (from all journals).
* One run per --out: an exclusive lock (journal.output_lock) is taken before any journal is
  touched; a second run on the same --out stops at once (exit 2, naming the file).
* Throughput: images are decoded on worker threads while the network runs, up to
  ``batch_size`` images go through one forward (batches span images), and label painting + RLE
  encoding run on a thread pool while the next batch is on the device.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from napari_cellseg.io.annotations import csv_format
from napari_cellseg.io.files import check_not_inputs, display_path, label_tiff_path, non_utf8_name
from napari_cellseg.io.images import plane_id
from napari_cellseg.io.journal import (Journal, _rank_of, check_out, done_ids, flush_csv, journal_format, journal_path, journal_paths, normalize_id, output_lock)

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
    """Number of planes of a stack (images.py's one layout rule, from the header), None for a
    single image or an unreadable file (reported and skipped when it is loaded)."""
    from napari_cellseg.io.images import ImageError, image_info

    try:
        planes = image_info(path).planes
    except (ImageError, OSError):
        return None
    return planes if planes > 1 else None


def expand_items(files: Sequence[Path], skipped: list | None = None) -> list[Item]:
    """Files -> items (stacks expanded to planes, ids normalised like the CSV readers do);
    duplicate ids are a usage error. A file whose name is not valid UTF-8 cannot be an id in
    a CSV: it is reported on stderr and appended to ``skipped`` (ValueError when None)."""
    items: list[Item] = []
    for f in files:
        message = non_utf8_name(f)
        if message:
            if skipped is None:
                raise ValueError(message) from None
            print(f"cellseg predict: skipped: {message}", file=sys.stderr)
            skipped.append(display_path(f))
            continue
        n = _n_planes(f)
        stem = normalize_id(f.stem)
        if n is None:
            items.append(Item(stem, f))
        else:
            items.extend(Item(plane_id(stem, (k,), (n,)), f, k) for k in range(n))
    seen: dict[str, Item] = {}
    for it in items:
        if not it.image_id:
            raise ValueError(f"{it.label()}: the file name gives an empty image id")
        if it.image_id in seen:
            raise ValueError(f"{it.label()}: image id {it.image_id!r} also given by {seen[it.image_id].label()}")
        seen[it.image_id] = it
    return items


def load_item(item: Item, rule=None):
    """float32 HxWx3 of an item (one plane of a stack read without loading the others), by
    ``rule`` (the pipeline's ImageInput: intensity, channels, invert)."""
    from napari_cellseg.io.images import load_plane

    return load_plane(item.path, item.plane, rule=rule)


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


def _threads() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _prefetched(items: Sequence[Item], pool, depth: int, rule=None):
    """``(item, array or exception)`` in input order, decoded ``depth`` items ahead on ``pool``."""
    from collections import deque

    def load(item):
        try:
            return load_item(item, rule)
        except (ValueError, OSError, MemoryError) as exc:
            return exc

    queue: deque = deque()
    it = iter(items)
    for item in it:
        queue.append((item, pool.submit(load, item)))
        if len(queue) >= depth:
            break
    while queue:
        item, future = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(load, nxt)))
        yield item, future.result()


def predict_items(pipeline, items: Sequence[Item], journal: Journal, labels_dir: Path | None = None,
                  bar=None, on_done=None, threads: int | None = None, sizes: list | None = None) -> list[str]:
    """Predict ``items`` with a :class:`~napari_cellseg.inference.pipeline.Pipeline` (its batch size,
    size option, tiling and thresholds), journal each finished image; returns failed labels.

    A file that cannot be read or predicted is reported on stderr and skipped; a batch whose
    forward fails is retried one image at a time so only the culprit fails.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from napari_cellseg.io.files import write_label_tiff
    from napari_cellseg.inference.pipeline import iter_at, iter_auto_scale
    from napari_cellseg.progress import drain
    from napari_cellseg.io.rle import labels_to_rles

    failed: list[str] = []
    trim = _malloc_trim()
    threads = _threads() if threads is None else max(1, int(threads))
    batch_size = max(int(pipeline.batch_size), 1)
    runner, scale = pipeline.runner, pipeline.scale
    pending: deque = deque()  # (item, future of (shape, rles)) in finishing order

    def encode(item, dets):  # on a worker thread: paste, threshold, encode, write the TIFF
        labels = pipeline.labels(dets)
        if labels_dir is not None:
            write_label_tiff(label_tiff_path(labels_dir, item.image_id), labels)
        return labels.shape, labels_to_rles(labels)

    def collect(limit: int) -> None:
        while len(pending) > limit:
            item, future = pending.popleft()
            try:
                shape, rles = future.result()
            except (ValueError, OSError, MemoryError, RuntimeError) as exc:
                fail(item, exc)
                continue
            journal.add(item.image_id, shape, rles)
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

    def forward(arrays):
        if scale == "auto":
            return drain(iter_auto_scale(runner, arrays, tile_size=pipeline.tile_size,
                                         tile_overlap=pipeline.tile_overlap))
        return drain(iter_at(runner, arrays, [float(scale)] * len(arrays), pipeline.tile_size,
                             pipeline.tile_overlap))

    def run(batch, post):
        try:
            results = forward([a for _, a in batch])
        except (ValueError, RuntimeError, MemoryError) as exc:
            if len(batch) > 1:
                for one in batch:
                    run([one], post)
                return
            fail(batch[0][0], exc)
            return
        for (item, _), dets in zip(batch, results):
            if sizes is not None:
                sizes.append(SimpleNamespace(scale=dets.scale, diameter=dets.diameter))
            pending.append((item, post.submit(encode, item, dets)))
        del results
        collect(2 * batch_size)  # keep the encoders at most two batches behind the network
        trim()

    with ThreadPoolExecutor(threads, thread_name_prefix="cellseg-load") as loader, \
            ThreadPoolExecutor(threads, thread_name_prefix="cellseg-encode") as post:
        batch: list = []
        for item, array in _prefetched(items, loader, depth=2 * batch_size + threads, rule=pipeline.input):
            if isinstance(array, BaseException):
                fail(item, array)
                continue
            batch.append((item, array))
            if len(batch) >= batch_size:
                run(batch, post)
                batch = []
        if batch:
            run(batch, post)
        collect(0)
    return failed


def _device_for_rank(device: str, rank: int, world: int) -> str:
    """torchrun: "auto" means this rank's GPU (devices.resolve_device), else the name given."""
    if world > 1 and device in (None, "", "auto"):
        from napari_cellseg.model.devices import resolve_device

        return str(resolve_device("auto", local_rank=int(os.environ.get("LOCAL_RANK", rank))))
    return device or "auto"


def run_predict(options, images, out, fmt: str | None = "kaggle", labels_dir: Path | None = None,
                resume: bool = False, progress_factory=None) -> int:
    """The ``cellseg predict`` command: ``options`` (PredictOptions) for the pipeline, ``images``
    (files / folders), ``out`` (CSV), ``fmt`` (None: kaggle, or with ``resume`` the format of
    ``out``, else of its journals). Returns the exit status; usage errors raise ValueError
    before anything is written."""
    import dataclasses

    from napari_cellseg.io.images import list_images
    from napari_cellseg.inference.pipeline import Pipeline

    rank, world = dist_info()
    out = Path(out)
    check_out(out)
    if fmt is None:  # --resume adds rows to out in its own format (annotations.csv_format), else
        # (killed before the first flush: journals only) in the format the run was started with
        fmt = csv_format(out, journal_format(out) or "kaggle", allowed=("kaggle", "starter")) \
            if resume else "kaggle"
    files = list_images(images)
    if not files:
        raise ValueError(f"no images found in {', '.join(map(str, images))}")
    bad_names: list[str] = []
    # an output never replaces an input: --out typed as an image or the checkpoint, or a
    # --labels-dir that is the image folder (a.tif's labels over a.tif)
    check_not_inputs([out], [*files, *([options.checkpoint] if options.checkpoint else [])], "--out", "file")
    items = expand_items(files, skipped=bad_names if rank == 0 else [])
    if labels_dir is not None:
        check_not_inputs([label_tiff_path(labels_dir, it.image_id) for it in items], files,
                         f"--labels-dir {labels_dir}")
    own_group = False
    with output_lock(out, rank):
        mine = [it for _, it in shard(items, rank, world)]
        if resume:
            done = done_ids(out)  # checks every row of the CSV: one bad row -> ValueError
            mine = [it for it in mine if it.image_id not in done]
        else:
            done = set()  # a fresh run: forget journals of an earlier crashed run (each rank its own)
            stale = [journal_path(out, rank)] + ([j for j in journal_paths(out) if _rank_of(j) >= world]
                                                  if rank == 0 else [])
            for j in stale:
                j.unlink(missing_ok=True)
        if world > 1:
            import torch.distributed as dist

            from napari_cellseg.model.devices import ddp_backend, resolve_device

            options = dataclasses.replace(options, device=_device_for_rank(options.device, rank, world))
            if not dist.is_initialized():  # ours: destroyed once every rank has the run's status
                dist.init_process_group(ddp_backend(resolve_device(options.device)))
                own_group = True
        if options.checkpoint is None and rank == 0:
            print("cellseg predict: no --checkpoint given, using the bundled demo model", file=sys.stderr)
        pipeline = Pipeline.from_options(options)  # every check before the first file is written
        described = pipeline.describe()
        if labels_dir is not None:
            Path(labels_dir).mkdir(parents=True, exist_ok=True)
        if resume and rank == 0 and done:
            print(f"cellseg predict: resuming, {len(done)} images already done", file=sys.stderr)
        if rank == 0:
            print(f"cellseg predict: object size: {described}", file=sys.stderr)
        try:
            return _run_locked(pipeline, items, mine, out, fmt, labels_dir, resume, rank, world,
                               bad_names, progress_factory)
        finally:
            if own_group:
                import torch.distributed as dist

                dist.destroy_process_group()


def _run_locked(pipeline, items, mine, out, fmt, labels_dir, resume, rank, world, bad_names,
                progress_factory) -> int:
    from types import SimpleNamespace

    journal = Journal(journal_path(out, rank), fmt)
    flushed = [resume]  # after the first flush the CSV holds this run's rows: keep them
    count = [0]

    def periodic_flush():
        count[0] += 1
        if world == 1 and count[0] % FLUSH_EVERY == 0:
            journal.close()
            flush_csv(out, fmt, keep_existing=flushed[0])
            flushed[0] = True
            journal.__init__(journal.path, journal.fmt)

    bar = progress_factory(total=len(mine), desc=f"predict (rank {rank})" if world > 1 else "predict") \
        if progress_factory else None
    sizes: list = []
    try:
        failed = predict_items(pipeline, mine, journal, labels_dir=labels_dir, bar=bar,
                               on_done=periodic_flush, sizes=sizes)
    finally:
        journal.close()
        if bar is not None:
            bar.close()
    failed = bad_names + failed  # (unreadable names: listed on rank 0 only)
    if world > 1:  # every end-of-run figure covers all ranks: failures and the sizes used
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, (failed, [(s.scale, s.diameter) for s in sizes]))
        # (also the barrier before rank 0 reads the journals)
        failed = [f for part_failed, _ in parts for f in part_failed]
        sizes = [SimpleNamespace(scale=sc, diameter=d) for _, part_sizes in parts for sc, d in part_sizes]
    # Rank 0 alone reports and writes the CSV; the other ranks wait for its exit status (a rank
    # returning early with 1 makes torchrun's agent SIGTERM rank 0 while it still writes the CSV).
    status = None
    try:
        if rank == 0:
            status = 1  # (rank 0 failed while writing: every rank exits non-zero)
            status = _report_run(pipeline, items, out, fmt, labels_dir, bad_names, failed, sizes, flushed[0])
    finally:
        if world > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            status = _share_status(status)
    return status


def _share_status(status):
    """torchrun: rank 0's exit status -> every rank (also the barrier after rank 0's CSV write)."""
    import torch.distributed as dist

    box = [status]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _report_run(pipeline, items, out, fmt, labels_dir, bad_names, failed, sizes, keep_existing) -> int:
    """Rank 0 at the end of a run: the size summary, the CSV from the journals, the failure count."""
    message = pipeline.size_message(sizes) if pipeline.scale == "auto" and sizes else ""
    if message:  # e.g. "Cell size estimated at 24-40 px: image resized x1-x1.67 (12 images)."
        print(f"cellseg predict: {message}", file=sys.stderr)
    n_images = flush_csv(out, fmt, keep_existing=keep_existing)
    print(f"wrote {n_images} images to {out} ({fmt} format)"
          f"{f'; label images in {labels_dir}' if labels_dir else ''}")
    if failed:
        print(f"cellseg predict: {len(failed)} of {len(items) + len(bad_names)} images failed (skipped; "
              f"rerun with --resume to retry only them)", file=sys.stderr)
        return 1
    return 0
