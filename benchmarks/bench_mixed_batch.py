"""mAP of ``cellseg predict --batch-size N`` on images of different sizes against batch size 1,
measured in the same run (the bundled demo model, real nuclei with hand-checked labels).

    python benchmarks/bench_mixed_batch.py [--batch-size 4] [--size 18 auto] [--device cpu]

Five images cut from tests/data/nuclei_z28-43 planes at five sizes (256x256, 128x128,
192x160, 128x256, 160x200), mixed in file order. For each --size (a diameter in px, or auto):
``cellseg predict`` at batch size 1 and N, ``cellseg evaluate`` of both against the labels.
Prints the two mean mAPs, their ratio, the cell counts, and whether the CSVs are byte-identical.
Before same-size batching, a smaller image padded beside a larger one lost accuracy.
Runs in-process (main()), so PYTHONPATH picks the code measured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CUTS = [(30, (0, 0, 256, 256)), (33, (64, 64, 128, 128)), (36, (20, 40, 192, 160)),
        (39, (100, 0, 128, 256)), (42, (30, 30, 160, 200))]  # (z, (y, x, height, width))


def make_data(folder: Path) -> tuple[Path, Path]:
    import tifffile

    image = tifffile.imread(DATA / "nuclei_z28-43_image.tif")
    labels = tifffile.imread(DATA / "nuclei_z28-43_labels.tif")
    images, gt = folder / "images", folder / "gt"
    images.mkdir()
    gt.mkdir()
    for k, (z, (y, x, h, w)) in enumerate(CUTS):
        name = f"img{k}_{h}x{w}"
        tifffile.imwrite(images / f"{name}.tif", image[z - 28, y:y + h, x:x + w])
        tifffile.imwrite(gt / f"{name}.tif", labels[z - 28, y:y + h, x:x + w].astype(np.uint16))
    return images, gt


def run(argv: list[str]) -> tuple[int, str]:
    from napari_cellseg.commands.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    return rc, out.getvalue()


def measure(folder: Path, images: Path, gt: Path, size: str, batch: int, device: str) -> dict:
    csv = folder / f"pred_{size}_b{batch}.csv"
    flag = ["--diameter", size]
    rc, _ = run(["predict", str(images), "--out", str(csv), "--batch-size", str(batch),
                 "--device", device, *flag])
    assert rc == 0, f"predict failed ({rc})"
    rc, text = run(["evaluate", "--gt", str(gt), "--pred", str(csv), "--json"])
    assert rc == 0, f"evaluate failed ({rc})"
    report = json.loads(text)
    return {"map": report["mean_map"], "cells": [r["n_pred"] for r in report["images"]],
            "bytes": csv.read_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", nargs="+", default=["18", "auto"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images, gt = make_data(folder)
        for size in args.size:
            one = measure(folder, images, gt, size, 1, args.device)
            many = measure(folder, images, gt, size, args.batch_size, args.device)
            print(f"--diameter {size}: mAP batch 1 {one['map']:.4f}, batch {args.batch_size} "
                  f"{many['map']:.4f} (ratio {many['map'] / max(one['map'], 1e-9):.3f}); cells "
                  f"{one['cells']} vs {many['cells']}; CSVs identical: {one['bytes'] == many['bytes']}")


if __name__ == "__main__":
    main()
