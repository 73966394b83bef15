"""Plain logic behind the napari "Train model" widget (no Qt, no napari, no torch at import).
It uses the headless ``training`` package's public modules (config, data, engine).

* :func:`form_fields` lists the Settings form, generated from :class:`TrainConfig`'s fields (their
  types, defaults and ``config.HELP`` / ``config.CHOICES``: the metadata the CLI flags come from),
  so a new TrainConfig field appears in the form and the CLI with no widget code;
* :func:`form_to_config` maps the form's values 1:1 onto a validated :class:`TrainConfig`;
* :func:`layer_samples` turns (image, labels) layer pairs into training samples; with fewer than
  four images, each is cut into 2x2 tiles so a validation tile can be held out of one image;
* :func:`train_job` is the worker body: samples -> ``engine.train`` events; when it fails before
  writing anything, the output folder it created is removed again;
* :class:`ProgressTracker` turns engine events into a fraction, a status line and plot data.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import typing
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from training.config import BACKBONE_WEIGHTS, CHOICES, HELP, TrainConfig
from training.data import MIN_IMAGES_UNTILED, DataError

from napari_cellseg.model.checkpoint import missing_checkpoint

SOURCES = ("layers", "csv", "folders")
#: TrainConfig fields with rows of their own (the data source pages, browse buttons, the backbone
#: choice) or fixed by the widget: it trains at the images' native size (width = height = 0),
#: never resumes (a fresh output folder per run), and the architecture comes from the start model
OWN_ROWS = ("train_csv", "images", "image_dir", "label_dir", "out", "init_checkpoint", "backbone_weights")
FIXED = {"width": 0, "height": 0, "resume": False}
NOT_IN_FORM = (*OWN_ROWS, *FIXED, "model")
PATHS = ("train_csv", "images", "image_dir", "label_dir", "init_checkpoint", "backbone_weights")
#: shown first, in this order; every other generated field goes under "Advanced"
MAIN_FIELDS = ("epochs", "lr", "batch_size", "crop_size", "steps_per_epoch", "val_fraction", "device")
LABELS = {"lr": "Learning rate", "steps_per_epoch": "Steps / epoch", "val_fraction": "Val fraction",
          "grad_clip": "Gradient clip", "amp": "Mixed precision", "max_val_images": "Max val images",
          "freeze_backbone_epochs": "Freeze backbone", "select_by": "Best model by",
          "tune_thresholds": "Tune thresholds", "figures": "Write figures"}
#: presentation only (the ranges a spin box offers; TrainConfig.validate() is the rule)
WIDGET_OPTIONS: dict[str, dict[str, Any]] = {
    "epochs": dict(min=1, max=10_000), "lr": dict(min=1e-6, max=1.0, step=1e-6),
    "batch_size": dict(min=1, max=64), "crop_size": dict(min=0, max=4096, step=32),
    "steps_per_epoch": dict(min=0, max=100_000), "val_fraction": dict(min=0.05, max=0.9, step=0.05),
    "weight_decay": dict(min=0.0, max=1.0, step=1e-5), "plateau_factor": dict(min=0.01, max=0.99, step=0.05),
    "device": dict(widget_type="ComboBox", choices=["auto", "cpu", "cuda"]),
    "scale_range": dict(options=dict(min=0.05, max=20.0, step=0.05)),
}
#: backbone initialisation choices (used only when not starting from a checkpoint)
BACKBONE_CHOICES = {"imagenet": "ImageNet weights (timm)", "random": "random (slow to learn)",
                    "file": "weights file…"}


class FormField(NamedTuple):
    """One generated form row: what ``magicgui.widgets.create_widget`` needs."""

    name: str
    annotation: Any
    default: Any
    label: str
    tooltip: str
    options: dict
    advanced: bool


def _generic_options(annotation, default) -> dict:
    """Spin-box ranges for a field without WIDGET_OPTIONS (magicgui's own are 0..999, 2 decimals)."""
    if annotation is int:
        return dict(min=min(int(default), 0), max=2**31 - 1)
    if annotation is float:
        step = 10.0 ** (math.floor(math.log10(abs(default))) - 1) if default else 0.01
        return dict(min=min(float(default), 0.0), max=1e6, step=step)
    return {}


def form_fields() -> list[FormField]:
    """Every TrainConfig field except NOT_IN_FORM: MAIN_FIELDS first, the rest (advanced) in
    the dataclass's order. Label, tooltip (config.HELP) and choices (config.CHOICES) as the CLI."""
    hints = typing.get_type_hints(TrainConfig)
    default = TrainConfig()
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_IN_FORM]
    order = [n for n in MAIN_FIELDS if n in fields] + [n for n in fields if n not in MAIN_FIELDS]
    out = []
    for name in order:
        value = getattr(default, name)
        options = dict(WIDGET_OPTIONS.get(name) or _generic_options(hints[name], value))
        if name in CHOICES:
            options = dict(choices=list(CHOICES[name]))
        out.append(FormField(name, hints[name], value, LABELS.get(name, name.replace("_", " ").capitalize()),
                             HELP.get(name, ""), options, name not in MAIN_FIELDS))
    return out


