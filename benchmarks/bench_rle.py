"""RLE speed: labels_to_rles / rles_to_labels against the starter's way, in the same run.

A 704x520 label image with 500 instances (random ellipses, touching and clipped at the edges).
Baselines (the starter notebook's code):
  encode: for each instance, build its full-frame mask and RLE-encode the whole frame;
  decode: decode every RLE into its own full-size mask, run by run, then combine into labels;
  training rles_to_layers: the training CSV loader before (rle_decode per cell + masks_to_layers).
Run: ``python benchmarks/bench_rle.py`` (prints seconds per call and speed-up ratios; must be >=10x).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_cellseg.io.rle import labels_to_rles, rle_decode, rles_to_labels  # noqa: E402
from training.data import masks_to_layers, rles_to_layers  # noqa: E402

H, W, N = 520, 704, 500


def make_labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((H, W), dtype=np.int32)
    yy, xx = np.mgrid[:H, :W]
    k = 0
    while k < N:
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        ry, rx = rng.uniform(4, 14, size=2)
        y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, H))
        x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, W))
        sub = ((yy[y0:y1, x0:x1] - cy) / ry) ** 2 + ((xx[y0:y1, x0:x1] - cx) / rx) ** 2 <= 1
        free = sub & (labels[y0:y1, x0:x1] == 0)
        if free.sum() < 10:
            continue
        k += 1
        labels[y0:y1, x0:x1][free] = k
    return labels


# ---- the starter's code -------------------------------------------------------------------
def starter_rle_encode(img) -> str:
    pixels = img.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def starter_rle_decode(mask_rle, shape):
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape)


def starter_labels_to_rles(labels):
    return [starter_rle_encode(labels == i) for i in np.unique(labels) if i != 0]


def starter_rles_to_labels(rles, shape):
    labels = np.zeros(shape, dtype=np.int32)
    for i, rle in enumerate(rles, start=1):
        mask = starter_rle_decode(rle, shape)
        labels[(mask == 1) & (labels == 0)] = i
    return labels


# -------------------------------------------------------------------------------------------
def best_time(fn, *args, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def decoded_masks_to_layers(rles, shape):
    """The training CSV loader before: one full-size decoded mask per cell, then the layers."""
    return masks_to_layers([rle_decode(r, shape) for r in rles], shape)


def main() -> int:
    labels = make_labels()
    rles = labels_to_rles(labels)
    assert len(rles) == N
    assert rles == starter_labels_to_rles(labels), "encoders disagree"
    assert np.array_equal(rles_to_labels(rles, (H, W)), starter_rles_to_labels(rles, (H, W)))
    assert np.array_equal(rles_to_labels(rles, (H, W)), labels)
    assert np.array_equal(rles_to_layers(rles, (H, W)), decoded_masks_to_layers(rles, (H, W)))
    runs = sum(len(r.split()) // 2 for r in rles)
    print(f"label image {W}x{H}, {N} instances, {runs} runs, "
          f"{np.count_nonzero(labels)} foreground pixels")

    ok = True
    for name, ours, base, args in [
        ("encode labels_to_rles", labels_to_rles, starter_labels_to_rles, (labels,)),
        ("decode rles_to_labels", rles_to_labels, starter_rles_to_labels, (rles, (H, W))),
        ("training rles_to_layers", rles_to_layers, decoded_masks_to_layers, (rles, (H, W))),
    ]:
        t_base = best_time(base, *args, repeat=3)
        t_ours = best_time(ours, *args, repeat=7)
        ratio = t_base / t_ours
        ok &= ratio >= 10
        print(f"{name:24s} ours {t_ours * 1e3:8.2f} ms   starter {t_base * 1e3:8.2f} ms   "
              f"speed-up {ratio:6.1f}x  {'OK' if ratio >= 10 else 'BELOW 10x'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
