"""The segmentation network: a timm backbone + torchvision FPN + torchvision Mask R-CNN heads.

``ModelConfig`` holds every architecture choice and is stored inside each checkpoint, so a
checkpoint always rebuilds the exact network that produced it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_cellseg.model.backbone_weights import BackboneError
from napari_cellseg.options import unit_value

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A setting out of range, of a model config (``field: problem``) or of a training run
    (``--flag: problem``; training.config uses this class too)."""


# bounds of every integer field: wide enough for any sensible Mask R-CNN, small enough that a
# hostile config cannot make build_model allocate tens of GB
_INT_BOUNDS = {
    "fpn_channels": (1, 1024), "num_classes": (2, 1000), "min_size": (1, 16384),
    "max_size": (1, 16384), "box_detections_per_img": (1, 100_000),
    "rpn_pre_nms_top_n_train": (1, 100_000), "rpn_post_nms_top_n_train": (1, 100_000),
    "rpn_pre_nms_top_n_test": (1, 100_000), "rpn_post_nms_top_n_test": (1, 100_000),
    "rpn_batch_size_per_image": (1, 100_000), "box_batch_size_per_image": (1, 100_000),
    "box_head_size": (1, 4096), "mask_head_channels": (1, 1024), "mask_head_layers": (1, 16),
}
_UNIT_FIELDS = ("box_score_thresh", "box_nms_thresh")
_N_LEVELS = 5  # FPN levels: 4 backbone stages + max-pool; one anchor size each
_LOCAL_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")  # timm "arch" or "arch.tag"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or (
        type(v).__module__ == "numpy" and hasattr(v, "dtype") and v.dtype.kind in "iu")


def _finite(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not (
            type(v).__module__ == "numpy" and getattr(v, "dtype", None) is not None
            and v.dtype.kind in "iuf"):
        return False
    return math.isfinite(float(v))


def check_backbone_name(name) -> str:
    """A timm model name from timm's local registry (no ``hf-hub:``, no URL, no network)."""
    if not isinstance(name, str):
        raise ConfigError(f"backbone: must be a timm model name, got {type(name).__name__}")
    if not _LOCAL_NAME.fullmatch(name):
        raise ConfigError(f"backbone: {name!r} is not a local timm model name (hub names and "
                          "URLs are never loaded)")
    import timm

    if name.split(".")[0] not in set(timm.list_models()):
        raise ConfigError(f"backbone: {name!r} is not a timm model name known locally "
                          f"(see timm.list_models())")
    return name


MAX_WEIGHT_BYTES = 2**30
"""The largest network a config may describe: its float32 weights (``weight_estimate``). ConvNeXt
up to large with the default heads fits (convnext_tiny: 0.18 GiB, convnext_large: 0.81 GiB);
convnext_xlarge (1.4 GiB), convnext_xxlarge (3.2 GiB) or every head at its widest do not. Training needs about 4x the weights (gradients, two AdamW moments) plus activations."""


@functools.lru_cache(maxsize=32)
def _backbone_shape(name: str) -> tuple[int, tuple[int, ...]]:
    """(weights, channels of the 4 feature levels) of a timm backbone, from a model made on
    torch's "meta" device: shapes only, no memory, no weights (under a second even for
    convnext_xxlarge)."""
    import timm
    import torch

    with torch.device("meta"):
        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3))
    return sum(p.numel() for p in body.parameters()), tuple(body.feature_info.channels())


def weight_estimate(config: "ModelConfig") -> dict[str, int]:
    """Weights per part of the network ``build_model(config)`` makes, counted from the config
    (the backbone from its shapes alone, ``_backbone_shape``): nothing is built or allocated."""
    n, channels = _backbone_shape(config.backbone)
    f, h, m, k = config.fpn_channels, config.box_head_size, config.mask_head_channels, config.num_classes
    a = len(config.aspect_ratios)
    parts = {
        "backbone": n,
        "fpn": sum(c * f + f for c in channels) + len(channels) * (9 * f * f + f),
        "rpn": 9 * f * f + f + (f + 1) * a + (f + 1) * 4 * a,
        "box_head": f * 49 * h + h + h * h + h + (h + 1) * k * 5,
        "mask_head": 9 * f * m + m + (config.mask_head_layers - 1) * (9 * m * m + m) + 4 * m * m + m + (m + 1) * k,
    }
    parts["total"] = sum(parts.values())
    return parts


def check_size(config: "ModelConfig") -> "ModelConfig":
    """Refuse (ConfigError naming the parts) a network whose float32 weights would exceed
    MAX_WEIGHT_BYTES, before anything is built: a checkpoint (or flags) naming convnext_xxlarge
    is refused in a fraction of a second instead of allocating gigabytes. Returns ``config``."""
    parts = weight_estimate(config)
    size = 4 * parts["total"]
    if size > MAX_WEIGHT_BYTES:
        big = ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in parts.items() if k != "total" and v >= 1e6)
        largest = max((k for k in parts if k != "total"), key=parts.get)
        field = {"backbone": "backbone", "box_head": "box_head_size", "mask_head": "mask_head_channels"}.get(
            largest, "fpn_channels")  # the field that sizes the largest part
        raise ConfigError(f"{field}: {config.backbone} with fpn_channels {config.fpn_channels}, box_head_size "
                          f"{config.box_head_size} and mask_head_channels {config.mask_head_channels} makes "
                          f"{parts['total'] / 1e6:.0f}M weights ({big}): {size / 2**30:.1f} GiB in float32, "
                          f"training ~4x that; the limit is {MAX_WEIGHT_BYTES / 2**30:.0f} GiB")
    return config


