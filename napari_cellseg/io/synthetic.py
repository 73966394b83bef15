"""Synthetic microscopy images with exact instance labels (numpy + scikit-image/scipy only).

Two kinds, both deterministic from ``seed``:

- ``"nuclei"``: fluorescence-like, uint16. Dark background with uneven illumination and a few
  dim out-of-focus (unlabelled) blobs; bright blobby nuclei with grainy texture and speckles,
  varied size, brightness and density, touching and slightly overlapping; a few small, very
  bright irregular (mitotic-like) nuclei; blur, Poisson + Gaussian noise.
- ``"cells"``: phase-contrast-like (Sartorius / LIVECell look), uint8. Grey background with
  uneven illumination, irregular elongated (sometimes bent) cells with a darker textured body,
  dark inner rim and a bright halo outside, bright lines between touching cells, a few small
  round bright (mitotic-like) cells.

Labels: int32, 0 = background, ids 1..N. Objects are drawn in order; where they overlap the
later one owns the pixel, so the image (rendered from the final label map) always agrees with
the labels. Objects hidden for more than ``max_hidden`` of their area, split into pieces, or
smaller than ``min_size`` pixels are dropped.

``make_image(kind, shape, seed, **opts)`` options (all optional):
    diameter: (lo, hi) range of object diameters in pixels (default: a per-image typical size
        drawn from 12..60 px with spread, clipped to 10..80); a single number fixes the typical size.
    density: fraction of the image area to cover, 0.05 (sparse) .. 0.7 (crowded).
    overlap: how far neighbours may push into each other, 0 (only touching) .. 0.3.
    min_size: smallest instance kept, in pixels (default 15).
    max_hidden: largest hidden fraction of an object before it is dropped (default 0.4).
    noise: noise strength multiplier (default 1.0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

__all__ = ["make_image", "write_dataset", "write_tif", "KINDS"]

KINDS = ("nuclei", "cells")


# --------------------------------------------------------------------------- helpers
def _smooth_noise(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    """Smooth random field with correlation length ~``scale`` px, zero mean, unit std.

    Small scales: Gaussian-filtered white noise. Large scales (illumination): a sum of a few
    random low-frequency plane waves, built from separable outer products (fast).
    """
    h, w = shape
    if scale <= 12:
        out = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale / 2)
    else:
        y = np.arange(h, dtype=np.float32)[:, None]
        x = np.arange(w, dtype=np.float32)[None, :]
        out = np.zeros(shape, np.float32)
        for _ in range(6):
            f = rng.uniform(0.3, 1.0) / scale
            ang = rng.uniform(0, 2 * np.pi)
            ky, kx = 2 * np.pi * f * np.sin(ang), 2 * np.pi * f * np.cos(ang)
            ph = rng.uniform(0, 2 * np.pi)
            # cos(ky*y + kx*x + ph) = cos(ky y) cos(kx x + ph) - sin(ky y) sin(kx x + ph)
            out += np.cos(ky * y) * np.cos(kx * x + ph) - np.sin(ky * y) * np.sin(kx * x + ph)
    out = out - out.mean()
    return out / (out.std() + 1e-6)


def _object_shape(rng, r_mean: float, aspect: float, irregular: float, bend: float):
    """One blobby object in a local frame: a perturbed, optionally bent ellipse.

    Returns (inside bool array, normalised radius array in [0, 1], half-size R).
    The object is centred at index (R, R).
    """
    a = r_mean * np.sqrt(aspect)
    b = r_mean / np.sqrt(aspect)
    coef = (irregular / np.arange(2, 6)) * rng.standard_normal(4)
    phase = rng.uniform(0, 2 * np.pi, 4)
    r_max = 1.0 + float(np.abs(coef).sum())
    R = int(np.ceil(a * r_max * (1 + abs(bend)) + 2))
    yy = np.arange(-R, R + 1, dtype=np.float32)[:, None]
    xx = np.arange(-R, R + 1, dtype=np.float32)[None, :]
    ang = rng.uniform(0, np.pi)
    c, s = np.float32(np.cos(ang)), np.float32(np.sin(ang))
    u = xx * c + yy * s
    v = -xx * s + yy * c
    v = v - np.float32(bend / max(a, 1.0)) * u * u
    un, vn = u / np.float32(a), v / np.float32(b)
    rho = np.sqrt(un * un + vn * vn)
    theta = np.arctan2(vn, un)
    boundary = np.ones_like(theta)
    for k, ck, pk in zip(range(2, 6), coef, phase):
        boundary += np.float32(ck) * np.cos(k * theta + np.float32(pk))
    norm = rho / np.maximum(boundary, 0.35)
    inside = norm <= 1.0
    return inside, np.minimum(norm, 1.0), R


def _diameters(rng, n: int, diameter) -> np.ndarray:
    if diameter is None:
        typical = float(np.exp(rng.uniform(np.log(12), np.log(60))))
        d = typical * np.exp(rng.normal(0, 0.22, n))
        return np.clip(d, 10, 80)
    if np.isscalar(diameter):
        d = float(diameter) * np.exp(rng.normal(0, 0.15, n))
        return np.clip(d, 0.75 * float(diameter), 1.33 * float(diameter))
    lo, hi = float(diameter[0]), float(diameter[1])
    if not 0 < lo <= hi:
        raise ValueError(f"diameter range must be 0 < lo <= hi, got {diameter!r}")
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def _place(rng, shape, diam: np.ndarray, density: float, overlap: float):
    """Pick centres: random positions, neighbours at least (1 - overlap) * (r1 + r2) apart.

    A bin grid (bin = largest diameter) keeps each check to the 3x3 neighbouring bins.
    """
    h, w = shape
    target = density * h * w
    factor = 1.0 - overlap
    cell = float(diam.max())
    bins: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    centres, radii, covered = [], [], 0.0
    fails = 0
    for d in diam:
        if covered >= target or fails >= 60:  # full, or no room left
            break
        r = float(d) / 2
        ys = rng.uniform(-0.3 * r, h + 0.3 * r, 24)
        xs = rng.uniform(-0.3 * r, w + 0.3 * r, 24)
        for y, x in zip(ys.tolist(), xs.tolist()):
            by, bx = int(y // cell), int(x // cell)
            ok = True
            for ny in (by - 1, by, by + 1):
                for nx in (bx - 1, bx, bx + 1):
                    for oy, ox, orr in bins.get((ny, nx), ()):
                        if (oy - y) ** 2 + (ox - x) ** 2 < (factor * (orr + r)) ** 2:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if ok:
                bins.setdefault((by, bx), []).append((y, x, r))
                centres.append((y, x))
                radii.append(r)
                covered += np.pi * r * r
                fails = 0
                break
        else:
            fails += 1
    return centres, radii


def _paint(shape, objects, max_hidden: float, min_size: int):
    """Paint objects in order (later on top); drop hidden/split/small ones; ids 1..N."""
    h, w = shape
    keep = list(range(len(objects)))
    for _ in range(3):
        labels = np.zeros(shape, np.int32)
        for idx in keep:
            o = objects[idx]
            sl_img, sl_loc = o["slices"]
            labels[sl_img][o["mask"][sl_loc]] = idx + 1
        counts = np.bincount(labels.ravel(), minlength=len(objects) + 1)
        new_keep = []
        for idx in keep:
            o = objects[idx]
            visible = counts[idx + 1]
            if visible < min_size or visible < (1 - max_hidden) * o["area"]:
                continue
            new_keep.append(idx)
        if new_keep == keep:
            break
        keep = new_keep
    # remove fragments: keep the largest connected piece of each object
    for idx in keep:
        if counts[idx + 1] == objects[idx]["area"]:
            continue  # fully visible: a single piece by construction
        sl_img, _ = objects[idx]["slices"]
        crop = labels[sl_img]
        own = crop == idx + 1
        cc, n = ndi.label(own)
        if n > 1:
            sizes = np.bincount(cc.ravel())
            sizes[0] = 0
            crop[own & (cc != sizes.argmax())] = 0
    # relabel 1..N dropping small ones
    counts = np.bincount(labels.ravel(), minlength=len(objects) + 1)
    lut = np.zeros(len(objects) + 1, np.int32)
    order = []
    for idx in keep:
        if counts[idx + 1] >= min_size:
            order.append(idx)
            lut[idx + 1] = len(order)
    return lut[labels], order


def _build_objects(rng, shape, kind: str, diameter, density, overlap):
    h, w = shape
    n_max = 4000
    diam = _diameters(rng, n_max, diameter)
    centres, radii = _place(rng, shape, diam, density, overlap)
    objects = []
    for (y, x), r in zip(centres, radii):
        if kind == "nuclei":
            special = rng.random() < 0.04  # mitotic-like: small, bright, ragged
            if special:
                r = max(r * 0.6, 5.0)
            aspect = float(np.exp(abs(rng.normal(0, 0.2)))) if not special else rng.uniform(1.0, 2.0)
            irregular = rng.uniform(0.05, 0.25) if not special else rng.uniform(0.4, 0.8)
            bend = rng.normal(0, 0.05)
        else:
            special = rng.random() < 0.06  # rounded-up bright cell
            if special:
                r = max(r * 0.55, 5.0)
                aspect, irregular, bend = rng.uniform(1.0, 1.25), rng.uniform(0.02, 0.1), 0.0
            else:
                aspect = float(np.exp(rng.uniform(0.2, 1.3)))
                irregular = rng.uniform(0.15, 0.55)
                bend = rng.normal(0, 0.25)
        inside, norm, R = _object_shape(rng, r, aspect, irregular, bend)
        iy, ix = int(round(y)), int(round(x))
        y0, x0 = iy - R, ix - R
        y1, x1 = y0 + inside.shape[0], x0 + inside.shape[1]
        cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if cy0 >= cy1 or cx0 >= cx1:
            continue
        sl_img = (slice(cy0, cy1), slice(cx0, cx1))
        sl_loc = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        objects.append({"mask": inside, "norm": norm, "slices": (sl_img, sl_loc),
                        "area": int(inside[sl_loc].sum()), "special": special, "r": r})
    return objects


def _rng_opts(rng, opts):
    density = opts.get("density")
    if density is None:
        density = float(rng.uniform(0.08, 0.6))
    overlap = opts.get("overlap")
    if overlap is None:
        overlap = float(rng.uniform(0.0, 0.2))
    if not 0 < density <= 0.9:
        raise ValueError(f"density must be in (0, 0.9], got {density!r}")
    if not 0 <= overlap < 0.5:
        raise ValueError(f"overlap must be in [0, 0.5), got {overlap!r}")
    return density, overlap


# --------------------------------------------------------------------------- renderers
def _render_nuclei(rng, shape, objects, labels, order, noise):
    h, w = shape
    illum = 1.0 + 0.12 * _smooth_noise(rng, shape, max(h, w, 600) / 2.5)
    texture = 0.75 * _smooth_noise(rng, shape, 1.5) + 0.45 * _smooth_noise(rng, shape, 5.0)
    amp_tex = rng.uniform(0.15, 0.3)
    signal = np.zeros(shape, np.float32)
    # dim out-of-focus blobs (unlabelled)
    ghosts = np.zeros(shape, np.float32)
    for _ in range(rng.integers(0, 4)):
        r = rng.uniform(10, 35)
        yy, xx = rng.uniform(0, h), rng.uniform(0, w)
        y0, y1 = int(max(yy - 2 * r, 0)), int(min(yy + 2 * r, h))
        x0, x1 = int(max(xx - 2 * r, 0)), int(min(xx + 2 * r, w))
        if y0 < y1 and x0 < x1:
            gy, gx = np.mgrid[y0:y1, x0:x1]
            ghosts[y0:y1, x0:x1] += rng.uniform(0.03, 0.08) * np.exp(-((gy - yy) ** 2 + (gx - xx) ** 2) / (2 * r * r))
    for new_id, idx in enumerate(order, start=1):
        o = objects[idx]
        sl_img, sl_loc = o["slices"]
        own = labels[sl_img] == new_id
        norm = o["norm"][sl_loc]
        bright = rng.uniform(0.4, 1.0) * (rng.uniform(1.8, 2.6) if o["special"] else 1.0)
        profile = 1.0 - 0.3 * norm ** 4 + 0.08 * (1 - norm ** 2)
        tex = 1.0 + (amp_tex * (2.0 if o["special"] else 1.0)) * texture[sl_img]
        signal[sl_img][own] = (bright * profile * tex)[own]
        # bright chromatin speckles
        n_spk = rng.poisson(o["area"] / 400.0)
        if n_spk:
            ys, xs = np.nonzero(own)
            pick = rng.integers(0, len(ys), n_spk)
            signal[sl_img][ys[pick], xs[pick]] += bright * rng.uniform(0.8, 2.5, n_spk)
    signal = ndi.gaussian_filter(signal, rng.uniform(0.5, 1.1))
    ghosts = ndi.gaussian_filter(ghosts, 3.0)
    peak = rng.uniform(9000, 30000)
    background = rng.uniform(1500, 5000)
    mean = (background + peak * (signal + ghosts)) * np.clip(illum, 0.4, None)
    gain = rng.uniform(2.0, 8.0) * noise  # counts per photon: larger = noisier
    photons = rng.poisson(np.maximum(mean, 0) / max(gain, 1e-3)).astype(np.float32) * max(gain, 1e-3)
    img = photons + rng.normal(0, 120 * noise, shape)
    return np.clip(img, 0, 65535).astype(np.uint16)


def _render_cells(rng, shape, objects, labels, order, noise):
    h, w = shape
    base = rng.uniform(0.42, 0.58)
    img = base + 0.04 * _smooth_noise(rng, shape, max(h, w, 600) / 2.0) \
        + 0.008 * _smooth_noise(rng, shape, 4.0)
    fg = labels > 0
    d_out = ndi.distance_transform_edt(~fg).astype(np.float32) if fg.any() \
        else np.full(shape, 1e3, np.float32)
    halo_w = rng.uniform(1.0, 2.2)
    halo_amp = rng.uniform(0.15, 0.32)
    img += np.where(fg, 0.0, halo_amp * np.exp(-(d_out - 1.0) / halo_w)).astype(np.float32)
    texture = 0.5 * _smooth_noise(rng, shape, 2.0) + 0.5 * _smooth_noise(rng, shape, 7.0)
    style_depth = rng.uniform(-0.03, 0.12)  # cells of one image look alike
    for new_id, idx in enumerate(order, start=1):
        o = objects[idx]
        sl_img, sl_loc = o["slices"]
        own = labels[sl_img] == new_id
        norm = o["norm"][sl_loc]
        edge = np.exp(-((1 - norm) * o["r"]) / 1.3)  # ~1 at the rim, ~0 inside
        if o["special"]:  # rounded-up cell: bright body with a dark ring
            val = rng.uniform(0.04, 0.12) - 0.15 * edge + 0.03 * texture[sl_img]
        else:
            depth = style_depth + rng.uniform(-0.03, 0.05)
            val = -depth * (0.7 + 0.3 * norm ** 2) + 0.05 * texture[sl_img] - 0.07 * edge
            if rng.random() < 0.5:  # brighter nucleus-like region near the centre
                val = val + rng.uniform(0.03, 0.08) * np.exp(-(norm / 0.35) ** 2)
        img[sl_img][own] += val[own]
    # bright lines where cells touch each other
    pad = np.pad(labels, 1, mode="edge")
    c = pad[1:-1, 1:-1]
    touch = np.zeros(shape, bool)
    for nb in (pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]):
        touch |= (c > 0) & (nb > 0) & (nb != c)
    img[touch] += 0.7 * halo_amp
    img = ndi.gaussian_filter(img.astype(np.float32), rng.uniform(0.6, 1.0))
    img += rng.normal(0, 0.015 * noise, shape).astype(np.float32)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- public
def make_image(kind: str = "nuclei", shape=(520, 704), seed: int = 0, **opts):
    """Return ``(image, labels)``: uint16 (nuclei) / uint8 (cells) HxW image and int32 labels."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    unknown = set(opts) - {"diameter", "density", "overlap", "min_size", "max_hidden", "noise"}
    if unknown:
        raise TypeError(f"make_image: unknown option(s) {sorted(unknown)}")
    shape = (int(shape[0]), int(shape[1]))
    if min(shape) < 16:
        raise ValueError(f"shape must be at least 16x16, got {shape}")
    rng = np.random.default_rng(seed)
    density, overlap = _rng_opts(rng, opts)
    min_size = int(opts.get("min_size", 15))
    max_hidden = float(opts.get("max_hidden", 0.4))
    noise = float(opts.get("noise", 1.0))
    objects = _build_objects(rng, shape, kind, opts.get("diameter"), density, overlap)
    labels, order = _paint(shape, objects, max_hidden, min_size)
    render = _render_nuclei if kind == "nuclei" else _render_cells
    image = render(rng, shape, objects, labels, order, noise)
    return image, labels


