"""Run the network once, keep its raw output, make label images fast.

``Predictor`` runs the Mask R-CNN with its own inference forward, built from the model's modules
(transform, backbone, rpn, roi_heads pieces) but without torchvision's costly post-processing:

* masks are never pasted into full-size images: ``Detections`` keeps boxes (image pixels),
  scores and the 28x28 mask probabilities; nothing of size N x H x W is allocated;
* the mask head runs in chunks of detections (small peak memory, progress, cancel points);
* the mask ConvTranspose2d(2, stride 2) runs as the equivalent 1x1 convolution + pixel shuffle
  (same numbers, ~4x cheaper on CPU), and only the predicted class's logit map is computed;
* optional autocast: bf16 on CPU, fp16 on CUDA.

``Detections.to_labels`` pastes each probability map inside its box with the exact geometry of
torchvision's ``paste_masks_in_image`` (masks padded by 1, boxes expanded by 30/28, bilinear
resize), caches the pasted float crops once, then thresholds and paints in milliseconds: this is
the napari slider path.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Generator, Iterable, Iterator

import numpy as np

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
MASK_CHUNK = 100
DEFAULT_DIAMETER = 30.0  # reference object size of models trained without size normalisation


class PredictError(ValueError):
    """Bad predictor settings (device, precision, scale)."""


def drain(gen: Generator):
    """Run a progress generator to completion and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


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

    def to_labels(self, box_conf: float = 0.5, mask_threshold: float = 0.5, min_area: int = 0,
                  return_rows: bool = False):
        """int32 (H, W) label image, ids 1..K in descending score; pixels go to the best score.

        ``return_rows=True`` also returns the detection row of each id (``rows[id - 1]``).
        """
        h, w = self.image_shape
        n = int(np.count_nonzero(self.scores >= box_conf))  # scores are sorted: rows 0..n-1
        out = np.zeros(h * w, np.int32)
        if n == 0:
            return (out.reshape(h, w), np.zeros(0, np.int64)) if return_rows else out.reshape(h, w)
        pix, owner, prob, offsets = self._crops()
        end = offsets[n]
        keep = prob[:end] > mask_threshold
        idx = pix[:end][keep]
        who = owner[:end][keep]
        # paint lowest score first; the highest-scoring instance writes last and keeps the pixel
        out[idx[::-1]] = who[::-1] + 1
        area = np.bincount(out, minlength=n + 1)
        area[0] = 0
        kept = area >= max(int(min_area), 1)
        lut = np.zeros(n + 1, np.int32)
        lut[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.int32)
        labels = lut[out].reshape(h, w)
        return (labels, np.flatnonzero(kept) - 1) if return_rows else labels


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
    return np.concatenate(pix), np.concatenate(owner), np.concatenate(prob).astype(np.float32), offsets


