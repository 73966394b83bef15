"""`cellseg predict` under hostile inputs, run as a subprocess like a user.

The lock on --out, non-UTF-8 file names, whitespace in ids, --out a folder, tiny
images, --resume onto a bad CSV, unchecked flags, a bad checkpoint diameter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_checkpoint  # noqa: E402

TINY = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=100,
            box_detections_per_img=50)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random checkpoint that finds cells, and two small images."""
    import imageio.v3 as iio

    root = tmp_path_factory.mktemp("hostile")
    tiny_checkpoint(root / "tiny.bin", thresholds={"box_conf": 0.5, "mask_threshold": 0.5}, **TINY)
    rng = np.random.default_rng(0)
    for name in ("a_img", "b_img"):
        iio.imwrite(root / f"{name}.png", (rng.random((48, 56)) * 255).astype(np.uint8))
    return root


def cellseg(*args, cwd=None):
    """Run ``cellseg predict ARGS`` in a fresh interpreter; returns the CompletedProcess."""
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "napari_cellseg.commands.main", "predict", *map(os.fsdecode, args)],
                          capture_output=True, text=True, env=run_env, cwd=cwd, timeout=300)


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("cellseg predict: error: "), proc.stderr
    return lines[-1]


def _leftovers(folder: Path, out_name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out_name}"))


def _copy(env, folder: Path, *names) -> Path:
    folder.mkdir(exist_ok=True)
    for src, dst in names:
        (folder / dst).write_bytes((env / src).read_bytes())
    return folder


