"""atomic_write: a target that cannot be written is named, and no temp file is left behind."""

from __future__ import annotations

import pytest

from napari_cellseg.atomic import atomic_write


def test_folder_as_target_is_named_before_writing(tmp_path):
    """D11 (library side): the error named the temp file, after everything was written."""
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
