"""Raw network output of one image, and its fast conversion into a label image.

``Detections`` keeps boxes (image pixels), scores and the 28x28 mask probabilities; nothing of
size N x H x W is allocated. ``to_labels`` pastes each probability map inside its box with the
exact geometry of torchvision's ``paste_masks_in_image`` (masks padded by 1, boxes expanded by
30/28, bilinear resize), caches the pasted float crops once, then thresholds and paints in
milliseconds (the napari slider path). ``Thresholds`` (options.py) say how: box_conf,
mask_threshold, min_area, and the per-cell post-processing fill_holes / keep_largest
(cellpose-style, each cell inside its own box). The lowest layer of the inference side: numpy,
scipy; torch only to build the crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from napari_cellseg.options import Thresholds

__all__ = ["Detections", "postprocess"]


@dataclass
class Detections:
    """Raw network output for one image. Rows are sorted by descending score."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in original image pixels
    scores: np.ndarray  # (N,) float32
    probs: np.ndarray  # (N, 28, 28) float32 mask probabilities
    image_shape: tuple[int, int]
    labels: np.ndarray | None = None  # (N,) class ids (1 for the 2-class cell model)
    scale: float = 1.0  # the object-size scale the image was predicted at
    diameter: float | None = None  # median object diameter (image px) estimated by scale="auto"
    _cache: Any = field(default=None, repr=False, compare=False)
    _kept: Any = field(default=None, repr=False, compare=False)
    _mosaic: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        n = len(self.scores)
        self.probs = np.asarray(self.probs, np.float32).reshape(n, *np.shape(self.probs)[1:])
        if len(self.boxes) != n or self.probs.shape[0] != n:
            raise ValueError(f"Detections: {len(self.boxes)} boxes, {n} scores, {self.probs.shape[0]} masks")
        if n and np.any(np.diff(self.scores) > 0):
            order = np.argsort(-self.scores, kind="stable")
            self.boxes, self.scores, self.probs = self.boxes[order], self.scores[order], self.probs[order]
            if self.labels is not None:
                self.labels = np.asarray(self.labels)[order]
        self.image_shape = (int(self.image_shape[0]), int(self.image_shape[1]))

    def __len__(self) -> int:
        return len(self.scores)

    def count(self, box_conf: float = 0.5) -> int:
        return int(np.count_nonzero(self.scores >= box_conf))

    def _crops(self):
        """Pasted float crops of every detection, flattened: (pixel index, id = row + 1, prob,
        offsets of each row's pixels, each row's clipped window y0, y1, x0, x1, the best earlier
        probability of the same pixel: see :func:`_paste_crops`)."""
        if self._cache is None:
            self._cache = _paste_crops(self.probs, self.boxes, self.image_shape)
        return self._cache

    def to_labels(self, box_conf: "float | Thresholds | Mapping" = 0.5, mask_threshold: float = 0.5,
                  min_area: int = 0, return_rows: bool = False, *, fill_holes: bool = False,
                  keep_largest: bool = False):
        """int32 (H, W) label image, ids 1..K in descending score; pixels go to the best score.

        Call it with a :class:`~napari_cellseg.options.Thresholds` (``to_labels(th)``) or with
        the numbers (``to_labels(box_conf=, mask_threshold=, min_area=)``). ``keep_largest``:
        each cell keeps only its largest connected piece; ``fill_holes``: background holes
        inside a cell become that cell; both run per cell inside its box (cheap), before
        ``min_area``. ``return_rows=True`` also returns the detection row of each id
        (``rows[id - 1]``).

        Speed (the slider path): which pixels each detection wins does not depend on Box
        confidence (a pixel goes to the best-scoring detection that claims it, and every
        better-scoring detection is drawn whenever this one is), nor does keep_largest's choice
        of piece. Both are computed once per mask threshold (:meth:`_won`); a Box confidence
        move then paints a prefix of them, and fill_holes visits only the cells whose box holds
        a hole of the drawing.
        """
        if isinstance(box_conf, (Thresholds, Mapping)):
            th = Thresholds.from_dict(box_conf)
            box_conf, mask_threshold, min_area = th.box_conf, th.mask_threshold, th.min_area
            fill_holes, keep_largest = th.fill_holes, th.keep_largest
        h, w = self.image_shape
        n = int(np.count_nonzero(self.scores >= box_conf))  # scores are sorted: rows 0..n-1
        out = np.zeros(h * w, np.int32)
        if n == 0:
            return (out.reshape(h, w), np.zeros(0, np.int64)) if return_rows else out.reshape(h, w)
        idx, ids, offsets = self._won(mask_threshold, keep_largest)
        end = int(offsets[n])
        out[idx[:end]] = ids[:end]  # no pixel twice: each is won by one detection
        area = np.diff(offsets[:n + 1])
        filled = None
        if fill_holes:
            filled = _fill_from(out, *self._enclosed_by(mask_threshold, keep_largest), n)
            area = area + np.bincount(filled[1] - 1, minlength=n)
        kept = area >= max(int(min_area), 1)
        rows = np.flatnonzero(kept)
        if len(rows) < n:  # renumber 1..K: dropped and empty ids go (only the drawn pixels)
            lut = np.zeros(n + 1, np.int32)
            lut[1:][kept] = np.arange(1, len(rows) + 1, dtype=np.int32)
            out[idx[:end]] = lut[ids[:end]]
            if filled is not None:
                out[filled[0]] = lut[filled[1]]
        labels = out.reshape(h, w)
        return (labels, rows) if return_rows else labels

    def prepare(self, thresholds: "Thresholds | Mapping | None" = None) -> "Detections":
        """Compute now what every slider move reuses (the pasted crops, the pixels each
        detection wins at the mask threshold of ``thresholds``, what each one encloses), e.g.
        in a worker thread, so the first move in the GUI costs what the others cost."""
        th = Thresholds.from_dict(thresholds or {})
        self._enclosed_by(th.mask_threshold, th.keep_largest)
        return self

    def _won(self, mask_threshold: float, keep_largest: bool = False):
        """The crop pixels each detection wins at ``mask_threshold`` with every detection drawn
        (after keep_largest's choice of piece): (pixel index, id = row + 1, offsets), row ``r``'s
        pixels are ``[offsets[r], offsets[r + 1])``. Cached for the last threshold.

        A crop pixel is won when its probability is above the threshold and no better-scoring
        crop of that pixel is (``blocked``: the highest such probability, from the cache), so
        a new threshold costs two comparisons and no drawing."""
        return self._state(mask_threshold, keep_largest)["won"]

    def _enclosed_by(self, mask_threshold: float, keep_largest: bool = False):
        """What each detection's own pixels (:meth:`_won`) enclose, as (pixel index, id), ids
        ascending: fill_holes gives a background pixel to the lowest drawn id enclosing it.
        Found for every detection at once with one flood fill (:class:`_Mosaic`),
        once per mask threshold."""
        state = self._state(mask_threshold, keep_largest)
        if "enclosed" not in state:
            pix, ids, _, _, windows, _ = self._crops()
            if self._mosaic is None or self._mosaic[0] is not pix:
                self._mosaic = (pix, _Mosaic(windows, pix, ids, self.image_shape[1]))
            state["enclosed"] = self._mosaic[1].enclosed(state["own"])
        return state["enclosed"]

    def _state(self, mask_threshold: float, keep_largest: bool):
        pix, ids, prob, offsets, _, blocked = self._crops()
        key = (float(mask_threshold), bool(keep_largest), id(pix))
        if self._kept is None or self._kept[0] != key:
            own = prob > key[0]
            own &= blocked <= key[0]
            if keep_largest:
                h, w = self.image_shape
                full = np.zeros(h * w, np.int32)
                full[pix[own]] = ids[own]
                postprocess(full.reshape(h, w), keep_largest=True)
                own[own] = full[pix[own]] == ids[own]
            idx, won_ids = pix[own], ids[own]
            ends = np.searchsorted(won_ids, np.arange(1, len(offsets)), side="right")  # ids ascend
            self._kept = (key, {"own": own, "won": (idx, won_ids, np.concatenate([[0], ends]))})
        return self._kept[1]


