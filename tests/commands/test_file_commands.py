"""`cellseg to-labels | to-csv | evaluate` run as subprocesses."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_cellseg.io.annotations import read_annotations


def cellseg(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "napari_cellseg.commands.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def label_dir(tmp_path, nuclei_label_slices):
    folder = tmp_path / "labels"
    folder.mkdir()
    for image_id, labels in nuclei_label_slices.items():
        tifffile.imwrite(folder / f"{image_id}.tif", labels.astype(np.uint16))
    return folder


def test_help_for_every_command():
    for command in ("to-labels", "to-csv", "evaluate"):
        result = cellseg(command, "--help")
        assert result.returncode == 0 and "usage: cellseg " + command in result.stdout


def test_round_trip_and_evaluate(tmp_path, label_dir, nuclei_label_slices):
    csv = tmp_path / "train.csv"
    assert cellseg("to-csv", label_dir, "--out", csv, "--format", "train").returncode == 0
    assert read_annotations(csv).ids == list(nuclei_label_slices)
    out = tmp_path / "back"
    result = cellseg("to-labels", csv, "--out", out)
    assert result.returncode == 0, result.stderr
    for image_id, labels in nuclei_label_slices.items():
        back = tifffile.imread(out / f"{image_id}.tif")
        assert back.shape == labels.shape and (back > 0).sum() == (labels > 0).sum()
        assert len(np.unique(back)) == len(np.unique(labels))
        assert len(np.unique(np.stack([labels.ravel(), back.ravel()]), axis=1).T) == len(np.unique(labels))
    result = cellseg("evaluate", "--gt", label_dir, "--pred", csv, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mean_map"] == 1.0 and report["n_images"] == len(nuclei_label_slices)
    assert all(r["fp"] == 0 and r["fn"] == 0 for r in report["images"])


def test_to_labels_never_overwrites_an_input_image(tmp_path, label_dir, nuclei_label_slices):
    """to-labels --images DIR --out DIR: the label TIFF <id>.tif would replace the image <id>.tif
    it took the size from (before: silently overwritten). Exit 2, nothing written."""
    csv = tmp_path / "sub.csv"
    assert cellseg("to-csv", label_dir, "--out", csv).returncode == 0  # kaggle: sizes from --images
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for image_id in nuclei_label_slices:
        tifffile.imwrite(images / f"{image_id}.tif", (rng.random((256, 256)) * 60000).astype(np.uint16))
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    result = cellseg("to-labels", csv, "--out", images, "--images", images)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cellseg to-labels: error: --out {images}: ")
    assert "overwrite the input " in lines[0]
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_to_csv_out_never_overwrites_a_label_image(tmp_path, label_dir):
    """to-csv LABELS --out LABELS/x.tif (a label file given as --out) was replaced by the CSV."""
    target = sorted(label_dir.iterdir())[0]
    before = target.read_bytes()
    result = cellseg("to-csv", label_dir, "--out", target)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"cellseg to-csv: error: --out: writing {target} would overwrite the input {target}; choose another file"]
    assert target.read_bytes() == before


def test_label_stack_gives_one_id_per_plane_as_predict_names_them(tmp_path, nuclei_label_slices):
    """A ground-truth label stack nuc.tif (Z x H x W) is nuc_000, nuc_001 .. for to-csv and evaluate,
    the ids cellseg predict writes for the planes of the image stack nuc.tif (before: "not a 2-D
    integer label image" / "cannot take an image size from a stack", exit 2)."""
    planes = list(nuclei_label_slices.values())
    gt = tmp_path / "gt"
    gt.mkdir()
    tifffile.imwrite(gt / "nuc.tif", np.stack(planes).astype(np.uint16))
    csv = tmp_path / "gt.csv"
    result = cellseg("to-csv", gt, "--out", csv, "--format", "train")
    assert result.returncode == 0, result.stderr
    assert read_annotations(csv).ids == ["nuc_000", "nuc_001", "nuc_002"]
    for k, labels in enumerate(planes):
        assert np.array_equal(read_annotations(csv).labels(f"nuc_{k:03d}") > 0, labels > 0)
    kaggle = tmp_path / "pred.csv"
    assert cellseg("to-csv", gt, "--out", kaggle).returncode == 0
    for args in (("--gt", gt, "--pred", kaggle), ("--gt", csv, "--pred", gt)):
        result = cellseg("evaluate", *args, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["mean_map"] == 1.0 and [r["id"] for r in report["images"]] == ["nuc_000", "nuc_001", "nuc_002"]
    tifffile.imwrite(gt / "nuc_001.tif", planes[1].astype(np.uint16))  # the same id twice
    result = cellseg("evaluate", "--gt", gt, "--pred", kaggle)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cellseg evaluate: error: {gt / 'nuc_001.tif'}: image id 'nuc_001' also given by {gt / 'nuc.tif'} [plane 1]"]


@pytest.mark.parametrize("fmt", ["starter", "train"])
def test_merge_keeps_the_format_of_out(tmp_path, label_dir, nuclei_label_slices, fmt):
    """to-csv --merge without --format adds rows in the file's own format (before: the default
    kaggle converted a starter / train file, dropping its idx or width/height columns)."""
    first, *rest = sorted(label_dir.iterdir())
    csv = tmp_path / "sub.csv"
    assert cellseg("to-csv", first, "--out", csv, "--format", fmt).returncode == 0
    result = cellseg("to-csv", *rest, "--out", csv, "--merge")
    assert result.returncode == 0, result.stderr
    assert f"({fmt} format)" in result.stdout
    ann = read_annotations(csv)
    assert ann.format == fmt and sorted(ann.ids) == sorted(nuclei_label_slices)


def test_float_label_images_with_whole_ids_are_read(tmp_path, nuclei_label_slices):
    """A 32-bit float label TIFF (as ImageJ / Fiji save them) with whole-number ids: cellseg-train
    took it, to-csv / evaluate refused it ("not a 2-D integer label image"). Now one rule
    (files.integer_labels): whole numbers are ids, anything else one line naming the file."""
    image_id, labels = next(iter(nuclei_label_slices.items()))
    gt, csv = tmp_path / "gt", tmp_path / "gt.csv"
    gt.mkdir()
    tifffile.imwrite(gt / f"{image_id}.tif", labels.astype(np.float32))
    result = cellseg("to-csv", gt, "--out", csv, "--format", "train")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(read_annotations(csv).labels(image_id) > 0, labels > 0)
    assert len(read_annotations(csv).rles(image_id)) == len(np.unique(labels)) - 1
    bad = labels.astype(np.float32)
    bad[3, 4] = 2.5
    tifffile.imwrite(gt / f"{image_id}.tif", bad)
    result = cellseg("evaluate", "--gt", gt, "--pred", csv)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cellseg evaluate: error: {gt / image_id}.tif: label image has non-integer values (e.g. 2.5): "
        "instance ids must be whole numbers"]


def test_negative_label_ids_are_refused_by_every_command(tmp_path, nuclei_label_slices):
    """A label image with negative ids: evaluate scored them as cells (mAP 1.0 against itself)
    while to-csv refused it naming only the id ("image 'a': negative label -35") and cellseg-train
    refused it too. One rule now (files.integer_labels), one line naming the file, exit 2."""
    from training.data import DataError, labels_to_layers

    image_id, labels = next(iter(nuclei_label_slices.items()))
    gt = tmp_path / "gt"
    gt.mkdir()
    path = gt / f"{image_id}.tif"
    tifffile.imwrite(path, -labels.astype(np.int16))
    expected = f"{path}: label image has negative ids (e.g. {-int(labels.max())}): instance ids are 0 (background) or positive"
    for command, args in (("evaluate", ("--gt", gt, "--pred", gt)), ("to-csv", (gt, "--out", tmp_path / "x.csv"))):
        result = cellseg(command, *args)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"cellseg {command}: error: {expected}"]
    with pytest.raises(DataError, match="label image has negative ids"):
        labels_to_layers(-labels.astype(np.int16), str(path))


