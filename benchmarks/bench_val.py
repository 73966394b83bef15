"""Validation time per epoch (issue 13, "make the per-epoch fixed costs small"): the one-pass
validation (``training.loops.evaluate`` -> ``training.evaluate.val_step``: one backbone forward
per val image, the heads in train mode for the losses and in eval mode for the Detections)
against the old two-pass path measured in the same run (a train-mode forward of the whole model
under no_grad for the loss, then the val Pipeline's ``predict`` for the Detections).

Model (``--model``): ``default``, the default ``ModelConfig`` (ConvNeXt-Tiny + FPN) with random
weights (``--backbone-weights random``: every image gives the 500 detections the heads can keep,
the most mask-head work), or ``demo``, the bundled trained demo model (the demo recipe:
convnext_atto, a realistic number of detections); either as ``training.engine`` builds it (no
resize in the transform). Data: synthetic cell images (``napari_cellseg.io.synthetic``), 256x256 by
default. Both paths give the same Detections (checked here too) and the same val loss up to
float rounding. Run: ``python benchmarks/bench_val.py [--model default|demo] [--images N]
[--size PX] [--rounds R]``; prints seconds per validation of each path and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def two_pass(model, pipeline, dataset, n_map):
    """The validation before the one-pass step (the baseline): per image a train-mode forward
    of the whole model for the loss, then pipeline.predict for the Detections."""
    import torch
    from training.dataset import expand_masks

    losses, dets = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        with torch.no_grad():
            model.train()
            losses.append(float(sum(model([image], [expand_masks(target)]).values())))
        if i < n_map:
            model.eval()
            dets.append(pipeline.predict(image.permute(1, 2, 0).numpy()))
    model.train()
    return float(np.mean(losses)), dets


def one_pass(model, dataset, config):
    import torch
    from napari_cellseg.progress import drain
    from training.loops import evaluate

    loss, _, dets = drain(evaluate(model, dataset, torch.device("cpu"), 1, config, None))
    return loss, dets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("default", "demo"), default="default")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import torch
    from napari_cellseg.model.maskrcnn import ModelConfig, build_model
    from napari_cellseg.io.synthetic import make_image
    from training import evaluate as ev
    from training.augment import test_pipeline
    from training.config import TrainConfig
    from training.data import array_samples
    from training.dataset import InstanceDataset
    from training.engine import _no_resize

    torch.manual_seed(0)
    if args.model == "demo":
        from napari_cellseg.model.checkpoint import load_checkpoint, resolve_checkpoint

        model, mc, _, _ = load_checkpoint(resolve_checkpoint(None))
    else:
        mc = ModelConfig()
        model = build_model(mc, None)  # random backbone weights
    model.transform.resize = _no_resize
    pairs = [make_image("cells", (args.size, args.size), seed=s) for s in range(args.images)]
    ds = InstanceDataset(array_samples([p[0] for p in pairs], [p[1] for p in pairs]), test_pipeline(0, 0))
    config = TrainConfig(model=mc)
    pipeline = ev.val_predictor(model, mc, "cpu")
    n_cells = np.mean([len(np.unique(p[1])) - 1 for p in pairs])
    print(f"validation of {args.images} {args.size}x{args.size} images (~{n_cells:.0f} cells), "
          f"{mc.backbone} ({'demo model' if args.model == 'demo' else 'random weights'}), "
          f"{torch.get_num_threads()} threads, best of {args.rounds}:")
    pipeline.predict(ds[0][0].permute(1, 2, 0).numpy())  # warm-up (oneDNN kernels, allocator)
    model.train()
    t_old, t_new = [], []
    for _ in range(args.rounds):
        torch.manual_seed(1)
        t0 = time.perf_counter()
        loss_old, dets_old = two_pass(model, pipeline, ds, len(ds))
        t_old.append(time.perf_counter() - t0)
        torch.manual_seed(1)
        t0 = time.perf_counter()
        loss_new, dets_new = one_pass(model, ds, config)
        t_new.append(time.perf_counter() - t0)
    same = all(np.array_equal(a.scores, b.scores) and np.array_equal(a.probs, b.probs)
               and np.array_equal(a.boxes, b.boxes) for a, b in zip(dets_old, dets_new))
    print(f"  two passes (old: train-mode forward + Predictor): {min(t_old):7.2f} s")
    print(f"  one pass (backbone once, heads twice)           : {min(t_new):7.2f} s  "
          f"({min(t_old) / min(t_new):.2f}x faster)")
    print(f"  val loss {loss_old:.6f} vs {loss_new:.6f}; detections "
          f"({sum(len(d) for d in dets_new)}) {'identical' if same else 'DIFFER'}")
    return 0 if same and abs(loss_old - loss_new) <= 1e-4 * abs(loss_old) else 1


if __name__ == "__main__":
    sys.exit(main())