@dataclass
class ModelConfig:
    """Architecture of the Mask R-CNN. Defaults follow the Kaggle Sartorius starter."""

    backbone: str = "convnext_tiny"
    fpn_channels: int = 256
    num_classes: int = 2  # background + cell
    min_size: int = 520  # 704x520 starter images are not rescaled
    max_size: int = 704
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)  # one per FPN level (4 + pool)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    box_detections_per_img: int = 500
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_score_thresh: float = 0.05  # floor: detections below never reach Detections
    box_nms_thresh: float = 0.5
    box_head_size: int = 1024  # TwoMLPHead representation size
    mask_head_channels: int = 256
    mask_head_layers: int = 4
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    # False: torchvision's transform rescales every image so its short side is min_size (capped
    # by max_size), as in the starter. True: the network sees images at their native pixel size
    # (times the user's object-size scale); set by training on native-scale crops.
    native_scale: bool = False
    # > 0: training resized every image so its median object diameter was this many pixels
    # (cellpose's diam_mean); predict's diameter option rescales images to it. 0 = not normalised.
    diameter: float = 0.0

    def validate(self) -> "ModelConfig":
        """Check every field (``ConfigError("field: problem")``); lists become tuples, numbers
        plain ints / floats. Returns self. :meth:`from_dict` (checkpoints) always calls it;
        configs built from flags are validated by their front end (TrainConfig.validate)."""
        if not isinstance(self.backbone, str):
            raise ConfigError(f"backbone: must be a timm model name, got {type(self.backbone).__name__}")
        if not _LOCAL_NAME.fullmatch(self.backbone):
            check_backbone_name(self.backbone)  # raises: hub names and URLs
        for name, (lo, hi) in _INT_BOUNDS.items():
            v = getattr(self, name)
            if not _is_int(v) or not lo <= v <= hi:
                raise ConfigError(f"{name}: must be an integer in [{lo}, {hi}], got {v!r}")
            setattr(self, name, int(v))
        for name in _UNIT_FIELDS:
            v = getattr(self, name)
            if unit_value(v) is None:
                raise ConfigError(f"{name}: must be a number in [0, 1], got {v!r}")
            setattr(self, name, unit_value(v))
        anchors = self.anchor_sizes
        if (not isinstance(anchors, (list, tuple)) or len(anchors) != _N_LEVELS
                or not all(_is_int(a) and 1 <= a <= 16384 for a in anchors)):
            raise ConfigError(f"anchor_sizes: must be {_N_LEVELS} integers in [1, 16384] (one per "
                              f"FPN level), got {anchors!r}")
        self.anchor_sizes = tuple(int(a) for a in anchors)
        ratios = self.aspect_ratios
        if (not isinstance(ratios, (list, tuple)) or not 1 <= len(ratios) <= 16
                or not all(_finite(r) and 0 < float(r) <= 100 for r in ratios)):
            raise ConfigError(f"aspect_ratios: must be 1 to 16 finite numbers > 0, got {ratios!r}")
        self.aspect_ratios = tuple(float(r) for r in ratios)
        for name, positive in (("image_mean", False), ("image_std", True)):
            v = getattr(self, name)
            if (not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_finite(x) for x in v)
                    or (positive and not all(float(x) > 0 for x in v))):
                raise ConfigError(f"{name}: must be 3 finite numbers{' > 0' if positive else ''}, "
                                  f"got {v!r}")
            setattr(self, name, tuple(float(x) for x in v))
        if not isinstance(self.native_scale, bool):
            raise ConfigError(f"native_scale: must be true or false, got {self.native_scale!r}")
        if not _finite(self.diameter) or float(self.diameter) < 0:
            raise ConfigError(f"diameter: must be a finite number >= 0, got {self.diameter!r} "
                              f"(0 = not normalised)")
        self.diameter = float(self.diameter)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (lists, not tuples): safe for ``torch.load(weights_only=True)``."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a stored dict (checkpoints): every field validated, the backbone only from
        timm's local model names. Raises ConfigError("field: problem")."""
        if not isinstance(d, dict):
            raise ConfigError(f"must be a mapping, got {type(d).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            warnings.warn(f"ignoring unknown model config keys: {', '.join(unknown)}", stacklevel=2)
        kwargs = {}
        for k, v in d.items():
            if k in names:
                kwargs[k] = tuple(v) if isinstance(v, list) else v
        if "backbone" in kwargs:
            check_backbone_name(kwargs["backbone"])
        return check_size(cls(**kwargs).validate())


def _create_body(config: ModelConfig, backbone_weights: str | Path | None):
    import timm

    from napari_cellseg.model.backbone_weights import first_line, load_backbone_file

    kwargs: dict[str, Any] = dict(features_only=True, out_indices=(0, 1, 2, 3))
    if backbone_weights is None or str(backbone_weights) == "random":
        return timm.create_model(config.backbone, pretrained=False, **kwargs)
    if str(backbone_weights) == "imagenet":
        import logging

        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # its retry warnings would bury the one line below
        try:
            return timm.create_model(config.backbone, pretrained=True, **kwargs)
        except Exception as exc:  # no network, hub unreachable, unknown tag...
            raise BackboneError(
                f"could not download ImageNet weights for {config.backbone!r} ({first_line(exc)}); pass "
                "--backbone-weights FILE (weights downloaded elsewhere) or --backbone-weights random"
            ) from None
        finally:
            hub_log.setLevel(level)
    path = Path(backbone_weights)
    if not path.is_file():
        raise BackboneError(f"{path}: backbone weights file not found")
    body = timm.create_model(config.backbone, pretrained=False, **kwargs)
    load_backbone_file(body, config.backbone, path)
    return body


_FP32_CONV: dict = {}


def _fp32_conv_class():
    """nn.Conv2d subclass that always runs in float32, also inside ``torch.autocast``."""
    if "cls" not in _FP32_CONV:
        import torch

        class Float32Conv2d(torch.nn.Conv2d):
            def forward(self, x):
                with torch.autocast(device_type=x.device.type, enabled=False):
                    return super().forward(x.float())

        _FP32_CONV["cls"] = Float32Conv2d
    return _FP32_CONV["cls"]


def keep_stem_fp32(body):
    """Run the backbone's first convolution (the patch-embedding stem) and its patchify
    downsampling convolutions (kernel == stride > 1, ConvNeXt's ``stages_N.downsample.1``) in
    float32 under autocast.

    Why: in ConvNeXt each of these convs sits next to a LayerNorm over channels, and their
    weight/bias gradients sum over every pixel of a high-resolution map. On flat (dark) image
    regions the stem output barely varies across channels, so the LayerNorm divides by
    ~sqrt(eps) and amplifies the gradient up to ~1000x per pixel. Measured at 704x520 from
    random weights (float32 gradients): max |grad| 1.2e8 on ``stem_0.bias``; with the stem
    aside, 134 on ``stages_1.downsample.1.bias``; every other conv/linear gradient <= 3.7. In
    float16 (max 65504) the stem overflows at ANY GradScaler scale >= 2^-11, so the scaler keeps
    halving (each halving a skipped step) until half of all other gradients flush to zero:
    fp16 training stalls. With these convs in float32 the highest safe scale is ~2^14. They
    cost ~1% of the backbone's FLOPs. Modules keep their state_dict keys. Returns the
    converted modules."""
    import torch

    done = []
    for m in body.modules():
        if isinstance(m, torch.nn.Conv2d) and type(m) is torch.nn.Conv2d:
            k, st = tuple(m.kernel_size), tuple(m.stride)
            if not done or (k == st and max(st) > 1):
                m.__class__ = _fp32_conv_class()
                done.append(m)
    return done


def build_backbone(config: ModelConfig, backbone_weights: str | Path | None = None):
    import torch
    from torch import nn
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    body = _create_body(config, backbone_weights)
    keep_stem_fp32(body)
    channels = list(body.feature_info.channels())

    class TimmFPN(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.fpn = FeaturePyramidNetwork(channels, config.fpn_channels, extra_blocks=LastLevelMaxPool())
            self.out_channels = config.fpn_channels

        def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
            feats = self.body(x)
            return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))

    return TimmFPN()


