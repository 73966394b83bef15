"""Atomic file writes: write to a temporary file beside the target, then ``os.replace``.

Whatever happens (an exception, Ctrl-C, kill -9), the target is either the old complete file
or the new complete file, never half written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _process_umask() -> int:
    """The umask, read once at import: ``os.umask`` can only be read by setting it, which is a
    race when files are written from several threads (label TIFFs from encode threads)."""
    try:  # Linux >= 4.7: read without changing it
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore, once, while importing
    os.umask(mask)
    return mask


_UMASK = _process_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` atomically."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: folder {directory} does not exist")
    if path.is_dir():  # checked first: os.replace would fail at the end, naming the temp file
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
        open_kwargs.setdefault("newline", "")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual 0666 & ~umask
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)