def test_kaggle_sizes_from_flag_images_or_gt(tmp_path, label_dir, nuclei_label_slices):
    csv = tmp_path / "sub.csv"
    assert cellseg("to-csv", label_dir, "--out", csv).returncode == 0  # kaggle: no sizes
    result = cellseg("to-labels", csv, "--out", tmp_path / "o1")
    assert result.returncode == 2 and "unknown width/height" in result.stderr
    assert not (tmp_path / "o1").exists()  # nothing written before failing
    assert cellseg("to-labels", csv, "--out", tmp_path / "o2", "--shape", "256x256").returncode == 0
    assert cellseg("to-labels", csv, "--out", tmp_path / "o3", "--images", label_dir).returncode == 0
    assert len(list((tmp_path / "o3").glob("*.tif"))) == len(nuclei_label_slices)
    # prediction with one image missing and one cell removed, sizes taken from the GT folder
    first, *rest = nuclei_label_slices
    pred = tmp_path / "pred"
    pred.mkdir()
    for image_id in rest:
        labels = nuclei_label_slices[image_id].copy()
        labels[labels == labels.max()] = 0
        tifffile.imwrite(pred / f"{image_id}.tif", labels)
    result = cellseg("evaluate", "--gt", csv, "--pred", pred, "--shape", "256x256", "--json")
    report = json.loads(result.stdout)
    scores = {r["id"]: r for r in report["images"]}
    assert scores[first]["map"] == 0.0 and report["missing_predictions"] == [first]
    assert all(scores[i]["fn"] == 1 and 0.9 < scores[i]["map"] < 1 for i in rest)
    text = cellseg("evaluate", "--gt", csv, "--pred", pred, "--shape", "256x256")
    assert text.returncode == 0 and f"mean mAP over {len(scores)} images: " in text.stdout


