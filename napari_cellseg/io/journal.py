"""Crash-safe streaming output of ``cellseg predict``: per-rank journals + atomic CSV rewrites.

Each finished image is one JSON line ``{"id", "shape", "rles", "format"}`` appended (one ``write``) to
``.<out name>.rank<R>.journal`` beside the CSV. :func:`flush_csv` rewrites the CSV atomically as
its rows + every journal's rows not in it yet, then removes the journals; a kill between the two
steps only leaves rows that the next flush skips (dedup by id). A torn last journal line (kill -9
mid-write) is ignored. Hidden names (leading dot) keep journals and temp files out of image and
CSV listings.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Iterator

from napari_cellseg.io.annotations import csv_reader, normalize_id  # one id rule and one CSV field limit for readers and writers

__all__ = ["Journal", "journal_path", "journal_paths", "read_journal", "done_ids", "flush_csv",
           "normalize_id", "output_lock", "lock_path", "OutputLockError", "check_out", "journal_format"]


class OutputLockError(ValueError):
    """Another run holds the lock of this output CSV."""


def lock_path(out: Path, rank: int = 0) -> Path:
    return out.parent / f".{out.name}.rank{rank}.lock"


def check_out(out: Path) -> None:
    """``--out`` must name a file in an existing folder: refused (ValueError) before any work."""
    if out.is_dir():
        raise ValueError(f"{out}: --out is a folder; give a CSV file name, e.g. {out / 'predictions.csv'}")
    if str(out.parent) and not out.parent.is_dir():
        raise ValueError(f"{out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_file():
        raise ValueError(f"{out}: --out exists and is not a regular file")


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def output_lock(out: Path, rank: int = 0):
    """Exclusive lock on ``out`` and its rank's journal for the length of a run.

    The lock file ``.<out name>.rank<R>.lock`` is created, locked (flock, non-blocking) and
    removed on exit. A second run that finds it locked gets OutputLockError at once, before it
    touches any journal. (The lock is taken again when the holder removed the file between our
    open and lock: the inode check.) Every rank locks its own file, and rank 0 exists in every
    run, so two runs on one --out always collide."""
    out = Path(out)
    path = lock_path(out, rank)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise OutputLockError(f"{out}: another cellseg predict run is writing this file (lock "
                                  f"{path.name} is held); wait for it to finish or choose another --out")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


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


def _csv_rows(out: Path) -> Iterator[tuple[str, str]]:
    """``(id, value)`` rows of an existing kaggle / starter CSV, streamed ('' = no cell).

    Every row is checked before it is carried over (``--resume`` and the flushes): text that is
    not UTF-8, NUL bytes, a wrong field count, an empty id or an invalid RLE raise ValueError
    naming the file and the row (spreadsheet numbering: the header is row 1)."""
    from napari_cellseg.io.rle import rle_runs, strip_field

    with open(out, encoding="utf-8-sig", newline="") as fh:
        reader = csv_reader(fh)
        n = 1
        try:
            header = [strip_field(h) for h in next(reader, [])]
            col = "predicted" if "predicted" in header else "annotation"
            if "id" not in header or col not in header:
                raise ValueError(f"{out}: cannot resume: not a kaggle (id,predicted) or starter "
                                 f"(idx,id,annotation) CSV (header: {','.join(header)})")
            i, v = header.index("id"), header.index(col)
            for n, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{out}: row {n}: {len(row)} fields, the header has {len(header)}")
                image_id, value = normalize_id(row[i]), strip_field(row[v])
                if "\0" in image_id or "\0" in value:
                    raise ValueError(f"{out}: row {n}: NUL byte in the row")
                if not image_id:
                    raise ValueError(f"{out}: row {n}: empty id")
                value = "" if value == "-1" else value
                try:
                    rle_runs(value)
                except ValueError as exc:
                    raise ValueError(f"{out}: row {n}: invalid RLE: {exc}") from None
                yield image_id, value
        except UnicodeDecodeError as exc:
            raise ValueError(f"{out}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} after row {n}); "
                             "cannot resume onto it") from None
        except csv.Error as exc:
            raise ValueError(f"{out}: row {reader.line_num}: {exc}") from None


def journal_format(out: Path) -> str | None:
    """The CSV format a run on ``out`` was started with, as its journals record it (``--resume``
    after a kill before the first flush, when ``out`` has no header yet); None when no entry
    records one (no journal, or one written before the format was recorded)."""
    for j in journal_paths(out):
        for e in read_journal(j):
            if e.get("format") in ("kaggle", "starter"):
                return e["format"]
    return None


def done_ids(out: Path) -> set[str]:
    """Ids already predicted: in the output CSV or in any rank's journal."""
    done = {image_id for image_id, _ in _csv_rows(out)} if out.exists() else set()
    for j in journal_paths(out):
        done.update(e["id"] for e in read_journal(j))
    return done


