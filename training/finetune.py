"""Fine-tune the current model on a few corrected images (the dataset review's "Train on
accepted"): the training engine (:func:`training.engine.train`) with a preset for a handful of
images, as cellpose 2.0's human-in-the-loop retraining.

The preset: start from the current model (``init_checkpoint``: its architecture, its object
size), native-scale random crops (``CROP``), short epochs of ``STEPS_PER_EPOCH`` steps, the best
epoch kept by validation mAP on held-out images (fewer than 4 images are cut into 2x2 tiles so
one tile can be held out), thresholds re-tuned on them when they hold at least
``evaluate.MIN_TUNE_CELLS`` cells (else the current model's are kept). ``minutes`` bounds the
wall time: the run stops between epochs when the next one would not fit (the files of the last
complete epoch stay).

Headless (numpy, torch through the engine); a generator of the engine's progress events that
returns a :class:`FinetuneResult`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import TrainConfig

__all__ = ["finetune", "FinetuneResult", "preset_config", "CROP", "STEPS_PER_EPOCH", "EPOCHS"]

CROP = 128  # native-scale crop side (px after size normalisation)
STEPS_PER_EPOCH = 10
EPOCHS = 12  # without a time budget: 120 steps
MAX_EPOCHS = 1000  # with a time budget, the budget decides
LR = 2e-4
BATCH = 2
VAL_FRACTION = 0.2


@dataclass
class FinetuneResult:
    """``checkpoint``: the new best model (``out_dir/best_model.bin``); ``val_map_before`` /
    ``val_map_after``: validation mAP of the starting model and of the saved one (on the same
    held-out images, each with its tuned thresholds); ``epochs``: epochs trained; ``seconds``."""

    checkpoint: Path
    val_map_before: float
    val_map_after: float
    epochs: int
    seconds: float
    val_ids: list = field(default_factory=list)
    history: list = field(default_factory=list, repr=False)

    @property
    def improved(self) -> bool:
        return self.val_map_after > self.val_map_before


def preset_config(init_checkpoint, out_dir, *, minutes: float | None = None, device: str = "auto",
                  **overrides) -> TrainConfig:
    """The few-image fine-tuning TrainConfig (``overrides``: any TrainConfig field)."""
    kw = dict(init_checkpoint=str(init_checkpoint), out=str(out_dir), crop_size=CROP,
              steps_per_epoch=STEPS_PER_EPOCH, epochs=MAX_EPOCHS if minutes else EPOCHS,
              batch_size=BATCH, lr=LR, val_fraction=VAL_FRACTION, select_by="map",
              tune_thresholds=True, figures=False, device=device, backbone_weights="random",
              plateau_patience=1000)
    kw.update(overrides)
    return TrainConfig(**kw)


def finetune(images: list[np.ndarray], labels: list[np.ndarray], init_checkpoint: str | Path,
             out_dir: str | Path, *, minutes: float | None = None, device: str = "auto", ids=None,
             **overrides):
    """Generator: the engine's events (dicts with "stage"); returns a :class:`FinetuneResult`.

    ``images`` / ``labels``: the corrected images (any dtype, grey or RGB) and their instance
    label images; ``ids``: their names (default image0, image1 ...); ``minutes``: a wall-time
    budget (None: the preset's EPOCHS). Raises DataError / ConfigError (one line) on bad input.
    """
    from .data import DataError, few_image_samples, split_samples
    from .engine import train

    if minutes is not None and not (math.isfinite(float(minutes)) and float(minutes) > 0):
        raise ValueError(f"minutes must be a number > 0, got {minutes!r}")
    if not images:
        raise DataError("no corrected image to fine-tune on")
    config = preset_config(init_checkpoint, out_dir, minutes=minutes, device=device, **overrides)
    samples = few_image_samples(images, labels, ids, rule=config.image_input())
    budget = None if minutes is None else float(minutes) * 60.0
    t0 = time.perf_counter()
    history: list[dict] = []
    val_ids = [s.image_id for s in split_samples(samples, config.val_fraction, config.seed)[1]]
    gen = train(config, samples)
    done_epochs = 0
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration:
                break
            stage = event.get("stage")
            if stage == "epoch":
                history.append(event["row"])
                done_epochs = max(done_epochs, int(event["epoch"]))
            yield event
            if budget is None or done_epochs < 1 or stage not in ("epoch", "train"):
                continue
            elapsed = time.perf_counter() - t0
            per_epoch = float(event["row"].get("time_s") or 0.0) if stage == "epoch" else 0.0
            if elapsed + per_epoch > budget:  # mid-epoch: that epoch is dropped, the best is kept
                yield {"stage": "setup", "message": f"time budget of {float(minutes):g} min reached "
                                                    f"after epoch {done_epochs}"}
                break
    finally:
        gen.close()  # the engine waits for its files: the last complete epoch is on disk
    return _result(Path(out_dir), history, time.perf_counter() - t0, val_ids)


def _result(out: Path, history: list[dict], seconds: float, val_ids) -> FinetuneResult:
    start = [r for r in history if int(r["epoch"]) == 0]
    best = [r for r in history if int(r.get("best", 0))]
    ckpt = out / "best_model.bin"
    if not best or not ckpt.is_file():
        raise RuntimeError(f"{out}: fine-tuning saved no model (no epoch completed)")
    before = float(start[0]["val_map"]) if start else float("nan")
    return FinetuneResult(ckpt, before, float(best[-1]["val_map"]),
                          max(int(r["epoch"]) for r in history), seconds, list(val_ids), history)
