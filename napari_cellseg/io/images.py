"""Any microscopy image -> float32 HxWx3 in [0, 1] for the model.

Accepted: PNG / TIFF / JPEG / BMP files or arrays, 8- or 16-bit (or other integer / float),
grey (HxW, HxWx1), grey+alpha (HxWx2, alpha dropped), RGB (HxWx3) or RGBA (HxWx4, alpha
dropped), and stacks (ZxHxW, ZxHxWxC) from which one plane is chosen. A last axis of 1 to 4 is
always channels, never planes (:func:`layout`, the one rule for files and arrays).

Limits are checked on the file header before any pixel is decoded (:func:`image_info`): at most
``rle.MAX_PIXELS`` (2^28) pixels per plane, :data:`MAX_PLANES` planes, :data:`MAX_CHANNELS`
channels, and :data:`MAX_SAMPLES` values when a whole file is decoded at once; TIFF (tiled / compressed too) via tifffile's
header, PNG / JPEG / BMP via Pillow's. 8-bit is scaled by 1/255; everything else gets percentile normalisation
(1st..99.8th percentile -> 0..1, clipped), except floats already inside [0, 1]. Anything else
(4-D data, empty images, unreadable files) raises :class:`ImageError` naming the file.
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
    "layout",
    "image_info",
    "ImageInfo",
    "MAX_PLANES",
    "MAX_CHANNELS",
    "MAX_SAMPLES",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
PERCENTILES = (1.0, 99.8)
MAX_PLANES = 65536  # planes in one stack file
MAX_CHANNELS = 4  # grey, grey+alpha, RGB, RGBA
MAX_SAMPLES = 2**30  # values decoded at once (a whole file): one RGBA plane at MAX_PIXELS


class ImageError(ValueError):
    """An image that cannot be used: ``NAME: problem``."""


@dataclass(frozen=True)
class ImageInfo:
    """What a file header says: ``shape`` of the array the reader will return, its ``dtype`` and
    the :func:`layout` of that shape (``planes``, ``height``, ``width``, ``channels``)."""

    shape: tuple[int, ...]
    dtype: str
    planes: int
    height: int
    width: int
    channels: int


def layout(shape, name: str = "image") -> tuple[int, int, int, int]:
    """``(planes, height, width, channels)`` of an image array shape: the one rule for files and
    in-memory data. HxW; HxWxC with C in 1..4 (grey, grey+alpha, RGB, RGBA); ZxHxW; ZxHxWxC."""
    shape = tuple(int(v) for v in shape)
    if len(shape) > 3:  # hyperstacks (T, Z, 1, Y, X ...): singleton axes do not count
        shape = tuple(v for v in shape if v != 1) or shape
    colour = len(shape) >= 3 and 1 <= shape[-1] <= MAX_CHANNELS
    if len(shape) == 2:
        return 1, shape[0], shape[1], 1
    if len(shape) == 3:
        return (1, *shape) if colour else (shape[0], shape[1], shape[2], 1)
    if len(shape) == 4 and colour:
        return shape
    if len(shape) < 2:
        raise ImageError(f"{name}: {len(shape)}-D data (shape {shape}) is not an image")
    raise ImageError(f"{name}: {len(shape)}-D image (shape {shape}) is not supported")


def _header(path: Path) -> tuple[tuple[int, ...], str, int]:
    """(shape, dtype, channels-from-header) without decoding pixels."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = tuple(series.shape), series.axes
            channels = 1
            for size, axis in zip(shape, axes):
                if axis in "SC":
                    channels *= int(size)
            return shape, str(series.dtype), channels
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        bands = len(im.getbands())
        frames = int(getattr(im, "n_frames", 1) or 1)
        w, h = im.size
    if im.mode == "P":
        bands = 4  # palette images are expanded to RGB(A) by the reader
    shape = (h, w) if bands == 1 else (h, w, bands)
    return ((frames, *shape) if frames > 1 else shape), im.mode, bands


def image_info(path) -> ImageInfo:
    """Read an image file's header (no pixel decoding) and check the size limits.

    Raises ImageError naming the file: unreadable header, over ``MAX_PIXELS`` pixels per plane,
    over MAX_PLANES planes or MAX_CHANNELS channels. (:func:`read_raw`, which decodes the whole
    file, also refuses over MAX_SAMPLES values; :func:`read_plane` of a paged TIFF does not.)"""
    from napari_cellseg.io import rle

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    try:
        shape, dtype, header_channels = _header(path)
    except Exception as exc:  # every reader fails differently; report them the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: cannot read image ({reason})") from None
    if header_channels > MAX_CHANNELS:
        raise ImageError(f"{path}: {header_channels} channels (shape {shape}); at most "
                         f"{MAX_CHANNELS} (grey, grey+alpha, RGB, RGBA) are supported")
    if any(v == 0 for v in shape):
        raise ImageError(f"{path}: empty image (shape {shape})")
    planes, h, w, c = layout(shape, str(path))
    try:
        rle.check_size(h, w)
    except ValueError as exc:
        raise ImageError(f"{path}: {exc}") from None
    if planes > MAX_PLANES:
        raise ImageError(f"{path}: {planes:,} planes (shape {shape}) is over the limit of "
                         f"{MAX_PLANES:,} planes")
    return ImageInfo(shape, dtype, planes, h, w, c)


