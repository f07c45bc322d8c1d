"""Spot geometry: find each sample's image, spots and table in a SpatialData and put spots in image pixels.

Everything downstream (crops, niches, features) works in level-0 pixels of the sample's image, with
a physical pixel size in µm. This module resolves both, honouring the coordinate transformations
between the spots' and the image's coordinate systems.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst._utils import spot_pitch
from hyperst._warnings import HyperSTWarning
from hyperst.pp._layout import LAYOUTS
from hyperst.pp._pyramid import image_shape

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["SampleSpots", "resolve_spots", "spot_table"]

#: Suffixes of spots element names that are not part of the sample name (readers write ``f"{sample}_spots"``).
_SPOTS_SUFFIXES: tuple[str, ...] = ("_spots", "_shapes", "_circles")
#: Two physical sizes that differ by this factor or more contradict each other (warned about): wide enough for
#: Space Ranger's 65 µm spot_diameter_fullres against the 55 µm Visium spot (1.18×) and for fitted grids.
CONTRADICTION_FACTOR: float = 1.5

@dataclass
class SampleSpots:
    """The spots of one sample, in level-0 pixels of its image.

    Attributes
    ----------
    sample
        Sample name: the table's sample column value, else the shapes element's name without a trailing
        ``"_spots"``/``"_shapes"``/``"_circles"`` (``"C6_spots"`` → ``"C6"``).
    image_key
        Image element holding the H&E.
    shapes_key
        Shapes (or points) element holding the spots.
    table_key
        Table annotating the spots, or ``None``.
    coordinate_system
        Coordinate system in which spots and image were matched.
    obs_names
        Table ``obs_names`` of the spots (shapes index when there is no table), in table order.
    table_rows
        Row positions of these spots in the table (``None`` without a table).
    centers_px
        ``(n, 2)`` spot centres as (x = column, y = row) in level-0 image pixels.
    image_shape
        ``(height, width)`` of level 0.
    pixel_size
        µm per level-0 pixel.
    spot_diameter
        Spot diameter in µm.
    pitch
        Centre-to-centre distance of neighbouring spots in µm (``None`` when not on a grid).
    layout
        ``"visium"`` (hexagonal), ``"st"`` (square grid) or ``"generic"``.
    pixel_size_source
        Where ``pixel_size`` came from: ``"argument"``, ``"metadata"``, ``"spot_diameter"`` or
        ``"pitch"``.
    """

    sample: str
    image_key: str
    shapes_key: str
    table_key: str | None
    coordinate_system: str
    obs_names: pd.Index
    table_rows: np.ndarray | None
    centers_px: np.ndarray
    image_shape: tuple[int, int]
    pixel_size: float
    spot_diameter: float
    pitch: float | None
    layout: str
    pixel_size_source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return len(self.obs_names)

    def summary(self) -> dict[str, Any]:
        """JSON-compatible record of what was resolved (stored in ``.uns["hyperst"]["spots"]``)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("obs_names", "table_rows", "centers_px", "extra")}
        out["image_shape"] = [int(v) for v in self.image_shape]
        out["n_spots"] = self.n_spots
        return out


# ---------------------------------------------------------------------------------------------- helpers
def _sample_name(shapes_key: str) -> str:
    """Sample name of a spots element that no table names: the key without a trailing spots suffix.

    The suffixes are ``"_spots"``, ``"_shapes"`` and ``"_circles"``: hyperst's readers name elements
    ``f"{sample}_image"`` and ``f"{sample}_spots"``, so ``"C6_spots"`` → ``"C6"``. A key that is only the
    suffix, or has none, is kept as is.
    """
    for suffix in _SPOTS_SUFFIXES:
        if shapes_key.endswith(suffix) and len(shapes_key) > len(suffix):
            return shapes_key[: -len(suffix)]
    return shapes_key


def _names(elements: Mapping[str, Any]) -> list[str]:
    return sorted(elements.keys())


def _coordinate_systems(element: Any) -> set[str]:
    from spatialdata.transformations import get_transformation

    return set(get_transformation(element, get_all=True).keys())


