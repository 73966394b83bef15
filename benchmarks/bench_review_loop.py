"""The review loop end to end: with k corrected images, how much better is the model on the rest?

The set: the 16 real nuclei planes of tests/data (z 28..43, hand-checked labels). k of them
(spread over the stack) stand for the images a user corrected and accepted: their ground truth
is what the corrections would be. ``training.finetune`` fine-tunes the bundled demo model on
them (its few-image preset, a time budget of ``--minutes``), exactly as the dock's "Train on
accepted" does; the other 16 - k planes are predicted before and after (auto size, each model's
own thresholds: the starting model's, then the ones the fine-tuning chose) and scored with the
Kaggle mAP.

    python benchmarks/bench_review_loop.py [--k 5] [--minutes 4] [--checkpoint CKPT]

Prints: "with k corrected images, the mAP on the other N goes from X to Y in T minutes". The
planes are neighbours in one 3-D stack, so the rest is the same sample (as the rest of a user's
folder is): this measures adapting to a dataset, not generalising to a new one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def mean_map(checkpoint, images, gts) -> tuple[float, list[float]]:
    from napari_cellseg.inference.metrics import average_precision
    from napari_cellseg.inference.pipeline import Pipeline
    from napari_cellseg.inference.runner import Runner
    from napari_cellseg.options import PredictOptions

    pipe = Pipeline(Runner.from_checkpoint(checkpoint, device="cpu"), PredictOptions())
    maps = [average_precision(gt, pipe.labels(pipe.predict(im))) for im, gt in zip(images, gts)]
    return float(np.mean(maps)), maps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="the starting model (default: the demo model)")
    ap.add_argument("--k", type=int, default=5, help="corrected images (default 5)")
    ap.add_argument("--minutes", type=float, default=4.0, help="fine-tuning time budget")
    ap.add_argument("--out", default=None, help="keep the fine-tuned model here (default: a temp dir)")
    args = ap.parse_args(argv)

    import tifffile

    from napari_cellseg.model.checkpoint import resolve_checkpoint
    from napari_cellseg.progress import drain
    from training.finetune import finetune

    data = REPO / "tests" / "data"
    images = list(tifffile.imread(data / "nuclei_z28-43_image.tif"))
    labels = [lab.astype(np.int32) for lab in tifffile.imread(data / "nuclei_z28-43_labels.tif")]
    chosen = sorted(set(np.linspace(0, len(images) - 1, args.k).round().astype(int).tolist()))
    rest = [i for i in range(len(images)) if i not in chosen]
    start = resolve_checkpoint(args.checkpoint)
    x, x_each = mean_map(start, [images[i] for i in rest], [labels[i] for i in rest])
    print(f"corrected: z {[28 + i for i in chosen]}; scored: the other {len(rest)} planes")
    print(f"before: mAP {x:.3f} on the rest")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "finetuned"
        t0 = time.perf_counter()
        result = drain(finetune([images[i] for i in chosen], [labels[i] for i in chosen], start, out,
                                minutes=args.minutes, device="cpu", ids=[f"z{28 + i}" for i in chosen]))
        minutes = (time.perf_counter() - t0) / 60
        y, y_each = mean_map(result.checkpoint, [images[i] for i in rest], [labels[i] for i in rest])
    print(f"fine-tuning: {result.epochs} epochs in {minutes:.1f} min; its validation mAP "
          f"{result.val_map_before:.3f} -> {result.val_map_after:.3f} (held out: {', '.join(result.val_ids)})")
    print("per plane (before -> after): " + ", ".join(
        f"z{28 + i} {a:.2f}->{b:.2f}" for i, a, b in zip(rest, x_each, y_each)))
    print(f"with {len(chosen)} corrected images, the mAP on the other {len(rest)} goes from {x:.3f} "
          f"to {y:.3f} in {minutes:.1f} minutes on this CPU")


if __name__ == "__main__":
    main()
