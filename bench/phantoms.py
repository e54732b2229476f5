"""Pixel data of bench/synth.py: a phantom per profile (CT body, MR head, DX chest, MG breast, US B-mode sector),
a few cached bases per series, plus noise drawn from a per-seed noise bank at a random offset."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from bench.profiles import MG_VIEWS, MR_PROTOCOLS, Profile

# ---- pixel phantoms (bases are cached; only the noise changes from instance to instance) ----------------


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    x = (np.arange(cols, dtype=np.float32) - cols / 2) / (cols / 2)  # both in [-1, 1)
    y = (np.arange(rows, dtype=np.float32) - rows / 2) / (rows / 2)
    return np.broadcast_to(x[None, :], (rows, cols)), np.broadcast_to(y[:, None], (rows, cols))


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _smooth_field(rows: int, cols: int, cell: int, seed: int) -> np.ndarray:
    """A smooth random texture in [0, 1]: a coarse random grid, upsampled and box-blurred."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((rows // cell + 2, cols // cell + 2), dtype=np.float32)
    fine: np.ndarray = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:rows + cell, :cols + cell]
    c = np.cumsum(fine, axis=0, dtype=np.float32)
    fine = (c[cell:] - c[:-cell])[:rows] / cell
    c = np.cumsum(fine, axis=1, dtype=np.float32)
    fine = (c[:, cell:] - c[:, :-cell])[:, :cols] / cell
    lo, hi = float(fine.min()), float(fine.max())
    return (fine - lo) / max(hi - lo, 1e-6)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


CT_LEVELS = 64  # distinct phantom bases along z (the noise makes every slice distinct)
MR_LEVELS = 32


@functools.lru_cache(maxsize=2 * CT_LEVELS)
def _ct_base(rows: int, cols: int, level: int) -> np.ndarray:
    """Stored values (unsigned 12 bit, HU = value - 1024) of an axial chest/abdomen slice, z = level / (L - 1)."""
    x, y = _grid(rows, cols)
    z = level / (CT_LEVELS - 1)
    hu = np.full(x.shape, -1000.0, dtype=np.float32)  # air
    body_a, body_b = 0.78 + 0.06 * np.sin(np.pi * z), 0.55 + 0.04 * np.sin(np.pi * z)
    hu[_ellipse(x, y, 0, 0, body_a, body_b)] = -90.0  # subcutaneous fat
    hu[_ellipse(x, y, 0, 0, body_a - 0.06, body_b - 0.06)] = 40.0  # soft tissue
    if z > 0.35:  # lungs in the upper part of the scan
        lung = 0.18 + 0.12 * np.sin(np.pi * (z - 0.35) / 0.65)
        hu[_ellipse(x, y, -0.32, -0.05, lung * 1.1, lung * 1.6)] = -850.0
        hu[_ellipse(x, y, 0.32, -0.05, lung * 1.1, lung * 1.6)] = -850.0
    else:  # liver and kidneys below
        hu[_ellipse(x, y, -0.28, -0.05, 0.3, 0.25)] = 60.0
        hu[_ellipse(x, y, -0.2, 0.28, 0.08, 0.1)] = 30.0
        hu[_ellipse(x, y, 0.2, 0.28, 0.08, 0.1)] = 30.0
    hu[_ellipse(x, y, 0, 0.38, 0.09, 0.08)] = 700.0  # vertebra
    hu[_ellipse(x, y, 0, 0.38, 0.04, 0.035)] = 250.0  # spinal canal / marrow
    hu[_ellipse(x, y, 0.08, 0.1, 0.06, 0.06)] = 180.0  # aorta with contrast
    hu[(y > 0.72) & (y < 0.76) & (np.abs(x) < 0.9)] = 300.0  # table
    return _frozen(np.clip(hu + 1024.0, 0, 4095).astype(np.uint16))


@functools.lru_cache(maxsize=len(MR_PROTOCOLS) * MR_LEVELS)
def _mr_base(rows: int, cols: int, level: int, contrast: float) -> np.ndarray:
    """Stored values (unsigned 12 bit) of an axial head slice; ``contrast`` varies by series."""
    x, y = _grid(rows, cols)
    z = level / (MR_LEVELS - 1)
    img = np.zeros(x.shape, dtype=np.float32)
    scale = 0.6 + 0.3 * np.sin(np.pi * min(max(z, 0.05), 0.95))
    img[_ellipse(x, y, 0, 0, 0.75 * scale, 0.9 * scale)] = 1400.0  # scalp/skull marrow
    img[_ellipse(x, y, 0, 0, 0.68 * scale, 0.83 * scale)] = 200.0  # skull
    img[_ellipse(x, y, 0, 0, 0.62 * scale, 0.77 * scale)] = 900.0 * contrast  # grey matter
    img[_ellipse(x, y, 0, 0, 0.5 * scale, 0.65 * scale)] = 700.0 + 500.0 * (1.0 - contrast)  # white matter
    img[_ellipse(x, y, -0.12, 0, 0.06 * scale, 0.25 * scale)] = 2200.0 * contrast  # ventricles (CSF)
    img[_ellipse(x, y, 0.12, 0, 0.06 * scale, 0.25 * scale)] = 2200.0 * contrast
    img *= 1.0 - 0.15 * (x**2 + y**2)  # coil sensitivity falloff
    return _frozen(np.clip(img, 0, 4095).astype(np.uint16))


