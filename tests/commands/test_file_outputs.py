"""`cellseg to-csv | to-labels | evaluate` as subprocesses: concurrent merges keep every row,
nothing replaced unless asked, ids too long for a file name, raw images given as labels, UTF-16
CSVs, and evaluate scoring each CSV row as one prediction."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_cellseg.io.annotations import read_annotations


def cellseg(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "napari_cellseg.commands.main", *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kwargs)


def _labels(folder, items) -> None:
    folder.mkdir(exist_ok=True)
    for image_id, labels in items.items():
        tifffile.imwrite(folder / f"{image_id}.tif", labels.astype(np.uint16))


def _only_error(result, command: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cellseg {command}: error: "), result.stderr
    return lines[0]


def test_concurrent_merges_keep_every_row(tmp_path, nuclei_label_slices):
    """Two `to-csv --merge` on one file at once: both exited 0 and one set of rows was lost
    (predict had a lock, to-csv --merge did not). Now every CSV writer takes the same lock."""
    (first, labels_a), (second, labels_b), _ = nuclei_label_slices.items()
    _labels(tmp_path / "a", {first: labels_a})
    _labels(tmp_path / "b", {second: labels_b})
    # a large existing file: each merge reads and rewrites it, a window of about a second
    rows = "".join(f"old{k:05d},{1 + 3 * (k % 1000)} 2\n" for k in range(40000))
    csvs = [tmp_path / f"shared{k}.csv" for k in range(2)]
    for csv in csvs:
        csv.write_text("id,predicted\n" + rows)
    procs = [subprocess.Popen([sys.executable, "-m", "napari_cellseg.commands.main", "to-csv",
                               str(tmp_path / folder), "--out", str(csv), "--merge"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for csv in csvs for folder in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    for csv in csvs:
        ids = read_annotations(csv).ids
        assert first in ids and second in ids and len(ids) == 40002
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{csv.name}.")]


def test_to_csv_does_not_replace_a_csv_with_rows(tmp_path, nuclei_label_slices):
    _labels(tmp_path / "labels", nuclei_label_slices)
    csv = tmp_path / "sub.csv"
    csv.write_text("id,predicted\nhand_corrected,1 5\n")
    result = cellseg("to-csv", tmp_path / "labels", "--out", csv)
    line = _only_error(result, "to-csv")
    assert result.returncode == 2 and str(csv) in line and "--merge" in line and "--overwrite" in line
    assert csv.read_text() == "id,predicted\nhand_corrected,1 5\n"
    assert cellseg("to-csv", tmp_path / "labels", "--out", csv, "--overwrite").returncode == 0
    assert read_annotations(csv).ids == list(nuclei_label_slices)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("id,predicted\n")  # no rows to lose: written without asking
    assert cellseg("to-csv", tmp_path / "labels", "--out", header_only).returncode == 0


def test_to_labels_does_not_replace_the_images(tmp_path, nuclei_label_slices):
    """to-labels --out images/ without --images replaced the raw images with label images."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id in nuclei_label_slices:
        tifffile.imwrite(images / f"{image_id}.tif", (rng.random((256, 256)) * 60000).astype(np.uint16))
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    _labels(tmp_path / "labels", nuclei_label_slices)
    csv = tmp_path / "train.csv"
    assert cellseg("to-csv", tmp_path / "labels", "--out", csv, "--format", "train").returncode == 0
    result = cellseg("to-labels", csv, "--out", images)
    line = _only_error(result, "to-labels")
    assert result.returncode == 2 and f"--out {images}: " in line and ".tif" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    result = cellseg("to-labels", csv, "--out", images, "--overwrite")
    assert result.returncode == 0, result.stderr


def test_to_labels_refuses_an_id_too_long_for_a_file_name_before_writing(tmp_path):
    """A 300-character id: exit 2 after writing two files, against "nothing half written"."""
    long_id = "x" * 300
    csv = tmp_path / "sub.csv"
    csv.write_text(f"id,annotation,width,height\na,1 2,5,4\nb,1 2,5,4\n{long_id},1 2,5,4\n")
    out = tmp_path / "out"
    result = cellseg("to-labels", csv, "--out", out)
    line = _only_error(result, "to-labels")
    assert result.returncode == 2 and "too long for a file name" in line
    assert not out.exists()


def test_to_csv_warns_on_raw_images(tmp_path, nuclei_planes):
    """to-csv on a folder of raw images made one "cell" per grey value, without a word."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for z in list(nuclei_planes)[:2]:
        tifffile.imwrite(raw / f"z{z}.tif", nuclei_planes[z][0])
    result = cellseg("to-csv", raw, "--out", tmp_path / "sub.csv")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "2 of 2 files look like raw images" in warning[0]
    labels = tmp_path / "labels"
    _labels(labels, {f"z{z}": nuclei_planes[z][1] for z in list(nuclei_planes)[:2]})
    result = cellseg("to-csv", labels, "--out", tmp_path / "labels.csv")
    assert result.returncode == 0 and "warning" not in result.stderr


def test_utf16_csv_is_named_as_utf16(tmp_path):
    """A CSV saved as UTF-16 (Excel's "Unicode text") was called "a binary file"."""
    csv = tmp_path / "sub.csv"
    csv.write_text("id,annotation,width,height\na,1 2,5,4\n", encoding="utf-16")
    result = cellseg("to-labels", csv, "--out", tmp_path / "out")
    line = _only_error(result, "to-labels")
    assert result.returncode == 2 and "UTF-16" in line and "re-save it as UTF-8" in line
    assert "binary" not in line


def test_evaluate_scores_every_row_as_one_prediction(tmp_path, nuclei_label_slices):
    """Every row written twice scored the same as the original (the earlier row won the overlap):
    a duplicate is a false positive, and the overlapping masks are reported in one line."""
    gt = tmp_path / "gt"
    _labels(gt, nuclei_label_slices)
    once = tmp_path / "once.csv"
    assert cellseg("to-csv", gt, "--out", once).returncode == 0
    lines = once.read_text().splitlines()
    twice = tmp_path / "twice.csv"
    twice.write_text("\n".join(lines + lines[1:]) + "\n")
    report = json.loads(cellseg("evaluate", "--gt", gt, "--pred", once, "--json").stdout)
    assert report["mean_map"] == 1.0 and report["overlapping_masks"] == {}
    result = cellseg("evaluate", "--gt", gt, "--pred", twice, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    n_cells = [len(np.unique(v)) - 1 for v in nuclei_label_slices.values()]
    assert [r["n_pred"] for r in report["images"]] == [2 * n for n in n_cells]
    assert [r["fp"] for r in report["images"]] == n_cells
    assert report["mean_map"] == pytest.approx(0.5)  # TP = n, FP = n: n / (n + n) at every IoU
    notes = [line for line in result.stderr.splitlines() if "overlap" in line]
    assert len(notes) == 1 and f"{2 * sum(n_cells)} predicted masks overlap another mask in 3 images" in notes[0]
