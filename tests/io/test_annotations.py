import numpy as np
import pytest

from napari_cellseg.io.annotations import CsvError, read_annotations, write_annotations


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
}


@pytest.mark.parametrize("header", ["id,predicted", "idx,id,annotation", "id,annotation,width,height,cell_type"])
def test_header_only_csv_is_a_valid_csv_of_no_image(tmp_path, header):
    """What `cellseg predict` writes when every image failed: a valid, empty submission."""
    path = tmp_path / "empty.csv"
    path.write_text(header + "\n\n")  # (a trailing blank line is no row either)
    ann = read_annotations(path)
    assert ann.ids == [] and len(ann) == 0 and list(ann.rows()) == [] and "a" not in ann
    with pytest.raises(CsvError, match="no rows for image id 'a'"):
        ann.rles("a")
    # rows merged into it: its format kept (the merge used to fail on "no data rows")
    labels = np.zeros((3, 4), int)
    labels[0, :2] = 1
    fmt = ann.format
    write_annotations(path, {"a": labels}, format=fmt, merge=True)
    merged = read_annotations(path)
    assert merged.format == fmt and merged.ids == ["a"]


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


# ---- hostile CSV files ------------------------------------------------------------------------------
@pytest.mark.parametrize("header, column", [
    ("id,annotation,width,height,id", "id"),
    ("id,annotation,width,height,width", "width"),
    ("id,predicted,predicted", "predicted"),
    ("id, annotation ,annotation", "annotation"),
])
def test_duplicate_header_column_named(tmp_path, header, column):
    """A duplicate column is one CsvError naming it (was AttributeError / a wrong message)."""
    path = tmp_path / "dup.csv"
    n = len(header.split(","))
    path.write_text(header + "\n" + ",".join(["a", "1 1"] + ["3"] * (n - 2)) + "\n")
    with pytest.raises(CsvError) as info:
        read_annotations(path)
    assert str(info.value) == f"{path}: row 1 (header): duplicate column {column!r}"


def test_longest_rle_written_is_read_back(tmp_path):
    """A vertical stripe in a 16000x64 image is a 142,635-character RLE (csv's default
    field limit is 131,072); it reads back."""
    labels = np.zeros((16000, 64), np.int32)
    labels[:, 0] = 1
    for fmt in ("kaggle", "starter", "train"):
        path = write_annotations(tmp_path / f"{fmt}.csv", {"stripe": labels}, format=fmt)
        ann = read_annotations(path)
        assert len(ann.rles("stripe")[0]) == 142_635
        assert np.array_equal(ann.labels("stripe", labels.shape), labels)