def _paste_crops(probs: np.ndarray, boxes: np.ndarray, image_shape):
    """torchvision paste_masks_in_image geometry, but only each box's own window is kept."""
    import torch
    import torch.nn.functional as F

    h_img, w_img = image_shape
    n = len(probs)
    windows = np.zeros((n, 4), np.int64)  # each crop's clipped window: y0, y1, x0, x1
    if n == 0:
        e = np.zeros(0, np.int64)
        return e, e.astype(np.int32), e.astype(np.float32), np.zeros(1, np.int64), windows, e.astype(np.float32)
    m = torch.from_numpy(np.ascontiguousarray(probs))[:, None]
    size = m.shape[-1]
    m = F.pad(m, (1, 1, 1, 1))  # expand_masks(padding=1)
    scale = float(size + 2) / size
    b = torch.from_numpy(boxes.astype(np.float32))
    w_half = (b[:, 2] - b[:, 0]) * 0.5 * scale
    h_half = (b[:, 3] - b[:, 1]) * 0.5 * scale
    x_c = (b[:, 2] + b[:, 0]) * 0.5
    y_c = (b[:, 3] + b[:, 1]) * 0.5
    eb = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], 1).to(torch.int64).numpy()
    pix, owner, prob, counts = [], [], [], np.zeros(n + 1, np.int64)
    # blocked: for each crop pixel, the best probability an earlier (better-scoring) row gives
    # that image pixel (-1: none); the pixel is this row's at mask threshold t iff prob > t >= it
    best, blocked = np.full(h_img * w_img, -1.0, np.float32), []
    for i in range(n):
        x0, y0, x1, y1 = (int(v) for v in eb[i])
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        cx0, cx1 = max(x0, 0), min(x1 + 1, w_img)
        cy0, cy1 = max(y0, 0), min(y1 + 1, h_img)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        windows[i] = cy0, cy1, cx0, cx1
        crop = F.interpolate(m[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        crop = crop[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0].numpy()
        flat = (np.arange(cy0, cy1)[:, None] * w_img + np.arange(cx0, cx1)[None, :]).ravel()
        pix.append(flat)
        prob.append(crop.ravel())
        before = best[flat]
        blocked.append(before)
        best[flat] = np.maximum(before, prob[-1])
        owner.append(np.full(flat.size, i + 1, np.int32))  # the id: row + 1
        counts[i + 1] = flat.size
    offsets = np.cumsum(counts)
    if not pix:
        e = np.zeros(0, np.int64)
        return e, e.astype(np.int32), e.astype(np.float32), offsets, windows, e.astype(np.float32)
    # int32 pixel indices where they fit: half the memory traffic of every slider move
    index_type = np.int32 if h_img * w_img < 2**31 else np.int64
    return (np.concatenate(pix).astype(index_type, copy=False), np.concatenate(owner),
            np.concatenate(prob).astype(np.float32), offsets, windows, np.concatenate(blocked))


def postprocess(labels: np.ndarray, fill_holes: bool = False, keep_largest: bool = False) -> np.ndarray:
    """Per-cell clean-up of a label image, in place, each cell inside its bounding box
    (cellpose's ``fill_holes_and_remove_small_masks`` idea): ``keep_largest`` drops every
    piece of a cell but its largest (8-connected) one; ``fill_holes`` gives a cell the
    background pixels it encloses (pixels of another cell stay theirs).

    A background pixel enclosed by several cells goes to the lowest id. Only the cells that need
    it are visited: a cell in pieces has more than one connected region of its id (one labelling
    of the whole image), and a background pixel one cell encloses is enclosed by all cells
    together (one flood fill of the whole background). ``Detections.to_labels`` computes the
    same per mask threshold for every detection at once (:class:`_Mosaic`)."""
    from scipy import ndimage

    if not labels.any():
        return labels
    full = np.ones((3, 3), bool)
    boxes = ndimage.find_objects(labels)
    if keep_largest:
        from skimage.measure import label as regions

        parts = regions(labels, background=0, connectivity=2)
        owner = np.zeros(int(parts.max()) + 1, np.int64)
        owner[parts.ravel()] = labels.ravel()
        n_parts = np.bincount(owner[1:], minlength=len(boxes) + 1)
        for i in np.flatnonzero(n_parts > 1):
            slc = boxes[i - 1]
            window = labels[slc]
            own = window == i
            pieces, _ = ndimage.label(own, structure=full)
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            window[own & (pieces != int(np.argmax(sizes)))] = 0
    if fill_holes:
        holes = _enclosed(labels == 0)
        pix, ids, w = [], [], labels.shape[1]
        for i, slc in enumerate(boxes, start=1):
            if slc is not None and holes[slc].any():
                ys, xs = np.nonzero(_enclosed(labels[slc] != i))
                pix.append((ys + slc[0].start) * w + xs + slc[1].start)
                ids.append(np.full(len(ys), i, np.int64))
        if pix:
            flat = labels.reshape(-1)
            _fill_from(flat, np.concatenate(pix), np.concatenate(ids), len(boxes))
            if not np.shares_memory(flat, labels):
                labels[...] = flat.reshape(labels.shape)
    return labels


def _fill_from(out: np.ndarray, pix: np.ndarray, ids: np.ndarray, n: int):
    """Give each background pixel of the flat drawing ``out`` (ids 1..n) to the lowest id
    ``<= n`` enclosing it (``pix``/``ids``: what each id encloses, ids ascending); in place.
    Returns the filled (pixel index, id)."""
    end = int(np.searchsorted(ids, n, side="right"))
    pix, ids = pix[:end], ids[:end]
    free = out[pix] == 0
    pix, ids = pix[free], ids[free]
    out[pix[::-1]] = ids[::-1]  # the lowest id writes last and keeps the pixel
    won = out[pix] == ids
    return pix[won], ids[won]


class _Mosaic:
    """Every detection's window laid out in one image, left to right in shelves, with a
    1-pixel background gap around each (a window's pixels are all crop pixels of its row).
    :meth:`enclosed` finds what each detection encloses inside its own window with a single
    flood fill from the mosaic's border: whatever it does not reach is enclosed."""

    def __init__(self, windows: np.ndarray, pix: np.ndarray, ids: np.ndarray, image_width: int):
        self.windows, self.image_width = windows, image_width
        heights, widths = windows[:, 1] - windows[:, 0], windows[:, 3] - windows[:, 2]
        self.width = max(int(widths.max(initial=0)) + 2, 4096)
        self.oy, self.ox = np.zeros(len(widths), np.int64), np.zeros(len(widths), np.int64)
        x, y, shelf = 1, 1, 0
        for r, (hh, ww) in enumerate(zip(heights.tolist(), widths.tolist())):
            if x + ww + 1 > self.width:  # next shelf
                x, y, shelf = 1, y + shelf + 1, 0
            self.oy[r], self.ox[r] = y, x
            x += ww + 1
            shelf = max(shelf, hh)
        self.shape = (y + shelf + 1, self.width)
        self.shelf_top = np.unique(self.oy)
        self.key = self.oy * self.width + self.ox  # increasing with the row
        rows = ids - 1
        ys, xs = np.divmod(pix, image_width)
        spot = (self.oy[rows] + ys - windows[rows, 0]) * self.width + self.ox[rows] + xs - windows[rows, 2]
        self.spot = spot.astype(np.int32) if self.shape[0] * self.width < 2**31 else spot  # half the memory

    def enclosed(self, own: np.ndarray):
        """(image pixel, id) of the pixels each detection's ``own`` crop pixels enclose
        (4-connected, inside its window), ids ascending."""
        import cv2

        mosaic = np.ones(self.shape, np.uint8)
        mosaic.reshape(-1)[self.spot[own]] = 0
        cv2.floodFill(mosaic, None, (0, 0), 0, flags=4)
        where = np.flatnonzero(mosaic.view(bool))
        my, mx = np.divmod(where, self.width)
        top = self.shelf_top[np.searchsorted(self.shelf_top, my, side="right") - 1]
        rows = np.searchsorted(self.key, top * self.width + mx, side="right") - 1
        pix = (self.windows[rows, 0] + my - self.oy[rows]) * self.image_width \
            + self.windows[rows, 2] + mx - self.ox[rows]
        order = np.argsort(rows, kind="stable")
        return pix[order], rows[order] + 1


def _enclosed(background: np.ndarray) -> np.ndarray:
    """The pixels of ``background`` that are cut off from the array's border (4-connected):
    what ``binary_fill_holes`` adds to the foreground, with one flood fill from a 1-pixel
    frame of background (OpenCV: ~10x scipy's labelling at 3000x3000)."""
    import cv2

    h, w = background.shape
    framed = np.ones((h + 2, w + 2), np.uint8)
    framed[1:-1, 1:-1] = background
    cv2.floodFill(framed, None, (0, 0), 0, flags=4)
    return framed[1:-1, 1:-1].view(bool)
