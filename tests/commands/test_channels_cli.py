"""``cellseg predict`` with a user's multi-channel TIFF: --channel / --channel2 / --invert, and the
checkpoint's stored choice as the default (subprocesses, tiny random checkpoint)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_checkpoint  # noqa: E402


def _cellseg(*args):
    return subprocess.run([sys.executable, "-m", "napari_cellseg.commands.main", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def _rles(csv):
    from napari_cellseg.io.annotations import read_annotations

    ann = read_annotations(csv)
    return [ann.rles(i) for i in ann.ids]


@pytest.fixture(scope="module")
def files(tmp_path_factory, nuclei_planes):
    import tifffile

    root = tmp_path_factory.mktemp("channels")
    nuclei = nuclei_planes[34][0]
    noise = (np.random.default_rng(0).random(nuclei.shape) * 60000).astype(np.uint16)
    (root / "two").mkdir()
    (root / "one").mkdir()
    tifffile.imwrite(root / "two" / "img.tif", np.stack([noise, nuclei]), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(root / "one" / "img.tif", nuclei)
    ckpt = tiny_checkpoint(root / "tiny.bin")
    stored = torch.load(ckpt, weights_only=True)
    stored["info"] = {"train_config": {"channel": 2, "intensity": "percentile"}}
    torch.save(stored, root / "channel2.bin")
    return root, ckpt


def test_channel_flag_predicts_that_channel_of_a_cyx_tiff(files, tmp_path):
    """A CxYxX TIFF was two planes (x_000, x_001) and cellseg predict had no channel option."""
    root, ckpt = files
    run = lambda folder, out, *flags: _cellseg("predict", root / folder, "--out", tmp_path / out,  # noqa: E731
                                               "--checkpoint", ckpt, "--device", "cpu", "--scale", 1, *flags)
    assert run("one", "one.csv").returncode == 0
    done = run("two", "two.csv", "--channel", 2)
    assert done.returncode == 0, done.stderr
    assert _rles(tmp_path / "two.csv") == _rles(tmp_path / "one.csv")  # one id, the nuclei channel's cells
    from napari_cellseg.io.annotations import read_annotations

    assert read_annotations(tmp_path / "two.csv").ids == ["img"]
    bad = run("two", "bad.csv", "--channel", 3)
    assert bad.returncode == 1 and "img.tif: channel 3 but the image has 2 channels" in bad.stderr
    usage = run("two", "usage.csv", "--channel2", 1)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    assert "channel2 1 (nuclear) needs a cell channel" in usage.stderr and not (tmp_path / "usage.csv").exists()


def test_the_checkpoints_channel_is_the_default(files, tmp_path):
    root, _ = files
    args = ("--device", "cpu", "--scale", 1)
    stored = _cellseg("predict", root / "two", "--out", tmp_path / "a.csv", "--checkpoint", root / "channel2.bin", *args)
    flag = _cellseg("predict", root / "one", "--out", tmp_path / "b.csv", "--checkpoint", root / "channel2.bin",
                    "--channel", 1, *args)
    assert stored.returncode == 0 and flag.returncode == 0, stored.stderr + flag.stderr
    assert _rles(tmp_path / "a.csv") == _rles(tmp_path / "b.csv")
