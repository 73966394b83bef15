"""training.data / augment: sources, layers, augmentation sync, split, bad input."""

from __future__ import annotations

import numpy as np
import pytest
torch = pytest.importorskip("torch")
import tifffile
from skimage.draw import disk, ellipse

from training.augment import test_pipeline as eval_pipeline, train_pipeline
from training.data import (DataError, array_samples, labels_to_layers, load_csv_samples, load_folder_samples,
                           masks_to_layers, rles_to_layers, split_samples)
from training.dataset import EpochSampler, InstanceDataset, expand_masks, layers_to_instances


def synth(seed: int, shape=(128, 128), n=6):
    """Grey uint16 image with n bright discs/ellipses and its instance labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        r, c = rng.integers(15, shape[0] - 15), rng.integers(15, shape[1] - 15)
        rr, cc = (disk((r, c), rng.integers(5, 12), shape=shape) if i % 2 else
                  ellipse(r, c, rng.integers(4, 9), rng.integers(8, 14), shape=shape, rotation=rng.random() * 3))
        labels[rr, cc] = i
    image = (labels > 0) * 30000 + rng.integers(0, 3000, shape)
    return image.astype(np.uint16), labels


def write_folder(root, n=5, shape=(128, 128)):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(n):
        im, lab = synth(k, shape)
        tifffile.imwrite(root / "images" / f"s{k}.tif", im)
        tifffile.imwrite(root / "labels" / f"s{k}.tif", lab)
    return root / "images", root / "labels"


def test_rles_to_layers_equals_decoded_masks_to_layers():
    """The training CSV path builds layers straight from the runs; it must give exactly the layers
    of the decoded masks (overlaps, an empty RLE, runs across row ends, the last pixel)."""
    from napari_cellseg.io.rle import rle_decode, rle_encode

    rng = np.random.default_rng(3)
    shape = (37, 53)
    masks = []
    for _ in range(40):
        m = np.zeros(shape, bool)
        y, x = rng.integers(0, shape[0] - 5), rng.integers(0, shape[1] - 5)
        m[y:y + rng.integers(1, 12), x:x + rng.integers(1, 20)] = True
        masks.append(m)
    wrap = np.zeros(shape, bool); wrap.ravel()[45:70] = True  # one run over a row end
    last = np.zeros(shape, bool); last.ravel()[-3:] = True
    masks += [np.zeros(shape, bool), wrap, last]
    rles = [rle_encode(m) for m in masks]
    expected = masks_to_layers([rle_decode(r, shape) for r in rles], shape)
    got = rles_to_layers(rles, shape)
    assert expected.shape[0] > 1  # the random boxes overlap, so there are several layers
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert np.array_equal(rles_to_layers([], shape), np.zeros((1, *shape), np.uint16))


def test_overlapping_masks_survive_in_layers():
    a = np.zeros((40, 40), bool); a[5:20, 5:20] = True
    b = np.zeros((40, 40), bool); b[15:30, 15:30] = True  # overlaps a
    c = np.zeros((40, 40), bool); c[32:38, 0:8] = True
    layers = masks_to_layers([a, b, c], (40, 40))
    assert layers.shape[0] == 2
    masks, boxes, areas = layers_to_instances(layers)
    got = sorted(int(m.sum()) for m in masks)
    assert got == sorted([a.sum(), b.sum(), c.sum()])
    assert any(np.array_equal(m.astype(bool), b) for m in masks)


def test_instances_drop_degenerate_and_boxes_fit_masks():
    lab = np.zeros((30, 30), np.int32); lab[2:10, 3:12] = 7; lab[20, 20] = 9; lab[15:17, 0:1] = 3
    masks, boxes, areas = layers_to_instances(labels_to_layers(lab))
    assert len(masks) == 1 and areas[0] == 72
    assert boxes.tolist() == [[3, 2, 12, 10]]


def test_augmented_boxes_always_match_masks():
    im, lab = synth(3)
    ds = InstanceDataset(array_samples([im], [lab]), train_pipeline(crop_size=96, scale_range=(0.5, 2.0), seed=1), 12)
    sizes = []
    for i in range(len(ds)):
        img, t = ds[i]
        t = expand_masks(t)
        assert img.shape == (3, 96, 96) and img.dtype.is_floating_point and 0 <= img.min() and img.max() <= 1
        for m, b in zip(t["masks"].numpy(), t["boxes"].numpy()):
            ys, xs = np.nonzero(m)
            assert b.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert t["area"].tolist() == [float(m.sum()) for m in t["masks"].numpy()]
        if len(t["area"]):
            sizes.append(float(np.sqrt(t["area"].numpy()).max()))
    assert max(sizes) / min(sizes) > 1.5  # scale augmentation changes object sizes


def test_test_pipeline_resizes_only():
    im, lab = synth(1)
    ds = InstanceDataset(array_samples([im], [lab]), eval_pipeline(64, 48))
    a, ta = ds[0]
    b, tb = ds[0]
    assert a.shape == (3, 48, 64) and np.array_equal(a.numpy(), b.numpy())


def test_folder_source_stacks_and_mismatch(tmp_path):
    images, labels = write_folder(tmp_path / "ok", n=3)
    samples = load_folder_samples(images, labels)
    assert [s.image_id for s in samples] == ["s0", "s1", "s2"] and samples[0].n_instances == 6
    stack_dir = tmp_path / "stack"
    (stack_dir / "im").mkdir(parents=True); (stack_dir / "lab").mkdir()
    ims, labs = zip(*(synth(k) for k in range(4)))
    labs = list(labs); labs[1] = np.zeros_like(labs[1])
    zyx = {"metadata": {"axes": "ZYX"}}  # without axes a first axis of 2-5 is channels (CxYxX)
    tifffile.imwrite(stack_dir / "im" / "st.tif", np.stack(ims), **zyx)
    tifffile.imwrite(stack_dir / "lab" / "st.tif", np.stack(labs).astype(np.uint32), **zyx)
    assert [s.image_id for s in load_folder_samples(stack_dir / "im", stack_dir / "lab")] == ["st_000", "st_002", "st_003"]
    tifffile.imwrite(labels / "s1.tif", np.zeros((100, 128), np.int32))
    with pytest.raises(DataError, match="s1.tif.*128x128.*128x100"):
        load_folder_samples(images, labels)


def test_csv_source_decodes_once_and_names_missing_rows(tmp_path):
    from napari_cellseg.io.annotations import write_annotations
    import imageio.v3 as iio

    (tmp_path / "img").mkdir()
    items = {}
    for k in range(3):
        im, lab = synth(k)
        iio.imwrite(tmp_path / "img" / f"id{k}.png", (im >> 8).astype(np.uint8))
        items[f"id{k}"] = lab
    csv = tmp_path / "train.csv"
    write_annotations(csv, items, format="train")
    samples = load_csv_samples(csv, tmp_path / "img")
    for s in samples:
        masks, _, _ = layers_to_instances(s.layers)
        assert len(masks) == len(np.unique(items[s.image_id])) - 1
    (tmp_path / "img" / "id1.png").unlink()
    with pytest.raises(DataError, match=r"train.csv: row \d+.*'id1' not found"):
        load_csv_samples(csv, tmp_path / "img")
    csv.write_text("id,annotation,width,height\n")  # header only: names the file, not "no data rows"
    with pytest.raises(DataError, match=r"train.csv has no rows after the header \(no image\): no annotated"):
        load_csv_samples(csv, tmp_path / "img")


def test_split_is_grouped_and_errors_are_clear():
    samples = array_samples(*zip(*(synth(k) for k in range(10))))
    train, val = split_samples(samples, 0.2, seed=1)
    assert len(val) == 2 and not {s.image_id for s in train} & {s.image_id for s in val}
    assert split_samples(samples, 0.2, seed=1)[1][0].image_id == val[0].image_id
    with pytest.raises(DataError, match="nothing to validate"):
        split_samples(samples, 0.0, seed=1)
    with pytest.raises(DataError, match="nothing to train"):
        split_samples(samples[:1], 0.5, seed=1)
    empty = array_samples([synth(0)[0]] * 2, [np.zeros((128, 128), np.int32)] * 2)
    with pytest.raises(DataError, match="no cells"):
        split_samples(samples[:1] + empty, 0.5, seed=0)



def test_normalize_size_brings_median_diameter_to_target():
    from napari_cellseg.inference.metrics import median_diameter
    from training.data import normalize_size

    lab = np.zeros((80, 96), np.int32)
    for i, (cy, cx) in enumerate([(15, 15), (15, 50), (50, 30), (60, 75)], 1):
        lab[disk((cy, cx), 6, shape=lab.shape)] = i  # diameter ~12
    image = (lab > 0).astype(np.float32) * 0.8
    small, empty = array_samples([image, image], [lab, np.zeros_like(lab)], ["cells", "none"])
    big, same = normalize_size([small, empty], 36.0)
    assert big.image.shape[:2] == big.layers.shape[1:] and big.image.shape[0] > 200  # ~3x larger
    assert abs(median_diameter(big.layers) - 36.0) < 2.0
    assert big.image.dtype == np.float16 and big.layers.dtype == small.layers.dtype
    assert np.array_equal(np.unique(big.layers), np.unique(small.layers))  # every cell kept
    assert same is empty  # nothing to measure: left as it is
    tiles = normalize_size([small], 36.0, max_side=100)  # too large after resizing: cut in tiles
    assert [t.image_id for t in tiles][:2] == ["cells@r0c0", "cells@r0c1"] and len(tiles) == 9
    assert all(max(t.image.shape[:2]) <= 100 and t.image.shape[:2] == t.layers.shape[1:] for t in tiles)
    assert sum(int((t.layers > 0).sum()) for t in tiles) == int((big.layers > 0).sum())


def test_loader_ships_label_layers_and_masks_are_built_on_the_device():
    """The compact target (layers + instance ids) expands to exactly the masks the old loader
    shipped one full-size array per instance, for overlapping (multi-layer) instances too."""
    a = np.zeros((40, 50), bool); a[5:20, 5:20] = True
    b = np.zeros((40, 50), bool); b[15:30, 15:30] = True  # overlaps a: second layer
    c = np.zeros((40, 50), bool); c[32:38, 0:8] = True
    sample = array_samples([synth(0, (40, 50))[0]], [np.zeros((40, 50), np.int32)])[0]
    sample.layers = masks_to_layers([a, b, c], (40, 50))
    for key in (0, (3, 0)):
        compact = InstanceDataset([sample], train_pipeline(crop_size=32, seed=0), seed=5)[key][1]
        full = InstanceDataset([sample], train_pipeline(crop_size=32, seed=0), seed=5, full_masks=True)[key][1]
        assert "masks" not in compact and compact["layers"].dtype == torch.int16
        got = expand_masks(compact, torch.device("cpu"))
        assert got["masks"].dtype == torch.uint8 and torch.equal(got["masks"], full["masks"])
        assert torch.equal(got["boxes"], full["boxes"]) and set(got) == set(full)
    assert len(got["masks"]) >= 1


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_splits_ranks():
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(3)
    assert list(s) != first
    s.set_epoch(2)
    assert list(s) == first and sorted(i for _, i in first) == list(range(10)) and {e for e, _ in first} == {2}
    ranks = [EpochSampler(10, seed=3, world=3, rank=r) for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    parts = [list(r) for r in ranks]
    assert all(len(p) == 4 for p in parts) and {i for p in parts for _, i in p} == set(range(10))


def test_epoch_sampler_with_steps_per_epoch_draws_every_item_over_the_epochs():
    """--steps-per-epoch: 3 draws per epoch from 9 images see all 9 in epochs 1-3, each once;
    over 9 epochs each image is drawn 3 times (in proportion); epoch draws never repeat a key."""
    s = EpochSampler(3, seed=5, n_samples=9)
    seen = []
    for epoch in (1, 2, 3):
        s.set_epoch(epoch)
        seen += [i % 9 for _, i in s]
    assert sorted(seen) == list(range(9))
    counts = np.zeros(9, int)
    for epoch in range(1, 10):
        s.set_epoch(epoch)
        counts += np.bincount([i % 9 for _, i in s], minlength=9)
    assert counts.tolist() == [3] * 9
    many = EpochSampler(20, seed=5, n_samples=9)  # more draws than images: every image, distinct keys
    many.set_epoch(4)
    keys = [i for _, i in many]
    assert len(set(keys)) == 20 and set(k % 9 for k in keys) == set(range(9))
    assert keys == [i for _, i in many]  # a function of (seed, epoch): resume sees the same batches
    ranks = [EpochSampler(3, seed=5, world=2, rank=r, n_samples=9) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    s.set_epoch(1)
    assert {i for r in ranks for _, i in r} == {i for _, i in s}  # DDP: the ranks split the same draws


def test_augmentation_depends_on_epoch_and_index_only():
    im, lab = synth(3)
    ds = InstanceDataset(array_samples([im], [lab]), train_pipeline(crop_size=64, scale_range=(0.5, 2.0), seed=1),
                         8, seed=11)
    x = ds[(2, 5)][0]
    ds[(4, 1)], ds[(2, 6)]  # other items in between (another worker's order)
    assert torch.equal(ds[(2, 5)][0], x) and not torch.equal(ds[(3, 5)][0], x)


# ---- hostile folders and CSVs (red-team findings 2, 7, 10): one rule for ids, planes and channels
def _rgb8(image):
    grey = (image >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _pair_dirs(root):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    return root / "images", root / "labels"


def test_colour_coded_label_image_is_refused_not_read_as_a_stack(tmp_path):
    """An RGB image with a colour-coded RGB label PNG (both HxWx3) was read as a Z-stack of image
    rows (one sample per row); a last axis of 1-4 is channels (images.layout), never planes."""
    import imageio.v3 as iio

    images, labels = _pair_dirs(tmp_path)
    im, lab = synth(0, (48, 64))
    palette = np.random.default_rng(0).integers(1, 255, (lab.max() + 1, 3)).astype(np.uint8)
    palette[0] = 0
    iio.imwrite(images / "a.png", _rgb8(im))
    iio.imwrite(labels / "a.png", palette[lab])
    with pytest.raises(DataError, match=r"a\.png: label image is RGB \(HxWx3\): save instance ids as a "
                                        r"single-channel integer image"):
        load_folder_samples(images, labels)
    iio.imwrite(labels / "a.png", lab.astype(np.uint8))  # RGB image + grey ids: one RGB sample
    (sample,) = load_folder_samples(images, labels)
    assert sample.image_id == "a" and sample.image.shape == (48, 64, 1) and sample.n_instances == 6
    # an RGB stack (ZxHxWx3) with its label stack (ZxHxW): one sample per labelled plane
    ims, labs = zip(*(synth(k, (48, 64)) for k in range(3)))
    tifffile.imwrite(images / "a.tif", np.stack([_rgb8(i) for i in ims]), metadata={"axes": "ZYXS"})
    tifffile.imwrite(labels / "a.tif", np.stack(labs).astype(np.uint16), metadata={"axes": "ZYX"})
    (images / "a.png").unlink(), (labels / "a.png").unlink()
    got = load_folder_samples(images, labels)
    assert [s.image_id for s in got] == ["a_000", "a_001", "a_002"]
    assert all(s.image.shape[:2] == (48, 64) and s.layers.shape == (1, 48, 64) for s in got)
    assert np.array_equal(got[1].layers[0] > 0, labs[1] > 0)


def _stack_csv(tmp_path):
    """images/stack.tif (3 planes) + images/one.png and a train CSV naming stack_000, stack_002, one
    (the ids `cellseg predict` writes for them)."""
    import imageio.v3 as iio
    from napari_cellseg.io.annotations import write_annotations

    (tmp_path / "img").mkdir()
    ims, labs = zip(*(synth(k, (48, 64)) for k in range(4)))
    tifffile.imwrite(tmp_path / "img" / "stack.tif", np.stack(ims[:3]), metadata={"axes": "ZYX"})
    iio.imwrite(tmp_path / "img" / "one.png", (ims[3] >> 8).astype(np.uint8))
    csv = tmp_path / "train.csv"
    write_annotations(csv, {"stack_000": labs[0], "stack_002": labs[2], "one": labs[3]}, format="train")
    return csv, ims, labs


def test_csv_ids_of_stack_planes_read_that_plane(tmp_path):
    """--train-csv with the plane ids tune/predict use (stack_000 .. for images/stack.tif) was
    refused ('image stack_000 not found'); each id now reads its plane of the stack."""
    csv, ims, labs = _stack_csv(tmp_path)
    samples = {s.image_id: s for s in load_csv_samples(csv, tmp_path / "img")}
    assert sorted(samples) == ["one", "stack_000", "stack_002"]
    for image_id, k in (("stack_000", 0), ("stack_002", 2), ("one", 3)):
        assert np.array_equal(samples[image_id].layers[0] > 0, labs[k] > 0)
        assert samples[image_id].n_instances == len(np.unique(labs[k])) - 1
    # the image is that plane, not another one (each plane has its own cells)
    bright = samples["stack_002"].image[..., 0].astype(np.float32) > 0.5
    assert (bright == (labs[2] > 0)).mean() > 0.99


def test_csv_plane_ids_are_checked_like_predict_names_them(tmp_path):
    from napari_cellseg.io.annotations import write_annotations

    csv, ims, labs = _stack_csv(tmp_path)
    for bad, message in (("stack_003", r"row 2 .*'stack_003' not found"),  # plane out of range
                         ("stack_1", r"row 2 .*'stack_1' not found"),  # predict pads to 3 digits
                         ("stack", r"row 2: image 'stack' is .*stack\.tif, a stack of 3 planes: name "
                                   r"its planes stack_000 \.\. stack_002")):
        write_annotations(csv, {bad: labs[0]}, format="train")
        with pytest.raises(DataError, match=message):
            load_csv_samples(csv, tmp_path / "img")
    tifffile.imwrite(tmp_path / "img" / "stack_000.tif", ims[0])  # a file and a plane, one id
    write_annotations(csv, {"stack_000": labs[0]}, format="train")
    with pytest.raises(DataError, match=r"row 2: image id 'stack_000' names both .*stack_000\.tif and "
                                        r"plane 0 of .*stack\.tif"):
        load_csv_samples(csv, tmp_path / "img")
    (tmp_path / "img" / "stack_000.tif").unlink()
    write_annotations(csv, {"stack_001": labs[0][:40]}, format="train")  # size checked per plane
    with pytest.raises(DataError, match=r"row 2: image 'stack_001' is 64x40 .* not 64x48 \(plane 1 of "
                                        r".*stack\.tif\)"):
        load_csv_samples(csv, tmp_path / "img")


def test_same_stem_two_extensions_is_refused_like_the_other_commands(tmp_path):
    """images/a.png + images/a.tif silently trained on a.png; files_by_id refuses one id twice."""
    import imageio.v3 as iio
    from napari_cellseg.io.annotations import write_annotations

    images, labels = write_folder(tmp_path / "f", n=2)
    iio.imwrite(images / "s0.png", np.zeros((128, 128), np.uint8))
    with pytest.raises(DataError, match=r"s0\.tif: image id 's0' also given by .*s0\.png"):
        load_folder_samples(images, labels)
    csv = tmp_path / "train.csv"
    write_annotations(csv, {"s1": synth(1)[1]}, format="train")
    with pytest.raises(DataError, match=r"s0\.tif: image id 's0' also given by .*s0\.png"):
        load_csv_samples(csv, images)


def test_orphan_label_files_are_reported_as_a_warning(tmp_path):
    """A label image whose image is missing was ignored silently."""
    from training.data import DataWarning

    images, labels = write_folder(tmp_path / "f", n=3)
    tifffile.imwrite(labels / "orphan.tif", synth(9)[1])
    tifffile.imwrite(labels / "orphan2.tif", synth(8)[1])
    said = []
    samples = load_folder_samples(images, labels, warn=said.append)
    assert [s.image_id for s in samples] == ["s0", "s1", "s2"]
    assert len(said) == 1 and "2 label image(s) have no image" in said[0] and "orphan.tif" in said[0]
    with pytest.warns(DataWarning, match="orphan.tif"):  # no callback: a Python warning, never silent
        load_folder_samples(images, labels)


def test_non_utf8_file_names_are_skipped_through_the_warning_callback(tmp_path, capsys):
    """cellseg-train printed "cellseg: skipped: ..." (the file commands' wording) on stderr, so
    the Train widget never saw it; now it is one warning through ``warn``, in both sources."""
    import os

    from napari_cellseg.io.annotations import write_annotations

    images, labels = write_folder(tmp_path / "f", n=3)
    os.rename(images / "s2.tif", os.path.join(os.fsencode(images), b"bad\xff.tif"))
    os.rename(labels / "s2.tif", os.path.join(os.fsencode(labels), b"bad\xff.tif"))
    said = []
    samples = load_folder_samples(images, labels, warn=said.append)
    assert [s.image_id for s in samples] == ["s0", "s1"]
    assert len(said) == 2 and all(m.startswith("skipped: ") and "bad\\xff.tif" in m and "UTF-8" in m
                                  for m in said), said
    csv = tmp_path / "train.csv"
    write_annotations(csv, {"s0": synth(0)[1]}, format="train")
    said.clear()
    assert [s.image_id for s in load_csv_samples(csv, images, warn=said.append)] == ["s0"]
    assert len(said) == 1 and "bad\\xff.tif" in said[0]
    assert "skipped" not in capsys.readouterr().err


def test_stack_planes_are_named_as_predict_names_them_and_never_twice(tmp_path):
    """Folder mode named the planes of st.tif st[0] .. while predict, evaluate, to-csv and the
    widget say st_000 ..; the ids are in the checkpoint's info.val_ids. Now one rule
    (images.plane_id), and a plane id that is also another file's id is refused."""
    ims, labs = zip(*(synth(k) for k in range(3)))
    root = tmp_path / "d"
    (root / "im").mkdir(parents=True)
    (root / "lab").mkdir()
    tifffile.imwrite(root / "im" / "st.tif", np.stack(ims), metadata={"axes": "ZYX"})
    tifffile.imwrite(root / "lab" / "st.tif", np.stack(labs).astype(np.uint16), metadata={"axes": "ZYX"})
    assert [s.image_id for s in load_folder_samples(root / "im", root / "lab")] == ["st_000", "st_001", "st_002"]
    tifffile.imwrite(root / "im" / "st_001.tif", ims[0])
    tifffile.imwrite(root / "lab" / "st_001.tif", labs[0])
    with pytest.raises(DataError, match=r"image id 'st_001' is also given by .*st\.tif"):
        load_folder_samples(root / "im", root / "lab")


def test_all_empty_labels_say_so_not_change_the_seed(tmp_path):
    """Every label image empty: 'change --seed or --val-fraction' pointed the wrong way."""
    from training.config import TrainConfig
    from training.data import load_samples

    images, labels = write_folder(tmp_path / "f", n=3)
    for k in range(3):
        tifffile.imwrite(labels / f"s{k}.tif", np.zeros((128, 128), np.uint16))
    config = TrainConfig(image_dir=str(images), label_dir=str(labels), out=str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"no image carries any cells: nothing to train on \(.*labels: every label "
                                        r"image is empty\)"):
        load_samples(config)
    empty = array_samples([synth(0)[0]] * 3, [np.zeros((128, 128), np.int32)] * 3)
    with pytest.raises(DataError, match=r"no image carries any cells"):
        split_samples(empty, 0.34, seed=0)


def test_stack_image_with_a_single_label_plane_is_named_as_a_stack(tmp_path):
    """A 3-plane stack with a 2-D label was reported as 'image is 96x3 (WxH)'."""
    images, labels = write_folder(tmp_path / "f", n=1)
    tifffile.imwrite(images / "s0.tif", np.stack([synth(0)[0]] * 3), metadata={"axes": "ZYX"})
    with pytest.raises(DataError, match=r"s0\.tif: image is a stack of 3 planes of 128x128 but its labels "
                                        r"s0\.tif are a single 128x128 plane: give a label stack"):
        load_folder_samples(images, labels)
    tifffile.imwrite(labels / "s0.tif", np.stack([synth(0)[1]] * 2).astype(np.uint16), metadata={"axes": "ZYX"})
    with pytest.raises(DataError, match=r"labels.s0\.tif: a stack of 2 label planes but the image s0\.tif "
                                        r"has 3 planes"):
        load_folder_samples(images, labels)


@pytest.mark.slow  # two interpreter start-ups importing albumentations
def test_importing_the_augmentations_asks_no_server(tmp_path):
    """albumentations asked PyPI for a newer version whenever training.augment was imported (each
    cellseg-train start, each DataLoader worker): 2 s and a warning on an offline node. An
    explicit NO_ALBUMENTATIONS_UPDATE from the user is still respected."""
    import os
    import subprocess
    import sys

    probe = ("import urllib.request\n"
             "calls = []\n"
             "def opened(self, url, *a, **k):\n"
             "    calls.append(getattr(url, 'full_url', url))\n"
             "    raise OSError('no network in this test')\n"
             "urllib.request.OpenerDirector.open = opened\n"
             "import warnings; warnings.simplefilter('ignore')\n"
             "import training.augment\n"
             "print(len(calls))\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "0", run.stdout + run.stderr[-2000:]
    env["NO_ALBUMENTATIONS_UPDATE"] = "0"  # the user asked for the check: it happens
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "1", run.stdout + run.stderr[-2000:]


def test_label_folder_that_is_the_image_folder_is_refused(tmp_path):
    """--image-dir = --label-dir (images and masks in one folder): every image was matched with
    itself as its label image and trained as thousands of intensity "instances", the masks as
    images, without a word. Now one DataError naming the file, before any pixel is read."""
    images, labels = write_folder(tmp_path / "d", n=2)
    for f in labels.iterdir():
        f.rename(images / f"{f.stem}_masks.tif")
    with pytest.raises(DataError) as info:
        load_folder_samples(images, images)
    assert str(info.value) == (f"{images / 's0.tif'}: the label image of 's0' is the image file itself "
                               "(the label folder is the image folder?); give the folder of the label images")


def test_float_labels_follow_the_same_rule_as_the_file_commands():
    """labels_to_layers (folders, napari layers) and cellseg to-csv / evaluate share one rule for
    float label images (files.integer_labels): whole numbers are ids; NaN or 2.5 are refused."""
    lab = np.zeros((6, 8), np.float32)
    lab[1:3, 1:3], lab[4:, 5:] = 7, 1e6
    layers = labels_to_layers(lab, "lab.tif")
    assert layers.dtype == np.uint16 and sorted(np.unique(layers)) == [0, 1, 2]
    for value in (np.nan, 2.5, np.inf):
        bad = lab.copy()
        bad[0, 0] = value
        with pytest.raises(DataError, match=r"^lab.tif: label image has non-integer values \(e.g. "):
            labels_to_layers(bad, "lab.tif")


def test_binary_masks_given_as_labels_are_reported(tmp_path):
    """A 0/255 mask PNG in --label-dir (a common mix-up with instance labels) trained each image
    as ONE cell spread over every nucleus, without a word. Now one warning naming a file; real
    instance labels (one of them a single cell in one piece) say nothing."""
    import imageio.v3 as iio

    images, labels = write_folder(tmp_path / "f", n=3)
    lab = synth(1)[1]
    one = np.where(lab == lab.max(), 1, 0)
    tifffile.imwrite(labels / "s1.tif", one)  # a single cell in one piece: fine
    said = []
    load_folder_samples(images, labels, warn=said.append)
    assert said == []
    for k in (0, 2):
        (labels / f"s{k}.tif").unlink()
        iio.imwrite(labels / f"s{k}.png", ((synth(k)[1] > 0) * 255).astype(np.uint8))
    samples = load_folder_samples(images, labels, warn=said.append)
    assert [int(s.layers.max()) for s in samples] == [1, 1, 1]
    from scipy import ndimage

    n = ndimage.label(synth(0)[1] > 0, np.ones((3, 3)))[1]  # touching discs: one region
    assert n >= 3
    assert said == [f"{labels}: 2 label image(s) hold one id over many separate regions, e.g. s0.png ({n} "
                    "regions): binary masks, not instance labels? Each cell needs its own id "
                    "(skimage.measure.label numbers a mask); as given, each image trains as one cell"]


def test_binary_mask_warning_counts_label_files_not_planes(tmp_path):
    """A label stack of binary masks is one label image: the warning counted its planes."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    pairs = [synth(k) for k in range(3)]
    tifffile.imwrite(tmp_path / "images" / "z.tif", np.stack([im for im, _ in pairs]), metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "labels" / "z.tif", np.stack([(lab > 0).astype(np.uint8) for _, lab in pairs]), metadata={"axes": "ZYX"})
    said = []
    samples = load_folder_samples(tmp_path / "images", tmp_path / "labels", warn=said.append)
    assert len(samples) == 3
    assert len(said) == 1 and ": 1 label image(s) hold one id over many separate regions, e.g. z.tif" in said[0]


def test_training_images_follow_the_input_rule_of_the_config(tmp_path):
    """Training reads a user's channels as predict does: a CxYxX ImageJ TIFF (DAPI, cytoplasm)
    with --channel 2 --channel2 1 --invert gives cell -> R, G (inverted) and nuclear -> B, each
    percentile-normalised (before: the file was two 'planes' and 8-bit was divided by 255)."""
    from training.config import TrainConfig
    from training.data import load_samples

    rng = np.random.default_rng(0)
    dapi = rng.integers(10, 60, (64, 80)).astype(np.uint8)
    cyto = rng.integers(100, 140, (64, 80)).astype(np.uint8)
    lab = np.zeros((64, 80), np.uint16)
    lab[10:30, 10:30], lab[35:60, 40:70] = 1, 2
    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    tifffile.imwrite(tmp_path / "im" / "a.tif", np.stack([dapi, cyto]), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "lab" / "a.tif", lab)
    cfg = TrainConfig(image_dir=str(tmp_path / "im"), label_dir=str(tmp_path / "lab"), channel=2, channel2=1,
                      invert=True).validate()
    (sample,) = load_samples(cfg)
    img = sample.image.astype(np.float32)

    def p99(a):
        lo, hi = np.percentile(a, (1, 99))
        return np.clip((a.astype(np.float32) - lo) / (hi - lo), 0, 1)

    assert sample.image_id == "a" and img.shape == (64, 80, 3)
    np.testing.assert_allclose(img[..., 0], 1 - p99(cyto), atol=1e-3)
    np.testing.assert_allclose(img[..., 1], img[..., 0])
    np.testing.assert_allclose(img[..., 2], p99(dapi), atol=1e-3)
    with pytest.raises(DataError, match="channel 3 but the image has 2 channels"):
        load_samples(TrainConfig(image_dir=str(tmp_path / "im"), label_dir=str(tmp_path / "lab"), channel=3))
    with pytest.raises(Exception, match="--channel2: .*needs a cell channel"):
        TrainConfig(image_dir="x", label_dir="y", channel2=1).validate()
    assert TrainConfig.from_dict(cfg.to_dict()).image_input() == cfg.image_input()
