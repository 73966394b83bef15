"""Kaggle run-length encoding <-> masks and label images (numpy only, vectorised).

Format (Kaggle "Sartorius Cell Instance Segmentation"): the mask is flattened row-major (C
order), pixels are numbered from 1 and the string is ``start length start length ...`` with
starts ascending. Runs we write never touch or overlap; when reading, runs may touch (the mask
is still unambiguous) but must not overlap or go backwards.

Whitespace: tokens are separated by :data:`WHITESPACE` (the six ASCII whitespace characters:
space, tab, LF, CR, VT, FF) and by nothing else. ``\x1c``-``\x1f``, ``\x85``, ``\xa0``,
``\u2028``, ``\u3000`` ... (which Python's ``str.split()`` / ``str.strip()`` treat as whitespace)
are refused as bad tokens. :func:`strip_field` strips the same set; the CSV readers use it, so a
field that passes the reader passes the decoder and vice versa.

Every validation problem raises :class:`ValueError` with a one-line message naming the problem
(callers such as :mod:`napari_cellseg.io.annotations` prefix file and row).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "rle_encode",
    "rle_decode",
    "labels_to_rles",
    "rles_to_labels",
    "rle_runs",
    "parse_rles",
    "RleError",
    "WHITESPACE",
    "strip_field",
    "MAX_PIXELS",
    "MAX_RLE_CHARS",
]

WHITESPACE = " \t\n\r\x0b\x0c"  # the one definition of whitespace for RLE strings and CSV fields
_WS = re.escape(WHITESPACE)  # for character classes
_ONLY_DIGITS_AND_SPACE = re.compile(f"[0-9{_WS}]*")
_BAD_TOKEN = re.compile(f"[^{_WS}]*[^0-9{_WS}][^{_WS}]*")
_SPLIT = re.compile(f"[{_WS}]+")
_HUGE_TOKEN = re.compile(r"[0-9]{19,}", re.ASCII)
_TOO_LARGE = 2**62
MAX_PIXELS = 2**28  # largest image (H*W) decoded: an int32 label image of 1 GiB (16384 x 16384)
_PAINT_CHUNK = 2**24  # painted pixels per step: bounds memory when masks overlap heavily


def strip_field(text: str) -> str:
    """``text`` without leading / trailing :data:`WHITESPACE` (CSV fields, ids, RLE strings)."""
    return text.strip(WHITESPACE)


def check_size(h: int, w: int) -> None:
    """Refuse absurd image sizes before anything of that size is allocated."""
    if int(h) * int(w) > MAX_PIXELS:
        raise ValueError(f"image size {w}x{h} (width x height) = {int(h) * int(w):,} pixels is over "
                         f"the limit of {MAX_PIXELS:,} (2^28) pixels")


def _max_chars(size: int) -> int:
    """Longest string an RLE of an image of ``size`` pixels can need (<= size/2+1 runs)."""
    return (size // 2 + 1) * 2 * (len(str(size)) + 1) + 64


MAX_RLE_CHARS = _max_chars(MAX_PIXELS)  # longest RLE of any image within the size limit


def _check_shape(shape) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (height, width), got {shape!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got height {h}, width {w}")
    check_size(h, w)
    return h, w


def _pairs_to_string(starts1: np.ndarray, lengths: np.ndarray) -> str:
    pairs = np.empty(2 * len(starts1), dtype=np.int64)
    pairs[0::2] = starts1
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


def rle_encode(mask) -> str:
    """Encode a 2-D mask (non-zero = foreground) as a Kaggle RLE string ("" if empty)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = np.zeros(mask.size + 2, dtype=np.int8)
    flat[1:-1] = mask.ravel() != 0
    edges = np.flatnonzero(np.diff(flat))  # 0-based index of first pixel / one past the end
    starts, ends = edges[0::2], edges[1::2]
    return _pairs_to_string(starts + 1, ends - starts)


