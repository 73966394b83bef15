"""Training data: Kaggle train.csv + images, image/label-TIFF folders, in-memory arrays.

Every source is loaded ONCE into ``Sample`` objects (image as float16 in [0, 1], instances as a
few uint16 label "layers": cells that overlap go to different layers, so overlapping Kaggle masks
survive). RLE strings are decoded once per image here, never per epoch. The torch side
(augmenting, the Dataset, sampler and collate) is :mod:`training.dataset`. Bad input raises
``DataError`` naming file and problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from napari_cellseg.io.images import IMAGE_SUFFIXES  # one list of image suffixes
from napari_cellseg.inference.metrics import median_diameter
from napari_cellseg.inference.sizing import clamp_scale  # the 0.25-4 size-normalisation clamp, one home

MIN_AREA = 4  # instances smaller than this (after augmentation) are dropped as degenerate


class DataError(ValueError):
    """Unusable training data; the message names the file/row and the problem."""


class DataWarning(UserWarning):
    """Usable training data with something the user should know (e.g. label files not used)."""


def _warn(warn, message: str) -> None:
    """One-line warning: ``warn(message)`` when given (engine.train turns it into a "warning"
    event, which cellseg-train and the Train widget show), else a Python DataWarning."""
    if warn is not None:
        warn(message)
    else:
        import warnings

        warnings.warn(message, DataWarning, stacklevel=3)


@dataclass
class Sample:
    image_id: str
    image: np.ndarray  # float16 HxWxC, C in (1, 3), values in [0, 1]
    layers: np.ndarray  # uint16 (L, H, W): instance ids per layer, 0 = background

    @property
    def n_instances(self) -> int:
        return int(sum(len(np.unique(layer)) - 1 for layer in self.layers))


# ---------------------------------------------------------------- image reading / normalising
def _info(path: Path, labels: bool = False):
    """images.image_info (the header, limits checked, images.layout's planes/channels) as a DataError."""
    from napari_cellseg.io.images import ImageError, image_info

    try:
        return image_info(path, labels)
    except ImageError as exc:
        raise DataError(str(exc)) from None


def _read(path: Path, plane: int | None = None) -> np.ndarray:
    """One plane of an image file (images.read_plane: only that page of a paged TIFF is decoded)
    as HxW or HxWxC by images.layout (a last axis of 1-4 is channels, never planes)."""
    from napari_cellseg.io.images import ImageError, layout, read_plane

    try:
        array = np.asarray(read_plane(path, plane))
        planes, h, w, c = layout(array.shape, str(path))
    except ImageError as exc:
        raise DataError(str(exc)) from None
    if planes != 1:
        raise DataError(f"{path}: is a stack of {planes} planes (shape {array.shape}); expected one plane")
    return array.reshape((h, w) if c == 1 else (h, w, c))


def _read_labels(path: Path, plane: int | None = None) -> np.ndarray:
    """One label plane by files.read_label_image (the reader of cellseg to-csv / evaluate / tune:
    one shape and dtype rule for every command), as a DataError."""
    from napari_cellseg.io.files import read_label_image
    from napari_cellseg.io.images import ImageError

    try:
        return read_label_image(path, plane)
    except ImageError as exc:
        raise DataError(str(exc)) from None


_COLOURS = {2: "grey+alpha", 3: "RGB", 4: "RGBA"}


def _check_label_info(path: Path, info) -> None:
    """A label image holds one instance id per pixel: channels (a colour-coded label) are refused."""
    if info.channels > 1:
        kind = "a palette (indexed-colour) image" if info.dtype == "P" else _COLOURS.get(info.channels, "colour")
        raise DataError(f"{path}: label image is {kind} (HxWx{info.channels}): save instance ids as a "
                        f"single-channel integer image")


def to_float_image(array: np.ndarray, rule=None, where: str = "image") -> np.ndarray:
    """HxW / HxWxC array -> float32 HxWx3 in [0, 1] by the one rule the pipeline uses
    (``images.model_input``; ``rule`` = the run's ``TrainConfig.image_input()``, None = defaults),
    as a DataError naming ``where``."""
    from napari_cellseg.io.images import ImageError, model_input

    try:
        return np.asarray(model_input(array, rule, where), dtype=np.float32)
    except ImageError as exc:
        raise DataError(str(exc)) from None


def _compact(img: np.ndarray) -> np.ndarray:
    """float32 HxWx3 -> float16 HxWx1 when grey (halves/sixths the cache)."""
    if np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]):
        img = img[..., :1]
    return img.astype(np.float16)


