"""The epoch loops: ``train_one_epoch`` (AMP, gradient clipping, the step/skip decision every
DDP rank takes together) and ``evaluate`` (val loss and Detections from one backbone forward per
image), plus what they need: the AMP mode (``resolve_amp``), the DataLoader (``_loader``, worker
seeding), the backbone freeze and the one-line health warning of an epoch that did not learn.
Generators of progress events, as ``engine.train``.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np

from .config import ConfigError
from .dataset import collate, expand_masks
from . import evaluate as ev

AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def resolve_amp(mode: str, device) -> str:
    """``--amp`` -> the precision a run uses: "off", "bf16" or "fp16"; auto: devices.auto_precision
    (bf16 autocast on GPUs with bfloat16, fp16 + GradScaler on older GPUs, off on CPU)."""
    from napari_cellseg.model.devices import amp_mode, auto_precision, cuda_has_bf16

    mode = amp_mode(mode)
    if mode == "auto":
        return auto_precision(device)
    if mode == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise ConfigError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16 or --amp auto")
    return mode


def _worker_init(worker_id: int) -> None:
    import torch

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    info = torch.utils.data.get_worker_info()
    pipe = getattr(info.dataset, "pipeline", None)
    if pipe is not None and hasattr(pipe, "set_random_seed"):
        pipe.set_random_seed(s)


def _loader(ds, config, sampler, device):
    import torch
    from torch.utils.data import DataLoader

    workers = config.workers
    return DataLoader(ds, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, generator=torch.Generator().manual_seed(config.seed),
                      worker_init_fn=_worker_init if workers else None, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


class _Batches:
    """One epoch of an already started DataLoader iterator (``len`` = batches)."""

    def __init__(self, it, n: int):
        self.it, self.n = it, n

    def __iter__(self):
        return self.it

    def __len__(self) -> int:
        return self.n


def _set_backbone_frozen(model, frozen: bool) -> None:
    for p in getattr(model, "module", model).backbone.body.parameters():
        p.requires_grad_(not frozen)


def train_one_epoch(model, loader, optimizer, scaler, device, epoch, config, amp="off", world=1):
    """Generator: yields a "train" event per step; returns a dict with the epoch's mean losses and
    step counts (steps, optimizer_steps, skipped_batches = non-finite losses or gradients,
    scaler_skipped = steps the fp16 GradScaler skipped because of inf gradients).

    Every rank decides to step or skip TOGETHER: the finite flag and the losses are summed
    across ranks (one all_reduce, as torchvision's reduce_dict) before any backward."""
    import torch
    import torch.distributed as dist

    model.train()
    params = [p for p in model.parameters()]
    dtype = getattr(torch, AMP_DTYPES[amp]) if amp != "off" else None
    total, mask_total, n, skipped, scaler_skipped, stepped = 0.0, 0.0, 0, 0, 0, 0
    steps = len(loader)
    t0 = time.perf_counter()
    t_first = None
    t_loaded = None
    for step, (images, targets) in enumerate(loader):
        if step == 0:
            t_loaded = time.perf_counter()  # the wait for the first batch: the loader's start-up cost
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [expand_masks(t, device) for t in targets]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        mask_loss = losses["loss_mask"].float() if "loss_mask" in losses else torch.zeros((), device=loss.device)
        stats = torch.stack([loss.detach(), mask_loss.detach()])
        finite = torch.isfinite(stats).all()
        agg = torch.cat([finite.float().reshape(1), torch.where(torch.isfinite(stats), stats, 0.0)]).double()
        if world > 1 or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(agg)  # one collective: [ranks with finite losses, sum loss, sum mask loss]
        agg = agg.tolist()
        all_finite = agg[0] == world
        optimizer.zero_grad(set_to_none=True)
        if all_finite:
            scaler.scale(loss).backward()
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                if scaler.get_scale() < before:
                    scaler_skipped += 1  # inf/NaN gradients at this scale: the scaler skipped the step
                else:
                    stepped += 1
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
                if torch.isfinite(norm):  # grads are all-reduced under DDP: every rank agrees
                    optimizer.step()
                    stepped += 1
                else:
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
            loss_value, mask_value = agg[1] / world, agg[2] / world
            total += loss_value
            mask_total += mask_value
            n += 1
        else:
            skipped += 1  # on every rank: nobody runs backward, so DDP's gradient all-reduce stays matched
            loss_value = float("nan")
        now = time.perf_counter()
        if step == 0:
            t_first = now
        ev = {"stage": "train", "epoch": epoch, "step": step + 1, "total": steps, "loss": loss_value,
              "skipped": skipped, "scaler_skipped": scaler_skipped, "optimizer_steps": stepped,
              "elapsed_s": round(now - t0, 3)}
        if step >= 1:  # per-step rate from the steps after the first (which includes loader start-up)
            ev["eta_epoch_s"] = round((t_first - t0) + (now - t_first) / step * (steps - 1), 3)
        yield ev
    return {"train_loss": total / n if n else float("nan"), "train_mask_loss": mask_total / n if n else float("nan"),
            "steps": steps, "optimizer_steps": stepped, "skipped_batches": skipped,
            "scaler_skipped": scaler_skipped, "train_s": round(time.perf_counter() - t0, 3),
            "loader_start_s": round((t_loaded or time.perf_counter()) - t0, 3)}


def evaluate(model, dataset, device, epoch, config, gts):
    """Generator: val loss (the heads in train mode without gradients; ConvNeXt has no BatchNorm)
    and one ``Detections`` per val image (the first ``max_val_images``; the same inference as the
    Segment widget's Predictor) for the threshold sweep, from ONE backbone forward per image
    (``evaluate.val_step``). Returns (loss, mask loss, detections)."""
    net = getattr(model, "module", model)
    pipeline = ev.val_predictor(net, config.model, device)
    total, mask_total, n, dets = 0.0, 0.0, 0, []
    n_map = len(dataset) if not config.max_val_images else min(config.max_val_images, len(dataset))
    try:
        for i in range(len(dataset)):
            image, target = dataset[i]
            losses, found = ev.val_step(pipeline, [image.permute(1, 2, 0).numpy()],
                                        [expand_masks(target, device)], detect=i < n_map)
            loss = float(sum(losses[0].values()))
            if math.isfinite(loss):
                total += loss
                mask_total += float(losses[0].get("loss_mask", 0.0))
                n += 1
            dets.extend(found or [])
            yield {"stage": "val", "epoch": epoch, "step": i + 1, "total": len(dataset)}
    finally:
        net.train()
    return (total / n if n else float("nan")), (mask_total / n if n else float("nan")), dets


def _health_warning(epoch: int, r: dict, amp: str) -> str | None:
    """One line when more than half of an epoch's steps did not update the weights."""
    idle = r["steps"] - r["optimizer_steps"]
    if r["steps"] == 0 or idle * 2 <= r["steps"]:
        return None
    why = []
    if r["skipped_batches"]:
        why.append(f"{r['skipped_batches']} non-finite loss/gradient")
    if r["scaler_skipped"]:
        why.append(f"{r['scaler_skipped']} skipped by the fp16 GradScaler (inf gradients)")
    todo = ("use --amp bf16 on a GPU that has it, or --amp off" if amp == "fp16" else
            "lower --lr, keep --grad-clip on, or check the data (empty/degenerate masks)")
    return (f"epoch {epoch}: {idle} of {r['steps']} steps did not update the weights ({', '.join(why)}); {todo}")