BAD_CSV = {
    "missing column": "id,annotation,width\na,1 2,3\n",
    "token": "id,annotation,width,height\na,1 x,3,3\n",
    "past end": "id,annotation,width,height\na,9 3,3,3\n",
    "empty": "",
}


@pytest.mark.parametrize("name", list(BAD_CSV))
def test_bad_csv_exit_2_one_line(tmp_path, name):
    path = tmp_path / "bad.csv"
    path.write_text(BAD_CSV[name])
    result = cellseg("to-labels", path, "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cellseg to-labels: error: {path}: ")
    assert name == "empty" or "row " in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_binary_and_bad_images(tmp_path):
    binary = tmp_path / "bin.csv"
    binary.write_bytes(bytes(range(256)))
    result = cellseg("evaluate", "--gt", binary, "--pred", binary)
    assert result.returncode == 2 and "binary file" in result.stderr
    (tmp_path / "lab").mkdir()
    tifffile.imwrite(tmp_path / "lab" / "a.tif", np.zeros((2, 3, 4, 5), np.uint16))
    out = tmp_path / "x.csv"
    result = cellseg("to-csv", tmp_path / "lab", "--out", out)
    assert result.returncode == 2 and "a.tif: 4-D image (shape (2, 3, 4, 5)) is not supported" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".x.csv*"))  # no half-written file
    result = cellseg("to-csv", tmp_path / "nothing", "--out", out)
    assert result.returncode == 2 and "not found" in result.stderr


def test_usage_errors_exit_2():
    assert cellseg().returncode == 2
    assert cellseg("to-labels", "a.csv", "--out", "o", "--shape", "big").returncode == 2


def test_commands_do_not_import_torch(tmp_path, label_dir):
    code = ("import sys; from napari_cellseg.commands.main import main; "
            f"rc = main(['to-csv', {str(label_dir)!r}, '--out', {str(tmp_path / 'a.csv')!r}]); "
            f"rc += main(['evaluate', '--gt', {str(label_dir)!r}, '--pred', {str(tmp_path / 'a.csv')!r}]); "
            "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split()[-2:] == ["0", "False"], result.stderr


def test_file_ids_are_normalised_like_the_csv_ids(tmp_path):
    """evaluate reads ' a.tif' as id 'a', as to-csv wrote it: the prediction is found."""
    gt = tmp_path / "gt"
    gt.mkdir()
    labels = np.zeros((32, 40), np.uint16)
    labels[4:12, 5:15], labels[20:28, 20:30] = 1, 2
    tifffile.imwrite(gt / " a.tif", labels)
    csv = tmp_path / "p.csv"
    assert cellseg("to-csv", gt, "--out", csv).returncode == 0
    result = cellseg("evaluate", "--gt", gt, "--pred", csv, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["id"] for r in report["images"]] == ["a"] and report["mean_map"] == 1.0


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="needs non-UTF-8 file names (Linux)")
def test_to_csv_skips_a_non_utf8_file_name_with_one_line(tmp_path):
    import os

    folder = tmp_path / "labels"
    folder.mkdir()
    labels = np.zeros((16, 16), np.uint16)
    labels[2:8, 2:8] = 1
    tifffile.imwrite(folder / "good.tif", labels)
    tifffile.imwrite(folder / "tmp.tif", labels)
    os.rename(folder / "tmp.tif", os.path.join(os.fsencode(folder), b"bad\xff.tif"))
    csv = tmp_path / "p.csv"
    result = cellseg("to-csv", folder, "--out", csv)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "codec" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line and "UTF-8" in line]
    assert any("bad\\xff.tif" in line for line in skipped), result.stderr
    assert read_annotations(csv).ids == ["good"]


