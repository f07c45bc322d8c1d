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
from hyperst.datasets._utils import (
    combine_genes,
    fit_pixels_per_step,
    image_key,
    normalise_chunks,
    parse_circles,
    parse_rgb_image,
    parse_table,
    reindex_columns,
    spot_metadata,
    spots_key,
)
from hyperst.pp._layout import layout_defaults

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["her2st"]

#: physical geometry of legacy Spatial Transcriptomics arrays (µm): 100 µm spots, 200 µm pitch
ST_SPOT_DIAMETER, ST_PITCH = layout_defaults("st")

_FILES = ("he.jpg", "counts.tsv.gz", "spots.tsv")
_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


# --------------------------------------------------------------------------- Her2ST specifics
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

    var_names = combine_genes(gene_lists, genes)
    if len(var_names) == 0:
        raise ValueError(f"The sections {list(sections)} share no gene; use `genes='union'`.")
    if genes == "intersection" and len(sections) > 1:
        logger.info(
            f"keeping the {len(var_names)} genes shared by {len(sections)} sections "
            f"(of {min(len(g) for g in gene_lists)}–{max(len(g) for g in gene_lists)} per section)"
        )
    x_all = sparse.vstack([reindex_columns(m, g, var_names) for m, g in zip(mats, gene_lists, strict=True)])
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
    normalise_chunks(chunks)
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
