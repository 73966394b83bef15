"""The training run: ``TrainingRun`` (set-up, one epoch, validation, saving) and ``train``, which
runs it as a generator of progress events, over the epoch loops of :mod:`training.loops` and the
run state of :mod:`training.runstate`. Which settings a run uses (its effective config: given
flags, last.ckpt on --resume, the --init-checkpoint's architecture) is :mod:`training.settings`.

``train(config)`` yields dicts ``{"stage": "config"|"setup"|"train"|"val"|"epoch"|"warning"|"done", ...}``
(fields: docs/API.md, training) and returns a summary dict; the CLI drains it with tqdm, the napari
widget runs it in a thread worker and can stop between steps (closing the generator). Everything
written goes through atomic writes, so a kill at any moment leaves the previous complete files
(and the next run removes the unfinished temporary ones). Under ``torchrun`` (any world size, 1
too: ``--nproc_per_node=1`` runs the NCCL/gloo path on one device) it trains with
DistributedDataParallel; rank 0 alone validates, logs and saves.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from . import evaluate as ev
from .augment import test_pipeline, train_pipeline
from .config import TrainConfig
from .data import load_samples, normalize_size, split_samples
from .dataset import EpochSampler, InstanceDataset
from .loops import _Batches, _health_warning, _loader, _set_backbone_frozen, evaluate, resolve_amp, train_one_epoch
from .runstate import (LogRow, _cpu_copy, _Frozen, _with_logged_times, _write_config, _write_log, _Writer,
                       check_inputs_kept, check_out_not_data, check_same_split, prepare_output, read_resume,
                       resume_best, rng_state, save_failure, seed_everything, set_rng_state)
from .settings import ARCH_CHECKED, effective_config


def _no_resize(image, target=None):
    """Training/validation feed the network at the pipeline's size (crops stay at native scale)."""
    return image, target


def build_run_model(config: TrainConfig, device):
    """The network for ``config`` (already effective: see ``effective_config``) and the thresholds
    it starts from (the --init-checkpoint's, else the defaults). Backbone weights are fetched
    only for a run from scratch; a checkpoint load never downloads."""
    from napari_cellseg.model.checkpoint import load_checkpoint
    from napari_cellseg.model.maskrcnn import build_model
    from napari_cellseg.options import Thresholds

    from_ckpt = bool(config.init_checkpoint or config.resume)
    weights = None if from_ckpt or config.backbone_weights in (None, "", "random") else config.backbone_weights
    model = build_model(config.model, weights)
    if config.init_checkpoint and not config.resume:
        src, _, _, _ = load_checkpoint(config.init_checkpoint, config=config.model)
        model.load_state_dict(src.state_dict())
    model.transform.resize = _no_resize
    return model.to(device)


def parent_thresholds(config: TrainConfig):
    """The --init-checkpoint's stored thresholds (the defaults without one, or when it cannot be
    read any more on a --resume): what a fine-tune keeps when its validation is too small."""
    from napari_cellseg.model.checkpoint import CheckpointError, read_checkpoint, validate_checkpoint
    from napari_cellseg.options import DEFAULT_THRESHOLDS, Thresholds

    if not config.init_checkpoint:
        return DEFAULT_THRESHOLDS
    try:
        path = config.init_checkpoint
        stored = validate_checkpoint(path, read_checkpoint(path), config.model)[2]
    except (CheckpointError, OSError):
        return DEFAULT_THRESHOLDS
    return DEFAULT_THRESHOLDS.with_overrides(**{k: stored[k] for k in ("box_conf", "mask_threshold")})


