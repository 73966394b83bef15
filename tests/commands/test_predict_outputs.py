"""`cellseg predict` outputs, run as a subprocess like a user: the same CSV at any batch size,
--resume after an interrupt, the CSV's own format and columns, nothing replaced unless asked,
and a run stopped by SIGTERM leaving nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_checkpoint  # noqa: E402

from napari_cellseg.io.annotations import read_annotations  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random checkpoint and five images of three sizes (mixed in file order)."""
    import imageio.v3 as iio

    root = tmp_path_factory.mktemp("outputs")
    tiny_checkpoint(root / "tiny.bin", thresholds={"box_conf": 0.5, "mask_threshold": 0.5},
                    box_detections_per_img=50)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for name, shape in (("a", (96, 112)), ("b", (64, 80)), ("c", (96, 112)), ("d", (40, 120)),
                        ("e", (64, 80))):
        iio.imwrite(images / f"{name}.png", (rng.random(shape) * 255).astype(np.uint8))
    return root


def cellseg(*args, script=None, env_extra=None, **kwargs):
    """``cellseg ARGS`` in a fresh interpreter (``script``: a file run instead of the module)."""
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    head = [str(script)] if script else ["-m", "napari_cellseg.commands.main"]
    return subprocess.run([sys.executable, *head, *map(os.fsdecode, args)], capture_output=True,
                          text=True, env=run_env, timeout=300, **kwargs)


def _predict(env, out, *more, script=None):
    return cellseg("predict", "--checkpoint", env / "tiny.bin", env / "images", "--out", out,
                   "--device", "cpu", *more, script=script)


def _error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("cellseg "), proc.stderr
    return lines[-1]


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))  # (hidden names)


# ---- batching -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["--scale=1", "--diameter=auto"])
def test_mixed_sizes_give_the_same_csv_at_any_batch_size(env, tmp_path, size):
    """Images of different sizes in one batch were padded to the largest, and the smaller ones got
    other detections. Now only same-size images share a forward: byte-identical CSVs."""
    one, four = tmp_path / "one.csv", tmp_path / "four.csv"
    for out, batch in ((one, "1"), (four, "4")):
        proc = _predict(env, out, "--batch-size", batch, size)
        assert proc.returncode == 0, proc.stderr
    assert sorted(read_annotations(one).ids) == ["a", "b", "c", "d", "e"]
    assert four.read_bytes() == one.read_bytes()


# ---- resume ---------------------------------------------------------------------------------------
# run instead of the module: the run is killed (os._exit) at its first CSV rewrite, after every
# image is journalled, as a kill -9 before the first flush would leave it
_KILLED_AT_FLUSH = """
import os, sys
import napari_cellseg.commands.predict as predict
from napari_cellseg.commands.main import main
predict.flush_csv = lambda *args, **kwargs: os._exit(9)
sys.exit(main())
"""


def test_resume_after_an_interrupted_fresh_run_uses_its_journal_not_the_older_csv(env, tmp_path):
    """A fresh run (--overwrite) onto an older CSV, killed before its first CSV rewrite, then
    --resume: before, it said "resuming, N images already done" and output the older CSV byte for
    byte. Now the journal's images are kept, the others predicted again, and the older CSV's rows
    survive only for an image this run does not predict."""
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_AT_FLUSH)
    clean = tmp_path / "clean.csv"
    assert _predict(env, clean).returncode == 0
    out = tmp_path / "sub.csv"
    older = "id,predicted\na,1 7\nb,1 7\nc,1 7\nd,1 7\ne,1 7\nzz_other,3 4\n"
    out.write_text(older)
    proc = _predict(env, out, "--overwrite", script=script)
    assert proc.returncode == 9, proc.stderr
    assert out.read_text() == older and ".sub.csv.rank0.journal" in _leftovers(tmp_path, "sub.csv")
    proc = _predict(env, out, "--resume")
    assert proc.returncode == 0, proc.stderr
    ann, ref = read_annotations(out), read_annotations(clean)
    assert sorted(ann.ids) == ["a", "b", "c", "d", "e", "zz_other"]
    for image_id in ref.ids:
        assert ann.rles(image_id) == ref.rles(image_id)
    assert ann.rles("zz_other") == ["3 4"]
    assert _leftovers(tmp_path, "sub.csv") == []


