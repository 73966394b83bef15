"""Read, validate and write annotation / submission CSVs (Kaggle Sartorius conventions).

Formats (detected from the header):
- ``train``:   ``id,annotation,width,height,...`` one row per cell, extra columns kept.
- ``kaggle``:  ``id,predicted`` one row per cell; an image without cells has an empty prediction.
- ``starter``: ``idx,id,annotation`` one row per cell; an image without cells has ``-1``.
  (``id,annotation`` without size columns is read as ``starter`` too.)

Every row is validated on reading; a problem raises :class:`CsvError` with a one-line message
``FILE: row N: problem`` where N counts rows as a spreadsheet does (the header is row 1, the
first data row is row 2). Writes are atomic. A valid header without data rows is a valid CSV of
no image (what ``cellseg predict`` writes when every image failed; Kaggle scores it as an empty
submission): it reads as an :class:`Annotations` with no ids, and each command that needs an
image says so in its own words (:data:`NO_ROWS` is the common phrase).

Shared rules (one home each, used by every reader and writer, the prediction journal included):
- fields and ids are stripped of :data:`napari_cellseg.io.rle.WHITESPACE` only (:func:`normalize_id`);
- csv's field limit is the longest RLE an image within ``MAX_PIXELS`` can need (:func:`csv_reader`);
- the text must be UTF-8 without NUL bytes; header columns must be unique.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping

import numpy as np

from napari_cellseg.io.atomic import atomic_write, output_lock
from napari_cellseg.io.rle import (MAX_PIXELS, MAX_RLE_CHARS, RleError, check_size, labels_to_rles, parse_rles, rles_to_labels, strip_field)

__all__ = ["CsvError", "Annotations", "read_annotations", "write_annotations", "FORMATS",
           "normalize_id", "csv_reader", "MAX_FIELD_CHARS", "NO_ROWS", "csv_format", "csv_has_rows",
           "utf16_message", "detect_format", "format_columns", "value_column", "EMPTY_VALUE", "refuse_replacing"]

NO_ROWS = "has no rows after the header (no image)"  # "FILE has no rows...": every command's wording

FORMATS = ("kaggle", "starter", "train")
_COLUMNS = {
    "kaggle": ["id", "predicted"],
    "starter": ["idx", "id", "annotation"],
    "train": ["id", "annotation", "width", "height"],
}
_EMPTY = {"kaggle": "", "starter": "-1", "train": ""}
EMPTY_VALUE = _EMPTY  # the value of the one row of an image without cells, per format


def format_columns(fmt: str) -> list[str]:
    """The columns a new CSV of format ``fmt`` gets (extra columns of an existing file are kept)."""
    return list(_COLUMNS[fmt])


def value_column(fmt: str) -> str:
    """The column that holds the RLE in format ``fmt``."""
    return "predicted" if fmt == "kaggle" else "annotation"


def refuse_replacing(path, how: str = "--overwrite to replace it") -> None:
    """ValueError (one line) when the CSV ``path`` holds data rows: they may be hand corrections
    exported from napari, so a new output never replaces them unless asked (``how``)."""
    if csv_has_rows(path):
        raise ValueError(f"{path}: the file already holds rows (they may be hand corrections); "
                         f"nothing written; pass {how}, or choose another file")
MAX_CSV_BYTES = 2**31  # 2 GiB: refused before reading (the Kaggle train.csv is ~0.1 GiB)
MAX_FIELD_CHARS = MAX_RLE_CHARS + 64  # csv's per-field limit: any RLE an allowed image can need
LOCK_WAIT = 30.0  # seconds a CSV write waits for another writer of the same file (a merge takes ~1 s)


def normalize_id(image_id: str) -> str:
    """The one normalisation of image ids, for readers and writers alike: surrounding
    :data:`~napari_cellseg.io.rle.WHITESPACE` removed, nothing else changed."""
    return strip_field(str(image_id))


def csv_reader(fh, **kwargs):
    """``csv.reader(fh)`` with the field limit raised to :data:`MAX_FIELD_CHARS` (the one place
    that sets it), so every CSV this package writes can be read back."""
    if csv.field_size_limit() < MAX_FIELD_CHARS:
        csv.field_size_limit(MAX_FIELD_CHARS)
    return csv.reader(fh, **kwargs)


class CsvError(ValueError):
    """A bad annotation CSV: ``FILE: row N: problem`` (row 1 is the header)."""


def detect_format(path: Path, header: list[str]) -> str:
    cols = set(header)
    if len(cols) != len(header):
        seen = set()
        for column in header:
            if column in seen:
                raise CsvError(f"{path}: row 1 (header): duplicate column {column!r}")
            seen.add(column)
    if "id" not in cols:
        raise CsvError(f"{path}: row 1 (header): missing column 'id' (found: {','.join(header)})")
    if "predicted" in cols:
        return "kaggle"
    if "annotation" not in cols:
        raise CsvError(f"{path}: row 1 (header): missing column 'annotation' or 'predicted'")
    if "width" in cols or "height" in cols:
        for col in ("width", "height"):
            if col not in cols:
                raise CsvError(f"{path}: row 1 (header): missing column '{col}'")
        return "train"
    return "starter"


def csv_format(path, default: str, allowed=FORMATS) -> str:
    """The format to write when rows are added to an existing CSV and no format was asked for
    (``cellseg predict --resume``, ``to-csv --merge``): the file's own (from its header row), so
    adding rows never converts a starter file to kaggle behind the user's back; ``default`` when
    there is no such file, its header cannot tell (the full read reports a bad file), or its
    format is not in ``allowed``."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header = next(csv_reader(fh), None)
        fmt = detect_format(path, [strip_field(h) for h in header]) if header else default
    except (OSError, ValueError, csv.Error):  # no file, not UTF-8 (ValueError), NUL bytes, bad header
        return default
    return fmt if fmt in allowed else default