class TrainingRun:
    """One training run. ``run()`` is the generator ``train`` returns; the steps are
    ``setup`` (devices, model, data, optimizer, the resumed state), ``epoch`` (train, then
    ``validate`` and ``save`` on rank 0) and the summary. Works on the effective copy of the
    caller's config (``effective_config``); the caller's object is never changed."""

    def __init__(self, config: TrainConfig, samples=None, given=None):
        self.requested, self.samples, self.given = config, samples, given
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        # launched by torchrun (TORCHELASTIC_RUN_ID), even as one process: a process group and DDP
        self.ddp = self.world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
        self.history: list[dict] = []
        self.start, self.best, self.total_steps = 1, None, 0
        self.writer = _Writer()

    # ------------------------------------------------------------ set-up
    def _device(self):
        import torch
        import torch.distributed as dist
        from napari_cellseg.model.devices import ddp_backend, resolve_device

        if not self.ddp:
            return resolve_device(self.config.device)
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = resolve_device(self.config.device, local)
        if device.type == "cuda" and device.index is None:  # --device cuda under torchrun: this rank's GPU
            device = torch.device(f"cuda:{local % torch.cuda.device_count()}")
        if not dist.is_initialized():
            dist.init_process_group(ddp_backend(device))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def setup(self):
        """Generator: the effective config, devices, model, data, optimizer and resumed state."""
        changes: list[str] = []
        config = self.config = effective_config(self.requested, self.given, changes)
        self.out = out = Path(config.out)
        check_out_not_data(out, config)
        if not config.resume:  # fine-tuning in the model's own folder would overwrite it with epoch 1's
            check_inputs_kept(out, [config.init_checkpoint, config.backbone_weights
                                    if config.backbone_weights not in ("imagenet", "random") else None])
        removed = prepare_output(out, True) if config.resume and self.rank == 0 else []
        self.resume_obj = read_resume(out / "last.ckpt") if config.resume else None
        self.device = self._device()
        self.amp = resolve_amp(config.amp, self.device)
        seed_everything(config.seed + self.rank)
        yield {"stage": "config", "config": config.to_dict(), "amp": self.amp, "device": str(self.device)}
        for message in changes:
            yield {"stage": "setup", "message": message}
        # the backbone weights (an ImageNet download) come first: offline, stop before any work
        yield {"stage": "setup", "message": f"building {config.model.backbone} on {self.device} (amp {self.amp})"}
        self.model = build_run_model(config, self.device)
        self.parent_thresholds = parent_thresholds(config)
        yield {"stage": "setup", "message": "loading data"}
        yield from self._data()
        if self.rank == 0 and not config.resume:
            removed = prepare_output(out, False)
        if removed:
            yield {"stage": "setup", "message": f"removed {len(removed)} unfinished file(s) an interrupted save "
                                                f"left in {out}: {', '.join(removed)}"}
        if self.rank == 0:
            _write_config(config, out / "config.json")
        self._optimizer()
        if self.resume_obj is not None:
            self._restore(self.resume_obj)
        self._loaders()
        yield {"stage": "setup", "message": f"{len(self.train_s)} train / {len(self.val_s)} val images on "
                                            f"{self.device}", "n_train": len(self.train_s),
               "n_val": len(self.val_s), "start_epoch": self.start}

    def _data(self):
        config = self.config
        notes: list[str] = []  # one-line data warnings (e.g. label files without an image)
        samples = self.samples if self.samples is not None else load_samples(config, warn=notes.append)
        for message in notes:
            yield {"stage": "warning", "message": message}
        train_s, val_s = split_samples(samples, config.val_fraction, config.seed)
        if config.model.diameter:
            train_s, val_s = (normalize_size(x, config.model.diameter) for x in (train_s, val_s))
        if self.resume_obj is not None:
            check_same_split(self.resume_obj, [s.image_id for s in val_s], self.out / "last.ckpt",
                             [s.image_id for s in train_s])
        self.train_s, self.val_s = train_s, val_s

    def _optimizer(self):
        import torch

        config = self.config
        self.optimizer = torch.optim.AdamW(list(self.model.parameters()), lr=config.lr,
                                           weight_decay=config.weight_decay,
                                           foreach=True)  # multi-tensor: ~5x faster step on CPU too
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def _restore(self, obj: dict) -> None:
        """The state of OUT/last.ckpt: weights, optimizer, scheduler, scaler, log, best, RNG."""
        self.model.load_state_dict(obj["state_dict"])
        self.optimizer.load_state_dict(obj["optimizer"])
        self.scheduler.load_state_dict(obj["scheduler"])
        if obj.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(obj["scaler"])
        self.history = _with_logged_times(list(obj.get("history", [])), self.out / "log.csv")
        self.start = int(obj["epoch"]) + 1
        self.best = resume_best(obj, self.config.select_by)
        self.total_steps = sum(int(r.get("optimizer_steps", 1) or 0) for r in self.history)

    def _loaders(self) -> None:
        """The training loader (its sampler: every training image over the epochs), the
        validation set and its ground truth, the figures folder; DDP wraps the model here."""
        import torch.distributed as dist

        config, world, rank = self.config, self.world, self.rank
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             find_unused_parameters=config.freeze_backbone_epochs > 0)
        length = config.steps_per_epoch * config.batch_size * world if config.steps_per_epoch else None
        pipe = train_pipeline(config.width, config.height, config.crop_size, tuple(config.scale_range),
                              config.augment, seed=config.seed)
        self.train_ds = InstanceDataset(self.train_s, pipe, length, seed=config.seed + 7919 * rank)
        val_pipe = test_pipeline(0, 0) if config.crop_size else test_pipeline(config.width, config.height)
        self.val_ds = val_ds = InstanceDataset(self.val_s, val_pipe)
        self.sampler = EpochSampler(len(self.train_ds), config.seed, True, world, rank, n_samples=len(self.train_s))
        self.loader = _loader(self.train_ds, config, self.sampler, self.device)
        gts = [ev.masks_to_labels(val_ds.raw(i)[1][0]) for i in range(len(val_ds))]
        self.gts = [g if g is not None else np.zeros(val_ds.raw(i)[0].shape[:2], np.int32) for i, g in enumerate(gts)]
        n_map = min(config.max_val_images or len(self.gts), len(self.gts))
        self.val_cells = ev.count_cells(self.gts[:n_map])
        self.fig_dir = self.out / "figures"
        self.info_base = {
            "n_train": len(self.train_s), "n_val": len(self.val_s),
            "train_ids": [s.image_id for s in self.train_s][:2000], "val_ids": [s.image_id for s in self.val_s],
            "train_config": config.to_dict(), "amp": self.amp, "world_size": world,
            "ddp_backend": dist.get_backend() if self.ddp else None, "device": str(self.device),
            "input_scale": "native (the model does not resize in training)", "val_cells": self.val_cells,
            "code": self._code()}  # package version + git commit: which code trained the model

    @staticmethod
    def _code() -> dict:
        from napari_cellseg.model.checkpoint import code_version

        return code_version()

    def _first_figures(self):
        config = self.config
        if self.rank == 0 and config.figures:
            self.fig_dir.mkdir(exist_ok=True)
        if self.rank == 0 and config.figures and self.start == 1:
            shown = [self.train_ds.raw((0, i)) for i in range(min(4, len(self.train_s)))]
            ev.plot_samples([(im, ev.masks_to_labels(m[0]), f"{len(m[0])} cells") for im, m in shown],
                            self.fig_dir / "train_samples.png", "augmented training samples")

    def _restore_rng(self) -> None:
        rng = self.resume_obj.get("rng") if self.resume_obj is not None else None
        if isinstance(rng, list):  # one state per rank (DDP); another world size starts this rank fresh
            rng = rng[self.rank] if self.rank < len(rng) else None
        if rng:
            set_rng_state(rng)

    # ------------------------------------------------------------ validation
    def tuned(self) -> bool:
        """Whether this run's validation may choose the thresholds it stores: a fine-tune needs
        at least MIN_TUNE_CELLS ground-truth cells, else it keeps its parent's."""
        return self.config.tune_thresholds and (not self.config.init_checkpoint
                                                or self.val_cells >= ev.MIN_TUNE_CELLS)

    def validate(self, epoch: int):
        """Generator (rank 0): returns (val loss, val mask loss, mAP, thresholds, detections, seconds)."""
        t0 = time.perf_counter()
        v_loss, v_mask, dets = yield from evaluate(self.model, self.val_ds, self.device, epoch, self.config, self.gts)
        v_map, thr = ev.choose_thresholds(dets, self.gts[:len(dets)], self.tuned(), base=self.parent_thresholds)
        return v_loss, v_mask, v_map, thr, dets, time.perf_counter() - t0

    def _starting_model(self):
        """Epoch 0: the --init-checkpoint model, validated for comparison (a new fine-tune only)."""
        if self.rank != 0 or not self.config.init_checkpoint or self.start != 1:
            return
        if self.config.tune_thresholds and not self.tuned():
            thr = self.parent_thresholds
            yield {"stage": "warning", "message": f"the validation images hold {self.val_cells} cells (fewer than "
                                                  f"{ev.MIN_TUNE_CELLS}): the model keeps the --init-checkpoint's "
                                                  f"thresholds (box_conf {thr.box_conf}, mask_threshold "
                                                  f"{thr.mask_threshold}) instead of tuning them on so few"}
        v_loss, v_mask, v_map, thr, _, val_s = yield from self.validate(0)
        row = LogRow(0, float("nan"), float("nan"), v_loss, v_mask, v_map, thr.box_conf, thr.mask_threshold,
                     self.optimizer.param_groups[0]["lr"], amp=self.amp, val_s=round(val_s, 3),
                     time_s=round(val_s, 2))
        yield {"stage": "epoch", "epoch": 0, "epochs": self.config.epochs, "row": row.as_dict()}

    # ------------------------------------------------------------ one epoch
    def _train(self, epoch: int, batches):
        """Generator: one epoch of training; returns (its result, the next epoch's started loader)."""
        import torch
        import torch.distributed as dist

        config = self.config
        _set_backbone_frozen(self.model, epoch <= config.freeze_backbone_epochs)
        if batches is None:
            self.sampler.set_epoch(epoch)
            batches = iter(self.loader)
        r = yield from train_one_epoch(self.model, _Batches(batches, len(self.loader)), self.optimizer, self.scaler,
                                       self.device, epoch, config, self.amp, self.world)
        batches = None
        if config.workers and epoch < config.epochs:  # the workers load the next epoch's first batches
            self.sampler.set_epoch(epoch + 1)         # while this one validates and saves
            batches = iter(self.loader)
        if self.ddp:  # train loss: the mean over ranks (each rank's mean is already over all ranks)
            t = torch.tensor([r["train_loss"], r["train_mask_loss"]], dtype=torch.float64)
            dist.all_reduce(t)
            r["train_loss"], r["train_mask_loss"] = float(t[0]) / self.world, float(t[1]) / self.world
        self.total_steps += r["optimizer_steps"]
        return r, batches

    def epoch(self, epoch: int, batches):
        """Generator: train, validate and save one epoch; returns the next epoch's loader iterator."""
        import torch.distributed as dist

        t_epoch = time.perf_counter()
        r, batches = yield from self._train(epoch, batches)
        warning = _health_warning(epoch, r, self.amp)
        row = dets = thr = None
        if self.rank == 0:
            v_loss, v_mask, v_map, thr, dets, val_s = yield from self.validate(epoch)
            metric = v_loss if self.config.select_by == "loss" else -v_map
            is_best = math.isfinite(metric) and (self.best is None or metric < self.best) and r["optimizer_steps"] > 0
            if is_best:
                self.best = metric
            row = LogRow(epoch, r["train_loss"], r["train_mask_loss"], v_loss, v_mask, v_map, thr.box_conf,
                         thr.mask_threshold, self.optimizer.param_groups[0]["lr"], r["steps"],
                         r["optimizer_steps"], r["skipped_batches"], r["scaler_skipped"], self.amp,
                         r["loader_start_s"], r["train_s"], round(val_s, 3), best=int(is_best))
        sched_val = [row.val_loss if row else 0.0]
        if self.ddp:
            dist.broadcast_object_list(sched_val, src=0)
        if math.isfinite(sched_val[0]):
            self.scheduler.step(sched_val[0])
        rngs = [None] * self.world  # after validation (it draws proposals), so a resumed run goes on identically
        if self.ddp:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.rank == 0:
            try:
                self.save(epoch, row, thr, dets, rngs, t_epoch)
            except OSError as exc:  # log.csv, loss.png, a figure: a full disk
                raise save_failure(getattr(exc, "filename", None) or self.out, exc) from None
            if warning:
                yield {"stage": "warning", "epoch": epoch, "message": warning}
            yield {"stage": "epoch", "epoch": epoch, "epochs": self.config.epochs, "row": row.as_dict()}
        if self.ddp:
            dist.barrier()
        return batches

    def save(self, epoch: int, row: LogRow, thr, dets, rngs, t_epoch: float) -> None:
        """Rank 0: best_model.bin (when best) and last.ckpt in the background writer, then
        figures and log.csv."""
        config, out = self.config, self.out
        t_save = time.perf_counter()
        info = {**self.info_base, "epoch": epoch, "val_loss": row.val_loss, "val_map": row.val_map}
        net = getattr(self.model, "module", self.model)
        snapshot = _Frozen({k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()})
        jobs = []
        if row.best:
            jobs.append((out / "best_model.bin", dict(model=snapshot, config=config.model, thresholds=thr, info=info)))
        row.save_s = round(time.perf_counter() - t_save, 3)  # final values below; these go into last.ckpt
        row.time_s = round(time.perf_counter() - t_epoch, 2)
        self.history.append(row.as_dict())
        extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": epoch, "history": self.history, "best": self.best,
                 "best_by": config.select_by, ARCH_CHECKED: True, "rng": rngs if self.world > 1 else rngs[0],
                 "sampler": {"seed": config.seed, "next_epoch": epoch + 1, "offset": 0},
                 "train_config": config.to_dict()}
        jobs.append((out / "last.ckpt", dict(model=snapshot, config=config.model, info=info, extra=_cpu_copy(extra),
                                             thresholds={"box_conf": row.box_conf,
                                                         "mask_threshold": row.mask_threshold})))
        self.writer.submit(jobs)  # written while the next epoch trains
        if config.figures:
            ev.plot_loss(self.history, out / "loss.png")
            self._val_figure(dets, thr, self.fig_dir / f"val_epoch{epoch:03d}.png", epoch)
        row.save_s = round(time.perf_counter() - t_save, 3)
        row.time_s = round(time.perf_counter() - t_epoch, 2)
        self.history[-1] = row.as_dict()
        _write_log(self.history, out / "log.csv")

    def _val_figure(self, dets, thresholds, path, epoch):
        items = []
        for i, d in enumerate(dets[:2]):
            image, _ = self.val_ds.raw(i)
            lab = d.to_labels(thresholds.box_conf, thresholds.mask_threshold)
            items.append((image, lab, f"{self.val_ds.samples[i].image_id}: {int(lab.max())} cells"))
        ev.plot_samples(items, path, f"validation, epoch {epoch}")

    # ------------------------------------------------------------ the whole run
    def run(self):
        """Generator of the run's events; returns the summary (also the "done" event)."""
        yield from self.setup()
        self._first_figures()
        yield from self._starting_model()
        self._restore_rng()
        batches = None
        try:
            for epoch in range(self.start, self.config.epochs + 1):
                batches = yield from self.epoch(epoch, batches)
        finally:
            self.writer.wait(raise_errors=False)  # the files are complete, also when the run is cancelled
        self.writer.wait()
        if self.ddp:
            import torch.distributed as dist
            dist.destroy_process_group()
        healthy = self.total_steps > 0
        summary = {"out": str(self.out), "history": self.history, "best_model": str(self.out / "best_model.bin"),
                   "optimizer_steps": self.total_steps, "healthy": healthy}
        if not healthy and self.rank == 0:
            yield {"stage": "warning", "message": "the optimizer never stepped: the weights are the starting weights "
                                                  "(see skipped_batches / scaler_skipped in log.csv)"}
        yield {"stage": "done", **summary}
        return summary


def train(config: TrainConfig, samples=None, given=None):
    """Run a training (``TrainingRun``); ``samples`` (list of data.Sample) overrides the config's
    data source; ``given``: the fields the user set (``settings.effective_config``).

    Events (dicts, key "stage"): "config" (the effective config, once), "setup" (messages),
    "train" (per step), "val" (per val image), "epoch" (a ``LogRow`` as a dict; epoch 0 = the
    starting model when fine-tuning from --init-checkpoint), "warning" (one line), "done"."""
    return (yield from TrainingRun(config, samples, given).run())
