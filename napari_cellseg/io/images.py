"""Any microscopy image -> float32 HxWx3 for the model: the ONE intensity and channel rule.

Accepted: PNG / TIFF / JPEG / BMP files or arrays, 8- or 16-bit (or other integer / float),
grey (HxW), any number of channels up to :data:`MAX_CHANNELS` (HxWxC: RGB, or a microscopy
file's DAPI + cytoplasm ...), and stacks (ZxHxW, ZxHxWxC) from which one plane is chosen.

Where the channels are (:func:`image_info`, the header, before any pixel is decoded):

* TIFF: the axes of its metadata (tifffile ``series[0].axes``: ImageJ hyperstacks, OME): ``C``
  and ``S`` are channels, ``Y`` / ``X`` the plane, the rest planes. A TIFF without axes metadata
  (tifffile's generic ``Q`` / ``I``): a small last axis (1..:data:`SMALL_AXIS`) is channels, else
  a small FIRST axis of a 3-D image (CxYxX) or the second of a 4-D one (ZxCxYxX). An RGB TIFF's
  extra alpha sample is dropped.
* PNG / JPEG / BMP: the file's bands; the alpha of grey+alpha (LA) and RGBA is dropped.
* arrays (napari layer data): :func:`layout`, a last axis of 1..MAX_CHANNELS, smaller than the
  plane's sides, is channels.

Files are returned in that canonical order (planes..., Y, X, channels), so every caller sees the
channels last. Limits are checked on the header: at most ``rle.MAX_PIXELS`` (2^28) pixels per
plane, :data:`MAX_PLANES` planes, MAX_CHANNELS channels, :data:`MAX_SAMPLES` values decoded at once.

The intensity and channel rule (:func:`model_input`, driven by ``options.ImageInput``), the same
at predict, in the napari widget, in training and in validation:

1. channels: ``channel`` 0 = all (grey as it is; 3 channels as RGB; RGBA without its alpha;
   any other number: the mean of the normalised channels, as grey); ``channel`` k >= 1 = the
   k-th channel (numbered from 1, as cellpose does); ``channel2`` j = a nuclear channel.
2. intensity, per channel: ``percentile`` (default; cellpose's normalize99): the 1st..99th
   percentile -> 0..1, clipped, for every dtype (8-bit too); a constant channel becomes 0.
   ``raw``: the dtype's range (uint8 / 255, uint16 / 65535, other integers / their max), floats
   as they are; clipped to 0..1.
3. ``invert``: 1 - the cell channel (with channel 0: every channel).
4. the model's 3 input channels: one cell channel -> R, G and B (grey); with a nuclear channel,
   cell -> R and G, nuclear -> B (as cellpose feeds chan / chan2 to its two inputs).

Anything else (4-D data without channels, empty images, unreadable files) raises
:class:`ImageError` naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = [
    "ImageError",
    "IMAGE_SUFFIXES",
    "load_image",
    "load_plane",
    "to_rgb_float",
    "read_raw",
    "read_plane",
    "list_images",
    "normalise",
    "model_input",
    "channel_labels",
    "stored_channels",
    "layout",
    "image_info",
    "ImageInfo",
    "MAX_PLANES",
    "MAX_CHANNELS",
    "MAX_SAMPLES",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
PERCENTILES = (1.0, 99.0)  # cellpose's normalize99
MAX_PLANES = 65536  # planes in one stack file
MAX_CHANNELS = 16  # channels of one image (a last axis up to this is channels, never planes)
SMALL_AXIS = 5  # a TIFF without axes metadata: a first axis up to this is channels (CxYxX)
MAX_SAMPLES = 2**30  # values decoded at once (a whole file): one RGBA plane at MAX_PIXELS
_GENERIC_AXES = set("QI")  # tifffile's "shape as stored, meaning unknown"


class ImageError(ValueError):
    """An image that cannot be used: ``NAME: problem``."""


@dataclass(frozen=True)
class ImageInfo:
    """What a file header says: ``shape`` of the array the reader will return, its ``dtype`` and
    the :func:`layout` of that shape (``planes``, ``height``, ``width``, ``channels``). A label
    file (``labels=True`` in the readers) has no channel axis but a contiguous colour sample: its
    axes are planes, as stored."""

    shape: tuple[int, ...]
    dtype: str
    planes: int
    height: int
    width: int
    channels: int
    channel_names: tuple[str, ...] = ()  # from ImageJ / OME metadata, when the file names them


def _is_channel_axis(shape) -> bool:
    """The last axis of ``shape`` is channels: 1..MAX_CHANNELS and smaller than both sides of
    the plane (a 4x6x7 stack is 4 planes of 6x7, an 8x9x5 image 5 channels)."""
    return 1 <= shape[-1] <= MAX_CHANNELS and shape[-1] < min(shape[-3], shape[-2])


def layout(shape, name: str = "image") -> tuple[int, int, int, int]:
    """``(planes, height, width, channels)`` of an image array shape: the one rule for in-memory
    data and for files once read (:func:`read_raw` puts their channels last). HxW; HxWxC with C
    in 1..MAX_CHANNELS; ZxHxW; ZxHxWxC."""
    shape = tuple(int(v) for v in shape)
    if len(shape) > 3:  # hyperstacks (T, Z, 1, Y, X ...): singleton axes do not count
        shape = tuple(v for v in shape if v != 1) or shape
    colour = len(shape) >= 3 and _is_channel_axis(shape)
    if len(shape) == 2:
        return 1, shape[0], shape[1], 1
    if len(shape) == 3:
        return (1, *shape) if colour else (shape[0], shape[1], shape[2], 1)
    if len(shape) == 4 and colour:
        return shape
    if len(shape) < 2:
        raise ImageError(f"{name}: {len(shape)}-D data (shape {shape}) is not an image")
    raise ImageError(f"{name}: {len(shape)}-D image (shape {shape}) is not supported")


@dataclass(frozen=True)
class _Plan:
    """How a file's stored array becomes the canonical (planes..., Y, X, C) array."""

    stored: tuple[int, ...]  # shape as the reader returns it
    dtype: str
    perm: tuple[int, ...] | None = None  # transpose of the stored array (None: as stored)
    alpha: bool = False  # the last channel is alpha: dropped
    names: tuple[str, ...] = ()
    channels_last: bool = False  # the metadata (or the shape rule) says the last axis is channels

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.stored[i] for i in self.perm) if self.perm else self.stored
        if self.alpha:
            shape = shape[:-1] + (shape[-1] - 1,)
            if shape[-1] == 1:
                shape = shape[:-1]
        return shape

    def apply(self, array: np.ndarray) -> np.ndarray:
        if self.perm:
            array = np.transpose(array, self.perm)
        if self.alpha and array.ndim >= 3 and array.shape[-1] in (2, 4):
            array = array[..., 0] if array.shape[-1] == 2 else array[..., :3]
        return array