def _affine_xy(element: Any, coordinate_system: str) -> np.ndarray:
    """3×3 affine of ``element``'s intrinsic (x, y) to ``coordinate_system``."""
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=coordinate_system)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _spot_centres_and_diameters(element: Any) -> tuple[pd.Index, np.ndarray, np.ndarray | None]:
    """Intrinsic centres ``(n, 2)`` and diameters (``None`` for points) of a shapes/points element."""
    import geopandas as gpd

    if isinstance(element, gpd.GeoDataFrame):
        geom = element.geometry
        if len(geom) == 0:
            raise ValueError("The spots element is empty: no spot to process.")
        kinds = set(geom.geom_type)
        if kinds <= {"Point"}:
            xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]).astype(np.float64)
            diam = 2.0 * element["radius"].to_numpy(dtype=np.float64) if "radius" in element.columns else None
            return element.index, xy, diam
        if kinds <= {"Polygon", "MultiPolygon"}:
            cent = geom.centroid
            xy = np.column_stack([cent.x.to_numpy(), cent.y.to_numpy()]).astype(np.float64)
            diam = np.sqrt(4.0 * geom.area.to_numpy(dtype=np.float64) / np.pi)  # equivalent-area diameter
            return element.index, xy, diam
        raise ValueError(f"Spots must be circles, polygons or points; found geometry types {sorted(kinds)}.")
    # points (dask dataframe)
    df = element.compute() if hasattr(element, "compute") else element
    if len(df) == 0:
        raise ValueError("The spots element is empty: no spot to process.")
    xy = df[["x", "y"]].to_numpy(dtype=np.float64)
    return df.index, xy, None


def _grid_geometry(xy: np.ndarray) -> tuple[float | None, str]:
    """Lattice pitch (:func:`hyperst._utils.spot_pitch`) and layout guess ("visium" hex, "st" square, "generic")."""
    n = len(xy)
    if n < 4:
        return None, "generic"
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    k = min(9, n)
    dist, _ = tree.query(xy, k=k)
    pitch = spot_pitch(xy)
    if not np.isfinite(pitch) or pitch <= 0:
        return None, "generic"
    # neighbours at the pitch distance (±10 %) for spots with a full ring
    ring = (np.abs(dist[:, 1:] - pitch) <= 0.1 * pitch).sum(axis=1)
    # a spot is on the lattice when its nearest spot, or the median of its 4 nearest (the statistic the pitch
    # is the median of), lies within 10 % of the pitch: positional jitter biases the nearest distance low,
    # and on small grids the 4 nearest of a border spot reach the second ring
    nearest = np.abs(dist[:, 1] - pitch)
    local = np.abs(np.median(dist[:, 1 : min(5, k)], axis=1) - pitch)
    regular = float(np.mean(np.minimum(nearest, local) <= 0.1 * pitch))
    if regular < 0.8:
        return pitch, "generic"
    full = ring.max()
    if full == 6:
        return pitch, "visium"
    if full == 4:
        return pitch, "st"
    return pitch, "generic"