def test_resume_keeps_a_train_csv_with_its_sizes_and_extra_columns(env, tmp_path):
    """--resume onto a train-format CSV with an extra column was rewritten as id,predicted: the
    width, height and "checked_by" columns were dropped."""
    out = tmp_path / "train.csv"
    out.write_text("id,annotation,width,height,checked_by\nold,1 5,10,8,ana\n")
    proc = _predict(env, out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "(train format)" in proc.stdout
    lines = out.read_text().splitlines()
    assert lines[:2] == ["id,annotation,width,height,checked_by", "old,1 5,10,8,ana"]
    ann = read_annotations(out)
    assert ann.format == "train" and sorted(ann.ids) == ["a", "b", "c", "d", "e", "old"]
    assert ann.shape("d") == (40, 120) and ann.table["checked_by"].tolist().count("ana") == 1


def test_resume_keeps_extra_columns_of_a_kaggle_csv(env, tmp_path):
    out = tmp_path / "sub.csv"
    out.write_text("id,predicted,checked_by\nold,1 5,ana\n")
    assert _predict(env, out, "--resume").returncode == 0
    ann = read_annotations(out)
    assert list(ann.table.columns) == ["id", "predicted", "checked_by"]
    assert ann.table.set_index("id").loc["old", "checked_by"] == "ana"


# ---- nothing replaced unless asked ------------------------------------------------------------------
def test_a_second_fresh_run_does_not_replace_the_first_runs_rows(env, tmp_path):
    """Two runs on one --out started one after the other: the later one used to replace the
    earlier's rows with exit 0. Now it stops (exit 2, naming the file) unless --overwrite."""
    out = tmp_path / "sub.csv"
    assert _predict(env, out).returncode == 0
    first = out.read_bytes()
    proc = _predict(env, out, "--box-conf", "0.9")
    assert proc.returncode == 2
    line = _error(proc)
    assert str(out) in line and "--overwrite" in line and "--resume" in line
    assert out.read_bytes() == first and _leftovers(tmp_path, "sub.csv") == []
    proc = _predict(env, out, "--box-conf", "0.99", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() != first


def test_a_fresh_run_does_not_drop_an_interrupted_runs_journal(env, tmp_path):
    out = tmp_path / "sub.csv"
    journal = tmp_path / ".sub.csv.rank0.journal"
    journal.write_text('{"id": "a", "shape": [96, 112], "rles": ["1 7"], "format": "kaggle"}\n')
    proc = _predict(env, out)
    assert proc.returncode == 2 and "--resume" in _error(proc) and "journal" in _error(proc)
    assert journal.read_text().startswith('{"id": "a"') and not out.exists()


def test_labels_dir_does_not_replace_existing_label_files(env, tmp_path):
    """--labels-dir replaced label TIFFs of the same name (ground truth: evaluate then gave 1.0)."""
    import tifffile

    labels = tmp_path / "labels"
    labels.mkdir()
    truth = np.zeros((64, 80), np.uint16)
    truth[5:20, 5:20] = 1
    tifffile.imwrite(labels / "b.tif", truth)
    before = (labels / "b.tif").read_bytes()
    out = tmp_path / "sub.csv"
    proc = _predict(env, out, "--labels-dir", labels)
    assert proc.returncode == 2
    line = _error(proc)
    assert "b.tif" in line and "--overwrite" in line
    assert (labels / "b.tif").read_bytes() == before and not out.exists()
    assert sorted(p.name for p in labels.iterdir()) == ["b.tif"]
    proc = _predict(env, out, "--labels-dir", labels, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in labels.iterdir()) == ["a.tif", "b.tif", "c.tif", "d.tif", "e.tif"]


# ---- leftovers, links --------------------------------------------------------------------------------
def test_sigterm_leaves_no_lock_and_the_next_run_works(env, tmp_path):
    """SIGTERM during predict left .sub.csv.rank0.lock (the finally blocks never ran)."""
    out = tmp_path / "sub.csv"
    cmd = [sys.executable, "-m", "napari_cellseg.commands.main", "predict", "--checkpoint",
           str(env / "tiny.bin"), str(env / "images"), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".sub.csv.rank0.lock"
    deadline = time.time() + 120
    while not lock.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert lock.exists(), "the run never took its lock"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not lock.exists()
    assert [n for n in _leftovers(tmp_path, "sub.csv") if not n.endswith(".journal")] == []
    proc = _predict(env, out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert _leftovers(tmp_path, "sub.csv") == []


def test_lock_files_left_by_a_killed_run_are_taken_over_and_removed(env, tmp_path):
    """A lock file whose process died (kill -9, or a torchrun run with more ranks) holds no flock:
    the next run is not blocked, and it removes them."""
    out = tmp_path / "sub.csv"
    for rank in (0, 3):
        (tmp_path / f".sub.csv.rank{rank}.lock").write_text("")
    proc = _predict(env, out)
    assert proc.returncode == 0, proc.stderr
    assert _leftovers(tmp_path, "sub.csv") == []


def test_out_that_is_a_symlink_is_written_through(env, tmp_path):
    """Writing to an --out that is a symlink replaced the link with a plain file."""
    real = tmp_path / "store" / "real.csv"
    real.parent.mkdir()
    link = tmp_path / "sub.csv"
    link.symlink_to(real)
    proc = _predict(env, link)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(read_annotations(real).ids) == ["a", "b", "c", "d", "e"]