def _generic_channels(shape: tuple[int, ...]) -> int | None:
    """The channel axis of a TIFF without axes metadata, by shape: a small last axis, else a
    small first axis of a 3-D image (CxYxX) or the second of a 4-D one (ZxCxYxX); None = grey."""
    dims = [i for i, v in enumerate(shape) if v != 1]
    if len(dims) < 3:
        return None
    if _is_channel_axis(tuple(shape[i] for i in dims)):
        return dims[-1]
    if len(dims) in (3, 4) and 2 <= shape[dims[-3]] <= SMALL_AXIS and min(shape[dims[-2]], shape[dims[-1]]) > MAX_CHANNELS:
        return dims[-3]
    return None


def _tiff_names(tif, n: int) -> tuple[str, ...]:
    """Channel names from OME (``<Channel Name=...>``) or ImageJ (``Labels``) metadata."""
    names: list[str] = []
    if tif.is_ome and tif.ome_metadata:
        names = re.findall(r'<Channel\b[^>]*\bName="([^"]*)"', tif.ome_metadata)
    elif tif.is_imagej and isinstance(tif.imagej_metadata, dict):
        labels = tif.imagej_metadata.get("Labels")
        names = [str(v) for v in labels] if isinstance(labels, (list, tuple)) else []
    names = [v.strip() for v in names[:n]]
    return tuple(names) if len(names) == n and all(names) else ()


