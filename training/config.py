"""``TrainConfig``: every choice of a training run, shared by the CLI and the napari widget.

The CLI flags are generated from the dataclass fields (``--field-name``), so the two never
drift apart; the model architecture lives in ``TrainConfig.model`` (a ``ModelConfig``), whose
fields get flags of their own (``--backbone``, ``--fpn-channels`` ...). Defaults follow the
Kaggle Sartorius starter. This module is cheap to import (no torch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from napari_cellseg.model.maskrcnn import ConfigError, ModelConfig, check_backbone_name, check_size
from napari_cellseg.options import INTENSITIES, ImageInput, OptionError

# ConfigError: the one class for a bad setting (napari_cellseg.model.maskrcnn); the message names
# the field, as ``--flag: problem`` for training's flags


def _as_flag(exc: ConfigError) -> ConfigError:
    """ModelConfig's ``field: problem`` as ``--field: problem`` (every model field is a flag)."""
    field, sep, why = str(exc).partition(": ")
    return ConfigError(f"--{field.replace('_', '-')}: {why}" if sep else str(exc))


AMP_MODES = ("auto", "bf16", "fp16", "off")
SEED_MAX = 2**32 - 1  # NumPy's seed range; the sampler and augmentation use seed % 2**32 anyway
BACKBONE_WEIGHTS = ("imagenet", "random")  # or a local file
CHOICES: dict[str, tuple[str, ...]] = {"amp": AMP_MODES, "select_by": ("loss", "map"), "intensity": INTENSITIES}
"""Fields with a closed set of values (the CLI's choices, the widget's combo boxes).
``backbone_weights`` takes BACKBONE_WEIGHTS or a file path."""

RESUME_MAY_CHANGE = ("out", "resume", "epochs", "steps_per_epoch", "batch_size", "workers", "device", "amp",
                     "figures", "grad_clip", "augment", "scale_range", "freeze_backbone_epochs")
"""TrainConfig fields a --resume may change (how long and on what the remaining epochs train).
Not given, they keep the run's values too (``--out RUN --resume --epochs N`` continues the run
as it was started). Every other field, the architecture included, comes from OUT/last.ckpt: the
data sources, seed and val_fraction fix the train/val split; width/height/crop_size,
max_val_images, tune_thresholds, select_by and the model fix what the val loss / mAP and so
``best`` mean; lr, weight_decay and plateau_* come back with the optimizer / scheduler state. A
flag given with another value is refused (``training.settings.effective_config``), except
init_checkpoint and backbone_weights (they only chose the start: ignored, the stored values
kept) and the data folders (RESUME_MAY_MOVE)."""

RESUME_MAY_MOVE = ("train_csv", "images", "image_dir", "label_dir")
"""Data sources a --resume may be given in a new place (the folder moved): taken when the images
they hold have the run's ids (``training.runstate.check_same_split``)."""