def _check_total(path: Path, info: ImageInfo) -> None:
    total = info.planes * info.height * info.width * info.channels
    if total > MAX_SAMPLES:
        raise ImageError(f"{path}: {total:,} values (shape {info.shape}) is over the limit of "
                         f"{MAX_SAMPLES:,} values read at once (read one plane at a time)")


def read_raw(path) -> np.ndarray:
    """Read an image file as stored (no conversion). Raises ImageError naming the file.

    The header is checked first (:func:`image_info`): nothing over the limits is decoded."""
    path = Path(path)
    _check_total(path, image_info(path))
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
    array = np.asarray(array)
    if array.size == 0:
        raise ImageError(f"{path}: empty image (shape {array.shape})")
    return array


def read_plane(path, plane: int | None) -> np.ndarray:
    """One plane of an image file as stored (``plane=None``: a single-plane image), checked on
    the header first. A TIFF stack stored one page per plane reads only that page."""
    path = Path(path)
    info = image_info(path)
    if plane is None or info.planes == 1:
        if plane not in (None, 0):
            raise ImageError(f"{path}: plane {plane} given but the image is a single plane")
        return read_raw(path)
    if not 0 <= plane < info.planes:
        raise ImageError(f"{path}: plane {plane} is out of range (0..{info.planes - 1})")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                if len(series.pages) == info.planes:
                    return np.asarray(series.pages[plane].asarray())
        except Exception as exc:  # every reader fails differently; report them the same way
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ImageError(f"{path}: cannot read plane {plane} ({reason})") from None
    array = read_raw(path)
    array = array.reshape(tuple(v for v in array.shape if v != 1)) if array.ndim > 3 else array
    return array[plane]


def normalise(array: np.ndarray, percentiles=PERCENTILES) -> np.ndarray:
    """Scale intensities to float32 [0, 1] (see the module docstring for the rule)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == bool:
        return array.astype(np.float32)
    data = array.astype(np.float32)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if array.dtype.kind == "f" and data.min() >= 0.0 and data.max() <= 1.0:
        return data
    lo, hi = np.percentile(data, percentiles)
    if hi <= lo:  # (nearly) constant image: fall back to the full range
        lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros_like(data)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0)


def to_rgb_float(array, plane: int | None = None, name: str = "image") -> np.ndarray:
    """In-memory image (e.g. napari layer data) -> float32 HxWx3 in [0, 1].

    ``plane`` picks one plane of a ZxHxW stack (or ZxHxWxC). ``name`` is used in errors.
    """
    array = np.asarray(array)
    if array.size == 0:
        raise ImageError(f"{name}: empty image (shape {array.shape})")
    if array.dtype.kind not in "buif":
        raise ImageError(f"{name}: unsupported pixel type {array.dtype}")
    if array.ndim > 3:  # the layout rule: singleton axes of hyperstacks do not count
        array = array.reshape(tuple(v for v in array.shape if v != 1) or array.shape)
    layout(array.shape, name)  # refuses what is not an image (1-D, 5-D, 4-D without channels)
    is_stack = array.ndim == 4 or (array.ndim == 3 and not 1 <= array.shape[-1] <= MAX_CHANNELS)
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
    if array.ndim == 3:  # channels: RGB(A) keeps RGB; grey(+alpha) keeps grey
        array = array[..., :3] if array.shape[-1] >= 3 else array[..., 0]
    if min(array.shape[:2]) == 0:
        raise ImageError(f"{name}: empty image (shape {array.shape})")
    data = normalise(array)
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=2)
    return np.ascontiguousarray(data, dtype=np.float32)


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


def load_image(path, plane: int | None = None) -> np.ndarray:
    """Load an image file as float32 HxWx3 in [0, 1]; ImageError (naming the file) otherwise."""
    return to_rgb_float(read_raw(path), plane=plane, name=str(path))


def load_plane(path, plane: int | None) -> np.ndarray:
    """:func:`load_image` of one plane, decoding only that plane where the file allows."""
    if plane is None:
        return load_image(path)
    return to_rgb_float(read_plane(path, plane), name=f"{path} [plane {plane}]")


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
