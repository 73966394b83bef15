"""The ranking CSV of ``cellseg rank`` (read by the dataset review dock to order its queue).

Columns :data:`COLUMNS`: ``id`` (as ``cellseg predict`` names images: file stem, ``<stem>_<plane>``
for stack planes), ``uncertainty`` (the image's, in [0, 1], higher = look first), ``cells``
(cells drawn with the checkpoint's thresholds), ``doubtful_cells`` (cells whose own uncertainty
is above :data:`DOUBTFUL`), ``diameter`` (the object size the image was predicted at, image px;
empty when unknown) and ``file`` (the image path as given; a stack plane's path). Rows are
sorted worst first (uncertainty descending, then id). Written atomically; crash-safe streaming
goes through a journal beside the file (:mod:`napari_cellseg.io.journal`), folded in by
:func:`flush_ranking`. numpy/stdlib only.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

from napari_cellseg.io.journal import journal_paths, normalize_id, read_journal

__all__ = ["COLUMNS", "DOUBTFUL", "RankingError", "read_ranking", "write_ranking", "flush_ranking",
           "ranked_ids", "sort_rows"]

COLUMNS = ("id", "uncertainty", "cells", "doubtful_cells", "diameter", "file")
DOUBTFUL = 0.5


class RankingError(ValueError):
    """A ranking CSV that cannot be read: names the file and the row."""


def sort_rows(rows: Iterable[dict]) -> list[dict]:
    """Worst first: uncertainty descending, then id."""
    return sorted(rows, key=lambda r: (-float(r["uncertainty"]), str(r["id"])))


def _check_row(path, n: int, row: dict) -> dict:
    where = f"{path}: row {n}"
    image_id = normalize_id(row.get("id") or "")
    if not image_id or "\0" in image_id:
        raise RankingError(f"{where}: empty id")
    try:
        u = float(row["uncertainty"])
    except (TypeError, ValueError):
        raise RankingError(f"{where}: uncertainty must be a number in [0, 1], got {row['uncertainty']!r}") from None
    if not (math.isfinite(u) and 0.0 <= u <= 1.0):
        raise RankingError(f"{where}: uncertainty must be a number in [0, 1], got {row['uncertainty']!r}")
    out = {"id": image_id, "uncertainty": u}
    for key in ("cells", "doubtful_cells"):
        text = (row.get(key) or "").strip()
        if not text.isdigit():
            raise RankingError(f"{where}: {key} must be a whole number >= 0, got {row.get(key)!r}")
        out[key] = int(text)
    text = (row.get("diameter") or "").strip()
    try:
        out["diameter"] = float(text) if text else None
    except ValueError:
        raise RankingError(f"{where}: diameter must be a number of pixels or empty, got {text!r}") from None
    out["file"] = row.get("file") or ""
    return out


def read_ranking(path) -> list[dict]:
    """The rows of a ranking CSV (dicts with :data:`COLUMNS`, numbers parsed), in file order.
    RankingError names the file and row (the header is row 1) of anything wrong."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("id", "uncertainty", "cells", "doubtful_cells") if c not in (reader.fieldnames or [])]
            if missing:
                raise RankingError(f"{path}: not a cellseg rank CSV (missing column(s) {', '.join(missing)}; "
                                   f"header: {','.join(reader.fieldnames or [])})")
            rows, seen = [], set()
            for n, row in enumerate(reader, start=2):
                if None in row or any(v is None for v in row.values()):
                    raise RankingError(f"{path}: row {n}: the field count differs from the header's")
                r = _check_row(path, n, row)
                if r["id"] in seen:
                    raise RankingError(f"{path}: row {n}: id {r['id']!r} appears twice")
                seen.add(r["id"])
                rows.append(r)
    except UnicodeDecodeError:
        raise RankingError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise RankingError(f"{path}: {exc}") from None
    return rows


def _fmt(row: dict) -> list:
    d = row.get("diameter")
    return [row["id"], f"{float(row['uncertainty']):.4f}", int(row["cells"]), int(row["doubtful_cells"]),
            "" if d is None else f"{float(d):.1f}", row.get("file") or ""]


def write_ranking(path, rows: Iterable[dict]) -> int:
    """Write ``rows`` sorted worst first, atomically; returns the number of rows."""
    from napari_cellseg.io.atomic import atomic_write

    rows = sort_rows(rows)
    with atomic_write(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(_fmt(r) for r in rows)
    return len(rows)


def ranked_ids(path) -> set[str]:
    """Ids already ranked: in the CSV (when it exists) or in a journal beside it."""
    path = Path(path)
    done = {r["id"] for r in read_ranking(path)} if path.exists() else set()
    for j in journal_paths(path):
        done.update(e["id"] for e in read_journal(j))
    return done


def flush_ranking(path, keep_existing: bool) -> int:
    """Atomically rewrite ``path`` = its rows (if ``keep_existing``) + the journal entries not in
    it yet, sorted worst first; then remove the journals. Returns the number of rows."""
    path = Path(path)
    journals = journal_paths(path)
    rows = {r["id"]: r for r in read_ranking(path)} if keep_existing and path.exists() else {}
    for j in journals:
        for n, e in enumerate(read_journal(j), start=1):
            if e["id"] not in rows:
                rows[e["id"]] = _check_row(j, n, {k: ("" if e.get(k) is None else str(e.get(k)))
                                                  for k in COLUMNS})
    count = write_ranking(path, rows.values())
    for j in journals:
        j.unlink(missing_ok=True)
    return count