class RleError(ValueError):
    """A bad RLE string; ``index`` is its position in the input sequence (0-based) or None."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def rle_runs(rle: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate one RLE string.

    Returns ``(starts, lengths)`` as int64 arrays with 0-based starts. ``size`` (H*W), when
    given, bounds the runs. Raises ValueError naming the problem.
    """
    if not isinstance(rle, str):
        raise RleError(f"RLE must be a string, got {type(rle).__name__}")
    if not _ONLY_DIGITS_AND_SPACE.fullmatch(rle):
        found = _BAD_TOKEN.search(rle)
        bad = found.group(0)
        position = len([t for t in _SPLIT.split(rle[: found.start()]) if t]) + 1
        raise RleError(f"token {position} {bad[:20]!r} is not a non-negative integer")
    values = (np.fromstring(rle, dtype=np.int64, sep=" ") if strip_field(rle)
              else np.empty(0, np.int64))
    if len(values) and values.max() >= _TOO_LARGE:
        huge = _HUGE_TOKEN.search(rle)
        raise RleError(f"token {huge.group(0)[:20] if huge else values.max()}... is too large")
    if len(values) % 2:
        raise RleError(f"odd number of tokens ({len(values)}): expected start/length pairs")
    starts, lengths = values[0::2], values[1::2]
    if len(starts):
        if starts.min() < 1:
            i = int(np.argmax(starts < 1))
            raise RleError(f"run {i + 1}: start 0 (pixels are numbered from 1)")
        if lengths.min() < 1:
            i = int(np.argmax(lengths < 1))
            raise RleError(f"run {i + 1}: length 0")
        ends = starts + lengths  # 1-based, one past the last pixel
        back = starts[1:] < ends[:-1]
        if back.any():
            i = int(np.argmax(back)) + 1
            what = "is out of order" if starts[i] < starts[i - 1] else "overlaps the previous run"
            raise RleError(f"run {i + 1} (start {starts[i]}) {what}")
        if size is not None and ends[-1] - 1 > size:
            raise RleError(
                f"run {len(starts)} (start {starts[-1]}, length {lengths[-1]}) ends at pixel "
                f"{ends[-1] - 1}, past the image end ({size} pixels)"
            )
    return starts - 1, lengths


