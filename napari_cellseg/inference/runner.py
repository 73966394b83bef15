"""The network runner: a batch of float images at given resize factors in, ``Detections`` out.

``Runner`` runs the Mask R-CNN with its own inference forward, built from the model's modules
(transform, backbone, rpn, roi_heads pieces) but without torchvision's costly post-processing:

* masks are never pasted into full-size images: ``Detections`` keeps boxes (image pixels),
  scores and the 28x28 mask probabilities;
* the mask head runs in chunks of detections (small peak memory, progress, cancel points);
* the mask ConvTranspose2d(2, stride 2) runs as the equivalent 1x1 convolution + pixel shuffle
  (same numbers, ~4x cheaper on CPU), and only the predicted class's logit map is computed;
* everything stays on the device until the end of the batch: one host copy per batch;
* optional autocast: bf16 (CPU with native bf16, CUDA), fp16 (CUDA).
* the forward also runs in pieces (``prepare``, ``features``, ``iter_detect``): training
  validation computes the features once for its loss and for these Detections.

It knows the model's own resize rule (:meth:`Runner.base_factor`) and nothing about object
size, tiles or files: those live in :mod:`napari_cellseg.inference.pipeline`, which drives it. The device
rule is :mod:`napari_cellseg.model.devices`'.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np

from napari_cellseg.inference.detections import Detections
from napari_cellseg.options import PRECISIONS, Thresholds, check_precision
from napari_cellseg.progress import drain

__all__ = ["Runner", "PredictError", "PRECISIONS", "MASK_CHUNK", "DEFAULT_DIAMETER", "cpu_has_bf16",
           "resized_size"]

MASK_CHUNK = 100
DEFAULT_DIAMETER = 30.0  # reference object size of models trained without size normalisation


class PredictError(ValueError):
    """Bad predictor settings (device, precision, scale, a checkpoint's diameter)."""


def cpu_has_bf16() -> bool:
    import torch

    cap = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "AVX512" in cap or "AMX" in cap


def _resolve_precision(precision: str, device) -> str:
    check_precision(precision, PredictError)
    if precision == "auto":  # one meaning with training's --amp auto: model.devices.auto_precision
        from napari_cellseg.model.devices import auto_precision

        mode = auto_precision(device)
        return "fp32" if mode == "off" else mode
    if precision == "fp16" and device.type != "cuda":
        raise PredictError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    return precision


def _inference_steps(gen):
    """Drive the generator ``gen`` with ``torch.inference_mode()`` on while it computes and off
    at every yield. Inference mode is thread-local: a ``with`` block held open across a yield
    leaks into the consumer's thread, and a consumer that stops early (a cancelled napari
    worker) leaves that pooled thread in inference mode, where the next training job fails
    ("does not require grad")."""
    import torch

    while True:
        try:
            with torch.inference_mode():
                event = next(gen)
        except StopIteration as stop:
            return stop.value
        yield event


def resized_size(shape, factor: float) -> tuple[int, int]:
    """The inference resize rule: the (H, W) an image of ``shape`` has after resizing by ``factor``
    (every forward, tiled or not; training's size normalisation rounds instead).

    ``floor(side * factor)`` (torch's rule for ``scale_factor``), but never below 1 pixel: a 1x256
    image at a small factor is still an image (the model pads it to its stride)."""
    return (max(1, int(math.floor(shape[0] * float(factor)))),
            max(1, int(math.floor(shape[1] * float(factor)))))


class Runner:
    """Runs a Mask R-CNN built by ``model.build_model``: arrays at factors -> ``Detections``."""

    def __init__(self, model, config=None, thresholds=None, device="cpu",
                 precision: str = "fp32", mask_chunk: int = MASK_CHUNK):
        from napari_cellseg.model.devices import resolve_device
        from napari_cellseg.model.maskrcnn import ModelConfig

        self.device = resolve_device(str(device))
        self.precision = _resolve_precision(precision, self.device)
        if self.precision == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            warnings.warn("this CPU has no native bfloat16 (needs AVX512-BF16/AMX): bf16 autocast is "
                          "emulated and much slower than fp32 here", stacklevel=2)
        self.model = model.eval().to(self.device)
        self.config = config or ModelConfig()
        self.thresholds = thresholds  # validated by the setter
        self.mask_chunk = int(mask_chunk)
        self.info: dict = {}
        self.checkpoint_path = getattr(self, "checkpoint_path", None)  # set early by from_checkpoint
        self._check_diameter()

    @property
    def thresholds(self) -> Thresholds:
        """The read-only :class:`~napari_cellseg.options.Thresholds`; change them by assigning
        (``r.thresholds = r.thresholds.with_overrides(box_conf=0.3)``; a mapping is accepted and
        validated through ``Thresholds.from_dict``, a bad value raises OptionError)."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value) -> None:
        self._thresholds = Thresholds.from_dict(value, where="thresholds")

    def _check_diameter(self) -> None:
        d = getattr(self.config, "diameter", 0.0)
        where = f"{self.checkpoint_path}: " if self.checkpoint_path else ""
        try:
            ok = d is None or (not isinstance(d, bool) and math.isfinite(float(d)) and float(d) >= 0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise PredictError(f"{where}model config diameter must be a number of pixels >= 0, got {d!r}")

    @classmethod
    def from_checkpoint(cls, path=None, device="auto", precision="fp32", config=None, **kwargs):
        """``path=None`` uses the bundled demo model. Raises CheckpointError / PredictError / DeviceError."""
        from napari_cellseg.model.checkpoint import load_checkpoint, resolve_checkpoint
        from napari_cellseg.model.devices import resolve_device
        from napari_cellseg.options import OptionError

        dev = resolve_device(str(device))
        _resolve_precision(precision, dev)  # fail before the (slow) load
        ckpt = resolve_checkpoint(path)
        model, cfg, thresholds, info = load_checkpoint(ckpt, config=config, device="cpu")
        try:
            thresholds = Thresholds.from_dict(thresholds, where=f"{ckpt}: thresholds")
        except OptionError as exc:
            raise PredictError(str(exc)) from None
        self = cls.__new__(cls)
        self.checkpoint_path = ckpt
        cls.__init__(self, model, cfg, thresholds, device=dev, precision=precision, **kwargs)
        self.info, self.checkpoint_path = info, ckpt
        return self

    # -- public API ---------------------------------------------------------------------------
    @property
    def reference_diameter(self) -> float:
        """Object diameter (network px) the model works best at: the training's size
        normalisation (``ModelConfig.diameter``), else DEFAULT_DIAMETER."""
        return float(getattr(self.config, "diameter", 0.0) or DEFAULT_DIAMETER)

    @property
    def size_normalised(self) -> bool:
        """True for models trained with size normalisation (``ModelConfig.diameter`` > 0)."""
        return bool(getattr(self.config, "diameter", 0.0))

    def base_factor(self, shape) -> float:
        """The model's own resize factor for a whole image of ``shape`` (H, W): 1 for
        ``native_scale`` models, else torchvision's min_size / max_size rule."""
        if self.config.native_scale:
            return 1.0
        t = self.model.transform
        h, w = shape[:2]
        return min(float(t.min_size[-1]) / max(min(h, w), 1), float(t.max_size) / max(h, w, 1))

    def forward(self, arrays, factors) -> list[Detections]:
        """``arrays``: normalised float32 HxWx3 images; ``factors``: one resize factor for all or
        one per image. Returns one Detections per image (boxes in input pixels)."""
        return drain(self.iter_forward(arrays, factors))

    def iter_forward(self, arrays, factors, box_filter=None):
        """Generator form of :meth:`forward` (progress events). ``box_filter(boxes) -> bool mask``
        drops detections (boxes (N, 4) in input pixels) before the mask head (used by tiling)."""
        return (yield from self._forward(arrays, factor=factors, box_filter=box_filter))

    # -- the forward --------------------------------------------------------------------------
    def _autocast(self):
        import torch

        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _factors(self, arrays, scale: float = 1.0, factor=None) -> list[float]:
        if factor is None:
            return [self.base_factor(a.shape) * float(scale) for a in arrays]
        if np.ndim(factor) == 0:
            return [float(factor)] * len(arrays)
        return [float(f) for f in factor]

    def prepare(self, arrays, factors):
        """Normalised float32 HxWx3 arrays at their resize factors (one or one per array) ->
        ``(ImageList, original sizes)``: normalised, resized, batched and padded as the network
        sees them. With :meth:`features` and :meth:`iter_detect`: :meth:`forward` in pieces, for
        callers that use the same features twice (training validation: losses and detections)."""
        import torch
        from torchvision.models.detection.image_list import ImageList

        t = self.model.transform
        tensors, orig_sizes = [], []
        for a, f in zip(arrays, self._factors(arrays, factor=factors)):
            x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
            x = x.to(self.device, torch.float32, non_blocking=True)
            orig_sizes.append(tuple(x.shape[-2:]))
            x = t.normalize(x)
            size = resized_size(x.shape[-2:], f)
            if size != tuple(x.shape[-2:]):
                x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear",
                                                    align_corners=False)[0]
            tensors.append(x)
        sizes = [tuple(x.shape[-2:]) for x in tensors]
        return ImageList(t.batch_images(tensors, size_divisible=t.size_divisible), sizes), orig_sizes

    def features(self, images) -> dict:
        """The backbone + FPN features (float32) of :meth:`prepare`'s ImageList."""
        import torch

        with self._autocast():  # channels_last: oneDNN's fast convolution layout on CPU
            feats = self.model.backbone(images.tensors.contiguous(memory_format=torch.channels_last))
        return {k: v.float() for k, v in feats.items()}

    def _forward(self, arrays, scale: float = 1.0, factor=None, box_filter=None):
        """The forward generator. ``factor`` (a number or one per array) replaces the model's
        own rule times ``scale``. Inference mode is on only while a step computes, never across
        a yield (see :func:`_inference_steps`)."""
        return (yield from _inference_steps(self._forward_steps(arrays, scale, factor, box_filter)))

    def _forward_steps(self, arrays, scale, factor, box_filter):
        images, orig_sizes = self.prepare(arrays, self._factors(arrays, scale, factor))
        yield {"stage": "backbone", "fraction": 0.05}
        feats = self.features(images)
        return (yield from self.iter_detect(images, feats, orig_sizes, box_filter,
                                            float(scale) if factor is None else 1.0))

    def iter_detect(self, images, feats, orig_sizes, box_filter=None, scale: float = 1.0):
        """Generator (progress events from "proposals" on): the heads of the network in
        inference mode on already computed :meth:`features` of :meth:`prepare`'s ``images``;
        returns one Detections per image (boxes in ``orig_sizes`` pixels, ``.scale`` = scale).
        Call it under ``torch.inference_mode()`` (or ``no_grad``); the model must be in eval mode."""
        import torch
        from torchvision.models.detection.transform import resize_boxes

        m = self.model
        n_img = len(orig_sizes)
        sizes = [tuple(s) for s in images.image_sizes]
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
                probs_all.append(self._mask_probs(x, li[s:s + self.mask_chunk]))
                done += len(chunk[i])
        # one host copy for the whole batch: boxes, scores, labels and masks together
        probs = torch.cat(probs_all) if probs_all else torch.zeros(0, 28, 28, device=self.device)
        gboxes = torch.cat([resize_boxes(boxes[i], sizes[i], orig_sizes[i]).float()
                            for i in range(n_img)]) if n_img else torch.zeros(0, 4)
        gscores = torch.cat([s.float() for s in scores]) if n_img else torch.zeros(0)
        glabels = torch.cat(labels) if n_img else torch.zeros(0, dtype=torch.int64)
        probs, gboxes, gscores, glabels = (v.cpu().numpy() for v in (probs, gboxes, gscores, glabels))
        yield {"stage": "done", "fraction": 1.0}
        out = []
        for i, (n0, n) in enumerate(zip(np.cumsum([0] + counts[:-1]), counts)):
            out.append(Detections(gboxes[n0:n0 + n], gscores[n0:n0 + n], probs[n0:n0 + n],
                                  orig_sizes[i], labels=glabels[n0:n0 + n],
                                  scale=float(scale)))
        return out

    def box_masks(self, images, feats, boxes) -> np.ndarray:
        """The mask head on given boxes: ``boxes`` one (N, 4) xyxy tensor per image of
        :meth:`prepare`'s ``images``, in network pixels -> (sum N, 28, 28) float32
        probabilities (class 1, the cell class). Call it under ``torch.inference_mode()``."""
        import torch

        rh = self.model.roi_heads
        sizes = [tuple(s) for s in images.image_sizes]
        boxes = [b.to(self.device, torch.float32) for b in boxes]
        x = rh.mask_roi_pool(feats, boxes, sizes)
        labels = torch.ones(sum(len(b) for b in boxes), dtype=torch.int64, device=self.device)
        return self._mask_probs(x, labels).cpu().numpy()

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