def form_defaults() -> dict:
    """The form's defaults: TrainConfig's (None paths shown as "")."""
    default = TrainConfig()
    return {"source": "layers", **{f.name: f.default for f in form_fields()},
            **{k: ("" if getattr(default, k) is None else getattr(default, k)) for k in OWN_ROWS if k != "out"}}


def default_backbone_choice() -> str:
    """TrainConfig's default backbone_weights as a form choice."""
    w = TrainConfig().backbone_weights
    return w if w in BACKBONE_WEIGHTS else "file"


def default_backbone_weights() -> str:
    """TrainConfig's default (used as is when a starting checkpoint makes it irrelevant)."""
    return TrainConfig().backbone_weights


def backbone_weights(choice: str, path: str = "") -> str:
    """The form's backbone choice -> ``TrainConfig.backbone_weights`` ("imagenet", "random" or a path)."""
    if choice not in BACKBONE_CHOICES:
        raise DataError(f"backbone weights: unknown choice {choice!r} ({', '.join(BACKBONE_CHOICES)})")
    if choice == "file":
        if not path.strip():
            raise DataError("backbone weights: choose the weights file (or pick imagenet / random)")
        if not Path(path).expanduser().is_file():
            raise DataError(f"backbone weights: {path}: file not found")
        return str(Path(path).expanduser())
    return choice


def default_out_dir(home: str | Path | None = None, now: _dt.datetime | None = None) -> Path:
    """``~/cellseg-runs/YYYYmmdd-HHMMSS`` (a fresh folder per run)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(home or Path.home()) / "cellseg-runs" / stamp


def _coerce(annotation, value):
    """A widget's value as the field's type (spin boxes give int/float already; JSON lists)."""
    if isinstance(value, str):
        return value.strip()
    if annotation is int and not isinstance(value, bool):
        return int(value)
    if annotation is float:
        return float(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def remembered(values: dict) -> dict:
    """The generated fields of ``values`` as plain JSON values (what the widget remembers)."""
    return {f.name: list(values[f.name]) if isinstance(values[f.name], tuple) else values[f.name]
            for f in form_fields() if f.name in values}


def _source_paths(kwargs: dict, source: str) -> None:
    """Only the chosen source's paths are used; DataError when they are missing."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r} (one of {', '.join(SOURCES)})")
    if source != "csv":
        kwargs["train_csv"] = kwargs["images"] = None
    if source != "folders":
        kwargs["image_dir"] = kwargs["label_dir"] = None
    if source == "csv" and not (kwargs["train_csv"] and kwargs["images"]):
        raise DataError("CSV source: choose the annotation CSV and the folder with its images")
    if source == "folders" and not (kwargs["image_dir"] and kwargs["label_dir"]):
        raise DataError("folder source: choose the image folder and the label folder")


def form_to_config(form: dict) -> TrainConfig:
    """Form values -> validated TrainConfig: every generated field 1:1, the own rows' paths
    (only the chosen source's), FIXED (native size, no resume).

    Raises ``ConfigError`` / ``DataError`` with a one-line message naming the field.
    """
    values = {**form_defaults(), **form}
    kwargs = {f.name: _coerce(f.annotation, values[f.name]) for f in form_fields()}
    for key in OWN_ROWS:
        v = values.get(key)
        kwargs[key] = (v.strip() if isinstance(v, str) else v) or (None if key in PATHS else v)
    _source_paths(kwargs, values["source"])
    if not kwargs["out"]:
        raise DataError("choose an output folder")
    ckpt = kwargs["init_checkpoint"]
    if ckpt and missing_checkpoint(ckpt):
        raise DataError(f"start from: {missing_checkpoint(ckpt)}")
    kwargs["out"] = str(Path(kwargs["out"]).expanduser())
    return TrainConfig(**FIXED, **kwargs).validate()