@dataclass
class TrainConfig:
    """One training run. Paths are strings (``""`` / ``None`` = not given)."""

    # data sources (one of: train_csv + images, image_dir + label_dir, or arrays from the widget)
    train_csv: str | None = None
    images: str | None = None
    image_dir: str | None = None
    label_dir: str | None = None
    out: str = "runs/train"
    # schedule
    epochs: int = 20
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 5e-4
    val_fraction: float = 0.1
    grad_clip: float = 1.0
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    # geometry and augmentation
    width: int = 704
    height: int = 520
    crop_size: int = 0
    steps_per_epoch: int = 0
    scale_range: tuple[float, float] = (1.0, 1.0)
    augment: bool = True
    # the model's input (options.ImageInput; the rule: napari_cellseg.io.images): stored in every
    # checkpoint (info.train_config) and the defaults when the model predicts
    intensity: str = "percentile"
    channel: int = 0
    channel2: int = 0
    invert: bool = False
    # model initialisation
    backbone_weights: str = "imagenet"
    init_checkpoint: str | None = None
    freeze_backbone_epochs: int = 0
    # run control
    resume: bool = False
    device: str = "auto"
    amp: str = "auto"
    seed: int = 2025
    workers: int = 0
    select_by: str = "loss"
    tune_thresholds: bool = True
    max_val_images: int = 0
    figures: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError for values that cannot work; returns self."""
        def bad(name, why):
            raise ConfigError(f"--{name.replace('_', '-')}: {why}")

        for name in ("lr", "weight_decay", "grad_clip", "plateau_factor"):
            if not math.isfinite(getattr(self, name)):
                bad(name, f"must be a finite number, got {getattr(self, name)}")
        if self.epochs < 1:
            bad("epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.width < 0 or self.height < 0 or (self.width == 0) != (self.height == 0):
            bad("width", f"width/height must both be > 0 (resize) or both 0 (native size), got {self.width}x{self.height}")
        if self.crop_size < 0 or 0 < self.crop_size < 32:
            bad("crop_size", f"must be 0 (no crop) or >= 32, got {self.crop_size}")
        if self.steps_per_epoch < 0:
            bad("steps_per_epoch", f"must be >= 0, got {self.steps_per_epoch}")
        if not self.model.diameter >= 0:
            bad("diameter", f"must be >= 0 (0 = off), got {self.model.diameter}")
        if self.model.diameter and not (self.crop_size or (self.width == 0 and self.height == 0)):
            bad("diameter", "size normalisation needs native-scale training: add --crop-size N "
                            "(or --width 0 --height 0), else every image is resized to WIDTH x HEIGHT")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            bad("scale_range", f"needs 0 < MIN <= MAX, got {lo} {hi}")
        if self.amp not in AMP_MODES:
            bad("amp", f"must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if not self.backbone_weights:
            bad("backbone_weights", "must be 'imagenet', 'random' or a weights file")
        if self.select_by not in ("loss", "map"):
            bad("select_by", f"must be 'loss' or 'map', got {self.select_by!r}")
        if self.workers < 0:
            bad("workers", f"must be >= 0, got {self.workers}")
        if self.freeze_backbone_epochs < 0:
            bad("freeze_backbone_epochs", f"must be >= 0, got {self.freeze_backbone_epochs}")
        if self.grad_clip < 0:
            bad("grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0 < self.plateau_factor < 1:
            bad("plateau_factor", f"must be between 0 and 1 (the lr is multiplied by it), got {self.plateau_factor}")
        if self.plateau_patience < 0:
            bad("plateau_patience", f"must be >= 0 (epochs), got {self.plateau_patience}")
        if self.max_val_images < 0:
            bad("max_val_images", f"must be >= 0 (0 = every validation image), got {self.max_val_images}")
        if not 0 <= self.seed <= SEED_MAX:
            bad("seed", f"must be an integer in [0, {SEED_MAX}], got {self.seed}")
        if self.train_csv and (self.image_dir or self.label_dir):
            bad("train_csv", "give either --train-csv/--images or --image-dir/--label-dir, not both")
        if self.train_csv and not self.images:
            bad("images", "--train-csv needs --images DIR (the folder with the images it names)")
        if bool(self.image_dir) != bool(self.label_dir):
            bad("label_dir", "--image-dir and --label-dir go together")
        try:
            self.image_input()
        except OptionError as exc:
            field, _, why = str(exc).partition(" ")
            bad(field, why)
        try:  # the architecture flags: the same bounds a checkpoint's config is held to
            self.model.validate()  # (cheap: the backbone's form only, see check_backbone)
        except ConfigError as exc:
            raise _as_flag(exc) from None
        return self

    def image_input(self) -> ImageInput:
        """How this run's images become the model's input (every training and validation image,
        and the model's default when it predicts). Raises OptionError."""
        return ImageInput(self.intensity, self.channel, self.channel2, self.invert)

    def check_backbone(self) -> "TrainConfig":
        """``--backbone`` against timm's local model names (never the Hub). Separate from
        :meth:`validate` because it imports timm (torch): seconds, too slow for the napari
        widget's GUI thread, whose backbone is the default anyway. Returns self."""
        try:
            check_backbone_name(self.model.backbone)
            check_size(self.model)  # the network's weights, counted before anything is built
        except ConfigError as exc:
            raise _as_flag(exc) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins only (safe inside a weights_only checkpoint)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "model":
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in _stored(d).items():
            if k not in names:
                continue
            if k == "model":
                v = ModelConfig.from_dict(v) if isinstance(v, dict) else v
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)


def _stored(d: dict[str, Any]) -> dict[str, Any]:
    """A stored train_config in today's terms: ``amp`` once a switch (devices.amp_mode), and
    ``backbone_weights`` None from before the ImageNet default (= "random")."""
    from napari_cellseg.model.devices import amp_mode

    d = dict(d)
    if "amp" in d:
        d["amp"] = amp_mode(d["amp"])
    if "backbone_weights" in d and d["backbone_weights"] is None:
        d["backbone_weights"] = "random"
    return d