def build_model(config: ModelConfig | None = None, backbone_weights: str | Path | None = None):
    """Build the Mask R-CNN. ``backbone_weights``: None or "random" (random init: what checkpoint
    loading uses, it never downloads), "imagenet" (timm's pretrained weights, from the Hugging
    Face cache or downloaded; BackboneError when that fails) or a local weights file."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.ops import MultiScaleRoIAlign

    config = check_size(config or ModelConfig())
    backbone = build_backbone(config, backbone_weights)
    n_levels = 5
    if len(config.anchor_sizes) != n_levels:
        raise ValueError(f"anchor_sizes needs {n_levels} values (one per FPN level), got {config.anchor_sizes}")
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in config.anchor_sizes),
        aspect_ratios=(tuple(config.aspect_ratios),) * n_levels,
    )
    names = ["0", "1", "2", "3"]
    box_pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2)
    c = backbone.out_channels
    box_head = TwoMLPHead(c * 7 * 7, config.box_head_size)
    mask_head = MaskRCNNHeads(c, [config.mask_head_channels] * config.mask_head_layers, 1)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=config.min_size,
        max_size=config.max_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_roi_pool=box_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(config.box_head_size, config.num_classes),
        box_score_thresh=config.box_score_thresh,
        box_nms_thresh=config.box_nms_thresh,
        box_detections_per_img=config.box_detections_per_img,
        box_batch_size_per_image=config.box_batch_size_per_image,
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(config.mask_head_channels, config.mask_head_channels, config.num_classes),
    )
    return model