def flush_csv(out: Path, fmt: str, keep_existing: bool) -> int:
    """Atomically rewrite ``out`` = its rows (if ``keep_existing``) + every journal's rows not in it
    yet; then remove the journals. Returns the number of images in the new CSV.

    With no row at all, a fresh run (``keep_existing`` false) still replaces an existing ``out``
    with a header-only CSV: its old rows belong to an earlier run the user asked to replace.
    Otherwise no header-only CSV is left behind."""
    journals = journal_paths(out)
    seen: set[str] = set()
    try:
        _write_merged(out, fmt, keep_existing, journals, seen,
                      allow_empty=not keep_existing and out.exists())
    except _NothingToWrite:
        pass
    for j in journals:
        j.unlink(missing_ok=True)
    return len(seen)


class _NothingToWrite(Exception):
    pass


def _write_merged(out: Path, fmt: str, keep_existing: bool, journals, seen: set,
                  allow_empty: bool = False) -> None:
    from napari_cellseg.io.atomic import atomic_write

    with atomic_write(out, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["id", "predicted"] if fmt == "kaggle" else ["idx", "id", "annotation"])
        idx = 0

        def put(image_id, value):
            nonlocal idx
            writer.writerow([image_id, value] if fmt == "kaggle" else [idx, image_id, value or "-1"])
            idx += 1

        if keep_existing and out.exists():
            last = None
            for image_id, value in _csv_rows(out):
                if image_id != last and image_id in seen:
                    continue  # (a duplicate id can only come from a hand-edited file)
                seen.add(image_id)
                last = image_id
                put(image_id, value)
        for j in journals:
            for e in read_journal(j):
                if e["id"] in seen:
                    continue  # folded in by an earlier flush that was killed before cleaning up
                seen.add(e["id"])
                for value in e["rles"] or [""]:
                    put(e["id"], value)
        if idx == 0 and not allow_empty:
            raise _NothingToWrite  # aborts the atomic write: ``out`` stays as it was


class Journal:
    """Append-only JSON-lines journal of finished images (one write per image); ``fmt``: the
    run's CSV format, recorded in every entry (:func:`journal_format`)."""

    def __init__(self, path: Path, fmt: str | None = None):
        self.path, self.fmt = path, fmt
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size and os.pread(self.fd, 1, size - 1) != b"\n":
            os.write(self.fd, b"\n")  # end a line torn by a crash: it is skipped when read

    def add(self, image_id: str, shape, rles: list[str]) -> None:
        entry = {"id": normalize_id(image_id), "shape": list(shape), "rles": rles}
        if self.fmt is not None:
            entry["format"] = self.fmt
        self.add_entry(entry)

    def add_entry(self, entry: dict) -> None:
        """Append one finished item (a JSON object with a str "id"), one write: the generic form
        of :meth:`add` (``cellseg rank`` journals its rows with it)."""
        line = json.dumps(entry) + "\n"
        os.write(self.fd, line.encode("utf-8"))

    def close(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
