"""Options as data: ``Thresholds`` (how raw detections become labels), ``ImageInput`` (which
channels of an image the model sees and how their intensities are scaled) and ``PredictOptions``
(everything a prediction run needs besides the images).

The one home of the threshold defaults and of every range check on prediction options. The
CLI (``cellseg predict`` / ``tune``), both napari widgets and training validation build these
objects; nothing else validates or defaults the same fields again. numpy/stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping


class OptionError(ValueError):
    """An option out of range; the message names the field (or flag) and the value."""


SCALE_RANGE = (0.05, 20.0)  # any explicit scale / diameter-derived factor (sizing.py uses it too)


def valid_scale(value) -> float | None:
    """``value`` as a finite float within SCALE_RANGE, else None: the one scale rule
    (PredictOptions.scale here, sizing.check_scale and scale_for_diameter)."""
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and SCALE_RANGE[0] <= v <= SCALE_RANGE[1] else None


def _unit(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
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


@dataclass(frozen=True)
class Thresholds:
    """Turning raw detections into a label image.

    box_conf: keep detections scoring at least this; mask_threshold: a pixel belongs to a cell
    when its mask probability is above this; min_area: drop cells smaller than this (px);
    fill_holes / keep_largest: per-cell post-processing (cellpose-style), inside each cell's box
    (fill_holes on by default: it raised held-out mAP; keep_largest off: it did not).
    """

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "thresholds") -> "Thresholds":
        """Build from a (checkpoint) dict; unknown keys are ignored, a bad value raises
        OptionError naming ``where`` and the field."""
        if data is None:
            return cls()
        if isinstance(data, Thresholds):
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

    # read-only mapping protocol: ``th["box_conf"]``, ``dict(th)``, ``{**th}`` keep working for
    # code written against the old threshold dicts
    def keys(self):
        return [f.name for f in fields(self)]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.keys() else default

    def with_overrides(self, **overrides) -> "Thresholds":
        """A copy with every override that is not None applied (CLI flags / widget fields)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


DEFAULT_THRESHOLDS = Thresholds()

INTENSITIES = ("percentile", "raw")
MAX_CHANNEL = 64  # the highest channel number accepted (io.images reads up to MAX_CHANNELS)


def _channel(name: str, value) -> int:
    try:
        return _count(name, value, 0, MAX_CHANNEL)
    except OptionError:
        raise OptionError(f"{name} must be a channel number from 1 (0 = {'all / grey' if name == 'channel' else 'none'}), "
                          f"got {value!r}") from None


@dataclass(frozen=True)
class ImageInput:
    """How an image becomes the model's input (the rule itself: :mod:`napari_cellseg.io.images`).

    intensity: "percentile" (each channel's 1st..99th percentile -> 0..1, as cellpose's
    normalize99; the default) or "raw" (the dtype's range: 8-bit / 255, 16-bit / 65535, floats
    as they are); channel: the cell channel, numbered from 1 as cellpose does (0 = all channels:
    grey or RGB as they are, the mean of any other number of channels); channel2: an optional
    nuclear channel (0 = none); invert: dark cells on a bright background (1 - the cell channel).
    Stored in every checkpoint trained by this project (``info.train_config``) and the
    defaults when that model predicts.
    """

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "input") -> "ImageInput":
        """From a (checkpoint's train_config) dict: its intensity / channel / channel2 / invert,
        unknown keys ignored; a bad value raises OptionError naming ``where`` and the field.
        None (a model trained before these fields existed) gives the defaults."""
        if data is None:
            return cls()
        if isinstance(data, ImageInput):
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

    def with_overrides(self, **overrides) -> "ImageInput":
        """A copy with every override that is not None applied (CLI flags / widget fields)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


DEFAULT_INPUT = ImageInput()


@dataclass(frozen=True)
class PredictOptions:
    """One prediction run. ``None`` means "the checkpoint's / model's own value".

    checkpoint: path or None (bundled demo model); device: "auto" | "cpu" | "cuda[:N]" | "mps";
    precision: "fp32" | "bf16" | "fp16" | "auto" (fp16 on CUDA, bf16 on CPUs that have it); diameter: cell diameter in px, "auto" or None;
    scale: an explicit resize factor (wins over diameter); tile_size: network px, 0 = never
    tile, None = the model's default; thresholds: overrides of the checkpoint's thresholds
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
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise OptionError(f"precision must be fp32, bf16, fp16 or auto, got {self.precision!r}")
        if not isinstance(self.device, str) or not self.device:
            raise OptionError(f"device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        if self.diameter is not None and self.diameter != "auto":
            try:
                d = float(self.diameter)
            except (TypeError, ValueError):
                raise OptionError(f"diameter must be a number of pixels > 0 or 'auto', "
                                  f"got {self.diameter!r}") from None
            if not math.isfinite(d) or d <= 0:
                raise OptionError(f"diameter must be a number of pixels > 0 or 'auto', got {self.diameter!r}")
            object.__setattr__(self, "diameter", d)
        if self.scale is not None:
            s = valid_scale(self.scale)
            if s is None:
                raise OptionError(f"scale must be a number in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}], "
                                  f"got {self.scale!r}")
            object.__setattr__(self, "scale", s)
        if self.tile_size is not None:
            t = _count("tile_size", self.tile_size, 0, 16384)
            if 0 < t < 64:
                raise OptionError(f"tile_size must be 0 (never tile) or at least 64, got {self.tile_size!r}")
            object.__setattr__(self, "tile_size", t)
        if self.tile_overlap is not None:
            o = _count("tile_overlap", self.tile_overlap, 0, 16384)
            if self.tile_size and o >= self.tile_size // 2:
                raise OptionError(f"tile_overlap must be < tile_size / 2 ({self.tile_size // 2}), got {o}")
            object.__setattr__(self, "tile_overlap", o)
        object.__setattr__(self, "batch_size", _count("batch_size", self.batch_size, 1, 1024))
        # the threshold and input overrides are checked by building them once
        self.thresholds(DEFAULT_THRESHOLDS)
        self.image_input(DEFAULT_INPUT)

    @classmethod
    def from_args(cls, args) -> "PredictOptions":
        """From command-line flags (an argparse Namespace of ``cellseg predict`` / ``tune``):
        every field whose attribute exists; the ranges are checked here, once."""
        known = {f.name for f in fields(cls)} - {"extra"}
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
        return Thresholds.from_dict(base).with_overrides(
            box_conf=self.box_conf, mask_threshold=self.mask_threshold, min_area=self.min_area,
            fill_holes=self.fill_holes, keep_largest=self.keep_largest)
