"""Image and label files the commands share: files keyed by image id, label images read on
access, image sizes, label TIFF writing. Used by ``cellseg`` (cli.py), ``cellseg predict``
(batch.py) and ``cellseg tune`` (tune_cmd.py); torch-free."""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["read_label_image", "image_shape", "files_by_id", "LabelFiles", "label_source",
           "write_label_tiff", "write_tiff", "display_path", "non_utf8_name", "plane_of", "resolve_ids",
           "IdConflict", "label_tiff_path", "check_not_inputs", "check_label_not_image",
           "integer_labels", "refuse_existing_files", "intensity_like"]


def display_path(path) -> str:
    """A path for messages: bytes that are not UTF-8 shown as \\xNN escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def non_utf8_name(path: Path) -> str | None:
    """The message for a file whose name is not valid UTF-8 (it cannot be an id in a CSV), else
    None. The one rule for ``cellseg predict`` (batch.expand_items) and the file commands."""
    try:
        path.stem.encode("utf-8")
    except UnicodeEncodeError:
        return f"{display_path(path)}: file name is not valid UTF-8 (cannot be an id in a CSV); rename it"
    return None


def read_label_image(path: Path, plane: int | None = None):
    """Read a label image file (``plane``: one plane of a label stack): a 2-D integer array, else
    ImageError. One plane of one channel by images.layout (HxWx1, a 1xHxW stack) is that HxW plane."""
    from napari_cellseg.io.images import ImageError, layout, read_plane

    labels = read_plane(path, plane, labels=True)  # ids have no channel axis: planes as stored
    where = str(path) if plane is None else f"{path} [plane {plane}]"
    planes, h, w, channels = layout(labels.shape, where)
    if planes == 1 and channels == 1:
        labels = labels.reshape(h, w)
    if labels.ndim != 2 or labels.dtype.kind not in "iubf":
        raise ImageError(f"{where}: not a 2-D integer label image "
                         f"(shape {labels.shape}, dtype {labels.dtype})")
    return integer_labels(labels, where)


def integer_labels(labels, where: str):
    """Instance ids as an integer array: integer / bool arrays as they are; a float array (ImageJ /
    Fiji save 32-bit label images) when every value is a whole number in int64's range (as
    int64); negative ids or anything else is an ImageError naming ``where``. The one rule for
    label images (cellseg to-csv / evaluate / tune and cellseg-train)."""
    import numpy as np

    from napari_cellseg.io.images import ImageError

    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        with np.errstate(invalid="ignore"):  # NaN / inf: not ids
            bad = ~np.isfinite(labels) | (np.mod(labels, 1) != 0) | (np.abs(labels) >= 2.0**62)
        if bad.any():
            value = float(labels.ravel()[np.flatnonzero(bad.ravel())[0]])
            raise ImageError(f"{where}: label image has non-integer values (e.g. {value!r}): instance ids "
                             f"must be whole numbers")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iub":
        raise ImageError(f"{where}: label image has {labels.dtype} values, not instance ids")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ImageError(f"{where}: label image has negative ids (e.g. {int(labels.min())}): instance ids "
                         f"are 0 (background) or positive")
    return labels


def image_shape(path: Path) -> tuple[int, int]:
    """``(height, width)`` of a single-image file from its header only (no pixels decoded), by
    images.py's one layout rule (HxW, HxWxC with C in 1..4); a stack is an ImageError."""
    from napari_cellseg.io.images import ImageError, image_info

    info = image_info(path)
    if info.planes != 1:
        raise ImageError(f"{path}: cannot take an image size from a stack of {info.planes} planes")
    return info.height, info.width


def plane_of(image_id: str, files: Mapping[str, Path]):
    """``(path, plane, header)`` when ``image_id`` names one plane of a stack among ``files``
    (id -> file, from :func:`files_by_id`) exactly as ``cellseg predict`` and the napari export name
    planes (images.plane_id: ``stack_000`` .. for stack.tif), else None. Headers only; a bad
    header is an images.ImageError naming the file. The one rule for commands that take
    ground truth by id and the images from a folder (``cellseg tune``, ``cellseg-train --train-csv``)."""
    from napari_cellseg.io.images import image_info, plane_id, plane_id_bases

    bases = plane_id_bases(image_id)
    if not bases or bases[0] not in files:
        return None
    path = files[bases[0]]
    info = image_info(path)
    tail = image_id[len(bases[0]) + 1:]
    k = int(tail) if tail.isdecimal() else -1
    if 0 <= k < info.planes and plane_id(bases[0], (k,), (info.planes,)) == image_id:
        return path, k, info
    return None


class IdConflict(ValueError):
    """An image id that names both a file and a plane of a stack (:func:`resolve_ids`);
    ``image_id`` is the id, the message one line naming both."""

    def __init__(self, image_id: str, direct: Path, stack: Path, plane: int):
        super().__init__(f"image id {image_id!r} names both {direct} and plane {plane} of {stack}; rename one")
        self.image_id = image_id