@functools.lru_cache(maxsize=4)
def _dx_base(rows: int, cols: int, view: int) -> np.ndarray:
    """A chest radiograph for presentation (MONOCHROME2: attenuation is bright), PA (0) or lateral (1)."""
    x, y = _grid(rows, cols)
    img = np.full(x.shape, 150.0, dtype=np.float32)  # direct exposure
    ribs = np.clip(np.sin(2 * np.pi * (5.5 * y + 0.9 * x**2)), 0, 1) ** 3 * 420.0
    if view == 0:
        body = _ellipse(x, y, 0, 0.25, 0.86, 1.05)
        img[body] = 1850.0
        for cx in (-0.38, 0.38):
            lung = _ellipse(x, y, cx, -0.05, 0.27, 0.62)
            img[lung] = 700.0 + ribs[lung]
        img[_ellipse(x, y, 0.12, 0.3, 0.3, 0.28)] = 2350.0  # heart
        img[(np.abs(x) < 0.07) & body] = 2650.0  # spine and mediastinum
        for sign in (-1, 1):  # clavicles
            img[(np.abs(y + 0.62 - 0.25 * sign * x) < 0.025) & (np.abs(x) < 0.5) & (sign * x > 0.05)] = 2900.0
    else:
        body = _ellipse(x, y, 0, 0.2, 0.62, 1.0)
        img[body] = 1900.0
        lung = _ellipse(x, y, -0.05, -0.05, 0.42, 0.6)
        img[lung] = 760.0 + ribs[lung] * 0.6
        img[_ellipse(x, y, -0.25, 0.3, 0.25, 0.3)] = 2300.0  # heart
        img[(np.abs(x - 0.45) < 0.07) & body] = 2700.0  # spine
    img[(x > 0.8) & (x < 0.9) & (y > -0.9) & (y < -0.78)] = 4000.0  # side marker
    img *= 1.0 + 0.08 * y  # heel effect
    return _frozen(np.clip(img, 0, 4095).astype(np.uint16))


