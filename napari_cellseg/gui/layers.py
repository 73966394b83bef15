"""Non-Qt logic behind the widget, reader and writer: image ids, planes, export, CSV -> layers.

Everything takes napari layer objects (or plain arrays) and returns plain data, so tests can call
it without a window. No numerics live in the Qt callbacks; they live here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_cellseg.io.images import plane_id, plane_id_bases

META_KEY = "napari_cellseg"  # key in Labels.metadata marking a result layer
CSV_FORMATS = {
    "kaggle": "Kaggle submission (id, predicted)",
    "starter": "Starter notebook (idx, id, annotation)",
    "train": "Training CSV (id, annotation, width, height)",
}


class InputError(ValueError):
    """Bad input from the user (no image, wrong dimensions, nothing to export...)."""


@dataclass
class Result:
    """What a result layer remembers (stored in ``layer.metadata[META_KEY]``).

    ``plane``/``detections``: the plane segmented last (``()`` for a 2D image) and its network
    output; ``planes``: every segmented plane of a stack -> its Detections (the sliders redraw all
    of them, so the whole stack follows one pair of thresholds); ``kept``: the hand-edited cells
    a user chose to keep when segmenting again (drawn over the model's, see :func:`merge_kept`).
    """

    image_id: str
    image_layer: str
    plane: tuple[int, ...] = ()
    detections: Any = None  # predict.Detections (kept so sliders never re-run the network)
    thresholds: Any = None  # options.Thresholds the layer was drawn with
    checkpoint: str = ""
    edited: bool = False
    planes: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # plane -> labels of hand-edited cells kept over a re-run

    def segmented(self) -> dict:
        """``{plane prefix: Detections}`` of every plane that has model output."""
        if self.planes:
            return self.planes
        return {self.plane: self.detections} if self.detections is not None else {}


def result_of(layer) -> Result | None:
    meta = getattr(layer, "metadata", None) or {}
    r = meta.get(META_KEY)
    return r if isinstance(r, Result) else None


def draw_labels(detections, thresholds, kept=None) -> np.ndarray:
    """Labels from kept Detections with the widget's ``options.Thresholds`` (validated once,
    where the sliders are read), with the hand-kept cells ``kept`` (labels) on top."""
    return merge_kept(kept, detections.to_labels(thresholds))


def label_dtype(max_id: int) -> np.dtype:
    """The dtype of a result layer whose ids reach ``max_id``: uint16 while they fit, because
    napari draws 8/16-bit labels as they are but hashes every pixel of wider ones on the CPU
    first (without numba about 300 ms per slider move at 3000x3000); int32 beyond."""
    return np.dtype(np.uint16) if int(max_id) < np.iinfo(np.uint16).max else np.dtype(np.int32)


def merge_kept(kept, labels: np.ndarray) -> np.ndarray:
    """``kept`` cells (hand-edited, their own ids) over the model's ``labels``: a model cell at
    least half covered by kept cells is dropped (it is the same cell), the rest fill the
    background with ids above the kept ones."""
    if kept is None or not kept.any():
        return labels
    n = int(labels.max())
    inside = kept > 0
    covered = np.bincount(labels[inside], minlength=n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    drop = 2 * covered >= np.maximum(area, 1)
    drop[0] = True
    lut = np.zeros(n + 1, np.int32)
    lut[~drop] = np.arange(1, int((~drop).sum()) + 1, dtype=np.int32) + int(kept.max())
    return np.where(inside, kept, lut[labels]).astype(np.int32)


def hand_cells(current: np.ndarray, drawn: np.ndarray, kept=None) -> np.ndarray:
    """The hand-edited cells of ``current`` (labels as the user left them) against ``drawn``
    (what the model and earlier kept cells gave): every cell with a pixel that differs, plus the
    earlier ``kept`` cells still there. Other pixels are 0."""
    current = np.asarray(current)
    ids = np.unique(current[current != drawn])
    if kept is not None:
        ids = np.union1d(ids, np.intersect1d(np.unique(kept), np.unique(current)))
    ids = ids[ids > 0]
    return np.where(np.isin(current, ids), current, 0).astype(np.int32)


def image_id_for_layer(layer) -> str:
    """The file stem of the layer's source, else the layer name."""
    src = getattr(getattr(layer, "source", None), "path", None)
    if src:
        return Path(str(src)).stem
    return str(layer.name)


