"""Scanner slides: Aperio ``.svs``, generic and OME pyramidal TIFF, and (optionally) what OpenSlide reads.

:func:`read_wsi` opens the pixels of one whole-slide image lazily as a spatialdata image element and finds its
physical pixel size; :func:`read_slide` wraps it into a :class:`~spatialdata.SpatialData` ready for H&E-only
prediction (:func:`hyperst.tl.predict`). TIFF-based files are read with :mod:`tifffile` (a dependency): the main
image is the largest series that is not a label, macro or thumbnail image, and its pyramid levels are checked
against level 0 (same aspect ratio, decreasing size), so a label or macro photograph is never taken for a level.
Formats tifffile cannot open (``.mrxs``, ``.vms``, ...) go through OpenSlide when the optional extra is installed
(``pip install 'hyperst[slides]'``), else tiffslide.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.datasets._utils import image_key, normalise_chunks, positive_float

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

__all__ = ["read_slide", "read_wsi"]

#: Smallest side (px) of the coarsest level built when a slide has no pyramid of its own.
_MIN_LEVEL_SIZE = 256
_MAX_EXTRA_LEVELS = 5
#: tifffile series names that are never the slide itself (Aperio, NDPI, Philips, Ventana, ...)
_ASSOCIATED = ("label", "macro", "thumbnail", "overview", "map")
#: a pyramid level may differ from level 0's aspect ratio by this many pixels (rounding of the downsampling)
_LEVEL_SLACK_PX = 2.0
#: relative disagreement between ``pixel_size=`` and the file's own value above which a warning is logged
_PIXEL_SIZE_TOLERANCE = 0.1
#: µm per unit of the OME ``PhysicalSizeXUnit`` values
_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
_EXTRA_HINT = "install the optional extra: pip install 'hyperst[slides]' (OpenSlide), or pip install tiffslide"


# --------------------------------------------------------------------------------------------- pixel size
def _tiff_pixel_size(page: Any) -> float | None:
    """µm per pixel from the TIFF resolution tags of ``page`` (``None`` when absent or without a unit)."""
    tags = page.tags
    xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    value = xres.value
    try:
        per_unit = float(value[0]) / float(value[1]) if isinstance(value, tuple) else float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))  # 2: inch, 3: centimetre; 1: no unit
    if um_per_unit is None or not np.isfinite(per_unit) or per_unit <= 0:
        return None
    return um_per_unit / per_unit


def _aperio_mpp(description: str | None) -> float | None:
    """``MPP`` (µm per pixel of the baseline image) of an Aperio ImageDescription."""
    if not description or not description.startswith("Aperio"):
        return None
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    return positive_float(match.group(1)) if match else None


def _ome_pixel_size(xml: str | None, index: int) -> float | None:
    """``PhysicalSizeX`` (converted to µm) of image ``index`` of an OME-XML document."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    el = pixels[min(index, len(pixels) - 1)]
    size = positive_float(el.get("PhysicalSizeX"))
    factor = _OME_UNITS.get(el.get("PhysicalSizeXUnit", "µm"))
    return None if size is None or factor is None else size * factor


# --------------------------------------------------------------------------------------------- tifffile
def _level_coords(n: int, full: int) -> np.ndarray:
    """Pixel-centre coordinates of a level with ``n`` pixels along an axis of ``full`` level-0 pixels."""
    return np.linspace(0.0, full, n + 1)[:-1] + full / n / 2


def _as_cyx(level: Any, file: Path, axes: str) -> Any:
    """Turn a dask level ``(…, y, x, s)`` into ``(c=3, y, x)`` uint8, dropping an alpha channel."""
    while level.ndim > 3 and level.shape[0] == 1:
        level = level[0]
    if level.ndim != 3 or level.shape[-1] not in (3, 4):
        raise ValueError(
            f"{file} holds an image of shape {tuple(level.shape)} (axes {axes!r}); hyperst needs an RGB H&E image "
            "(y, x, 3 samples per pixel)."
        )
    if level.dtype != np.uint8:
        raise ValueError(f"{file} holds {level.dtype} pixels; hyperst needs 8-bit RGB (uint8).")
    return level[..., :3].transpose(2, 0, 1)


def _main_series(tif: Any) -> int:
    """Index of the slide among a TIFF's series: the largest one not named label/macro/thumbnail."""
    candidates = [i for i, s in enumerate(tif.series) if not str(s.name or "").lower().startswith(_ASSOCIATED)]
    if not candidates:
        candidates = list(range(len(tif.series)))

    def area(i: int) -> int:
        shape = tif.series[i].shape
        return int(np.prod([d for d, a in zip(shape, tif.series[i].axes, strict=False) if a in "YX"]))

    return max(candidates, key=lambda i: (area(i), -i))


