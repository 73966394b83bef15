"""Options as data: ``Thresholds`` (how raw detections become labels), ``ImageInput`` (which
channels of an image the model sees and how their intensities are scaled) and ``PredictOptions``
(everything a prediction run needs besides the images), and the range rules they are held to.

The home of the threshold defaults and of each range rule on prediction options: a scale
(:func:`valid_scale`), a diameter (:func:`valid_diameter`), a value in [0, 1]
(:func:`unit_value`), the precision names (:data:`PRECISIONS`), the tile size and overlap
(:func:`tile_settings`, with their defaults). The CLI (``cellseg predict`` / ``tune``), both
napari widgets and training validation build these objects; the modules that take a number
from elsewhere (``sizing`` for a typed diameter, ``runner`` for a precision, the pipeline for a
tile size) call these same functions, so no rule is written twice. Stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping


class OptionError(ValueError):
    """An option out of range; the message names the field (or flag) and the value."""


SCALE_RANGE = (0.05, 20.0)  # any explicit scale / diameter-derived factor (sizing.py uses it too)
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # inference autocast; "auto": model.devices says per device
TILE_SIZE = 1024  # network px: larger images run in overlapping tiles (0 = never tile)
TILE_OVERLAP = 128  # network px; >= the largest expected object
MIN_TILE = 64


def _finite(value) -> float | None:
    """``value`` as a finite float (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def valid_scale(value) -> float | None:
    """``value`` as a finite float within SCALE_RANGE, else None: the scale rule
    (PredictOptions.scale here, sizing.check_scale and scale_for_diameter)."""
    v = _finite(value)
    return v if v is not None and SCALE_RANGE[0] <= v <= SCALE_RANGE[1] else None


def valid_diameter(value) -> float | None:
    """``value`` as a finite number of pixels > 0, else None: the diameter rule (PredictOptions,
    sizing.scale_for_diameter, the CLI's --diameter)."""
    v = _finite(value)
    return v if v is not None and v > 0 else None


def unit_value(value) -> float | None:
    """``value`` as a finite float in [0, 1], else None (thresholds, ModelConfig's score / IoU fields)."""
    v = _finite(value)
    return v if v is not None and 0.0 <= v <= 1.0 else None


def check_precision(value, error: type[ValueError] = OptionError) -> str:
    """``value`` if it is one of PRECISIONS, else ``error`` naming them."""
    if value not in PRECISIONS:
        raise error(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def tile_settings(tile_size=None, tile_overlap=None) -> tuple[int, int]:
    """The tiling rule: ``(tile_size, tile_overlap)`` in network px, None = the defaults.
    tile_size: 0 (never tile) or MIN_TILE..16384; tile_overlap: 0 <= overlap < tile_size / 2 (so
    the tile steps by more than half a tile); the default overlap, TILE_OVERLAP, is lowered below
    half of a smaller tile. OptionError naming the field otherwise."""
    tile = TILE_SIZE if tile_size is None else _count("tile_size", tile_size, 0, 16384)
    if 0 < tile < MIN_TILE:
        raise OptionError(f"tile_size must be 0 (never tile) or at least {MIN_TILE}, got {tile_size!r}")
    if tile_overlap is None:
        return tile, min(TILE_OVERLAP, (tile - 1) // 2) if tile else TILE_OVERLAP
    overlap = _count("tile_overlap", tile_overlap, 0, 16384)
    if tile and overlap >= tile / 2:
        raise OptionError(f"tile_overlap must be < tile_size / 2 ({tile / 2:g}), got {overlap}")
    return tile, overlap


def _unit(name: str, value) -> float:
    v = unit_value(value)
    if v is None:
        raise OptionError(f"{name} must be a number in [0, 1], got {value!r}")
    return v


def _count(name: str, value, lo: int = 0, hi: int = 2**31 - 1) -> int:
    if isinstance(value, bool):
        raise OptionError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}") from None
    if not math.isfinite(v) or v != int(v) or not lo <= v <= hi:
        raise OptionError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(v)


class _FrozenOptions:
    """What Thresholds and ImageInput share: built from a (checkpoint) dict, written back as one,
    and copied with overrides. ``WHERE`` names the object in error messages."""

    WHERE = "options"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str | None = None):
        """Build from a dict; unknown keys are ignored, a bad value raises OptionError naming
        ``where`` and the field. None (e.g. a model trained before the fields existed) gives the
        defaults; an instance is returned as it is."""
        where = cls.WHERE if where is None else where
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise OptionError(f"{where} must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except OptionError as exc:
            raise OptionError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides):
        """A copy with every override that is not None applied (CLI flags / widget fields)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Thresholds(_FrozenOptions):
    """Turning raw detections into a label image.

    box_conf: keep detections scoring at least this; mask_threshold: a pixel belongs to a cell
    when its mask probability is above this; min_area: drop cells smaller than this (px);
    fill_holes / keep_largest: per-cell post-processing (cellpose-style), inside each cell's box
    (fill_holes on by default: it raised held-out mAP; keep_largest off: it did not).
    """

    WHERE = "thresholds"

    box_conf: float = 0.5
    mask_threshold: float = 0.5
    min_area: int = 0
    fill_holes: bool = True  # measured: held-out mAP 0.6203 -> 0.6223 (benchmarks/bench_postprocess.py)
    keep_largest: bool = False  # measured: no gain (0.6203 -> 0.6204; -0.0005 on the cells sample)

    def __post_init__(self):
        object.__setattr__(self, "box_conf", _unit("box_conf", self.box_conf))
        object.__setattr__(self, "mask_threshold", _unit("mask_threshold", self.mask_threshold))
        object.__setattr__(self, "min_area", _count("min_area", self.min_area))
        for name in ("fill_holes", "keep_largest"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be true or false, got {getattr(self, name)!r}")



DEFAULT_THRESHOLDS = Thresholds()
THRESHOLD_FIELDS = tuple(f.name for f in fields(Thresholds))  # PredictOptions has an override for each

INTENSITIES = ("percentile", "raw")
MAX_CHANNEL = 64  # the highest channel number accepted (io.images reads up to MAX_CHANNELS)


def _channel(name: str, value) -> int:
    try:
        return _count(name, value, 0, MAX_CHANNEL)
    except OptionError:
        raise OptionError(f"{name} must be a channel number from 1 (0 = {'all / grey' if name == 'channel' else 'none'}), "
                          f"got {value!r}") from None


@dataclass(frozen=True)
class ImageInput(_FrozenOptions):
    """How an image becomes the model's input (the rule itself: :mod:`napari_cellseg.io.images`).

    intensity: "percentile" (each channel's 1st..99th percentile -> 0..1, as cellpose's
    normalize99; the default) or "raw" (the dtype's range: 8-bit / 255, 16-bit / 65535, floats
    as they are); channel: the cell channel, numbered from 1 as cellpose does (0 = all channels:
    grey or RGB as they are, the mean of any other number of channels); channel2: an optional
    nuclear channel (0 = none); invert: dark cells on a bright background (1 - the cell channel).
    Stored in every checkpoint trained by this project (``info.train_config``) and the
    defaults when that model predicts.
    """

    WHERE = "input"

    intensity: str = "percentile"
    channel: int = 0
    channel2: int = 0
    invert: bool = False

    def __post_init__(self):
        if self.intensity not in INTENSITIES:
            raise OptionError(f"intensity must be one of {', '.join(INTENSITIES)}, got {self.intensity!r}")
        object.__setattr__(self, "channel", _channel("channel", self.channel))
        object.__setattr__(self, "channel2", _channel("channel2", self.channel2))
        if not isinstance(self.invert, bool):
            raise OptionError(f"invert must be true or false, got {self.invert!r}")
        if self.channel2 and not self.channel:
            raise OptionError(f"channel2 {self.channel2} (nuclear) needs a cell channel: give channel >= 1 too")
        if self.channel2 and self.channel2 == self.channel:
            raise OptionError(f"channel2 must differ from channel (both {self.channel})")



DEFAULT_INPUT = ImageInput()


@dataclass(frozen=True)
class PredictOptions:
    """One prediction run. ``None`` means "the checkpoint's / model's own value".

    checkpoint: path or None (bundled demo model); device: "auto" | "cpu" | "cuda[:N]" | "mps";
    precision: one of PRECISIONS ("auto": model.devices.auto_precision: bf16 on CUDA GPUs that
    have it, fp16 on older ones, fp32 on CPU); diameter: cell diameter in px, "auto" or None; scale: an explicit resize
    factor (wins over diameter); tile_size / tile_overlap: network px, 0 = never tile, None = the
    defaults (:func:`tile_settings`); thresholds: overrides of the checkpoint's thresholds
    (None fields keep the checkpoint's value); intensity / channel / channel2 / invert:
    overrides of the checkpoint's :class:`ImageInput` (None keeps the value it was trained with).
    """

    checkpoint: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    diameter: float | str | None = None
    scale: float | None = None
    tile_size: int | None = None
    tile_overlap: int | None = None
    batch_size: int = 1
    box_conf: float | None = None
    mask_threshold: float | None = None
    min_area: int | None = None
    fill_holes: bool | None = None
    keep_largest: bool | None = None
    intensity: str | None = None
    channel: int | None = None
    channel2: int | None = None
    invert: bool | None = None

    def __post_init__(self):
        check_precision(self.precision)
        if not isinstance(self.device, str) or not self.device:
            raise OptionError(f"device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        if self.diameter is not None and self.diameter != "auto":
            d = valid_diameter(self.diameter)
            if d is None:
                raise OptionError(f"diameter must be a number of pixels > 0 or 'auto', got {self.diameter!r}")
            object.__setattr__(self, "diameter", d)
        if self.scale is not None:
            s = valid_scale(self.scale)
            if s is None:
                raise OptionError(f"scale must be a number in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}], "
                                  f"got {self.scale!r}")
            object.__setattr__(self, "scale", s)
        if self.tile_size is not None or self.tile_overlap is not None:
            tile, overlap = tile_settings(self.tile_size, self.tile_overlap)  # checked against each other
            object.__setattr__(self, "tile_size", None if self.tile_size is None else tile)
            object.__setattr__(self, "tile_overlap", None if self.tile_overlap is None else overlap)
        object.__setattr__(self, "batch_size", _count("batch_size", self.batch_size, 1, 1024))
        # the threshold and input overrides are checked by building them once
        self.thresholds(DEFAULT_THRESHOLDS)
        self.image_input(DEFAULT_INPUT)

    @classmethod
    def from_args(cls, args) -> "PredictOptions":
        """From command-line flags (an argparse Namespace of ``cellseg predict`` / ``tune``):
        every field whose attribute exists; the ranges are checked here, once."""
        known = {f.name for f in fields(cls)}
        values = {k: getattr(args, k) for k in known if getattr(args, k, None) is not None}
        if "checkpoint" in values:
            values["checkpoint"] = str(values["checkpoint"])
        return cls(**values)

    def image_input(self, base: ImageInput | Mapping | None = None) -> ImageInput:
        """The effective input rule: ``base`` (the checkpoint's) with these overrides applied."""
        return ImageInput.from_dict(base).with_overrides(
            intensity=self.intensity, channel=self.channel, channel2=self.channel2, invert=self.invert)

    def thresholds(self, base: Thresholds | Mapping | None = None) -> Thresholds:
        """The effective thresholds: ``base`` (the checkpoint's) with these overrides applied."""
        return Thresholds.from_dict(base).with_overrides(**{k: getattr(self, k) for k in THRESHOLD_FIELDS})
