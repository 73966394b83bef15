"""The napari reader/writer contributions and the non-Qt helpers behind export (no window)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_cellseg.gui.layers import (InputError, Result, csv_to_layer_data, export_csv, export_items, image_id_for_layer, image_plane, labels_items, shape_from_layers)
from napari_cellseg.gui.reader import get_reader
from napari_cellseg.gui.writer import write_labels
from napari_cellseg.io.annotations import read_annotations


def _labels(seed=0, shape=(40, 50), n=5):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        lab[y:y + rng.integers(3, 8), x:x + rng.integers(3, 8)] = i
    return lab


class FakeLayer(SimpleNamespace):
    pass


def Image(name, data, path=None, rgb=False):  # noqa: N802 - mimics napari.layers.Image
    lyr = type("Image", (FakeLayer,), {})(name=name, data=data, rgb=rgb, multiscale=False, metadata={},
                                         source=SimpleNamespace(path=path))
    return lyr


def test_image_id_from_source_path_else_name():
    assert image_id_for_layer(Image("shown name", np.zeros((4, 4)), path="/data/abc123.tif")) == "abc123"
    assert image_id_for_layer(Image("shown name", np.zeros((4, 4)))) == "shown name"


def test_image_plane_2d_rgb_stack_and_3d_view():
    img = Image("a", np.arange(12).reshape(3, 4))
    arr, plane = image_plane(img)
    assert plane == () and arr.shape == (3, 4)
    rgb = Image("rgb", np.zeros((3, 4, 3)), rgb=True)
    assert image_plane(rgb)[0].shape == (3, 4, 3)
    stack = Image("s", np.arange(2 * 3 * 4).reshape(2, 3, 4))
    arr, plane = image_plane(stack, current_step=(1, 0, 0), ndisplay=2)
    assert plane == (1,) and np.array_equal(arr, stack.data[1])
    with pytest.raises(InputError, match="2D view"):
        image_plane(stack, current_step=(1, 0, 0), ndisplay=3)
    with pytest.raises(InputError, match="need a 2D image"):
        image_plane(Image("line", np.zeros(5)))


def test_export_merges_and_reader_round_trips(tmp_path):
    a, b = _labels(0), _labels(1)
    la = FakeLayer(name="a cells", data=a, metadata={"napari_cellseg": Result("img_a", "a")})
    lb = FakeLayer(name="b cells", data=b, metadata={"napari_cellseg": Result("img_b", "b")})
    other = FakeLayer(name="not a result", data=_labels(2), metadata={})
    items = export_items([la, lb, other])
    assert sorted(items) == ["img_a", "img_b"]
    out = tmp_path / "train.csv"
    assert export_csv(out, items, "train") == len(np.unique(a)) - 1 + len(np.unique(b)) - 1
    # re-export one image into the same file: its rows replaced, the other's kept
    a2 = a.copy()
    a2[a2 == 1] = 0
    export_csv(out, {"img_a": a2}, "train")
    layers = get_reader(str(out))(str(out))
    got = {meta["metadata"]["image_id"]: data for data, meta, kind in layers}
    assert [kind for *_, kind in layers] == ["labels", "labels"]
    np.testing.assert_array_equal(got["img_b"], b)
    np.testing.assert_array_equal(got["img_a"] > 0, a2 > 0)
    assert len(np.unique(got["img_a"])) == len(np.unique(a2))


def test_kaggle_csv_size_from_open_image_else_clear_error(tmp_path):
    lab = _labels(3)
    out = tmp_path / "sub.csv"
    export_csv(out, {"img_a": lab}, "kaggle")
    with pytest.raises(InputError, match="image size unknown for img_a"):
        csv_to_layer_data(out, layers=[])
    opened = Image("img_a", np.zeros((40, 50, 3)), rgb=True)
    assert shape_from_layers("img_a", [opened]) == (40, 50)
    (data, meta, kind), = csv_to_layer_data(out, layers=[opened])
    np.testing.assert_array_equal(data, lab)
    assert meta["name"] == "img_a cells"


def test_header_only_csv_export_into_it_and_open_it(tmp_path):
    """The header-only CSV of a `cellseg predict` run where every image failed: exporting into
    it keeps its format; opening it says there is nothing to show (one line, no traceback)."""
    out = tmp_path / "sub.csv"
    out.write_text("id,predicted\n")
    with pytest.raises(InputError, match=r"sub.csv has no rows after the header \(no image\): no masks"):
        get_reader(str(out))(str(out))
    lab = _labels(4)
    assert export_csv(out, {"img_a": lab}, "kaggle") == len(np.unique(lab)) - 1
    assert read_annotations(out).format == "kaggle" and read_annotations(out).ids == ["img_a"]


def test_stack_layer_exports_every_plane(tmp_path):
    stack = np.zeros((3, 40, 50), np.int32)
    stack[2] = _labels(4)
    lyr = FakeLayer(name="s cells", data=stack, metadata={"napari_cellseg": Result("s", "s", plane=(2,))})
    items = labels_items(lyr)
    # same id rule as `cellseg predict` on a stack; empty planes too (a 'no cell' row)
    assert list(items) == ["s_000", "s_001", "s_002"]
    out = tmp_path / "s.csv"
    export_csv(out, items, "starter")
    src = Image("s", np.zeros((3, 40, 50)))
    (data, meta, _), = csv_to_layer_data(out, layers=[src])
    # reopens as the stack (its plane count from the open image), not as a 2D layer "s_002 cells"
    np.testing.assert_array_equal(data, stack)
    assert meta["name"] == "s cells" and meta["metadata"]["image_id"] == "s"


def test_stack_csv_round_trips_as_one_stack_layer(tmp_path):
    """`<stem>_000...` ids open as one stack-shaped Labels layer; exporting
    it again gives the same rows."""
    stack = np.zeros((4, 40, 50), np.int32)
    stack[0], stack[1], stack[3] = _labels(1), _labels(2), _labels(3)
    lyr = FakeLayer(name="stack4 cells", data=stack, metadata={"napari_cellseg": Result("stack4", "stack4")})
    out = tmp_path / "stack.csv"
    export_csv(out, labels_items(lyr), "train")  # width/height columns: no open image needed
    layers = csv_to_layer_data(out)
    assert [m["name"] for _, m, _ in layers] == ["stack4 cells"]
    data, meta, kind = layers[0]
    assert kind == "labels" and data.shape == (4, 40, 50)
    np.testing.assert_array_equal(data, stack)
    again = tmp_path / "again.csv"
    export_csv(again, labels_items(FakeLayer(name="stack4 cells", data=data, metadata=meta["metadata"])),
               "train")
    assert read_annotations(again).ids == read_annotations(out).ids == [f"stack4_00{i}" for i in range(4)]
    # a lone `<stem>_007` id with no open stack of that name stays a 2D layer
    single = tmp_path / "single.csv"
    export_csv(single, {"img_007": _labels(4)}, "train")
    assert [m["name"] for _, m, _ in csv_to_layer_data(single)] == ["img_007 cells"]


@pytest.mark.parametrize("fmt", ["kaggle", "starter", "train"])
def test_reexport_after_deleting_a_plane_and_trailing_empty_planes(tmp_path, fmt):
    """Deleting every cell of one plane and exporting again must drop that plane's old rows; a
    stack whose last planes are empty reopens with all its planes."""
    stack = np.zeros((4, 40, 50), np.int32)
    stack[0], stack[2] = _labels(1), _labels(2)
    meta = {"napari_cellseg": Result("st", "st")}
    out = tmp_path / "st.csv"
    export_csv(out, labels_items(FakeLayer(name="st cells", data=stack, metadata=meta)), fmt)
    edited = stack.copy()
    edited[2] = 0  # the user deleted every cell of plane 2
    export_csv(out, labels_items(FakeLayer(name="st cells", data=edited, metadata=meta)), fmt)
    ann = read_annotations(out)
    assert ann.ids == ["st_000", "st_001", "st_002", "st_003"]
    assert ann.rles("st_002") == [] and ann.rles("st_003") == []
    src = Image("st", np.zeros((4, 40, 50)))
    (data, lmeta, _), = csv_to_layer_data(out, layers=[] if fmt == "train" else [src])
    assert data.shape == (4, 40, 50)  # the trailing empty plane is back
    np.testing.assert_array_equal(data, edited)


def test_plane_like_ids_that_are_not_one_stack_open_as_separate_layers(tmp_path, monkeypatch):
    """`scan_001` (40x50) and `scan_002` (30x20) are two images, not a stack (the whole CSV was
    refused); `run_000` + `run_100000` must not allocate a 100001-plane array."""
    sizes = tmp_path / "sizes.csv"
    export_csv(sizes, {"scan_001": _labels(1), "scan_002": _labels(2, shape=(30, 20), n=2)}, "train")
    layers = csv_to_layer_data(sizes)
    assert [(m["name"], d.shape) for d, m, _ in layers] == [("scan_001 cells", (40, 50)),
                                                            ("scan_002 cells", (30, 20))]
    sparse = tmp_path / "sparse.csv"
    export_csv(sparse, {"run_000": _labels(1), "run_100000": _labels(2)}, "train")
    assert [(m["name"], d.shape) for d, m, _ in csv_to_layer_data(sparse)] == [
        ("run_000 cells", (40, 50)), ("run_100000 cells", (40, 50))]
    # a dense run of same-size planes is still one stack...
    dense = tmp_path / "dense.csv"
    export_csv(dense, {"d_000": _labels(1), "d_002": _labels(2)}, "train")
    (data, meta, _), = csv_to_layer_data(dense)
    assert data.shape == (3, 40, 50) and meta["name"] == "d cells"
    # ...unless the stack would pass the memory bound
    import napari_cellseg.gui.layers as layers_mod
    monkeypatch.setattr(layers_mod, "MAX_STACK_PIXELS", 3 * 40 * 50 - 1)
    assert [m["name"] for _, m, _ in csv_to_layer_data(dense)] == ["d_000 cells", "d_002 cells"]


def test_export_nothing_segmented_writes_nothing(tmp_path):
    with pytest.raises(InputError, match="nothing segmented"):
        export_items([FakeLayer(name="x", data=_labels(), metadata={})])


def test_napari_writer_keeps_other_ids_and_format(tmp_path):
    out = tmp_path / "w.csv"
    a, b = _labels(5), _labels(6)
    assert write_labels(str(out), a, {"name": "first cells", "metadata": {}}) == [str(out)]
    assert read_annotations(out).format == "train"  # new file: self-describing sizes
    write_labels(str(out), b, {"name": "second", "metadata": {"image_id": "two"}})
    ann = read_annotations(out)
    assert ann.ids == ["first", "two"]
    np.testing.assert_array_equal(ann.labels("first"), a)
    np.testing.assert_array_equal(ann.labels("two"), b)
    write_labels(str(out), np.zeros_like(a), {"name": "first cells", "metadata": {}})
    ann = read_annotations(out)
    assert ann.labels("first").max() == 0 and ann.labels("two").max() == b.max()


def test_reader_ignores_other_files():
    assert get_reader("image.tif") is None
    assert get_reader(["a.csv", "b.csv"]) is None
    assert get_reader("CELLS.CSV") is not None


def test_draw_labels_hands_the_thresholds_object_to_the_detections():
    """The sliders' Thresholds travel as one object: no keyword filtering, no dict copies."""
    from napari_cellseg.gui.layers import draw_labels
    from napari_cellseg.options import Thresholds

    seen = []

    class Dets:
        def to_labels(self, thresholds):
            seen.append(thresholds)
            return np.zeros((2, 2), np.int32)

    t = Thresholds(box_conf=0.3, mask_threshold=0.4, min_area=5, fill_holes=True, keep_largest=True)
    draw_labels(Dets(), t)
    assert seen == [t] and seen[0] is t


