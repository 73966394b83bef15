"""Channel choice + invert on skimage's IHC image (blue hematoxylin nuclei, dark on bright):
cells found by the bundled demo model with the image as shown vs one channel, inverted
(the ``--channel`` / ``--invert`` of ``cellseg predict``: ``options.ImageInput``).

    python benchmarks/bench_ihc_channels.py
"""
import time

from skimage.data import immunohistochemistry

from napari_cellseg.inference.pipeline import Pipeline
from napari_cellseg.options import PredictOptions

img = immunohistochemistry()
counts = {}
for channel, invert in [(0, False), (0, True), (1, True), (3, True)]:
    t = time.time()
    pipe = Pipeline.from_options(PredictOptions(device="cpu", diameter="auto", channel=channel, invert=invert))
    d = pipe.predict(img)
    n = int(pipe.labels(d).max())
    counts[channel, invert] = n
    print(f"channel={channel} invert={invert}: {n} cells, diameter {d.diameter}, scale {d.scale:.2f}, "
          f"{time.time() - t:.0f}s", flush=True)
print(f"red + invert finds {counts[1, True] / max(counts[0, False], 1):.2f}x the cells of the image as shown")
