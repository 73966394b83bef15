"""Atomic file writes and the lock every writer of a shared output file takes.

* :func:`atomic_write`: write to a temporary file beside the target, then ``os.replace``.
  Whatever happens (an exception, Ctrl-C, kill -9), the target is either the old complete file
  or the new complete file, never half written. A target that is a symlink is written through
  (the file it points to is replaced, the link stays). A full disk names the file and the way on.
* :func:`output_lock`: one exclusive lock per output file (``.<name>.rank<R>.lock`` beside it,
  a real ``flock``: the kernel drops it when its process dies, so a lock file left by a killed
  run never blocks the next one). ``cellseg predict --out``, ``cellseg to-csv --merge`` and the
  napari CSV export (annotations.write_annotations) all take it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
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


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full_error(exc: OSError, path) -> OSError:
    """A full disk / quota while writing ``path`` as one OSError naming the file and the way on
    (the bare ``[Errno 28] No space left on device`` names neither); other errors unchanged."""
    if exc.errno not in _DISK_FULL:
        return exc
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    return OSError(exc.errno, f"no space left on the disk of {folder} (nothing was replaced); free some "
                              f"space or write to another folder", str(path))


def write_target(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` replaces: the target of a symlink (followed to the end), so
    an output given as a link is written through instead of the link being replaced."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` atomically (the file a
    symlink ``path`` points to, the link kept). A full disk raises an OSError naming ``path``."""
    path = write_target(path)
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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise disk_full_error(exc, path) from None
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


# ---- the lock of an output file -----------------------------------------------------------------
class OutputLockError(ValueError):
    """Another run holds the lock of this output file."""


def lock_path(out, rank: int = 0) -> Path:
    """The lock file of ``out`` (of a symlink: of the file it points to, so both names share it)."""
    out = write_target(out)
    return out.parent / f".{out.name}.rank{rank}.lock"


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _acquire(path: Path, wait: float) -> int | None:
    """An fd holding the lock on ``path`` (created if missing), or None after ``wait`` seconds."""
    deadline = time.monotonic() + max(float(wait), 0.0)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if _try_lock(fd):
            try:  # the holder may have removed the file between our open and lock: take it again
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
            continue
        os.close(fd)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


@contextlib.contextmanager
def output_lock(out, rank: int = 0, wait: float = 0.0, what: str = "cellseg run"):
    """Exclusive lock on the output file ``out`` (and its rank's journal) while it is written.

    The lock file ``.<out name>.rank<R>.lock`` is created, locked (flock) and removed on exit.
    When another process holds it, this waits up to ``wait`` seconds (a merge or export takes a
    moment; ``cellseg predict`` holds it for its whole run and asks with ``wait=0``), then raises
    OutputLockError naming the file. A lock file left by a killed run is not held (the kernel
    released its flock): it is taken over and removed at the end. Every rank of a torchrun
    predict locks its own file, and rank 0 exists in every run and is the one every other
    writer takes, so two writers of one file always collide."""
    out = Path(out)
    path = lock_path(out, rank)
    fd = _acquire(path, wait)
    if fd is None:
        raise OutputLockError(f"{out}: another {what} is writing this file (lock {path.name} is held); "
                              f"wait for it to finish or choose another output file")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def remove_stale_locks(out, keep: int) -> list[Path]:
    """Remove the lock files of ``out`` for ranks >= ``keep`` that no process holds (left by a
    killed torchrun run with more ranks); returns the ones removed. A held one is left alone."""
    out = write_target(out)
    removed = []
    for path in sorted(out.parent.glob(f".{out.name}.rank*.lock")):
        try:
            rank = int(path.name.rsplit(".rank", 1)[1].split(".")[0])
        except (IndexError, ValueError):
            continue
        if rank < keep:
            continue
        fd = _acquire(path, 0)
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
            removed.append(path)
    return removed
