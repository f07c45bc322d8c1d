r"""Crop engine: square spot and niche crops from (multiscale) H&E images, streamed with bounded memory.

This module works at the array level and knows nothing about how spots were found: it takes an image
element (a :class:`xarray.DataArray` with dims ``("c", "y", "x")``, a multiscale :class:`xarray.DataTree`
with ``scale0``, ``scale1``, … or a bare ``(c, y, x)`` array) and spot centres in level-0 pixels.

Coordinate convention
---------------------
Centres are continuous level-0 pixel coordinates ``(x, y)`` = (column, row) in which pixel ``i`` spans
``[i, i + 1)`` (its centre is ``i + 0.5``), the convention of :mod:`spatialdata`. Level ``l`` of a
pyramid maps to level 0 by the per-axis factor ``shape0 / shape_l`` (as :mod:`spatialdata` does in
``compute_coordinates`` and in the scale transformations it writes), so a window ``[x0, x1)`` at level 0
is ``[x0 / f, x1 / f)`` at level ``l``.

Resampling
----------
A window of side ``s`` level-0 pixels is read from the coarsest level on which it still spans at least
``out_size`` pixels (:meth:`ImagePyramid.choose_level`), so crops are never upsampled when the pyramid
allows it. Each output pixel ``k`` is sampled at its exact (sub-pixel) centre
``x0 + (k + 1/2) s / out_size`` with the separable triangle filter that PIL and
``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` use (half-width = the downscale
factor, at least 1 pixel), so the crop centre is the spot centre to floating-point accuracy and the
result equals ``interpolate(..., antialias=True)`` (±1 grey level of rounding) for integer-aligned
windows. ``interpolate`` itself cannot place a window at a fractional offset, so the filter runs in a
small compiled (numba, parallel over windows) kernel that reads the windows of a batch straight from
the region: about 0.5 ms per 224 × 224 crop and core, with no per-spot Python loop. The first call
compiles it (a few seconds, cached on disk afterwards). The kernel uses numba's threading layer (OpenMP
here): extract crops in the main process (or in ``spawn``-ed workers), not inside forked DataLoader
workers of a process that already extracted crops.

Streaming
---------
Spots are sorted into square tiles of the chosen level; for each tile one bounding region is read (a
single dask ``compute`` or numpy slice, at most ``max_region_px`` pixels), its windows are cut and
resampled in batches, and the region is dropped. The next region is read in a background thread while
the current one is resampled. Windows outside the image are padded with ``fill``; the padded share of
the window area is returned as ``pad_fraction``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from hyperst._logging import logger
from hyperst.pp._layout import is_positive
from hyperst.pp._pyramid import ImagePyramid

__all__ = ["MAX_WINDOW_BYTES", "CropBatch", "extract_crops", "iter_crops"]

#: Largest region one window may need (RGB uint8 at the level read); a larger window means a wrong pixel size
#: or spot size, refused before anything is allocated (a 2 mm niche at 0.1 µm/px needs 1.1 GiB).
MAX_WINDOW_BYTES: int = 4 << 30


# --------------------------------------------------------------------------------------------- crops
class CropBatch(NamedTuple):
    """A batch of crops from :func:`iter_crops`.

    Attributes
    ----------
    index
        ``(b,)`` int64 rows of ``centers_px`` the crops belong to.
    crops
        ``(b, out_size, out_size, 3)`` uint8 RGB crops.
    pad_fraction
        ``(b,)`` float32 share of each window's area outside the image.
    level
        Pyramid level the crops were read from.
    """

    index: np.ndarray
    crops: np.ndarray
    pad_fraction: np.ndarray
    level: int


def _check_centers(centers_px: Any) -> np.ndarray:
    c = np.asarray(centers_px, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"`centers_px` must be an (n, 2) array of (x, y) level-0 pixels, got shape {c.shape}.")
    if not np.isfinite(c).all():
        bad = int((~np.isfinite(c)).any(axis=1).sum())
        raise ValueError(f"`centers_px` has {bad} rows with NaN/inf; drop those spots first.")
    return c


def _check_fill(fill: int | Sequence[int]) -> np.ndarray:
    arr = np.asarray(fill)
    if arr.ndim == 0:
        arr = np.repeat(arr, 3)
    if arr.shape != (3,) or not np.issubdtype(arr.dtype, np.number) or ((arr < 0) | (arr > 255)).any():
        raise ValueError(f"`fill` must be an int in [0, 255] or three such ints (RGB), got {fill!r}.")
    return arr.astype(np.uint8)


def _pad_fraction(centers: np.ndarray, side: float, shape0: tuple[int, int]) -> np.ndarray:
    """Share of each level-0 window ``[c - side/2, c + side/2)²`` outside ``[0, W) × [0, H)``."""
    h0, w0 = shape0
    half = side / 2.0
    x0, x1 = centers[:, 0] - half, centers[:, 0] + half
    y0, y1 = centers[:, 1] - half, centers[:, 1] + half
    # outside length per axis (exactly 0 for interior windows), capped at the window side
    out_x = np.minimum(np.clip(-x0, 0.0, None) + np.clip(x1 - w0, 0.0, None), side)
    out_y = np.minimum(np.clip(-y0, 0.0, None) + np.clip(y1 - h0, 0.0, None), side)
    inside = (1.0 - out_x / side) * (1.0 - out_y / side)
    return np.clip(1.0 - inside, 0.0, 1.0).astype(np.float32)


def iter_crops(
    image: Any,
    centers_px: np.ndarray,
    side_px: float,
    *,
    out_size: int = 224,
    fill: int | Sequence[int] = 255,
    batch_size: int = 64,
    level: int | None = None,
    max_region_px: int = 2**23,
    prefetch: bool = True,
    progress: bool = False,
) -> Iterator[CropBatch]:
    """Stream square crops centred on spots, in spatial order and with bounded memory.

    Parameters
    ----------
    image
        Image element: :class:`xarray.DataArray` ``(c, y, x)``, multiscale :class:`xarray.DataTree`, a
        bare ``(c, y, x)`` array or an :class:`ImagePyramid`. RGB uint8.
    centers_px
        ``(n, 2)`` spot centres ``(x, y)`` = (column, row) in continuous level-0 pixels (pixel ``i``
        spans ``[i, i + 1)``).
    side_px
        Window side in level-0 pixels.
    out_size
        Side of the output crops in pixels.
    fill
        Value (or RGB triple) for the parts of a window outside the image.
    batch_size
        Crops per yielded batch (the last one may be smaller). Memory of the resampling scales with it.
    level
        Pyramid level to read; default: :meth:`ImagePyramid.choose_level`.
    max_region_px
        Upper bound on the pixels of one region read at once (tiles are sized so that a tile plus one
        window fits; a single window larger than this is still read whole). The default, 8 MPix, is
        24 MB of RGB; with ``prefetch`` two regions are alive. Memory does not grow with the image size.
    prefetch
        Read the next region in a background thread while the current one is resampled.
    progress
        Show a tqdm progress bar.

    Yields
    ------
    :class:`CropBatch` with the rows of ``centers_px``, the crops, their padded fractions and the level.
    Batches follow the spatial order of the tiles, not the order of ``centers_px``.

    Raises
    ------
    ValueError
        If an argument is invalid.
    """
    from hyperst.pp._resample import plan_axis, resample, tile_groups  # numba: imported when crops are cut

    pyr = ImagePyramid(image)
    centers = _check_centers(centers_px)
    if not is_positive(side_px):
        raise ValueError(f"`side_px` must be a positive number of level-0 pixels, got {side_px!r}.")
    side_px = float(side_px)
    if isinstance(out_size, bool) or not isinstance(out_size, int | np.integer) or out_size < 1:
        raise ValueError(f"`out_size` must be a positive int, got {out_size!r}.")
    out_size = int(out_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if max_region_px < 1:
        raise ValueError(f"`max_region_px` must be positive, got {max_region_px!r}.")
    fill_arr = _check_fill(fill)
    if level is None:
        level = pyr.choose_level(side_px, out_size)
    elif not 0 <= int(level) < len(pyr):
        raise ValueError(f"`level` must be in [0, {len(pyr) - 1}] for this image, got {level!r}.")
    level = int(level)
    n = len(centers)
    if n == 0:
        return

    lvl = pyr.levels[level]
    fy, fx = lvl.factor
    ay = plan_axis(centers[:, 1] / fy, side_px / fy, out_size)
    ax = plan_axis(centers[:, 0] / fx, side_px / fx, out_size)
    pad = _pad_fraction(centers, side_px, pyr.shape0)
    n_max = max(ay.n, ax.n)
    need = 3 * ay.n * ax.n
    if need > MAX_WINDOW_BYTES:
        h0, w0 = pyr.shape0
        raise ValueError(
            f"A window of side_px={side_px:.4g} level-0 pixels needs {ay.n}×{ax.n} px at level {level} "
            f"({need / 2**30:.1f} GiB) for one crop, on a {w0}×{h0} px image: the window side in pixels is its side "
            "in µm divided by the pixel size, so the pixel size is far too small or the spot size far too large "
            "(e.g. spot radii in another unit than the image's pixels). Check `pixel_size` (µm per pixel) and "
            "`spot_diameter` (µm)."
        )
    tile = max(math.isqrt(int(max_region_px)) - n_max, 1)
    if n_max * n_max > max_region_px:
        logger.warning(
            f"iter_crops: one window needs {ay.n}×{ax.n} px at level {level}, more than max_region_px="
            f"{max_region_px}; reading windows one tile at a time."
        )
    _, groups = tile_groups(ay.start, ax.start, tile)
    logger.debug(
        f"iter_crops: {n} windows of {side_px:.1f} px -> level {level} ({side_px / fx:.1f} px), "
        f"{len(groups)} regions (tile {tile} px)"
    )

    def bounds(g: np.ndarray) -> tuple[int, int, int, int]:
        return (
            int(ay.start[g].min()),
            int(ay.start[g].max()) + ay.n,
            int(ax.start[g].min()),
            int(ax.start[g].max()) + ax.n,
        )

    def read(g: np.ndarray) -> np.ndarray:
        y0, y1, x0, x1 = bounds(g)
        return pyr.read_region(level, y0, y1, x0, x1, fill=fill_arr)

    from tqdm.auto import tqdm

    pbar = tqdm(total=n, disable=not progress, desc="crops", unit="spot")
    executor = ThreadPoolExecutor(max_workers=1) if prefetch and len(groups) > 1 else None
    buf: list[tuple[np.ndarray, np.ndarray]] = []
    buffered = 0
    try:
        pending: Future[np.ndarray] | None = executor.submit(read, groups[0]) if executor else None
        for gi, g in enumerate(groups):
            if executor is not None:
                assert pending is not None
                region = pending.result()
                pending = executor.submit(read, groups[gi + 1]) if gi + 1 < len(groups) else None
            else:
                region = read(g)
            y0, _, x0, _ = bounds(g)
            for s in range(0, len(g), batch_size):
                idx = g[s : s + batch_size]
                crops = resample(
                    region,
                    ay.start[idx] - y0,
                    ax.start[idx] - x0,
                    ay.p0[idx],
                    ax.p0[idx],
                    ay,
                    ax,
                    out_size,
                )
                buf.append((idx, crops))
                buffered += len(idx)
                while buffered >= batch_size:
                    idx_all = np.concatenate([b[0] for b in buf])
                    crops_all = np.concatenate([b[1] for b in buf]) if len(buf) > 1 else buf[0][1]
                    head_i, head_c = idx_all[:batch_size], crops_all[:batch_size]
                    rest_i, rest_c = idx_all[batch_size:], crops_all[batch_size:]
                    buf = [(rest_i, rest_c)] if len(rest_i) else []
                    buffered = len(rest_i)
                    pbar.update(len(head_i))
                    yield CropBatch(head_i, head_c, pad[head_i], level)
            del region
        if buffered:
            idx_all = np.concatenate([b[0] for b in buf])
            crops_all = np.concatenate([b[1] for b in buf])
            pbar.update(len(idx_all))
            yield CropBatch(idx_all, crops_all, pad[idx_all], level)
    finally:
        pbar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def extract_crops(
    image: Any,
    centers_px: np.ndarray,
    side_px: float,
    *,
    out_size: int = 224,
    fill: int | Sequence[int] = 255,
    batch_size: int = 64,
    level: int | None = None,
    max_region_px: int = 2**23,
    out: np.ndarray | None = None,
    prefetch: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Square crops centred on spots, resized to ``out_size × out_size`` (see :func:`iter_crops`).

    Parameters
    ----------
    image
        Image element: :class:`xarray.DataArray` ``(c, y, x)``, multiscale :class:`xarray.DataTree`, a
        bare ``(c, y, x)`` array or an :class:`ImagePyramid`. RGB uint8.
    centers_px
        ``(n, 2)`` spot centres ``(x, y)`` in continuous level-0 pixels.
    side_px
        Window side in level-0 pixels.
    out_size
        Side of the output crops in pixels.
    fill
        Value (or RGB triple) for the parts of a window outside the image.
    batch_size
        Windows resampled at once.
    level
        Pyramid level to read; default: the coarsest level with at least ``out_size`` pixels per window.
    max_region_px
        Upper bound on the pixels of one region read at once.
    out
        Optional preallocated ``(n, out_size, out_size, 3)`` uint8 array (e.g. an :class:`numpy.memmap`
        from :meth:`hyperst.data.CropCache.allocate`) to write into, so that large ``n`` need not fit in memory.
    prefetch
        Read the next region in a background thread.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    crops
        ``(n, out_size, out_size, 3)`` uint8, in the order of ``centers_px`` (``out`` when given).
    pad_fraction
        ``(n,)`` float32 share of each window's area outside the image.

    Raises
    ------
    ValueError
        If an argument is invalid or ``out`` has the wrong shape/dtype.
    """
    n = len(np.asarray(centers_px))
    shape = (n, int(out_size), int(out_size), 3)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif tuple(out.shape) != shape or np.dtype(out.dtype) != np.uint8:
        raise ValueError(f"`out` must be a uint8 array of shape {shape}, got {out.dtype} {tuple(out.shape)}.")
    pad = np.zeros(n, dtype=np.float32)
    for batch in iter_crops(
        image,
        centers_px,
        side_px,
        out_size=out_size,
        fill=fill,
        batch_size=batch_size,
        level=level,
        max_region_px=max_region_px,
        prefetch=prefetch,
        progress=progress,
    ):
        out[batch.index] = batch.crops
        pad[batch.index] = batch.pad_fraction
    return out, pad