def test_field_limit_follows_the_size_cap():
    """One place sets csv's field limit, from the longest RLE MAX_PIXELS allows."""
    import csv
    import io

    from napari_cellseg.io.annotations import csv_reader
    from napari_cellseg.io.rle import MAX_PIXELS, MAX_RLE_CHARS, rle_encode

    worst = np.zeros(64, bool)
    worst[::2] = True  # alternate pixels: the most runs per pixel
    assert MAX_RLE_CHARS >= len(rle_encode(worst[None])) * (MAX_PIXELS // 64)
    rows = list(csv_reader(io.StringIO("id,predicted\na," + "1 1 " * 100_000 + "\n")))
    assert len(rows[1][1]) == 400_000
    assert csv.field_size_limit() >= MAX_RLE_CHARS


@pytest.mark.parametrize("raw", [" a", "a ", "\ta\r", " a  "])
def test_ids_normalised_the_same_by_readers_and_writers(tmp_path, raw):
    """One id normalisation: what the writer writes is what the reader gives back."""
    from napari_cellseg.io.annotations import normalize_id

    assert normalize_id(raw) == "a"
    assert normalize_id("\xa0a") == "\xa0a"  # only the documented (ASCII) whitespace is stripped
    path = write_annotations(tmp_path / "x.csv", {raw: np.ones((2, 2), np.int32)})
    assert read_annotations(path).ids == [normalize_id(raw)]
    with pytest.raises(ValueError, match="same id 'a'"):
        write_annotations(tmp_path / "y.csv", {raw: np.ones((2, 2), int), "a": np.ones((2, 2), int)})
    with pytest.raises(ValueError, match="empty"):
        write_annotations(tmp_path / "y.csv", {" \t": np.ones((2, 2), int)})


@pytest.mark.parametrize("field", ["1 2\x1f", "\x851 2", "1 2\xa0", "1\u30002"])
def test_csv_field_whitespace_is_the_rle_whitespace(tmp_path, field):
    """The reader strips only what the decoder treats as whitespace, so a look-alike is
    refused at reading, naming the row (it used to pass the reader and fail in rle_decode)."""
    path = tmp_path / "ws.csv"
    path.write_text(f"id,predicted\na,1 1\nb,{field}\n", encoding="utf-8")
    with pytest.raises(CsvError, match=r"ws.csv: row 3: predicted: token \d+ .* is not a non-negative"):
        read_annotations(path)


def test_nul_and_non_utf8_name_file_and_row(tmp_path):
    """NUL bytes and non-UTF-8 text are refused naming the file and the row."""
    path = tmp_path / "bad.csv"
    path.write_bytes(b"id,predicted\na,1 1\nb,1 \x001\n")
    with pytest.raises(CsvError, match=r"bad.csv: row 3: NUL byte"):
        read_annotations(path)
    path.write_bytes("id,predicted\na,1 1\nb\xe9,1 1\n".encode("latin-1"))
    with pytest.raises(CsvError, match=r"bad.csv: row 3: not a UTF-8 text CSV"):
        read_annotations(path)


def test_rows_in_file_order(tmp_path):
    """Annotations.rows(): (id, value) of every data row, '' meaning no cell (for --resume)."""
    path = tmp_path / "s.csv"
    path.write_text("idx,id,annotation\n0,a,1 1\n1, b ,-1\n2,a,3 1\n")
    assert list(read_annotations(path).rows()) == [("a", "1 1"), ("b", ""), ("a", "3 1")]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_csv_is_named_as_utf16(tmp_path, encoding):
    """With or without a byte-order mark, a UTF-16 CSV was "a binary file"."""
    path = tmp_path / "sub.csv"
    path.write_text("id,predicted\na,1 2\n", encoding=encoding)
    with pytest.raises(CsvError, match="UTF-16 text.*re-save it as UTF-8"):
        read_annotations(path)


def test_utf16_csv_at_predict_resume_is_named(tmp_path):
    from napari_cellseg.io.journal import done_ids

    path = tmp_path / "sub.csv"
    path.write_text("id,predicted\na,1 2\n", encoding="utf-16")
    with pytest.raises(ValueError, match="UTF-16"):
        done_ids(path)


def test_write_without_merge_or_overwrite_keeps_rows(tmp_path, small_labels):
    path = tmp_path / "sub.csv"
    path.write_text("id,predicted\nhand,1 2\n")
    with pytest.raises(ValueError, match="already holds rows"):
        write_annotations(path, {"a": small_labels}, overwrite=False)
    assert path.read_text() == "id,predicted\nhand,1 2\n"
    write_annotations(path, {"a": small_labels}, merge=True, overwrite=False)
    assert read_annotations(path).ids == ["hand", "a"]


def test_write_waits_for_the_output_lock(tmp_path, small_labels):
    """The napari export and to-csv take the lock cellseg predict holds for its whole run."""
    from napari_cellseg.io import annotations
    from napari_cellseg.io.atomic import OutputLockError, output_lock

    path = tmp_path / "sub.csv"
    old_wait, annotations.LOCK_WAIT = annotations.LOCK_WAIT, 0.1
    try:
        with output_lock(path):
            with pytest.raises(OutputLockError, match="sub.csv"):
                write_annotations(path, {"a": small_labels})
    finally:
        annotations.LOCK_WAIT = old_wait
    assert not path.exists()
