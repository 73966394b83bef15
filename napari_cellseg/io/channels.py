"""Which channel of an image to segment, and inverting it (cellpose's "chan to segment" and
"invert"): brightfield / histology images show nuclei dark on a bright background, while the
models are trained on bright objects. numpy only; used by the Segment widget before prediction.
"""

from __future__ import annotations

import numpy as np

#: choice -> (label shown, RGB channel index or None)
CHANNELS = {
    "all": ("all channels (as shown)", None),
    "grey": ("grey (mean of channels)", None),
    "red": ("red", 0),
    "green": ("green", 1),
    "blue": ("blue", 2),
}


class ChannelError(ValueError):
    """A channel that the image does not have."""


def prepare(image, channel: str = "all", invert: bool = False, name: str = "image") -> np.ndarray:
    """The array to segment: ``image`` (H x W grey or H x W x C colour) reduced to ``channel``
    and, with ``invert``, flipped so dark objects become bright (``max + min - value``).

    ``"all"`` keeps a colour image as it is; a grey image ignores the channel choice except that
    red/green/blue on a grey image raise ``ChannelError`` naming the image.
    """
    if channel not in CHANNELS:
        raise ChannelError(f"unknown channel {channel!r}; choose one of {', '.join(CHANNELS)}")
    arr = np.asarray(image)
    colour = arr.ndim == 3 and arr.shape[-1] in (3, 4)
    if channel == "grey" and colour:
        arr = arr[..., :3].astype(np.float32).mean(axis=-1)
    elif CHANNELS[channel][1] is not None:
        if not colour:
            raise ChannelError(f"{name} has one channel: choose 'all' or 'grey', not {channel!r}")
        arr = arr[..., CHANNELS[channel][1]]
    if invert:
        a = arr.astype(np.float32)
        if a.ndim == 3:  # colour: invert each channel over its own range
            lo = a.reshape(-1, a.shape[-1]).min(axis=0)
            hi = a.reshape(-1, a.shape[-1]).max(axis=0)
        else:
            lo, hi = a.min(), a.max()
        arr = (hi + lo) - a
    return arr