def test_one_plane_stack_exports_under_the_id_predict_gives_its_file(tmp_path):
    """A 1xHxW stack is one plane (images.layout): cellseg predict names the file's row ``one``;
    the widget export of the same (1, H, W) layer named it ``one_000`` (one rule: images.plane_id)."""
    import tifffile

    from napari_cellseg.commands.predict import expand_items
    from napari_cellseg.io.files import LabelFiles, files_by_id

    stack = _labels(5)[None]
    tifffile.imwrite(tmp_path / "one.tif", stack.astype(np.uint16))
    predict_ids = [item.image_id for item in expand_items([tmp_path / "one.tif"])]
    lyr = FakeLayer(name="one cells", data=stack, metadata={"napari_cellseg": Result("one", "one", plane=(0,))})
    assert list(labels_items(lyr)) == predict_ids == ["one"]
    assert list(LabelFiles(files_by_id([tmp_path], "labels"))) == predict_ids
    out = tmp_path / "one.csv"
    export_csv(out, labels_items(lyr), "train")
    assert read_annotations(out).ids == ["one"]


def test_hand_cells_and_merge_kept():
    """What "keep my cells" keeps: every cell the user changed (painted, grown, new), and
    earlier kept cells; the model's cells then fill around them, never over them."""
    from napari_cellseg.gui.layers import hand_cells, merge_kept

    drawn = np.zeros((20, 20), np.int32)
    drawn[2:6, 2:6] = 1
    drawn[10:15, 10:15] = 2
    current = drawn.copy()
    current[10:15, 15:17] = 2  # cell 2 grown by hand
    current[0:2, 17:20] = 9  # a new cell painted
    kept = hand_cells(current, drawn)
    assert set(np.unique(kept)) == {0, 2, 9} and (kept == 2).sum() == 25 + 10
    assert (hand_cells(current, 0) > 0).sum() == (current > 0).sum()  # never segmented: all kept
    model = np.zeros((20, 20), np.int32)
    model[10:15, 10:14] = 1  # the same cell as the kept 2: dropped
    model[2:6, 2:6] = 2  # elsewhere: kept, renumbered above the kept ids
    merged = merge_kept(kept, model)
    assert set(np.unique(merged)) == {0, 2, 9, 10}
    assert np.array_equal(merged == 2, kept == 2) and (merged == 10).sum() == 16
    assert merge_kept(None, model) is model


def test_result_layers_are_16_bit_while_the_ids_fit():
    from napari_cellseg.gui.layers import label_dtype

    assert label_dtype(2000) == np.uint16 and label_dtype(65534) == np.uint16
    assert label_dtype(65535) == np.int32 and label_dtype(10**6) == np.int32
