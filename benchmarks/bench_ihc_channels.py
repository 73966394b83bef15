"""Channel choice + invert on skimage's IHC image (blue hematoxylin nuclei, dark on bright):
cells found by the bundled demo model with the image as shown vs one channel, inverted.

    python benchmarks/bench_ihc_channels.py
"""
import time

from skimage.data import immunohistochemistry
from napari_cellseg.inference.predictor import Predictor
from napari_cellseg.io.channels import prepare
img = immunohistochemistry()
p = Predictor.from_checkpoint(None, device="cpu")
th = p.thresholds
counts = {}
for ch, inv in [("all", False), ("all", True), ("red", True), ("grey", True)]:
    t = time.time()
    d = p.predict(prepare(img, ch, inv), scale="auto")
    n = int(d.to_labels(th["box_conf"], th["mask_threshold"], th.get("min_area", 0)).max())
    counts[ch, inv] = n
    print(f"channel={ch} invert={inv}: {n} cells, diameter {d.diameter}, scale {d.scale:.2f}, {time.time()-t:.0f}s", flush=True)
print(f"red + invert finds {counts['red', True] / max(counts['all', False], 1):.2f}x the cells of the image as shown")
