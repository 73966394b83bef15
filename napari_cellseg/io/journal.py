"""Crash-safe streaming output of ``cellseg predict``: per-rank journals + atomic CSV rewrites.

Each finished image is one JSON line ``{"id", "shape", "rles", "format"[, "replaces"]}`` appended
(one ``write``) to ``.<out name>.rank<R>.journal`` beside the CSV. :func:`flush_csv` rewrites the
CSV atomically as its rows (those of images a journal has again left out) + every journal's
rows, then removes the journals; a kill between the two steps only leaves rows that the next
flush folds in again (dedup by id). ``replaces`` marks entries of a run whose CSV at ``--out``
still holds an older run's rows: a ``--resume`` of it redoes every image not in its journal. A torn last journal line (kill -9
mid-write) is ignored. Hidden names (leading dot) keep journals and temp files out of image and
CSV listings.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterator

from napari_cellseg.io.annotations import csv_reader, normalize_id  # one id rule and one CSV field limit for readers and writers

__all__ = ["Journal", "journal_path", "journal_paths", "read_journal", "done_ids", "flush_csv",
           "normalize_id", "check_out", "journal_format", "journal_replaces"]


def check_out(out: Path) -> None:
    """``--out`` must name a file in an existing folder: refused (ValueError) before any work."""
    if out.is_dir():
        raise ValueError(f"{out}: --out is a folder; give a CSV file name, e.g. {out / 'predictions.csv'}")
    if str(out.parent) and not out.parent.is_dir():
        raise ValueError(f"{out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_file():
        raise ValueError(f"{out}: --out exists and is not a regular file")


def journal_paths(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.rank*.journal"))


def journal_path(out: Path, rank: int) -> Path:
    return out.parent / f".{out.name}.rank{rank}.journal"


def _rank_of(path: Path) -> int:
    try:
        return int(path.name.rsplit(".rank", 1)[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


def read_journal(path: Path) -> Iterator[dict]:
    """Complete entries of a journal; a torn last line (kill -9 mid-write) is ignored."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                yield entry


class _CsvRows:
    """The rows of an existing output CSV, streamed and checked: ``header`` (stripped column
    names), ``format`` (annotations' detection) and, iterated, ``(id, value, fields)`` per data
    row ('' = no cell; ``fields``: the row as written, for the columns a flush keeps).

    Every row is checked before it is carried over (``--resume`` and the flushes): text that is
    not UTF-8 (UTF-16 named as such), NUL bytes, a wrong field count, an empty id or an invalid
    RLE raise ValueError naming the file and the row (spreadsheet numbering: the header is row 1)."""

    def __init__(self, out: Path):
        from napari_cellseg.io.annotations import detect_format, utf16_message
        from napari_cellseg.io.rle import strip_field

        self.out = out
        with open(out, "rb") as fh:
            problem = utf16_message(out, fh.read(4096))
        if problem:
            raise ValueError(f"{problem}; cannot add rows to it")
        rows = self._rows()
        try:
            self.header = [strip_field(h) for h in next(rows, (0, []))[1]]
        finally:
            rows.close()
        if "id" not in self.header or not {"predicted", "annotation"} & set(self.header):
            raise ValueError(f"{out}: cannot resume: not a kaggle (id,predicted), starter "
                             f"(idx,id,annotation) or train (id,annotation,width,height) CSV "
                             f"(header: {','.join(self.header)})")
        self.format = detect_format(out, self.header)

    def _rows(self):
        out = self.out
        with open(out, encoding="utf-8-sig", newline="") as fh:
            reader = csv_reader(fh)
            n = 1
            try:
                for n, row in enumerate(reader, start=1):
                    yield n, row
            except UnicodeDecodeError as exc:
                raise ValueError(f"{out}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} after row {n}); "
                                 "cannot resume onto it; re-save it as UTF-8") from None
            except csv.Error as exc:
                raise ValueError(f"{out}: row {reader.line_num}: {exc}") from None

    def __iter__(self):
        from napari_cellseg.io.rle import rle_runs, strip_field

        out, header = self.out, self.header
        i = header.index("id")
        v = header.index("predicted" if "predicted" in header else "annotation")
        for n, row in self._rows():
            if n == 1 or not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{out}: row {n}: {len(row)} fields, the header has {len(header)}")
            image_id, value = normalize_id(row[i]), strip_field(row[v])
            if any("\0" in f for f in row):
                raise ValueError(f"{out}: row {n}: NUL byte in the row")
            if not image_id:
                raise ValueError(f"{out}: row {n}: empty id")
            value = "" if value == "-1" else value
            try:
                rle_runs(value)
            except ValueError as exc:
                raise ValueError(f"{out}: row {n}: invalid RLE: {exc}") from None
            yield image_id, value, row


def _journal_entries(out: Path) -> Iterator[dict]:
    for j in journal_paths(out):
        yield from read_journal(j)


def journal_format(out: Path) -> str | None:
    """The CSV format a run on ``out`` was started with, as its journals record it (``--resume``
    after a kill before the first flush, when ``out`` has no header yet); None when no entry
    records one (no journal, or one written before the format was recorded)."""
    for e in _journal_entries(out):
        if e.get("format") in ("kaggle", "starter", "train"):
            return e["format"]
    return None


def journal_replaces(out: Path) -> bool:
    """True when the journals of ``out`` were written by a run that replaces ``out`` (a fresh run,
    or a resume of one) before its first rewrite of it: the CSV at ``out`` still holds an older
    run's rows, which are not this run's work (``--resume`` must not skip their ids)."""
    return any(e.get("replaces") for e in _journal_entries(out))


