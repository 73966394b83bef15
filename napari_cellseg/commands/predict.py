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
* One run per --out: an exclusive lock (atomic.output_lock, the one every CSV writer takes) is
  taken before any journal is touched; a second run on the same --out stops at once (exit 2,
  naming the file).
* Nothing replaced unless asked: a fresh run refuses an --out that holds rows, journals an
  interrupted run left, and existing label TIFFs in --labels-dir (exit 2 naming the file) unless
  ``--overwrite`` (``--resume`` keeps rows and may redo label TIFFs).
* Resume: ``--resume`` skips the ids in --out and in the journals. When the journals belong to a
  run that replaces --out (a fresh run killed before its first CSV rewrite: its entries say
  ``replaces``), the older CSV's ids are not skipped and its rows are kept only for images this
  run does not predict.
* Throughput: images are decoded on worker threads while the network runs, up to
  ``batch_size`` images OF ONE SIZE go through one forward (a smaller image padded beside a
  larger one gets other detections), and label painting + RLE encoding run on a thread pool
  while the next batch is on the device. Rows are journalled in input order, so the CSV is the
  same at every batch size.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Sequence

from napari_cellseg.io.annotations import FORMATS, csv_format, refuse_replacing
from napari_cellseg.io.atomic import output_lock, remove_stale_locks
from napari_cellseg.io.files import (check_not_inputs, display_path, label_tiff_path, non_utf8_name,
                                     refuse_existing_files)
from napari_cellseg.io.images import plane_id
from napari_cellseg.io.journal import (Journal, _rank_of, check_out, done_ids, flush_csv, journal_format,
                                       journal_path, journal_paths, journal_replaces, normalize_id,
                                       read_journal)

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


