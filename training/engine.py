"""The training run as a generator of progress events: ``train`` (set-up, the epochs, resume,
saving) over the epoch loops of :mod:`training.loops` and the run state of
:mod:`training.runstate`; also the run's model (``_build``). Which settings a run uses (its
effective config: given flags, last.ckpt on --resume, the --init-checkpoint's architecture) is
:mod:`training.settings`.

``train(config)`` yields dicts ``{"stage": "config"|"setup"|"train"|"val"|"epoch"|"warning"|"done", ...}``
(fields: docs/API.md, training) and returns a summary dict; the CLI drains it with tqdm, the napari widget runs it in a thread worker and can
stop between steps (closing the generator). Everything written goes through atomic writes, so a
kill at any moment leaves the previous complete files. Under ``torchrun`` (any world size, 1 too:
``--nproc_per_node=1`` runs the NCCL/gloo path on one device) it trains with DistributedDataParallel;
rank 0 alone validates, logs and saves.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .data import load_samples, normalize_size, split_samples
from .dataset import EpochSampler, InstanceDataset
from .augment import test_pipeline, train_pipeline
from . import evaluate as ev
# the run's state (files, RNG, resume, checkpoint writer) and the epoch loops live in their own
# modules; their public names stay importable from here
from .runstate import (LOG_FIELDS, RESUME_KEYS, TIMING_FIELDS, OutputError, _cpu_copy, _Frozen,  # noqa: F401
                       _with_logged_times, _write_config, _write_log, _Writer, prepare_output, read_resume,
                       resume_best, rng_state, seed_everything, set_rng_state, check_inputs_kept,
                       check_same_split)
from .settings import ARCH_CHECKED, effective_config
from .loops import (AMP_DTYPES, _Batches, _health_warning, _loader, _set_backbone_frozen,  # noqa: F401
                    _worker_init, evaluate, resolve_amp, train_one_epoch)


def _no_resize(image, target=None):
    """Training/validation feed the network at the pipeline's size (crops stay at native scale)."""
    return image, target


def _build(config: TrainConfig, device):
    """The network for ``config`` (already effective: see ``effective_config``). Backbone weights
    are fetched only for a run from scratch; a checkpoint load never downloads."""
    from napari_cellseg.model.checkpoint import load_checkpoint
    from napari_cellseg.model.maskrcnn import build_model

    from_ckpt = bool(config.init_checkpoint or config.resume)
    weights = None if from_ckpt or config.backbone_weights in (None, "", "random") else config.backbone_weights
    model = build_model(config.model, weights)
    if config.init_checkpoint and not config.resume:
        src, _, _, _ = load_checkpoint(config.init_checkpoint, config=config.model)
        model.load_state_dict(src.state_dict())
    model.transform.resize = _no_resize
    return model.to(device)


def _val_figure(dataset, dets, thresholds, path, epoch):
    items = []
    for i, d in enumerate(dets[:2]):
        image, _ = dataset.raw(i)
        lab = d.to_labels(thresholds["box_conf"], thresholds["mask_threshold"])
        items.append((image, lab, f"{dataset.samples[i].image_id}: {int(lab.max())} cells"))
    ev.plot_samples(items, path, f"validation, epoch {epoch}")


