"""Device rules: which torch device a name means (:func:`resolve_device`), whether a CUDA device
has bfloat16 (:func:`cuda_has_bf16`), and which torch.distributed backend a run uses
(:func:`ddp_backend`). Used by prediction, the CLI, the widgets and training alike. What
"auto" precision picks is decided where it is used: ``inference.runner`` for prediction
(``--precision``), ``training.loops.resolve_amp`` for training (``--amp``). torch is imported
inside the functions."""

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