class BatchLoop:
    """The loop of one rank: items in, one journal entry per finished image out, in input order.

    Decoding runs ``depth`` items ahead on a thread pool; decoded images wait in one bucket per
    size and a bucket goes through the network when it holds ``batch_size`` images (or, to bound
    memory, when more than ``2 * batch_size`` images wait: the bucket of the oldest one). Painting
    + encoding (and the label TIFF) run on a second pool; finished images are journalled in input
    order. A file that cannot be read or predicted is reported on stderr and skipped; a batch
    whose forward fails is retried one image at a time so only the culprit fails."""

    def __init__(self, pipeline, journal: Journal, labels_dir: Path | None = None, bar=None,
                 on_done=None, threads: int | None = None, sizes: list | None = None):
        self.pipeline, self.journal, self.labels_dir = pipeline, journal, labels_dir
        self.bar, self.on_done, self.sizes = bar, on_done, sizes
        self.threads = _threads() if threads is None else max(1, int(threads))
        self.batch_size = max(int(pipeline.batch_size), 1)
        self.failed: list[str] = []
        self.buckets: dict = {}  # (height, width) -> [(position, item, array)], oldest first
        self.pending: dict = {}  # position -> (item, future of (shape, rles)) or None (failed)
        self.next_pos = 0  # the next position to journal
        self.trim = _malloc_trim()

    def run(self, items: Sequence[Item]) -> list[str]:
        """Predict ``items``; returns the labels of the images that failed."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads, thread_name_prefix="cellseg-load") as loader, \
                ThreadPoolExecutor(self.threads, thread_name_prefix="cellseg-encode") as self.post:
            depth = 2 * self.batch_size + self.threads
            for pos, (item, array) in enumerate(_prefetched(items, loader, depth=depth, rule=self.pipeline.input)):
                if isinstance(array, BaseException):
                    self._fail(pos, item, array)
                    continue
                bucket = self.buckets.setdefault(array.shape[:2], [])
                bucket.append((pos, item, array))
                if len(bucket) >= self.batch_size:
                    self._run_bucket(array.shape[:2])
                elif sum(map(len, self.buckets.values())) > 2 * self.batch_size:
                    self._run_bucket(min(self.buckets, key=lambda k: self.buckets[k][0][0]))
            while self.buckets:
                self._run_bucket(min(self.buckets, key=lambda k: self.buckets[k][0][0]))
            self._collect(0)
        return self.failed

    def _run_bucket(self, shape) -> None:
        batch = self.buckets.pop(shape)
        self._forward(batch)
        del batch
        self._collect(2 * self.batch_size)  # keep the encoders at most two batches behind the network
        self.trim()

    def _forward(self, batch) -> None:
        try:
            results = self._detect([a for _, _, a in batch])
        except (ValueError, RuntimeError, MemoryError) as exc:
            if len(batch) > 1:
                for one in batch:
                    self._forward([one])
                return
            self._fail(batch[0][0], batch[0][1], exc)
            return
        for (pos, item, _), dets in zip(batch, results):
            if self.sizes is not None:
                self.sizes.append(SimpleNamespace(scale=dets.scale, diameter=dets.diameter))
            self.pending[pos] = (item, self.post.submit(self._encode, item, dets))

    def _detect(self, arrays):
        from napari_cellseg.inference.pipeline import iter_sized
        from napari_cellseg.progress import drain

        pipe = self.pipeline
        return drain(iter_sized(pipe.runner, arrays, pipe.scale, tile_size=pipe.tile_size,
                                tile_overlap=pipe.tile_overlap))

    def _encode(self, item, dets):  # on a worker thread: paste, threshold, encode, write the TIFF
        from napari_cellseg.io.files import write_label_tiff
        from napari_cellseg.io.rle import labels_to_rles

        labels = self.pipeline.labels(dets)
        if self.labels_dir is not None:
            write_label_tiff(label_tiff_path(self.labels_dir, item.image_id), labels)
        return labels.shape, labels_to_rles(labels)

    def _collect(self, limit: int) -> None:
        """Journal finished images in input order; wait for the next one while more than
        ``limit`` images are on the encoders."""
        while self.next_pos in self.pending:
            entry = self.pending[self.next_pos]
            if entry is not None and not entry[1].done() and len(self.pending) <= limit:
                return
            del self.pending[self.next_pos]
            self.next_pos += 1
            if entry is None:
                continue  # failed: reported when it failed
            item, future = entry
            try:
                shape, rles = future.result()
            except (ValueError, OSError, MemoryError, RuntimeError) as exc:
                self._fail(None, item, exc)
                continue
            self.journal.add(item.image_id, shape, rles)
            if self.bar is not None:
                self.bar.update(1)
            if self.on_done is not None:
                self.on_done()

    def _fail(self, pos, item, exc) -> None:
        if pos is not None:
            self.pending[pos] = None
        self.failed.append(item.label())
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not message.startswith(str(item.path)):
            message = f"{item.label()}: {message}"
        _report(f"cellseg predict: skipped: {message}", self.bar)
        if self.bar is not None:
            self.bar.update(1)


def predict_items(pipeline, items: Sequence[Item], journal: Journal, labels_dir: Path | None = None,
                  bar=None, on_done=None, threads: int | None = None, sizes: list | None = None) -> list[str]:
    """Predict ``items`` with a :class:`~napari_cellseg.inference.pipeline.Pipeline` (its batch size,
    size option, tiling and thresholds), journal each finished image; returns failed labels
    (:class:`BatchLoop`)."""
    return BatchLoop(pipeline, journal, labels_dir, bar, on_done, threads, sizes).run(items)


def _device_for_rank(device: str, rank: int, world: int) -> str:
    """torchrun: "auto" means this rank's GPU (devices.resolve_device), else the name given."""
    if world > 1 and device in (None, "", "auto"):
        from napari_cellseg.model.devices import resolve_device

        return str(resolve_device("auto", local_rank=int(os.environ.get("LOCAL_RANK", rank))))
    return device or "auto"


def run_predict(options, images, out, fmt: str | None = "kaggle", labels_dir: Path | None = None,
                resume: bool = False, progress_factory=None, overwrite: bool = False) -> int:
    """The ``cellseg predict`` command: ``options`` (PredictOptions) for the pipeline, ``images``
    (files / folders), ``out`` (CSV), ``fmt`` (None: kaggle, or with ``resume`` the format of
    ``out``, else of its journals). Returns the exit status; usage errors raise ValueError
    before anything is written."""
    run = PredictRun(options, Path(out), fmt, labels_dir, resume, overwrite, progress_factory)
    run.collect_items(images)
    return run.execute()