def done_ids(out: Path, csv_rows: bool = True) -> set[str]:
    """Ids already predicted: in the output CSV (``csv_rows``) or in any rank's journal."""
    done = {image_id for image_id, _, _ in _CsvRows(out)} if csv_rows and out.exists() else set()
    done.update(e["id"] for e in _journal_entries(out))
    return done


def flush_csv(out: Path, fmt: str, keep_existing: bool, drop_ids=None) -> int:
    """Atomically rewrite ``out`` = its rows (if ``keep_existing``; those of images that a journal
    has again are left out: the journal's are the newer) + every journal's rows; then remove the
    journals. Returns the number of images in the new CSV.

    Kept rows keep the file's columns (train's width/height, extra columns such as a reviewer's
    name; new rows leave extra columns empty), unless ``fmt`` asks for another format. Kept rows
    of the ids in ``drop_ids`` are left out too (a run that replaces ``out`` predicts them). With no
    row at all, a fresh run (``keep_existing`` false) still replaces an existing ``out`` with a
    header-only CSV (the caller refused that unless asked). Otherwise no header-only CSV is left
    behind."""
    journals = journal_paths(out)
    seen: set[str] = set()
    try:
        _write_merged(out, fmt, keep_existing and out.exists(), journals, seen,
                      allow_empty=not keep_existing and out.exists(), drop_ids=drop_ids)
    except _NothingToWrite:
        pass
    for j in journals:
        j.unlink(missing_ok=True)
    return len(seen)


class _NothingToWrite(Exception):
    pass


class _RowWriter:
    """CSV rows in the columns of the output: ``put(id, value, fields of the old row or None, shape)``."""

    def __init__(self, fh, fmt: str, old_header: list[str] | None, old_format: str | None):
        from napari_cellseg.io.annotations import EMPTY_VALUE, format_columns, value_column

        base = format_columns(fmt)
        if old_header is not None and old_format == fmt:
            self.columns = list(old_header)  # the file's own columns, in its order
        else:
            self.columns = base + [c for c in (old_header or []) if c not in
                                   ("idx", "id", "annotation", "predicted", "width", "height")]
        self.old_header = old_header or []
        self.value, self.empty = value_column(fmt), EMPTY_VALUE[fmt]
        self.writer = csv.writer(fh, lineterminator="\n")
        self.writer.writerow(self.columns)
        self.count = 0

    def put(self, image_id: str, value: str, fields: list[str] | None, shape=None) -> None:
        row = dict(zip(self.old_header, fields)) if fields is not None else {}
        row.update(id=image_id, idx=str(self.count))
        row[self.value] = value or self.empty
        if shape is not None:
            row.update(height=str(int(shape[0])), width=str(int(shape[1])))
        elif fields is None and ("width" in self.columns or "height" in self.columns):
            raise ValueError(f"image {image_id!r}: no size to write in the width/height columns")
        self.writer.writerow([row.get(c, "") for c in self.columns])
        self.count += 1


def _write_merged(out: Path, fmt: str, keep_existing: bool, journals, seen: set,
                  allow_empty: bool = False, drop_ids=None) -> None:
    from napari_cellseg.io.atomic import atomic_write

    old = _CsvRows(out) if keep_existing else None
    newer = {e["id"] for j in journals for e in read_journal(j)} if keep_existing else set()
    newer.update(drop_ids or ())
    with atomic_write(out, "w") as fh:
        rows = _RowWriter(fh, fmt, old.header if old else None, old.format if old else None)
        if old is not None:
            last = None
            for image_id, value, fields in old:
                if image_id in newer or (image_id != last and image_id in seen):
                    continue  # predicted again by this run / a duplicate id of a hand-edited file
                seen.add(image_id)
                last = image_id
                rows.put(image_id, value, fields)
        for j in journals:
            for e in read_journal(j):
                if e["id"] in seen:
                    continue  # (also: folded in by an earlier flush that was killed before cleaning up)
                seen.add(e["id"])
                for value in e["rles"] or [""]:
                    rows.put(e["id"], value, None, e.get("shape"))
        if rows.count == 0 and not allow_empty:
            raise _NothingToWrite  # aborts the atomic write: ``out`` stays as it was


class Journal:
    """Append-only JSON-lines journal of finished images (one write per image); ``fmt``: the
    run's CSV format, recorded in every entry (:func:`journal_format`); ``replaces``: recorded
    while the CSV at the output still holds an older run's rows (:func:`journal_replaces`)."""

    def __init__(self, path: Path, fmt: str | None = None, replaces: bool = False):
        self.path, self.fmt, self.replaces, self.fd = Path(path), fmt, bool(replaces), None
        self.reopen()

    def reopen(self) -> None:
        """Open (again, after :meth:`close`) for appending; a line torn by a crash is ended so it
        is skipped when read."""
        if self.fd is not None:
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size and os.pread(self.fd, 1, size - 1) != b"\n":
            self._write(b"\n")

    def _write(self, data: bytes) -> None:
        from napari_cellseg.io.atomic import disk_full_error

        try:
            os.write(self.fd, data)
        except OSError as exc:
            raise disk_full_error(exc, self.path) from None

    def add(self, image_id: str, shape, rles: list[str]) -> None:
        entry = {"id": normalize_id(image_id), "shape": list(shape), "rles": rles}
        if self.fmt is not None:
            entry["format"] = self.fmt
        if self.replaces:
            entry["replaces"] = True
        self.add_entry(entry)

    def add_entry(self, entry: dict) -> None:
        """Append one finished item (a JSON object with a str "id"), one write: the generic form
        of :meth:`add` (``cellseg rank`` journals its rows with it)."""
        self._write((json.dumps(entry) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
