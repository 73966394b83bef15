"""napari-cellseg: Mask R-CNN cell instance segmentation for napari.

Importing this package must stay cheap: napari scans plugins at start-up, so nothing here
imports torch, qtpy or napari. Heavy modules are imported where they are used.
"""

__version__ = "0.1.0"