def _resolve_device(device: str):
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise PredictError(f"unknown device {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"device {device!r} requested but CUDA is not available")
    return dev


def cpu_has_bf16() -> bool:
    import torch

    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "AVX512" in cap or "AMX" in cap


def _resolve_precision(precision: str, device) -> str:
    if precision not in PRECISIONS:
        raise PredictError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PredictError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    return precision


class Predictor:
    """Runs a Mask R-CNN built by ``model.build_model`` once per image -> ``Detections``."""

    def __init__(self, model, config=None, thresholds: dict | None = None, device="cpu",
                 precision: str = "fp32", mask_chunk: int = MASK_CHUNK,
                 tile_size: int | None = None, tile_overlap: int | None = None):
        from .checkpoint import DEFAULT_THRESHOLDS
        from .tiling import TILE_OVERLAP, TILE_SIZE
        from .model import ModelConfig

        self.device = _resolve_device(str(device))
        self.precision = _resolve_precision(precision, self.device)
        if self.precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            warnings.warn("this CPU has no native bfloat16 (needs AVX512-BF16/AMX): bf16 autocast is "
                          "emulated and much slower than fp32 here", stacklevel=2)
        self.model = model.eval().to(self.device)
        self.config = config or ModelConfig()
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.mask_chunk = int(mask_chunk)
        # images larger than tile_size network pixels are predicted in overlapping tiles
        self.tile_size = TILE_SIZE if tile_size is None else int(tile_size)
        self.tile_overlap = TILE_OVERLAP if tile_overlap is None else int(tile_overlap)
        if self.tile_size and not 0 <= self.tile_overlap < self.tile_size:
            raise PredictError(f"tile overlap must be >= 0 and < tile size {self.tile_size}, "
                               f"got {self.tile_overlap}")
        self.info: dict = {}
        self.checkpoint_path = None

    @classmethod
    def from_checkpoint(cls, path=None, device="auto", precision="fp32", config=None) -> "Predictor":
        """``path=None`` uses the bundled demo model. Raises CheckpointError / PredictError."""
        from .checkpoint import load_checkpoint, resolve_checkpoint

        dev = _resolve_device(str(device))
        _resolve_precision(precision, dev)  # fail before the (slow) load
        ckpt = resolve_checkpoint(path)
        model, cfg, thresholds, info = load_checkpoint(ckpt, config=config, device="cpu")
        self = cls(model, cfg, thresholds, device=dev, precision=precision)
        self.info, self.checkpoint_path = info, ckpt
        return self

    # -- public API ---------------------------------------------------------------------------
    @property
    def reference_diameter(self) -> float:
        """Object diameter (network px) the model works best at: the training's size
        normalisation (``ModelConfig.diameter``), else DEFAULT_DIAMETER."""
        return float(getattr(self.config, "diameter", 0.0) or DEFAULT_DIAMETER)

    def scale_for_diameter(self, diameter: float) -> float:
        """The object-size scale that brings objects of ``diameter`` image px to the model's size."""
        from .sizing import scale_for_diameter

        return scale_for_diameter(self, diameter)

    def resolve_scale(self, scale: float | None = None, diameter: float | str | None = None) -> float | str:
        """The CLI's and widget's size options -> ``scale`` for predict (see sizing.resolve_scale)."""
        from .sizing import resolve_scale

        return resolve_scale(self, scale, diameter)

    def predict(self, image, scale: float | str = 1.0, tile="auto") -> Detections:
        return drain(self.iter_predict(image, scale, tile=tile))

    def iter_predict(self, image, scale: float | str = 1.0, tile="auto"):
        """Generator: yields ``{"stage", "fraction"}`` events, returns ``Detections``.

        ``scale``: resize factor for the network (> 1 for small objects), or "auto": estimate the
        objects' size from a first pass and predict again at ``reference_diameter / size`` (at most
        AUTO_PASSES passes; see ``sizing.iter_auto_scale``). The result's ``.scale`` says which scale was used.
        ``tile``: "auto" = tile when the resized image exceeds ``self.tile_size`` network pixels;
        an int = that tile size; None / 0 = never tile (see :mod:`napari_cellseg.tiling`).
        """
        yield {"stage": "load", "fraction": 0.0}
        arr = _as_image(image)
        dets = yield from self._predict_array(arr, scale, tile)
        return dets

    def _predict_array(self, arr: np.ndarray, scale: float | str, tile="auto"):
        from .tiling import iter_tiled, needs_tiling, network_factor

        if isinstance(scale, str) and scale == "auto":
            from .sizing import iter_auto_scale

            return (yield from iter_auto_scale(self, arr, tile))
        _check_scale(scale)
        size = self.tile_size if isinstance(tile, str) and tile == "auto" else tile
        factor = network_factor(self, arr.shape[:2], scale)
        if size and needs_tiling(arr.shape[:2], factor, size):
            overlap = min(self.tile_overlap, int(size) - 1)
            dets = yield from iter_tiled(self, arr, factor, int(size), overlap)
        else:
            dets = (yield from self._forward([arr], scale))[0]
        dets.scale = float(scale)
        return dets

    def predict_many(self, images: Iterable, batch_size: int = 1, scale: float | str = 1.0
                     ) -> Iterator[tuple[int, Detections]]:
        """Yield ``(index, Detections)`` for every image (paths or arrays), ``batch_size`` at a time
        (one at a time with scale="auto": each image gets its own scale)."""
        from .tiling import needs_tiling, network_factor

        batch: list[tuple[int, np.ndarray]] = []
        for i, image in enumerate(images):
            arr = _as_image(image)
            if isinstance(scale, str):
                yield i, drain(self._predict_array(arr, scale))
                continue
            if needs_tiling(arr.shape[:2], network_factor(self, arr.shape[:2], scale), self.tile_size):
                if batch:  # keep the input order
                    yield from zip([j for j, _ in batch], drain(self._forward([a for _, a in batch], scale)))
                    batch = []
                yield i, drain(self._predict_array(arr, scale))  # large: tiled, on its own
                continue
            batch.append((i, arr))
            if len(batch) >= max(int(batch_size), 1):
                yield from zip([j for j, _ in batch], drain(self._forward([a for _, a in batch], scale)))
                batch = []
        if batch:
            yield from zip([j for j, _ in batch], drain(self._forward([a for _, a in batch], scale)))

    # -- the forward --------------------------------------------------------------------------
    def _autocast(self):
        import torch

        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _forward(self, arrays: list[np.ndarray], scale: float, factor: float | None = None,
                 box_filter=None):
        """``factor``: resize factor to use instead of the model's own rule times ``scale``;
        ``box_filter(boxes)``: bool mask of the detections to keep (boxes (N, 4) in input pixels),
        applied before the mask head (tiling drops what another tile owns without computing it)."""
        import torch
        from torchvision.models.detection.image_list import ImageList
        from torchvision.models.detection.transform import resize_boxes

        _check_scale(scale)
        m = self.model
        t = m.transform
        with torch.inference_mode():
            tensors, orig_sizes = [], []
            for a in arrays:
                x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).to(self.device, torch.float32)
                orig_sizes.append(tuple(x.shape[-2:]))
                x = t.normalize(x)
                h, w = x.shape[-2:]
                f = 1.0 if self.config.native_scale else min(
                    float(t.min_size[-1]) / min(h, w), float(t.max_size) / max(h, w))
                f = f * float(scale) if factor is None else float(factor)
                x = torch.nn.functional.interpolate(x[None], scale_factor=f, mode="bilinear",
                                                    recompute_scale_factor=True, align_corners=False)[0]
                tensors.append(x)
            sizes = [tuple(x.shape[-2:]) for x in tensors]
            images = ImageList(t.batch_images(tensors, size_divisible=t.size_divisible), sizes)
            yield {"stage": "backbone", "fraction": 0.05}
            with self._autocast():  # channels_last: oneDNN's fast convolution layout on CPU
                feats = m.backbone(images.tensors.contiguous(memory_format=torch.channels_last))
            feats = {k: v.float() for k, v in feats.items()}
            yield {"stage": "proposals", "fraction": 0.35}
            proposals, _ = m.rpn(images, feats)
            yield {"stage": "boxes", "fraction": 0.45}
            rh = m.roi_heads
            bf = rh.box_roi_pool(feats, proposals, sizes)
            with self._autocast():
                bf = rh.box_head(bf)
            logits, deltas = rh.box_predictor(bf.float())
            boxes, scores, labels = rh.postprocess_detections(logits, deltas, proposals, sizes)
            if box_filter is not None:
                for i in range(len(boxes)):
                    ob = resize_boxes(boxes[i], sizes[i], orig_sizes[i]).float().cpu().numpy()
                    keep = torch.from_numpy(np.asarray(box_filter(ob), bool)).to(boxes[i].device)
                    boxes[i], scores[i], labels[i] = boxes[i][keep], scores[i][keep], labels[i][keep]
            counts = [len(b) for b in boxes]
            total = max(sum(counts), 1)
            probs_all, done = [], 0
            empty = boxes[0].new_zeros((0, 4))
            for i, (bi, li) in enumerate(zip(boxes, labels)):
                for s in range(0, len(bi), self.mask_chunk):
                    yield {"stage": "masks", "fraction": 0.55 + 0.4 * done / total}
                    chunk = [bi[s:s + self.mask_chunk] if j == i else empty for j in range(len(boxes))]
                    x = rh.mask_roi_pool(feats, chunk, sizes)
                    probs_all.append(self._mask_probs(x, li[s:s + self.mask_chunk]).cpu())
                    done += len(chunk[i])
            probs = torch.cat(probs_all) if probs_all else torch.zeros(0, 28, 28)
            yield {"stage": "done", "fraction": 1.0}
            out = []
            for i, (n0, n) in enumerate(zip(np.cumsum([0] + counts[:-1]), counts)):
                b = resize_boxes(boxes[i], sizes[i], orig_sizes[i])
                out.append(Detections(b.float().cpu().numpy(), scores[i].float().cpu().numpy(),
                                      probs[n0:n0 + n].numpy(), orig_sizes[i],
                                      labels=labels[i].cpu().numpy(), scale=float(scale)))
            return out

    def _mask_probs(self, x, labels):
        """Mask head + predictor for one chunk -> (n, 28, 28) float32 probabilities."""
        import torch
        import torch.nn.functional as F

        rh = self.model.roi_heads
        pred = rh.mask_predictor
        deconv, final = pred.conv5_mask, pred.mask_fcn_logits
        c_in, d = deconv.weight.shape[:2]
        k = deconv.weight.shape[-1]
        with self._autocast():
            x = rh.mask_head(x.contiguous(memory_format=torch.channels_last))
            # ConvTranspose2d(k, stride k) == 1x1 conv to k*k*D channels + pixel shuffle
            w = deconv.weight.permute(2, 3, 1, 0).reshape(k * k * d, c_in, 1, 1)
            y = F.relu(F.conv2d(x, w, deconv.bias.repeat(k * k)))
        n, _, hh, ww = y.shape
        y = y.float().reshape(n, k * k, d, hh * ww)
        wc = final.weight[labels, :, 0, 0].float()  # (n, D): only the predicted class's map
        z = torch.einsum("nadp,nd->nap", y, wc) + final.bias[labels].float()[:, None, None]
        z = F.pixel_shuffle(z.reshape(n, k * k, hh, ww), k)[:, 0]
        return z.sigmoid_()


def _check_scale(scale) -> None:
    if isinstance(scale, str):
        if scale != "auto":
            raise PredictError(f"scale must be a number or 'auto', got {scale!r}")
        return
    if not (np.isfinite(scale) and 0.05 <= float(scale) <= 20):
        raise PredictError(f"scale must be between 0.05 and 20, got {scale}")


def _as_image(image) -> np.ndarray:
    from . import images

    if isinstance(image, np.ndarray):
        return images.to_rgb_float(image)
    return images.load_image(image)
