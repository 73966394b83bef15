import numpy as np
import pytest

from napari_cellseg.annotations import CsvError, read_annotations, write_annotations


@pytest.mark.parametrize("fmt", ["kaggle", "starter", "train"])
def test_round_trip_nuclei(tmp_path, nuclei_label_slices, fmt):
    items = dict(nuclei_label_slices, empty=np.zeros((256, 256), np.int32))
    path = write_annotations(tmp_path / "a.csv", items, format=fmt)
    ann = read_annotations(path)
    assert ann.format == fmt and ann.ids == list(items)
    assert ann.rles("empty") == []
    for image_id, labels in items.items():
        shape = None if fmt == "train" else labels.shape
        back = ann.labels(image_id, shape)
        assert (back > 0).sum() == (labels > 0).sum()
        pairs = np.unique(np.stack([labels.ravel(), back.ravel()]), axis=1)
        assert len(pairs.T) == len(np.unique(labels))  # one-to-one instance mapping
    assert (ann.shape("empty") == (256, 256)) if fmt == "train" else ann.shape("empty") is None


def test_empty_markers(tmp_path):
    write_annotations(tmp_path / "k.csv", {"a": np.zeros((2, 2), int)}, format="kaggle")
    write_annotations(tmp_path / "s.csv", {"a": np.zeros((2, 2), int)}, format="starter")
    assert (tmp_path / "k.csv").read_text() == "id,predicted\na,\n"
    assert (tmp_path / "s.csv").read_text() == "idx,id,annotation\n0,a,-1\n"


def test_train_extra_columns_kept_and_merge(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,annotation,width,height,cell_type\n"
                    "a,1 2,4,3,shsy5y\nb,3 2 7 1,4,3,astro\n")
    ann = read_annotations(path)
    assert ann.format == "train" and ann.shape("a") == (3, 4)
    assert ann.table["cell_type"].tolist() == ["shsy5y", "astro"]
    assert ann.labels("b").ravel().tolist() == [0, 0, 1, 1, 0, 0, 1] + [0] * 5
    new = np.zeros((3, 4), np.int32)
    new[2, 2:] = 5
    write_annotations(path, {"a": new}, format="train", merge=True)
    merged = read_annotations(path)
    assert merged.ids == ["b", "a"] and merged.rles("a") == ["11 2"]
    assert merged.table.set_index("id").loc["b", "cell_type"] == "astro"


def test_merge_into_train_needs_sizes(tmp_path):
    path = tmp_path / "k.csv"
    path.write_text("id,predicted\nx,1 1\n")
    with pytest.raises(CsvError, match="no width/height for image 'x'"):
        write_annotations(path, {"y": np.ones((2, 2), int)}, format="train", merge=True)
    assert path.read_text() == "id,predicted\nx,1 1\n"  # untouched


BAD = {
    "missing column": ("id,annotation,width\na,1 2,3\n", r"row 1 \(header\): missing column 'height'"),
    "no annotation": ("id,foo\na,1\n", "missing column 'annotation' or 'predicted'"),
    "token": ("id,annotation,width,height\na,1 2,3,3\nb,1 x,3,3\n", "row 3: annotation: token 2 'x'"),
    "odd": ("id,predicted\na,1 2 3\n", "row 2: predicted: odd number of tokens"),
    "start 0": ("idx,id,annotation\n0,a,0 3\n", "row 2: annotation: run 1: start 0"),
    "past end": ("id,annotation,width,height\na,8 3,3,3\n", "row 2: annotation: .*past the image end"),
    "order": ("id,annotation,width,height\na,5 1 1 1,3,3\n", "row 2: .*out of order"),
    "overlap": ("id,annotation,width,height\na,1 3 2 1,3,3\n", "row 2: .*overlaps"),
    "size": ("id,annotation,width,height\na,1 1,x,3\n", "row 2: width 'x' is not a positive"),
    "size mismatch": ("id,annotation,width,height\na,1 1,3,3\na,2 1,4,3\n", "row 3: width/height"),
    "fields": ("id,predicted\na,1 1,extra\n", "row 2: 3 fields"),
    "empty id": ("id,predicted\n,1 1\n", "row 2: empty id"),
    "empty file": ("", "empty file"),
    "header only": ("id,predicted\n", "no data rows"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_csv_names_file_row_problem(tmp_path, name):
    text, problem = BAD[name]
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(CsvError, match=problem) as info:
        read_annotations(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_binary_file(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CsvError, match="binary file"):
        read_annotations(path)
    path.write_bytes(b"id,predicted\n\xff\xfe,1 1\n")
    with pytest.raises(CsvError, match="not a UTF-8"):
        read_annotations(path)


def test_unknown_size_and_bounds_checked_on_decode(tmp_path):
    path = tmp_path / "k.csv"
    path.write_text("id,predicted\na,1 2\na,100 3\n")
    ann = read_annotations(path)
    with pytest.raises(CsvError, match="row 2: unknown width/height for image 'a'"):
        ann.labels("a")
    with pytest.raises(CsvError, match="row 3: predicted: .*past the image end"):
        ann.labels("a", (5, 5))
    with pytest.raises(CsvError, match="no rows for image id 'zz'"):
        ann.rles("zz")


def test_overlapping_training_masks_earlier_row_wins(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,annotation,width,height\na,1 4,3,3\na,3 3,3,3\n")
    assert read_annotations(path).labels("a").ravel().tolist() == [1, 1, 1, 1, 2, 0, 0, 0, 0]


def test_write_rejects_bad_labels_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="2-D integer"):
        write_annotations(tmp_path / "x.csv", {"a": np.zeros((2, 2), float)})
    with pytest.raises(ValueError, match="unknown CSV format"):
        write_annotations(tmp_path / "x.csv", {"a": np.zeros((2, 2), int)}, format="xml")
    assert list(tmp_path.iterdir()) == []