def parse_rles(rles: Sequence[str], size=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse and validate many RLE strings at once (vectorised; same checks as rle_runs).

    ``size``: None, one pixel count, or one per string. Returns ``(starts0, lengths, n_runs)``
    with the runs of all strings concatenated and ``n_runs[i]`` runs for string ``i``. Raises
    :class:`RleError` with ``.index`` = the first bad string.
    """
    rles = list(rles)
    limits = (np.broadcast_to(np.asarray(size, dtype=np.int64), (len(rles),))
              if size is not None and rles else None)
    # strings that cannot even be tokenised: too long for any mask of their image, or holding a
    # character that is neither a digit nor whitespace. The vectorised checks below then run on
    # the strings before the first of these, so the error always names the FIRST bad string.
    first = None
    for i, rle in enumerate(rles):
        if (not isinstance(rle, str)
                or (limits is not None and len(rle) > _max_chars(int(limits[i])))
                or not _ONLY_DIGITS_AND_SPACE.fullmatch(rle)):
            first = i
            break
    head = rles if first is None else rles[:first]
    if not head:
        if first is not None:
            _raise_for(rles, first, size)
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    # one C-level parse for everything; -1 marks the end of each string
    values = np.fromstring(" -1 ".join(head) + " -1", dtype=np.int64, sep=" ")
    ends_at = np.flatnonzero(values == -1)
    n_tokens = np.diff(ends_at, prepend=-1) - 1
    bad_strings = np.flatnonzero(n_tokens % 2)
    if len(bad_strings):  # runs cannot be paired up: check the strings before the first odd one
        k = int(bad_strings[0])
        if k:
            parse_rles(head[:k], None if limits is None else limits[:k])  # raises for an earlier one
        _raise_for(rles, k, size)
    values = values[values != -1]
    starts, lengths = values[0::2], values[1::2]
    n_runs = n_tokens // 2
    owner = np.repeat(np.arange(len(head)), n_runs)
    bad = (starts < 1) | (lengths < 1) | (starts >= _TOO_LARGE) | (lengths >= _TOO_LARGE)
    ends = starts + lengths
    if limits is not None:
        bad |= ends - 1 > limits[: len(head)][owner]
    if len(starts) > 1:
        bad[1:] |= (starts[1:] < ends[:-1]) & (owner[1:] == owner[:-1])
    if bad.any():
        _raise_for(rles, int(owner[np.argmax(bad)]), size)
    if first is not None:
        _raise_for(rles, first, size)
    return starts - 1, lengths, n_runs


def _raise_for(rles, i: int, size) -> None:
    if size is not None and np.ndim(size):
        size = int(np.asarray(size)[i])
    rle = rles[i]
    if size is not None and isinstance(rle, str) and len(rle) > _max_chars(int(size)):
        raise RleError(f"RLE of {len(rle):,} characters is longer than any mask of a "
                       f"{int(size):,}-pixel image can be", i)
    try:
        rle_runs(rle, size)
    except RleError as exc:
        raise RleError(str(exc), i) from None
    raise AssertionError(f"RLE {i} passed alone but failed in a batch")  # pragma: no cover


def _paint(starts: np.ndarray, lengths: np.ndarray, n_runs: np.ndarray, shape) -> np.ndarray:
    """Paint validated runs as ids 1..N (N = len(n_runs)); earlier ids keep overlapping pixels.

    Runs are painted in groups of about ``_PAINT_CHUNK`` pixels, so the temporary index arrays
    stay bounded however often the masks cover the image.
    """
    h, w = shape
    out = np.zeros(h * w, dtype=np.int32)
    if len(lengths) == 0 or int(lengths.sum()) == 0:
        return out.reshape(h, w)
    ids = np.repeat(np.arange(1, len(n_runs) + 1, dtype=np.int32), n_runs)
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(1, int(lengths.sum()) // _PAINT_CHUNK + 1)
                             * _PAINT_CHUNK)
    edges = np.unique(np.concatenate(([0], bounds + 1, [len(lengths)])).clip(0, len(lengths)))
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
        st, ln, vid = starts[a:b], lengths[a:b], ids[a:b]
        total = int(ln.sum())
        offsets = np.cumsum(ln) - ln
        # pixel index of every painted pixel: run start + offset inside the run
        pixels = np.arange(total, dtype=np.int64) + np.repeat(st - offsets, ln)
        values = np.repeat(vid, ln)
        if a > 0:
            free = out[pixels] == 0  # pixels of earlier groups keep their (earlier) id
            pixels, values = pixels[free], values[free]
        before = np.count_nonzero(out)
        out[pixels] = values
        if np.count_nonzero(out) - before != len(pixels):
            out[pixels] = np.iinfo(np.int32).max  # overlap inside the group: earliest id wins
            np.minimum.at(out, pixels, values)
    return out.reshape(h, w)


def rle_decode(rle: str, shape) -> np.ndarray:
    """Decode a Kaggle RLE string into a bool mask of ``shape`` (H, W)."""
    h, w = _check_shape(shape)
    starts, lengths = rle_runs(rle, h * w)
    edges = np.zeros(h * w + 1, dtype=np.int8)
    edges[starts] += 1  # starts are distinct and so are ends (runs never overlap)
    edges[starts + lengths] -= 1
    return (np.cumsum(edges[:-1], dtype=np.int8) > 0).reshape(h, w)


def labels_to_rles(labels) -> list[str]:
    """One RLE per instance id (> 0) of a 2-D label image, ascending id; one pass over pixels."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label image must be 2-D, got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"label image must be integer, got dtype {labels.dtype}")
    flat = labels.ravel()
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    run_starts = np.concatenate(([0], change))
    run_ends = np.concatenate((change, [flat.size]))
    run_ids = flat[run_starts]
    keep = run_ids > 0
    run_starts, run_ends, run_ids = run_starts[keep], run_ends[keep], run_ids[keep]
    if len(run_ids) == 0:
        return []
    order = np.argsort(run_ids, kind="stable")  # per id, runs stay in pixel order
    run_starts, run_ends, run_ids = run_starts[order], run_ends[order], run_ids[order]
    tokens = np.empty(2 * len(run_ids), dtype=np.int64)
    tokens[0::2] = run_starts + 1
    tokens[1::2] = run_ends - run_starts
    text = list(map(str, tokens.tolist()))
    bounds = np.flatnonzero(np.diff(run_ids)) + 1
    bounds = np.concatenate(([0], bounds, [len(run_ids)])) * 2
    return [" ".join(text[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def rles_to_labels(rles: Iterable[str], shape) -> np.ndarray:
    """Combine RLE masks into one int32 label image, ids 1..N in input order.

    Empty strings give an id with no pixels. Where masks overlap the earlier mask keeps the
    pixel. A bad string raises :class:`RleError` ("mask K: problem", ``.index`` = K - 1).
    """
    h, w = _check_shape(shape)
    rles = list(rles)
    try:
        starts, lengths, n_runs = parse_rles(rles, h * w)
    except RleError as exc:
        raise RleError(f"mask {exc.index + 1}: {exc}", exc.index) from None
    return _paint(starts, lengths, n_runs, (h, w))