def utf16_message(path, head: bytes) -> str | None:
    """The one line for a CSV saved as UTF-16 (Excel's "Unicode text", Windows tools): a byte-order
    mark, or NUL bytes at every other place of ASCII text; None for anything else. ``head``: the
    first bytes of the file (a few KiB are plenty)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        kind = "a UTF-16 byte-order mark"
    else:
        sample = head[:512]
        even, odd = sample[0::2], sample[1::2]
        if len(sample) < 4 or not (even.count(0) == len(even) or odd.count(0) == len(odd)):
            return None
        kind = "NUL bytes between the letters"
    return f"{path}: the CSV is UTF-16 text ({kind}), not UTF-8; re-save it as UTF-8 (CSV UTF-8 in Excel)"


def csv_has_rows(path) -> bool:
    """True when ``path`` is a file with at least one line after its header (data rows an output
    must not replace unless asked); a missing or header-only file has none."""
    try:
        with open(path, "rb") as fh:
            lines = (line for line in fh if line.strip())
            return next(lines, None) is not None and next(lines, None) is not None
    except (FileNotFoundError, IsADirectoryError):
        return False


def _read_rows(path: Path) -> list[list[str]]:
    try:
        n_bytes = path.stat().st_size
    except OSError as exc:
        raise CsvError(f"{path}: cannot read ({exc.strerror})") from None
    if n_bytes > MAX_CSV_BYTES:
        raise CsvError(f"{path}: file of {n_bytes:,} bytes is over the limit of {MAX_CSV_BYTES:,} "
                       f"bytes for an annotation CSV (split it)")
    data = path.read_bytes()
    if not data.strip():
        raise CsvError(f"{path}: empty file (expected a CSV header row)")
    utf16 = utf16_message(path, data[:4096])
    if utf16:
        raise CsvError(utf16)
    nul = data.find(b"\x00")
    if nul >= 0:
        row = data.count(b"\n", 0, nul) + 1
        raise CsvError(f"{path}: row {row}: NUL byte at offset {nul} (a binary file, not a text CSV)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        row = data.count(b"\n", 0, exc.start) + 1
        raise CsvError(f"{path}: row {row}: not a UTF-8 text CSV (bad byte 0x{data[exc.start]:02x} at "
                       f"offset {exc.start}); save the CSV as UTF-8") from None
    reader = csv_reader(io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as exc:
        raise CsvError(f"{path}: row {reader.line_num}: {exc}") from None


def _positive_int(path, row, column, text) -> int:
    text = strip_field(text)
    if not text.isascii() or not text.isdigit() or int(text) <= 0:
        raise CsvError(f"{path}: row {row}: {column} {text!r} is not a positive integer")
    return int(text)


class Annotations:
    """A validated annotation CSV. See the module docstring for the formats."""

    def __init__(self, path: Path, fmt: str, table, rows: list[int]):
        self.path = path
        self.format = fmt
        self.table = table  # pandas DataFrame, one row per CSV row, extra columns kept
        self._rows = rows  # spreadsheet row number of each table row
        self._column = "predicted" if fmt == "kaggle" else "annotation"
        self._index: dict[str, list[int]] = {}
        for i, image_id in enumerate(table["id"].tolist()):
            self._index.setdefault(image_id, []).append(i)
        self._shapes: dict[str, tuple[int, int]] = {}
        if fmt == "train":
            heights, widths = table["height"].tolist(), table["width"].tolist()
            for image_id, pos in self._index.items():
                self._shapes[image_id] = (heights[pos[0]], widths[pos[0]])

    def __repr__(self) -> str:
        return f"Annotations({str(self.path)!r}, format={self.format!r}, images={len(self.ids)})"

    @property
    def ids(self) -> list[str]:
        """Image ids in file order (first appearance)."""
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id) -> bool:
        return image_id in self._index

    def _positions(self, image_id) -> list[int]:
        if image_id not in self._index:
            raise CsvError(f"{self.path}: no rows for image id {image_id!r}")
        values = self.table[self._column]
        return [i for i in self._index[image_id] if values.iat[i] not in ("", "-1")]

    def rows(self):
        """``(id, value)`` of every data row in file order; ``""`` for a row meaning 'no cell'.
        Values are validated RLE strings (checked against width/height when the file has them)."""
        values = self.table[self._column].tolist()
        for image_id, value in zip(self.table["id"].tolist(), values):
            yield image_id, "" if value == "-1" else value

    def rles(self, image_id) -> list[str]:
        """RLE strings of one image in file order (rows meaning 'no cell' left out)."""
        values = self.table[self._column]
        return [values.iat[i] for i in self._positions(image_id)]

    def shape(self, image_id) -> tuple[int, int] | None:
        """``(height, width)`` from the width/height columns, or None when the file has none."""
        if image_id not in self._index:
            raise CsvError(f"{self.path}: no rows for image id {image_id!r}")
        return self._shapes.get(image_id)

    def _shape_for(self, image_id, shape) -> tuple[int, int]:
        known = self.shape(image_id)
        if shape is not None:
            shape = (int(shape[0]), int(shape[1]))
            if known is not None and known != shape:
                raise CsvError(
                    f"{self.path}: row {self._rows[self._index[image_id][0]]}: image "
                    f"{image_id!r} is {known[1]}x{known[0]} (width x height) in the file, "
                    f"not {shape[1]}x{shape[0]}"
                )
        shape = shape or known
        if shape is None:
            raise CsvError(
                f"{self.path}: row {self._rows[self._index[image_id][0]]}: unknown width/height "
                f"for image {image_id!r} (the file has no width/height columns; give the size)"
            )
        try:
            check_size(*shape)
        except ValueError as exc:
            raise CsvError(f"{self.path}: image {image_id!r}: {exc}") from None
        return shape

    def _raise_rle(self, positions, exc: RleError, prefixed: bool) -> None:
        row = self._rows[positions[exc.index]]
        message = str(exc).split(": ", 1)[1] if prefixed else str(exc)  # drop "mask K: "
        raise CsvError(f"{self.path}: row {row}: {self._column}: {message}") from None

    def check(self, image_id, shape=None) -> tuple[int, int]:
        """Check every row of one image against its size (from the file or ``shape``) without
        painting anything; returns ``(height, width)``. Raises CsvError naming the row."""
        shape = self._shape_for(image_id, shape)
        positions = self._positions(image_id)
        values = self.table[self._column]
        try:
            parse_rles([values.iat[i] for i in positions], shape[0] * shape[1])
        except RleError as exc:
            self._raise_rle(positions, exc, prefixed=False)
        return shape

    def labels(self, image_id, shape=None) -> np.ndarray:
        """int32 label image of one image, ids 1..N in row order (earlier rows win overlaps)."""
        shape = self._shape_for(image_id, shape)
        positions = self._positions(image_id)
        values = self.table[self._column]
        try:
            return rles_to_labels([values.iat[i] for i in positions], shape)
        except RleError as exc:
            self._raise_rle(positions, exc, prefixed=True)


def read_annotations(path) -> Annotations:
    """Read and validate a train / kaggle / starter CSV (format detected from the header)."""
    import pandas as pd

    path = Path(path)
    rows = _read_rows(path)
    header = [strip_field(h) for h in rows[0]]
    fmt = detect_format(path, header)
    column = "predicted" if fmt == "kaggle" else "annotation"
    records, row_numbers = [], []
    for n, fields in enumerate(rows[1:], start=2):
        if not fields or (len(fields) == 1 and not strip_field(fields[0])):
            continue  # blank line
        if len(fields) != len(header):
            raise CsvError(f"{path}: row {n}: {len(fields)} fields, the header has {len(header)}")
        records.append(fields)
        row_numbers.append(n)
    table = pd.DataFrame(records, columns=header, dtype=str)
    table["id"] = [normalize_id(v) for v in table["id"].tolist()]
    table[column] = [strip_field(v) for v in table[column].tolist()]
    for i in np.flatnonzero((table["id"] == "").to_numpy()):
        raise CsvError(f"{path}: row {row_numbers[i]}: empty id")

    sizes = None
    if fmt == "train":
        seen: dict[str, tuple[int, int, int]] = {}
        widths, heights = [], []
        for image_id, w, h, n in zip(table["id"], table["width"], table["height"], row_numbers):
            w, h = _positive_int(path, n, "width", w), _positive_int(path, n, "height", h)
            if w * h > MAX_PIXELS:
                raise CsvError(f"{path}: row {n}: image size {w}x{h} (width x height) is over the "
                               f"limit of {MAX_PIXELS:,} (2^28) pixels")
            first = seen.setdefault(image_id, (w, h, n))
            if first[:2] != (w, h):
                raise CsvError(
                    f"{path}: row {n}: width/height {w}x{h} differ from {first[0]}x{first[1]} "
                    f"given for image {image_id!r} in row {first[2]}"
                )
            widths.append(w)
            heights.append(h)
        table["width"], table["height"] = widths, heights
        sizes = np.asarray(widths, dtype=np.int64) * np.asarray(heights, dtype=np.int64)

    values = table[column].tolist()
    filled = [i for i, v in enumerate(values) if v not in ("", "-1")]
    try:
        parse_rles([values[i] for i in filled], None if sizes is None else sizes[filled])
    except RleError as exc:
        raise CsvError(f"{path}: row {row_numbers[filled[exc.index]]}: {column}: {exc}") from None
    return Annotations(path, fmt, table, row_numbers)


def _check_labels(image_id, labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iub" or labels.size == 0:
        raise ValueError(
            f"image {image_id!r}: labels must be a non-empty 2-D integer image, "
            f"got shape {labels.shape} dtype {labels.dtype}"
        )
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError(f"image {image_id!r}: negative label {labels.min()}")
    return labels


def _old_rows(path: Path, fmt: str, replaced) -> tuple[list[dict], list[str]]:
    """Rows of other images already in ``path``, converted to ``fmt``, and their extra columns."""
    if not path.exists():
        return [], []
    old = read_annotations(path)
    extra = [c for c in old.table.columns if c not in ("idx", "id", "annotation", "predicted",
                                                         "width", "height")]
    rows = []
    for record in old.table.to_dict("records"):
        image_id = record["id"]
        if image_id in replaced:
            continue
        value = record.get("predicted", record.get("annotation", ""))
        row = {c: record[c] for c in extra}
        row.update(id=image_id, value="" if value in ("", "-1") else value)
        if fmt == "train":
            shape = old.shape(image_id)
            if shape is None:
                raise CsvError(
                    f"{path}: cannot merge: the file has no width/height for image "
                    f"{image_id!r}; write format 'kaggle' or 'starter' instead of 'train'"
                )
            row.update(height=shape[0], width=shape[1])
        rows.append(row)
    return rows, extra


def write_annotations(path, items: Mapping[str, np.ndarray], format: str = "kaggle",
                      merge: bool = False, overwrite: bool = True) -> Path:
    """Write label images as one CSV row per cell (atomic, under the file's output_lock).

    ``items`` maps image id -> 2-D integer label image. An image with no cell gets one row
    with an empty prediction (kaggle, train) or ``-1`` (starter). ``merge=True`` keeps the rows
    of other images already in ``path`` (and their extra columns) and replaces the rows of these
    ids. ``overwrite=False`` (without ``merge``) refuses to replace a file that holds rows.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown CSV format {format!r} (choose from {', '.join(FORMATS)})")
    path = Path(path)
    new_rows, given = [], {}
    for raw_id, labels in items.items():
        image_id = normalize_id(raw_id)
        if not image_id:
            raise ValueError(f"image id {raw_id!r} is empty")
        if image_id in given:
            raise ValueError(f"image ids {given[image_id]!r} and {raw_id!r} give the same id "
                             f"{image_id!r}")
        given[image_id] = raw_id
        labels = _check_labels(image_id, labels)
        h, w = labels.shape
        rles = labels_to_rles(labels) or [""]
        new_rows.extend({"id": image_id, "value": r, "height": h, "width": w} for r in rles)
    with output_lock(path, wait=LOCK_WAIT, what="writer (cellseg predict, to-csv or a napari export)"):
        # under the lock: the rows kept are the ones in the file now, not before another writer
        if not merge and not overwrite:
            refuse_replacing(path, "--merge to replace only these images' rows, or --overwrite")
        old_rows, extra = _old_rows(path, format, set(given)) if merge else ([], [])
        columns = _COLUMNS[format] + extra
        value_column = "predicted" if format == "kaggle" else "annotation"
        with atomic_write(path, "w") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(columns)
            for idx, row in enumerate(old_rows + new_rows):
                row = dict(row, idx=idx)
                row[value_column] = row.pop("value") or _EMPTY[format]
                writer.writerow([row.get(c, "") for c in columns])
    return path

