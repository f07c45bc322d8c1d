"""The resampling kernel of the crop engine: exact sub-pixel windows with PIL's triangle filter.

Each output pixel ``k`` of a window of side ``s`` (level pixels) is sampled at its exact centre
``x0 + (k + 1/2) s / out_size`` with the separable triangle filter that PIL and
``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` use (half-width = the downscale factor,
at least 1 pixel). :func:`plan_axis` plans one axis for all windows, :func:`tile_groups` sorts windows
into the tiles read at once, and :func:`resample` runs the compiled (numba, parallel over windows) kernel
on one region. The first call compiles the kernel (a few seconds, cached on disk afterwards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

__all__ = ["AxisPlan", "plan_axis", "resample", "tile_groups"]


@dataclass(frozen=True)
class AxisPlan:
    """Resampling plan of one axis for all windows (level pixel units)."""

    step: float  # input pixels per output pixel
    half: float  # kernel half-width
    taps: int  # taps per output pixel
    n: int  # side of the integer sub-crop holding all taps of a window
    start: np.ndarray  # (n_spots,) int64 first pixel of each sub-crop (level coords)
    p0: np.ndarray  # (n_spots,) float64 index-coordinate of output pixel 0 inside the sub-crop


def plan_axis(centre_level: np.ndarray, side_level: float, out_size: int) -> AxisPlan:
    """Resampling plan of one axis: window centres and side in pixels of the level read, output side."""
    step = side_level / out_size
    half = max(step, 1.0)
    taps = math.ceil(2.0 * half) + 1
    # pixel-index coordinate (pixel i has its centre at i) of output pixel 0's centre
    p0 = centre_level - side_level / 2.0 + 0.5 * step - 0.5
    start = np.floor(p0 - half).astype(np.int64)
    n = math.ceil((out_size - 1) * step) + taps + 1
    return AxisPlan(step=step, half=half, taps=taps, n=n, start=start, p0=p0 - start)


def _taps(p0: np.ndarray, ax: AxisPlan, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices (b, out, taps) into the sub-crop and normalised triangle weights (float32)."""
    p = p0[:, None] + np.arange(out_size)[None, :] * ax.step  # (b, out)
    first = np.floor(p - ax.half).astype(np.int64) + 1
    idx = first[..., None] + np.arange(ax.taps)[None, None, :]  # (b, out, taps)
    w = np.clip(1.0 - np.abs(idx - p[..., None]) / ax.half, 0.0, None)
    w /= w.sum(axis=-1, keepdims=True)
    np.clip(idx, 0, ax.n - 1, out=idx)
    return idx, w.astype(np.float32)


@numba.njit(parallel=True, cache=True, nogil=True)
def _resample_kernel(
    region: np.ndarray,
    oy: np.ndarray,
    ox: np.ndarray,
    iy: np.ndarray,
    wy: np.ndarray,
    ix: np.ndarray,
    wx: np.ndarray,
    out: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Separable resampling of windows of ``region`` (c, H, W) into ``out`` (b, oy, ox, c) uint8.

    Window ``b`` reads rows ``oy[b] + iy[b, k, t]`` and columns ``ox[b] + ix[b, j, t]`` with weights
    ``wy``/``wx``: first along y into a float32 buffer over the columns the window needs, then along x.
    """
    n_b, o_y, t_y = iy.shape
    o_x = ix.shape[1]
    t_x = ix.shape[2]
    n_c = region.shape[0]
    for b in numba.prange(n_b):
        x_lo = ix[b].min()
        n_cols = ix[b].max() - x_lo + 1
        x0 = ox[b] + x_lo
        tmp = np.zeros((o_y, n_c, n_cols), np.float32)
        for k in range(o_y):
            for t in range(t_y):
                w = wy[b, k, t]
                if w == 0.0:
                    continue
                r = oy[b] + iy[b, k, t]
                for c in range(n_c):
                    row = region[c, r]
                    acc = tmp[k, c]
                    for x in range(n_cols):
                        acc[x] += w * row[x0 + x]
        for k in range(o_y):
            for j in range(o_x):
                for c in range(n_c):
                    s = np.float32(0.0)
                    for t in range(t_x):
                        s += wx[b, j, t] * tmp[k, c, ix[b, j, t] - x_lo]
                    v = np.floor(s + np.float32(0.5))
                    v = min(max(v, np.float32(0.0)), np.float32(255.0))
                    out[b, k, j, c] = np.uint8(v)


def resample(
    region: np.ndarray,
    oy: np.ndarray,
    ox: np.ndarray,
    py: np.ndarray,
    px: np.ndarray,
    ay: AxisPlan,
    ax: AxisPlan,
    out_size: int,
) -> np.ndarray:
    """Resample the sub-crops at (oy, ox) of a (3, H, W) region to (b, out, out, 3) uint8."""
    iy, wy = _taps(py, ay, out_size)
    ix, wx = _taps(px, ax, out_size)
    region = np.ascontiguousarray(region)  # one compiled specialisation; regions are bounded
    res = np.empty((len(oy), out_size, out_size, region.shape[0]), dtype=np.uint8)
    _resample_kernel(region, np.asarray(oy, np.int64), np.asarray(ox, np.int64), iy, wy, ix, wx, res)
    return res


def tile_groups(starts_y: np.ndarray, starts_x: np.ndarray, tile: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sort windows by the tile holding their sub-crop origin; return the order and the groups."""
    ty = np.floor_divide(starts_y, tile)
    tx = np.floor_divide(starts_x, tile)
    # serpentine order within rows of tiles so that consecutive regions are neighbours
    tx_key = np.where(ty % 2 == 0, tx, -tx)
    order = np.lexsort((starts_x, tx_key, ty))
    key_y, key_x = ty[order], tx[order]
    cut = np.flatnonzero((np.diff(key_y) != 0) | (np.diff(key_x) != 0)) + 1
    return order, np.split(order, cut)
