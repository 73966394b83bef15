"""The review queue of a folder of images (the "Review dataset" dock's state, without Qt).

``DatasetQueue.open(images, output_csv, start_csv=None, ranking_csv=None)`` lists the images by
name only (``files.files_by_id``: no pixel and no header is read before an image is shown), so a
folder of 10,000 images opens in well under a second. Each item has an id, a status (``to do``,
``edited``, ``accepted``), a cell count and an uncertainty.

Where things are kept (nothing lives only in memory):

* accepted masks: the output CSV, in TRAIN format (``id,annotation,width,height``), merged and
  written atomically by ``annotations.write_annotations`` under the output lock every CSV writer
  takes (``atomic.output_lock``): a running ``cellseg predict --out`` on the same file is refused;
* drafts (edits of an image left without Accept): ``<csv stem>.drafts/<id>.npz`` beside the CSV,
  written atomically (``atomic.atomic_write``); removed when the image is accepted;
* reopening the folder with the same output CSV resumes: accepted = the CSV's ids, edited = the
  drafts found beside it.

An optional start CSV (``cellseg predict`` output or a Kaggle train CSV) gives masks for its ids,
shown instead of running the model; a ``ranking.csv`` from ``cellseg rank`` (read by
``io.ranking.read_ranking``) gives the uncertainties. The order: uncertainty highest first, then the
images not ranked yet by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cellseg.io.annotations import CsvError, read_annotations, write_annotations
from napari_cellseg.io.atomic import atomic_write

__all__ = ["DatasetQueue", "Item", "DatasetError", "TODO", "EDITED", "ACCEPTED", "STATUSES", "drafts_dir"]

TODO, EDITED, ACCEPTED = "to do", "edited", "accepted"
STATUSES = (TODO, EDITED, ACCEPTED)
DRAFT_SUFFIX = ".npz"


class DatasetError(ValueError):
    """A bad folder, output CSV, start CSV, ranking or draft: one line naming the file."""


@dataclass
class Item:
    """One image of the queue. ``cells``/``uncertainty``: None until known (ranking, start CSV,
    the model's prediction, or the accepted rows)."""

    id: str
    path: Path
    accepted: bool = False  # rows in the output CSV
    draft: bool = False  # a draft file beside the CSV (edited since it was last accepted)
    cells: int | None = None
    uncertainty: float | None = None

    @property
    def status(self) -> str:
        return EDITED if self.draft else ACCEPTED if self.accepted else TODO


def drafts_dir(output_csv) -> Path:
    """``<csv folder>/<csv stem>.drafts``: where the drafts of this output CSV are kept."""
    out = Path(output_csv)
    return out.parent / f"{out.stem}.drafts"


def _apply_ranking(items: dict[str, Item], path) -> None:
    """Uncertainties (and cell counts not known from a start CSV) from a ``cellseg rank`` CSV
    (``io.ranking.read_ranking``: the one reader of that file); ids of other images ignored."""
    from napari_cellseg.io.ranking import read_ranking

    try:
        rows = read_ranking(path)
    except (ValueError, OSError) as exc:  # RankingError names the file and row
        raise DatasetError(f"ranking: {exc}") from None
    for row in rows:
        item = items.get(row["id"])
        if item is not None:
            item.uncertainty = float(row["uncertainty"])
            if item.cells is None:
                item.cells = int(row["cells"])


def _cell_counts(ann) -> dict[str, int]:
    """Cells per id of an Annotations (rows meaning 'no cell' not counted)."""
    counts: dict[str, int] = {}
    for image_id, value in ann.rows():
        counts[image_id] = counts.get(image_id, 0) + (1 if value else 0)
    return counts


def _read_csv(path, what: str):
    try:
        return read_annotations(path)
    except CsvError as exc:
        raise DatasetError(f"{what}: {exc}") from None


class DatasetQueue:
    """The queue of one folder (or list of images) and its output CSV. See the module doc."""

    def __init__(self, items: dict[str, Item], output_csv: Path, start=None):
        self.items = items
        self.output_csv = Path(output_csv)
        self.drafts = drafts_dir(self.output_csv)
        self._start = start  # Annotations of the start CSV, or None
        self._order: list[str] | None = None
        self._position: dict[str, int] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, images, output_csv, start_csv=None, ranking_csv=None, warn=None) -> "DatasetQueue":
        """List ``images`` (a folder, or files/folders) by name and resume from ``output_csv``
        (its ids are accepted) and its drafts. ``start_csv``: masks shown for its ids instead
        of the model's; ``ranking_csv``: ``cellseg rank`` output ordering the queue."""
        from napari_cellseg.io.files import files_by_id
        from napari_cellseg.io.journal import check_out

        out = Path(output_csv)
        try:
            check_out(out)
        except ValueError as exc:
            raise DatasetError(f"output CSV {exc}") from None
        sources = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        try:
            files = files_by_id(sources, "images", warn=warn)
        except ValueError as exc:  # ImageError (missing folder), duplicate / empty id, none found
            raise DatasetError(str(exc)) from None
        items = {image_id: Item(image_id, path) for image_id, path in files.items()}
        start = None
        if start_csv:
            start = _read_csv(start_csv, "start CSV")
            for image_id, n in _cell_counts(start).items():
                if image_id in items:
                    items[image_id].cells = n
        if ranking_csv:
            _apply_ranking(items, ranking_csv)
        queue = cls(items, out, start)
        queue._resume()
        return queue

    def _resume(self) -> None:
        if self.output_csv.exists():
            for image_id, n in _cell_counts(_read_csv(self.output_csv, "output CSV")).items():
                item = self.items.get(image_id)
                if item is not None:
                    item.accepted, item.cells = True, n
        if self.drafts.is_dir():
            with os.scandir(self.drafts) as entries:
                for entry in entries:
                    if entry.name.endswith(DRAFT_SUFFIX) and not entry.name.startswith("."):
                        item = self.items.get(entry.name[: -len(DRAFT_SUFFIX)])
                        if item is not None:
                            item.draft = True

    # ------------------------------------------------------------------ order and counts
    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, image_id) -> Item:
        return self.items[image_id]

    def __contains__(self, image_id) -> bool:
        return image_id in self.items

    def order(self) -> list[str]:
        """Ids, uncertainty highest first; images without an uncertainty after, by name. The
        order stays as it is while uncertainties come in (a stable Previous/Next) until
        :meth:`resort` (after a re-ranking)."""
        if self._order is None:
            ranked = sorted((i for i in self.items.values() if i.uncertainty is not None),
                            key=lambda i: (-i.uncertainty, i.id))
            rest = sorted(i.id for i in self.items.values() if i.uncertainty is None)
            self._order = [i.id for i in ranked] + rest
            self._position = {image_id: k for k, image_id in enumerate(self._order)}
        return list(self._order)

    def resort(self) -> list[str]:
        """Order the queue again by the uncertainties known now."""
        self._order = None
        return self.order()

    def counts(self) -> dict[str, int]:
        """``{"accepted": n, "edited": n, "to do": n, "total": n}`` (accepted: in the CSV)."""
        out = {ACCEPTED: 0, EDITED: 0, TODO: 0}
        for item in self.items.values():
            out[item.status] += 1
        out[ACCEPTED] = sum(1 for i in self.items.values() if i.accepted)
        out["total"] = len(self.items)
        return out

    def summary(self) -> str:
        c = self.counts()
        return f"accepted {c[ACCEPTED]} of {c['total']}" + (f", {c[EDITED]} edited" if c[EDITED] else "")

    def next_todo(self, after: str | None = None) -> str | None:
        """The next image to review after ``after`` in :meth:`order` (wrapping round): one that is
        not accepted (drafts first come in order too); None when every image is accepted."""
        order = self.order()
        start = self._position[after] + 1 if after in self.items else 0
        for image_id in order[start:] + order[:start]:
            if image_id != after and self.items[image_id].status != ACCEPTED:
                return image_id
        return None

    def neighbour(self, image_id: str | None, step: int) -> str | None:
        """The id ``step`` places from ``image_id`` in :meth:`order` (Previous/Next), or None."""
        order = self.order()
        if not order:
            return None
        if image_id not in self.items:
            return order[0]
        j = self._position[image_id] + step
        return order[j] if 0 <= j < len(order) else None

    def set_prediction(self, image_id: str, cells: int, uncertainty: float | None) -> None:
        """Record the model's cell count and uncertainty of an image (accepted counts kept)."""
        item = self.items[image_id]
        if not item.accepted and not item.draft:
            item.cells = int(cells)
        if uncertainty is not None:
            item.uncertainty = float(uncertainty)

    def todo_ids(self) -> list[str]:
        return [i for i in self.order() if self.items[i].status == TODO]

    # ------------------------------------------------------------------ masks
    def start_labels(self, image_id: str, shape) -> np.ndarray | None:
        """The start CSV's masks of an image (None when the start CSV has no rows for it)."""
        if self._start is None or image_id not in self._start:
            return None
        try:
            return self._start.labels(image_id, shape=tuple(shape))
        except CsvError as exc:
            raise DatasetError(f"start CSV: {exc}") from None

    def accepted_labels(self, image_id: str, shape) -> np.ndarray | None:
        """The accepted masks of an image, read back from the output CSV (None if not accepted)."""
        if not self.items[image_id].accepted or not self.output_csv.exists():
            return None
        ann = _read_csv(self.output_csv, "output CSV")
        if image_id not in ann:
            return None
        try:
            return ann.labels(image_id, shape=tuple(shape))
        except CsvError as exc:
            raise DatasetError(f"output CSV: {exc}") from None

    def saved_labels(self, image_id: str, shape) -> tuple[np.ndarray | None, str]:
        """What to show for an image without running the model: ``(labels, source)`` with source
        ``"draft"``, ``"accepted"``, ``"start CSV"``; ``(None, "")`` when the model must run."""
        for source, read in (("draft", self.load_draft), ("accepted", self.accepted_labels),
                             ("start CSV", self.start_labels)):
            labels = read(image_id, shape)
            if labels is not None:
                return labels, source
        return None, ""

    def needs_model(self, image_id: str) -> bool:
        """True when nothing saved gives the image's masks (no draft, not accepted, not in the
        start CSV): the model must predict it. Names only, no file is read."""
        item = self.items[image_id]
        return not (item.draft or item.accepted or (self._start is not None and image_id in self._start))

    def _draft_path(self, image_id: str) -> Path:
        return self.drafts / f"{image_id}{DRAFT_SUFFIX}"

    def save_draft(self, image_id: str, labels) -> Path:
        """Keep the edited masks of an image beside the CSV (atomic): status becomes edited."""
        labels = _check_labels(image_id, labels)
        self.drafts.mkdir(exist_ok=True)
        path = self._draft_path(image_id)
        with atomic_write(path, "wb") as fh:
            np.savez_compressed(fh, labels=labels)
        item = self.items[image_id]
        item.draft, item.cells = True, _count(labels)
        return path

    def load_draft(self, image_id: str, shape=None) -> np.ndarray | None:
        """The draft of an image, or None. A draft that cannot be read, or of another size than
        ``shape``, raises DatasetError naming the file (it is left in place, never deleted)."""
        path = self._draft_path(image_id)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                labels = np.asarray(data["labels"])
        except (OSError, ValueError, KeyError) as exc:
            raise DatasetError(f"{path}: cannot read the draft ({exc}); move it away to start "
                               "this image again") from None
        if labels.ndim != 2 or labels.dtype.kind not in "iu" or (
                shape is not None and labels.shape != tuple(shape)):
            raise DatasetError(f"{path}: the draft holds a {labels.dtype} array of shape "
                               f"{labels.shape}, not the image's {tuple(shape) if shape else '2-D'} "
                               "labels; move it away to start this image again")
        return labels

    def discard_draft(self, image_id: str) -> None:
        self._draft_path(image_id).unlink(missing_ok=True)
        self.items[image_id].draft = False

    def accept(self, image_id: str, labels) -> int:
        """Write the image's masks into the output CSV (train format; other ids' rows kept;
        atomic; under the output lock every CSV writer takes, ``write_annotations``), drop its
        draft; returns the number of cells. Raises DatasetError (lock held, a CSV of another
        format...) with nothing written."""
        from napari_cellseg.io.atomic import OutputLockError, output_lock

        labels = _check_labels(image_id, labels)
        try:
            # asked first without waiting: a cellseg predict run holds the lock for its whole
            # run, and the writer's own wait would freeze the napari window meanwhile
            with output_lock(self.output_csv, wait=0, what="writer (e.g. cellseg predict)"):
                pass
            write_annotations(self.output_csv, {image_id: labels}, format="train",
                              merge=self.output_csv.exists())
        except (OutputLockError, CsvError) as exc:
            raise DatasetError(f"{image_id} not accepted: {exc}") from None
        except OSError as exc:
            raise DatasetError(f"{self.output_csv}: cannot write ({exc.strerror or exc}); "
                               f"{image_id} not accepted") from None
        item = self.items[image_id]
        item.accepted, item.cells = True, _count(labels)
        self.discard_draft(image_id)
        return item.cells

    def accepted_ids(self) -> list[str]:
        return [i for i in self.order() if self.items[i].accepted]


def _count(labels) -> int:
    labels = np.asarray(labels)
    return int(np.unique(labels[labels > 0]).size)


def _check_labels(image_id: str, labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iub" or labels.size == 0:
        raise DatasetError(f"image {image_id!r}: masks must be a 2-D integer label image, got "
                           f"shape {labels.shape} dtype {labels.dtype}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise DatasetError(f"image {image_id!r}: negative label {labels.min()}")
    return labels

