"""Training data speed: training.data (RLE decoded once, cached as label layers, albumentations)
against the starter's dataset (decode every RLE of the image on every access), same run.

Data: 704x520 grey PNGs, ~100 elliptical cells per image (touching, some overlapping), in a
Kaggle train.csv. Baseline (the starter notebook's ``CellDataset.__getitem__``): read the PNG,
decode each RLE with a Python loop over runs into its own full-size mask, box from np.where,
horizontal flip, to tensors. Ours: ``InstanceDataset`` with the FULL training pipeline (flips,
rot90, shift/scale/rotate, noise/blur, brightness/contrast) and without augmentation.
Run: ``python benchmarks/bench_data.py`` (prints items/s and ratios; must be >= 5x).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, W, N_CELLS, N_IMAGES = 520, 704, 100, 4


def make_labels(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    masks = []
    while len(masks) < N_CELLS:
        cy, cx, ry, rx = rng.uniform(0, H), rng.uniform(0, W), *rng.uniform(8, 25, size=2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if m.sum() > 30:
            masks.append(m)
    return masks


def starter_rle_decode(mask_rle, shape, color=1):
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.float32)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = color
    return img.reshape(shape)


class StarterDataset:
    """The starter's CellDataset: everything recomputed on every access."""

    def __init__(self, image_dir, df):
        self.image_dir, self.df = Path(image_dir), df
        self.ids = list(dict.fromkeys(df["id"]))
        self.rows = {i: df[df["id"] == i]["annotation"].tolist() for i in self.ids}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        import cv2
        import torch

        image_id = self.ids[idx]
        img = cv2.imread(str(self.image_dir / f"{image_id}.png"))[..., ::-1].astype(np.float32) / 255.0
        annotations = self.rows[image_id]
        masks = np.zeros((len(annotations), H, W), dtype=np.uint8)
        boxes = []
        for i, a in enumerate(annotations):
            a_mask = starter_rle_decode(a, (H, W))
            a_mask = np.array(a_mask) > 0
            masks[i, :, :] = a_mask
            pos = np.where(masks[i, :, :])
            boxes.append([np.min(pos[1]), np.min(pos[0]), np.max(pos[1]), np.max(pos[0])])
        if np.random.random() < 0.5:  # the starter's HorizontalFlip
            img, masks = img[:, ::-1], masks[:, :, ::-1]
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                  "labels": torch.ones((len(annotations),), dtype=torch.int64),
                  "masks": torch.as_tensor(masks.copy(), dtype=torch.uint8)}
        return torch.as_tensor(img.transpose(2, 0, 1).copy()), target


def rate(ds, n_items: int) -> float:
    ds[0]  # warm-up
    t0 = time.perf_counter()
    for i in range(n_items):
        ds[i % len(ds)]
    return n_items / (time.perf_counter() - t0)


def main() -> int:
    import imageio.v3 as iio
    import pandas as pd
    from napari_cellseg.annotations import write_annotations
    from napari_cellseg.rle import rles_to_labels, rle_encode
    from training.augment import train_pipeline
    from training.data import InstanceDataset, load_csv_samples

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        items = {}
        rows = []
        for k in range(N_IMAGES):
            masks = make_labels(k)
            rles = [rle_encode(m) for m in masks]
            rows += [{"id": f"img{k}", "annotation": r, "width": W, "height": H} for r in rles]
            items[f"img{k}"] = rles_to_labels(rles, (H, W))
            image = np.clip(items[f"img{k}"].astype(bool) * 150 + np.random.default_rng(k).normal(40, 10, (H, W)), 0, 255)
            iio.imwrite(tmp / "img" / f"img{k}.png", image.astype(np.uint8))
        csv = tmp / "train.csv"
        pd.DataFrame(rows).to_csv(csv, index=False)  # overlapping masks kept, as in Kaggle's train.csv
        t0 = time.perf_counter()
        samples = load_csv_samples(csv, tmp / "img")
        t_load = time.perf_counter() - t0
        n_inst = [len(np.unique(layer)) - 1 for s in samples for layer in s.layers]
        starter = StarterDataset(tmp / "img", pd.read_csv(csv))
        ours = InstanceDataset(samples, train_pipeline(W, H, seed=0))
        plain = InstanceDataset(samples, train_pipeline(W, H, augment=False, seed=0))
        n = 12
        r_starter = rate(starter, n)
        r_ours = rate(ours, n)
        r_plain = rate(plain, n)
    print(f"{N_IMAGES} images {W}x{H}, {N_CELLS} cells each ({sum(n_inst)} instances in "
          f"{sum(len(s.layers) for s in samples)} label layers); one-time load+decode {t_load / N_IMAGES * 1000:.0f} ms/image")
    print(f"starter (decode every RLE per access): {r_starter:7.1f} items/s")
    print(f"ours, full augmentation              : {r_ours:7.1f} items/s  ({r_ours / r_starter:.1f}x)")
    print(f"ours, no augmentation                : {r_plain:7.1f} items/s  ({r_plain / r_starter:.1f}x)")
    ok = r_ours / r_starter >= 5
    print("PASS" if ok else "FAIL", "(need >= 5x with full augmentation)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