def train(config: TrainConfig, samples=None, given=None):
    """Run a training; ``samples`` (list of data.Sample) overrides the config's data source.

    Works on a copy of ``config`` (``effective_config(config, given)``; ``given``: the fields the
    user set, see there); the caller's object is never changed.
    Events (dicts, key "stage"): "config" (the effective config, once), "setup" (messages),
    "train" (per step), "val" (per val image), "epoch" (a log row; epoch 0 = the starting
    model when fine-tuning from --init-checkpoint), "warning" (one line), "done"."""
    import torch
    import torch.distributed as dist
    from napari_cellseg.model.checkpoint import code_version
    from napari_cellseg.model.devices import ddp_backend, resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # launched by torchrun (TORCHELASTIC_RUN_ID), even as one process: a process group and DDP
    ddp = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    changes: list[str] = []
    config = effective_config(config, given, changes)
    out = Path(config.out)
    if not config.resume:  # fine-tuning in the model's own folder would overwrite it with epoch 1's
        check_inputs_kept(out, [config.init_checkpoint, config.backbone_weights
                                if config.backbone_weights not in ("imagenet", "random") else None])
    if config.resume and rank == 0:
        prepare_output(out, True)  # one line when OUT/last.ckpt is missing
    resume_obj = read_resume(out / "last.ckpt") if config.resume else None
    if ddp:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = resolve_device(config.device, local)
        if device.type == "cuda" and device.index is None:  # --device cuda under torchrun: this rank's GPU
            device = torch.device(f"cuda:{local % torch.cuda.device_count()}")
        if not dist.is_initialized():
            dist.init_process_group(ddp_backend(device))
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        device = resolve_device(config.device)
    amp = resolve_amp(config.amp, device)
    seed_everything(config.seed + rank)
    yield {"stage": "config", "config": config.to_dict(), "amp": amp, "device": str(device)}
    for message in changes:
        yield {"stage": "setup", "message": message}
    # the backbone weights (an ImageNet download) come first: offline, stop before any work
    yield {"stage": "setup", "message": f"building {config.model.backbone} on {device} (amp {amp})"}
    model = _build(config, device)
    yield {"stage": "setup", "message": "loading data"}
    notes: list[str] = []  # one-line data warnings (e.g. label files without an image)
    samples = samples if samples is not None else load_samples(config, warn=notes.append)
    for message in notes:
        yield {"stage": "warning", "message": message}
    train_s, val_s = split_samples(samples, config.val_fraction, config.seed)
    if config.model.diameter:
        train_s, val_s = (normalize_size(x, config.model.diameter) for x in (train_s, val_s))
    if resume_obj is not None:
        check_same_split(resume_obj, [s.image_id for s in val_s], out / "last.ckpt", [s.image_id for s in train_s])
    if rank == 0 and not config.resume:
        prepare_output(out, False)
    if rank == 0:
        _write_config(config, out / "config.json")
    if resume_obj is not None:
        model.load_state_dict(resume_obj["state_dict"])
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  foreach=True)  # multi-tensor: ~5x faster step on CPU too
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    history, start, best = [], 1, None
    if resume_obj is not None:
        optimizer.load_state_dict(resume_obj["optimizer"])
        scheduler.load_state_dict(resume_obj["scheduler"])
        if resume_obj.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(resume_obj["scaler"])
        history = _with_logged_times(list(resume_obj.get("history", [])), out / "log.csv")
        start = int(resume_obj["epoch"]) + 1
        best = resume_best(resume_obj, config.select_by)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=config.freeze_backbone_epochs > 0)
    length = config.steps_per_epoch * config.batch_size * world if config.steps_per_epoch else None
    pipe = train_pipeline(config.width, config.height, config.crop_size, tuple(config.scale_range),
                          config.augment, seed=config.seed)
    train_ds = InstanceDataset(train_s, pipe, length, seed=config.seed + 7919 * rank)
    val_pipe = test_pipeline(0, 0) if config.crop_size else test_pipeline(config.width, config.height)
    val_ds = InstanceDataset(val_s, val_pipe)
    sampler = EpochSampler(len(train_ds), config.seed, True, world, rank, n_samples=len(train_s))
    loader = _loader(train_ds, config, sampler, device)
    gts = [ev.masks_to_labels(val_ds.raw(i)[1][0]) for i in range(len(val_ds))]
    gts = [g if g is not None else np.zeros(val_ds.raw(i)[0].shape[:2], np.int32) for i, g in enumerate(gts)]
    fig_dir = out / "figures"
    if rank == 0 and config.figures:
        fig_dir.mkdir(exist_ok=True)
    if rank == 0 and config.figures and start == 1:
        shown = [train_ds.raw((0, i)) for i in range(min(4, len(train_s)))]
        ev.plot_samples([(im, ev.masks_to_labels(m[0]), f"{len(m[0])} cells") for im, m in shown],
                        fig_dir / "train_samples.png", "augmented training samples")
    info_base = {"n_train": len(train_s), "n_val": len(val_s), "train_ids": [s.image_id for s in train_s][:2000],
                 "val_ids": [s.image_id for s in val_s], "train_config": config.to_dict(), "amp": amp,
                 "world_size": world, "ddp_backend": dist.get_backend() if ddp else None, "device": str(device), "input_scale": "native (the model does not resize in training)",
                 "code": code_version()}  # package version + git commit: which code trained the model
    yield {"stage": "setup", "message": f"{len(train_s)} train / {len(val_s)} val images on {device}",
           "n_train": len(train_s), "n_val": len(val_s), "start_epoch": start}
    if rank == 0 and config.init_checkpoint and start == 1:  # the starting model, for comparison
        t0 = time.perf_counter()
        v_loss, v_mask, dets = yield from evaluate(model, val_ds, device, 0, config, gts)
        v_map, thr = ev.choose_thresholds(dets, gts[:len(dets)], config.tune_thresholds)
        yield {"stage": "epoch", "epoch": 0, "epochs": config.epochs,
               "row": {**{k: float("nan") for k in ("train_loss", "train_mask_loss")},
                       "epoch": 0, "val_loss": v_loss, "val_mask_loss": v_mask, "val_map": v_map,
                       "box_conf": thr["box_conf"], "mask_threshold": thr["mask_threshold"],
                       "lr": optimizer.param_groups[0]["lr"], "steps": 0, "optimizer_steps": 0,
                       "skipped_batches": 0, "scaler_skipped": 0, "amp": amp, "loader_start_s": 0.0,
                       "train_s": 0.0, "val_s": round(time.perf_counter() - t0, 3), "save_s": 0.0,
                       "time_s": round(time.perf_counter() - t0, 2), "best": 0}}
    rng = resume_obj.get("rng") if resume_obj is not None else None
    if isinstance(rng, list):  # one state per rank (DDP); another world size starts this rank fresh
        rng = rng[rank] if rank < len(rng) else None
    if rng:
        set_rng_state(rng)
    total_steps = sum(int(r.get("optimizer_steps", 1) or 0) for r in history)
    batches = None
    writer = _Writer()
    try:
        for epoch in range(start, config.epochs + 1):
            t_epoch = time.perf_counter()
            _set_backbone_frozen(model, epoch <= config.freeze_backbone_epochs)
            if batches is None:
                sampler.set_epoch(epoch)
                batches = iter(loader)
            r = yield from train_one_epoch(model, _Batches(batches, len(loader)), optimizer, scaler, device, epoch,
                                           config, amp, world)
            batches = None
            if config.workers and epoch < config.epochs:  # the workers load the next epoch's first batches
                sampler.set_epoch(epoch + 1)               # while this one validates and saves
                batches = iter(loader)
            if ddp:  # train loss: the mean over ranks (each rank's mean is already over all ranks)
                t = torch.tensor([r["train_loss"], r["train_mask_loss"]], dtype=torch.float64)
                dist.all_reduce(t)
                r["train_loss"], r["train_mask_loss"] = float(t[0]) / world, float(t[1]) / world
            total_steps += r["optimizer_steps"]
            warning = _health_warning(epoch, r, amp)
            row = None
            if rank == 0:
                t_val = time.perf_counter()
                v_loss, v_mask, dets = yield from evaluate(model, val_ds, device, epoch, config, gts)
                v_map, thr = ev.choose_thresholds(dets, gts[:len(dets)], config.tune_thresholds)
                val_s = time.perf_counter() - t_val
                metric = v_loss if config.select_by == "loss" else -v_map
                is_best = math.isfinite(metric) and (best is None or metric < best) and r["optimizer_steps"] > 0
                row = {"epoch": epoch, "train_loss": r["train_loss"], "train_mask_loss": r["train_mask_loss"],
                       "val_loss": v_loss, "val_mask_loss": v_mask, "val_map": v_map, "box_conf": thr["box_conf"],
                       "mask_threshold": thr["mask_threshold"], "lr": optimizer.param_groups[0]["lr"],
                       "steps": r["steps"], "optimizer_steps": r["optimizer_steps"],
                       "skipped_batches": r["skipped_batches"], "scaler_skipped": r["scaler_skipped"],
                       "amp": amp, "loader_start_s": r["loader_start_s"], "train_s": r["train_s"],
                       "val_s": round(val_s, 3), "save_s": 0.0, "time_s": 0.0, "best": int(is_best)}
                history.append(row)
                t_save = time.perf_counter()
                info = {**info_base, "epoch": epoch, "val_loss": v_loss, "val_map": v_map}
                net = getattr(model, "module", model)
                snapshot = _Frozen({k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()})
                jobs = []
                if is_best:
                    best = metric
                    jobs.append((out / "best_model.bin", dict(model=snapshot, config=config.model, thresholds=thr,
                                                              info=info)))
            sched_val = [row["val_loss"] if row else 0.0]
            if ddp:
                dist.broadcast_object_list(sched_val, src=0)
            if math.isfinite(sched_val[0]):
                scheduler.step(sched_val[0])
            rngs = [None] * world  # after validation (it draws proposals), so a resumed run goes on identically
            if ddp:
                dist.all_gather_object(rngs, rng_state())
            else:
                rngs = [rng_state()]
            if rank == 0:
                row["save_s"] = round(time.perf_counter() - t_save, 3)  # final values below; these go into last.ckpt
                row["time_s"] = round(time.perf_counter() - t_epoch, 2)
                extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "history": history, "best": best,
                         "best_by": config.select_by, ARCH_CHECKED: True,
                         "rng": rngs if world > 1 else rngs[0],
                         "sampler": {"seed": config.seed, "next_epoch": epoch + 1, "offset": 0},
                         "train_config": config.to_dict()}
                jobs.append((out / "last.ckpt", dict(model=snapshot, config=config.model, info=info, extra=_cpu_copy(extra),
                                                     thresholds={k: row[k] for k in ("box_conf", "mask_threshold")})))
                writer.submit(jobs)  # written while the next epoch trains
                if config.figures:
                    ev.plot_loss(history, out / "loss.png")
                    _val_figure(val_ds, dets, thr, fig_dir / f"val_epoch{epoch:03d}.png", epoch)
                row["save_s"] = round(time.perf_counter() - t_save, 3)
                row["time_s"] = round(time.perf_counter() - t_epoch, 2)
                _write_log(history, out / "log.csv")
                if warning:
                    yield {"stage": "warning", "epoch": epoch, "message": warning}
                yield {"stage": "epoch", "epoch": epoch, "epochs": config.epochs, "row": row}
            if ddp:
                dist.barrier()
    finally:
        writer.wait(raise_errors=False)  # the files are complete, also when the run is cancelled
    writer.wait()
    if ddp:
        dist.destroy_process_group()
    healthy = total_steps > 0
    summary = {"out": str(out), "history": history, "best_model": str(out / "best_model.bin"),
               "optimizer_steps": total_steps, "healthy": healthy}
    if not healthy and rank == 0:
        yield {"stage": "warning", "message": "the optimizer never stepped: the weights are the starting weights "
                                              "(see skipped_batches / scaler_skipped in log.csv)"}
    yield {"stage": "done", **summary}
    return summary
