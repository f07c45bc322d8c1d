"""Reader for the Her2ST legacy-ST sections (Andersson et al., Nat. Commun. 2021).

The folder layout is the one of ``shared/data/her2st``: one sub-folder per section (``C2`` … ``C6``)
holding ``he.jpg`` (full-resolution H&E), ``counts.tsv.gz`` (spots × genes raw counts, rows named
``"{x}x{y}"``) and ``spots.tsv`` (columns ``x y new_x new_y pixel_x pixel_y selected``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from hyperst._constants import Key
from hyperst._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["her2st"]

#: physical geometry of legacy Spatial Transcriptomics arrays (µm)
ST_SPOT_DIAMETER = 100.0
ST_PITCH = 200.0

_FILES = ("he.jpg", "counts.tsv.gz", "spots.tsv")
_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


# --------------------------------------------------------------------------- helpers shared with _synthetic
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


def _normalise_chunks(chunks: int | tuple[int, int, int] | None) -> tuple[int, int, int] | None:
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
    chunks_ = _normalise_chunks(chunks)
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


# --------------------------------------------------------------------------- Her2ST specifics
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


def _available_sections(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and any((p / f).exists() for f in _FILES))


def _resolve_sections(path: Path, sections: str | Sequence[str] | None) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(
            f"`path={str(path)!r}` does not exist; point it to the Her2ST folder holding one sub-folder per "
            "section (C2, C3, ...)."
        )
    if not path.is_dir():
        raise NotADirectoryError(f"`path={str(path)!r}` is not a folder; pass the Her2ST folder itself.")
    available = _available_sections(path)
    if not available:
        raise FileNotFoundError(f"No Her2ST section folders (with {', '.join(_FILES)}) found in `path={str(path)!r}`.")
    if sections is None:
        return available
    selected = [sections] if isinstance(sections, str) else list(sections)
    if not selected:
        raise ValueError(f"`sections` is empty; pick from {available} or pass None for all.")
    if not all(isinstance(s, str) for s in selected):
        raise TypeError(f"`sections` must be a section name or a sequence of names, got {sections!r}.")
    unknown = [s for s in selected if s not in available]
    if unknown:
        raise ValueError(f"Unknown Her2ST section(s) {unknown} in `sections`; available: {available}.")
    duplicated = sorted({s for s in selected if selected.count(s) > 1})
    if duplicated:
        raise ValueError(f"`sections` lists {duplicated} more than once.")
    for s in selected:
        missing = [f for f in _FILES if not (path / s / f).is_file()]
        if missing:
            raise FileNotFoundError(f"Section {s!r} in {str(path)!r} lacks {missing}; expected {list(_FILES)}.")
    return selected


def _read_section_table(folder: Path, section: str) -> tuple[pd.DataFrame, sparse.csr_matrix, pd.Index, float]:
    """Read the counts and spot positions of one section.

    Returns the spot frame (one row per spot with counts, in count-file order), the counts as CSR int32,
    the gene names, and the pixel size (µm per level-0 px).
    """
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    missing_cols = [c for c in _SPOT_COLUMNS if c not in spots.columns]
    if missing_cols:
        raise ValueError(f"{folder / 'spots.tsv'} lacks the columns {missing_cols}.")
    spots.index = pd.Index(spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str))
    if not spots.index.is_unique:
        raise ValueError(f"{folder / 'spots.tsv'} lists some array positions more than once.")

    counts = pd.read_csv(folder / "counts.tsv.gz", sep="\t", index_col=0)
    counts.index = counts.index.astype(str)
    if not counts.index.is_unique:
        raise ValueError(f"{folder / 'counts.tsv.gz'} has duplicated spot names.")
    if not counts.columns.is_unique:
        dup = counts.columns[counts.columns.duplicated()].unique().tolist()[:5]
        raise ValueError(f"{folder / 'counts.tsv.gz'} has duplicated gene names, e.g. {dup}.")
    values = counts.to_numpy()
    if not np.issubdtype(values.dtype, np.integer) and (
        not np.all(np.isfinite(values)) or not np.all(values == np.round(values))
    ):
        raise ValueError(f"{folder / 'counts.tsv.gz'} does not hold integer raw counts.")
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{folder / 'counts.tsv.gz'} holds counts outside the int32 range [0, 2^31).")

    has_spot = counts.index.isin(spots.index)
    n_no_spot = int((~has_spot).sum())
    if n_no_spot:
        logger.warning(f"{section}: {n_no_spot} count rows have no entry in spots.tsv; dropping them.")
    n_no_counts = int((~spots.index.isin(counts.index)).sum())
    if n_no_counts:
        logger.info(f"{section}: {n_no_counts} of {len(spots)} spots have no count row; dropping them.")

    # pixel size from the full spot list (spots without counts are still on the grid)
    px_per_step = fit_pixels_per_step(
        spots[["x", "y"]].to_numpy(np.float64), spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    )
    pixel_size = ST_PITCH / px_per_step

    names = counts.index[has_spot]
    x = sparse.csr_matrix(values[has_spot].astype(np.int32, copy=False))
    x.eliminate_zeros()
    return spots.loc[names].copy(), x, pd.Index(counts.columns.astype(str)), pixel_size


def _combine_genes(genes_per_section: Sequence[pd.Index], how: Literal["intersection", "union"]) -> pd.Index:
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


def _reindex_columns(x: sparse.csr_matrix, genes: pd.Index, target: pd.Index) -> sparse.csr_matrix:
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


def _read_tables(
    path: Path, sections: Sequence[str], genes: Literal["intersection", "union"]
) -> tuple[AnnData, dict[str, pd.DataFrame], dict[str, float]]:
    """Table (not yet parsed by TableModel), spot frames and pixel sizes of ``sections``."""
    from anndata import AnnData

    spots: dict[str, pd.DataFrame] = {}
    pixel_sizes: dict[str, float] = {}
    mats: list[sparse.csr_matrix] = []
    gene_lists: list[pd.Index] = []
    for s in sections:
        frame, x, g, pixel_size = _read_section_table(path / s, s)
        spots[s], pixel_sizes[s] = frame, pixel_size
        mats.append(x)
        gene_lists.append(g)
        logger.info(f"{s}: {x.shape[0]} spots × {x.shape[1]} genes, {pixel_size:.4f} µm/px")

    var_names = _combine_genes(gene_lists, genes)
    if len(var_names) == 0:
        raise ValueError(f"The sections {list(sections)} share no gene; use `genes='union'`.")
    if genes == "intersection" and len(sections) > 1:
        logger.info(
            f"keeping the {len(var_names)} genes shared by {len(sections)} sections "
            f"(of {min(len(g) for g in gene_lists)}–{max(len(g) for g in gene_lists)} per section)"
        )
    x_all = sparse.vstack([_reindex_columns(m, g, var_names) for m, g in zip(mats, gene_lists, strict=True)])
    x_all = sparse.csr_matrix(x_all, dtype=np.int32)

    obs_frames = []
    for s in sections:
        f = spots[s]
        obs_frames.append(
            pd.DataFrame(
                {
                    Key.OBS_SAMPLE: s,
                    Key.TABLE_REGION_KEY: spots_key(s),
                    Key.TABLE_INSTANCE_KEY: np.arange(len(f), dtype=np.int64),
                    Key.OBS_ARRAY_ROW: f["y"].to_numpy(np.int64),
                    Key.OBS_ARRAY_COL: f["x"].to_numpy(np.int64),
                },
                index=pd.Index([f"{s}_{name}" for name in f.index]),
            )
        )
    obs = pd.concat(obs_frames)
    obs[Key.OBS_SAMPLE] = pd.Categorical(obs[Key.OBS_SAMPLE], categories=list(sections))
    obs[Key.TABLE_REGION_KEY] = pd.Categorical(obs[Key.TABLE_REGION_KEY], categories=[spots_key(s) for s in sections])
    spatial = np.concatenate([spots[s][["pixel_x", "pixel_y"]].to_numpy(np.float64) for s in sections])

    adata = AnnData(X=x_all, obs=obs, var=pd.DataFrame(index=var_names))
    adata.obsm[Key.OBSM_SPATIAL] = spatial
    adata.uns[Key.UNS] = {
        Key.UNS_SPOTS: {
            s: spot_metadata(spot_diameter=ST_SPOT_DIAMETER, pitch=ST_PITCH, layout="st", pixel_size=pixel_sizes[s])
            for s in sections
        }
    }
    return adata, spots, pixel_sizes


def _read_rgb(file: Path) -> np.ndarray:
    """Decode an image file to an ``(y, x, 3)`` uint8 array (Pillow's size limit lifted for this call)."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(file) as im:
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            return np.asarray(rgb)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def her2st(
    path: str | Path,
    *,
    sections: str | Sequence[str] | None = None,
    genes: Literal["intersection", "union"] = "intersection",
    multiscale: bool = False,
    chunks: int | tuple[int, int, int] | None = 1024,
) -> SpatialData:
    """Read Her2ST legacy-ST sections into one :class:`~spatialdata.SpatialData`.

    Every section ``s`` gets its own coordinate system ``s`` with the elements ``f"{s}_image"`` (RGB H&E,
    level-0 pixels) and ``f"{s}_spots"`` (circles of radius 50 µm in pixels at the spot centres). One table
    ``"table"`` annotates all spot elements: raw counts (CSR, int32) in ``.X``, ``obs["sample"]``,
    ``obs["array_row"]``/``obs["array_col"]`` (array ``y``/``x``), ``obsm["spatial"]`` (pixel ``x``, ``y``)
    and ``uns["hyperst"]["spots"][s]`` with the spot diameter (100 µm), pitch (200 µm), layout (``"st"``)
    and pixel size.

    The pixel size is not stored in the files; it is derived per section from the 200 µm array pitch by a
    robust least-squares fit of pixel position against array position (see :func:`fit_pixels_per_step`),
    about 0.69 µm/px for these images. Spots listed in ``spots.tsv`` without a row in ``counts.tsv.gz`` are
    dropped (logged at info level).

    Parameters
    ----------
    path
        Folder holding one sub-folder per section (``C2``, ``C3``, ...), each with ``he.jpg``,
        ``counts.tsv.gz`` and ``spots.tsv``.
    sections
        A section name, a sequence of names, or ``None`` for every section found in ``path``.
    genes
        ``"intersection"`` keeps the genes measured in every selected section; ``"union"`` keeps all genes,
        with zero counts where a section did not measure a gene.
    multiscale
        Store each image as a multiscale :class:`xarray.DataTree` (``scale0`` … ``scale3``, each level
        downscaled by 2) instead of a single :class:`xarray.DataArray`.
    chunks
        Dask chunk size of the images: an int (pixels per side) or a ``(c, y, x)`` tuple; ``None`` for one
        chunk per image.

    Returns
    -------
    The sections as one SpatialData object.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist, holds no section folders, or a selected section lacks a file.
    ValueError
        If ``sections`` names an unknown section (the message lists the available ones), repeats a name, or
        ``genes`` is not ``"intersection"``/``"union"``; or if the files are malformed.
    """
    from spatialdata import SpatialData

    if genes not in ("intersection", "union"):
        raise ValueError(f"`genes={genes!r}` must be 'intersection' or 'union'.")
    _normalise_chunks(chunks)
    path = Path(path).expanduser()
    selected = _resolve_sections(path, sections)

    adata, spots, pixel_sizes = _read_tables(path, selected, genes)

    images: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for s in selected:
        rgb = _read_rgb(path / s / "he.jpg")
        height, width = rgb.shape[:2]
        centres = spots[s][["pixel_x", "pixel_y"]].to_numpy(np.float64)
        outside = (centres[:, 0] < 0) | (centres[:, 0] >= width) | (centres[:, 1] < 0) | (centres[:, 1] >= height)
        if outside.any():
            logger.warning(f"{s}: {int(outside.sum())} spot centres lie outside the {width}×{height} image.")
        images[image_key(s)] = parse_rgb_image(rgb, coordinate_system=s, multiscale=multiscale, chunks=chunks)
        shapes[spots_key(s)] = parse_circles(centres, radius=ST_SPOT_DIAMETER / 2 / pixel_sizes[s], coordinate_system=s)

    table = parse_table(adata, selected)
    return SpatialData(images=images, shapes=shapes, tables={Key.TABLE_NAME: table})
