"""Helpers shared by the readers (her2st, hest, visium/legacy) and the synthetic dataset.

Element names (:func:`image_key`, :func:`spots_key`), the spot record of ``.uns`` (:func:`spot_metadata`),
spatialdata element parsing (:func:`parse_rgb_image`, :func:`parse_circles`, :func:`parse_table`,
:func:`normalise_chunks`), raw counts and gene sets of several samples (:func:`raw_counts`,
:func:`combine_genes`, :func:`reindex_columns`) and the pixel size of a spot grid
(:func:`fit_pixels_per_step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from hyperst._constants import Key
from hyperst._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = [
    "combine_genes",
    "fit_pixels_per_step",
    "image_key",
    "normalise_chunks",
    "parse_circles",
    "parse_rgb_image",
    "parse_table",
    "positive_float",
    "raw_counts",
    "reindex_columns",
    "spot_metadata",
    "spots_key",
]


# --------------------------------------------------------------------------- element names and parsing
def positive_float(value: Any) -> float | None:
    """``value`` as a positive finite float, else ``None`` (metadata fields may be null, NaN or text)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def image_key(sample: str) -> str:
    """Name of the image element of ``sample``."""
    return f"{sample}_image"


def spots_key(sample: str) -> str:
    """Name of the spot shapes element of ``sample``."""
    return f"{sample}_spots"


def spot_metadata(*, spot_diameter: float, pitch: float, layout: str, pixel_size: float) -> dict[str, Any]:
    """Entry of ``table.uns["hyperst"]["spots"][sample]``."""
    return {
        "spot_diameter": float(spot_diameter),
        "pitch": float(pitch),
        "layout": str(layout),
        "pixel_size": float(pixel_size),
    }


def normalise_chunks(chunks: int | tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """``chunks`` of a reader as a ``(c, y, x)`` tuple: an int is pixels per side (3 channels), ``None`` stays.

    Raises
    ------
    ValueError
        For non-positive sizes.
    TypeError
        For anything but an int, a ``(c, y, x)`` tuple of ints or ``None``.
    """
    if chunks is None:
        return None
    if isinstance(chunks, int | np.integer) and not isinstance(chunks, bool):
        if chunks <= 0:
            raise ValueError(f"`chunks={chunks}` must be a positive number of pixels.")
        return (3, int(chunks), int(chunks))
    if isinstance(chunks, tuple) and len(chunks) == 3 and all(isinstance(c, int | np.integer) for c in chunks):
        if min(chunks) <= 0:
            raise ValueError(f"`chunks={chunks}` must hold positive sizes for (c, y, x).")
        return (int(chunks[0]), int(chunks[1]), int(chunks[2]))
    raise TypeError(f"`chunks={chunks!r}` must be an int (pixels per side), a (c, y, x) tuple or None.")


def parse_rgb_image(
    image_yxc: np.ndarray,
    *,
    coordinate_system: str,
    multiscale: bool,
    chunks: int | tuple[int, int, int] | None,
) -> Any:
    """Wrap an ``(y, x, 3)`` uint8 array as a spatialdata 2D image in ``(c, y, x)`` order.

    The array is not copied: it is wrapped by a chunked dask array and transposed lazily. With
    ``multiscale=True`` the result is a :class:`xarray.DataTree` with levels downscaled by 2, 4 and 8.
    """
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    if image_yxc.ndim != 3 or image_yxc.shape[2] != 3 or image_yxc.dtype != np.uint8:
        raise ValueError(f"Expected an RGB uint8 image of shape (y, x, 3), got {image_yxc.shape} {image_yxc.dtype}.")
    chunks_ = normalise_chunks(chunks)
    if chunks_ is None:
        data = da.from_array(image_yxc, chunks=image_yxc.shape).transpose(2, 0, 1)
    else:
        data = da.from_array(image_yxc, chunks=(chunks_[1], chunks_[2], chunks_[0])).transpose(2, 0, 1)
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={coordinate_system: Identity()},
        scale_factors=[2, 2, 2] if multiscale else None,
        chunks=chunks_,
    )


def parse_circles(
    centres_xy: np.ndarray, *, radius: float, coordinate_system: str, index: np.ndarray | None = None
) -> Any:
    """Circles (spatialdata shapes) at ``centres_xy`` (level-0 pixels), ``Identity`` to ``coordinate_system``."""
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    n = centres_xy.shape[0]
    return ShapesModel.parse(
        np.ascontiguousarray(centres_xy, dtype=np.float64),
        geometry=0,
        radius=np.full(n, float(radius)),
        index=np.arange(n) if index is None else index,
        transformations={coordinate_system: Identity()},
    )


def parse_table(adata: AnnData, samples: Sequence[str]) -> AnnData:
    """Validate ``adata`` as the table annotating the spot elements of ``samples``."""
    from spatialdata.models import TableModel

    return TableModel.parse(
        adata,
        region=[spots_key(s) for s in samples],
        region_key=Key.TABLE_REGION_KEY,
        instance_key=Key.TABLE_INSTANCE_KEY,
    )


