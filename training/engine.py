"""The training loop as a generator of progress events.

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
import random
import time
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .config import ConfigError
from .data import (DataError, EpochSampler, InstanceDataset, collate, expand_masks, load_samples,
                   normalize_size, split_samples)
from .augment import test_pipeline, train_pipeline
from . import evaluate as ev

LOG_FIELDS = ["epoch", "train_loss", "train_mask_loss", "val_loss", "val_mask_loss", "val_map",
              "box_conf", "mask_threshold", "lr", "steps", "optimizer_steps", "skipped_batches",
              "scaler_skipped", "amp", "loader_start_s", "train_s", "val_s", "save_s", "time_s", "best"]
"""log.csv columns. skipped_batches: steps with a non-finite loss or gradient (on any rank);
scaler_skipped: steps the fp16 GradScaler skipped (inf gradients at its scale); the weights
moved on optimizer_steps of steps. loader_start_s: wait for the first batch (worker start-up on
epoch 1); train_s / val_s / save_s (checkpoints, log, figures) / time_s: seconds."""


class OutputError(ValueError):
    """The output folder cannot be used."""


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _worker_init(worker_id: int) -> None:
    import torch

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    info = torch.utils.data.get_worker_info()
    pipe = getattr(info.dataset, "pipeline", None)
    if pipe is not None and hasattr(pipe, "set_random_seed"):
        pipe.set_random_seed(s)


def _no_resize(image, target=None):
    """Training/validation feed the network at the pipeline's size (crops stay at native scale)."""
    return image, target


def prepare_output(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None
    if not resume and (out / "last.ckpt").exists():
        raise OutputError(f"{out}: already holds a run (last.ckpt); pass --resume to continue it or choose another --out")
    if resume and not (out / "last.ckpt").is_file():
        raise OutputError(f"{out}: --resume needs {out / 'last.ckpt'}, which does not exist")


TIMING_FIELDS = ("loader_start_s", "train_s", "val_s", "save_s", "time_s")


def _with_logged_times(history: list[dict], path: Path) -> list[dict]:
    """last.ckpt is written before its epoch's timings are final: take them from log.csv."""
    import csv

    try:
        with open(path, newline="") as fh:
            logged = {r.get("epoch"): r for r in csv.DictReader(fh)}
    except OSError:
        return history
    out = []
    for row in history:
        got = logged.get(str(row.get("epoch")), {})
        out.append({**row, **{k: float(got[k]) for k in TIMING_FIELDS if got.get(k) not in (None, "")}})
    return out


def _write_log(history: list[dict], path: Path) -> None:
    import csv
    from napari_cellseg.atomic import atomic_write

    with atomic_write(path) as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in LOG_FIELDS})


def resolve_amp(mode: str, device) -> str:
    """``--amp`` -> the precision a run uses: "off", "bf16" or "fp16". auto: bf16 autocast (no
    scaler) on GPUs with bfloat16, fp16 + GradScaler on older GPUs, off elsewhere (CPU)."""
    from napari_cellseg.devices import cuda_has_bf16

    if mode in (True, False):  # configs saved before --amp took a mode
        mode = "auto" if mode else "off"
    if mode == "auto":
        if device.type != "cuda":
            return "off"
        return "bf16" if cuda_has_bf16(device) else "fp16"
    if mode == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise ConfigError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16 or --amp auto")
    return mode


def _checkpoint_config(path) -> dict:
    from napari_cellseg.checkpoint import read_checkpoint

    obj = read_checkpoint(path)
    return obj.get("config", {}) if isinstance(obj, dict) else {}


def _build(config: TrainConfig, device):
    """The network for ``config`` (already effective: see ``effective_config``). Backbone weights
    are fetched only for a run from scratch; a checkpoint load never downloads."""
    from napari_cellseg.checkpoint import load_checkpoint
    from napari_cellseg.model import build_model

    from_ckpt = bool(config.init_checkpoint or config.resume)
    weights = None if from_ckpt or config.backbone_weights in (None, "", "random") else config.backbone_weights
    model = build_model(config.model, weights)
    if config.init_checkpoint and not config.resume:
        src, _, _, _ = load_checkpoint(config.init_checkpoint, config=config.model)
        model.load_state_dict(src.state_dict())
    model.transform.resize = _no_resize
    return model.to(device)


def effective_config(config: TrainConfig) -> TrainConfig:
    """A validated COPY of ``config`` with what the run derives filled in (the caller's object is
    never changed): native_scale when training at native size; on --resume the model config of
    OUT/last.ckpt; when fine-tuning the architecture of --init-checkpoint (and its diameter
    unless --diameter is given)."""
    import copy
    from napari_cellseg.model import ModelConfig

    cfg = copy.deepcopy(config).validate()
    native = bool(cfg.crop_size or not (cfg.width and cfg.height))
    last = Path(cfg.out) / "last.ckpt"
    if cfg.resume and last.is_file():  # a resumed run goes on with the model it started with
        cfg.model = ModelConfig.from_dict(_checkpoint_config(last))
        cfg.init_checkpoint = None
    elif cfg.init_checkpoint:  # fine-tuning keeps the checkpoint's architecture
        src = _checkpoint_config(cfg.init_checkpoint)
        diameter = cfg.model.diameter or float(src.get("diameter") or 0.0)
        if src:
            cfg.model = ModelConfig.from_dict(src)
        cfg.model.native_scale = bool(cfg.model.native_scale or native)
        cfg.model.diameter = diameter
    elif native:  # the network is trained on native-scale pixels: predict must not rescale either
        cfg.model.native_scale = True
    return cfg


