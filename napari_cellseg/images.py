"""Any microscopy image -> float32 HxWx3 in [0, 1] for the model.

Accepted: PNG / TIFF / JPEG / BMP files or arrays, 8- or 16-bit (or other integer / float),
grey (HxW, HxWx1), RGB (HxWx3) or RGBA (HxWx4, alpha dropped), and stacks (ZxHxW) from which
one plane is chosen. 8-bit is scaled by 1/255; everything else gets percentile normalisation
(1st..99.8th percentile -> 0..1, clipped), except floats already inside [0, 1]. Anything else
(4-D data, empty images, unreadable files) raises :class:`ImageError` naming the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = [
    "ImageError",
    "IMAGE_SUFFIXES",
    "load_image",
    "to_rgb_float",
    "read_raw",
    "list_images",
    "normalise",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
PERCENTILES = (1.0, 99.8)


class ImageError(ValueError):
    """An image that cannot be used: ``NAME: problem``."""


def read_raw(path) -> np.ndarray:
    """Read an image file as stored (no conversion). Raises ImageError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
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
    is_color = array.ndim >= 3 and array.shape[-1] in (1, 3, 4)
    is_stack = array.ndim == 4 or (array.ndim == 3 and not is_color)
    if is_stack:
        if array.ndim == 4 and array.shape[-1] not in (1, 3, 4):
            raise ImageError(f"{name}: 4-D image (shape {array.shape}) is not supported")
        if plane is None:
            raise ImageError(
                f"{name}: is a stack of {array.shape[0]} planes (shape {array.shape}); "
                f"choose one plane"
            )
        if not -array.shape[0] <= plane < array.shape[0]:
            raise ImageError(f"{name}: plane {plane} is out of range (0..{array.shape[0] - 1})")
        array = array[plane]
    elif array.ndim > 3:
        raise ImageError(f"{name}: {array.ndim}-D image (shape {array.shape}) is not supported")
    elif array.ndim < 2:
        raise ImageError(f"{name}: {array.ndim}-D data (shape {array.shape}) is not an image")
    elif plane not in (None, 0):
        raise ImageError(f"{name}: plane {plane} given but the image is a single plane")
    if array.ndim == 3:
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
    export use this one rule, so their CSVs name the same plane the same way."""
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