def _tiff_plan(tif, labels: bool = False) -> _Plan:
    series = tif.series[0]
    shape, axes = tuple(int(v) for v in series.shape), str(series.axes)
    dtype = str(series.dtype)
    if labels:  # instance ids have no channels: planes as stored (a colour label is refused by its reader)
        return _Plan(shape, dtype)
    if set(axes) & _GENERIC_AXES:  # no axes metadata: decide by shape
        c = _generic_channels(shape)
        if c is None:
            return _Plan(shape, dtype)
        perm = tuple(i for i in range(len(shape)) if i != c) + (c,)
        return _Plan(shape, dtype, None if c == len(shape) - 1 else perm, channels_last=True)
    chan = [i for i, a in enumerate(axes) if a in "CS" and shape[i] > 1]
    if len(chan) > 1:
        raise ValueError(f"axes {axes} (shape {shape}) hold channels twice (C and S); save one channel axis")
    plane = [i for i, a in enumerate(axes) if a not in "YXCS" or (a in "CS" and shape[i] == 1)]
    yx = [axes.index("Y"), axes.index("X")] if "Y" in axes and "X" in axes else None
    if yx is None:
        return _Plan(shape, dtype)
    perm = tuple(plane + yx + chan)
    alpha = bool(chan) and axes[chan[0]] == "S" and shape[chan[0]] == 4 and bool(
        getattr(series.keyframe, "extrasamples", ()))
    names = _tiff_names(tif, shape[chan[0]]) if chan and axes[chan[0]] == "C" else ()
    return _Plan(shape, dtype, None if perm == tuple(range(len(shape))) else perm, alpha, names,
                 channels_last=bool(chan))


def _plan(path: Path, labels: bool = False) -> _Plan:
    """The file's stored shape and dtype and its canonical order, without decoding pixels."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return _tiff_plan(tif, labels)
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        bands = im.getbands()
        frames = int(getattr(im, "n_frames", 1) or 1)
        w, h = im.size
        mode = im.mode
    if mode == "P":
        bands = ("R", "G", "B", "A")  # palette images are expanded to RGB(A) by the reader
    shape = (h, w) if len(bands) == 1 else (h, w, len(bands))
    return _Plan((frames, *shape) if frames > 1 else shape, mode, alpha="A" in bands and len(bands) in (2, 4),
                 channels_last=len(bands) > 1)


def image_info(path, labels: bool = False) -> ImageInfo:
    """Read an image file's header (no pixel decoding) and check the size limits.

    Raises ImageError naming the file: unreadable header, over ``MAX_PIXELS`` pixels per plane,
    over MAX_PLANES planes or MAX_CHANNELS channels. (:func:`read_raw`, which decodes the whole
    file, also refuses over MAX_SAMPLES values; :func:`read_plane` of a paged TIFF does not.)"""
    return _checked(path, labels)[0]


def _checked(path, labels: bool = False) -> tuple[ImageInfo, _Plan]:
    from napari_cellseg.io import rle

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    try:
        plan = _plan(path, labels)
    except Exception as exc:  # every reader fails differently; report them the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: cannot read image ({reason})") from None
    shape, dtype = plan.shape, plan.dtype
    if any(v == 0 for v in shape):
        raise ImageError(f"{path}: empty image (shape {shape})")
    planes, h, w, c = _file_layout(path, plan)
    try:
        rle.check_size(h, w)
    except ValueError as exc:
        raise ImageError(f"{path}: {exc}") from None
    if planes > MAX_PLANES:
        raise ImageError(f"{path}: {planes:,} planes (shape {shape}) is over the limit of "
                         f"{MAX_PLANES:,} planes")
    return ImageInfo(shape, dtype, planes, h, w, c, plan.names), plan


def _file_layout(path: Path, plan: _Plan) -> tuple[int, int, int, int]:
    """layout() of a file's canonical shape; its channels are last whenever it has some."""
    shape = plan.shape
    chan = plan.channels_last and not (plan.alpha and plan.stored[-1] == 2)  # LA -> grey
    if not chan or len(shape) < 3:
        return layout(shape, str(path))
    if shape[-1] > MAX_CHANNELS:
        raise ImageError(f"{path}: {shape[-1]} channels (shape {plan.stored}); at most "
                         f"{MAX_CHANNELS} are supported")
    lead = [v for v in shape[:-3] if v != 1]
    if len(lead) > 1:
        raise ImageError(f"{path}: {len(shape)}-D image (shape {shape}) is not supported")
    return (lead[0] if lead else 1), shape[-3], shape[-2], shape[-1]