# ---- an exclusive lock on --out and its journals ------------------------------------------
def test_second_writer_exits_2_at_once_and_keeps_the_first_runs_journal(env, tmp_path):
    from napari_cellseg.io.atomic import output_lock
    from napari_cellseg.io.journal import Journal, journal_path

    out = tmp_path / "sub.csv"
    with output_lock(out):  # "the first run", still writing
        first = Journal(journal_path(out, 0))
        first.add("x_img", (4, 4), ["1 2"])
        first.close()
        proc = cellseg("--checkpoint", env / "tiny.bin", env / "a_img.png", "--out", out, "--device", "cpu")
        assert proc.returncode == 2
        line = _one_error_line(proc)
        assert str(out) in line and "another" in line
        assert not out.exists()
        assert '"x_img"' in journal_path(out, 0).read_text()  # the other run's rows are untouched
    # once the first run is done, the same command works and leaves no lock or journal behind
    journal_path(out, 0).unlink()
    proc = cellseg("--checkpoint", env / "tiny.bin", env / "a_img.png", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert _leftovers(tmp_path, "sub.csv") == []


def test_output_lock_is_exclusive_and_cleans_up(tmp_path):
    from napari_cellseg.io.atomic import OutputLockError, output_lock

    out = tmp_path / "sub.csv"
    with output_lock(out):
        with pytest.raises(OutputLockError, match="sub.csv"):
            with output_lock(out):
                pass
    assert list(tmp_path.iterdir()) == []
    with output_lock(out):  # free again
        pass


# ---- a non-UTF-8 file name is reported and skipped, the run is kept ------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes")
def test_non_utf8_file_name_is_skipped_and_the_run_kept(env, tmp_path):
    from napari_cellseg.io.annotations import read_annotations

    folder = _copy(env, tmp_path / "imgs", ("a_img.png", "good.png"))
    bad = os.path.join(os.fsencode(folder), b"bad\xff.png")
    with open(bad, "wb") as fh:
        fh.write((env / "b_img.png").read_bytes())
    out = tmp_path / "sub.csv"
    for extra in ([], ["--resume"]):
        proc = cellseg("--checkpoint", env / "tiny.bin", folder, "--out", out, "--device", "cpu", *extra)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "bad\\xff.png" in proc.stderr and "UTF-8" in proc.stderr
        assert read_annotations(out).ids == ["good"]
        assert _leftovers(tmp_path, "sub.csv") == []


# ---- ids with leading/trailing spaces are written stripped, so --resume finds them ---------
def test_ids_with_spaces_are_written_stripped_and_not_duplicated_by_resume(env, tmp_path):
    from napari_cellseg.io.annotations import read_annotations

    folder = _copy(env, tmp_path / "imgs", ("a_img.png", " spaced .png"), ("b_img.png", "plain.png"))
    out = tmp_path / "sub.csv"
    proc = cellseg("--checkpoint", env / "tiny.bin", folder, "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    first = out.read_text()
    assert sorted(read_annotations(out).ids) == ["plain", "spaced"]
    proc = cellseg("--checkpoint", env / "tiny.bin", folder, "--out", out, "--device", "cpu", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "2 images already done" in proc.stderr
    assert out.read_text() == first


# ---- --out and the flags are checked before anything is predicted -------------------
def test_out_is_a_folder_refused_before_predicting(env, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    proc = cellseg("--checkpoint", env / "tiny.bin", env / "a_img.png", "--out", out, "--device", "cpu")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert str(out) in line and "folder" in line and ".tmp" not in line
    assert "object size" not in proc.stderr  # refused before the model was even set up
    assert _leftovers(tmp_path, "results") == [] and list(out.iterdir()) == []


@pytest.mark.parametrize("flags, field", [
    (["--box-conf", "nan"], "box_conf"), (["--box-conf", "7"], "box_conf"),
    (["--mask-threshold", "-0.1"], "mask_threshold"), (["--min-area", "-3"], "min_area"),
    (["--tile-size", "1"], "tile_size"), (["--batch-size", "0"], "batch_size"),
])
def test_bad_flags_refused_with_the_field_named(env, tmp_path, flags, field):
    out = tmp_path / "sub.csv"
    proc = cellseg("--checkpoint", env / "tiny.bin", env / "a_img.png", "--out", out, "--device", "cpu", *flags)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert field in line and flags[1] in line
    assert not out.exists() and _leftovers(tmp_path, "sub.csv") == []


# ---- tiny images are predicted (no row lost), never shrunk to nothing ---------------------
@pytest.mark.parametrize("native", [False, True])
def test_tiny_images_are_predicted_not_skipped(env, tmp_path, native):
    import imageio.v3 as iio

    from napari_cellseg.io.annotations import read_annotations

    ckpt = env / "tiny.bin"
    if native:  # like the demo model: native scale + a trained diameter -> auto size retries 2.5x / 0.4x
        ckpt = tiny_checkpoint(tmp_path / "native.bin", thresholds={"box_conf": 0.99}, **TINY,
                               native_scale=True, diameter=40.0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    iio.imwrite(folder / "one.png", np.full((1, 1), 200, np.uint8))
    iio.imwrite(folder / "row.png", (np.arange(256) % 256).astype(np.uint8)[None])
    out = tmp_path / "sub.csv"
    proc = cellseg("--checkpoint", ckpt, folder, "--out", out, "--device", "cpu", "--diameter", "auto")
    assert proc.returncode == 0, proc.stderr
    ann = read_annotations(out)
    assert sorted(ann.ids) == ["one", "row"]


# ---- --resume onto an invalid CSV: one line naming file and row, exit 2, CSV untouched ----
@pytest.mark.parametrize("content, row", [
    (b"id,predicted\na_img,1 2\nb_img,1 2 x\n", "row 3"),
    (b"id,predicted\na_img,1 2\nb_img,3 2 1 1\n", "row 3"),
    (b"id,predicted\na_img,1 2\x00\n", "row 2"),
    (b"id,predicted\n\xe9t\xe9,1 2\n", "UTF-8"),
])
def test_resume_onto_an_invalid_csv_refused(env, tmp_path, content, row):
    out = tmp_path / "sub.csv"
    out.write_bytes(content)
    proc = cellseg("--checkpoint", env / "tiny.bin", env / "a_img.png", "--out", out, "--device", "cpu",
                   "--resume")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert str(out) in line and row in line
    assert out.read_bytes() == content and _leftovers(tmp_path, "sub.csv") == []


# ---- a checkpoint whose diameter is not a number: one line, nothing left behind ----------------
def test_checkpoint_with_a_text_diameter_leaves_no_journal(env, tmp_path):
    obj = torch.load(env / "tiny.bin", weights_only=True)
    obj["config"]["diameter"] = "forty"
    ckpt = tmp_path / "forty.bin"
    torch.save(obj, ckpt)
    out = tmp_path / "sub.csv"
    proc = cellseg("--checkpoint", ckpt, env / "a_img.png", "--out", out, "--device", "cpu")
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "forty.bin" in line and "diameter" in line
    assert not out.exists() and _leftovers(tmp_path, "sub.csv") == []


# ---- a fresh run with --overwrite where every image fails replaces the old CSV (header only) --
def test_fresh_run_with_every_image_failing_replaces_the_old_csv(env, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "stale.csv"
    old = b"id,predicted\nold_img,1 2\n"
    out.write_bytes(old)
    proc = cellseg("--checkpoint", env / "tiny.bin", bad, "--out", out, "--device", "cpu", "--resume")
    assert proc.returncode == 1, proc.stderr
    assert out.read_bytes() == old and _leftovers(tmp_path, "stale.csv") == []  # --resume: rows stay
    proc = cellseg("--checkpoint", env / "tiny.bin", bad, "--out", out, "--device", "cpu")
    assert proc.returncode == 2  # a fresh run never replaces rows unless asked
    assert str(out) in _one_error_line(proc) and "--overwrite" in _one_error_line(proc)
    assert out.read_bytes() == old and _leftovers(tmp_path, "stale.csv") == []
    proc = cellseg("--checkpoint", env / "tiny.bin", bad, "--out", out, "--device", "cpu", "--overwrite")
    assert proc.returncode == 1, proc.stderr
    assert "wrote 0 images" in proc.stdout
    assert out.read_text() == "id,predicted\n"  # header only: no row of the earlier run survives
    assert _leftovers(tmp_path, "stale.csv") == []
    # ... and that CSV is a valid empty submission: scored as if no image were predicted (exit 0)
    import tifffile

    gt = tmp_path / "gt"
    gt.mkdir()
    cells = np.zeros((48, 56), np.uint16)
    cells[4:12, 4:12] = 1
    tifffile.imwrite(gt / "broken.tif", cells)
    scored = subprocess.run([sys.executable, "-m", "napari_cellseg.commands.main", "evaluate", "--gt", str(gt),
                             "--pred", str(out)], capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0 and "Traceback" not in scored.stderr, scored.stderr
    assert "mean mAP over 1 images: 0.0000" in scored.stdout
    assert scored.stderr.strip() == (f"cellseg evaluate: note: {out} has no rows after the header (no image): "
                                      "every image scored as an empty prediction")
