"""Mask post-processing (fill holes, keep the largest piece): mAP with and without, held out.

The network runs once per image (the pipeline with the model's own size rule: auto size for the
demo model); every post-processing variant is then scored from the same Detections, at the
checkpoint's thresholds, against the exact labels. Data the demo model never trained on: the
packaged samples 'nuclei' and 'cells' and synthetic images with seeds 9000+.

    python benchmarks/bench_postprocess.py [--checkpoint CKPT] [--n 2] [--size 384]

Prints one mAP row per data set and variant, the fraction of cells with holes / in pieces, and the
to_labels time of each variant relative to plain (same run).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _pieces_and_holes(labels):
    from scipy import ndimage

    holes = pieces = n = 0
    for i, slc in enumerate(ndimage.find_objects(labels), start=1):
        if slc is None:
            continue
        own = labels[slc] == i
        n += 1
        holes += bool((ndimage.binary_fill_holes(own) & ~own).any())
        pieces += ndimage.label(own, structure=np.ones((3, 3)))[1] > 1
    return holes, pieces, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=2, help="synthetic images per kind")
    ap.add_argument("--size", type=int, default=384)
    args = ap.parse_args(argv)

    from dataclasses import replace

    from napari_cellseg.inference.metrics import average_precision
    from napari_cellseg.options import PredictOptions
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.io.samples import load_sample
    from napari_cellseg.io.synthetic import make_image

    pipe = Pipeline.from_options(PredictOptions(checkpoint=args.checkpoint, device="cpu"))
    sets = {f"sample {n}": [load_sample(n)] for n in ("nuclei", "cells")}
    for kind in ("nuclei", "cells"):
        sets[f"synthetic {kind}"] = [make_image(kind, shape=(args.size, args.size), seed=9000 + k)
                                     for k in range(args.n)]
    base = replace(pipe.thresholds, fill_holes=False, keep_largest=False)
    variants = {"plain": base, "fill_holes": replace(base, fill_holes=True),
                "keep_largest": replace(base, keep_largest=True),
                "both": replace(base, fill_holes=True, keep_largest=True)}
    print(f"thresholds {base.box_conf:g}/{base.mask_threshold:g}, size: {pipe.describe()}")
    print(f"{'data':<18} {'images':>6} " + " ".join(f"{v:>12}" for v in variants) + "   holes  pieces  cells")
    totals = {v: [] for v in variants}
    times = {v: 0.0 for v in variants}
    n_calls = 0
    for name, pairs in sets.items():
        scores = {v: [] for v in variants}
        h = p = n = 0
        for image, gt in pairs:
            dets = pipe.predict(image)
            dets.to_labels(base)  # build the pasted crops once: time only the variants
            n_calls += 1
            for v, th in variants.items():
                t0 = time.perf_counter()
                labels = dets.to_labels(th)
                times[v] += time.perf_counter() - t0
                scores[v].append(average_precision(gt, labels))
                if v == "plain":
                    a, b, c = _pieces_and_holes(labels)
                    h, p, n = h + a, p + b, n + c
        for v in variants:
            totals[v] += scores[v]
        print(f"{name:<18} {len(pairs):>6} " + " ".join(f"{np.mean(scores[v]):>12.4f}" for v in variants)
              + f"   {h:>5}  {p:>6}  {n:>5}")
    print(f"{'all (mean/image)':<18} {len(totals['plain']):>6} "
          + " ".join(f"{np.mean(totals[v]):>12.4f}" for v in variants))
    print("to_labels time per image (slider path, crops cached): "
          + ", ".join(f"{v} {times[v] / n_calls * 1e3:.1f} ms ({times[v] / times['plain']:.1f}x)" for v in variants))


if __name__ == "__main__":
    main()