def write_tif(path: Path, array: np.ndarray) -> None:
    """An image or label array as a zlib TIFF, atomically (scripts use it too)."""
    from napari_cellseg.io.files import write_tiff

    write_tiff(path, array)


def write_dataset(out_dir, n: int, kind: str = "mixed", seed: int = 0, shape=(256, 256),
                  start: int = 0, **opts):
    """Write ``n`` images to ``out_dir/images/NAME.tif`` and labels to ``out_dir/labels/NAME.tif``.

    ``kind``: "nuclei", "cells" or "mixed" (each image picks one). Names look like
    ``synth_nuclei_0003.tif``; numbers run from ``start`` (so several calls can fill one
    folder) and image i depends only on (seed, i). Each file is written atomically.
    Returns the list of names (without suffix).
    """
    if kind not in KINDS + ("mixed",):
        raise ValueError(f"kind must be one of {KINDS + ('mixed',)}, got {kind!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(int(start), int(start) + int(n)):
        state = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        k = kind if kind != "mixed" else KINDS[state % 2]
        image, labels = make_image(k, shape=shape, seed=state, **opts)
        name = f"synth_{k}_{i:04d}"
        write_tif(out / "images" / f"{name}.tif", image)
        write_tif(out / "labels" / f"{name}.tif", labels)
        names.append(name)
    return names