def _consistent_levels(shapes: list[tuple[int, int]]) -> list[int]:
    """Indices of the levels that downsample level 0: smaller than the previous one, same aspect ratio."""
    h0, w0 = shapes[0]
    keep = [0]
    for i, (h, w) in enumerate(shapes[1:], start=1):
        ph, pw = shapes[keep[-1]]
        same_ratio = abs(h - h0 * w / w0) <= _LEVEL_SLACK_PX + 0.01 * h
        if h < ph and w < pw and same_ratio:
            keep.append(i)
    return keep


def _tifffile_levels(file: Path) -> tuple[list[Any], dict[str, Any]]:
    """Dask ``(3, y, x)`` levels of the slide of a TIFF file and what was found (pixel size, series)."""
    import dask.array as da
    import tifffile
    import zarr

    with tifffile.TiffFile(file) as tif:
        if not tif.series:
            raise ValueError(f"{file} holds no image.")
        index = _main_series(tif)
        series = tif.series[index]
        axes = series.axes
        shapes = [tuple(int(d) for d, a in zip(lv.shape, lv.axes, strict=False) if a in "YX") for lv in series.levels]
        keyframe = series.keyframe
        description = str(getattr(keyframe, "description", "") or "")
        pixel_size, source = _aperio_mpp(description), "Aperio MPP"
        if pixel_size is None and tif.is_ome:
            pixel_size, source = _ome_pixel_size(tif.ome_metadata, index), "OME PhysicalSizeX"
        if pixel_size is None:
            pixel_size, source = _tiff_pixel_size(keyframe), "TIFF resolution tags"
        info = {
            "format": "svs" if tif.is_svs else "ome-tiff" if tif.is_ome else "tiff",
            "series": str(series.name or index),
            "ignored_series": [str(s.name or i) for i, s in enumerate(tif.series) if i != index],
            "pixel_size": pixel_size,
            "pixel_size_source": source if pixel_size is not None else None,
        }
    keep = _consistent_levels([s[:2] for s in shapes])
    if len(keep) < len(shapes):
        logger.warning(f"{file.name}: levels {sorted(set(range(len(shapes))) - set(keep))} of series "
                       f"{info['series']!r} do not downsample level 0 (another aspect ratio or size); ignored.")
    group = zarr.open(tifffile.imread(file, aszarr=True, series=index), mode="r")
    raw = [da.from_zarr(group if len(shapes) == 1 else group[str(i)]) for i in keep]
    return [_as_cyx(level, file, axes) for level in raw], info


# --------------------------------------------------------------------------------------------- OpenSlide
@lru_cache(maxsize=8)
def _open_slide(path: str, module: str) -> Any:
    import importlib

    mod = importlib.import_module(module)
    return mod.OpenSlide(path) if module == "openslide" else mod.TiffSlide(path)


def _slide_module() -> str:
    import importlib.util

    for module in ("openslide", "tiffslide"):
        if importlib.util.find_spec(module) is not None:
            return module
    raise ImportError(f"none of openslide, tiffslide is installed; {_EXTRA_HINT}")