def check_pairs(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Cheap checks of (name, image, labels) pairs; DataError naming the layer."""
    if not pairs:
        raise DataError("no image + labels pair chosen: segment an image (Segment cells) or tick a "
                        "row and pick its labels layer")
    for name, image, labels in pairs:
        image, labels = np.asarray(image), np.asarray(labels)
        if labels.ndim != 2:
            raise DataError(f"{name}: labels layer must be 2D, got shape {labels.shape}")
        if tuple(image.shape[:2]) != tuple(labels.shape):
            raise DataError(f"{name}: image is {image.shape[0]}x{image.shape[1]} but its labels are "
                            f"{labels.shape[0]}x{labels.shape[1]}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{name}: labels must be integer instance ids, got {labels.dtype}")
        if not labels.any():
            raise DataError(f"{name}: the labels layer is empty (no cells to learn from)")


def layer_samples(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]], min_untiled: int = MIN_IMAGES_UNTILED,
                  rule=None):
    """(name, image HxW[xC], labels HxW) pairs -> training samples (``data.array_samples``).

    With fewer than ``min_untiled`` images every image is cut into 2x2 tiles (ids ``NAME@r0c1``)
    so that the grouped train/val split can hold out part of a single image.
    """
    from training.data import few_image_samples

    check_pairs(pairs)
    return few_image_samples([np.asarray(p[1]) for p in pairs], [np.asarray(p[2]) for p in pairs],
                             [p[0] for p in pairs], min_untiled, rule)


def train_job(config: TrainConfig, pairs=None):
    """Worker body: yields the engine's events and returns its summary.

    ``pairs`` (layer source) are turned into samples inside the worker (no numerics in the GUI
    thread). If the run fails or is cancelled before anything was written, the output folder it
    created is removed, so bad input leaves nothing behind.
    """
    from training.engine import train

    out = Path(config.out)
    existed = out.exists()
    done = False
    try:
        samples = None
        if pairs is not None:
            yield {"stage": "setup", "message": f"preparing {len(pairs)} image(s)"}
            samples = layer_samples(pairs, rule=config.image_input())
        result = yield from train(config, samples)
        done = True
        return result
    finally:
        if not done and not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def best_row(history: Iterable[dict]) -> dict | None:
    """The log row of the saved best_model.bin (the last row flagged best)."""
    rows = [r for r in history if int(r.get("best", 0))]
    return rows[-1] if rows else None


class ProgressTracker:
    """Engine events -> overall fraction, status text and loss curves (for the widget's plot)."""

    def __init__(self, epochs: int):
        self.epochs = max(int(epochs), 1)
        self.fraction = 0.0
        self.text = "starting…"
        self.steps: list[tuple[float, float]] = []  # (fractional epoch, train loss per step)
        self.epoch_rows: list[dict] = []  # epoch 0 = the starting model (when the engine reports it)
        self.sec_per_epoch: float | None = None  # the engine's estimate ("eta_epoch_s")

    @property
    def start_row(self) -> dict | None:
        """The starting model's validation (epoch 0), if the engine sent one."""
        return next((r for r in self.epoch_rows if int(r.get("epoch", -1)) == 0), None)

    def _timing(self, event: dict, ep: int, done_in_epoch: float) -> str:
        eta = event.get("eta_epoch_s")
        if eta is None or not math.isfinite(float(eta)):
            return ""
        self.sec_per_epoch = float(eta)
        left = self.sec_per_epoch * max(self.epochs - ep + 1 - done_in_epoch, 0.0)
        return f" · ~{_duration(self.sec_per_epoch)}/epoch, ~{_duration(left)} left"

    def update(self, event: dict) -> None:
        stage = event.get("stage")
        if stage == "setup":
            self.text = str(event.get("message", "setting up"))
            start = int(event.get("start_epoch", 1))
            self.fraction = (start - 1) / self.epochs
        elif stage in ("train", "val"):
            ep, step, total = int(event["epoch"]), int(event["step"]), max(int(event["total"]), 1)
            within = 0.85 * step / total if stage == "train" else 0.85 + 0.15 * step / total
            self.fraction = min((ep - 1 + within) / self.epochs, 1.0)
            if stage == "train":
                loss = float(event.get("loss", math.nan))
                if math.isfinite(loss):
                    self.steps.append((ep - 1 + step / total, loss))
                self.text = (f"epoch {ep}/{self.epochs} · training step {step}/{total} · loss {loss:.3f}"
                             + self._timing(event, ep, step / total))
            else:
                self.text = f"epoch {ep}/{self.epochs} · validating image {step}/{total}"
        elif stage == "epoch":
            row = event["row"]
            self.epoch_rows.append(row)
            self.fraction = int(row["epoch"]) / self.epochs
            if int(row["epoch"]) == 0:
                self.text = (f"starting model: val loss {_num(row.get('val_loss'))} · val mAP "
                             f"{_num(row.get('val_map'))} (epoch 0, before training)")
                return
            self.text = (f"epoch {row['epoch']}/{self.epochs} done · train loss {row['train_loss']:.3f} · "
                         f"val loss {row['val_loss']:.3f} · val mAP {row['val_map']:.3f}"
                         + (" · best so far" if int(row.get("best", 0)) else ""))
        elif stage == "done":
            self.fraction = 1.0


def _num(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.3f}" if math.isfinite(v) else "n/a"


def _duration(seconds: float) -> str:
    seconds = max(float(seconds), 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{math.ceil(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def done_message(summary_history, start_row=None) -> str | None:
    """'best_model.bin (epoch N, val loss L, val mAP M; the starting model: mAP S)' or None."""
    row = best_row(summary_history)
    if row is None:
        return None
    msg = (f"best_model.bin (epoch {row['epoch']}, val loss {_num(row.get('val_loss'))}, "
           f"val mAP {_num(row.get('val_map'))}")
    if start_row is not None:
        msg += f"; the starting model scored val mAP {_num(start_row.get('val_map'))} at epoch 0"
    return msg + ")"