def resolve_ids(ids, files: Mapping[str, Path]) -> tuple[dict, list[str]]:
    """The one rule for ground-truth / CSV ids against image files (``cellseg tune``,
    ``cellseg-train --train-csv``): ``(found, missing)``, ``found`` maps each id, in the order
    given, to ``(path, None, None)`` when it is a file's id (``files``: id -> file, from
    :func:`files_by_id`), or ``(path, plane, header)`` when it names one plane of a stack
    (:func:`plane_of`: ``stack_000`` = plane 0 of stack.tif); ``missing`` lists the ids with
    neither. An id that is both is an :class:`IdConflict` (a ValueError). Headers of stacks only
    (images.ImageError naming the file); whether a file's id names a whole stack is the caller's."""
    found, missing = {}, []
    for image_id in ids:
        image_id = str(image_id)
        direct, plane = files.get(image_id), plane_of(image_id, files)
        if direct is not None and plane is not None:
            raise IdConflict(image_id, direct, plane[0], plane[1])
        if plane is not None:
            found[image_id] = plane
        elif direct is not None:
            found[image_id] = (direct, None, None)
        else:
            missing.append(image_id)
    return found, missing


def files_by_id(paths, what: str, skipped: list | None = None, warn=None) -> dict[str, Path]:
    """Image files (folders expanded) keyed by image id = file stem normalised like the CSV
    readers and ``cellseg predict`` do (annotations.normalize_id). A file whose name is not valid
    UTF-8 is reported in one line (``warn("skipped: ...")`` when given, else on stderr as
    ``cellseg: skipped: ...``) and skipped (its display path appended to ``skipped``); an empty
    or duplicate id is a ValueError. Only names are looked at here."""
    from napari_cellseg.io.annotations import normalize_id
    from napari_cellseg.io.images import list_images

    found: dict[str, Path] = {}
    for path in list_images(paths):
        problem = non_utf8_name(path)
        if problem:
            if warn is not None:
                warn(f"skipped: {problem}")
            else:
                print(f"cellseg: skipped: {problem}", file=sys.stderr)
            if skipped is not None:
                skipped.append(display_path(path))
            continue
        image_id = normalize_id(path.stem)
        if not image_id:
            raise ValueError(f"{path}: the file name gives an empty image id")
        if image_id in found:
            raise ValueError(f"{path}: image id {image_id!r} also given by {found[image_id]}")
        found[image_id] = path
    if not found:
        raise ValueError(f"no {what} found in {', '.join(map(str, paths))}")
    return found


RAW_CHANGE = 0.5  # ids change between this share of neighbouring cell pixels or more: intensities


def intensity_like(labels) -> float | None:
    """The share of horizontally neighbouring non-zero pixels whose ids differ, when it is at least
    :data:`RAW_CHANGE` (a raw image read as labels: every grey value a "cell"), else None. In a
    label image ids change only where two cells touch (measured: 0.3 % on the bundled samples
    and tests/data); in a raw microscopy image neighbours differ almost everywhere (94-99 %, 8 and
    16 bit)."""
    import numpy as np

    a = np.asarray(labels)
    left, right = a[:, :-1], a[:, 1:]
    both = (left != 0) & (right != 0)
    n = int(np.count_nonzero(both))
    if n < 1000:
        return None
    share = float(np.count_nonzero((left != right) & both)) / n
    return share if share >= RAW_CHANGE else None


class LabelFiles(Mapping):
    """Label-image files as a read-on-access mapping id -> labels (memory stays bounded).

    ``files``: id -> file (:func:`files_by_id`). A label stack gives one id per plane, named as
    ``cellseg predict`` names the planes of an image stack (images.plane_id: ``nuc_000`` ..
    for nuc.tif), so a stack's ground truth meets predict's rows; the headers are read here and
    an id given twice is a ValueError. A file whose header cannot be read stays one id (its stem)
    and its ImageError (naming the file) is raised only when that id is read, as ``cellseg
    predict`` does (batch._n_planes): an unreadable extra file in ``--pred`` is not scored."""

    def __init__(self, files: dict[str, Path], bar=None):
        from napari_cellseg.io.images import ImageError, image_info, plane_id

        self.bar = bar
        self.intensity_like: dict[str, float] = {}  # ids read so far that look like raw images
        self.files: dict[str, tuple[Path, int | None, tuple[int, int] | None]] = {}
        for image_id, path in files.items():
            try:
                info = image_info(path, labels=True)
            except (ImageError, OSError):
                info = None  # raised again when this id is read (shape / labels)
            n = info.planes if info is not None else 1
            for plane in range(n) if n > 1 else [None]:
                key = image_id if plane is None else plane_id(image_id, (plane,), (n,))
                if key in self.files:
                    raise ValueError(f"{self._where(path, plane)}: image id {key!r} also given by "
                                     f"{self._where(*self.files[key][:2])}")
                self.files[key] = (path, plane, None if info is None else (info.height, info.width))

    @staticmethod
    def _where(path, plane) -> str:
        return str(path) if plane is None else f"{path} [plane {plane}]"

    def __getitem__(self, image_id):
        labels = read_label_image(*self.files[image_id][:2])
        share = intensity_like(labels)
        if share is not None:
            self.intensity_like[image_id] = share
        if self.bar is not None:
            self.bar.update(1)
        return labels

    def __iter__(self):
        return iter(self.files)

    def __len__(self):
        return len(self.files)

    def shape(self, image_id):
        path, _, shape = self.files[image_id]
        if shape is None:  # the header could not be read: its error, naming the file
            image_shape(path)
        return shape

    def labels(self, image_id, shape=None):
        path, plane, _ = self.files[image_id]
        labels = read_label_image(path, plane)
        if shape is not None and labels.shape != tuple(shape):
            raise ValueError(f"{self._where(path, plane)}: size {labels.shape[0]}x{labels.shape[1]} "
                             f"(HxW) differs from the ground truth {shape[0]}x{shape[1]}")
        return labels

    @property
    def ids(self):
        return list(self.files)


