"""Save and load checkpoints safely.

A checkpoint is a plain dict, loadable with ``torch.load(weights_only=True)``::

    {"format": "napari-cellseg/1", "config": {...ModelConfig...}, "state_dict": {...},
     "thresholds": {"box_conf": 0.5, "mask_threshold": 0.5, "min_area": 0},
     "info": {...training info: epoch, val_loss, val_map, data...}}

A bare torchvision ``state_dict`` of the same architecture also loads; its config then comes
from the caller (``config=``) or the defaults.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from .model import ModelConfig, build_model

FORMAT = "napari-cellseg/1"
DEFAULT_THRESHOLDS = {"box_conf": 0.5, "mask_threshold": 0.5, "min_area": 0}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


def save_checkpoint(path, model, config: ModelConfig, thresholds: dict | None = None,
                    info: dict | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint atomically. ``extra`` adds keys (optimizer state for last.ckpt...)."""
    from .atomic import atomic_torch_save

    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    obj = {
        "format": FORMAT,
        "config": config.to_dict(),
        "state_dict": state,
        "thresholds": {**DEFAULT_THRESHOLDS, **(thresholds or {})},
        "info": dict(info or {}),
    }
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)


def read_checkpoint(path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with clear errors; returns the raw dict."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or foreign file?): {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _is_state_dict(obj: dict) -> bool:
    import torch

    return bool(obj) and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(path, config: ModelConfig | None = None, device="cpu"):
    """Return ``(model, config, thresholds, info)``; the model is in eval mode on ``device``."""
    path = Path(path)
    obj = read_checkpoint(path)
    if "state_dict" in obj and "config" in obj:
        try:
            config = ModelConfig.from_dict(obj["config"])
        except TypeError as exc:
            raise CheckpointError(f"{path}: bad model config in checkpoint: {exc}") from None
        state = obj["state_dict"]
        thresholds = {**DEFAULT_THRESHOLDS, **(obj.get("thresholds") or {})}
        info = dict(obj.get("info") or {})
    elif _is_state_dict(obj) or ("model" in obj and _is_state_dict(obj["model"])):
        state = obj.get("model", obj) if not _is_state_dict(obj) else obj
        config = config or ModelConfig()
        thresholds = dict(DEFAULT_THRESHOLDS)
        info = {"note": "bare state_dict; config from arguments/defaults"}
    else:
        raise CheckpointError(
            f"{path}: not a napari-cellseg checkpoint (keys: {', '.join(map(str, list(obj)[:8]))})")
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
    return Path(__file__).parent / "models" / "demo.bin"


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """``None`` means the bundled demo model."""
    if path is None or str(path) == "":
        p = bundled_model_path()
        if not p.is_file():
            raise CheckpointError(f"{p}: the bundled demo model is missing from this installation")
        return p
    return Path(path)
