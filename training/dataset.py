"""Training data, the torch side: ``InstanceDataset`` augments a ``Sample``'s label layers (one
warp per layer, not per cell) and ships layers + boxes (``layers_to_targets``); ``expand_masks``
rebuilds the per-instance masks on the device, so masks and boxes always agree; ``EpochSampler``
and ``collate`` feed the DataLoader. The samples themselves come from :mod:`training.data`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .data import MIN_AREA, DataError, Sample


def _instance_slices(layers: Sequence[np.ndarray], min_area: int):
    """Yield (layer index, label id, slices, crop mask, area) for every usable instance."""
    for li, layer in enumerate(layers):
        for lab_id, sl in enumerate(ndimage.find_objects(layer), start=1):
            if sl is None:
                continue
            crop = layer[sl] == lab_id
            area = int(crop.sum())
            ys, xs = sl
            if area < min_area or xs.stop - xs.start < 2 or ys.stop - ys.start < 2:
                continue
            yield li, lab_id, sl, crop, area


def layers_to_instances(layers: Sequence[np.ndarray], min_area: int = MIN_AREA):
    """Label layers -> (masks uint8 (N,H,W), boxes float32 (N,4) xyxy, areas float32 (N,)).

    One full-size mask per instance: for figures and ground truth only; the training loader
    ships the layers (``layers_to_targets``) and the masks are built on the device."""
    layers = [np.asarray(la) for la in layers]
    h, w = layers[0].shape
    masks, boxes, areas = [], [], []
    for _, _, sl, crop, area in _instance_slices(layers, min_area):
        ys, xs = sl
        m = np.zeros((h, w), np.uint8)
        m[sl][crop] = 1
        masks.append(m)
        boxes.append((xs.start, ys.start, xs.stop, ys.stop))
        areas.append(area)
    if not masks:
        return np.zeros((0, h, w), np.uint8), np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    return np.stack(masks), np.asarray(boxes, np.float32), np.asarray(areas, np.float32)


def layers_to_targets(layers: Sequence[np.ndarray], min_area: int = MIN_AREA):
    """Label layers -> (layers int16/int32 (L,H,W), boxes float32 (N,4), areas float32 (N,),
    instance layer int64 (N,), instance id int64 (N,)): the compact form the loader ships.
    ``expand_masks`` turns it into the (N,H,W) masks torchvision wants, on the device."""
    layers = [np.asarray(la) for la in layers]
    found = list(_instance_slices(layers, min_area))
    stack = np.stack(layers)
    top = int(stack.max()) if stack.size else 0
    stack = stack.astype(np.int16 if top < 2**15 else np.int32)
    boxes = np.asarray([(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) for _, _, sl, _, _ in found],
                       np.float32).reshape(-1, 4)
    areas = np.asarray([a for *_, a in found], np.float32)
    which = np.asarray([li for li, *_ in found], np.int64)
    ids = np.asarray([i for _, i, *_ in found], np.int64)
    return stack, boxes, areas, which, ids


def expand_masks(target: dict, device=None) -> dict:
    """Compact target (``layers`` + ``instance_layer`` / ``instance_id``) -> torchvision target
    with ``masks`` (N,H,W) uint8, built on ``device`` (one comparison per layer; a GPU does a
    500-cell 704x520 image in well under a millisecond, where shipping the masks from the
    workers moves ~180 MB). Targets without ``layers`` are only moved to the device."""
    import torch

    out = {k: v.to(device, non_blocking=True) if device is not None else v for k, v in target.items()}
    if "layers" not in out:
        return out
    layers = out.pop("layers").to(torch.int32)
    which, ids = out.pop("instance_layer"), out.pop("instance_id")
    masks = torch.zeros((len(ids), *layers.shape[1:]), dtype=torch.uint8, device=layers.device)
    for li in range(layers.shape[0]):
        sel = (which == li).nonzero().flatten()
        if len(sel):
            masks[sel] = (layers[li][None] == ids[sel].to(torch.int32)[:, None, None]).to(torch.uint8)
    out["masks"] = masks
    return out


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one training item: a function of (run seed, epoch, index) alone, so
    an epoch draws the same crops/flips whichever worker loads an item and after --resume."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(1)[0])


class InstanceDataset:
    """torch-style dataset of (image tensor 3xHxW float32 in [0,1], target dict).

    ``length`` > len(samples) repeats the samples (random crops: many steps per epoch). An
    index may be an ``(epoch, i)`` pair (``EpochSampler``): the augmentation is then seeded
    by ``item_seed(seed, epoch, i)``. ``full_masks=True`` ships one full-size mask per
    instance (the old way; benchmarks only); by default the target carries the label layers
    and ``expand_masks`` builds the masks on the device."""

    def __init__(self, samples: list[Sample], pipeline, length: int | None = None, seed: int = 0,
                 full_masks: bool = False):
        if not samples:
            raise DataError("empty dataset")
        self.samples = samples
        self.pipeline = pipeline
        self.length = length or len(samples)
        self.seed = seed
        self.full_masks = full_masks

    def __len__(self) -> int:
        return self.length

    def _augment(self, index: int):
        s = self.samples[index % len(self.samples)]
        img = s.image.astype(np.float32)
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=2)
        out = self.pipeline(image=img, masks=list(s.layers))
        return np.clip(out["image"], 0.0, 1.0).astype(np.float32, copy=False), out["masks"]

    def _key(self, key):
        if isinstance(key, tuple):
            epoch, index = key
            if hasattr(self.pipeline, "set_random_seed"):
                self.pipeline.set_random_seed(item_seed(self.seed, epoch, index))
            return index
        return key

    def raw(self, index):
        """Augmented numpy image (HxWx3 float32) and (masks, boxes, areas)."""
        image, layers = self._augment(self._key(index))
        return image, layers_to_instances(layers)

    def __getitem__(self, key):
        import torch

        index = self._key(key)
        image, layers = self._augment(index)
        if self.full_masks:
            masks, boxes, areas = layers_to_instances(layers)
            extra = {"masks": torch.from_numpy(masks)}
        else:
            stack, boxes, areas, which, ids = layers_to_targets(layers)
            extra = {"layers": torch.from_numpy(stack), "instance_layer": torch.from_numpy(which),
                     "instance_id": torch.from_numpy(ids)}
        n = len(boxes)
        target = {
            "boxes": torch.from_numpy(boxes).reshape(n, 4),
            "labels": torch.ones(n, dtype=torch.int64),
            **extra,
            "image_id": torch.tensor(index % len(self.samples), dtype=torch.int64),
            "area": torch.from_numpy(areas),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
        }
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target


class EpochSampler:
    """Indices of one epoch as ``(epoch, draw)`` pairs, deterministic from (seed, epoch) alone
    (``set_epoch``), so a resumed run sees exactly the same batches; works with persistent
    DataLoader workers (the epoch travels inside each index).

    ``length`` items per epoch are taken from ONE stream of passes over the ``n_samples`` items:
    pass ``p`` (1, 2, ..) is a permutation drawn from (seed, p), and epoch ``e`` (from 1) takes the
    stream's positions ``[(e - 1) * length, e * length)``. So with ``--steps-per-epoch`` (length !=
    n_samples) every item is drawn over the epochs, each as often as any other (+-1), instead of
    the same ``length`` items every epoch; with length == n_samples epoch ``e`` is pass ``e``. A draw is
    ``k * n_samples + item`` (``k``: the pass counted from the epoch's first), so ``draw %
    n_samples`` is the item and no two draws of an epoch share an augmentation seed. Split across
    DDP ranks (padded cyclically to a multiple of the world size, as DistributedSampler)."""

    def __init__(self, length: int, seed: int, shuffle: bool = True, world: int = 1, rank: int = 0,
                 n_samples: int | None = None):
        self.length, self.seed, self.shuffle, self.world, self.rank = length, seed, shuffle, world, rank
        self.n_samples = n_samples or length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.length // self.world)

    def _pass(self, p: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_samples)
        return np.random.default_rng([self.seed % 2**32, p % 2**32]).permutation(self.n_samples)

    def draws(self) -> np.ndarray:
        """The epoch's draws, before the split across ranks."""
        n, start = self.n_samples, (self.epoch - 1) * self.length
        end, first = start + self.length, start // n
        parts, pos = [], start
        while pos < end:
            k = pos // n  # pass k + 1 holds the stream's positions [k * n, (k + 1) * n)
            a, b = pos - k * n, min(n, end - k * n)
            parts.append((k - first) * n + self._pass(k + 1)[a:b])
            pos = k * n + b
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def __iter__(self):
        order = np.resize(self.draws(), len(self) * self.world)  # pad cyclically to a multiple of world
        return iter([(self.epoch, int(i)) for i in order[self.rank::self.world]])


def collate(batch):
    return tuple(zip(*batch))