# --------------------------------------------------------------------------- counts and genes
def raw_counts(adata: AnnData, *, source: str, layer: str | None = None) -> sparse.csr_matrix:
    """Raw counts of ``adata`` (``.X``, else ``.layers[layer]`` / ``.layers["counts"]``) as CSR int32.

    Raises a :class:`ValueError` naming ``source`` when no candidate holds non-negative integers.
    """
    candidates: list[tuple[str, Any]] = []
    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"`layer={layer!r}` is not a layer of {source}; layers: {list(adata.layers)}.")
        candidates.append((f"layers[{layer!r}]", adata.layers[layer]))
    else:
        candidates.append(("X", adata.X))
        if Key.LAYER_COUNTS in adata.layers:
            candidates.append((f"layers[{Key.LAYER_COUNTS!r}]", adata.layers[Key.LAYER_COUNTS]))
    for name, x in candidates:
        if x is None:
            continue
        mat = sparse.csr_matrix(x)
        values = mat.data
        if values.size and (
            not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > np.iinfo(np.int32).max
        ):
            continue
        if np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
            if name != "X":
                logger.info(f"{source}: raw counts taken from .{name} (.X is not integer counts)")
            out = sparse.csr_matrix(mat, dtype=np.int32)
            out.eliminate_zeros()
            out.sort_indices()
            return out
    tried = ", ".join(f".{name}" for name, _ in candidates)
    raise ValueError(
        f"{source} holds no raw integer counts (checked {tried}); hyperst needs raw counts (non-negative integers) "
        f"in .X or .layers[{Key.LAYER_COUNTS!r}]."
    )


def combine_genes(genes_per_section: Sequence[pd.Index], how: Literal["intersection", "union"]) -> pd.Index:
    """Genes of several samples combined: ``"intersection"`` (order of the first) or ``"union"`` (first seen)."""
    first = genes_per_section[0]
    if how == "intersection":
        shared = set(first)
        for g in genes_per_section[1:]:
            shared &= set(g)
        return pd.Index([g for g in first if g in shared])
    seen = dict.fromkeys(first)
    for g in genes_per_section[1:]:
        seen.update(dict.fromkeys(g))
    return pd.Index(list(seen))


def reindex_columns(x: sparse.csr_matrix, genes: pd.Index, target: pd.Index) -> sparse.csr_matrix:
    """Columns of ``x`` (named ``genes``) placed at their position in ``target``; absent ones are dropped."""
    position = target.get_indexer(genes)
    coo = x.tocoo()
    new_col = position[coo.col]
    keep = new_col >= 0
    out = sparse.csr_matrix(
        (coo.data[keep], (coo.row[keep], new_col[keep])), shape=(x.shape[0], len(target)), dtype=np.int32
    )
    out.sort_indices()
    return out


# --------------------------------------------------------------------------- spot grids
def fit_pixels_per_step(array_xy: np.ndarray, pixel_xy: np.ndarray, *, n_iter: int = 10) -> float:
    """Pixels per array step of a spot grid, from a robust affine fit of pixel vs array position.

    Fits ``pixel = A @ array + b`` by least squares, then repeatedly drops spots whose residual exceeds
    ``3 × 1.4826 × median residual`` (at least 2 % of a step) and refits, so the few spots that lie off the
    printed grid do not bias the scale. The scale is ``sqrt(|det A|)``, the geometric mean of the two axes.

    Parameters
    ----------
    array_xy
        ``(n, 2)`` array (grid) coordinates.
    pixel_xy
        ``(n, 2)`` pixel coordinates of the same spots.
    n_iter
        Maximum number of trimming rounds.

    Returns
    -------
    Pixels per array step.

    Raises
    ------
    ValueError
        If there are fewer than three spots or they are collinear.
    """
    array_xy = np.asarray(array_xy, dtype=np.float64)
    pixel_xy = np.asarray(pixel_xy, dtype=np.float64)
    n = array_xy.shape[0]
    if n < 3 or np.linalg.matrix_rank(array_xy - array_xy.mean(0)) < 2:
        raise ValueError("Need at least three non-collinear spots to fit the pixel size.")
    design = np.c_[array_xy, np.ones(n)]
    keep = np.ones(n, dtype=bool)
    coef = np.zeros((3, 2))
    for _ in range(n_iter):
        coef, *_ = np.linalg.lstsq(design[keep], pixel_xy[keep], rcond=None)
        step = float(np.sqrt(abs(np.linalg.det(coef[:2]))))
        residual = np.linalg.norm(pixel_xy - design @ coef, axis=1)
        threshold = max(3.0 * 1.4826 * float(np.median(residual[keep])), 0.02 * step)
        new_keep = residual <= threshold
        if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    n_out = int(n - keep.sum())
    if n_out:
        logger.debug(f"pixel-size fit: ignored {n_out} of {n} off-grid spots")
    step = float(np.sqrt(abs(np.linalg.det(coef[:2]))))
    if step <= 0:
        raise ValueError("Degenerate spot grid: the fitted pixel pitch is zero.")
    return step
