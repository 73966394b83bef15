"""Import torch safely inside a running napari (Qt + OpenGL) process.

Mesa's software/AMD OpenGL drivers (llvmpipe under Xvfb, radeonsi) map their own libLLVM into
the process; loading triton's bundled LLVM afterwards (torchvision -> torch._dynamo -> triton)
segfaults. Inference never needs triton, so when a libLLVM is already mapped we make
``import triton`` fail cleanly (torch then reports "no triton" and works normally).
Call :func:`block_triton` in the GUI thread (it reads /proc/self/maps, instant); the slow
:func:`import_torch` may then run in a worker thread (the Segment widget does that at start-up).
"""

from __future__ import annotations

import sys


def _llvm_mapped() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libLLVM" in f.read()
    except OSError:  # not Linux
        return False


def block_triton() -> bool:
    """Make ``import triton`` fail cleanly when a libLLVM is already mapped; True if blocked."""
    if "triton" not in sys.modules and _llvm_mapped():
        sys.modules["triton"] = None  # type: ignore[assignment]  # -> ImportError, not a segfault
    return "triton" in sys.modules and sys.modules["triton"] is None


def import_torch() -> None:
    """Import torch + torchvision.ops (idempotent); block triton if it would crash."""
    if "torchvision.ops" in sys.modules:
        return
    block_triton()
    import torch  # noqa: F401
    import torchvision.ops  # noqa: F401