def stored_channels(path, shape) -> tuple[int | None, tuple[str, ...]]:
    """Where the channels of an image file are in an array of ``shape`` read from it as stored
    (napari's own reader, ``tifffile.imread``): ``(axis, names)``; ``(None, ())`` when the
    file has no channels, cannot be read, or ``shape`` is not its stored shape. The napari
    widget uses it to offer a CxYxX layer's channels (by their names in ImageJ / OME metadata)."""
    try:
        info, plan = _checked(Path(path))
    except (ImageError, OSError):
        return None, ()
    if info.channels < 2 or tuple(int(v) for v in shape) != tuple(plan.stored) or plan.alpha:
        return None, ()
    return (plan.perm[-1] if plan.perm else len(plan.stored) - 1), info.channel_names


def _check_total(path: Path, info: ImageInfo) -> None:
    total = info.planes * info.height * info.width * info.channels
    if total > MAX_SAMPLES:
        raise ImageError(f"{path}: {total:,} values (shape {info.shape}) is over the limit of "
                         f"{MAX_SAMPLES:,} values read at once (read one plane at a time)")


def read_raw(path, labels: bool = False) -> np.ndarray:
    """Read an image file as stored (no conversion). Raises ImageError naming the file.

    The header is checked first (:func:`image_info`): nothing over the limits is decoded."""
    path = Path(path)
    info, plan = _checked(path, labels)
    _check_total(path, info)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            array = iio.imread(path)
    except Exception as exc:  # every reader fails differently; report them the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: cannot read image ({reason})") from None
    array = plan.apply(np.asarray(array))
    if array.size == 0:
        raise ImageError(f"{path}: empty image (shape {array.shape})")
    return array


def read_plane(path, plane: int | None, labels: bool = False) -> np.ndarray:
    """One plane of an image file as stored (``plane=None``: a single-plane image), checked on
    the header first. A TIFF stack stored one page per plane reads only that page."""
    path = Path(path)
    info, plan = _checked(path, labels)
    if plane is None or info.planes == 1:
        if plane not in (None, 0):
            raise ImageError(f"{path}: plane {plane} given but the image is a single plane")
        return read_raw(path, labels)
    if not 0 <= plane < info.planes:
        raise ImageError(f"{path}: plane {plane} is out of range (0..{info.planes - 1})")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                if len(series.pages) == info.planes and plan.perm is None:
                    return _Plan(plan.stored[1:], plan.dtype, alpha=plan.alpha).apply(
                        np.asarray(series.pages[plane].asarray()))
        except Exception as exc:  # every reader fails differently; report them the same way
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ImageError(f"{path}: cannot read plane {plane} ({reason})") from None
    array = read_raw(path, labels)
    array = array.reshape(tuple(v for v in array.shape if v != 1)) if array.ndim > 3 else array
    return array[plane]


