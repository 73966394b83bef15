"""The device rules: which torch device a name means, what the "auto" precision is on it
(``auto_precision``: training's --amp and inference's precision alike), and which
torch.distributed backend a run uses. Used by prediction, the CLI, the widgets and training.
torch is imported inside the functions."""

from __future__ import annotations

import os


class DeviceError(ValueError):
    """A device that does not exist on this machine; the message names it."""


def resolve_device(name: str | None = "auto", local_rank: int | None = None):
    """``"auto"``/None/"" -> the rank's CUDA device when there is one, else CPU; otherwise the
    named device, refused with DeviceError when this machine does not have it."""
    import torch

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            if local_rank is None:
                local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {name!r} ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"device {name!r} requested but MPS is not available on this machine")
    return dev


def ddp_backend(device) -> str:
    """torch.distributed backend for a device: NCCL on CUDA, gloo otherwise."""
    return "nccl" if getattr(device, "type", str(device)).startswith("cuda") else "gloo"


def cuda_has_bf16(device) -> bool:
    import torch

    return getattr(device, "type", "") == "cuda" and torch.cuda.is_bf16_supported()


def auto_precision(device) -> str:
    """What "auto" precision means on ``device``, for training and inference alike: "bf16"
    autocast on a CUDA GPU that has bfloat16 (no GradScaler needed), "fp16" on an older CUDA GPU
    (training adds a GradScaler), "off" (float32) elsewhere: bf16 on a CPU changes the numbers
    and is only used when asked for."""
    if getattr(device, "type", str(device)) != "cuda":
        return "off"
    return "bf16" if cuda_has_bf16(device) else "fp16"


def amp_mode(value) -> str:
    """A stored ``amp`` setting as a mode: configs written when --amp was a switch hold True
    (= "auto") or False (= "off"); a mode string is returned as it is."""
    if value is True or value is False:
        return "auto" if value else "off"
    return value