class PredictRun:
    """One ``cellseg predict`` run on one rank: items -> journal -> the CSV at ``out``.

    :meth:`collect_items` checks the inputs (nothing written); :meth:`execute` takes the output
    lock, plans the run (fresh or resumed, what is done, what may be replaced), predicts this
    rank's share, and (rank 0) writes the CSV and reports; it returns the exit status."""

    def __init__(self, options, out: Path, fmt, labels_dir, resume: bool, overwrite: bool,
                 progress_factory=None):
        self.options, self.out, self.labels_dir = options, out, labels_dir
        self.resume, self.overwrite, self.progress_factory = resume, overwrite, progress_factory
        self.rank, self.world = dist_info()
        check_out(out)
        if fmt is None:  # --resume adds rows to out in its own format (annotations.csv_format), else
            # (killed before the first flush: journals only) in the format the run was started with
            fmt = csv_format(out, journal_format(out) or "kaggle", allowed=FORMATS) if resume else "kaggle"
        self.fmt = fmt
        self.items: list[Item] = []
        self.bad_names: list[str] = []
        self.mine: list[Item] = []
        self.keep_existing = False  # the CSV's rows are kept (resume, or after this run's first flush)
        self.drop_ids: set | None = None  # old rows of these ids are left out (a replacing run's images)
        self.replaces = False  # the journal's entries say: out still holds an older run's rows
        self.journal: Journal | None = None
        self.sizes: list = []
        self.flushes = 0

    # ---- before the lock: inputs only ------------------------------------------------------
    def collect_items(self, images) -> None:
        from napari_cellseg.io.images import list_images

        files = list_images(images)
        if not files:
            raise ValueError(f"no images found in {', '.join(map(str, images))}")
        checkpoint = self.options.checkpoint
        # an output never replaces an input: --out typed as an image or the checkpoint, or a
        # --labels-dir that is the image folder (a.tif's labels over a.tif)
        check_not_inputs([self.out], [*files, *([checkpoint] if checkpoint else [])], "--out", "file")
        self.items = expand_items(files, skipped=self.bad_names if self.rank == 0 else [])
        if self.labels_dir is not None:
            targets = [label_tiff_path(self.labels_dir, it.image_id) for it in self.items]
            check_not_inputs(targets, files, f"--labels-dir {self.labels_dir}")

    # ---- under the lock ----------------------------------------------------------------------
    def execute(self) -> int:
        with output_lock(self.out, self.rank, what="cellseg predict run"):
            self._plan()
            own_group = self._join_group()
            try:
                pipeline = self._pipeline()
                status = self._run(pipeline)
                if own_group:  # every rank is done with the group before any tears it down (a
                    import torch.distributed as dist  # gloo rank aborted at exit once without it)

                    dist.barrier()
                return status
            finally:
                if own_group:
                    import torch.distributed as dist

                    dist.destroy_process_group()

    def _plan(self) -> None:
        """Fresh or resumed: what this rank predicts, what the CSV keeps; refusals before any write."""
        out, rank, world = self.out, self.rank, self.world
        mine = [it for _, it in shard(self.items, rank, world)]
        if self.resume:
            self.replaces = journal_replaces(out)  # a replacing run was interrupted: redo its images
            done = done_ids(out, csv_rows=not self.replaces)  # checks every CSV row: ValueError
            self.keep_existing = True
            if self.replaces:
                self.drop_ids = {it.image_id for it in self.items}
            self.mine = [it for it in mine if it.image_id not in done]
            if rank == 0 and done:
                print(f"cellseg predict: resuming, {len(done)} images already done", file=sys.stderr)
        else:
            if not self.overwrite:
                self._refuse_replacing()
            self.replaces = out.exists()
            stale = [journal_path(out, rank)] + ([j for j in journal_paths(out) if _rank_of(j) >= world]
                                                 if rank == 0 else [])
            for j in stale:  # a fresh run: forget journals of an earlier run (each rank its own)
                j.unlink(missing_ok=True)
            self.mine = mine
        if rank == 0:
            remove_stale_locks(out, keep=world)  # left by a killed run with more ranks
        if self.labels_dir is not None and not (self.overwrite or self.resume):
            refuse_existing_files([label_tiff_path(self.labels_dir, it.image_id) for it in self.items],
                                  f"--labels-dir {self.labels_dir}", "--overwrite to replace them")

    def _refuse_replacing(self) -> None:
        out = self.out
        refuse_replacing(out, "--resume to add rows to it, or --overwrite to replace it")
        left = sum(1 for j in journal_paths(out) for _ in read_journal(j))
        if left:
            raise ValueError(f"{out}: an interrupted run left {left} predicted images in its journal "
                             f"({journal_paths(out)[0].name}); nothing written; pass --resume to finish "
                             f"it, or --overwrite to start again")

    def _join_group(self) -> bool:
        """torchrun: this rank's device, and the process group (True when it is ours to destroy)."""
        if self.world == 1:
            return False
        import dataclasses

        import torch.distributed as dist

        from napari_cellseg.model.devices import ddp_backend, resolve_device

        device = _device_for_rank(self.options.device, self.rank, self.world)
        self.options = dataclasses.replace(self.options, device=device)
        if dist.is_initialized():
            return False
        dist.init_process_group(ddp_backend(resolve_device(self.options.device)))
        return True  # destroyed once every rank has the run's status

    def _pipeline(self):
        from napari_cellseg.inference.pipeline import Pipeline

        if self.options.checkpoint is None and self.rank == 0:
            print("cellseg predict: no --checkpoint given, using the bundled demo model", file=sys.stderr)
        pipeline = Pipeline.from_options(self.options)  # every check before the first file is written
        if self.labels_dir is not None:
            Path(self.labels_dir).mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            print(f"cellseg predict: object size: {pipeline.describe()}", file=sys.stderr)
        return pipeline

    def _run(self, pipeline) -> int:
        self.journal = Journal(journal_path(self.out, self.rank), self.fmt, replaces=self.replaces)
        factory, world = self.progress_factory, self.world
        bar = factory(total=len(self.mine), desc=f"predict (rank {self.rank})" if world > 1 else "predict") \
            if factory else None
        try:
            failed = predict_items(pipeline, self.mine, self.journal, labels_dir=self.labels_dir, bar=bar,
                                   on_done=self._periodic_flush, sizes=self.sizes)
        finally:
            self.journal.close()
            if bar is not None:
                bar.close()
        failed = self.bad_names + failed  # (unreadable names: listed on rank 0 only)
        if world > 1:
            failed = self._gather(failed)
        # Rank 0 alone reports and writes the CSV; the other ranks wait for its exit status (a rank
        # returning early with 1 makes torchrun's agent SIGTERM rank 0 while it still writes the CSV).
        status = None
        try:
            if self.rank == 0:
                status = 1  # (rank 0 failed while writing: every rank exits non-zero)
                status = self._report(pipeline, failed)
        finally:
            if world > 1:
                sys.stdout.flush()
                sys.stderr.flush()
                status = _share_status(status)
        return status

    def _periodic_flush(self) -> None:
        self.flushes += 1
        if self.world == 1 and self.flushes % FLUSH_EVERY == 0:
            self.journal.close()
            self._flush()
            self.journal.replaces = False  # the CSV holds this run's rows now
            self.journal.reopen()

    def _flush(self) -> int:
        n = flush_csv(self.out, self.fmt, keep_existing=self.keep_existing, drop_ids=self.drop_ids)
        self.keep_existing = True  # after the first flush the CSV holds this run's rows: keep them
        return n

    def _gather(self, failed: list) -> list:
        """Every end-of-run figure covers all ranks: the failures and the sizes used (also the
        barrier before rank 0 reads the journals)."""
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, (failed, [(s.scale, s.diameter) for s in self.sizes]))
        self.sizes = [SimpleNamespace(scale=sc, diameter=d) for _, part in parts for sc, d in part]
        return [f for part_failed, _ in parts for f in part_failed]

    def _report(self, pipeline, failed) -> int:
        """Rank 0 at the end of a run: the size summary, the CSV from the journals, the failure count."""
        message = pipeline.size_message(self.sizes) if pipeline.scale == "auto" and self.sizes else ""
        if message:  # e.g. "Cell size estimated at 24-40 px: image resized x1-x1.67 (12 images)."
            print(f"cellseg predict: {message}", file=sys.stderr)
        n_images = self._flush()
        labels = f"; label images in {self.labels_dir}" if self.labels_dir else ""
        print(f"wrote {n_images} images to {self.out} ({self.fmt} format){labels}")
        if failed:
            print(f"cellseg predict: {len(failed)} of {len(self.items) + len(self.bad_names)} images failed "
                  f"(skipped; rerun with --resume to retry only them)", file=sys.stderr)
            return 1
        return 0


def _share_status(status):
    """torchrun: rank 0's exit status -> every rank (also the barrier after rank 0's CSV write)."""
    import torch.distributed as dist

    box = [status]
    dist.broadcast_object_list(box, src=0)
    return box[0]
