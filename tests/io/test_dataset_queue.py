"""The review queue of a folder (io/dataset.py): names only at open, accept -> train CSV rows,
drafts beside the CSV, resume, start CSV, ranking order."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_cellseg.io import dataset as ds
from napari_cellseg.io.annotations import read_annotations, write_annotations
from napari_cellseg.io.dataset import ACCEPTED, EDITED, TODO, DatasetError, DatasetQueue
from napari_cellseg.io.ranking import write_ranking


def _folder(tmp_path, n=4, shape=(20, 30)):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        tifffile.imwrite(folder / f"img{i}.tif", np.full(shape, i, np.uint16))
    return folder


def _labels(shape=(20, 30), k=2):
    lab = np.zeros(shape, np.int32)
    for j in range(k):
        lab[2 + 5 * j: 5 + 5 * j, 3:9] = j + 1
    return lab


def test_open_lists_names_only_and_reads_no_pixel(tmp_path, monkeypatch):
    folder = _folder(tmp_path, 3)
    (folder / "notes.txt").write_text("not an image")
    import napari_cellseg.io.images as images

    def no_read(*a, **k):
        raise AssertionError("a pixel or header was read at open")

    for name in ("read_raw", "image_info", "read_plane", "load_image"):
        monkeypatch.setattr(images, name, no_read)
    q = DatasetQueue.open(folder, tmp_path / "out.csv")
    assert sorted(q.items) == ["img0", "img1", "img2"]
    assert all(q[i].status == TODO for i in q.items)
    assert q.summary() == "accepted 0 of 3"


def test_accept_writes_train_rows_merged_and_drops_the_draft(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "out.csv"
    q = DatasetQueue.open(folder, out)
    q.save_draft("img1", _labels(k=1))
    assert q["img1"].status == EDITED and (tmp_path / "out.drafts" / "img1.npz").is_file()
    assert q.accept("img1", _labels(k=2)) == 2
    assert q.accept("img3", np.zeros((20, 30), np.int32)) == 0
    ann = read_annotations(out)
    assert ann.format == "train" and ann.ids == ["img1", "img3"]
    assert ann.shape("img1") == (20, 30)
    np.testing.assert_array_equal(ann.labels("img1"), _labels(k=2))
    assert ann.rles("img3") == []  # one 'no cell' row
    assert q["img1"].status == ACCEPTED and not (tmp_path / "out.drafts" / "img1.npz").exists()
    # accepting again replaces that image's rows only
    q.accept("img1", _labels(k=3))
    ann = read_annotations(out)
    assert ann.ids == ["img3", "img1"] and len(ann.rles("img1")) == 3
    assert q.summary() == "accepted 2 of 4"


def test_reopen_resumes_accepted_and_drafts(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "out.csv"
    q = DatasetQueue.open(folder, out)
    q.accept("img0", _labels(k=2))
    q.save_draft("img2", _labels(k=1))
    q2 = DatasetQueue.open(folder, out)
    assert {i: q2[i].status for i in q2.items} == {"img0": ACCEPTED, "img1": TODO, "img2": EDITED,
                                                    "img3": TODO}
    assert q2["img0"].cells == 2 and q2["img2"].cells is None
    labels, source = q2.saved_labels("img2", (20, 30))
    assert source == "draft"
    np.testing.assert_array_equal(labels, _labels(k=1))
    labels, source = q2.saved_labels("img0", (20, 30))
    assert source == "accepted"
    np.testing.assert_array_equal(labels, _labels(k=2))
    assert q2.saved_labels("img1", (20, 30)) == (None, "")


def test_draft_of_another_size_or_corrupt_is_refused_and_kept(tmp_path):
    folder = _folder(tmp_path)
    q = DatasetQueue.open(folder, tmp_path / "out.csv")
    path = q.save_draft("img0", _labels())
    with pytest.raises(DatasetError, match="img0.npz.*shape"):
        q.load_draft("img0", (10, 10))
    path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="img0.npz: cannot read the draft"):
        q.load_draft("img0", (20, 30))
    assert path.exists()


def test_order_uncertainty_first_then_names_and_next_todo(tmp_path):
    folder = _folder(tmp_path)
    ranking = tmp_path / "ranking.csv"
    write_ranking(ranking, [_rank("img2", 0.9, 5), _rank("img0", 0.1, 7), _rank("img3", 0.5, 0),
                            _rank("other", 1.0, 1)])
    q = DatasetQueue.open(folder, tmp_path / "out.csv", ranking_csv=ranking)
    assert q.order() == ["img2", "img3", "img0", "img1"]
    assert q["img2"].cells == 5
    assert q.next_todo() == "img2"
    q.accept("img3", _labels())
    assert q.next_todo("img2") == "img0"
    assert q.neighbour("img2", 1) == "img3" and q.neighbour("img2", -1) is None
    q.set_prediction("img1", 4, 0.95)
    assert q.order()[0] == "img2" and q["img1"].cells == 4  # a stable order while values come in
    assert q.resort()[0] == "img1"
    assert not q.needs_model("img3") and q.needs_model("img1")


def _rank(image_id, uncertainty, cells):
    return {"id": image_id, "uncertainty": uncertainty, "cells": cells, "doubtful_cells": 0,
            "diameter": None, "file": ""}


def test_bad_ranking_is_one_line_naming_file_and_row(tmp_path):
    folder = _folder(tmp_path)
    ranking = tmp_path / "ranking.csv"
    ranking.write_text("id,uncertainty,cells,doubtful_cells\nimg0,0.2,1,0\nimg1,high,1,0\n")
    with pytest.raises(DatasetError, match=r"ranking: .*ranking.csv: row 3: uncertainty"):
        DatasetQueue.open(folder, tmp_path / "out.csv", ranking_csv=ranking)
    with pytest.raises(DatasetError, match="ranking: .*missing.csv"):
        DatasetQueue.open(folder, tmp_path / "out.csv", ranking_csv=tmp_path / "missing.csv")


def test_start_csv_masks_for_its_ids(tmp_path):
    folder = _folder(tmp_path)
    start = tmp_path / "predicted.csv"
    write_annotations(start, {"img1": _labels(k=3)}, format="kaggle")
    q = DatasetQueue.open(folder, tmp_path / "out.csv", start_csv=start)
    assert q["img1"].cells == 3 and q["img0"].cells is None
    labels, source = q.saved_labels("img1", (20, 30))
    assert source == "start CSV" and labels.max() == 3
    assert q.saved_labels("img0", (20, 30)) == (None, "")


def test_output_csv_errors_are_one_line_and_nothing_written(tmp_path):
    folder = _folder(tmp_path)
    with pytest.raises(DatasetError, match="is a folder"):
        DatasetQueue.open(folder, tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        DatasetQueue.open(tmp_path / "missing", tmp_path / "out.csv")
    out = tmp_path / "out.csv"
    out.write_text("id,annotation,width,height\nimg0,1 2,30,20\nimg0,oops,30,20\n")
    with pytest.raises(DatasetError, match="output CSV: .*out.csv: row 3"):
        DatasetQueue.open(folder, out)


def test_accept_refused_at_once_while_predict_holds_the_output_lock(tmp_path, monkeypatch):
    from napari_cellseg.io import atomic

    folder = _folder(tmp_path)
    out = tmp_path / "out.csv"
    q = DatasetQueue.open(folder, out)
    with atomic.output_lock(out):  # as cellseg predict --out holds it for its whole run
        waits = []
        real = atomic._acquire
        monkeypatch.setattr(atomic, "_acquire", lambda path, wait: waits.append(wait) or real(path, wait))
        with pytest.raises(DatasetError, match="img0 not accepted: .*is writing this file"):
            q.accept("img0", _labels())
    assert waits == [0]  # asked without waiting (the writers' own wait would freeze napari)
    assert not out.exists() and q["img0"].status == TODO


def test_accept_into_a_kaggle_csv_is_refused_and_the_file_kept(tmp_path):
    folder = _folder(tmp_path)
    out = tmp_path / "out.csv"
    write_annotations(out, {"elsewhere": _labels()}, format="kaggle")
    before = out.read_bytes()
    q = DatasetQueue.open(folder, out)
    with pytest.raises(DatasetError, match="img0 not accepted: .*width/height"):
        q.accept("img0", _labels())
    assert out.read_bytes() == before


def test_drafts_dir_is_beside_the_csv(tmp_path):
    assert ds.drafts_dir(tmp_path / "sub" / "train.csv") == tmp_path / "sub" / "train.drafts"
