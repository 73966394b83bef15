"""The state of a training run on disk and in memory, apart from the loops: the output folder
(``prepare_output``), log.csv (``LogRow``, ``LOG_FIELDS``, ``_write_log``) and config.json, the RNG states and
``read_resume`` / ``resume_best`` (what ``--resume`` needs from OUT/last.ckpt), and the background checkpoint writer
(``_Writer`` over CPU snapshots). Everything written goes through atomic writes.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TrainConfig

@dataclass
class LogRow:
    """One epoch of a run: a line of log.csv (its columns are LOG_FIELDS, in this order), an
    entry of last.ckpt's ``history`` and the ``row`` of an "epoch" event (as ``as_dict()``).
    skipped_batches: steps with a non-finite loss or gradient (on any rank); scaler_skipped:
    steps the fp16 GradScaler skipped (inf gradients at its scale); the weights moved on
    optimizer_steps of steps. loader_start_s: wait for the first batch (worker start-up on
    epoch 1); train_s / val_s / save_s (checkpoints, log, figures) / time_s: seconds. Epoch 0 is
    the --init-checkpoint model (no training: NaN train losses)."""

    epoch: int
    train_loss: float
    train_mask_loss: float
    val_loss: float
    val_mask_loss: float
    val_map: float
    box_conf: float
    mask_threshold: float
    lr: float
    steps: int = 0
    optimizer_steps: int = 0
    skipped_batches: int = 0
    scaler_skipped: int = 0
    amp: str = "off"
    loader_start_s: float = 0.0
    train_s: float = 0.0
    val_s: float = 0.0
    save_s: float = 0.0
    time_s: float = 0.0
    best: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


LOG_FIELDS = [f.name for f in dataclasses.fields(LogRow)]


TIMING_FIELDS = ("loader_start_s", "train_s", "val_s", "save_s", "time_s")


class OutputError(ValueError):
    """The output folder cannot be used."""


class SaveError(RuntimeError):
    """A file of the run could not be written (full disk ...): the message names it and the way on."""


OUTPUTS = ("last.ckpt", "best_model.bin", "log.csv", "config.json", "loss.png")


def prepare_output(out: Path, resume: bool) -> list[str]:
    """Check OUT for a new run / a resume (OutputError otherwise) and remove what an interrupted
    save left there (io.atomic's ``.NAME.*.tmp`` of the run's files); returns the removed names."""
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
    leftovers = [p for name in OUTPUTS for p in out.glob(f".{name}.*.tmp")]
    leftovers += list((out / "figures").glob(".*.png.*.tmp")) + list(out.glob(".write-test-*"))
    removed = []
    for path in leftovers:
        try:
            path.unlink()
            removed.append(str(path.relative_to(out)))
        except OSError:
            pass
    return removed


def save_failure(path, exc: BaseException) -> SaveError:
    """One line for a file the run could not write: a full disk (ENOSPC, or torch.save's
    "[enforce fail at inline_container.cc] unexpected pos" / "file write failed") says so; the
    earlier complete files are kept (atomic writes), so the way on is --resume."""
    import errno

    text = " ".join(str(exc).split())
    full = getattr(exc, "errno", None) == errno.ENOSPC or any(
        k in text for k in ("unexpected pos", "file write failed", "No space left"))
    why = "the disk is full" if full else (text.split(". ")[0] or type(exc).__name__)
    out = Path(path).parent
    return SaveError(f"{path}: could not be written ({why}); the files of the last finished epoch are kept "
                     f"in {out}: {'free some space, then ' if full else ''}continue with cellseg-train --out "
                     f"{out} --resume --epochs N")


def read_last(path: Path) -> dict:
    """OUT/last.ckpt as read_checkpoint reads it; a damaged file (truncated by a full disk or a
    copy) says that it cannot be resumed and what can be done (OutputError)."""
    from napari_cellseg.model.checkpoint import CheckpointError, read_checkpoint

    try:
        return read_checkpoint(path)
    except CheckpointError as exc:
        if "not a readable" not in str(exc) and "is empty" not in str(exc):
            raise  # another format version, a foreign dict ...: its own line says what to do
        best = Path(path).parent / "best_model.bin"
        way = (f"start a new run from its best model: --init-checkpoint {best} --out NEW" if best.is_file()
               else f"start the run again in another --out (or delete {path})")
        raise OutputError(f"{exc}; --resume cannot continue from it: {way}") from None


def check_out_not_data(out: Path, config: TrainConfig) -> None:
    """OUT is never a data folder itself: the run's files (loss.png, log.csv, checkpoints) would
    land among the images and labels (and the next load or --resume would take loss.png for an
    image). A folder inside one is fine: images are not searched in subfolders."""
    for flag, folder in (("--image-dir", config.image_dir), ("--label-dir", config.label_dir),
                         ("--images", config.images)):
        if folder and os.path.realpath(os.path.expanduser(str(out))) == os.path.realpath(os.path.expanduser(folder)):
            raise OutputError(f"--out {out}: is the {flag} folder; the run's files (loss.png, log.csv, "
                              f"checkpoints) would land among the data: choose another folder, e.g. "
                              f"--out {Path(out) / 'run'}")


def check_inputs_kept(out: Path, inputs) -> None:
    """The files a run writes (OUT/best_model.bin, OUT/last.ckpt) never replace a file it starts
    from (``inputs``: --init-checkpoint, a --backbone-weights file): OutputError, before any work
    (files.check_not_inputs: the same file, links included)."""
    from napari_cellseg.io.files import check_not_inputs

    try:
        check_not_inputs([out / "best_model.bin", out / "last.ckpt"], [p for p in inputs if p], f"--out {out}")
    except ValueError as exc:
        raise OutputError(str(exc)) from None


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
    from napari_cellseg.io.atomic import atomic_write

    with atomic_write(path) as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in LOG_FIELDS})


def _write_config(cfg: TrainConfig, path: Path) -> None:
    import json
    from napari_cellseg.io.atomic import atomic_write

    with atomic_write(path) as fh:
        json.dump(cfg.to_dict(), fh, indent=1)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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
    obj = read_last(path)
    missing = [k for k in RESUME_KEYS if k not in obj]
    if missing:
        raise OutputError(f"{path}: cannot resume, it has no {' / '.join(missing)} state (a model-only "
                          f"checkpoint?); start a new run with --init-checkpoint {path} instead")
    return obj


def check_same_split(obj: dict, val_ids: list[str], path, train_ids: list[str] | None = None) -> None:
    """--resume trains and validates on the images of the run (last.ckpt's ``info.val_ids`` and,
    when it holds them all, ``info.train_ids``): a best_model.bin chosen across two validation
    sets would be chosen on numbers that cannot be compared, and data given in a new place
    (a moved folder) must be the run's. The split is drawn again from the data and the seed, so
    data that changed (images added, removed or renamed) gives another one: OutputError naming
    an image that differs. Files without ``val_ids`` are not checked."""
    info = obj.get("info")
    info = info if isinstance(info, dict) else {}
    pairs = [("validation", info.get("val_ids"), val_ids)]
    stored_train = info.get("train_ids")
    if train_ids is not None and isinstance(stored_train, list) and info.get("n_train") == len(stored_train):
        pairs.append(("training", stored_train, train_ids))
    for what, stored, now in pairs:
        if not isinstance(stored, list):
            continue
        stored = [str(i) for i in stored]
        if sorted(stored) == sorted(now):
            continue
        gone, new = sorted(set(stored) - set(now)), sorted(set(now) - set(stored))
        example = f"{gone[0]!r} is gone" if gone else f"{new[0]!r} is new"
        raise OutputError(f"{path}: the data gives another {what} set than the run's ({len(stored)} image(s); "
                          f"{example}): --resume needs the run's data unchanged (a run whose stack planes were "
                          f"named NAME[z], by an older napari-cellseg, cannot be resumed either); start a new "
                          f"run with --init-checkpoint {Path(path).parent / 'best_model.bin'}")


def resume_best(obj: dict, select_by: str):
    """last.ckpt's ``best`` if it was measured by ``select_by`` (``best_by``: "loss" = val loss,
    "map" = -val mAP), else None (never compared across criteria)."""
    return obj.get("best") if obj.get("best_by") == select_by else None


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
        from napari_cellseg.model.checkpoint import save_checkpoint

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
            raise save_failure(path, exc)
