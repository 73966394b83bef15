"""Save and load checkpoints safely.

A checkpoint is a plain dict, loadable with ``torch.load(weights_only=True)``::

    {"format": "napari-cellseg/1", "config": {...ModelConfig...}, "state_dict": {...},
     "thresholds": {"box_conf": 0.5, "mask_threshold": 0.5, "min_area": 0},
     "info": {...training info: epoch, val_loss, val_map, data...}}

A bare torchvision ``state_dict`` of the same architecture also loads; its config then comes
from the caller (``config=``) or the defaults.

Every part is validated (:func:`validate_checkpoint`) before any model is built: the config
(the ``format`` version, then every ModelConfig field in range, the backbone only from timm's local model names: no
``hf-hub:``, no URL, nothing downloaded), the thresholds (``options.Thresholds``), ``info`` a
mapping, ``state_dict`` a mapping of names to finite tensors. Problems raise
:class:`CheckpointError` ``FILE: field: problem``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

from napari_cellseg.model.maskrcnn import ConfigError, ModelConfig, build_model
from napari_cellseg.options import DEFAULT_THRESHOLDS as _DEFAULTS
from napari_cellseg.options import OptionError, Thresholds

FORMAT = "napari-cellseg/1"
# the thresholds every checkpoint stores (defaults: napari_cellseg.options, their one home)
DEFAULT_THRESHOLDS = {"box_conf": _DEFAULTS.box_conf, "mask_threshold": _DEFAULTS.mask_threshold,
                      "min_area": _DEFAULTS.min_area}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


def code_version() -> dict:
    """Which code trains a model, for a checkpoint's ``info["code"]``: the package version and,
    when it runs from a git checkout of this project (not from a wheel, nor from some other
    repository it is installed inside), the commit and whether tracked files differ from it.
    ``{"package": "0.1.0", "git_commit": "<40 hex>" | None, "git_dirty": bool | None}``."""
    import subprocess

    from napari_cellseg import __version__

    root = Path(__file__).resolve().parents[2]
    found = {"package": __version__, "git_commit": None, "git_dirty": None}

    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return found
        found["git_commit"] = git("rev-parse", "HEAD")
        found["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def stored_train_config(info) -> dict:
    """The ``train_config`` a checkpoint's ``info`` stores (the TrainConfig it was trained with,
    image input included); {} for a model that stores none."""
    stored = info.get("train_config") if isinstance(info, dict) else None
    return stored if isinstance(stored, dict) else {}


def save_checkpoint(path, model, config: ModelConfig, thresholds: "Thresholds | dict | None" = None,
                    info: dict | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint atomically. ``extra`` adds keys (optimizer state for last.ckpt...)."""
    from napari_cellseg.io.atomic import atomic_torch_save

    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    obj = {
        "format": FORMAT,
        "config": config.to_dict(),
        "state_dict": state,
        "thresholds": {**DEFAULT_THRESHOLDS, **(thresholds.to_dict() if isinstance(thresholds, Thresholds)
                                                 else dict(thresholds or {}))},
        "info": dict(info or {}),
    }
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)


def missing_checkpoint(path) -> str | None:
    """Why ``path`` cannot be a checkpoint file (one line), or None: not found, or a folder (a
    training run's OUT: then name the best_model.bin in it). The rule of every entry point."""
    path = Path(path)
    if path.is_dir():
        inside = [f for f in ("best_model.bin", "last.ckpt") if (path / f).is_file()]
        hint = f"; did you mean {path / inside[0]}?" if inside else ""
        return f"{path}: is a folder, not a checkpoint file{hint}"
    if not path.is_file():
        return f"{path}: checkpoint file not found"
    return None


