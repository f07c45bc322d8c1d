"""Reader for HEST-1k samples (Jaume et al., NeurIPS 2024; https://huggingface.co/datasets/MahmoodLab/hest).

The folder layout is the one of the HEST-1k download: for every sample id ``<id>``

- ``wsis/<id>.tif``: the H&E whole-slide image, a pyramidal tiled TIFF;
- ``st/<id>.h5ad``: the spots (raw counts, ``obsm["spatial"]`` = spot centres in level-0 WSI pixels, x then y,
  and for Visium/ST ``obs["array_row"]``/``obs["array_col"]``);
- ``metadata/<id>.json``: per-sample metadata; the fields used here are ``pixel_size_um_estimated`` (µm/px of
  level 0 estimated by HEST from the spot grid: the value HEST itself uses), ``pixel_size_um_embedded`` (µm/px
  read from the original image file), ``st_technology``, ``spot_diameter`` and ``inter_spot_dist`` (µm).

Other folders (``patches``, ``tissue_seg``, ``spatial_plots``, ``cellvit_seg``, ...) are ignored. The WSI is
opened lazily with :mod:`tifffile` (one dask array per pyramid level, read through a zarr store), so reading a
slide loads no pixel until it is used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst._utils import spot_pitch
from hyperst.datasets._slide import read_wsi
from hyperst.datasets._utils import (
    combine_genes,
    image_key,
    normalise_chunks,
    parse_circles,
    parse_table,
    positive_float,
    raw_counts,
    reindex_columns,
    spot_metadata,
    spots_key,
)
from hyperst.pp._layout import layout_defaults
from hyperst.pp._pyramid import image_shape

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["hest"]

#: HEST-1k sub-folders and file suffixes read for each sample.
_PARTS: dict[str, tuple[str, str]] = {"wsi": ("wsis", ".tif"), "st": ("st", ".h5ad"), "metadata": ("metadata", ".json")}
#: Relative difference between estimated and embedded pixel sizes above which a warning is logged.
_PIXEL_SIZE_TOLERANCE = 0.1


# --------------------------------------------------------------------------------------------- counts and metadata
def _median_spacing(xy: np.ndarray) -> float | None:
    """Lattice pitch of spot centres (:func:`hyperst._utils.spot_pitch`; ``None`` with fewer than two spots)."""
    d = spot_pitch(xy)
    return d if np.isfinite(d) and d > 0 else None


def _pixel_size(meta: Mapping[str, Any], tiff_pixel_size: float | None, sample: str, file: Path) -> float:
    estimated = positive_float(meta.get("pixel_size_um_estimated"))
    embedded = positive_float(meta.get("pixel_size_um_embedded"))
    if estimated is not None:
        if embedded is not None and abs(embedded - estimated) > _PIXEL_SIZE_TOLERANCE * estimated:
            logger.warning(
                f"{sample}: pixel_size_um_estimated={estimated:.4g} and pixel_size_um_embedded={embedded:.4g} differ; "
                "using the estimate (from the spot grid), as HEST does."
            )
        return estimated
    if embedded is not None:
        logger.info(f"{sample}: no pixel_size_um_estimated in the metadata; using pixel_size_um_embedded")
        return embedded
    if tiff_pixel_size is not None:
        logger.info(f"{sample}: pixel size from the TIFF resolution tags")
        return tiff_pixel_size
    raise ValueError(
        f"No pixel size for HEST sample {sample!r}: {file} has neither 'pixel_size_um_estimated' nor "
        "'pixel_size_um_embedded', and the WSI records no resolution. Add 'pixel_size_um_estimated' (µm per "
        "level-0 pixel) to the metadata file."
    )


def _spot_geometry(
    meta: Mapping[str, Any], centres_px: np.ndarray, pixel_size: float, sample: str
) -> tuple[str, float, float]:
    """Layout, spot diameter and pitch (µm) of a HEST sample from ``st_technology`` and the metadata."""
    technology = str(meta.get("st_technology") or "").strip()
    tech = technology.lower()
    diameter = positive_float(meta.get("spot_diameter"))
    pitch = positive_float(meta.get("inter_spot_dist"))
    spacing_px = _median_spacing(centres_px)
    spacing_um = None if spacing_px is None else spacing_px * pixel_size
    if tech == "visium" or tech.startswith("visium v") or tech.startswith("visium cytassist"):
        default_d, default_p = layout_defaults("visium")
        return "visium", diameter or default_d, pitch or default_p
    if tech in ("spatial transcriptomics", "st", "legacy st"):
        default_d, default_p = layout_defaults("st")
        return "st", diameter or default_d, pitch or default_p
    if tech in ("visium hd", "xenium"):
        # HEST pools these into square pseudo-spots on a square grid (``st/`` holds the pooled bins); the
        # metadata's spot fields describe the original technology (2 µm bins, cells), not the pooled bins.
        if spacing_um is None:
            raise ValueError(f"HEST sample {sample!r} ({technology}) has fewer than two spots: no grid to measure.")
        logger.info(f"{sample}: {technology} pseudo-spots on a square grid of {spacing_um:.4g} µm")
        return "st", spacing_um, spacing_um
    # unknown technology: trust the metadata, else the grid
    if diameter is None and spacing_um is None:
        raise ValueError(
            f"HEST sample {sample!r} (st_technology={technology!r}) has no 'spot_diameter' in its metadata and "
            "too few spots to measure one; add 'spot_diameter' (µm) to the metadata file."
        )
    logger.info(f"{sample}: st_technology={technology!r} is not Visium/ST; using layout 'generic'")
    return "generic", diameter or float(spacing_um), pitch or float(spacing_um or diameter)


def _read_metadata(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object (the sample's metadata), got {type(meta).__name__}.")
    return meta


def _spot_centres(adata: AnnData, file: Path) -> np.ndarray:
    if Key.OBSM_SPATIAL in adata.obsm:
        xy = np.asarray(adata.obsm[Key.OBSM_SPATIAL], dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise ValueError(f"{file}: obsm[{Key.OBSM_SPATIAL!r}] must have shape (n_spots, 2), got {xy.shape}.")
        return xy[:, :2]
    if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        return adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    raise ValueError(
        f"{file} has no spot positions: expected obsm[{Key.OBSM_SPATIAL!r}] (x, y in level-0 WSI pixels) or obs "
        "'pxl_col_in_fullres'/'pxl_row_in_fullres'."
    )


def _array_coordinates(adata: AnnData) -> pd.DataFrame | None:
    cols = [Key.OBS_ARRAY_ROW, Key.OBS_ARRAY_COL]
    if not set(cols) <= set(adata.obs.columns):
        return None
    values = adata.obs[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        return None
    return pd.DataFrame(values.astype(np.int64), columns=cols, index=adata.obs_names)


# --------------------------------------------------------------------------------------------- folder layout
def _resolve_ids(root: Path, ids: str | Sequence[str]) -> list[str]:
    if not root.exists():
        raise FileNotFoundError(
            f"`root={str(root)!r}` does not exist; point it to the HEST-1k folder holding wsis/, st/ and metadata/."
        )
    if not root.is_dir():
        raise NotADirectoryError(f"`root={str(root)!r}` is not a folder; pass the HEST-1k folder itself.")
    missing_dirs = [d for d, _ in _PARTS.values() if not (root / d).is_dir()]
    if missing_dirs:
        raise FileNotFoundError(
            f"`root={str(root)!r}` lacks the folder(s) {missing_dirs}; a HEST-1k folder holds wsis/<id>.tif, "
            "st/<id>.h5ad and metadata/<id>.json."
        )
    selected = [ids] if isinstance(ids, str) else list(ids)
    if not selected:
        raise ValueError("`ids` is empty; pass one HEST sample id (e.g. 'TENX95') or a list of ids.")
    if not all(isinstance(s, str) for s in selected):
        raise TypeError(f"`ids` must be a sample id or a sequence of ids, got {ids!r}.")
    duplicated = sorted({s for s in selected if selected.count(s) > 1})
    if duplicated:
        raise ValueError(f"`ids` lists {duplicated} more than once.")

    found = {
        part: {p.name[: -len(suffix)] for p in (root / d).glob(f"*{suffix}")} for part, (d, suffix) in _PARTS.items()
    }
    complete = sorted(found["wsi"] & found["st"] & found["metadata"])
    unknown = [s for s in selected if not any(s in names for names in found.values())]
    if unknown:
        shown = ", ".join(complete[:20]) + (f", ... ({len(complete)} in all)" if len(complete) > 20 else "")
        raise ValueError(
            f"Unknown HEST sample id(s) {unknown} in `ids`; available in {str(root)!r}: [{shown}]"
            if complete
            else f"Unknown HEST sample id(s) {unknown} in `ids`: {str(root)!r} holds no complete sample."
        )
    for s in selected:
        lacking = [f"{d}/{s}{suffix}" for part, (d, suffix) in _PARTS.items() if s not in found[part]]
        if lacking:
            raise FileNotFoundError(f"HEST sample {s!r} lacks {lacking} in {str(root)!r}; download them too.")
    return selected


def _read_sample(root: Path, sample: str) -> tuple[pd.DataFrame, sparse.csr_matrix, pd.Index, np.ndarray, Any]:
    """Spot frame (barcode, array coordinates), counts, genes, centres (px) and var of one sample."""
    import anndata

    file = root / "st" / f"{sample}.h5ad"
    adata = anndata.read_h5ad(file)
    x = raw_counts(adata, source=str(file))
    centres = _spot_centres(adata, file)
    genes = pd.Index(adata.var_names.astype(str))
    if not genes.is_unique:
        adata.var_names_make_unique()
        genes = pd.Index(adata.var_names.astype(str))
        logger.info(f"{sample}: duplicated gene names made unique")
    frame = pd.DataFrame({Key.OBS_BARCODE: adata.obs_names.astype(str)}, index=adata.obs_names.astype(str))
    arrays = _array_coordinates(adata)
    if arrays is not None:
        frame[arrays.columns] = arrays.to_numpy()

    finite = np.isfinite(centres).all(axis=1)
    if not finite.all():
        logger.warning(f"{sample}: {int((~finite).sum())} spots have no position (NaN); dropping them.")
        frame, x, centres = frame[finite], x[np.flatnonzero(finite)], centres[finite]
    if len(frame) == 0:
        raise ValueError(f"{file} has no spot with a position.")
    return frame, x, genes, centres, adata.var


# --------------------------------------------------------------------------------------------- public API
def hest(
    root: str | Path,
    ids: str | Sequence[str],
    *,
    genes: Literal["intersection", "union"] = "intersection",
    multiscale: bool = True,
    chunks: int | tuple[int, int, int] | None = 1024,
) -> SpatialData:
    """Read HEST-1k samples into one :class:`~spatialdata.SpatialData`.

    Every sample ``s`` gets its own coordinate system ``s`` (level-0 pixels of its WSI) with the elements
    ``f"{s}_image"`` (the H&E WSI, read lazily with its own pyramid levels) and ``f"{s}_spots"`` (circles of the
    spot radius in level-0 pixels at the spot centres). One table ``"table"`` annotates all spot elements: raw
    counts (CSR, int32) in ``.X``, ``obs["sample"]``, ``obs["barcode"]`` (the spot names of the ``.h5ad``; the
    table's ``obs_names`` are ``f"{s}_{barcode}"``), ``obs["array_row"]``/``obs["array_col"]`` when every sample
    has integer array coordinates, ``obsm["spatial"]`` (level-0 pixel x, y) and ``uns["hyperst"]["spots"][s]``
    with the spot diameter, pitch, layout and pixel size.

    The pixel size is HEST's ``pixel_size_um_estimated`` (fitted by HEST on the spot grid), else
    ``pixel_size_um_embedded``, else the TIFF resolution tags. The spot geometry follows ``st_technology``:
    ``"Visium"`` → hexagonal layout, ``spot_diameter``/``inter_spot_dist`` from the metadata (55/100 µm by
    default); ``"Spatial Transcriptomics"`` → square layout (100/200 µm by default); ``"Visium HD"`` and
    ``"Xenium"`` (pooled by HEST into square pseudo-spots) → square layout whose pitch and spot size are the
    measured grid spacing; anything else → ``"generic"`` with the metadata's values.

    Parameters
    ----------
    root
        The HEST-1k folder, holding ``wsis/<id>.tif``, ``st/<id>.h5ad`` and ``metadata/<id>.json``.
    ids
        A sample id (e.g. ``"TENX95"``) or a sequence of ids.
    genes
        ``"intersection"`` keeps the genes measured in every selected sample; ``"union"`` keeps all genes, with
        zero counts where a sample did not measure a gene.
    multiscale
        Store each WSI as a multiscale :class:`xarray.DataTree` with the TIFF's own pyramid levels (``scale0``
        = full resolution); ``False`` keeps level 0 only, as a :class:`xarray.DataArray`.
    chunks
        Dask chunk size of the images in pixels per side (or a ``(c, y, x)`` tuple); ``None`` keeps the TIFF
        tiles as chunks.

    Returns
    -------
    The samples as one SpatialData object; images stay on disk until used.

    Raises
    ------
    FileNotFoundError
        If ``root`` or one of its folders does not exist, or a selected sample lacks one of its three files.
    ValueError
        If ``ids`` names an unknown sample (the message lists the available ones), is empty or repeats an id; if
        ``genes`` is invalid; if a sample has no raw integer counts, no spot positions or no pixel size.
    """
    from anndata import AnnData
    from spatialdata import SpatialData

    if genes not in ("intersection", "union"):
        raise ValueError(f"`genes={genes!r}` must be 'intersection' or 'union'.")
    normalise_chunks(chunks)
    root = Path(root).expanduser()
    selected = _resolve_ids(root, ids)

    images: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    frames: list[pd.DataFrame] = []
    mats: list[sparse.csr_matrix] = []
    gene_lists: list[pd.Index] = []
    spatial: list[np.ndarray] = []
    metadata: dict[str, dict[str, Any]] = {}
    var_frames: list[pd.DataFrame] = []
    for s in selected:
        meta_file = root / "metadata" / f"{s}.json"
        meta = _read_metadata(meta_file)
        frame, x, g, centres, var = _read_sample(root, s)
        image, tiff_pixel_size = read_wsi(
            root / "wsis" / f"{s}.tif", coordinate_system=s, multiscale=multiscale, chunks=chunks
        )
        pixel_size = _pixel_size(meta, tiff_pixel_size, s, meta_file)
        layout, diameter, pitch = _spot_geometry(meta, centres, pixel_size, s)

        height, width = image_shape(image)
        outside = (centres[:, 0] < 0) | (centres[:, 0] >= width) | (centres[:, 1] < 0) | (centres[:, 1] >= height)
        if outside.any():
            logger.warning(f"{s}: {int(outside.sum())} spot centres lie outside the {width}×{height} WSI.")

        images[image_key(s)] = image
        shapes[spots_key(s)] = parse_circles(centres, radius=diameter / 2 / pixel_size, coordinate_system=s)
        frames.append(frame)
        mats.append(x)
        gene_lists.append(g)
        spatial.append(centres)
        var_frames.append(var)
        metadata[s] = spot_metadata(spot_diameter=diameter, pitch=pitch, layout=layout, pixel_size=pixel_size)
        logger.info(
            f"{s}: {x.shape[0]} spots × {x.shape[1]} genes, {layout} layout, {pixel_size:.4g} µm/px, "
            f"{width}×{height} px WSI"
        )

    var_names = combine_genes(gene_lists, genes)
    if len(var_names) == 0:
        raise ValueError(f"The samples {selected} share no gene; use `genes='union'`.")
    x_all = sparse.vstack([reindex_columns(m, g, var_names) for m, g in zip(mats, gene_lists, strict=True)])
    x_all = sparse.csr_matrix(x_all, dtype=np.int32)

    with_arrays = all(Key.OBS_ARRAY_ROW in f.columns for f in frames)
    obs_frames = []
    for s, f in zip(selected, frames, strict=True):
        columns: dict[str, Any] = {
            Key.OBS_SAMPLE: s,
            Key.TABLE_REGION_KEY: spots_key(s),
            Key.TABLE_INSTANCE_KEY: np.arange(len(f), dtype=np.int64),
            Key.OBS_BARCODE: f[Key.OBS_BARCODE].to_numpy(),
        }
        if with_arrays:
            columns[Key.OBS_ARRAY_ROW] = f[Key.OBS_ARRAY_ROW].to_numpy(np.int64)
            columns[Key.OBS_ARRAY_COL] = f[Key.OBS_ARRAY_COL].to_numpy(np.int64)
        obs_frames.append(pd.DataFrame(columns, index=pd.Index([f"{s}_{b}" for b in f[Key.OBS_BARCODE]])))
    obs = pd.concat(obs_frames)
    obs[Key.OBS_SAMPLE] = pd.Categorical(obs[Key.OBS_SAMPLE], categories=selected)
    obs[Key.TABLE_REGION_KEY] = pd.Categorical(obs[Key.TABLE_REGION_KEY], categories=[spots_key(s) for s in selected])
    if not obs.index.is_unique:
        raise ValueError("Some spots share a barcode within a sample; the .h5ad obs_names must be unique.")

    var = pd.DataFrame(index=var_names)
    if len(selected) == 1:
        var = var_frames[0].copy()
        var.index = var_names
    adata = AnnData(X=x_all, obs=obs, var=var)
    adata.obsm[Key.OBSM_SPATIAL] = np.concatenate(spatial)
    adata.uns[Key.UNS] = {Key.UNS_SPOTS: metadata}
    table = parse_table(adata, selected)
    return SpatialData(images=images, shapes=shapes, tables={Key.TABLE_NAME: table})