def test_header_only_csv_is_an_empty_submission(tmp_path, label_dir, nuclei_label_slices):
    """A header-only CSV (`cellseg predict` where every image failed) is a valid empty submission:
    evaluate scores every ground-truth image as an empty prediction (as for an image missing
    from the predictions) with one line saying so; as ground truth it is one clear error;
    to-labels writes no image. Before: every command stopped with "no data rows"."""
    empty = tmp_path / "empty.csv"
    empty.write_text("id,predicted\n")
    result = cellseg("evaluate", "--gt", label_dir, "--pred", empty, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_images"] == len(nuclei_label_slices) and report["missing_predictions"] == list(nuclei_label_slices)
    assert all(r["n_pred"] == 0 and r["fn"] == r["n_gt"] and r["map"] == (r["n_gt"] == 0) for r in report["images"])
    assert report["mean_map"] == 0.0  # every slice has cells
    assert result.stderr.strip() == (f"cellseg evaluate: note: {empty} has no rows after the header (no image): "
                                      "every image scored as an empty prediction")
    # the same scores as a predictions file that lists none of these ids (one rule)
    other = tmp_path / "other.csv"
    other.write_text("id,predicted\nnot_an_image,1 2\n")
    same = json.loads(cellseg("evaluate", "--gt", label_dir, "--pred", other, "--json").stdout)
    assert same["images"] == report["images"] and same["mean_map"] == report["mean_map"]
    result = cellseg("evaluate", "--gt", label_dir, "--pred", empty)  # the table: one note, not two
    assert result.returncode == 0 and "mean mAP over" in result.stdout
    assert result.stderr.count("\n") == 1 and "no rows after the header" in result.stderr

    result = cellseg("evaluate", "--gt", empty, "--pred", label_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"cellseg evaluate: error: {empty} has no rows after the header "
                                      "(no image): no ground truth to score against")

    result = cellseg("to-labels", empty, "--out", tmp_path / "decoded", "--shape", "20x30")
    assert result.returncode == 0 and "wrote 0 label images" in result.stdout
    assert "no rows after the header" in result.stderr and list((tmp_path / "decoded").iterdir()) == []


def test_a_run_folder_given_as_checkpoint_names_the_model_inside(tmp_path):
    """`--checkpoint runs/exp1` (the training OUT folder) said "checkpoint file not found" about a
    folder that exists; now one line saying it is a folder and naming the best_model.bin in it,
    for predict (CLI, exit 2) and the Train widget's start-from field (one rule)."""
    from napari_cellseg.gui.train.form import form_to_config
    from training.data import DataError

    run = tmp_path / "exp1"
    run.mkdir()
    (run / "best_model.bin").write_bytes(b"x")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((16, 16), np.uint8))
    result = cellseg("predict", tmp_path / "a.tif", "--checkpoint", run, "--out", tmp_path / "s.csv")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"{run}: is a folder, not a checkpoint file; did you mean {run / 'best_model.bin'}?"), result.stderr
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(DataError, match=r"^start from: .*exp1: is a folder, not a checkpoint file; did you mean"):
        form_to_config({"source": "folders", "image_dir": "x", "label_dir": "y", "out": str(tmp_path / "o"),
                        "init_checkpoint": str(run), "epochs": 1, "batch_size": 1, "crop_size": 0,
                        "steps_per_epoch": 0})


def test_evaluate_ignores_an_unreadable_extra_prediction_file(tmp_path, nuclei_label_slices):
    """A file of --pred whose header cannot be read and that no ground truth names is reported as
    an extra prediction, not an abort (its error is raised only when its id is read)."""
    labels = next(iter(nuclei_label_slices.values())).astype(np.uint16)
    for name in ("gt", "pred"):
        (tmp_path / name).mkdir()
        tifffile.imwrite(tmp_path / name / "a.tif", labels)
    (tmp_path / "pred" / "notes.tif").write_bytes(b"not a tiff at all")
    result = cellseg("evaluate", "--gt", tmp_path / "gt", "--pred", tmp_path / "pred")
    assert result.returncode == 0, result.stderr
    assert "mean mAP over 1 images: 1.0000" in result.stdout
    assert "1 predicted images are not in the ground truth (ignored)" in result.stderr
    (tmp_path / "gt" / "notes.tif").write_bytes(b"not a tiff at all")  # read: one line, exit 2
    result = cellseg("evaluate", "--gt", tmp_path / "gt", "--pred", tmp_path / "pred")
    assert result.returncode == 2 and "notes.tif" in result.stderr


def test_check_not_inputs_stats_no_target_of_a_missing_folder(tmp_path, monkeypatch):
    """cellseg predict --labels-dir NEW: one target per image; none can be an input while the
    folder does not exist, so its targets are not stat-ed one by one (nor any, with no inputs)."""
    import os

    from napari_cellseg.io.files import check_not_inputs

    image = tmp_path / "a.tif"
    image.write_bytes(b"x")
    targets = [tmp_path / "new" / f"{k}.tif" for k in range(50)]
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: calls.append(p) or real_stat(p, *a, **k))
    check_not_inputs(targets, [image], "--labels-dir new")
    assert len(calls) <= 1
    calls.clear()
    check_not_inputs([tmp_path / f"{k}.tif" for k in range(50)], [], "--labels-dir")
    assert calls == []
    with pytest.raises(ValueError, match="would overwrite the input"):  # still refused
        check_not_inputs([tmp_path / "b.tif", image], [image], "--labels-dir")
