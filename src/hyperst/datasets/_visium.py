"""10x Genomics Visium readers: Space Ranger output folders and legacy (scanpy/squidpy) AnnData objects.

Both go through spatialdata-io (:func:`spatialdata_io.visium`,
:func:`spatialdata_io.experimental.from_legacy_anndata`) and then reorganise the result along hyperst's
conventions: one coordinate system per sample (full-resolution pixels of the Space Ranger input image), one image
``f"{sample}_image"`` in it, spots ``f"{sample}_spots"``, one table ``"table"`` with the spot geometry in
``uns["hyperst"]["spots"]``.

A folder with a lowres image only (Space Ranger 1.x output trimmed for sharing, as in Seurat's test data) works
too: the spots' full-resolution pixel positions are mapped into the lowres image through ``tissue_lowres_scalef``
(the spots stay in full-resolution pixels; the image gets a ``Scale`` transformation), and a counts file without
a ``library_ids`` attribute names the sample after its folder.

About the pixel size: Space Ranger's ``scalefactors_json.json`` field ``spot_diameter_fullres`` is "the number of
pixels that span the diameter of a theoretical 65 µm spot in the original, full-resolution image" (Space Ranger
output documentation), not of the 55 µm capture spot. The pixel size is therefore fitted on the spot grid (100 µm
between neighbouring spots) when array coordinates are available, and taken as ``65 / spot_diameter_fullres``
otherwise.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.datasets._utils import (
    fit_pixels_per_step,
    image_key,
    parse_circles,
    parse_table,
    raw_counts,
    spot_metadata,
    spots_key,
)
from hyperst.pp._layout import layout_defaults
from hyperst.pp._pyramid import level0 as level0_of

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["legacy", "visium", "visium_pixel_size"]

#: Physical geometry of Visium arrays (µm).
VISIUM_SPOT_DIAMETER, VISIUM_PITCH = layout_defaults("visium")
#: Diameter (µm) of the "theoretical spot" that Space Ranger's ``spot_diameter_fullres`` spans.
SPACERANGER_SPOT_DIAMETER = 65.0
#: Relative disagreement between the grid fit and ``spot_diameter_fullres`` above which a warning is logged.
_TOLERANCE = 0.05

_Image = Literal["auto", "fullres", "hires", "lowres"]
_KINDS = ("fullres", "hires", "lowres")


# --------------------------------------------------------------------------------------------- geometry
def visium_pixel_size(
    centres_px: np.ndarray,
    *,
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    spot_diameter_fullres: float | None = None,
) -> tuple[float, str]:
    """Micrometres per full-resolution pixel of a Visium slide.

    With array coordinates, the pixel positions are fitted (robust affine least squares, see
    :func:`~hyperst.datasets._utils.fit_pixels_per_step`) against the physical grid: ``array_col`` counts
    half-pitches (50 µm) along a row, ``array_row`` steps of ``50·√3`` µm between rows. Otherwise the pixel size
    is ``65 µm / spot_diameter_fullres`` (Space Ranger's scale factor spans a theoretical 65 µm spot).

    Parameters
    ----------
    centres_px
        ``(n, 2)`` spot centres (x, y) in full-resolution pixels.
    array_row, array_col
        Visium array coordinates of the same spots (``None`` if unknown).
    spot_diameter_fullres
        Space Ranger's ``spot_diameter_fullres`` scale factor (pixels).

    Returns
    -------
    The pixel size (µm/px) and its source, ``"grid"`` or ``"spot_diameter_fullres"``.

    Raises
    ------
    ValueError
        If neither a usable grid nor ``spot_diameter_fullres`` is given.
    """
    from_scalefactor = None
    if spot_diameter_fullres is not None and np.isfinite(spot_diameter_fullres) and spot_diameter_fullres > 0:
        from_scalefactor = SPACERANGER_SPOT_DIAMETER / float(spot_diameter_fullres)
    from_grid = None
    if array_row is not None and array_col is not None and len(centres_px) >= 3:
        half_pitch = VISIUM_PITCH / 2
        grid = np.column_stack([np.asarray(array_col, np.float64), np.sqrt(3.0) * np.asarray(array_row, np.float64)])
        try:
            from_grid = half_pitch / fit_pixels_per_step(grid, np.asarray(centres_px, np.float64))
        except ValueError:
            from_grid = None
    if from_grid is not None:
        if from_scalefactor is not None and abs(from_grid - from_scalefactor) > _TOLERANCE * from_grid:
            logger.warning(
                f"Visium pixel size: the spot grid gives {from_grid:.4g} µm/px but spot_diameter_fullres gives "
                f"{from_scalefactor:.4g} µm/px; using the grid."
            )
        return from_grid, "grid"
    if from_scalefactor is not None:
        return from_scalefactor, "spot_diameter_fullres"
    raise ValueError(
        "Cannot determine the Visium pixel size: no array coordinates (obs 'array_row'/'array_col') to fit the "
        "spot grid and no 'spot_diameter_fullres' scale factor."
    )


def _array_coordinates(obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    cols = [Key.OBS_ARRAY_ROW, Key.OBS_ARRAY_COL]
    if not set(cols) <= set(obs.columns):
        return None
    values = obs[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        return None
    return values[:, 0].astype(np.int64), values[:, 1].astype(np.int64)


# --------------------------------------------------------------------------------------------- images
def _rgb_uint8_array(image: np.ndarray, name: str) -> np.ndarray:
    """``(y, x, 3|4)`` float ([0, 1] or [0, 255]) or uint8 array as ``(y, x, 3)`` uint8."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"Image {name!r} has shape {arr.shape}; expected an RGB(A) image (y, x, 3 or 4).")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        top = 1.0 if float(np.nanmax(arr)) <= 1.0 else 255.0
        return np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    raise ValueError(f"Image {name!r} holds {arr.dtype} pixels; expected uint8 or float RGB.")


def _rgb_element(element: Any, name: str) -> Any:
    """The image element restricted to its first three channels; refuses non-uint8 pixels."""
    from spatialdata.models import Image2DModel

    level0 = level0_of(element)
    n_channels = int(level0.sizes["c"])
    if n_channels not in (3, 4):
        raise ValueError(f"Image {name!r} has {n_channels} channels; hyperst needs an RGB H&E image.")
    if level0.dtype != np.uint8:
        raise ValueError(f"Image {name!r} holds {level0.dtype} pixels; hyperst needs 8-bit RGB (uint8).")
    if n_channels == 4:
        element = element.isel(c=[0, 1, 2])
        Image2DModel().validate(element)
    return element


def _scale(factor: float, axes: tuple[str, str]) -> Any:
    from spatialdata.transformations import Identity, Scale

    return Identity() if factor == 1.0 else Scale([factor, factor], axes=axes)


# --------------------------------------------------------------------------------------------- assembly
def _assemble(
    *,
    sample: str,
    adata: AnnData,
    centres_px: np.ndarray,
    images: Mapping[str, tuple[Any, float]],
    image: str,
    spot_diameter_fullres: float | None,
    source: str,
    layer: str | None = None,
    keep_obs: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> SpatialData:
    """Reorganise one Visium sample along hyperst's conventions.

    ``images`` maps ``"fullres"``/``"hires"``/``"lowres"`` to (element, scale factor from full-resolution pixels
    to the image's pixels). ``centres_px`` are in full-resolution pixels, in ``adata`` order.
    """
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.transformations import Identity, set_transformation

    available = [k for k in _KINDS if k in images]
    if not available:
        raise ValueError(f"{source} has no image (full-resolution, hires or lowres): hyperst needs the H&E image.")
    main = available[0] if image == "auto" else image
    if main not in images:
        raise ValueError(f"`image={image!r}` is not available for {source}; available: {available}.")

    centres_px = np.asarray(centres_px, dtype=np.float64)
    finite = np.isfinite(centres_px).all(axis=1)
    if not finite.all():
        logger.warning(f"{source}: {int((~finite).sum())} spots have no position; dropping them.")
    rows = np.flatnonzero(finite)
    if len(rows) == 0:
        raise ValueError(f"{source} has no spot with a position.")
    obs_in = adata.obs.iloc[rows]
    centres_px = centres_px[rows]
    x = raw_counts(adata, source=source, layer=layer)[rows]

    arrays = _array_coordinates(obs_in)
    pixel_size_fullres, how = visium_pixel_size(
        centres_px,
        array_row=None if arrays is None else arrays[0],
        array_col=None if arrays is None else arrays[1],
        spot_diameter_fullres=spot_diameter_fullres,
    )
    main_factor = images[main][1]
    pixel_size = pixel_size_fullres / main_factor

    # -- images: the chosen one is the sample's image, in the sample's coordinate system (full-resolution pixels)
    systems = {
        "fullres": f"{sample}_fullres",
        "hires": f"{sample}_downscaled_hires",
        "lowres": f"{sample}_downscaled_lowres",
    }
    out_images: dict[str, Any] = {}
    for kind in available:
        element, factor = images[kind]
        if kind == main:
            element = _rgb_element(element, f"{sample} {kind}")
        transformations = {systems[kind]: Identity()}
        if kind == main:
            transformations[sample] = _scale(1.0 / factor, ("y", "x"))
        set_transformation(element, transformations, set_all=True)
        out_images[image_key(sample) if kind == main else f"{sample}_{kind}_image"] = element

    # -- spots: true 55 µm spots, in full-resolution pixels; also registered to every image's own system
    shapes = parse_circles(centres_px, radius=VISIUM_SPOT_DIAMETER / 2 / pixel_size_fullres, coordinate_system=sample)
    spot_transformations = {sample: Identity()}
    spot_transformations.update({systems[k]: _scale(images[k][1], ("x", "y")) for k in available})
    set_transformation(shapes, spot_transformations, set_all=True)

    # -- table
    barcodes = obs_in.index.astype(str)
    obs = obs_in.copy() if keep_obs else pd.DataFrame(index=obs_in.index)
    if "in_tissue" in obs_in.columns and not keep_obs:
        obs["in_tissue"] = obs_in["in_tissue"].to_numpy()
    ours = (Key.OBS_SAMPLE, Key.TABLE_REGION_KEY, Key.TABLE_INSTANCE_KEY, Key.OBS_BARCODE)
    overwritten = [c for c in ours if c in obs]
    if overwritten:
        logger.info(f"{source}: obs columns {overwritten} are replaced by hyperst's")
    obs[Key.OBS_BARCODE] = barcodes.to_numpy()
    obs[Key.OBS_SAMPLE] = pd.Categorical([sample] * len(obs), categories=[sample])
    obs[Key.TABLE_REGION_KEY] = pd.Categorical([spots_key(sample)] * len(obs), categories=[spots_key(sample)])
    obs[Key.TABLE_INSTANCE_KEY] = np.arange(len(obs), dtype=np.int64)
    if arrays is not None:
        obs[Key.OBS_ARRAY_ROW], obs[Key.OBS_ARRAY_COL] = arrays
    obs.index = pd.Index([f"{sample}_{b}" for b in barcodes])
    if not obs.index.is_unique:
        raise ValueError(f"{source} has duplicated barcodes; make the obs names unique first.")
    var = adata.var.copy()
    if not var.index.is_unique:
        var.index = pd.Index(_unique_names(var.index.astype(str)))
        logger.info(f"{source}: duplicated gene names made unique")
    table = AnnData(X=x, obs=obs, var=var)
    table.obsm[Key.OBSM_SPATIAL] = centres_px
    table.uns[Key.UNS] = {
        Key.UNS_SPOTS: {
            sample: spot_metadata(
                spot_diameter=VISIUM_SPOT_DIAMETER, pitch=VISIUM_PITCH, layout="visium", pixel_size=pixel_size
            )
        }
    }
    table = parse_table(table, [sample])
    logger.info(
        f"{sample}: {table.n_obs} spots × {table.n_vars} genes; image {main!r} ({pixel_size:.4g} µm/px; "
        f"full resolution {pixel_size_fullres:.4g} µm/px from the {how.replace('_', ' ')})"
    )
    sdata = SpatialData(images=out_images, shapes={spots_key(sample): shapes}, tables={Key.TABLE_NAME: table})
    if attrs:
        sdata.attrs.update(dict(attrs))
    return sdata


def _unique_names(names: pd.Index) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
        else:
            seen[n] = 0
            out.append(n)
    return out


# --------------------------------------------------------------------------------------------- Space Ranger
def _infer_sample(path: Path, counts_file: str) -> str:
    matches = sorted(p.name for p in path.iterdir() if p.name.endswith(counts_file))
    if not matches:
        raise FileNotFoundError(
            f"No counts file named (<sample>_){counts_file} in `path={str(path)!r}`; pass `counts_file=` if it is "
            "named differently."
        )
    name = matches[0]
    if name != counts_file and name.endswith(f"_{counts_file}"):
        return name[: -len(counts_file) - 1]
    if name.endswith(".h5"):
        import h5py

        with h5py.File(path / name, mode="r") as f:
            ids = f.attrs.get("library_ids")
        if ids is not None and len(ids):
            value = ids[0]
            return value.decode() if isinstance(value, bytes) else str(value)
    # Space Ranger 1.x files carry no library id: name the sample after its folder (``<sample>/outs``)
    folder = path.parent if path.name == "outs" else path
    sample = re.sub(r"[^\w.-]", "_", folder.name) or "sample"
    logger.info(f"{str(path / name)!r} names no sample; using the folder name {sample!r} (pass `sample` to choose)")
    return sample


def visium(
    path: str | Path,
    *,
    sample: str | None = None,
    image: _Image = "auto",
    **kwargs: Any,
) -> SpatialData:
    """Read a Space Ranger (Visium) output folder with :func:`spatialdata_io.visium`, in hyperst's layout.

    The folder holds ``(<sample>_)filtered_feature_bc_matrix.h5`` and ``spatial/`` with
    ``tissue_positions.csv`` (or ``tissue_positions_list.csv``), ``scalefactors_json.json`` and the
    ``tissue_hires_image.png``/``tissue_lowres_image.png`` images. The full-resolution H&E (Space Ranger's input
    image) is read only when given as ``fullres_image_file`` (a keyword passed on to spatialdata-io, like
    ``counts_file``, ``tissue_positions_file``, ``scalefactors_file``, ``imread_kwargs``, ...).

    The result has a coordinate system ``sample`` in full-resolution pixels holding ``f"{sample}_spots"`` (circles
    of the 55 µm capture spots at the spot centres) and ``f"{sample}_image"``: the full-resolution image when
    read, else the hires image (else lowres) with its scale transformation. The other images are kept as
    ``f"{sample}_hires_image"``/``f"{sample}_lowres_image"``/``f"{sample}_fullres_image"``, each in its own
    coordinate system (``f"{sample}_downscaled_hires"``, ``f"{sample}_downscaled_lowres"``,
    ``f"{sample}_fullres"``) where the spots are registered too. The table ``"table"`` holds raw counts (CSR,
    int32), ``obs["sample"]``, ``obs["barcode"]`` (``obs_names`` are ``f"{sample}_{barcode}"``),
    ``obs["in_tissue"]``, ``obs["array_row"]``/``obs["array_col"]``, ``obsm["spatial"]`` (full-resolution pixel
    x, y) and ``uns["hyperst"]["spots"][sample]`` (55 µm spots, 100 µm pitch, ``"visium"`` layout, and the pixel
    size of ``f"{sample}_image"``: full-resolution µm/px divided by the image's scale factor).

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder.
    sample
        Sample name (element names and coordinate system); default: the ``<sample>_`` prefix of the counts file,
        else the library id stored in it, else (Space Ranger 1.x) the folder's name.
    image
        Which image becomes ``f"{sample}_image"``: ``"fullres"``, ``"hires"``, ``"lowres"`` or ``"auto"`` (the
        finest one read).
    **kwargs
        Passed on to :func:`spatialdata_io.visium` (not ``dataset_id``: use ``sample``).

    Returns
    -------
    The sample as a SpatialData object.

    Raises
    ------
    FileNotFoundError
        If ``path``, the counts file or the scale factors file does not exist.
    ValueError
        If ``image`` is not available or invalid, the counts are not raw integer counts, or the pixel size cannot
        be determined.
    TypeError
        If ``dataset_id`` is passed (use ``sample``).
    """
    import spatialdata_io

    if image not in ("auto", *_KINDS):
        raise ValueError(f"`image={image!r}` must be one of {['auto', *_KINDS]}.")
    if "dataset_id" in kwargs:
        raise TypeError("Pass the sample name as `sample`, not `dataset_id`.")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"`path={str(path)!r}` is not a folder; pass the Space Ranger output folder (outs/).")
    counts_file = str(kwargs.get("counts_file", "filtered_feature_bc_matrix.h5"))
    if sample is None:
        sample = _infer_sample(path, counts_file)
    scalefactors_file = kwargs.get("scalefactors_file")
    sf_path = path / "spatial" / "scalefactors_json.json" if scalefactors_file is None else path / scalefactors_file
    if not sf_path.is_file():
        raise FileNotFoundError(
            f"No scale factors file {str(sf_path)!r}; Space Ranger writes spatial/scalefactors_json.json (pass "
            "`scalefactors_file=` if it lies elsewhere)."
        )
    scalefactors = json.loads(sf_path.read_text())
    if kwargs.get("fullres_image_file") is not None and not (path / kwargs["fullres_image_file"]).is_file():
        raise FileNotFoundError(
            f"`fullres_image_file={kwargs['fullres_image_file']!r}` does not exist in {str(path)!r}."
        )

    with warnings.catch_warnings():
        # spatialdata-io's own table; hyperst rebuilds it with a categorical region column
        warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
        sdata = spatialdata_io.visium(path, dataset_id=sample, **kwargs)
    table = sdata.tables["table"]
    images: dict[str, tuple[Any, float]] = {}
    for kind, name, key in (
        ("fullres", f"{sample}_full_image", None),
        ("hires", f"{sample}_hires_image", "tissue_hires_scalef"),
        ("lowres", f"{sample}_lowres_image", "tissue_lowres_scalef"),
    ):
        if name in sdata.images:
            images[kind] = (sdata.images[name], 1.0 if key is None else float(scalefactors[key]))
    return _assemble(
        sample=sample,
        adata=table,
        centres_px=np.asarray(table.obsm["spatial"], dtype=np.float64),
        images=images,
        image=image,
        spot_diameter_fullres=scalefactors.get("spot_diameter_fullres"),
        source=f"Visium sample {sample!r}",
        attrs=sdata.attrs,
    )


# --------------------------------------------------------------------------------------------- legacy AnnData
def legacy(
    adata: AnnData,
    *,
    library_id: str | None = None,
    library_key: str | None = None,
    sample: str | None = None,
    image: Literal["auto", "hires", "lowres"] = "auto",
    layer: str | None = None,
) -> SpatialData:
    """Convert a legacy Visium AnnData (scanpy/squidpy layout) to a SpatialData in hyperst's layout.

    The AnnData holds spot centres in full-resolution pixels in ``obsm["spatial"]`` and, in
    ``uns["spatial"][library_id]``, the ``"images"`` (``"hires"``/``"lowres"``) and ``"scalefactors"``
    (``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``), as written by
    :func:`scanpy.read_visium`. Images and spots are converted with
    :func:`spatialdata_io.experimental.from_legacy_anndata`, then laid out as by :func:`visium`: coordinate
    system ``sample`` in full-resolution pixels, ``f"{sample}_image"`` (hires by default; float images in
    [0, 1] become uint8), ``f"{sample}_spots"`` and the table ``"table"`` (raw counts, ``adata.obs`` columns,
    ``adata.var``, ``obsm["spatial"]``, ``uns["hyperst"]["spots"]``). ``adata`` itself is not modified.

    Parameters
    ----------
    adata
        The legacy AnnData, with raw counts in ``.X`` (or ``.layers["counts"]``, or ``layer``).
    library_id
        Key of ``adata.uns["spatial"]`` to convert; needed when it holds several libraries.
    library_key
        ``adata.obs`` column naming each spot's library; needed with several libraries, to select the spots of
        ``library_id``.
    sample
        Sample name (element names and coordinate system); default: ``library_id``.
    image
        Which image becomes ``f"{sample}_image"``: ``"hires"``, ``"lowres"`` or ``"auto"`` (hires if present).
    layer
        Layer holding the raw counts, if not ``.X``/``.layers["counts"]``.

    Returns
    -------
    The sample as a SpatialData object.

    Raises
    ------
    ValueError
        If ``adata`` lacks ``uns["spatial"]`` or ``obsm["spatial"]``, several libraries are present without
        ``library_id``/``library_key``, ``image`` is unavailable, or there are no raw integer counts.
    """
    from anndata import AnnData
    from spatialdata_io.experimental import from_legacy_anndata

    if image not in ("auto", "hires", "lowres"):
        raise ValueError(f"`image={image!r}` must be 'auto', 'hires' or 'lowres'.")
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, Mapping) or not spatial:
        raise ValueError(
            "`adata.uns['spatial']` is missing or empty: a legacy Visium AnnData stores its images and scale factors "
            "there (see scanpy.read_visium)."
        )
    libraries = list(spatial.keys())
    if library_id is None:
        if len(libraries) > 1:
            raise ValueError(
                f"`adata.uns['spatial']` holds several libraries {libraries}: pass `library_id` (and `library_key`)."
            )
        library_id = libraries[0]
    elif library_id not in spatial:
        raise ValueError(f"`library_id={library_id!r}` is not in adata.uns['spatial']; libraries: {libraries}.")
    if Key.OBSM_SPATIAL not in adata.obsm:
        raise ValueError("`adata.obsm['spatial']` is missing: it must hold the spot centres in full-resolution pixels.")

    subset = adata
    if library_key is not None:
        if library_key not in adata.obs:
            raise ValueError(f"`library_key={library_key!r}` is not a column of adata.obs.")
        mask = (adata.obs[library_key].astype(str) == str(library_id)).to_numpy()
        if not mask.any():
            raise ValueError(f"No spot has adata.obs[{library_key!r}] == {library_id!r}.")
        subset = adata[mask]
    elif len(libraries) > 1:
        raise ValueError(
            f"`adata.uns['spatial']` holds several libraries {libraries}: pass `library_key`, the obs column that "
            f"selects the spots of library {library_id!r}."
        )
    sample = str(library_id) if sample is None else sample

    entry = spatial[library_id]
    scalefactors = dict(entry.get("scalefactors", {}) or {})
    raw_images = dict(entry.get("images", {}) or {})
    legacy_images = {
        k: _rgb_uint8_array(v, f"{library_id}/{k}") for k, v in raw_images.items() if k in ("hires", "lowres")
    }
    for k in legacy_images:
        if f"tissue_{k}_scalef" not in scalefactors:
            raise ValueError(f"adata.uns['spatial'][{library_id!r}]['scalefactors'] lacks 'tissue_{k}_scalef'.")
    # a light AnnData for the converter: positions, images and scale factors only (no counts copied)
    light = AnnData(
        obs=pd.DataFrame(index=subset.obs_names.copy()),
        obsm={Key.OBSM_SPATIAL: np.asarray(subset.obsm[Key.OBSM_SPATIAL], dtype=np.float64)[:, :2]},
        uns={"spatial": {library_id: {"images": legacy_images, "scalefactors": scalefactors}}},
    )
    converted = from_legacy_anndata(light)
    images = {
        kind: (converted.images[f"{library_id}_{kind}"], float(scalefactors[f"tissue_{kind}_scalef"]))
        for kind in ("hires", "lowres")
        if f"{library_id}_{kind}" in converted.images
    }
    return _assemble(
        sample=sample,
        adata=subset,
        centres_px=np.asarray(subset.obsm[Key.OBSM_SPATIAL], dtype=np.float64)[:, :2],
        images=images,
        image=image,
        spot_diameter_fullres=scalefactors.get("spot_diameter_fullres"),
        source=f"legacy AnnData library {library_id!r}",
        layer=layer,
        keep_obs=True,
    )
