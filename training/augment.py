"""albumentations pipelines. Masks travel as a few uint16 label "layers" (see data.py), so a
whole image's instances are warped with one call per layer (nearest neighbour), never one per cell,
and boxes are recomputed from the warped masks afterwards (always in sync).

Images stay float32 in [0, 1]; normalisation (ImageNet mean/std) happens in one place only:
inside the model (``GeneralizedRCNNTransform``).
"""

from __future__ import annotations

import os

import cv2

# albumentations asks PyPI for a newer version at import (2 s timeout, a warning when offline, in
# every training start and DataLoader worker); the user can still turn it on with =0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402


def train_pipeline(width: int = 704, height: int = 520, crop_size: int = 0,
                   scale_range: tuple[float, float] = (1.0, 1.0), augment: bool = True,
                   seed: int | None = None) -> A.Compose:
    """Training pipeline: (resize | random rescale + random crop) then flips/rotations/noise/colour."""
    ops: list = []
    lo, hi = scale_range
    if crop_size:
        if (lo, hi) != (1.0, 1.0):
            ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                                     mask_interpolation=cv2.INTER_NEAREST, p=1.0))
        ops += [A.PadIfNeeded(crop_size, crop_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
                A.RandomCrop(crop_size, crop_size)]
    else:
        if width and height:
            ops.append(A.Resize(height, width, interpolation=cv2.INTER_LINEAR,
                                mask_interpolation=cv2.INTER_NEAREST))
        if (lo, hi) != (1.0, 1.0):
            ops.append(A.Affine(scale=(lo, hi), keep_ratio=True, p=1.0, border_mode=cv2.BORDER_CONSTANT))
    if augment:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5) if (crop_size or width == height) else A.NoOp(),
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                     border_mode=cv2.BORDER_CONSTANT, p=0.5),
            A.OneOf([A.GaussNoise(std_range=(0.01, 0.05)), A.GaussianBlur(blur_limit=(3, 5))], p=0.3),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        ]
    return A.Compose(ops, seed=seed)


def test_pipeline(width: int = 704, height: int = 520) -> A.Compose:
    """Validation/test pipeline: resize only (nothing at all for width = height = 0)."""
    ops = []
    if width and height:
        ops.append(A.Resize(height, width, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST))
    return A.Compose(ops)
