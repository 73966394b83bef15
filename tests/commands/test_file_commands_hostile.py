"""The file commands on hostile input: to-labels checks everything before writing,
to-csv output reads back, evaluate scales to many cells."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_cellseg.commands.main import main


@pytest.mark.parametrize("how", ["shape", "images"])
def test_to_labels_writes_nothing_when_a_later_row_is_out_of_bounds(tmp_path, capsys, how):
    """img1 was written before row 3 (img2) was found past the image end."""
    csv = tmp_path / "sub.csv"
    csv.write_text("id,predicted\nimg1,1 2\nimg2,3 1\nimg2,15 9\n")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("img1", "img2"):
        tifffile.imwrite(images / f"{name}.tif", np.zeros((4, 5), np.uint8))
    out = tmp_path / "out"
    size = ["--shape", "4x5"] if how == "shape" else ["--images", str(images)]
    rc = main(["to-labels", str(csv), "--out", str(out), *size])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"{csv}: row 4: predicted:" in err[0] and "past the image end" in err[0]
    assert not out.exists() or not any(out.iterdir())
    csv.write_text("id,predicted\nimg1,1 2\nimg2,3 1\n")
    assert main(["to-labels", str(csv), "--out", str(out), *size]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["img1.tif", "img2.tif"]
    assert tifffile.imread(out / "img2.tif").ravel().tolist() == [0, 0, 1] + [0] * 17


def test_to_labels_image_sizes_from_headers_only(tmp_path, monkeypatch, capsys):
    """Sizes from --images come from the file headers: the images are not decoded."""
    import napari_cellseg.io.images as images_mod

    csv = tmp_path / "sub.csv"
    csv.write_text("idx,id,annotation\n0,a,1 2\n")
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", np.zeros((3, 6, 3), np.uint8))

    def boom(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(images_mod, "read_raw", boom)
    assert main(["to-labels", str(csv), "--out", str(tmp_path / "o"), "--images", str(images)]) == 0
    assert tifffile.imread(tmp_path / "o" / "a.tif").shape == (3, 6)


def test_to_csv_output_reads_back_in_to_labels_and_evaluate(tmp_path, capsys):
    """A 142,635-character RLE written by to-csv is read by to-labels and evaluate."""
    labels = np.zeros((16000, 64), np.uint16)
    labels[:, 0] = 1
    src = tmp_path / "lab"
    src.mkdir()
    tifffile.imwrite(src / "stripe.tif", labels)
    csv = tmp_path / "sub.csv"
    assert main(["to-csv", str(src), "--out", str(csv)]) == 0
    assert main(["to-labels", str(csv), "--out", str(tmp_path / "back"), "--shape", "16000x64"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "back" / "stripe.tif"), labels)
    capsys.readouterr()
    assert main(["evaluate", "--gt", str(src), "--pred", str(csv), "--json"]) == 0
    assert '"mean_map": 1.0' in capsys.readouterr().out