def _loader(ds, config, sampler, device):
    import torch
    from torch.utils.data import DataLoader

    workers = config.workers
    return DataLoader(ds, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, generator=torch.Generator().manual_seed(config.seed),
                      worker_init_fn=_worker_init if workers else None, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


class _Frozen:
    """A model's state_dict snapshot, for save_checkpoint (which calls ``.state_dict()``)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def _cpu_copy(obj):
    """Deep copy with every tensor copied to CPU: a snapshot the next steps cannot change."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class _Writer:
    """Writes an epoch's checkpoints (atomic files) in a background thread from CPU snapshots,
    so the next epoch starts at once; the previous batch of writes is awaited first, and at the
    end of the run (also when it is cancelled)."""

    def __init__(self):
        self.thread = None
        self.error = None

    def submit(self, jobs) -> None:
        import threading
        from napari_cellseg.checkpoint import save_checkpoint

        self.wait()

        def run():
            for path, kwargs in jobs:
                try:
                    save_checkpoint(path, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - reported by wait()
                    self.error = (path, exc)
                    return

        self.thread = threading.Thread(target=run, name="cellseg-checkpoint-writer")
        self.thread.start()

    def wait(self, raise_errors: bool = True) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error and raise_errors:
            (path, exc), self.error = self.error, None
            raise OutputError(f"{path}: could not write the checkpoint ({exc})")


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


AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


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
    """Generator: val loss (train-mode forward without gradients; ConvNeXt has no BatchNorm) and
    one ``Detections`` per val image (napari_cellseg.predict.Predictor: the same inference as
    the Segment widget) for the threshold sweep. Returns (loss, mask loss, detections)."""
    import torch

    net = getattr(model, "module", model)
    predictor = ev.val_predictor(net, config.model, device)
    total, mask_total, n, dets = 0.0, 0.0, 0, []
    n_map = len(dataset) if not config.max_val_images else min(config.max_val_images, len(dataset))
    try:
        for i in range(len(dataset)):
            image, target = dataset[i]
            target = expand_masks(target, device)
            with torch.no_grad():
                net.train()
                losses = net([image.to(device)], [target])
                loss = float(sum(losses.values()))
            if math.isfinite(loss):
                total += loss
                mask_total += float(losses.get("loss_mask", 0.0))
                n += 1
            if i < n_map:
                net.eval()
                dets.append(predictor.predict(image.permute(1, 2, 0).numpy()))
            yield {"stage": "val", "epoch": epoch, "step": i + 1, "total": len(dataset)}
    finally:
        net.train()
    return (total / n if n else float("nan")), (mask_total / n if n else float("nan")), dets


def rng_state() -> dict:
    """torch / numpy / python / CUDA RNG states as weights_only-safe values."""
    import torch

    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])[:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


RESUME_KEYS = ("optimizer", "scheduler", "epoch", "history", "state_dict")


def read_resume(path: Path) -> dict:
    """OUT/last.ckpt, checked for everything --resume needs (one clear line otherwise)."""
    from napari_cellseg.checkpoint import read_checkpoint

    obj = read_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in obj]
    if missing:
        raise OutputError(f"{path}: cannot resume, it has no {' / '.join(missing)} state (a model-only "
                          f"checkpoint?); start a new run with --init-checkpoint {path} instead")
    return obj


def _val_figure(dataset, dets, thresholds, path, epoch):
    items = []
    for i, d in enumerate(dets[:2]):
        image, _ = dataset.raw(i)
        lab = d.to_labels(thresholds["box_conf"], thresholds["mask_threshold"])
        items.append((image, lab, f"{dataset.samples[i].image_id}: {int(lab.max())} cells"))
    ev.plot_samples(items, path, f"validation, epoch {epoch}")


def _write_config(cfg: TrainConfig, path: Path) -> None:
    import json
    from napari_cellseg.atomic import atomic_write

    with atomic_write(path) as fh:
        json.dump(cfg.to_dict(), fh, indent=1)


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


def train(config: TrainConfig, samples=None):
    """Run a training; ``samples`` (list of data.Sample) overrides the config's data source.

    Works on a copy of ``config`` (``effective_config``); the caller's object is never changed.
    Events (dicts, key "stage"): "config" (the effective config, once), "setup" (messages),
    "train" (per step), "val" (per val image), "epoch" (a log row; epoch 0 = the starting
    model when fine-tuning from --init-checkpoint), "warning" (one line), "done"."""
    import torch
    import torch.distributed as dist
    from napari_cellseg.devices import ddp_backend, resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # launched by torchrun (TORCHELASTIC_RUN_ID), even as one process: a process group and DDP
    ddp = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    config = effective_config(config)
    out = Path(config.out)
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
    # the backbone weights (an ImageNet download) come first: offline, stop before any work
    yield {"stage": "setup", "message": f"building {config.model.backbone} on {device} (amp {amp})"}
    model = _build(config, device)
    yield {"stage": "setup", "message": "loading data"}
    samples = samples if samples is not None else load_samples(config)
    train_s, val_s = split_samples(samples, config.val_fraction, config.seed)
    if config.model.diameter:
        train_s, val_s = (normalize_size(x, config.model.diameter) for x in (train_s, val_s))
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
        best = resume_obj.get("best")
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
    sampler = EpochSampler(len(train_ds), config.seed, True, world, rank)
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
                 "world_size": world, "ddp_backend": dist.get_backend() if ddp else None, "device": str(device), "input_scale": "native (the model does not resize in training)"}
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