def _metadata(table: AnnData | None, sample: str) -> dict[str, Any]:
    if table is None:
        return {}
    meta = table.uns.get(Key.UNS, {}).get(Key.UNS_SPOTS, {})
    entry = meta.get(sample, {}) if isinstance(meta, Mapping) else {}
    return dict(entry) if isinstance(entry, Mapping) else {}


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (np.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive number of µm, got {value!r}.")


def _check_regions(sdata: SpatialData, table_key: str | None, regions: list[str], annotated: list[str]) -> None:
    """Refuse a table whose regions name no element of ``sdata``; warn about regions that name none."""
    elements = {*sdata.shapes.keys(), *sdata.points.keys(), *sdata.labels.keys()}
    missing = [r for r in regions if r not in elements]
    if not missing:
        return
    listing = f"shapes: {_names(sdata.shapes)}, points: {_names(sdata.points)}"
    if len(missing) == len(regions):
        what = f"region {missing[0]!r}" if len(missing) == 1 else f"regions {missing}"
        raise ValueError(
            f"Table `{table_key}` annotates {what}, which matches no element of `sdata` ({listing}). Point the "
            f"table at its spots (sdata.set_table_annotates_spatialelement({table_key!r}, region=...); the table's "
            "region column must name them too), or pass `shapes_key`."
        )
    warnings.warn(
        f"Table `{table_key}` annotates regions {missing} that match no element of `sdata` ({listing}); the table "
        f"rows of those regions are ignored (spots from {annotated}).",
        HyperSTWarning, stacklevel=3,
    )


def _grid_record(element: Any, image_key: str) -> dict[str, Any]:
    """The parameters :func:`hyperst.pp.grid_spots` recorded on a spots element for ``image_key`` (else ``{}``)."""
    attrs = getattr(element, "attrs", None)
    record = attrs.get(Key.UNS, {}) if isinstance(attrs, Mapping) else {}
    grid = record.get(Key.ATTRS_GRID, {}) if isinstance(record, Mapping) else {}
    if not isinstance(grid, Mapping) or grid.get("image_key") != image_key:
        return {}
    return {k: float(grid[k]) for k in ("spot_diameter", "pitch", "pixel_size") if _positive(grid.get(k))}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool) and bool(
        np.isfinite(value) and value > 0)


def _first(*candidates: tuple[str, Any]) -> tuple[float | None, str | None]:
    """The first given value of ``(source, value)`` pairs, with its source."""
    for where, value in candidates:
        if value:
            return float(value), where
    return None, None


def _factor(a: float, b: float) -> float:
    """How many times the larger of two positive sizes is the smaller."""
    return float(max(a, b) / min(a, b))


