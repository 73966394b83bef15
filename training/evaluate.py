"""Validation helpers: the val Predictor, the one-pass validation step (losses and Detections
from one backbone forward), the threshold choice for the best val mAP (the shared
``napari_cellseg.inference.tuning.sweep`` on cached Detections) and the run's figures (loss curve,
augmented samples, validation overlays). No Qt here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_cellseg.options import DEFAULT_THRESHOLDS, PredictOptions, Thresholds


def val_predictor(net, model_config, device):
    """A ``napari_cellseg.inference.pipeline.Pipeline`` around the model being trained (``.predict(array)``
    -> Detections), built from PredictOptions like every other prediction.

    The val images come out of the val pipeline at the size the network trained on, so they are
    fed as they are (``native_scale``, scale 1): no second resize, no size estimate.
    Note: the runner puts ``net`` in eval mode; the caller switches it back to train mode.
    """
    import dataclasses

    from napari_cellseg.inference.runner import Runner
    from napari_cellseg.inference.pipeline import Pipeline

    runner = Runner(net, dataclasses.replace(model_config, native_scale=True), device=str(device))
    # the val images are the model's input already (training.data read them by the run's input
    # rule): "raw" + all channels passes them on unchanged, never normalised twice
    return Pipeline(runner, PredictOptions(device=str(device), scale=1.0, intensity="raw", channel=0,
                                           channel2=0, invert=False))


def val_step(pipeline, arrays, targets, detect: bool = True):
    """One validation step over a batch: ``arrays`` (normalised float32 HxWx3, as the pipeline
    takes them) and their torchvision ``targets`` (masks on the device) -> ``(losses, detections)``:
    one dict of loss tensors and (when ``detect``) one ``Detections`` per image.

    The backbone runs ONCE (``Runner.prepare`` + ``Runner.features``, exactly as the pipeline's
    forward): the heads then run in training mode on those features for the losses (per image,
    each on its own slice, so the losses and the random proposal sampling are those of a one-image
    train-mode forward) and in eval mode (``Runner.iter_detect``) for the Detections, which are
    those of ``pipeline.predict(array)``. An image the pipeline would tile (larger than its
    ``tile_size``) gets its Detections from ``pipeline.predict`` itself. Leaves the model in eval
    mode; the caller switches it back to train mode. The arrays of one call should have one shape
    (a smaller image padded to a larger one's size would see other border features)."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    from napari_cellseg.progress import drain
    from napari_cellseg.inference.tiling import needs_tiling

    runner = pipeline.runner
    net = runner.model
    factors = [runner.base_factor(a.shape) * float(pipeline.scale) for a in arrays]
    with torch.inference_mode():
        images, orig_sizes = runner.prepare(arrays, factors)
        feats = runner.features(images)
        net.train()  # the heads: RPN / ROI sampling and losses (the backbone has run already)
        losses = []
        for i in range(len(arrays)):
            one = ImageList(images.tensors[i:i + 1], images.image_sizes[i:i + 1])
            f = {k: v[i:i + 1] for k, v in feats.items()}
            proposals, proposal_losses = net.rpn(one, f, targets[i:i + 1])
            _, detector_losses = net.roi_heads(f, proposals, one.image_sizes, targets[i:i + 1])
            losses.append({**detector_losses, **proposal_losses})  # GeneralizedRCNN's order
        net.eval()
        if not detect:
            return losses, None
        dets = drain(runner.iter_detect(images, feats, orig_sizes, scale=float(pipeline.scale)))
    tiled = [i for i, (a, f) in enumerate(zip(arrays, factors)) if needs_tiling(a.shape, f, pipeline.tile_size)]
    for i in tiled:  # (the tiles see other pixels than the whole image: predict them as the pipeline does)
        dets[i] = pipeline.predict(arrays[i])
    return losses, dets


MIN_TUNE_CELLS = 30
"""A fine-tuning run stores thresholds tuned on its own validation only when the validation
images used for the mAP hold at least this many ground-truth cells; with fewer, the grid's best
pair is noise (a fine-tune on 2 small images stored box_conf 0.95, which became the next
session's default) and the run keeps its --init-checkpoint's thresholds."""


def count_cells(gts) -> int:
    """Ground-truth cells in label images (ids > 0)."""
    return int(sum(len(np.unique(g)) - (1 if g.min() == 0 else 0) for g in gts if g is not None and g.size))


def choose_thresholds(detections, gts, tune: bool = True, base: Thresholds = DEFAULT_THRESHOLDS
                      ) -> tuple[float, Thresholds]:
    """Val mAP and the thresholds to store in the checkpoint.

    ``detections``: one ``napari_cellseg.inference.predictor.Detections`` per val image (run once);
    ``gts``: their ground-truth label images. ``tune`` picks the pair with the best mean mAP on
    ``napari_cellseg.inference.tuning``'s grid (ties: as ``tuning.sweep`` breaks them); otherwise ``base``
    (0.5/0.5, or the --init-checkpoint's). The mAP is then measured on the same Detections at
    that pair (``to_labels`` + metrics.average_precision).
    """
    from napari_cellseg.inference.metrics import average_precision

    detections, gts = list(detections), list(gts)
    thr = base
    if not detections:
        return 0.0, thr
    if tune:
        from napari_cellseg.inference.tuning import sweep

        best = sweep(zip(detections, gts), base=thr).best
        thr = thr.with_overrides(box_conf=best["box_conf"], mask_threshold=best["mask_threshold"])
    v_map = float(np.mean([average_precision(g, d.to_labels(thr)) for d, g in zip(detections, gts)]))
    return v_map, thr


# ---------------------------------------------------------------- figures
def _save(fig, path: Path) -> None:
    from napari_cellseg.io.atomic import atomic_write

    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)


def _overlay(ax, image, labels, title):
    from skimage.segmentation import find_boundaries

    ax.imshow(image)
    if labels is not None and labels.any():
        b = find_boundaries(labels, mode="inner")
        rgba = np.zeros((*labels.shape, 4), np.float32)
        rgba[b] = (1.0, 0.2, 0.2, 1.0)
        ax.imshow(rgba)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss")
    ax.plot(ep, [r["val_loss"] for r in history], "o-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [r["val_map"] for r in history], "s--", color="tab:green", label="val mAP")
    ax2.set_ylabel("val mAP")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_samples(items, path: Path, title: str = "") -> None:
    """items: list of (image HxWx3, labels HxW or None, caption)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(items), 1)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), squeeze=False)
    for ax, (img, lab, cap) in zip(axes[0], items):
        _overlay(ax, img, lab, cap)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def masks_to_labels(masks: np.ndarray) -> np.ndarray:
    """(N,H,W) instance masks -> label image (for showing augmented samples)."""
    if len(masks) == 0:
        return None
    ids = np.arange(1, len(masks) + 1, dtype=np.int32)[:, None, None]
    return (masks.astype(bool) * ids).max(axis=0)
