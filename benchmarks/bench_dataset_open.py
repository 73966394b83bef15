"""Opening a big folder in the "Review dataset" queue: names only (io/dataset.DatasetQueue.open).

A folder of N images (default 10,000 small PNGs), an output CSV with 600 accepted images
(704x520, ~130 cells each, like the Sartorius train set), 200 drafts beside it and a
``cellseg rank`` ranking of every image. Measured in the same run:

  open:      DatasetQueue.open(folder, out.csv, ranking_csv=...)  (target: < 2 s for 10,000)
  empty out: the same without an output CSV / drafts (the first open of a folder)
  baseline:  reading every image header at open (images.image_info per file), what a queue
             that wanted sizes up front would cost: the ratio says what names-only saves.

Run: ``python benchmarks/bench_dataset_open.py [N]`` (about a minute, most of it making files).
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_cellseg.io.annotations import write_annotations  # noqa: E402
from napari_cellseg.io.dataset import DatasetQueue, drafts_dir  # noqa: E402
from napari_cellseg.io.images import image_info, list_images  # noqa: E402
from napari_cellseg.io.ranking import write_ranking  # noqa: E402

H, W = 520, 704


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _labels(seed: int, n: int = 130) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((H, W), np.int32)
    for k in range(n):
        y, x = rng.integers(0, H - 12), rng.integers(0, W - 12)
        lab[y:y + 10, x:x + 10] = k + 1
    return lab


def make_dataset(root: Path, n: int, accepted: int = 600, drafts: int = 200):
    folder = root / "images"
    folder.mkdir()
    data = _png_bytes()
    for i in range(n):
        (folder / f"img{i:05d}.png").write_bytes(data)
    out = root / "reviewed.csv"
    write_annotations(out, {f"img{i:05d}": _labels(i % 7) for i in range(accepted)}, format="train")
    d = drafts_dir(out)
    d.mkdir()
    blob = io.BytesIO()
    np.savez_compressed(blob, labels=np.zeros((H, W), np.int32))
    for i in range(accepted, accepted + drafts):
        (d / f"img{i:05d}.npz").write_bytes(blob.getvalue())
    ranking = root / "ranking.csv"
    rng = np.random.default_rng(1)
    write_ranking(ranking, [{"id": f"img{i:05d}", "uncertainty": float(rng.random()),
                             "cells": int(rng.integers(0, 300)), "doubtful_cells": 0, "diameter": None,
                             "file": ""} for i in range(n)])
    return folder, out, ranking


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(n: int = 10_000) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    try:
        t0 = time.perf_counter()
        folder, out, ranking = make_dataset(root, n)
        print(f"made {n} images, 600 accepted + 200 drafts, ranking: {time.perf_counter() - t0:.1f} s")
        q = DatasetQueue.open(folder, out, ranking_csv=ranking)
        c = q.counts()
        assert c["total"] == n and c["accepted"] == 600 and c["edited"] == 200, c
        t_open = best_of(lambda: DatasetQueue.open(folder, out, ranking_csv=ranking))
        t_first = best_of(lambda: DatasetQueue.open(folder, root / "new.csv"))
        t_order = best_of(lambda: q.next_todo(q.order()[0]))
        t_base = best_of(lambda: [image_info(p) for p in list_images(folder)], repeat=1)
        print(f"open {n} images + 600 accepted (78,000 rows) + 200 drafts + ranking: {t_open:.2f} s "
              f"(target < 2 s: {'ok' if t_open < 2 else 'MISSED'})")
        print(f"first open (no output CSV yet): {t_first:.3f} s")
        print(f"next to-do after the first: {1000 * t_order:.1f} ms")
        print(f"baseline, every header read at open: {t_base:.2f} s "
              f"(names only is {t_base / t_first:.0f}x faster)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
