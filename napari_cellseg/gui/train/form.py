"""Plain logic behind the napari "Train model" widget (no Qt, no napari, no torch at import).
It uses the headless ``training`` package's public modules (config, data, engine).

* :data:`FORM_DEFAULTS` comes from :class:`TrainConfig` (one table of defaults, shared with the CLI);
* :func:`form_to_config` maps the form's values 1:1 onto a :class:`TrainConfig`;
* :func:`layer_samples` turns (image, labels) layer pairs into training samples; with fewer than
  four images, each is cut into 2x2 tiles so a validation tile can be held out of one image;
* :func:`train_job` is the worker body: samples -> ``engine.train`` events; when it fails before
  writing anything, the output folder it created is removed again;
* :class:`ProgressTracker` turns engine events into a fraction, a status line and plot data.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from training.config import BACKBONE_WEIGHTS, TrainConfig
from training.data import DataError

from napari_cellseg.model.checkpoint import missing_checkpoint

SOURCES = ("layers", "csv", "folders")
MIN_IMAGES_UNTILED = 4  # fewer layer images than this: cut each into 2x2 tiles
# form field -> TrainConfig field (the widget's tooltips come from config.HELP[field])
FORM_FIELDS = {"epochs": "epochs", "lr": "lr", "batch_size": "batch_size", "device": "device",
               "crop_size": "crop_size", "steps_per_epoch": "steps_per_epoch", "out": "out",
               "init_checkpoint": "init_checkpoint", "val_fraction": "val_fraction",
               "train_csv": "train_csv", "images": "images", "image_dir": "image_dir",
               "label_dir": "label_dir", "backbone_weights": "backbone_weights"}
_DEFAULT = TrainConfig()
#: the form's defaults: TrainConfig's (None paths shown as "")
FORM_DEFAULTS = {"source": "layers",
                 **{key: ("" if getattr(_DEFAULT, f) is None else getattr(_DEFAULT, f))
                    for key, f in FORM_FIELDS.items() if key != "out"}}
#: backbone initialisation choices (used only when not starting from a checkpoint)
BACKBONE_CHOICES = {"imagenet": "ImageNet weights (timm)", "random": "random (slow to learn)",
                    "file": "weights file…"}


def default_backbone_choice() -> str:
    """TrainConfig's default backbone_weights as a form choice."""
    w = _DEFAULT.backbone_weights
    return w if w in BACKBONE_WEIGHTS else "file"


def default_backbone_weights() -> str:
    """TrainConfig's default (used as is when a starting checkpoint makes it irrelevant)."""
    return _DEFAULT.backbone_weights


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


def form_to_config(form: dict) -> TrainConfig:
    """Form values -> validated TrainConfig. Only the chosen source's paths are used.

    Images are always used at their native pixel size (width = height = 0), like the Segment
    widget shows them; ``crop_size`` > 0 trains on random crops. Raises ``ConfigError`` /
    ``DataError`` with a one-line message naming the field.
    """
    values = {**FORM_DEFAULTS, **form}
    source = values["source"]
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r} (one of {', '.join(SOURCES)})")
    kwargs = {}
    for key, field in FORM_FIELDS.items():
        v = values.get(key)
        kwargs[field] = v.strip() if isinstance(v, str) else v
    for key in ("train_csv", "images", "image_dir", "label_dir", "init_checkpoint", "backbone_weights"):
        kwargs[key] = kwargs[key] or None
    if source != "csv":
        kwargs["train_csv"] = kwargs["images"] = None
    if source != "folders":
        kwargs["image_dir"] = kwargs["label_dir"] = None
    if source == "csv" and not (kwargs["train_csv"] and kwargs["images"]):
        raise DataError("CSV source: choose the annotation CSV and the folder with its images")
    if source == "folders" and not (kwargs["image_dir"] and kwargs["label_dir"]):
        raise DataError("folder source: choose the image folder and the label folder")
    if not kwargs["out"]:
        raise DataError("choose an output folder")
    ckpt = kwargs["init_checkpoint"]
    if ckpt and missing_checkpoint(ckpt):
        raise DataError(f"start from: {missing_checkpoint(ckpt)}")
    for key in ("epochs", "batch_size", "crop_size", "steps_per_epoch"):
        kwargs[key] = int(kwargs[key])
    kwargs["lr"], kwargs["val_fraction"] = float(kwargs["lr"]), float(kwargs["val_fraction"])
    kwargs["out"] = str(Path(kwargs["out"]).expanduser())
    return TrainConfig(width=0, height=0, **kwargs).validate()


def _tiles(shape: Sequence[int], n: int = 2):
    h, w = shape[:2]
    ys, xs = np.linspace(0, h, n + 1).astype(int), np.linspace(0, w, n + 1).astype(int)
    return [(f"r{i}c{j}", (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])))
            for i in range(n) for j in range(n)]


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
    from training.data import array_samples

    check_pairs(pairs)
    ids, images, labels = [], [], []
    tile = len(pairs) < min_untiled
    for name, image, lab in pairs:
        image, lab = np.asarray(image), np.asarray(lab)
        parts = _tiles(lab.shape) if tile else [("", (slice(None), slice(None)))]
        for suffix, sl in parts:
            ids.append(f"{name}@{suffix}" if suffix else name)
            images.append(image[sl])
            labels.append(lab[sl])
    return array_samples(images, labels, ids, rule)


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