def label_source(path_text: str):
    """A CSV (Annotations) or a folder / file of label images (LabelFiles)."""
    from napari_cellseg.io.annotations import read_annotations

    path = Path(path_text)
    if path.suffix.lower() == ".csv":
        return read_annotations(path)
    return LabelFiles(files_by_id([path], "label images"))


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def label_tiff_path(folder, image_id: str) -> Path:
    """Where a command writes the label TIFF of ``image_id``: ``<folder>/<id>.tif`` (the one rule
    for ``cellseg predict --labels-dir`` and ``cellseg to-labels --out``). An id whose file name
    would be over :data:`NAME_MAX` bytes is a ValueError, so a command that computes every
    target first refuses before writing any file."""
    name = f"{image_id}.tif"
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise ValueError(f"image id {display_path(image_id)[:40]!r}... ({len(image_id)} characters) is too "
                         f"long for a file name (at most {NAME_MAX} bytes with .tif); shorten the id")
    return Path(folder) / name


def check_not_inputs(targets, inputs, what: str, other: str = "folder") -> None:
    """ValueError (one line) when an output file in ``targets`` is one of the ``inputs`` (the same
    file, links included): an output folder that is the image folder would replace an image
    ``<id>.tif`` with its labels, an ``--out`` typed as an input would replace it with a CSV.
    ``what`` names the output (``--labels-dir DIR``), ``other`` what to choose instead. Stats
    nothing without inputs, each target's folder once (no target of a missing folder), and the
    inputs only when a target exists."""
    import os

    inputs = list(inputs)
    if not inputs:
        return
    existing, folders = [], {}
    for target in targets:
        folder = os.path.dirname(os.fspath(target)) or "."
        if folder not in folders:
            folders[folder] = os.path.isdir(folder)
        if not folders[folder]:
            continue
        try:
            existing.append((target, os.stat(target)))
        except OSError:
            continue
    if not existing:
        return
    keys = {}
    for source in inputs:
        try:
            st = os.stat(source)
        except OSError:
            continue
        keys[(st.st_dev, st.st_ino)] = source
    for target, st in existing:
        source = keys.get((st.st_dev, st.st_ino))
        if source is not None:
            raise ValueError(f"{what}: writing {display_path(target)} would overwrite the input "
                             f"{display_path(source)}; choose another {other}")


def refuse_existing_files(targets, what: str, how: str) -> None:
    """ValueError (one line) when a file in ``targets`` exists: label images may be ground truth
    or hand corrections, and an image folder given as an output folder holds the raw images, so an
    output never replaces them unless asked (``how``, e.g. "--overwrite to replace them")."""
    import os

    existing = [t for t in targets if os.path.lexists(t)]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ValueError(f"{what}: {display_path(existing[0])}{more} already exist(s); nothing written; "
                         f"pass {how}, or choose another folder")


def check_label_not_image(label: Path, image: Path, image_id: str) -> None:
    """ValueError (one line) when the label image of ``image_id`` is the image file itself: the
    label folder given is the image folder (``--label-dir`` = ``--image-dir``, ``tune --gt`` =
    ``--images``), so every image would be scored or trained as its own instance labels."""
    import os

    try:
        same = os.path.samefile(label, image)
    except OSError:
        return
    if same:
        raise ValueError(f"{display_path(label)}: the label image of {image_id!r} is the image file itself "
                         f"(the label folder is the image folder?); give the folder of the label images")


def write_tiff(path: Path, array) -> None:
    """Any array as a zlib-compressed TIFF, written atomically (the one TIFF writer)."""
    import tifffile

    from napari_cellseg.io.atomic import atomic_write

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression="zlib")
    with atomic_write(path, "wb") as fh:
        fh.write(buffer.getvalue())


def write_label_tiff(path: Path, labels) -> None:
    """A label image as a zlib TIFF (uint16, or int32 above 65535 cells), written atomically."""
    import numpy as np

    if labels.max(initial=0) <= np.iinfo(np.uint16).max:
        labels = labels.astype(np.uint16)
    write_tiff(path, labels)