def _check_physical_size(
    sample: str, skey: str, ikey: str, cs: str, *, px: float, source: str, layout: str, diam_px: float | None,
    diam_um: float | None, diam_from: str | None, pitch_px: float | None, pitch_um: float | None,
    pitch_from: str | None,
) -> None:
    """Warn when the spots' size or spacing in pixels contradicts the pixel size and the spot layout.

    With a pixel size known on its own (argument or metadata), the spot diameter and the lattice pitch the
    shapes imply in µm are compared with the expected ones; with a pixel size derived from the spot diameter,
    the pixel size the lattice pitch gives is compared with it. A factor of :data:`CONTRADICTION_FACTOR` or
    more is a contradiction: spots and image in different coordinate systems, a wrong pixel size, or radii
    that are diameters.
    """
    lattice = layout != "generic" and pitch_px is not None and pitch_um is not None
    problems = []
    if source in ("argument", "metadata"):
        if diam_px and diam_um and _factor(diam_px * px, diam_um) >= CONTRADICTION_FACTOR:
            problems.append(f"their diameter is {diam_px:.4g} px = {diam_px * px:.4g} µm, but the spot diameter is "
                            f"{diam_um:g} µm ({diam_from})")
        if lattice and _factor(pitch_px * px, pitch_um) >= CONTRADICTION_FACTOR:  # type: ignore[operator]
            problems.append(f"their spacing is {pitch_px:.4g} px = {pitch_px * px:.4g} µm, but the pitch is "
                            f"{pitch_um:g} µm ({pitch_from})")
    elif source == "spot_diameter" and lattice and _factor(px, pitch_um / pitch_px) >= CONTRADICTION_FACTOR:  # type: ignore[operator]
        problems.append(f"their diameter ({diam_px:.4g} px for {diam_um:g} µm, {diam_from}) gives {px:.4g} µm/px but "
                        f"their spacing ({pitch_px:.4g} px for a {pitch_um:g} µm pitch, {pitch_from}) gives "
                        f"{pitch_um / pitch_px:.4g} µm/px")  # type: ignore[operator]
    if problems:
        warnings.warn(
            f"{sample}: spots `{skey}` do not fit image `{ikey}` at {px:.4g} µm/px (pixel size from {source}): "
            + "; ".join(problems) + ". Either the shapes are in another coordinate system than the image (check "
            f"the transformations of `{skey}` and `{ikey}` to {cs!r}, e.g. full-resolution spots on a downscaled "
            "image), the pixel size is wrong, or the radius column holds diameters. Pass `pixel_size`, "
            "`spot_diameter` or `pitch` (µm) if the defaults do not fit these spots.",
            HyperSTWarning, stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------- public
def resolve_spots(
    sdata: SpatialData,
    *,
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    pixel_size: float | None = None,
    spot_diameter: float | None = None,
    pitch: float | None = None,
    sample_key: str = "sample",
) -> list[SampleSpots]:
    """Resolve, per sample, the image, the spot shapes and the table, and put the spots in image pixels.

    Keys are inferred when unambiguous; otherwise the error lists the candidates. The transformation
    from the spots' coordinates to the image's level-0 pixels goes through the coordinate system the
    two share.

    Parameters
    ----------
    sdata
        The SpatialData object.
    image_key
        Image element name, or a mapping ``shapes key → image key`` for several samples. Inferred
        from the coordinate system shared with the spots when ``None``.
    shapes_key
        Spots element name(s) (circles, polygons or points). When ``None``: the elements annotated by
        the table, else the only shapes element.
    table_key
        Table annotating the spots. When ``None``: the only table, if any (a table is optional).
    coordinate_system
        Coordinate system in which to match spots and image. When ``None``: the one spots and image
        share (an error lists them if several match).
    pixel_size
        µm per level-0 pixel of the image. When ``None``: from the reader's metadata
        (``table.uns["hyperst"]["spots"]``), else from ``spot_diameter`` and the spot size in pixels,
        else from ``pitch`` and the grid spacing in pixels.
    spot_diameter
        Spot diameter in µm (default: metadata, else 55 for a Visium hexagonal layout, 100 for a
        legacy ST square grid).
    pitch
        Centre-to-centre spot distance in µm (default: metadata, else 100 Visium, 200 ST).
    sample_key
        ``.obs`` column of the table naming samples (used for names and metadata). Spots whose table rows
        have no (or several) sample names are named after their element without a trailing ``"_spots"``,
        ``"_shapes"`` or ``"_circles"`` (``"C6_spots"`` → ``"C6"``).

    Returns
    -------
    One :class:`SampleSpots` per spots element.

    Raises
    ------
    ValueError
        No image, no spots, ambiguous keys, no shared coordinate system, spots outside the image, a
        non-positive or unresolvable pixel size.
    """
    from spatialdata.models import get_table_keys

    for name, value in (("pixel_size", pixel_size), ("spot_diameter", spot_diameter), ("pitch", pitch)):
        _check_positive(name, value)
    if len(sdata.images) == 0:
        raise ValueError("`sdata` has no image element: hyperst needs the H&E image (add it to `sdata.images`).")

    # -- table
    table = None
    if table_key is None:
        # tables written by hst.tl.predict are outputs: never picked as the input table
        inputs = [k for k, t in sdata.tables.items() if Key.UNS_PREDICT not in t.uns.get(Key.UNS, {})]
        if len(inputs) == 1:
            table_key = inputs[0]
        elif len(inputs) > 1:
            raise ValueError(f"`sdata` has several tables {sorted(inputs)}: pass `table_key`.")
    if table_key is not None:
        if table_key not in sdata.tables:
            raise ValueError(f"`table_key={table_key!r}` is not a table of `sdata`; tables: {_names(sdata.tables)}.")
        table = sdata.tables[table_key]

    # -- spots elements
    spot_elements = {**dict(sdata.shapes.items()), **dict(sdata.points.items())}
    regions: list[str] = []
    if table is not None and table.uns.get("spatialdata_attrs"):
        region, _, _ = get_table_keys(table)
        regions = [str(region)] if isinstance(region, str) else [str(r) for r in region]
    if shapes_key is None:
        annotated = [r for r in regions if r in spot_elements]
        _check_regions(sdata, table_key, regions, annotated)
        if annotated:
            shapes_keys = annotated
        elif len(sdata.shapes) == 1:
            shapes_keys = _names(sdata.shapes)
        elif len(sdata.shapes) == 0:
            raise ValueError(
                "`sdata` has no shapes element with spots. Pass spots as circles/polygons/points, or use "
                "`hst.tl.predict`, which can place pseudo-spots on a grid over the tissue."
            )
        else:
            raise ValueError(f"`sdata` has several shapes elements {_names(sdata.shapes)}: pass `shapes_key`.")
    else:
        shapes_keys = [shapes_key] if isinstance(shapes_key, str) else list(shapes_key)
        missing = [k for k in shapes_keys if k not in spot_elements]
        if missing:
            raise ValueError(
                f"`shapes_key` {missing} not found; shapes: {_names(sdata.shapes)}, points: {_names(sdata.points)}."
            )

    region_key = instance_key = None
    if table is not None and table.uns.get("spatialdata_attrs"):
        _, region_key, instance_key = get_table_keys(table)

    out: list[SampleSpots] = []
    for skey in shapes_keys:
        element = spot_elements[skey]
        index, xy, diam = _spot_centres_and_diameters(element)

        # -- image and coordinate system
        spot_cs = _coordinate_systems(element)
        if coordinate_system is not None:
            if coordinate_system not in spot_cs:
                raise ValueError(
                    f"Spots `{skey}` are not in coordinate system {coordinate_system!r}; they are in "
                    f"{sorted(spot_cs)}. Pass one of these as `coordinate_system`."
                )
            spot_cs = {coordinate_system}
        if isinstance(image_key, Mapping):
            ikey = image_key.get(skey)
            if ikey is None:
                raise ValueError(f"`image_key` has no entry for spots `{skey}`.")
            candidates = [ikey]
        elif image_key is not None:
            candidates = [image_key]
        else:
            candidates = [k for k, im in sdata.images.items() if _coordinate_systems(im) & spot_cs]
            if len(candidates) > 1:
                preferred = [k for k in candidates if k.rsplit("_", 1)[0] == skey.rsplit("_", 1)[0]]
                candidates = preferred if len(preferred) == 1 else candidates
        for ikey in candidates:
            if ikey not in sdata.images:
                raise ValueError(f"`image_key={ikey!r}` is not an image of `sdata`; images: {_names(sdata.images)}.")
        if not candidates:
            raise ValueError(
                f"No image shares a coordinate system with spots `{skey}` (spots: {sorted(spot_cs)}; images: "
                + ", ".join(f"{k}: {sorted(_coordinate_systems(v))}" for k, v in sdata.images.items())
                + "). Register both in one coordinate system, or pass `image_key` and `coordinate_system`."
            )
        if len(candidates) > 1:
            raise ValueError(f"Several images match spots `{skey}`: {sorted(candidates)}. Pass `image_key`.")
        ikey = candidates[0]
        image = sdata.images[ikey]
        shared = sorted(_coordinate_systems(image) & spot_cs)
        if not shared:
            raise ValueError(
                f"Image `{ikey}` (coordinate systems {sorted(_coordinate_systems(image))}) and spots `{skey}` "
                f"(coordinate systems {sorted(spot_cs)}) share no coordinate system: their positions cannot be "
                "matched. Add a transformation of both to a common coordinate system."
            )
        cs = shared[0]

        # -- spots → level-0 image pixels
        to_px = np.linalg.inv(_affine_xy(image, cs)) @ _affine_xy(element, cs)
        for other in shared[1:]:
            alt = np.linalg.inv(_affine_xy(image, other)) @ _affine_xy(element, other)
            if not np.allclose(alt, to_px, rtol=1e-6, atol=1e-6):
                raise ValueError(
                    f"Spots `{skey}` and image `{ikey}` are related differently in coordinate systems {shared}; "
                    "pass `coordinate_system`."
                )
        centers = xy @ to_px[:2, :2].T + to_px[:2, 2]
        scale_px = float(np.sqrt(abs(np.linalg.det(to_px[:2, :2]))))
        diam_px = None if diam is None else diam * scale_px

        # -- table rows
        rows = None
        obs_names = pd.Index(index.astype(str))
        sample = _sample_name(skey)
        if table is not None and region_key is not None:
            obs = table.obs
            mask = (obs[region_key].astype(str) == skey).to_numpy()
            if mask.any():
                inst = obs.loc[mask, instance_key].to_numpy()
                pos = pd.Index(index).get_indexer(inst)
                if (pos < 0).any():
                    raise ValueError(
                        f"{int((pos < 0).sum())} table rows of region `{skey}` have no matching spot "
                        f"(`{instance_key}` not in the shapes index)."
                    )
                rows = np.flatnonzero(mask)
                centers = centers[pos]
                diam_px = None if diam_px is None else diam_px[pos]
                obs_names = table.obs_names[mask]
                if sample_key in obs.columns:
                    values = obs.loc[mask, sample_key].astype(str).unique()
                    if len(values) == 1:
                        sample = str(values[0])
            elif table_key is not None:
                logger.warning(
                    f"Table `{table_key}` has no rows for spots `{skey}` (it annotates {regions}); using the shapes "
                    "alone, without the table's measurements."
                )

        height, width = image_shape(image)
        outside = (centers[:, 0] < 0) | (centers[:, 0] >= width) | (centers[:, 1] < 0) | (centers[:, 1] >= height)
        if outside.any():
            raise ValueError(
                f"{int(outside.sum())} of {len(centers)} spots of `{skey}` lie outside image `{ikey}` "
                f"({width}×{height} px) in coordinate system {cs!r}: check the transformations of the spots and "
                "the image (e.g. spots in full-resolution pixels while the image is a downscaled version)."
            )

        # -- physical size
        meta = _metadata(table, sample) or _metadata(table, skey)
        grid = _grid_record(element, ikey)
        grid_pitch_px, layout = _grid_geometry(centers)
        layout = meta.get("layout", layout)
        defaults = LAYOUTS.get(layout, {})
        diam_um, diam_from = _first(("`spot_diameter`", spot_diameter), ("the metadata", meta.get("spot_diameter")),
                                    ("the grid record", grid.get("spot_diameter")),
                                    (f"the {layout} default", defaults.get("spot_diameter")))
        pitch_um, pitch_from = _first(("`pitch`", pitch), ("the metadata", meta.get("pitch")),
                                      ("the grid record", grid.get("pitch")),
                                      (f"the {layout} default", defaults.get("pitch")))
        median_diam_px = None if diam_px is None else float(np.median(diam_px))
        # the reader's pixel size refers to one image (the sample's main one unless it says otherwise)
        meta_px = float(meta["pixel_size"]) if meta.get("pixel_size") and meta.get(
            "image_key", f"{sample}_image") == ikey else None
        if pixel_size is not None:
            px, source = float(pixel_size), "argument"
        elif meta_px is not None:
            px, source = meta_px, "metadata"
        elif diam_um and median_diam_px:
            if median_diam_px > max(height, width):
                raise ValueError(
                    f"Spots `{skey}` have a median diameter of {median_diam_px:.4g} px, more than image `{ikey}` "
                    f"({width}×{height} px): as a {float(diam_um):g} µm spot ({diam_from}) that would make the pixel "
                    f"size {float(diam_um) / median_diam_px:.3g} µm. The radius column is not in pixels of this image "
                    f"(check the shapes' radius and their transformation to {cs!r}); pass `pixel_size` (µm per pixel)."
                )
            px, source = float(diam_um) / median_diam_px, "spot_diameter"
        elif pitch_um and grid_pitch_px:
            px, source = float(pitch_um) / grid_pitch_px, "pitch"
        else:
            raise ValueError(
                f"Cannot determine the pixel size of `{ikey}` for spots `{skey}` (layout {layout!r}, no spot "
                "diameter in pixels or no regular grid). Pass `pixel_size` (µm per pixel) or `spot_diameter` (µm)."
            )
        _check_positive("pixel_size", px)
        if diam_um is None:
            diam_um = median_diam_px * px if median_diam_px else None
        if diam_um is None:
            raise ValueError(f"Cannot determine the spot diameter of `{skey}`: pass `spot_diameter` (µm).")
        if pitch_um is None and grid_pitch_px is not None and layout != "generic":
            pitch_um = grid_pitch_px * px
        known_px = meta_px if meta_px is not None else grid.get("pixel_size")
        if source == "argument" and known_px and _factor(px, known_px) >= CONTRADICTION_FACTOR:
            where = "the metadata" if meta_px is not None else f"the grid record of `{skey}`"
            warnings.warn(
                f"{sample}: pixel_size={px:.4g} µm/px contradicts {where} of image `{ikey}` ({float(known_px):.4g} "
                f"µm/px, a factor {_factor(px, known_px):.2f}); using pixel_size={px:.4g}. Check it: it is µm per "
                f"level-0 pixel of `{ikey}` (pass pixel_size=None to use the metadata).",
                HyperSTWarning, stacklevel=2,
            )
        else:
            _check_physical_size(
                sample, skey, ikey, cs, px=px, source=source, layout=layout, diam_px=median_diam_px,
                diam_um=diam_um, diam_from=diam_from, pitch_px=grid_pitch_px, pitch_um=pitch_um,
                pitch_from=pitch_from,
            )
        out.append(
            SampleSpots(
                sample=sample,
                image_key=ikey,
                shapes_key=skey,
                table_key=table_key,
                coordinate_system=cs,
                obs_names=obs_names,
                table_rows=rows,
                centers_px=centers,
                image_shape=(height, width),
                pixel_size=px,
                spot_diameter=float(diam_um),
                pitch=None if pitch_um is None else float(pitch_um),
                layout=layout,
                pixel_size_source=source,
            )
        )
        logger.info(
            f"{sample}: {len(centers)} spots on `{ikey}` ({layout}), pixel size {px:.4g} µm from {source}, "
            f"spot diameter {float(diam_um):.4g} µm"
        )
    return out


def spot_table(sdata: SpatialData, *, shapes_key: str | None = None, table_key: str = "table") -> AnnData:
    """Create a table without measurements that annotates a spots element (for H&E-only prediction).

    Parameters
    ----------
    sdata
        SpatialData with the spots; gains the table under ``table_key``.
    shapes_key
        Spots element; inferred when there is only one shapes element.
    table_key
        Name of the new table; must not exist yet.

    Returns
    -------
    The new table (also stored in ``sdata.tables[table_key]``), with no genes, the spot centres in
    ``.obsm["spatial"]`` (intrinsic coordinates of the shapes) and ``.obs["sample"]``: the element's name
    without a trailing ``"_spots"``, ``"_shapes"`` or ``"_circles"`` (``"C6_spots"`` → ``"C6"``), as in
    :func:`resolve_spots`.
    """
    import anndata as ad
    from spatialdata.models import TableModel

    if table_key in sdata.tables:
        raise ValueError(f"`sdata` already has a table {table_key!r}; choose another `table_key`.")
    if shapes_key is None:
        if len(sdata.shapes) != 1:
            raise ValueError(f"Pass `shapes_key`; shapes elements: {_names(sdata.shapes)}.")
        shapes_key = next(iter(sdata.shapes.keys()))
    if shapes_key not in sdata.shapes:
        raise ValueError(f"`shapes_key={shapes_key!r}` not found; shapes: {_names(sdata.shapes)}.")
    index, xy, _ = _spot_centres_and_diameters(sdata.shapes[shapes_key])
    sample = _sample_name(shapes_key)
    obs = pd.DataFrame(
        {
            "region": pd.Categorical([shapes_key] * len(index)),
            "instance_id": np.asarray(index),
            Key.OBS_SAMPLE: pd.Categorical([sample] * len(index), categories=[sample]),
        },
        index=[f"{shapes_key}-{i}" for i in index],
    )
    table = ad.AnnData(X=np.zeros((len(index), 0), dtype=np.float32), obs=obs)
    table.obsm[Key.OBSM_SPATIAL] = xy
    table = TableModel.parse(table, region=shapes_key, region_key="region", instance_key="instance_id")
    sdata.tables[table_key] = table
    return table