def _openslide_levels(file: Path, chunk: int) -> tuple[list[Any], dict[str, Any]]:
    """Dask ``(3, y, x)`` levels read tile by tile through an OpenSlide-like API (openslide or tiffslide)."""
    import dask.array as da

    module = _slide_module()
    slide = _open_slide(str(file), module)
    props = dict(slide.properties)
    pixel_size = positive_float(props.get(f"{module}.mpp-x") or props.get("openslide.mpp-x"))
    levels = []
    keep = _consistent_levels([(int(h), int(w)) for w, h in slide.level_dimensions])
    for lv in keep:
        w, h = (int(v) for v in slide.level_dimensions[lv])
        down = float(slide.level_downsamples[lv])

        def block(block_info: Any = None, lv: int = lv, down: float = down) -> np.ndarray:
            (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
            region = _open_slide(str(file), module).read_region(
                (round(x0 * down), round(y0 * down)), lv, (x1 - x0, y1 - y0)
            )
            return np.moveaxis(np.asarray(region.convert("RGB"), dtype=np.uint8), -1, 0)

        chunks = ((3,), da.core.normalize_chunks(chunk, (h,))[0], da.core.normalize_chunks(chunk, (w,))[0])
        levels.append(da.map_blocks(block, dtype=np.uint8, chunks=chunks))
    info = {
        "format": str(props.get(f"{module}.vendor") or props.get("openslide.vendor") or module),
        "series": "level 0",
        "ignored_series": sorted(getattr(slide, "associated_images", {}) or {}),
        "pixel_size": pixel_size,
        "pixel_size_source": f"{module}.mpp-x" if pixel_size is not None else None,
        "backend": module,
    }
    return levels, info


# --------------------------------------------------------------------------------------------- element
def _open_levels(file: Path, backend: str, chunk: int) -> tuple[list[Any], dict[str, Any]]:
    import tifffile

    if backend == "openslide":
        return _openslide_levels(file, chunk)
    try:
        levels, info = _tifffile_levels(file)
        return levels, {**info, "backend": "tifffile"}
    except tifffile.TiffFileError as err:
        if backend == "tifffile":
            raise ValueError(f"{file} is not a TIFF file tifffile can read ({err}); try `backend='auto'`.") from err
        try:
            return _openslide_levels(file, chunk)
        except ImportError as imp:
            raise ValueError(
                f"{file} is not a TIFF-based slide tifffile can read ({err}); to read other scanner formats, "
                f"{_EXTRA_HINT}."
            ) from imp


def _wsi_element(file: Path, *, coordinate_system: str, multiscale: bool, chunks: Any,
                 backend: str) -> tuple[Any, dict[str, Any]]:
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation
    from xarray import DataArray, Dataset, DataTree

    if not file.is_file():
        raise FileNotFoundError(f"Whole-slide image {str(file)!r} does not exist.")
    if backend not in ("auto", "tifffile", "openslide"):
        raise ValueError(f"`backend={backend!r}` must be 'auto', 'tifffile' or 'openslide'.")
    chunks_ = normalise_chunks(chunks)
    levels, info = _open_levels(file, backend, 1024 if chunks_ is None else chunks_[1])
    if chunks_ is not None:
        levels = [level.rechunk((3, chunks_[1], chunks_[2])) for level in levels]
    height, width = int(levels[0].shape[1]), int(levels[0].shape[2])
    info["file_levels"] = [[int(lv.shape[1]), int(lv.shape[2])] for lv in levels]
    transformations = {coordinate_system: Identity()}
    if not multiscale or len(levels) == 1:
        n_extra = 0
        if multiscale:
            n_extra = int(np.clip(np.floor(np.log2(min(height, width) / _MIN_LEVEL_SIZE)), 0, _MAX_EXTRA_LEVELS))
            logger.info(f"{file.name}: no pyramid in the file; building {n_extra} downscaled level(s) lazily")
        element = Image2DModel.parse(
            levels[0], dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=transformations,
            scale_factors=[2] * n_extra if n_extra else None,
        )
        return element, info
    tree = DataTree.from_dict({
        f"scale{i}": Dataset({"image": DataArray(
            level, dims=("c", "y", "x"),
            coords={"c": ["r", "g", "b"], "y": _level_coords(int(level.shape[1]), height),
                    "x": _level_coords(int(level.shape[2]), width)},
        )})
        for i, level in enumerate(levels)
    })
    set_transformation(tree, transformations, set_all=True)
    Image2DModel().validate(tree)
    return tree, info


def read_wsi(
    file: str | Path,
    *,
    coordinate_system: str,
    multiscale: bool = True,
    chunks: int | tuple[int, int, int] | None = 1024,
    backend: Literal["auto", "tifffile", "openslide"] = "auto",
) -> tuple[Any, float | None]:
    """Open a (pyramidal) whole-slide image lazily as a spatialdata RGB image element.

    The slide is the largest image of the file that is not a label, macro or thumbnail image (tifffile's series;
    for an Aperio ``.svs`` the ``Baseline`` series). Every pyramid level stored with it (SubIFDs or
    reduced-resolution pages) that downsamples level 0 (smaller, same aspect ratio) becomes one level of a
    multiscale :class:`xarray.DataTree` (``scale0`` = full resolution), backed by a dask array that decodes tiles
    only when used. Level ``i`` is related to level 0 by the ratio of their shapes.

    The pixel size is read from the file: Aperio ``MPP`` in the ImageDescription, else OME ``PhysicalSizeX``
    (with its unit), else the TIFF resolution tags (``XResolution`` with an inch or centimetre unit), else, for
    OpenSlide-read files, ``openslide.mpp-x``.

    Parameters
    ----------
    file
        The slide file (``.svs``, ``.tif``/``.tiff``, ``.ome.tif``, ``.ndpi``, ...).
    coordinate_system
        Name of the coordinate system the image is registered to (``Identity``: level-0 pixels).
    multiscale
        If ``True``, return a :class:`xarray.DataTree` with the file's levels (levels downscaled by 2 are built
        lazily when the file has no pyramid); if ``False``, a :class:`xarray.DataArray` of level 0 only.
    chunks
        Dask chunk size in pixels per side (or a ``(c, y, x)`` tuple); ``None`` keeps the TIFF tiles as chunks.
    backend
        ``"tifffile"``, ``"openslide"`` (openslide, else tiffslide; the optional extra ``hyperst[slides]``) or
        ``"auto"``: tifffile, and OpenSlide only for files tifffile cannot read.

    Returns
    -------
    The image element and the pixel size in µm per level-0 pixel (``None`` when the file does not record one).

    Raises
    ------
    FileNotFoundError
        If ``file`` does not exist.
    ValueError
        If the file is not an 8-bit RGB(A) image, or not a TIFF and OpenSlide is not installed.
    """
    element, info = _wsi_element(Path(file), coordinate_system=coordinate_system, multiscale=multiscale,
                                 chunks=chunks, backend=backend)
    return element, info["pixel_size"]


def read_slide(
    file: str | Path,
    *,
    sample: str | None = None,
    pixel_size: float | None = None,
    multiscale: bool = True,
    chunks: int | tuple[int, int, int] | None = 1024,
    backend: Literal["auto", "tifffile", "openslide"] = "auto",
) -> SpatialData:
    """Read a scanner slide (``.svs``, pyramidal or OME TIFF, ...) into a SpatialData for H&E-only prediction.

    The result holds one image ``f"{sample}_image"`` (:func:`read_wsi`: lazy, multiscale with the file's own
    pyramid, in the coordinate system ``sample`` of level-0 pixels) and records what was read in
    ``sdata.attrs["hyperst"]["slide"][sample]``: the file, its format, the series read and those ignored
    (label, macro, thumbnail), the level shapes, and the pixel size (µm per level-0 pixel) with its source.
    Pass that pixel size to :func:`hyperst.tl.predict` or :func:`hyperst.pp.grid_spots`.

    Parameters
    ----------
    file
        The slide file.
    sample
        Sample name (element names, coordinate system); default: the file name without its suffixes.
    pixel_size
        µm per level-0 pixel. Default: the value the file records (Aperio ``MPP``, OME ``PhysicalSizeX``, TIFF
        resolution tags, OpenSlide ``mpp-x``); needed when it records none. A value that contradicts the file
        by more than 10 % is used, with a warning.
    multiscale, chunks, backend
        See :func:`read_wsi`.

    Returns
    -------
    A SpatialData with the slide's image; pixels stay on disk until used.

    Raises
    ------
    FileNotFoundError
        If ``file`` does not exist.
    ValueError
        If the file records no pixel size and ``pixel_size`` is not given, ``pixel_size`` is not a positive
        number, or the file is not an 8-bit RGB slide (see :func:`read_wsi`).
    """
    from spatialdata import SpatialData

    file = Path(file).expanduser()
    if pixel_size is not None and positive_float(pixel_size) is None:
        raise ValueError(f"`pixel_size` must be a positive number of µm per pixel, got {pixel_size!r}.")
    if sample is None:  # the file name without its suffixes, in the characters spatialdata allows in names
        sample = re.sub(r"[^\w.-]", "_", file.name.split(".")[0]) or "slide"
    if not isinstance(sample, str) or not sample:
        raise TypeError(f"`sample` must be a non-empty string, got {sample!r}.")
    element, info = _wsi_element(file, coordinate_system=sample, multiscale=multiscale, chunks=chunks,
                                 backend=backend)
    found = info["pixel_size"]
    if pixel_size is None:
        if found is None:
            raise ValueError(
                f"{file} records no pixel size (no Aperio MPP, OME PhysicalSizeX or TIFF resolution): pass "
                "`pixel_size=` (µm per level-0 pixel, e.g. 0.5 for a 20x scan, 0.25 for 40x)."
            )
        px, source = float(found), info["pixel_size_source"]
    else:
        px, source = float(pixel_size), "argument"
        if found is not None and abs(px - found) > _PIXEL_SIZE_TOLERANCE * found:
            logger.warning(f"{file.name}: pixel_size={px:.4g} µm/px contradicts the file's {found:.4g} µm/px "
                           f"({info['pixel_size_source']}); using pixel_size={px:.4g}.")
    record = {"file": str(file), **info, "pixel_size": px, "pixel_size_source": source}
    h, w = record["file_levels"][0]
    logger.info(f"{sample}: {record['format']} slide {w}×{h} px, {len(record['file_levels'])} level(s) in the file, "
                f"{px:.4g} µm/px ({source}); ignored: {record['ignored_series'] or 'nothing'}")
    sdata = SpatialData(images={image_key(sample): element})
    sdata.attrs[Key.UNS] = {Key.ATTRS_SLIDE: {sample: record}}
    return sdata
