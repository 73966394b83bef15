"""atomic_write: a target that cannot be written is named, and no temp file is left behind."""

from __future__ import annotations

import os

import pytest

from napari_cellseg.io.atomic import atomic_write


def test_folder_as_target_is_named_before_writing(tmp_path):
    """The error named the temp file, after everything was written."""
    target = tmp_path / "out.csv"
    target.mkdir()
    written = []
    with pytest.raises(IsADirectoryError) as info:
        with atomic_write(target) as fh:
            written.append(True)
            fh.write("id,predicted\n")
    assert str(target) in str(info.value) and ".tmp" not in str(info.value)
    assert not written  # refused before the body ran
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_replaces_atomically(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    with atomic_write(target) as fh:
        fh.write("new")
    assert target.read_text() == "new"


def test_never_touches_the_process_umask_while_writing(tmp_path, monkeypatch):
    """Label TIFFs are written from several threads: setting the umask to 0 and back in one
    thread gave another thread's new files mode 0666 (a race). The umask is read once."""
    import os
    import stat

    import napari_cellseg.io.atomic as atomic

    def umask_called(mask):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", umask_called)
    target = tmp_path / "f.txt"
    with atomic_write(target) as fh:
        fh.write("x")
    assert target.read_text() == "x"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~atomic._UMASK


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_umask_read_at_import_matches_the_process(tmp_path):
    import subprocess
    import sys

    code = "import os; os.umask(0o027); import napari_cellseg.io.atomic as a; print(oct(a._UMASK))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0o27"


def test_a_symlink_target_is_written_through(tmp_path):
    """The link used to be replaced by a plain file; now the file it points to is replaced."""
    real = tmp_path / "data" / "real.csv"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    with atomic_write(link) as fh:
        fh.write("new")
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.csv"]


def test_a_full_disk_names_the_file_and_the_way_on(tmp_path, monkeypatch):
    """"[Errno 28] No space left on device" named neither the file nor what to do."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "sub.csv"
    target.write_text("old")
    with pytest.raises(OSError) as info:
        with atomic_write(target) as fh:
            fh.write("new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert "free some space or write to another folder" in info.value.strerror
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_output_lock_waits_for_a_short_writer_and_refuses_a_long_one(tmp_path):
    import threading

    from napari_cellseg.io.atomic import OutputLockError, output_lock

    out = tmp_path / "sub.csv"
    with output_lock(out):
        with pytest.raises(OutputLockError, match="sub.csv"):
            with output_lock(out, wait=0.2):
                pass
    held = threading.Event()

    def short_writer():
        with output_lock(out):
            held.set()
            threading.Event().wait(0.3)

    thread = threading.Thread(target=short_writer)
    thread.start()
    held.wait(5)
    with output_lock(out, wait=10):  # taken once the other writer is done
        pass
    thread.join()
    assert list(tmp_path.iterdir()) == []