@functools.lru_cache(maxsize=4)
def _mg_base(rows: int, cols: int, view: int) -> np.ndarray:
    """A mammogram for presentation, chest wall on the right for the right breast (the left one is mirrored)."""
    laterality, position, _ = MG_VIEWS[view]
    if laterality == "L":
        return _frozen(np.ascontiguousarray(_mg_base(rows, cols, view - 1)[:, ::-1]))
    x, y = _grid(rows, cols)
    img = np.full(x.shape, 60.0, dtype=np.float32)
    r = np.sqrt(((x - 1.0) / 1.55) ** 2 + (y / 0.82) ** 2)  # breast outline from the chest wall (x = 1)
    breast = r < 1.0
    texture = _smooth_field(rows, cols, max(8, cols // 40), 20240 + view)
    img[breast] = 1500.0 + 900.0 * texture[breast] * (1.0 - r[breast])  # fibroglandular tissue
    img[(r > 0.97) & breast] = 1900.0  # skin line
    if position == "MLO":
        img[(x - 1.0) * 0.9 > y * 1.6 + 0.25] = 2600.0  # pectoral muscle (upper chest-wall corner)
    rng = np.random.default_rng(7 + view)
    for _ in range(12):  # microcalcifications
        cy, cx = int(rng.integers(rows // 4, 3 * rows // 4)), int(rng.integers(cols // 3, cols - 20))
        radius = int(rng.integers(2, 6))
        dy, dx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
        sl = (slice(cy - radius, cy + radius + 1), slice(cx - radius, cx + radius + 1))
        img[sl][dy**2 + dx**2 <= radius**2] = 3600.0
    return _frozen(np.clip(img, 0, 4095).astype(np.uint16))


@functools.lru_cache(maxsize=2)
def _us_base(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The B-mode sector (grey, 8 bit) and the mask where speckle noise goes."""
    x, y = _grid(rows, cols)
    py = (y + 1.0) * rows / cols  # depth from the top, in units of half the width
    r = np.sqrt(x**2 + (py + 0.1) ** 2)
    theta = np.arctan2(x, py + 0.1)
    fan = (np.abs(theta) < 0.62) & (r > 0.15) & (r < 1.45)
    texture = _smooth_field(rows, cols, 12, 99)
    img = np.zeros(x.shape, dtype=np.float32)
    img[fan] = (55.0 + 50.0 * texture[fan]) * (1.0 - 0.35 * r[fan])  # tissue, attenuated with depth
    for depth in (0.35, 0.42, 0.9):  # fascia / capsule lines
        img[fan & (np.abs(r - depth) < 0.008)] = 190.0
    img[fan & _ellipse(x, py, -0.12, 0.72, 0.14, 0.1)] = 6.0  # a cyst (anechoic)
    img[fan & _ellipse(x, py, -0.12, 0.84, 0.16, 0.03)] = 150.0  # with posterior enhancement
    img[:18, 10:200:7] = 200.0  # annotation text bar
    img[:18, 10:200:13] = 0.0
    img[rows // 4: rows * 3 // 4, cols - 14:cols - 8] = np.linspace(255, 0, rows * 3 // 4 - rows // 4)[:, None]  # bar
    return _frozen(np.clip(img, 0, 255).astype(np.int16)), _frozen(fan.astype(np.int16))


NOISE_SLACK = 1 << 16  # noise offsets are drawn from [0, NOISE_SLACK)


@functools.lru_cache(maxsize=6)
def _noise_bank(n: int, sigma: float, rician: bool, seed: int) -> np.ndarray:
    """``n + NOISE_SLACK`` int16 noise values; an image takes ``n`` of them at a random offset."""
    bank = np.random.default_rng([seed, n, 104729]).standard_normal(n + NOISE_SLACK, dtype=np.float32)
    bank *= sigma
    if rician:
        np.abs(bank, out=bank)
    return _frozen(np.rint(bank, out=bank).astype(np.int16))


def clear_caches() -> None:
    """Drop the cached phantom bases and noise banks (memory; tests use it to regenerate from scratch)."""
    for cached in (_ct_base, _mr_base, _dx_base, _mg_base, _us_base, _noise_bank):
        cached.cache_clear()


def _noisy(base: np.ndarray, noise: np.ndarray, offset: int, maxval: int, mask: np.ndarray | None = None) -> np.ndarray:
    n = noise[offset:offset + base.size].reshape(base.shape)
    if mask is not None:
        n = n * mask
    out = np.add(base, n, dtype=np.int32)
    np.clip(out, 0, maxval, out=out)
    return out.astype(np.uint16 if maxval > 255 else np.uint8)


def _pixels(p: Profile, series: dict[str, Any], in_series: int, view: int, noise: np.ndarray,
            offsets: np.random.Generator) -> np.ndarray:
    """The pixel array of one instance: (rows, cols), or (frames, rows, cols, 3) for US."""
    maxval = (1 << p.bits_stored) - 1
    if p.modality == "US":
        base, mask = _us_base(p.rows, p.cols)
        frames = np.empty((p.frames, p.rows, p.cols, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:p.rows, 0:p.cols]
        box = (slice(p.rows // 3, p.rows // 3 + p.rows // 6), slice(p.cols // 2, p.cols // 2 + p.cols // 8))
        for f in range(p.frames):
            gray = _noisy(base, noise, int(offsets.integers(NOISE_SLACK)), maxval, mask)
            phase = 2 * np.pi * f / max(p.frames, 1)
            # a moving echo (a valve leaflet), drawn in its bounding box only
            cy, cx = int(p.rows * (0.5 + 0.06 * np.sin(phase))), int(p.cols * 0.45)
            sl = (slice(max(cy - 14, 0), cy + 15), slice(max(cx - 40, 0), cx + 41))
            leaflet = ((yy[sl] - cy) / 6.0) ** 2 + ((xx[sl] - cx) / 40.0) ** 2 <= 1.0
            gray[sl][leaflet] = 230
            frames[f] = gray[:, :, None]
            # colour Doppler box: red towards, blue away, pulsing with the frame
            by, bx = yy[box], xx[box]
            flow = np.sin(by / 9.0 + bx / 23.0 + phase) * 127.0 * (0.6 + 0.4 * np.cos(phase))
            rgb = frames[f][box]
            towards = flow > 25
            away = flow < -25
            rgb[towards] = np.stack([np.clip(flow[towards] + 128, 0, 255), flow[towards] * 0.3,
                                     np.zeros(int(towards.sum()))], axis=1).astype(np.uint8)
            rgb[away] = np.stack([np.zeros(int(away.sum())), -flow[away] * 0.4,
                                  np.clip(128 - flow[away], 0, 255)], axis=1).astype(np.uint8)
            frames[f][box] = rgb
        return frames
    if p.modality == "CT":
        level = round(series["z"](in_series) * (CT_LEVELS - 1))
        base = _ct_base(p.rows, p.cols, level)
    elif p.modality == "MR":
        level = round(series["z"](in_series) * (MR_LEVELS - 1))
        base = _mr_base(p.rows, p.cols, level, series["contrast"])
    elif p.modality == "DX":
        base = _dx_base(p.rows, p.cols, view)
    else:
        base = _mg_base(p.rows, p.cols, view)
    return _noisy(base, noise, int(offsets.integers(NOISE_SLACK)), maxval)
