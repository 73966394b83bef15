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
        """Pasted float crops of every detection, flattened: (pixel index, owner row, prob)."""
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
        idx, ids, offsets = self._above(mask_threshold)
        end = int(offsets[n])
        # paint lowest score first; the highest-scoring instance writes last and keeps the pixel
        # (reversed views of the cached arrays: no copy)
        out[idx[:end][::-1]] = ids[:end][::-1]
        won = None
        if fill_holes or keep_largest:
            out = postprocess(out.reshape(h, w), fill_holes, keep_largest).reshape(-1)
            area = np.bincount(out, minlength=n + 1)
        else:  # the pixels each id won, counted over the crops only (not the whole image)
            won = np.flatnonzero(out[idx[:end]] == ids[:end])
            area = np.bincount(ids[won], minlength=n + 1)
        area[0] = 0
        kept = area >= max(int(min_area), 1)
        kept[0] = False
        rows = np.flatnonzero(kept) - 1
        if len(rows) < n:  # renumber 1..K: dropped and empty ids go
            lut = np.zeros(n + 1, np.int32)
            lut[kept] = np.arange(1, len(rows) + 1, dtype=np.int32)
            if won is None:
                out = lut[out]
            else:  # each labelled pixel is one winning crop pixel: remap those only
                out[idx[won]] = lut[ids[won]]
        labels = out.reshape(h, w)
        return (labels, rows) if return_rows else labels

    def _above(self, mask_threshold: float):
        """The crop pixels above ``mask_threshold``: (pixel index, id = row + 1, offsets), where
        row ``r``'s pixels are ``[offsets[r], offsets[r + 1])``. Cached for the last threshold,
        so a Box confidence move only takes a prefix of them."""
        key = (float(mask_threshold), id(self._crops()))
        if self._kept is None or self._kept[0] != key:
            pix, owner, prob, offsets = self._crops()
            keep = prob > key[0]
            ids = owner[keep] + 1
            counts = np.bincount(ids, minlength=len(offsets))[1:len(offsets)]
            self._kept = (key, pix[keep], ids, np.concatenate([[0], np.cumsum(counts)]))
        return self._kept[1:]


def _paste_crops(probs: np.ndarray, boxes: np.ndarray, image_shape):
    """torchvision paste_masks_in_image geometry, but only each box's own window is kept."""
    import torch
    import torch.nn.functional as F

    h_img, w_img = image_shape
    n = len(probs)
    if n == 0:
        e = np.zeros(0, np.int64)
        return e, e.astype(np.int32), e.astype(np.float32), np.zeros(1, np.int64)
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
    for i in range(n):
        x0, y0, x1, y1 = (int(v) for v in eb[i])
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        cx0, cx1 = max(x0, 0), min(x1 + 1, w_img)
        cy0, cy1 = max(y0, 0), min(y1 + 1, h_img)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        crop = F.interpolate(m[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        crop = crop[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0].numpy()
        flat = (np.arange(cy0, cy1)[:, None] * w_img + np.arange(cx0, cx1)[None, :]).ravel()
        pix.append(flat)
        prob.append(crop.ravel())
        owner.append(np.full(flat.size, i, np.int32))
        counts[i + 1] = flat.size
    offsets = np.cumsum(counts)
    if not pix:
        e = np.zeros(0, np.int64)
        return e, e.astype(np.int32), e.astype(np.float32), offsets
    # int32 pixel indices where they fit: half the memory traffic of every slider move
    index_type = np.int32 if h_img * w_img < 2**31 else np.int64
    return (np.concatenate(pix).astype(index_type, copy=False), np.concatenate(owner),
            np.concatenate(prob).astype(np.float32), offsets)


def postprocess(labels: np.ndarray, fill_holes: bool = False, keep_largest: bool = False) -> np.ndarray:
    """Per-cell clean-up of a label image, in place, each cell inside its bounding box
    (cellpose's ``fill_holes_and_remove_small_masks`` idea): ``keep_largest`` drops every
    piece of a cell but its largest (8-connected) one; ``fill_holes`` gives a cell the
    background pixels it encloses (pixels of another cell stay theirs).

    Only the cells that need it are visited: a cell in pieces has more than one connected
    region of its id (one labelling of the whole image), and a background pixel one cell encloses
    is enclosed by all cells together (one hole fill of the whole foreground)."""
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
        if holes.any():
            for i, slc in enumerate(boxes, start=1):
                if slc is None or not holes[slc].any():
                    continue
                window = labels[slc]
                own = window == i
                add = _enclosed(~own) & (window == 0)
                if add.any():
                    window[add] = i
    return labels


def _enclosed(background: np.ndarray) -> np.ndarray:
    """The pixels of ``background`` that are cut off from the array's border (4-connected):
    what ``binary_fill_holes`` adds to the foreground, found with one labelling."""
    from scipy import ndimage

    parts, n = ndimage.label(background)
    if n == 0:
        return np.zeros_like(background)
    edge = np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]])
    outside = np.zeros(n + 1, bool)
    outside[edge] = True
    outside[0] = True
    return ~outside[parts]