def read_checkpoint(path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with clear errors; returns the raw dict, whose
    ``format`` is checked (:func:`_check_format`) when it is a full checkpoint."""
    import torch

    path = Path(path)
    problem = missing_checkpoint(path)
    if problem:
        raise CheckpointError(problem)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if not (magic.startswith(b"PK") or magic[:1] == b"\x80"):  # zip (torch.save) or pickle
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive "
                              f"nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a long paragraph; keep the one fact that matters
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"{path}: refused: the file needs code ({found.group(1)}) to unpickle, which is never "
                "run (only tensors and plain containers are allowed)") from None
        detail = re.search(r"(Unsupported operand \d+|Unsupported class [\w.]+)", str(exc))
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or foreign file?)"
            f"{': ' + detail.group(1) if detail else ''}") from None
    except Exception as exc:  # noqa: BLE001 - RuntimeError, EOFError, BadZipFile, KeyError ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.split(". ")[0].rstrip(".")  # torch appends paragraphs of advice: keep the fact
        if isinstance(exc, (KeyError, IndexError, TypeError, AttributeError)):
            first = f"{type(exc).__name__}: {first}"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or foreign file?): {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if "state_dict" in obj:  # a full checkpoint (not a bare state_dict): every raw reader checks it
        _check_format(path, obj.get("format"))
    return obj


def _is_state_dict(obj: dict) -> bool:
    import torch

    return bool(obj) and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def _check_state_dict(path: Path, state) -> dict:
    import torch

    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_dict: must be a mapping of names to tensors, got "
                              f"{type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: state_dict: key {name!r} is not a string")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict: {name!r} is {type(tensor).__name__}, "
                                  f"not a tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: state_dict: {name!r} holds non-finite values "
                                  f"(NaN or inf): the training diverged")
    return state


def _check_thresholds(path: Path, raw) -> dict:
    """Validated thresholds as a dict: the stored keys (known ones) over DEFAULT_THRESHOLDS."""
    try:
        checked = Thresholds.from_dict(raw)
    except OptionError as exc:
        message = str(exc)
        if message.startswith("thresholds"):  # Thresholds.from_dict names "thresholds" itself
            message = message[len("thresholds"):].lstrip(": ")
        raise CheckpointError(f"{path}: thresholds: {message}") from None
    out = dict(DEFAULT_THRESHOLDS)
    out.update({k: getattr(checked, k) for k in (raw or {}) if hasattr(checked, k)})
    return out


def _check_format(path: Path, fmt) -> None:
    """``format`` names this layout and its version: FORMAT, or absent (a hand-made dict). Unknown
    keys of a newer writer are ignored, so a version that cannot be read that way says so by a
    new number, which this reader refuses instead of building a model it would misread."""
    if fmt is None or fmt == FORMAT:
        return
    if isinstance(fmt, str) and fmt.startswith(FORMAT.rpartition("/")[0] + "/"):
        raise CheckpointError(f"{path}: format: {fmt!r} was written by another napari-cellseg version "
                              f"(this one reads {FORMAT!r}); use a matching napari-cellseg")
    raise CheckpointError(f"{path}: format: {fmt!r} is not a napari-cellseg checkpoint format "
                          f"(expected {FORMAT!r})")


def validate_checkpoint(path, obj: dict, config: ModelConfig | None = None):
    """Check a raw checkpoint dict (from :func:`read_checkpoint`) against the schema, building
    nothing. Returns ``(config, state_dict, thresholds, info)``; raises CheckpointError
    ``FILE: field: problem``. ``config`` is used for a bare state_dict only."""
    path = Path(path)
    if "state_dict" in obj and "config" in obj:
        _check_format(path, obj.get("format"))
        raw = obj["config"]
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: config: must be a mapping, got {type(raw).__name__}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown keys from newer versions are ignored
                config = ModelConfig.from_dict(raw)
        except (ConfigError, TypeError) as exc:
            raise CheckpointError(f"{path}: config.{exc}") from None
        state = _check_state_dict(path, obj["state_dict"])
        thresholds = _check_thresholds(path, obj.get("thresholds"))
        info = obj.get("info")
        if info is None:
            info = {}
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: info: must be a mapping, got {type(info).__name__}")
        info = dict(info)
    elif _is_state_dict(obj) or ("model" in obj and _is_state_dict(obj["model"])):
        state = obj.get("model", obj) if not _is_state_dict(obj) else obj
        state = _check_state_dict(path, state)
        config = config or ModelConfig()
        thresholds = dict(DEFAULT_THRESHOLDS)
        info = {"note": "bare state_dict; config from arguments/defaults"}
    else:
        raise CheckpointError(
            f"{path}: not a napari-cellseg checkpoint (keys: {', '.join(map(str, list(obj)[:8]))})")
    return config, state, thresholds, info


def load_checkpoint(path, config: ModelConfig | None = None, device="cpu"):
    """Return ``(model, config, thresholds, info)``; the model is in eval mode on ``device``.

    The contents are validated (:func:`validate_checkpoint`) before the model is built."""
    path = Path(path)
    obj = read_checkpoint(path)
    config, state, thresholds, info = validate_checkpoint(path, obj, config)
    model = build_model(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shape mismatch
        msg = " ".join(str(exc).split())[:400]
        raise CheckpointError(f"{path}: weights do not fit the {config.backbone} architecture: {msg}") from None
    if result.missing_keys or result.unexpected_keys:
        def short(keys):
            return ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        raise CheckpointError(
            f"{path}: weights do not match the {config.backbone} architecture: "
            f"missing keys [{short(result.missing_keys)}]; unexpected keys [{short(result.unexpected_keys)}]")
    model.eval().to(device)
    return model, config, thresholds, info


def bundled_model_path() -> Path:
    """The demo checkpoint shipped inside the package."""
    return Path(__file__).resolve().parents[1] / "models" / "demo.bin"


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """``None`` means the bundled demo model."""
    if path is None or str(path) == "":
        p = bundled_model_path()
        if not p.is_file():
            raise CheckpointError(f"{p}: the bundled demo model is missing from this installation")
        return p
    return Path(path)