def _scale_one(data: np.ndarray, intensity: str, dtype: np.dtype, percentiles) -> np.ndarray:
    """One channel (float32, finite) -> [0, 1] by ``intensity`` (see the module docstring)."""
    if intensity == "raw":
        if dtype.kind in "ui":
            data = data / float(np.iinfo(dtype).max)
        return np.clip(data, 0.0, 1.0, out=data)
    lo, hi = np.percentile(data, percentiles)
    if hi <= lo:  # (nearly) constant but for a few pixels: fall back to the full range
        lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros_like(data)
    data = (data - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(data, 0.0, 1.0, out=data)


def normalise(array: np.ndarray, intensity: str = "percentile", percentiles=PERCENTILES) -> np.ndarray:
    """Scale intensities to float32 [0, 1], each channel (last axis of an HxWxC array) on its own:
    ``"percentile"`` (the default, every dtype) or ``"raw"`` (the dtype's range). NaN / inf -> 0."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.float32)
    data = array.astype(np.float32)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if data.ndim == 3:
        out = np.empty(data.shape, np.float32)
        for c in range(data.shape[-1]):
            out[..., c] = _scale_one(np.ascontiguousarray(data[..., c]), intensity, array.dtype, percentiles)
        return out
    return _scale_one(data, intensity, array.dtype, percentiles)


def channel_labels(channels: int, names=(), rgb: bool | None = None) -> list[tuple[int, str]]:
    """``[(number, label)]`` of the choices for a cell channel: ``(0, "all channels")`` then one
    per channel, numbered from 1 as ``--channel`` is (names from the file's metadata; an RGB
    image's are red / green / blue). The widget's picker and the CLI's messages use it."""
    rgb = channels in (3, 4) if rgb is None else rgb
    names = list(names or ())
    if not names and rgb:
        names = ["red", "green", "blue", "alpha"][:channels]
    out = [(0, "grey image" if channels == 1 else "all channels")]
    for k in range(channels):
        name = names[k] if k < len(names) and names[k] else f"channel {k + 1}"
        out.append((k + 1, f"{k + 1}: {name}"))
    return out


def _pick(array: np.ndarray, number: int, flag: str, name: str) -> np.ndarray:
    channels = 1 if array.ndim == 2 else array.shape[-1]
    if not 1 <= number <= channels:
        raise ImageError(f"{name}: {flag} {number} but the image has {channels} channel"
                         f"{'s' if channels > 1 else ''} (numbered from 1; 0 = all)")
    return array if array.ndim == 2 else array[..., number - 1]


def model_input(array, rule=None, name: str = "image") -> np.ndarray:
    """One plane (HxW or HxWxC, as stored) -> the model's float32 HxWx3 by ``rule`` (an
    ``options.ImageInput``; None = the defaults): channels, intensity, invert, then the three
    input channels (see the module docstring). ImageError naming the image otherwise."""
    from napari_cellseg.options import DEFAULT_INPUT

    rule = DEFAULT_INPUT if rule is None else rule
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if rule.channel:
        cell = normalise(_pick(array, rule.channel, "channel", name), rule.intensity)
        if rule.invert:
            cell = 1.0 - cell
        if rule.channel2:
            nuclear = normalise(_pick(array, rule.channel2, "channel2", name), rule.intensity)
            data = np.stack([cell, cell, nuclear], axis=-1)
        else:
            data = np.repeat(cell[..., None], 3, axis=2)
        return np.ascontiguousarray(data, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]  # RGBA as napari shows it: the alpha is not a channel to segment
    data = normalise(array, rule.intensity)
    if rule.invert:
        data = 1.0 - data
    if data.ndim == 3 and data.shape[-1] != 3:
        data = data.mean(axis=-1)
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=2)
    return np.ascontiguousarray(data, dtype=np.float32)


def to_rgb_float(array, plane: int | None = None, name: str = "image", rule=None) -> np.ndarray:
    """In-memory image (e.g. napari layer data) -> float32 HxWx3 by :func:`model_input`.

    ``plane`` picks one plane of a ZxHxW stack (or ZxHxWxC). ``name`` is used in errors;
    ``rule``: an ``options.ImageInput`` (None = the defaults).
    """
    array = np.asarray(array)
    if array.size == 0:
        raise ImageError(f"{name}: empty image (shape {array.shape})")
    if array.dtype.kind not in "buif":
        raise ImageError(f"{name}: unsupported pixel type {array.dtype}")
    if array.ndim > 3:  # the layout rule: singleton axes of hyperstacks do not count
        array = array.reshape(tuple(v for v in array.shape if v != 1) or array.shape)
    layout(array.shape, name)  # refuses what is not an image (1-D, 5-D, 4-D without channels)
    is_stack = array.ndim == 4 or (array.ndim == 3 and not _is_channel_axis(array.shape))
    if is_stack and array.shape[0] == 1:  # a stack of one plane is that plane (layout: 1 plane)
        array, is_stack = array[0], False
    if is_stack:
        if plane is None:
            raise ImageError(
                f"{name}: is a stack of {array.shape[0]} planes (shape {array.shape}); "
                f"choose one plane"
            )
        if not -array.shape[0] <= plane < array.shape[0]:
            raise ImageError(f"{name}: plane {plane} is out of range (0..{array.shape[0] - 1})")
        array = array[plane]
    elif plane not in (None, 0):
        raise ImageError(f"{name}: plane {plane} given but the image is a single plane")
    if min(array.shape[:2]) == 0:
        raise ImageError(f"{name}: empty image (shape {array.shape})")
    return model_input(array, rule, name)


def plane_id(stem: str, index: tuple[int, ...], lead_shape: tuple[int, ...]) -> str:
    """Image id of one plane of a stack: ``<stem>_<plane>`` per leading axis, zero-padded to at
    least 3 digits (``cells_007``; a T x Z stack gives ``cells_002_017``). The CLI and the napari
    export use this one rule, so their CSVs name the same plane the same way. A stack of one
    plane (1xHxW: one plane by :func:`layout`) is named ``<stem>``, as a single image is."""
    if all(n == 1 for n in lead_shape):
        return stem
    return stem + "".join(f"_{i:0{max(3, len(str(max(n - 1, 0))))}d}" for i, n in zip(index, lead_shape))


_PLANE_TAIL = re.compile(r"_\d+$")


def plane_id_bases(image_id: str) -> list[str]:
    """Candidate stack stems of a plane id, longest first (``a_002_017`` -> ``a_002``, ``a``)."""
    out, cur = [], image_id
    while _PLANE_TAIL.search(cur):
        cur = _PLANE_TAIL.sub("", cur)
        out.append(cur)
    return out


def load_image(path, plane: int | None = None, rule=None) -> np.ndarray:
    """Load an image file as float32 HxWx3 in [0, 1] by ``rule`` (an ``options.ImageInput``;
    None = the defaults); ImageError (naming the file) otherwise."""
    return to_rgb_float(read_raw(path), plane=plane, name=str(path), rule=rule)


def load_plane(path, plane: int | None, rule=None) -> np.ndarray:
    """:func:`load_image` of one plane, decoding only that plane where the file allows."""
    if plane is None:
        return load_image(path, rule=rule)
    return to_rgb_float(read_plane(path, plane), name=f"{path} [plane {plane}]", rule=rule)


def list_images(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image files among ``paths``: folders expanded (not recursive), sorted, image suffixes only."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(f for f in p.iterdir()
                         if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                         and not f.name.startswith("."))
        elif p.is_file():
            if p.suffix.lower() in IMAGE_SUFFIXES:
                found.append(p)
        else:
            raise ImageError(f"{p}: file or folder not found")
    return sorted(dict.fromkeys(found))
