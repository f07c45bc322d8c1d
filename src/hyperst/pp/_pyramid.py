r"""Image pyramids: one walker over the resolution levels of an image element.

:func:`image_levels` is the one place that walks an image element's levels (a plain
:class:`xarray.DataArray`, a multiscale :class:`xarray.DataTree` with ``scale0``, ``scale1``, … children as
spatialdata writes them, or a bare ``(c, y, x)`` array); :func:`level0` and :func:`image_shape` read its
full-resolution level, :func:`thumbnail` a small RGB copy for plots. :class:`ImagePyramid` is the read-only,
validated (uint8 RGB) view that the crop engine reads windows from.

Level ``l`` maps to level 0 by the per-axis factor ``shape0 / shape_l`` (as :mod:`spatialdata` does in
``compute_coordinates`` and in the scale transformations it writes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ImagePyramid",
    "PyramidLevel",
    "image_fingerprint",
    "image_levels",
    "image_shape",
    "level0",
    "thumbnail",
]


# --------------------------------------------------------------------------------------------- levels
def image_levels(image: Any) -> list[Any]:
    """The resolution levels of an image element, fine to coarse, as stored (no copy, nothing computed).

    Parameters
    ----------
    image
        A :class:`xarray.DataArray`, a multiscale :class:`xarray.DataTree` whose children ``scale0``,
        ``scale1``, … each hold one data variable (spatialdata's layout), an :class:`ImagePyramid`, or a bare
        array (anything with ``shape``, ``dtype`` and ``__getitem__``).

    Returns
    -------
    One entry per level: the level's :class:`xarray.DataArray` (dims as stored), or the bare array.

    Raises
    ------
    ValueError
        If a DataTree has no ``scale<int>`` children or a level does not hold exactly one data variable.
    """
    import xarray as xr

    if isinstance(image, ImagePyramid):
        return [lvl.data for lvl in image.levels]
    if isinstance(image, xr.DataTree):
        names = [str(k) for k in image.children if str(k).startswith("scale")]
        if not names:
            raise ValueError(
                "`image` is a DataTree without 'scale0', 'scale1', … children; pass a spatialdata image "
                "element (multiscale images have one child per level)."
            )
        if not all(k[len("scale") :].isdigit() for k in names):
            raise ValueError(f"`image`: cannot order the DataTree levels {names}; expected 'scale<int>'.")
        arrays = []
        for k in sorted(names, key=lambda k: int(k[len("scale") :])):
            variables = list(image[k].ds.data_vars.values())
            if len(variables) != 1:
                raise ValueError(f"`image` level {k!r} must hold exactly one data variable, got {len(variables)}.")
            arrays.append(variables[0])
        return arrays
    return [image]


def level0(image: Any) -> Any:
    """The full-resolution level of an image element (see :func:`image_levels`).

    Parameters
    ----------
    image
        Image element, :class:`ImagePyramid` or bare array.

    Returns
    -------
    The level-0 :class:`xarray.DataArray` (or bare array).
    """
    return image_levels(image)[0]


def image_shape(image: Any) -> tuple[int, int]:
    """``(height, width)`` of level 0 in pixels.

    Parameters
    ----------
    image
        Image element (dims ``c``, ``y``, ``x``), :class:`ImagePyramid` or bare ``(c, y, x)`` array.

    Returns
    -------
    ``(height, width)``.
    """
    arr = level0(image)
    sizes = getattr(arr, "sizes", None)
    if sizes is not None and "y" in sizes and "x" in sizes:
        return int(sizes["y"]), int(sizes["x"])
    return int(arr.shape[-2]), int(arr.shape[-1])


def thumbnail(image: Any, max_side: int = 2000) -> tuple[np.ndarray, float]:
    """A small RGB copy of an image for plotting, and its scale to level-0 pixels.

    Reads the finest pyramid level no larger than twice ``max_side`` (the coarsest otherwise), strided
    down to at most ``max_side`` pixels: level 0 of a whole-slide image is never loaded.

    Parameters
    ----------
    image
        Anything :class:`ImagePyramid` accepts.
    max_side
        Largest side of the result in pixels.

    Returns
    -------
    ``(rgb, scale)``: the ``(h, w, 3)`` uint8 array and the thumbnail pixels per level-0 pixel.
    """
    pyr = ImagePyramid(image)
    level = next((lv for lv in pyr.levels if max(lv.shape) <= 2 * max_side), pyr.levels[-1])
    step = max(1, int(np.ceil(max(level.shape) / max_side)))
    arr = level.data[:, ::step, ::step]
    arr = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    return np.ascontiguousarray(np.moveaxis(arr[:3], 0, -1)), 1.0 / (level.factor[1] * step)


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
        if isinstance(image, ImagePyramid):
            self.levels: list[PyramidLevel] = list(image.levels)
            self.n_channels: int = image.n_channels
            return
        levels = image_levels(image)
        names = [f"scale{i}" for i in range(len(levels))] if len(levels) > 1 else ["image"]
        arrays = [_as_cyx(arr, name) for arr, name in zip(levels, names, strict=True)]

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
    """Identity of an image for cache keys and feature records: level shapes, dtype and pixels.

    Every pixel of the coarsest level is hashed when it has at most 16 M pixels (the thumbnail of a pyramid,
    or a low-resolution image), else an 8 × 8 grid of 128 × 128 blocks spread over it (corners and centre
    included), so an edit anywhere in the slide changes the digest, not only one at its centre. For a large
    single-level image an edit smaller than the gaps between the blocks can go unseen.

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
    m = hashlib.sha256()
    m.update(repr([(lv.shape, pyr.n_channels) for lv in pyr.levels]).encode())
    if h * w <= _FINGERPRINT_FULL_PIXELS:
        for y0 in range(0, h, 1024):  # row strips: bounded memory
            m.update(pyr.read_region(lvl.index, y0, min(y0 + 1024, h), 0, w).tobytes())
        return m.hexdigest()[:24]
    by, bx = min(_FINGERPRINT_BLOCK, h), min(_FINGERPRINT_BLOCK, w)
    for y0 in np.linspace(0, h - by, _FINGERPRINT_GRID).astype(int):
        for x0 in np.linspace(0, w - bx, _FINGERPRINT_GRID).astype(int):
            m.update(pyr.read_region(lvl.index, int(y0), int(y0) + by, int(x0), int(x0) + bx).tobytes())
    return m.hexdigest()[:24]


_FINGERPRINT_FULL_PIXELS = 16 * 1024 * 1024
_FINGERPRINT_GRID = 8
_FINGERPRINT_BLOCK = 128