def spatial_shape(layer) -> tuple[int, ...]:
    """Shape without the RGB channel axis."""
    shape = tuple(int(s) for s in layer.data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def stack_planes(layer) -> dict[tuple[int, ...], Any]:
    """Every 2D plane of a layer, ``{prefix: lazy plane}`` in order (``{(): data}`` for 2D)."""
    shape = spatial_shape(layer)
    if getattr(layer, "multiscale", False):
        raise InputError(f"layer {layer.name!r} is multiscale; open a single-resolution image")
    if len(shape) < 2:
        raise InputError(f"layer {layer.name!r} has {len(shape)} dimension(s); need a 2D image")
    return {prefix: layer.data[prefix] for prefix in np.ndindex(*shape[:-2])}


def image_plane(layer, current_step=None, ndisplay: int = 2) -> tuple[np.ndarray, tuple[int, ...]]:
    """The 2D (grey or RGB) array to segment and the plane index prefix (``()`` for a 2D image).

    A stack (3D/4D) needs a chosen plane: the viewer's current step, shown in 2D view.
    """
    if getattr(layer, "multiscale", False):
        raise InputError(f"layer {layer.name!r} is multiscale; open a single-resolution image")
    shape = spatial_shape(layer)
    if len(shape) < 2:
        raise InputError(f"layer {layer.name!r} has {len(shape)} dimension(s); need a 2D image")
    if len(shape) == 2:
        return np.asarray(layer.data), ()
    if ndisplay != 2 or current_step is None:
        raise InputError(
            f"layer {layer.name!r} is a {len(shape)}D stack: switch the viewer to 2D view and "
            "move the slider to the plane to segment")
    lead = len(shape) - 2
    step = tuple(int(s) for s in current_step)
    # napari aligns layers to the right: the layer's leading axes are the viewer's last-but-2 axes
    start = len(step) - len(shape)
    if start < 0:
        raise InputError(f"layer {layer.name!r}: no plane chosen (viewer has fewer axes than the layer)")
    prefix = tuple(min(max(step[start + i], 0), shape[i] - 1) for i in range(lead))
    return np.asarray(layer.data[prefix]), prefix


def result_layer_name(image_layer_name: str) -> str:
    return f"{image_layer_name} cells"


def labels_items(layer) -> dict[str, np.ndarray]:
    """``{image id: 2D labels}`` for one Labels layer: every plane of a stack, empty planes too
    (written as the format's 'no cell' row), so a re-export replaces the rows of planes whose
    cells were all deleted and the reader gets the plane count back from the ids."""
    r = result_of(layer)
    meta = getattr(layer, "metadata", None) or {}
    base = r.image_id if r else meta.get("image_id") or _strip_cells(str(layer.name))
    data = np.asarray(layer.data)
    if data.ndim == 2:
        return {base: data}
    if data.ndim < 2:
        raise InputError(f"layer {layer.name!r} is not a 2D label image")
    return {plane_id(base, prefix, data.shape[:-2]): data[prefix]
            for prefix in np.ndindex(*data.shape[:-2])}


def _strip_cells(name: str) -> str:
    return name[: -len(" cells")] if name.endswith(" cells") else name


def export_items(layers, only=None) -> dict[str, np.ndarray]:
    """Collect ``{image id: labels}`` from result layers (``only``: one layer, else every one)."""
    chosen = [only] if only is not None else [lyr for lyr in layers if result_of(lyr) is not None]
    if not chosen or any(lyr is None for lyr in chosen):
        raise InputError("nothing segmented yet: press Segment first (nothing was written)")
    items: dict[str, np.ndarray] = {}
    for lyr in chosen:
        for key, lab in labels_items(lyr).items():
            if key in items:
                raise InputError(f"two layers export the same image id {key!r}; rename one")
            items[key] = lab
    if not items:
        raise InputError("the segmented layers hold no planes (nothing was written)")
    return items


def export_csv(path, items: dict[str, np.ndarray], fmt: str = "kaggle") -> int:
    """Write/merge ``items`` into ``path`` (atomic; other ids' rows kept). Returns cells written."""
    from napari_cellseg.io.annotations import write_annotations

    if fmt not in CSV_FORMATS:
        raise InputError(f"unknown CSV format {fmt!r}; choose one of {', '.join(CSV_FORMATS)}")
    write_annotations(path, {k: np.asarray(v) for k, v in items.items()}, format=fmt,
                      merge=Path(path).exists())
    return int(sum(len(np.unique(v[v > 0])) for v in items.values()))


def shape_from_layers(image_id: str, layers) -> tuple[int, int] | None:
    """(H, W) of an open image whose id is ``image_id`` (or ``ID_007`` for a stack plane)."""
    bases = plane_id_bases(image_id)
    for lyr in layers or ():
        if type(lyr).__name__ not in ("Image", "Labels") or result_of(lyr) is not None:
            continue
        ids = {image_id_for_layer(lyr), str(lyr.name)}
        shape = spatial_shape(lyr)
        if image_id in ids and len(shape) >= 2:
            return shape[-2:]
        if len(shape) > 2 and ids.intersection(bases):
            return shape[-2:]
    return None


def csv_to_layer_data(path, layers=()) -> list[tuple]:
    """Read an annotation/submission CSV into napari LayerData tuples, one per image id, and
    one stack-shaped layer per stack whose planes are ``<stem>_000``, ``<stem>_001``...

    The size comes from width/height columns, else from an open image with that id; ids with
    no known size raise ``InputError`` naming them (nothing is added).
    """
    from napari_cellseg.io.annotations import NO_ROWS, read_annotations

    ann = read_annotations(path)
    if not ann.ids:
        raise InputError(f"{path} {NO_ROWS}: no masks to show")
    shapes, unknown = {}, []
    for image_id in ann.ids:
        shape = ann.shape(image_id) or shape_from_layers(image_id, layers)
        if shape is None:
            unknown.append(image_id)
        shapes[image_id] = shape
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise InputError(
            f"{path}: image size unknown for {listed}: the CSV has no width/height columns; "
            "open the image(s) with that name first, then open the CSV again")
    stacks = stack_groups(ann.ids, layers, shapes)
    owner = {pid: base for base, (_, planes) in stacks.items() for pid in planes}
    out, done = [], set()
    for image_id in ann.ids:
        base = owner.get(image_id)
        if base is None:
            labels = ann.labels(image_id, shape=tuple(shapes[image_id]))
            out.append((labels, {"name": result_layer_name(image_id),
                                 "metadata": {"image_id": image_id, "source_csv": str(path)}}, "labels"))
            continue
        if base in done:
            continue
        done.add(base)
        lead_shape, planes = stacks[base]
        hw = tuple(shapes[image_id])
        data = np.zeros(tuple(lead_shape) + hw, np.int32)
        for pid, index in planes.items():  # stack_groups checked they share one size
            data[index] = ann.labels(pid, shape=hw)
        out.append((data, {"name": result_layer_name(base),
                           "metadata": {"image_id": base, "source_csv": str(path)}}, "labels"))
    return out


_PLANE_GROUP = re.compile(r"_(\d{3,})$")


def _split_plane_id(image_id: str) -> tuple[str, tuple[int, ...]]:
    """``cells_002_017`` -> ("cells", (2, 17)); an id without plane tails -> (id, ())."""
    base, index = image_id, []
    while (m := _PLANE_GROUP.search(base)) and len(index) < 3:
        index.insert(0, int(m.group(1)))
        base = base[: m.start()]
    return base, tuple(index)


MAX_STACK_PIXELS = 2**28  # a CSV opens as one stack layer only up to this many pixels in all


def stack_groups(ids, layers=(), shapes=None
                 ) -> dict[str, tuple[tuple[int, ...], dict[str, tuple[int, ...]]]]:
    """Plane ids of one stack (``<stem>_000``, ``<stem>_001``... as ``images.plane_id`` writes
    them) -> ``{stem: (lead shape, {plane id: index})}``.

    A stem forms a stack when it has two or more plane ids, or when an open image of that name
    is a stack with as many leading axes; the lead shape is the open image's, else the largest
    index + 1 (an export writes every plane, empty ones as a 'no cell' row). Ids that only look
    like planes stay separate images: planes of different sizes (``shapes``: id -> (H, W)),
    numbers too sparse to be one stack (fewer ids than half the planes, with no open stack of
    that shape), over ``images.MAX_PLANES`` planes or over ``MAX_STACK_PIXELS`` pixels in all."""
    from napari_cellseg.io.images import MAX_PLANES

    groups: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
    for image_id in ids:
        base, index = _split_plane_id(image_id)
        if index and plane_id_bases(image_id)[len(index) - 1] == base:
            groups.setdefault((base, len(index)), {})[image_id] = index
    open_shapes = {}
    for lyr in layers or ():
        if type(lyr).__name__ == "Image":
            shape = spatial_shape(lyr)
            for key in {image_id_for_layer(lyr), str(lyr.name)}:
                open_shapes[key] = shape[:-2]
    out = {}
    for (base, depth), planes in groups.items():
        if base in out:  # two depths for one stem: keep them apart (not a stack)
            continue
        lead = open_shapes.get(base)
        from_image = lead is not None and len(lead) == depth and not any(
            any(i >= n for i, n in zip(idx, lead)) for idx in planes.values())
        if not from_image:
            if len(planes) < 2:
                continue
            lead = tuple(max(idx[d] for idx in planes.values()) + 1 for d in range(depth))
        n_planes = int(np.prod(lead))
        sizes = {tuple(shapes[p]) for p in planes if shapes.get(p) is not None} if shapes else set()
        if len(sizes) > 1 or n_planes > MAX_PLANES:
            continue
        if not from_image and 2 * len(planes) < n_planes:
            continue
        if sizes and n_planes * int(np.prod(next(iter(sizes)))) > MAX_STACK_PIXELS:
            continue
        out[base] = (tuple(int(n) for n in lead), planes)
    return out
