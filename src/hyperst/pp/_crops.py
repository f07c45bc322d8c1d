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

import contextlib
import hashlib
import json
import math
import mmap
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numba
import numpy as np
import torch
from torch.utils.data import Dataset

from hyperst._logging import logger

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropBatch",
    "CropCache",
    "CropGeometry",
    "ImagePyramid",
    "PyramidLevel",
    "SpotCropDataset",
    "centers_hash",
    "dihedral",
    "dihedral_inverse",
    "extract_crops",
    "image_fingerprint",
    "iter_crops",
    "tissue_fraction",
]

#: ImageNet channel means (RGB, on the 0–1 scale).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: ImageNet channel standard deviations (RGB, on the 0–1 scale).
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Side of the spot window in µm below which the window is enlarged (METHOD §1: max(112 µm, diameter)).
MIN_SPOT_WINDOW_UM: float = 112.0
#: Niche/spot window ratio of Visium (255 µm / 112 µm), used by the generic layout without a pitch.
GENERIC_NICHE_RATIO: float = 2.28
#: Standard centre-to-centre distances (µm) used when a layout is given without its pitch.
_STANDARD_PITCH: dict[str, float] = {"visium": 100.0, "st": 200.0}

_Layout = Literal["visium", "st", "generic"]


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class CropGeometry:
    """Physical size of the spot and niche windows and the pixel size of the crops.

    Parameters
    ----------
    spot_size_um
        Side of the square spot window in µm.
    niche_size_um
        Side of the square niche window in µm.
    out_size
        Side of the output crops in pixels (both crops are resized to ``out_size × out_size``).

    Raises
    ------
    ValueError
        If a size is not a positive finite number.
    """

    spot_size_um: float
    niche_size_um: float
    out_size: int = 224

    def __post_init__(self) -> None:
        for name in ("spot_size_um", "niche_size_um"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive finite number of µm, got {value!r}.")
            object.__setattr__(self, name, float(value))
        if isinstance(self.out_size, bool) or not isinstance(self.out_size, int | np.integer):
            raise ValueError(f"`out_size` must be a positive int, got {self.out_size!r}.")
        if self.out_size < 1:
            raise ValueError(f"`out_size` must be a positive int, got {self.out_size!r}.")
        object.__setattr__(self, "out_size", int(self.out_size))

    @classmethod
    def for_layout(
        cls,
        layout: _Layout,
        *,
        spot_diameter: float,
        pitch: float | None = None,
        out_size: int = 224,
    ) -> CropGeometry:
        """Crop geometry of METHOD §1 for a spot layout.

        The spot window side is ``max(112 µm, spot_diameter)``. The niche window is the square centred on
        the spot that covers the spot and its immediate neighbours:

        - ``"visium"`` (hexagonal, 6 neighbours): ``2 · (pitch + spot_diameter / 2)`` (≈ 255 µm),
        - ``"st"`` (square grid, 3 × 3 neighbours): ``2 · pitch + spot_diameter`` (500 µm for legacy ST),
        - ``"generic"``: ``2 · pitch + spot_diameter`` when the pitch is known, otherwise
          ``2.28 ×`` the spot window (the Visium ratio 255 / 112).

        Parameters
        ----------
        layout
            ``"visium"``, ``"st"`` or ``"generic"``.
        spot_diameter
            Spot diameter in µm.
        pitch
            Centre-to-centre distance of neighbouring spots in µm. For ``"visium"`` and ``"st"`` the
            standard pitch (100 µm / 200 µm) is used when it is ``None``.
        out_size
            Side of the output crops in pixels.

        Returns
        -------
        The crop geometry.

        Raises
        ------
        ValueError
            If the layout is unknown or a size is not positive.
        """
        if layout not in ("visium", "st", "generic"):
            raise ValueError(f"`layout` must be 'visium', 'st' or 'generic', got {layout!r}.")
        if not _is_positive(spot_diameter):
            raise ValueError(f"`spot_diameter` must be a positive number of µm, got {spot_diameter!r}.")
        if pitch is not None and not _is_positive(pitch):
            raise ValueError(f"`pitch` must be a positive number of µm or None, got {pitch!r}.")
        spot_side = max(MIN_SPOT_WINDOW_UM, float(spot_diameter))
        if pitch is None and layout in _STANDARD_PITCH:
            pitch = _STANDARD_PITCH[layout]
            logger.info(f"CropGeometry.for_layout: no pitch given, using the standard {layout} pitch {pitch} µm")
        if layout == "visium":
            assert pitch is not None
            niche_side = 2.0 * (pitch + spot_diameter / 2.0)
        elif pitch is not None:
            niche_side = 2.0 * pitch + spot_diameter
        else:
            niche_side = GENERIC_NICHE_RATIO * spot_side
        return cls(spot_size_um=spot_side, niche_size_um=max(niche_side, spot_side), out_size=out_size)

    def sides_px(self, pixel_size: float) -> tuple[float, float]:
        """Window sides in level-0 pixels.

        Parameters
        ----------
        pixel_size
            µm per level-0 pixel.

        Returns
        -------
        ``(spot_side_px, niche_side_px)``.

        Raises
        ------
        ValueError
            If ``pixel_size`` is not positive.
        """
        if not isinstance(pixel_size, int | float) or not math.isfinite(pixel_size) or pixel_size <= 0:
            raise ValueError(f"`pixel_size` must be a positive number of µm per pixel, got {pixel_size!r}.")
        return self.spot_size_um / pixel_size, self.niche_size_um / pixel_size

    def to_dict(self) -> dict[str, Any]:
        """Plain-``dict`` form (JSON- and ``.uns``-serialisable).

        Returns
        -------
        ``{"spot_size_um": ..., "niche_size_um": ..., "out_size": ...}``.
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CropGeometry:
        """Inverse of :meth:`to_dict`.

        Parameters
        ----------
        d
            Mapping with the fields of :class:`CropGeometry`.

        Returns
        -------
        The crop geometry.

        Raises
        ------
        ValueError
            If ``d`` has unknown or missing keys.
        """
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"CropGeometry.from_dict: unknown keys {sorted(unknown)}; expected {sorted(names)}.")
        missing = {"spot_size_um", "niche_size_um"} - set(d)
        if missing:
            raise ValueError(f"CropGeometry.from_dict: missing keys {sorted(missing)}.")
        kwargs = dict(d)
        if "out_size" in kwargs:
            kwargs["out_size"] = int(kwargs["out_size"])
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------- pyramid
@dataclass(frozen=True)
class PyramidLevel:
    """One level of an image pyramid.

    Attributes
    ----------
    index
        Level number (0 = full resolution).
    data
        The ``(c, y, x)`` array (numpy, dask or any array with ``shape``/``dtype``/``__getitem__``).
    shape
        ``(height, width)`` in pixels.
    factor
        ``(fy, fx)``: level-0 pixels per pixel of this level (``shape0 / shape``).
    """

    index: int
    data: Any
    shape: tuple[int, int]
    factor: tuple[float, float]


def _as_cyx(arr: Any, name: str) -> Any:
    """Return the ``(c, y, x)`` array of a DataArray (transposed lazily) or validate a bare array."""
    import xarray as xr

    if isinstance(arr, xr.DataArray):
        dims = tuple(str(d) for d in arr.dims)
        if set(dims) != {"c", "y", "x"}:
            raise ValueError(
                f"`image` ({name}) must have dims ('c', 'y', 'x'), got {dims}. 3D images or images without a "
                "channel axis are not supported: select a z plane / add a 'c' axis first."
            )
        return arr.transpose("c", "y", "x").data
    if not all(hasattr(arr, a) for a in ("shape", "dtype", "__getitem__")):
        raise TypeError(
            f"`image` ({name}) must be an xarray.DataArray, an xarray.DataTree or a (c, y, x) array, "
            f"got {type(arr).__name__}."
        )
    if len(arr.shape) != 3:
        raise ValueError(f"`image` ({name}) must be a (c, y, x) array, got shape {tuple(arr.shape)}.")
    return arr


class ImagePyramid:
    """Read-only view of an image element as a list of resolution levels.

    Parameters
    ----------
    image
        A :class:`xarray.DataArray` with dims ``("c", "y", "x")``, a multiscale :class:`xarray.DataTree`
        whose children ``scale0``, ``scale1``, … each hold one data variable (spatialdata's layout), or a
        bare ``(c, y, x)`` numpy/dask/zarr array. RGB ``uint8`` is expected: 4 channels are read as RGB
        (alpha dropped) and 1 channel is replicated to grey RGB.

    Raises
    ------
    TypeError
        If ``image`` is of an unsupported type.
    ValueError
        If dims, dtype or channels are unsupported, or the levels are not ordered from fine to coarse.
    """

    def __init__(self, image: Any) -> None:
        import xarray as xr

        if isinstance(image, ImagePyramid):
            self.levels: list[PyramidLevel] = list(image.levels)
            self.n_channels: int = image.n_channels
            return
        arrays: list[Any] = []
        if isinstance(image, xr.DataTree):
            names = [k for k in image.children if str(k).startswith("scale")]
            if not names:
                raise ValueError(
                    "`image` is a DataTree without 'scale0', 'scale1', … children; pass a spatialdata image "
                    "element (multiscale images have one child per level)."
                )
            try:
                names = sorted(names, key=lambda k: int(str(k)[len("scale") :]))
            except ValueError:
                raise ValueError(f"`image`: cannot order the DataTree levels {names}; expected 'scale<int>'.") from None
            for k in names:
                node = image[k]
                variables = list(node.ds.data_vars.values())
                if len(variables) != 1:
                    raise ValueError(f"`image` level {k!r} must hold exactly one data variable, got {len(variables)}.")
                arrays.append(_as_cyx(variables[0], k))
        else:
            arrays.append(_as_cyx(image, "image"))

        dtype = np.dtype(arrays[0].dtype)
        if dtype != np.uint8:
            raise ValueError(
                f"`image` must be uint8 RGB, got dtype {dtype}. Convert it first, e.g. "
                "`(img / img.max() * 255).astype('uint8')` for a float image in [0, max]."
            )
        n_channels = int(arrays[0].shape[0])
        if n_channels not in (1, 3, 4):
            raise ValueError(f"`image` must have 1, 3 or 4 channels (RGB[A] or grey), got {n_channels}.")
        h0, w0 = int(arrays[0].shape[1]), int(arrays[0].shape[2])
        if h0 < 1 or w0 < 1:
            raise ValueError(f"`image` is empty: shape {tuple(arrays[0].shape)}.")
        levels = []
        for i, arr in enumerate(arrays):
            h, w = int(arr.shape[1]), int(arr.shape[2])
            if int(arr.shape[0]) != n_channels or np.dtype(arr.dtype) != dtype:
                raise ValueError(f"`image` level {i} has shape {tuple(arr.shape)} / dtype {arr.dtype}, unlike level 0.")
            if h < 1 or w < 1 or (i and (h > levels[-1].shape[0] or w > levels[-1].shape[1])):
                raise ValueError(f"`image` levels must get smaller: level {i} has shape {(h, w)}.")
            levels.append(PyramidLevel(index=i, data=arr, shape=(h, w), factor=(h0 / h, w0 / w)))
        self.levels = levels
        self.n_channels = n_channels

    @property
    def shape0(self) -> tuple[int, int]:
        """``(height, width)`` of level 0 in pixels."""
        return self.levels[0].shape

    def __len__(self) -> int:
        return len(self.levels)

    def __repr__(self) -> str:
        lv = ", ".join(f"{lvl.shape[0]}×{lvl.shape[1]} (/{lvl.factor[1]:.3g})" for lvl in self.levels)
        return f"ImagePyramid({self.n_channels} channels; levels: {lv})"

    def choose_level(self, side_px_level0: float, out_size: int) -> int:
        """Coarsest level on which a window still spans at least ``out_size`` pixels.

        This is the level closest to the target resolution that needs no upsampling; level 0 when even
        level 0 has fewer pixels than ``out_size`` across the window.

        Parameters
        ----------
        side_px_level0
            Window side in level-0 pixels.
        out_size
            Side of the output crop in pixels.

        Returns
        -------
        The level index.
        """
        best = 0
        for lvl in self.levels:
            side = side_px_level0 / max(lvl.factor)
            if side >= out_size * (1.0 - 1e-9):
                best = lvl.index
        return best

    def read_region(
        self, level: int, y0: int, y1: int, x0: int, x1: int, *, fill: np.ndarray | int = 255
    ) -> np.ndarray:
        """Read ``[y0, y1) × [x0, x1)`` of a level as ``(3, h, w)`` uint8, padded with ``fill`` outside.

        Exactly one read of the intersecting part of the image is done (one dask ``compute`` or one slice).

        Parameters
        ----------
        level
            Level index.
        y0, y1, x0, x1
            Region bounds in pixels of that level (may extend beyond the image).
        fill
            Value (or per-channel RGB values) used outside the image.

        Returns
        -------
        The region, dtype uint8 (possibly a read-only view of a numpy-backed level).
        """
        lvl = self.levels[level]
        h, w = lvl.shape
        fill_arr = np.broadcast_to(np.asarray(fill, dtype=np.uint8).reshape(-1), (3,))
        out_h, out_w = max(y1 - y0, 0), max(x1 - x0, 0)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        inside = cy1 > cy0 and cx1 > cx0
        block: np.ndarray | None = None
        if inside:
            c_sel = slice(0, 3) if self.n_channels >= 3 else slice(0, 1)
            part = lvl.data[c_sel, cy0:cy1, cx0:cx1]
            if hasattr(part, "compute"):
                part = part.compute()
            block = np.asarray(part)
            if block.shape[0] == 1:
                block = np.broadcast_to(block, (3, *block.shape[1:]))
        if inside and (cy0, cy1, cx0, cx1) == (y0, y1, x0, x1):
            assert block is not None
            return block
        region = np.empty((3, out_h, out_w), dtype=np.uint8)
        region[:] = fill_arr[:, None, None]
        if inside:
            region[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = block
        return region


def image_fingerprint(image: Any) -> str:
    """Cheap identity of an image for cache keys: level shapes, dtype and a hash of a central block.

    Only a block of at most 128 × 128 pixels at the centre of the coarsest level is read.

    Parameters
    ----------
    image
        Anything :class:`ImagePyramid` accepts.

    Returns
    -------
    A hex digest.
    """
    pyr = ImagePyramid(image)
    lvl = pyr.levels[-1]
    h, w = lvl.shape
    y0, x0 = max(h // 2 - 64, 0), max(w // 2 - 64, 0)
    block = pyr.read_region(lvl.index, y0, min(y0 + 128, h), x0, min(x0 + 128, w))
    m = hashlib.sha256()
    m.update(repr([(lv.shape, pyr.n_channels) for lv in pyr.levels]).encode())
    m.update(block.tobytes())
    return m.hexdigest()[:24]


def centers_hash(centers_px: np.ndarray) -> str:
    """Stable hash of spot centres (for cache keys).

    Parameters
    ----------
    centers_px
        ``(n, 2)`` centres.

    Returns
    -------
    A hex digest of the float64 values and the shape.
    """
    arr = np.ascontiguousarray(np.asarray(centers_px, dtype=np.float64))
    m = hashlib.sha256()
    m.update(repr(arr.shape).encode())
    m.update(arr.tobytes())
    return m.hexdigest()[:24]


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


def _is_positive(value: Any) -> bool:
    """Whether ``value`` is a real, finite, positive number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return bool(math.isfinite(value) and value > 0)


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


@dataclass(frozen=True)
class _Axis:
    """Resampling plan of one axis for all windows (level pixel units)."""

    step: float  # input pixels per output pixel
    half: float  # kernel half-width
    taps: int  # taps per output pixel
    n: int  # side of the integer sub-crop holding all taps of a window
    start: np.ndarray  # (n_spots,) int64 first pixel of each sub-crop (level coords)
    p0: np.ndarray  # (n_spots,) float64 index-coordinate of output pixel 0 inside the sub-crop


def _plan_axis(centre_level: np.ndarray, side_level: float, out_size: int) -> _Axis:
    step = side_level / out_size
    half = max(step, 1.0)
    taps = math.ceil(2.0 * half) + 1
    # pixel-index coordinate (pixel i has its centre at i) of output pixel 0's centre
    p0 = centre_level - side_level / 2.0 + 0.5 * step - 0.5
    start = np.floor(p0 - half).astype(np.int64)
    n = math.ceil((out_size - 1) * step) + taps + 1
    return _Axis(step=step, half=half, taps=taps, n=n, start=start, p0=p0 - start)


def _taps(p0: np.ndarray, ax: _Axis, out_size: int) -> tuple[np.ndarray, np.ndarray]:
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


def _resample(
    region: np.ndarray,
    oy: np.ndarray,
    ox: np.ndarray,
    py: np.ndarray,
    px: np.ndarray,
    ay: _Axis,
    ax: _Axis,
    out_size: int,
) -> np.ndarray:
    """Resample the sub-crops at (oy, ox) of a (3, H, W) region to (b, out, out, 3) uint8."""
    iy, wy = _taps(py, ay, out_size)
    ix, wx = _taps(px, ax, out_size)
    region = np.ascontiguousarray(region)  # one compiled specialisation; regions are bounded
    res = np.empty((len(oy), out_size, out_size, region.shape[0]), dtype=np.uint8)
    _resample_kernel(region, np.asarray(oy, np.int64), np.asarray(ox, np.int64), iy, wy, ix, wx, res)
    return res


def _groups(starts_y: np.ndarray, starts_x: np.ndarray, tile: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sort windows by the tile holding their sub-crop origin; return the order and the groups."""
    ty = np.floor_divide(starts_y, tile)
    tx = np.floor_divide(starts_x, tile)
    # serpentine order within rows of tiles so that consecutive regions are neighbours
    tx_key = np.where(ty % 2 == 0, tx, -tx)
    order = np.lexsort((starts_x, tx_key, ty))
    key_y, key_x = ty[order], tx[order]
    cut = np.flatnonzero((np.diff(key_y) != 0) | (np.diff(key_x) != 0)) + 1
    return order, np.split(order, cut)


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
    pyr = ImagePyramid(image)
    centers = _check_centers(centers_px)
    if not _is_positive(side_px):
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
    ay = _plan_axis(centers[:, 1] / fy, side_px / fy, out_size)
    ax = _plan_axis(centers[:, 0] / fx, side_px / fx, out_size)
    pad = _pad_fraction(centers, side_px, pyr.shape0)
    n_max = max(ay.n, ax.n)
    tile = max(math.isqrt(int(max_region_px)) - n_max, 1)
    if n_max * n_max > max_region_px:
        logger.warning(
            f"iter_crops: one window needs {ay.n}×{ax.n} px at level {level}, more than max_region_px="
            f"{max_region_px}; reading windows one tile at a time."
        )
    _, groups = _groups(ay.start, ax.start, tile)
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
                crops = _resample(
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
        from :meth:`CropCache.allocate`) to write into, so that large ``n`` need not fit in memory.
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


# --------------------------------------------------------------------------------------------- tissue
def tissue_fraction(
    crops: np.ndarray,
    *,
    min_saturation: float = 0.07,
    min_value: float = 0.1,
    max_value: float = 1.0,
    batch_size: int = 256,
) -> np.ndarray:
    """Fraction of the pixels of each crop that look like stained tissue.

    A pixel is tissue when its HSV saturation ``(max - min) / max`` of RGB exceeds ``min_saturation``
    (white/grey background and white padding are unsaturated whatever their brightness) and its value
    ``max / 255`` lies in ``(min_value, max_value]`` (black padding and dark debris are excluded). H&E
    tissue, pink or purple, has saturation well above 0.07.

    Parameters
    ----------
    crops
        ``(n, h, w, 3)`` uint8 RGB crops (numpy or memmap; processed in batches).
    min_saturation
        Saturation threshold (0–1).
    min_value
        Pixels with value ``<=`` this are not tissue (0–1).
    max_value
        Pixels with value above this are not tissue (0–1; 1 disables the test).
    batch_size
        Crops processed at once.

    Returns
    -------
    ``(n,)`` float32 fractions in ``[0, 1]``.

    Raises
    ------
    ValueError
        If ``crops`` is not ``(n, h, w, 3)`` uint8.
    """
    if crops.ndim != 4 or crops.shape[-1] != 3 or np.dtype(crops.dtype) != np.uint8:
        raise ValueError(f"`crops` must be (n, h, w, 3) uint8 RGB, got {crops.dtype} {tuple(crops.shape)}.")
    n = crops.shape[0]
    out = np.zeros(n, dtype=np.float32)
    s_num = round(min_saturation * 1024)  # integer arithmetic: (mx - mn) * 1024 > s_num * mx
    v_lo, v_hi = min_value * 255.0, max_value * 255.0
    for s in range(0, n, batch_size):
        x = np.asarray(crops[s : s + batch_size])
        mx = x.max(axis=-1).astype(np.int32)
        mn = x.min(axis=-1).astype(np.int32)
        tissue = ((mx - mn) * 1024 > s_num * mx) & (mx > v_lo) & (mx <= v_hi)
        out[s : s + batch_size] = tissue.mean(axis=(1, 2))
    return out


# --------------------------------------------------------------------------------------------- dihedral
def _layout(x: Any, layout: str | None) -> str:
    if layout is not None:
        if layout not in ("hwc", "chw"):
            raise ValueError(f"`layout` must be 'hwc', 'chw' or None, got {layout!r}.")
        return layout
    if x.ndim < 3:
        raise ValueError(f"dihedral: need (..., H, W, C) or (..., C, H, W), got {x.ndim} dims; pass `layout`")
    last, third = int(x.shape[-1]), int(x.shape[-3])
    ch = (1, 3, 4)
    if last in ch and third not in ch:
        return "hwc"
    if third in ch and last not in ch:
        return "chw"
    raise ValueError(
        f"dihedral: cannot tell channels-last from channels-first for shape {tuple(x.shape)}; pass `layout`."
    )


def dihedral(x: np.ndarray | torch.Tensor, k: int, *, layout: str | None = None) -> np.ndarray | torch.Tensor:
    """Apply one of the 8 symmetries of the square to images.

    ``k % 4`` quarter turns (counter-clockwise, as :func:`numpy.rot90`) after a left-right flip when
    ``k >= 4``. :func:`dihedral_inverse` gives the inverse.

    Parameters
    ----------
    x
        Array or tensor ``(..., H, W, C)`` or ``(..., C, H, W)``.
    k
        Element of the group, ``0 <= k < 8`` (0 = identity).
    layout
        ``"hwc"`` or ``"chw"``; inferred from which axis has 1, 3 or 4 entries when ``None``.

    Returns
    -------
    The transformed array (a numpy view) or tensor (a copy).

    Raises
    ------
    ValueError
        If ``k`` is outside ``0..7`` or the layout is ambiguous.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= int(k) < 8:
        raise ValueError(f"`k` must be an int in 0..7, got {k!r}.")
    k = int(k)
    lay = _layout(x, layout)
    h_ax, w_ax = (-3, -2) if lay == "hwc" else (-2, -1)
    if isinstance(x, torch.Tensor):
        y = torch.flip(x, dims=(w_ax,)) if k >= 4 else x
        return torch.rot90(y, k % 4, dims=(h_ax, w_ax))
    y = np.flip(x, axis=w_ax) if k >= 4 else x
    return np.rot90(y, k % 4, axes=(h_ax, w_ax))


def dihedral_inverse(k: int) -> int:
    """Index of the inverse of :func:`dihedral` ``k``.

    Parameters
    ----------
    k
        Element of the group, ``0 <= k < 8``.

    Returns
    -------
    ``k'`` such that ``dihedral(dihedral(x, k), k') == x``.

    Raises
    ------
    ValueError
        If ``k`` is outside ``0..7``.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= int(k) < 8:
        raise ValueError(f"`k` must be an int in 0..7, got {k!r}.")
    k = int(k)
    return (4 - k) % 4 if k < 4 else k  # reflections are involutions


# --------------------------------------------------------------------------------------------- dataset
def _memmap_state(arr: Any) -> Any:
    """Replace a file-backed memmap by a descriptor so that pickling does not copy the data.

    Only memmaps that map a file directly (not slices of one, whose ``offset`` attribute is the
    parent's) are replaced; anything else is pickled as is.
    """
    if isinstance(arr, np.memmap) and getattr(arr, "filename", None) and isinstance(arr.base, mmap.mmap):
        order = "C" if arr.flags.c_contiguous else ("F" if arr.flags.f_contiguous else None)
        if order is not None:
            return ("__memmap__", str(arr.filename), arr.dtype.str, arr.shape, int(arr.offset), order)
    return arr


def _memmap_restore(state: Any) -> Any:
    if isinstance(state, tuple) and len(state) == 6 and state[0] == "__memmap__":
        _, filename, dtype, shape, offset, order = state
        return np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=tuple(shape), offset=offset, order=order)
    return state


class SpotCropDataset(Dataset):
    """Torch dataset of normalised spot (and niche) crops with optional targets.

    Parameters
    ----------
    spot
        ``(n, h, w, 3)`` uint8 spot crops (numpy array or :class:`numpy.memmap`), or a callable
        ``source(i)`` returning the spot crop or a ``(spot, niche)`` tuple of ``(h, w, 3)`` uint8 crops.
        A callable must be picklable to be used with ``DataLoader(num_workers > 0)`` under ``spawn``.
    niche
        ``(n, h, w, 3)`` uint8 niche crops, or ``None`` (no ``"niche"`` entry, unless ``spot`` is a
        callable returning pairs).
    targets
        Optional mapping of name to ``(n, ...)`` arrays (dense or scipy sparse rows), e.g. spot and niche
        expression; returned as float32 tensors under their names.
    length
        Number of items; required when ``spot`` is a callable.
    indices
        Optional subset (rows of the arrays) the dataset exposes, in this order.
    mean, std
        Per-channel normalisation on the 0–1 scale (ImageNet by default).
    augment
        Apply one random :func:`dihedral` transform per item, the same to spot and niche.
    seed
        Seed of the augmentation. The transform of item ``i`` is drawn from a generator seeded with
        ``(seed, epoch, i)``, so runs are reproducible whatever the worker layout; call
        :meth:`set_epoch` before each epoch to draw new transforms.

    Raises
    ------
    ValueError
        If shapes or lengths disagree.
    """

    def __init__(
        self,
        spot: np.ndarray | Callable[[int], Any],
        niche: np.ndarray | None = None,
        *,
        targets: Mapping[str, Any] | None = None,
        length: int | None = None,
        indices: np.ndarray | Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if callable(spot) and not isinstance(spot, np.ndarray):
            if length is None:
                raise ValueError("`length` is required when `spot` is a callable source.")
            n = int(length)
        else:
            if spot.ndim != 4 or spot.shape[-1] != 3 or np.dtype(spot.dtype) != np.uint8:
                raise ValueError(f"`spot` must be (n, h, w, 3) uint8 crops, got {spot.dtype} {spot.shape}.")
            n = int(spot.shape[0])
            if length is not None and int(length) != n:
                raise ValueError(f"`length`={length} disagrees with the {n} spot crops.")
        if niche is not None:
            if niche.ndim != 4 or niche.shape[-1] != 3 or np.dtype(niche.dtype) != np.uint8:
                raise ValueError(f"`niche` must be (n, h, w, 3) uint8 crops, got {niche.dtype} {niche.shape}.")
            if int(niche.shape[0]) != n:
                raise ValueError(f"`niche` has {niche.shape[0]} crops but `spot` has {n}.")
        self._targets: dict[str, Any] = {}
        for name, arr in (targets or {}).items():
            if name in ("spot", "niche", "index", "dihedral"):
                raise ValueError(f"`targets` key {name!r} is reserved; rename it.")
            if arr.shape[0] != n:
                raise ValueError(f"`targets[{name!r}]` has {arr.shape[0]} rows but there are {n} crops.")
            self._targets[name] = arr
        if indices is None:
            self._indices = None
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(idx) and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"`indices` must lie in [0, {n}).")
            self._indices = idx
        mean_t = np.asarray(mean, dtype=np.float32).reshape(-1)
        std_t = np.asarray(std, dtype=np.float32).reshape(-1)
        if mean_t.shape != (3,) or std_t.shape != (3,) or (std_t <= 0).any():
            raise ValueError("`mean` and `std` must be three numbers each (RGB, 0–1 scale), std > 0.")
        self.spot = spot
        self.niche = niche
        self._n = n
        self.mean = mean_t
        self.std = std_t
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed the augmentation (call before each epoch).

        Parameters
        ----------
        epoch
            Epoch number.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._n if self._indices is None else len(self._indices)

    def transform_index(self, i: int) -> int:
        """Dihedral transform drawn for item ``i`` at the current epoch (0 when ``augment`` is off).

        Parameters
        ----------
        i
            Item index.

        Returns
        -------
        ``k`` of :func:`dihedral`.
        """
        if not self.augment:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return int(rng.integers(8))

    def _to_tensor(self, crop: np.ndarray, k: int) -> torch.Tensor:
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[-1] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"crops must be (h, w, 3) uint8, got {crop.dtype} {crop.shape}.")
        crop = np.array(dihedral(crop, k, layout="hwc"), dtype=np.float32)  # a writable copy
        x = torch.from_numpy(crop).permute(2, 0, 1).div_(255.0)
        mean = torch.from_numpy(self.mean)[:, None, None]
        std = torch.from_numpy(self.std)[:, None, None]
        return x.sub_(mean).div_(std).contiguous()

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items.")
        i = int(i) % len(self)
        row = i if self._indices is None else int(self._indices[i])
        k = self.transform_index(i)
        if isinstance(self.spot, np.ndarray):
            spot = self.spot[row]
            niche = self.niche[row] if self.niche is not None else None
        else:
            got = self.spot(row)
            spot, niche = got if isinstance(got, tuple) else (got, None)
            if self.niche is not None:
                niche = self.niche[row]
        item: dict[str, Any] = {"spot": self._to_tensor(spot, k), "index": row, "dihedral": k}
        if niche is not None:
            item["niche"] = self._to_tensor(niche, k)
        for name, arr in self._targets.items():
            r = arr[row]
            r = r.toarray().reshape(-1) if hasattr(r, "toarray") else np.asarray(r)
            item[name] = torch.as_tensor(np.asarray(r, dtype=np.float32))
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["spot"] = _memmap_state(self.spot)
        state["niche"] = _memmap_state(self.niche)
        state["_targets"] = {k: _memmap_state(v) for k, v in self._targets.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["spot"] = _memmap_restore(state["spot"])
        state["niche"] = _memmap_restore(state["niche"])
        state["_targets"] = {k: _memmap_restore(v) for k, v in state["_targets"].items()}
        self.__dict__.update(state)


# --------------------------------------------------------------------------------------------- cache
def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, CropGeometry):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"CropCache key: cannot serialise {type(o).__name__}; use str/int/float/list/dict.")


class CropCache:
    """On-disk cache of uint8 crops, named by a stable hash of a key.

    The entry is the directory ``<directory>/crops-<hash>`` holding one ``.npy`` per array (e.g.
    ``spot.npy``, ``niche.npy``, ``pad.npy``) and ``key.json``. Entries are written to a staging
    directory and renamed into place, so a half-written entry is never loaded.

    Parameters
    ----------
    directory
        Cache root (created when saving).
    key
        JSON-serialisable mapping identifying the crops, e.g. from :meth:`make_key`.
    """

    def __init__(self, directory: str | os.PathLike[str], key: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.key = dict(key)
        self._key_json = json.dumps(self.key, sort_keys=True, default=_json_default)
        self.hash = hashlib.sha256(self._key_json.encode()).hexdigest()[:20]
        self._staging: Path | None = None

    @staticmethod
    def make_key(geometry: CropGeometry, image_id: str, centers_px: np.ndarray, **extra: Any) -> dict[str, Any]:
        """Standard key: crop geometry, image identity and a hash of the centres.

        Parameters
        ----------
        geometry
            The crop geometry.
        image_id
            Identity of the image, e.g. :func:`image_fingerprint` or a path plus element name.
        centers_px
            ``(n, 2)`` level-0 centres.
        **extra
            Further JSON-serialisable entries (pixel size, fill, …).

        Returns
        -------
        The key.
        """
        return {
            "geometry": geometry.to_dict(),
            "image": str(image_id),
            "centers": centers_hash(centers_px),
            "n": len(centers_px),
            **extra,
        }

    @property
    def path(self) -> Path:
        """Directory of this entry."""
        return self.directory / f"crops-{self.hash}"

    def exists(self) -> bool:
        """Whether the entry has been saved.

        Returns
        -------
        ``True`` when the entry's ``key.json`` exists.
        """
        return (self.path / "key.json").is_file()

    def load(self) -> dict[str, np.ndarray] | None:
        """Arrays of the entry, memory-mapped read-only, or ``None`` when absent.

        Returns
        -------
        ``{name: array}`` or ``None``.

        Raises
        ------
        ValueError
            If the stored key differs from this cache's key (hash collision or tampering).
        """
        if not self.exists():
            return None
        stored = (self.path / "key.json").read_text()
        if json.loads(stored) != json.loads(self._key_json):
            raise ValueError(f"CropCache: {self.path} holds a different key; delete it.")
        return {p.stem: np.load(p, mmap_mode="r") for p in sorted(self.path.glob("*.npy"))}

    def _stage(self) -> Path:
        if self._staging is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._staging = self.directory / f".staging-{self.hash}-{uuid.uuid4().hex[:8]}"
            self._staging.mkdir()
        return self._staging

    def allocate(self, name: str, shape: tuple[int, ...], dtype: Any = np.uint8) -> np.memmap:
        """Writable ``.npy`` memmap in the staging directory (fill it, then :meth:`commit`).

        Parameters
        ----------
        name
            Array name (file stem).
        shape
            Array shape.
        dtype
            Array dtype.

        Returns
        -------
        The memmap.
        """
        return np.lib.format.open_memmap(self._stage() / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    def commit(self) -> Path:
        """Move the staged arrays into place (replacing an existing entry).

        Returns
        -------
        The entry directory.

        Raises
        ------
        RuntimeError
            If nothing was staged.
        """
        if self._staging is None:
            raise RuntimeError("CropCache.commit: nothing staged; call allocate() or save() first.")
        (self._staging / "key.json").write_text(self._key_json)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self._staging, self.path)
        self._staging = None
        return self.path

    def save(self, **arrays: np.ndarray) -> Path:
        """Write arrays (e.g. ``spot=..., niche=..., pad=...``) as an entry.

        Parameters
        ----------
        **arrays
            Arrays to store, by name.

        Returns
        -------
        The entry directory.

        Raises
        ------
        ValueError
            If no arrays are given.
        """
        if not arrays:
            raise ValueError("CropCache.save: pass arrays, e.g. save(spot=..., niche=..., pad=...).")
        stage = self._stage()
        for name, arr in arrays.items():
            np.save(stage / f"{name}.npy", np.asarray(arr))
        return self.commit()

    def clear(self) -> None:
        """Delete the entry (and any staging directory of this object)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.path)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