# One line of help per field; the CLI uses these (and the widget may show them as tooltips).
HELP: dict[str, str] = {
    "train_csv": "Kaggle-style annotation CSV (id,annotation,width,height,...: one RLE row per cell)",
    "images": "folder with the images named by --train-csv (ID.png / ID.tif ...)",
    "image_dir": "folder of images (cellpose/stardist style); labels matched by file stem",
    "label_dir": "folder of instance label images (0 = background, 1..N = cells), same stems as --image-dir",
    "out": "output folder: best_model.bin, last.ckpt, log.csv, loss.png, figures/",
    "epochs": "number of epochs (total, also when resuming)",
    "batch_size": "images per optimisation step",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "val_fraction": "fraction of images held out for validation (split by image id, never both sets)",
    "grad_clip": "clip the gradient norm at this value (0 = off)",
    "plateau_factor": "ReduceLROnPlateau: multiply the lr by this when the val loss stalls",
    "plateau_patience": "ReduceLROnPlateau: epochs without val-loss improvement before lowering the lr",
    "width": "resize every image to WIDTH x HEIGHT (0 0 = keep native size; fine-tuning a native-scale "
             "--init-checkpoint: 0 0 unless given); ignored for training crops",
    "height": "see --width",
    "crop_size": "train on random CROP x CROP crops at native scale (0 = whole resized images); "
                 "validation then uses whole images at native size",
    "steps_per_epoch": "optimisation steps per epoch (0 = one pass over the training images); "
                       "with --crop-size, many small random crops per epoch",
    "scale_range": "random rescale factor range MIN MAX applied before cropping (scale augmentation)",
    "diameter": "resize each training/validation image so its median object diameter is D px "
                "(0 = off; with --init-checkpoint: keep its value) before --scale-range; needs "
                "--crop-size or --width 0 --height 0; stored in the checkpoint, and predict's "
                "--diameter/auto sizing rescales images to it (as cellpose's diam_mean); fine-tuning "
                "keeps the --init-checkpoint's value unless this is given",
    "augment": "flips, 90-degree rotations, shift/scale/rotate, noise/blur, brightness/contrast",
    "intensity": "percentile: each channel's 1st-99th percentile -> 0-1 (cellpose's normalize99, every "
                 "dtype, 8-bit too); raw: the dtype's range (8-bit / 255, 16-bit / 65535). Stored in the "
                 "checkpoint: cellseg predict uses it unless told otherwise",
    "channel": "cell channel of the images, numbered from 1 as in cellpose (0 = all channels: grey or RGB "
               "as they are, the mean of other channel counts); stored in the checkpoint",
    "channel2": "optional nuclear channel (0 = none): the cell channel goes to the model's red + green "
                "inputs, this one to blue; stored in the checkpoint",
    "invert": "invert the cell channel (dark cells on a bright background); stored in the checkpoint",
    "backbone_weights": "backbone start for a run from scratch: 'imagenet' (timm's pretrained weights, downloaded "
                        "once into the Hugging Face cache; offline the run stops at once), 'random', or a local "
                        "weights FILE of this --backbone (timm .safetensors/.pth; every backbone weight must "
                        "match in name and shape); unused with --init-checkpoint / --resume",
    "init_checkpoint": "napari-cellseg checkpoint (or bare state_dict) to fine-tune from; the run keeps its "
                       "architecture (a different architecture flag is refused; --diameter may be given)",
    "freeze_backbone_epochs": "keep the backbone frozen for the first N epochs (stability / memory)",
    "resume": "continue an interrupted run from OUT/last.ckpt (model, optimizer, scheduler, scaler, random "
              "states, sampler position, log): the same numbers as an uninterrupted run; the run's settings "
              "(data, split, selection, model) come from last.ckpt, only "
              + ", ".join("--" + n.replace("_", "-") for n in RESUME_MAY_CHANGE[2:]) + " may change (the "
              "others keep the run's values); moved data: give its new place (the same image ids)",
    "device": "auto (CUDA if available), cpu, cuda, cuda:1 ...",
    "amp": "mixed precision: auto = bf16 autocast on GPUs with bfloat16, fp16 + GradScaler on older GPUs, "
           "off on CPU; or bf16, fp16, off",
    "seed": "random seed for Python, NumPy, torch and cuDNN (deterministic mode)",
    "workers": "DataLoader worker processes (0 = load in the main process)",
    "select_by": "best_model.bin criterion: 'loss' (lowest val loss) or 'map' (highest val mAP)",
    "tune_thresholds": "grid-search box_conf / mask_threshold for the best val mAP each epoch; "
                       "the best pair is stored in the checkpoint",
    "max_val_images": "evaluate mAP on at most N validation images (0 = all)",
    "figures": "write loss.png and the qualitative PNGs under OUT/figures",
    # model
    "backbone": "timm backbone name (convnext_tiny, convnext_atto, ...)",
    "fpn_channels": "FPN output channels",
    "num_classes": "classes including background",
    "min_size": "Mask R-CNN transform: short side the image is resized to at inference",
    "max_size": "Mask R-CNN transform: cap on the long side at inference",
    "anchor_sizes": "anchor size (px) per FPN level, 5 values",
    "aspect_ratios": "anchor aspect ratios",
    "box_detections_per_img": "maximum detections per image",
    "rpn_pre_nms_top_n_train": "RPN proposals kept before NMS (training)",
    "rpn_post_nms_top_n_train": "RPN proposals kept after NMS (training)",
    "rpn_pre_nms_top_n_test": "RPN proposals kept before NMS (inference)",
    "rpn_post_nms_top_n_test": "RPN proposals kept after NMS (inference)",
    "rpn_batch_size_per_image": "anchors sampled per image for the RPN loss",
    "box_batch_size_per_image": "proposals sampled per image for the box/mask heads",
    "box_score_thresh": "score floor for detections",
    "box_nms_thresh": "NMS IoU threshold for detections",
    "box_head_size": "hidden size of the box head MLP",
    "mask_head_channels": "channels of the mask head convolutions",
    "mask_head_layers": "number of mask head convolutions",
    "image_mean": "normalisation mean (RGB, inputs in [0, 1]); done inside the model only",
    "image_std": "normalisation std (RGB)",
}