def labels_to_layers(labels: np.ndarray, where: str = "labels") -> np.ndarray:
    """Instance label image -> (1, H, W) uint16 with ids 1..N."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise DataError(f"{where}: label image must be 2-D, got shape {lab.shape}")
    from napari_cellseg.io.files import integer_labels
    from napari_cellseg.io.images import ImageError

    try:
        lab = integer_labels(lab, where)  # the one rule: integer ids, or floats that are whole numbers
    except ImageError as exc:
        raise DataError(str(exc)) from None
    ids, inv = np.unique(lab, return_inverse=True)
    if len(ids) - (ids[0] == 0) > 65535:
        raise DataError(f"{where}: more than 65535 instances in one image")
    new = inv.reshape(lab.shape).astype(np.int64) + (0 if ids[0] == 0 else 1)
    return new.astype(np.uint16)[None]


def masks_to_layers(masks: Sequence[np.ndarray], shape) -> np.ndarray:
    """Possibly overlapping bool masks -> (L, H, W) uint16 layers, greedy: first layer that is free."""
    return pixels_to_layers((np.flatnonzero(m) for m in masks), shape)


def rles_to_layers(rles: Sequence[str], shape) -> np.ndarray:
    """Kaggle RLE strings (one per cell, possibly overlapping) -> the same layers as
    ``masks_to_layers`` of their decoded masks, without one full-size mask per cell: each cell's
    flat pixel indices come straight from its runs (rle.parse_rles validates them)."""
    from napari_cellseg.io.rle import parse_rles

    h, w = shape
    starts, lengths, n_runs = parse_rles(list(rles), h * w)
    bounds = np.concatenate(([0], np.cumsum(n_runs)))

    def cells():
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            st, ln = starts[a:b], lengths[a:b]
            offsets = np.cumsum(ln) - ln
            yield np.arange(int(ln.sum()), dtype=np.int64) + np.repeat(st - offsets, ln)

    return pixels_to_layers(cells(), shape)


def pixels_to_layers(cells, shape) -> np.ndarray:
    """Cells given as flat pixel indices (ascending) -> (L, H, W) uint16 layers, greedy: each cell
    goes to the first layer where none of its pixels is taken; ids 1.. per layer in input order."""
    layers: list[np.ndarray] = []
    counters: list[int] = []
    for idx in cells:
        if idx.size == 0:
            continue
        for li, layer in enumerate(layers):
            if not layer.ravel()[idx].any():
                break
        else:
            layers.append(np.zeros(shape, np.uint16))
            counters.append(0)
            li = len(layers) - 1
        counters[li] += 1
        layers[li].ravel()[idx] = counters[li]
    if not layers:
        return np.zeros((1, *shape), np.uint16)
    return np.stack(layers)


def _make_sample(image_id: str, image: np.ndarray, layers: np.ndarray, where: str, rule=None) -> Sample:
    img = to_float_image(image, rule, where)
    if img.shape[:2] != layers.shape[1:]:
        raise DataError(f"{where}: image is {img.shape[1]}x{img.shape[0]} (WxH) but its labels are "
                        f"{layers.shape[2]}x{layers.shape[1]}")
    return Sample(image_id, _compact(img), layers)


# ---------------------------------------------------------------- sources
def load_folder_samples(image_dir, label_dir, warn=None, rule=None) -> list[Sample]:
    """images/NAME.ext + labels/NAME.tif, matched by image id (files.files_by_id: file stem by
    annotations.normalize_id; one id twice, e.g. a.png + a.tif, is refused). A Z-stack with a
    matching label stack gives one sample per plane that carries labels (ids NAME_000 .., as
    cellseg predict names the planes: images.plane_id). Planes and
    channels follow images.layout (a last axis of 1-4 is channels, never planes); a colour label
    image is refused. Label files without an image are reported through ``warn`` (``_warn``)."""
    images, labels = _files(image_dir, "images", warn), _files(label_dir, "label images", warn)
    missing = [i for i in images if i not in labels]
    if missing:
        raise DataError(f"{label_dir}: no label image for {len(missing)} image(s), e.g. {missing[0]!r} "
                        f"(labels are matched by file stem)")
    orphans = [path.name for image_id, path in labels.items() if image_id not in images]
    if orphans:
        _warn(warn, f"{label_dir}: {len(orphans)} label image(s) have no image in {image_dir} and are not "
                    f"used, e.g. {orphans[0]} (labels are matched by file stem)")
    from napari_cellseg.io.files import check_label_not_image

    for image_id, ipath in images.items():  # --label-dir = --image-dir: each image its own labels
        try:
            check_label_not_image(labels[image_id], ipath, image_id)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    samples, masks = [], {}  # label file name -> regions of its first mask-like plane
    source: dict[str, Path] = {}  # sample id -> image file: a plane id (st_000) may be a file's id too
    for image_id, ipath in images.items():
        pair = _folder_pair(image_id, ipath, labels[image_id], rule)
        for s in pair:
            if s.image_id in source:
                raise DataError(f"{ipath}: image id {s.image_id!r} is also given by {source[s.image_id]} "
                                f"(a plane of a stack is named like cellseg predict names it: "
                                f"STACK_000 ..); rename one of them")
            source[s.image_id] = ipath
            if labels[image_id].name not in masks and (n := _regions_of_one_id(s.layers)):
                masks[labels[image_id].name] = n
        samples.extend(pair)
    if masks:
        name, n = next(iter(masks.items()))
        _warn(warn, f"{label_dir}: {len(masks)} label image(s) hold one id over many separate regions, e.g. "
                    f"{name} ({n} regions): binary masks, not instance labels? "
                    f"Each cell needs its own id (skimage.measure.label numbers a mask); as given, each "
                    f"image trains as one cell")
    return samples


MASK_REGIONS = 3  # one id over this many separate regions or more: a binary mask, not instances


def _regions_of_one_id(layers: np.ndarray) -> int:
    """Separate regions (8-connected) of a label image that holds a single id, when there are at
    least MASK_REGIONS of them (a binary / semantic mask given as instance labels), else 0."""
    if layers.shape[0] != 1 or layers.max() != 1:
        return 0
    import cv2

    n = cv2.connectedComponents((layers[0] > 0).astype(np.uint8), connectivity=8)[0] - 1
    return n if n >= MASK_REGIONS else 0


def _folder_pair(stem: str, ipath: Path, lpath: Path, rule=None) -> list[Sample]:
    """The samples of one image file and its label file: checked on the headers, then decoded."""
    iinfo, linfo = _info(ipath), _info(lpath, labels=True)
    _check_label_info(lpath, linfo)
    if (iinfo.height, iinfo.width) != (linfo.height, linfo.width):
        raise DataError(f"{ipath}: image is {iinfo.width}x{iinfo.height} (WxH) but its labels "
                        f"{lpath.name} are {linfo.width}x{linfo.height}")
    if linfo.planes == 1 and iinfo.planes == 1:
        return [_make_sample(stem, _read(ipath), labels_to_layers(_read_labels(lpath), str(lpath)), str(ipath), rule)]
    if linfo.planes == 1:
        raise DataError(f"{ipath}: image is a stack of {iinfo.planes} planes of {iinfo.width}x{iinfo.height} "
                        f"but its labels {lpath.name} are a single {linfo.width}x{linfo.height} plane: give "
                        f"a label stack with one plane per image plane (or one image per label)")
    if linfo.planes != iinfo.planes:
        raise DataError(f"{lpath}: a stack of {linfo.planes} label planes but the image {ipath.name} has "
                        f"{iinfo.planes} planes")
    from napari_cellseg.io.images import plane_id

    samples = []
    for z in range(linfo.planes):  # Z-stack (+ channels): one plane at a time
        lab = _read_labels(lpath, z)
        if lab.any():
            samples.append(_make_sample(plane_id(stem, (z,), (linfo.planes,)), _read(ipath, z),
                                        labels_to_layers(lab, f"{lpath} [plane {z}]"), f"{ipath} [plane {z}]",
                                        rule))
    return samples


def _files(folder, what: str, warn=None) -> dict[str, Path]:
    """Image files of a folder keyed by image id: files.files_by_id, the rule of ``cellseg tune`` /
    ``evaluate`` / ``to-csv`` (id = file stem by annotations.normalize_id; one id twice, e.g.
    a.png + a.tif, is refused), as a DataError. A file name that is not UTF-8 is skipped with a
    one-line warning through ``warn`` (``_warn``)."""
    from napari_cellseg.io.files import files_by_id
    from napari_cellseg.io.images import list_images

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    if not list_images(folder):
        raise DataError(f"{folder}: no {what} ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    try:
        return files_by_id([folder], what, warn=lambda message: _warn(warn, message))
    except ValueError as exc:  # files.files_by_id: an empty or duplicate id
        raise DataError(str(exc)) from None


def _csv_row(ann, image_id) -> int:
    """Spreadsheet row (header = row 1) of the first row of ``image_id``."""
    try:
        return ann._rows[ann._index[image_id][0]]
    except (AttributeError, KeyError, IndexError, TypeError):
        return ann.table["id"].astype(str).tolist().index(str(image_id)) + 2


def _resolve_csv_ids(ann, csv_path, image_dir, warn=None) -> dict[str, tuple[Path, int | None, object]]:
    """Every CSV id -> ``(file, plane or None, header)`` by files.resolve_ids (the rule of
    ``cellseg tune``: a file whose id it is, or one plane of a stack, ``stack_000`` .. for
    stack.tif). Checked on headers only; a missing image, an id naming a whole stack or both a
    file and a plane is a DataError naming the CSV row."""
    from napari_cellseg.io.files import IdConflict, resolve_ids
    from napari_cellseg.io.images import ImageError, plane_id

    try:
        found, missing = resolve_ids(ann.ids, _files(image_dir, "images", warn))
    except IdConflict as exc:
        raise DataError(f"{csv_path}: row {_csv_row(ann, exc.image_id)}: {exc}") from None
    except ImageError as exc:
        raise DataError(str(exc)) from None
    for image_id, (path, plane, info) in found.items():
        if plane is not None:
            continue
        info = _info(path)
        if info.planes > 1:
            n = info.planes
            raise DataError(f"{csv_path}: row {_csv_row(ann, image_id)}: image {image_id!r} is {path}, "
                            f"a stack of {n} planes: name its planes {plane_id(image_id, (0,), (n,))} .. "
                            f"{plane_id(image_id, (n - 1,), (n,))} (the ids cellseg predict writes)")
        found[image_id] = (path, None, info)
    if missing:
        raise DataError(f"{csv_path}: row {_csv_row(ann, missing[0])} (spreadsheet row incl. header): image "
                        f"{missing[0]!r} not found in {image_dir} ({len(missing)} id(s) without an image)")
    return found


def load_csv_samples(csv_path, image_dir, warn=None, rule=None) -> list[Sample]:
    """Kaggle train.csv (one RLE row per cell) + the folder of the images it names. Ids are
    resolved as the other commands do: file stem (files.files_by_id), or ``STEM_000`` .. for the
    planes of a stack STEM.tif (images.plane_id, the ids ``cellseg predict`` writes), one plane
    read at a time (images.read_plane). Every id, size and RLE is checked before any decoding."""
    from napari_cellseg.io.annotations import NO_ROWS, CsvError, read_annotations
    ann = read_annotations(csv_path)  # CsvError (a ValueError) for malformed CSVs
    if not ann.ids:
        raise DataError(f"{csv_path} {NO_ROWS}: no annotated cells to train on")
    found = _resolve_csv_ids(ann, csv_path, image_dir, warn)
    shapes = {}
    for image_id, (path, plane, info) in found.items():
        where = str(path) if plane is None else f"plane {plane} of {path}"
        try:  # the CSV's width/height against the image header, and every RLE, naming the row
            shapes[image_id] = ann.check(image_id, (info.height, info.width))
        except CsvError as exc:
            raise DataError(f"{exc} ({where})") from None
    samples = []
    for image_id, (path, plane, _) in found.items():
        shape = shapes[image_id]
        layers = rles_to_layers(ann.rles(image_id), tuple(shape))  # RLEs checked above
        where = str(path) if plane is None else f"{path} [plane {plane}]"
        samples.append(_make_sample(image_id, _read(path, plane), layers, where, rule))
    return samples


def array_samples(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                  ids: Sequence[str] | None = None, rule=None) -> list[Sample]:
    """In-memory images (any dtype, grey or any channels) and instance label images (the napari
    widget), by ``rule`` (``TrainConfig.image_input()``; None = the defaults)."""
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} label images")
    ids = list(ids) if ids is not None else [f"image{i}" for i in range(len(images))]
    return [_make_sample(str(i), np.asarray(im), labels_to_layers(np.asarray(lab), f"labels of {i}"), str(i), rule)
            for i, im, lab in zip(ids, images, labels)]


MIN_IMAGES_UNTILED = 4  # fewer images than this: cut each into 2x2 tiles (see few_image_samples)


def _tiles(shape: Sequence[int], n: int = 2):
    h, w = shape[:2]
    ys, xs = np.linspace(0, h, n + 1).astype(int), np.linspace(0, w, n + 1).astype(int)
    return [(f"r{i}c{j}", (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])))
            for i in range(n) for j in range(n)]


def few_image_samples(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      ids: Sequence[str] | None = None, min_untiled: int = MIN_IMAGES_UNTILED,
                      rule=None) -> list[Sample]:
    """:func:`array_samples` (images by ``rule``, the run's ``TrainConfig.image_input()``), but
    with fewer than ``min_untiled`` images every image is cut into 2x2 tiles (ids ``NAME@r0c1``)
    so that the grouped train/val split can hold out part of a single image (the napari Train
    widget, ``training.finetune``)."""
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} label images")
    ids = list(ids) if ids is not None else [f"image{i}" for i in range(len(images))]
    tile = len(images) < min_untiled
    out_ids, out_images, out_labels = [], [], []
    for name, image, lab in zip(ids, images, labels):
        image, lab = np.asarray(image), np.asarray(lab)
        for suffix, sl in (_tiles(lab.shape) if tile else [("", (slice(None), slice(None)))]):
            out_ids.append(f"{name}@{suffix}" if suffix else str(name))
            out_images.append(image[sl])
            out_labels.append(lab[sl])
    return array_samples(out_images, out_labels, out_ids, rule)


def load_samples(config, warn=None) -> list[Sample]:
    """The samples of the config's data source, its images by ``config.image_input()`` (the one
    input rule: intensity, channels, invert); ``warn`` takes one-line warnings (``_warn``)."""
    rule = config.image_input()
    if config.train_csv:
        samples = load_csv_samples(config.train_csv, config.images, warn, rule)
        source = f"{config.train_csv}: every row says 'no cell'"
    elif config.image_dir:
        samples = load_folder_samples(config.image_dir, config.label_dir, warn, rule)
        source = f"{config.label_dir}: every label image is empty"
    else:
        raise DataError("no training data: give --train-csv CSV --images DIR or --image-dir DIR --label-dir DIR")
    if not any(s.layers.any() for s in samples):
        raise DataError(f"{NO_CELLS} ({source})")
    return samples


NO_CELLS = "no image carries any cells: nothing to train on"


def split_samples(samples: list[Sample], val_fraction: float, seed: int):
    """Group split by image id (no id in both sets); ceil(fraction * n_ids) ids go to validation."""
    if not any(s.layers.any() for s in samples):
        raise DataError(NO_CELLS)
    ids = sorted({s.image_id for s in samples})
    if val_fraction <= 0:
        raise DataError("--val-fraction 0 leaves nothing to validate (best_model.bin is chosen on validation images)")
    n_val = math.ceil(val_fraction * len(ids))
    if n_val >= len(ids):
        raise DataError(f"the val split takes all {len(ids)} image(s) and leaves nothing to train on; "
                        f"add images or lower --val-fraction")
    rng = np.random.default_rng(seed)
    val_ids = set(rng.permutation(ids)[:n_val].tolist())
    train = [s for s in samples if s.image_id not in val_ids]
    val = [s for s in samples if s.image_id in val_ids]
    if not any(s.layers.any() for s in val):
        raise DataError(f"the {len(val)} validation image(s) carry no cells: nothing to validate; "
                        f"change --seed or --val-fraction")
    if not any(s.layers.any() for s in train):
        raise DataError("the training images carry no cells: the training set is empty")
    return train, val


# ---------------------------------------------------------------- object size
MAX_SIDE = 512  # size-normalised images larger than this are cut into tiles (bounded memory)


def normalize_size(samples: list[Sample], diameter: float, max_side: int = MAX_SIDE) -> list[Sample]:
    """Resize each sample so its median object diameter becomes ``diameter`` px (as cellpose
    rescales training images to diam_mean); samples without cells are kept as they are.

    An image that grows beyond ``max_side`` is cut into a grid of tiles (ids ``ID@rIcJ``, cells
    cut by a tile edge stay as the part inside), so a crowd of tiny cells upscaled 4x cannot
    exhaust memory in validation, which sees whole images."""
    import cv2

    out = []
    for s in samples:
        d = median_diameter(s.layers)
        f = clamp_scale(diameter / d) if d > 0 else 1.0
        if abs(f - 1.0) < 0.02:
            img, layers = s.image, s.layers
        else:
            h, w = s.layers.shape[1:]
            size = (max(1, round(w * f)), max(1, round(h * f)))
            img = cv2.resize(s.image.astype(np.float32), size, interpolation=cv2.INTER_AREA if f < 1
                             else cv2.INTER_LINEAR).reshape(size[1], size[0], -1).astype(np.float16)
            layers = np.stack([cv2.resize(la, size, interpolation=cv2.INTER_NEAREST) for la in s.layers])
        h, w = layers.shape[1:]
        ny, nx = -(-h // max_side), -(-w // max_side)
        if ny * nx == 1:
            out.append(s if img is s.image else Sample(s.image_id, img, layers))
            continue
        ys, xs = np.linspace(0, h, ny + 1).astype(int), np.linspace(0, w, nx + 1).astype(int)
        for i in range(ny):
            for j in range(nx):
                win = (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
                out.append(Sample(f"{s.image_id}@r{i}c{j}", img[win], layers[(slice(None), *win)]))
    return out
