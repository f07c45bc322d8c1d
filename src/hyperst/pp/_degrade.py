"""Domain-shifted copies of a slide: coarser scans, JPEG exports, stain batches, painted backgrounds.

:func:`degrade` rebuilds one image element of a SpatialData the way real slides differ from training slides
and returns a new SpatialData whose spots still land on the same tissue. The image is processed tile by
tile from its full-resolution level (:class:`hyperst.pp.ImagePyramid`), so working memory does not grow
with the slide; only the result is held in memory.
"""

from __future__ import annotations

import copy as _copy
import io
from collections.abc import Mapping
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.pp._pyramid import ImagePyramid, image_levels
from hyperst.pp._spots import resolve_spots
from hyperst.pp._tissue import tissue_mask

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

__all__ = ["degrade"]

#: ``image.attrs["hyperst"][ATTRS_DEGRADE]``: the record of what :func:`degrade` did to an image
ATTRS_DEGRADE = Key.ATTRS_DEGRADE
#: the order in which :func:`degrade` applies its steps
ORDER: tuple[str, ...] = ("stain", "pixel_size", "background", "jpeg_quality")
#: fill value of a painted background
_FILL = {"black": 0, "white": 255}
#: a downsampling tile reads at most about this many level-0 pixels per side (float32 working arrays)
_MAX_READ_SIDE = 2048
#: output tile side without downsampling (a multiple of 16: JPEG's 4:2:0 blocks do not straddle tiles)
_TILE = 1024
#: skimage's floor of the RGB intensities before the log (``rgb2hed``)
_LOG_FLOOR = 1e-6
#: pixels sampled for the per-slide standard deviation of the stain channels
_STD_SAMPLES = 1 << 20


# ----------------------------------------------------------------------------------------------- checks
def _check_image_key(sdata: SpatialData, image_key: str | None) -> str:
    if len(sdata.images) == 0:
        raise ValueError("`sdata` has no image element: there is no slide to degrade (add it to `sdata.images`).")
    if image_key is None:
        if len(sdata.images) > 1:
            raise ValueError(f"`sdata` has several images {sorted(sdata.images)}: pass `image_key` (the H&E image).")
        return next(iter(sdata.images.keys()))
    if image_key not in sdata.images:
        raise ValueError(f"`image_key={image_key!r}` is not an image of `sdata`; images: {sorted(sdata.images)}.")
    return image_key


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    return float(value)


def _check_jpeg_quality(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`jpeg_quality` must be an integer from 1 to 95, got {value!r}.")
    if not 1 <= int(value) <= 95:
        raise ValueError(f"`jpeg_quality={value}` must lie in 1–95 (Pillow's useful range; 95 is near lossless).")
    return int(value)


def _check_background(value: Any) -> str | None:
    if value is not None and value not in _FILL:
        raise ValueError(f"`background={value!r}` must be 'black', 'white' or None.")
    return value


def _triple(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64) if not isinstance(value, str) else np.zeros(0)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"`stain[{name!r}]` must be three finite numbers (H, E, D), got {value!r}.")
    return arr


def _check_stain(stain: Any, seed: int) -> tuple[np.ndarray, np.ndarray, float | None] | None:
    """``(scale, shift, strength)`` of the stain shift (shift in channel standard deviations), or ``None``."""
    if stain is None:
        return None
    if isinstance(stain, Mapping):
        unknown = set(stain) - {"scale", "shift"}
        if unknown:
            raise ValueError(f"`stain` has unknown keys {sorted(map(str, unknown))}; expected 'scale' and/or 'shift'.")
        scale = _triple("scale", stain.get("scale", (1.0, 1.0, 1.0)))
        shift = _triple("shift", stain.get("shift", (0.0, 0.0, 0.0)))
        if np.any(scale <= 0):
            raise ValueError(f"`stain['scale']` must be positive (a factor per stain), got {tuple(scale)}.")
        return scale, shift, None
    strength = _check_number("stain", stain)
    if not 0 <= strength < 1:
        raise ValueError(
            f"`stain={stain!r}` must be a strength in [0, 1) (e.g. 0.05–0.3), or a dict "
            "{'scale': (h, e, d), 'shift': (h, e, d)}."
        )
    rng = np.random.default_rng(seed)
    scale = 1.0 + rng.uniform(-strength, strength, size=3)
    shift = rng.uniform(-strength, strength, size=3)
    return scale, shift, strength


# ----------------------------------------------------------------------------------------------- pixel size
def _pixel_size_entries(sdata: SpatialData, image_key: str) -> list[tuple[str, str, float]]:
    """``(table, sample, µm/px)`` of the ``uns["hyperst"]["spots"]`` entries that describe ``image_key``."""
    out = []
    for tkey, table in sdata.tables.items():
        meta = table.uns.get(Key.UNS, {})
        meta = meta.get(Key.UNS_SPOTS, {}) if isinstance(meta, Mapping) else {}
        if not isinstance(meta, Mapping):
            continue
        for sample, entry in meta.items():
            if not isinstance(entry, Mapping) or not entry.get("pixel_size"):
                continue
            if entry.get("image_key", f"{sample}_image") == image_key:  # the rule of hst.pp.resolve_spots
                out.append((str(tkey), str(sample), float(entry["pixel_size"])))
    return out


def _source_pixel_size(sdata: SpatialData, image_key: str, argument: str) -> tuple[float, str]:
    """µm per level-0 pixel of the image, and where it came from (``"metadata"`` or resolve_spots' source)."""
    from spatialdata.transformations import get_transformation

    entries = _pixel_size_entries(sdata, image_key)
    if entries:
        sizes = {round(px, 9) for _, _, px in entries}
        if len(sizes) > 1:
            raise ValueError(
                f"The tables give different pixel sizes for image `{image_key}`: {entries}; make them agree "
                "(`table.uns['hyperst']['spots'][sample]['pixel_size']`)."
            )
        return entries[0][2], "metadata"
    # no reader metadata: the pixel size hst.pp would resolve from the spots (spot diameter or grid pitch)
    systems = set(get_transformation(sdata.images[image_key], get_all=True))
    candidates = [
        k for k, el in {**dict(sdata.shapes.items()), **dict(sdata.points.items())}.items()
        if systems & set(get_transformation(el, get_all=True))
    ]
    error = "no spots share its coordinate system"
    for skey in candidates:
        try:
            spots = resolve_spots(sdata, image_key=image_key, shapes_key=skey)
        except ValueError as exc:
            error = str(exc)
            continue
        return spots[0].pixel_size, spots[0].pixel_size_source
    raise ValueError(
        f"`{argument}` needs the pixel size of image `{image_key}`, which is unknown ({error}). Record it as "
        f"hyperst's readers do: `sdata.tables[...].uns['hyperst']['spots'][sample]['pixel_size'] = µm per pixel` "
        f"(with 'image_key': {image_key!r} unless the image is named f'{{sample}}_image')."
    )


# ----------------------------------------------------------------------------------------------- pixel ops
def _od_lut() -> np.ndarray:
    """Optical density of each uint8 intensity, as :func:`skimage.color.rgb2hed` computes it."""
    v = np.maximum(np.arange(256, dtype=np.float64) / 255.0, _LOG_FLOOR)
    return (np.log(v) / np.log(_LOG_FLOOR)).astype(np.float32)


def _stain_std(pyr: ImagePyramid) -> np.ndarray:
    """Standard deviation of the H, E, D channels over a regular sample of at most ~1M level-0 pixels."""
    from skimage.color import hed_from_rgb

    h, w = pyr.shape0
    step = max(1, int(np.ceil(np.sqrt(h * w / _STD_SAMPLES))))
    data = pyr.levels[0].data
    sample = data[:3, ::step, ::step] if pyr.n_channels >= 3 else data[:1, ::step, ::step]
    sample = np.asarray(sample.compute() if hasattr(sample, "compute") else sample)
    if sample.shape[0] == 1:
        sample = np.repeat(sample, 3, axis=0)
    od = _od_lut()[np.moveaxis(sample, 0, -1).reshape(-1, 3)]
    return (od @ hed_from_rgb.astype(np.float32)).std(axis=0).astype(np.float64)


class _Stain:
    """The HED shift ``hed' = scale · hed + bias`` in skimage's colour deconvolution, without its clamp at 0."""

    def __init__(self, scale: np.ndarray, bias: np.ndarray) -> None:
        from skimage.color import hed_from_rgb, rgb_from_hed

        self.lut = _od_lut()
        # od' = (od @ hed_from_rgb · scale + bias) @ rgb_from_hed
        self.matrix = (hed_from_rgb @ np.diag(scale) @ rgb_from_hed).astype(np.float32)
        self.offset = (bias @ rgb_from_hed).astype(np.float32)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """``(h, w, 3)`` uint8 → shifted ``(h, w, 3)`` float32 intensities in [0, 255] (not rounded)."""
        od = self.lut[rgb] @ self.matrix
        od += self.offset
        od *= np.float32(np.log(_LOG_FLOOR))
        np.exp(od, out=od)
        np.clip(od, 0.0, 1.0, out=od)
        od *= np.float32(255.0)
        return od


def _area_weights(o0: int, o1: int, i0: int, i1: int, factor: float, n_in: int) -> Any:
    """Sparse ``(o1 - o0, i1 - i0)`` area-averaging matrix: output pixel ``j`` covers ``[j·f, (j+1)·f)``.

    Each weight is the overlap of an input pixel with the output pixel's footprint, normalised per output
    pixel (the last one may reach past the image: it averages the part inside).
    """
    from scipy import sparse

    j = np.arange(o0, o1)
    lo = j * factor
    hi = np.minimum((j + 1) * factor, n_in)
    rows, cols, vals = [], [], []
    first = np.floor(lo).astype(np.int64)
    for k in range(int(np.ceil(factor)) + 1):
        i = first + k
        w = np.minimum(i + 1, hi) - np.maximum(i, lo)
        keep = (w > 1e-12) & (i < i1)
        rows.append(j[keep] - o0)
        cols.append(i[keep] - i0)
        vals.append(w[keep])
    rows_, cols_, vals_ = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    vals_ = vals_ / np.bincount(rows_, weights=vals_, minlength=o1 - o0)[rows_]
    return sparse.csr_matrix((vals_.astype(np.float32), (rows_, cols_)), shape=(o1 - o0, i1 - i0))


def _downsample(x: np.ndarray, wy: Any, wx: Any) -> np.ndarray:
    """Area average of ``(h, w, 3)`` pixels: ``wy @ x @ wx.T`` per channel → ``(oh, ow, 3)`` float32."""
    h, w, _ = x.shape
    oh, ow = wy.shape[0], wx.shape[0]
    rows = wy @ x.reshape(h, w * 3).astype(np.float32, copy=False)  # (oh, w·3)
    cols = wx @ rows.reshape(oh, w, 3).transpose(1, 0, 2).reshape(w, oh * 3)  # (ow, oh·3)
    return np.ascontiguousarray(cols.reshape(ow, oh, 3).transpose(1, 0, 2), dtype=np.float32)


def _jpeg(tile: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode ``(h, w, 3)`` uint8 through Pillow's JPEG (4:2:0 chroma, its default)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """A C-ordered uint8 copy (rounded and clipped when float): never a view of the input's pixels."""
    if x.dtype == np.uint8:
        return np.array(x, order="C", copy=True)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8, order="C")


def _paint(tile: np.ndarray, background: np.ndarray, fill: int) -> None:
    """Set the ``background`` pixels of ``(h, w, 3)`` uint8 ``tile`` to ``fill`` (0 or 255), in place."""
    if fill == 0:
        tile *= (~background)[..., None]
    else:
        np.maximum(tile, (background.astype(np.uint8) * np.uint8(255))[..., None], out=tile)


def _render(
    pyr: ImagePyramid,
    *,
    factor: float,
    out_shape: tuple[int, int],
    stain: _Stain | None,
    mask: tuple[np.ndarray, float] | None,
    fill: int,
    jpeg_quality: int | None,
) -> tuple[np.ndarray, float]:
    """The degraded ``(h, w, 3)`` uint8 image, tile by tile; and the painted share of its pixels."""
    h0, w0 = pyr.shape0
    ho, wo = out_shape
    resample = factor != 1.0
    tile = max(16, int(_MAX_READ_SIDE / factor) // 16 * 16) if resample else _TILE
    out = np.empty((ho, wo, 3), dtype=np.uint8)
    painted = 0
    for oy0 in range(0, ho, tile):
        oy1 = min(oy0 + tile, ho)
        iy0, iy1 = int(np.floor(oy0 * factor)), min(h0, int(np.ceil(oy1 * factor - 1e-9)))
        wy = _area_weights(oy0, oy1, iy0, iy1, factor, h0) if resample else None
        for ox0 in range(0, wo, tile):
            ox1 = min(ox0 + tile, wo)
            ix0, ix1 = int(np.floor(ox0 * factor)), min(w0, int(np.ceil(ox1 * factor - 1e-9)))
            block = np.moveaxis(pyr.read_region(0, iy0, iy1, ix0, ix1), 0, -1)
            x: np.ndarray = stain(block) if stain is not None else block
            if resample:
                x = _downsample(x, wy, _area_weights(ox0, ox1, ix0, ix1, factor, w0))
            t = _to_uint8(x)
            if mask is not None:
                m, scale = mask
                my = np.minimum(((np.arange(oy0, oy1) + 0.5) * factor / scale).astype(np.int64), m.shape[0] - 1)
                mx = np.minimum(((np.arange(ox0, ox1) + 0.5) * factor / scale).astype(np.int64), m.shape[1] - 1)
                background = ~m[np.ix_(my, mx)]
                _paint(t, background, fill)
                painted += int(background.sum())
            if jpeg_quality is not None:
                t = _jpeg(t, jpeg_quality)
            out[oy0:oy1, ox0:ox1] = t
    return out, painted / float(ho * wo)


# ----------------------------------------------------------------------------------------------- element
def _scale_factors(image: Any, out_shape: tuple[int, int]) -> list[int] | None:
    """Integer factors between the input's pyramid levels, kept while the degraded image stays ≥ 16 px."""
    import xarray as xr

    if not isinstance(image, xr.DataTree):
        return None
    shapes = [(int(a.sizes["y"]), int(a.sizes["x"])) for a in image_levels(image)]
    factors, side = [], min(out_shape)
    for (h_prev, _), (h, _) in pairwise(shapes):
        f = max(2, round(h_prev / h))
        if side // f < 16:
            break
        factors.append(f)
        side //= f
    return factors or None


def _element(image: Any, rgb: np.ndarray, factor: float, record: dict[str, Any]) -> Any:
    """The degraded image as a spatialdata element with the input's transformations, rescaled."""
    import dask.array as da
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale, Sequence, get_transformation

    transforms = {}
    for cs, t in get_transformation(image, get_all=True).items():
        t = _copy.deepcopy(t)
        if factor != 1.0:
            scale = Scale([factor, factor], axes=("y", "x"))
            t = scale if isinstance(t, Identity) else Sequence([scale, t])
        transforms[cs] = t
    lvl0 = image_levels(image)[0]
    coords = [str(c) for c in lvl0.coords["c"].values] if "c" in lvl0.coords and lvl0.sizes["c"] == 3 else None
    chunk = _TILE  # the input's chunk side when it is dask-backed (readers use 1024)
    if isinstance(lvl0.data, da.Array):
        dims = [str(d) for d in lvl0.dims]
        chunk = max(64, int(min(lvl0.data.chunksize[dims.index("y")], lvl0.data.chunksize[dims.index("x")])))
    data = da.from_array(rgb, chunks=(chunk, chunk, 3), name=False).transpose(2, 0, 1)  # no hash of the pixels
    element = Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=coords or ["r", "g", "b"],
        transformations=transforms,
        scale_factors=_scale_factors(image, rgb.shape[:2]),
        chunks=(3, chunk, chunk),
    )
    previous = image.attrs.get(Key.UNS, {}) if isinstance(getattr(image, "attrs", None), Mapping) else {}
    attrs = _copy.deepcopy(dict(previous)) if isinstance(previous, Mapping) else {}
    if ATTRS_DEGRADE in attrs:
        record = {**record, "previous": attrs[ATTRS_DEGRADE]}
    attrs[ATTRS_DEGRADE] = record
    element.attrs[Key.UNS] = attrs
    if isinstance(element, xr.DataTree):  # get_transformation reads level 0; keep the record visible there too
        image_levels(element)[0].attrs[Key.UNS] = _copy.deepcopy(attrs)
    return element


def _copied(sdata: SpatialData, image_key: str, element: Any, copy: bool, tables_to_copy: set[str]) -> SpatialData:
    from spatialdata import SpatialData
    from spatialdata import deepcopy as sd_deepcopy

    def take(el: Any) -> Any:
        return sd_deepcopy(el) if copy else el

    images = {k: (element if k == image_key else take(v)) for k, v in sdata.images.items()}
    tables = {k: (v.copy() if copy or k in tables_to_copy else v) for k, v in sdata.tables.items()}
    return SpatialData(
        images=images,
        labels={k: take(v) for k, v in sdata.labels.items()},
        points={k: take(v) for k, v in sdata.points.items()},
        shapes={k: take(v) for k, v in sdata.shapes.items()},
        tables=tables,
        attrs=_copy.deepcopy(dict(sdata.attrs)) if getattr(sdata, "attrs", None) else None,
    )


# ----------------------------------------------------------------------------------------------- public
def degrade(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    pixel_size: float | None = None,
    jpeg_quality: int | None = None,
    stain: float | Mapping[str, Any] | None = None,
    background: Literal["black", "white"] | None = None,
    seed: int = 0,
    copy: bool = True,
) -> SpatialData:
    """A domain-shifted copy of a slide: coarser scan, stain batch, painted background, JPEG export.

    The steps are applied in the order of the physical chain, whatever the order of the arguments:

    1. ``stain`` (the tissue's staining): a shift in the haematoxylin–eosin–DAB space of
       :func:`skimage.color.rgb2hed`, ``hed' = scale · hed + shift · std`` per channel, where ``std`` is the
       channel's standard deviation over the slide; converted back as :func:`skimage.color.hed2rgb` does,
       clipped to [0, 255]. The conversion uses skimage's matrices without ``rgb2hed``'s clamp of negative
       stain values at 0, so a zero shift leaves every pixel unchanged.
    2. ``pixel_size`` (the scanner's resolution): the image is resampled to ``pixel_size`` µm per pixel by
       exact area averaging (each new pixel is the mean of the level-0 area it covers, the anti-aliasing of
       a coarser sensor), and the image's transformations gain a :class:`~spatialdata.transformations.Scale`
       by ``pixel_size / old pixel size`` to every coordinate system, so the spots (left as they are) still
       land on the same tissue; ``uns["hyperst"]["spots"][sample]["pixel_size"]`` of every table entry that
       describes the image becomes ``pixel_size``. :func:`hyperst.pp.crops` then resamples windows back to
       the model's crop size by its normal path.
    3. ``background`` (an export that blanks the glass): pixels outside the tissue are set to 0 (``"black"``)
       or 255 (``"white"``). Tissue is :func:`hyperst.pp.tissue_mask` of the *input* slide (hst.pp's one
       tissue definition); an output pixel is background when the mask pixel under its centre is. Tissue
       pixels are not changed by this step.
    4. ``jpeg_quality`` (a lossy export): JPEG encoding and decoding through Pillow (4:2:0 chroma), in tiles
       of at most 1024 px whose sides are multiples of 16 (JPEG's blocks), so memory stays bounded.

    The input is never modified. The result holds the same elements; the degraded image replaces the image
    under the same key (single-scale, or re-pyramided by the input's level factors when the input is
    multiscale), with the record ``image.attrs["hyperst"]["degrade"]`` (steps, pixel sizes, shapes, stain
    scale/shift/bias, painted fraction, JPEG quality, seed; an earlier record is kept under ``"previous"``).
    The record lives in memory only (spatialdata does not write free-form image attrs to zarr); the new
    pixel size is in the tables, so it survives ``sdata.write``.

    Parameters
    ----------
    sdata
        SpatialData with the (uint8 RGB) H&E image.
    image_key
        Image to degrade; inferred when ``sdata`` has one image.
    pixel_size
        µm per pixel of the degraded image, at least the slide's own (e.g. ``3.2`` for a 0.69 µm/px slide).
        Needs the slide's pixel size: the reader's ``uns["hyperst"]["spots"]`` entry, else the one
        :func:`hyperst.pp.resolve_spots` derives from the spots.
    jpeg_quality
        JPEG quality 1–95 of the re-compression (e.g. 10 for a harsh export).
    stain
        A strength ``s`` (0 ≤ s < 1, e.g. 0.05–0.3): per channel (H, E, D) a random ``scale ~ 1 + U(-s, s)``
        and ``shift ~ U(-s, s)`` drawn from ``seed``; or a dict ``{"scale": (h, e, d), "shift": (h, e, d)}``
        for an explicit shift (``scale`` positive, default 1; ``shift`` in channel standard deviations,
        default 0).
    background
        ``"black"``, ``"white"`` or ``None`` (leave the background as it is).
    seed
        Seed of the random stain shift; the same seed gives the same image.
    copy
        ``True``: every other element is a deep copy (:func:`spatialdata.deepcopy`, which loads dask-backed
        elements into memory). ``False``: the result shares the elements it does not change with ``sdata``
        (tables whose pixel size entry changes are still copied).

    Returns
    -------
    The new SpatialData; the degraded image is uint8 RGB (an alpha channel is dropped, grey becomes RGB).

    Raises
    ------
    ValueError
        No image, several images without ``image_key``, an unknown image, a ``pixel_size`` that is not
        positive or finer than the slide's (or a slide without a known pixel size), a JPEG quality outside
        1–95, a stain strength outside [0, 1) or a malformed stain dict, an unknown ``background``, or an
        image that is not uint8 RGB.
    TypeError
        Arguments of the wrong type.
    """
    from spatialdata import SpatialData

    if not isinstance(sdata, SpatialData):
        raise TypeError(f"`sdata` must be a SpatialData, got {type(sdata).__name__}.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"`seed` must be an integer, got {seed!r}.")
    image_key = _check_image_key(sdata, image_key)
    target = None if pixel_size is None else _check_number("pixel_size", pixel_size)
    if target is not None and not (np.isfinite(target) and target > 0):
        raise ValueError(f"`pixel_size={pixel_size!r}` must be a positive number of µm per pixel.")
    quality = _check_jpeg_quality(jpeg_quality)
    shift = _check_stain(stain, int(seed))
    fill_name = _check_background(background)

    image = sdata.images[image_key]
    pyr = ImagePyramid(image)
    h0, w0 = pyr.shape0
    source_px, source = (None, None)
    if target is not None or fill_name is not None:
        source_px, source = _source_pixel_size(sdata, image_key, "pixel_size" if target is not None else "background")
    factor = 1.0
    if target is not None:
        assert source_px is not None
        if target < source_px * (1 - 1e-9):
            raise ValueError(
                f"`pixel_size={target:g}` µm is finer than the slide's own {source_px:.4g} µm per pixel: degrade "
                "can only make a slide coarser (pass a value ≥ the slide's pixel size)."
            )
        factor = max(1.0, target / source_px)
    out_shape = (int(np.ceil(h0 / factor - 1e-9)), int(np.ceil(w0 / factor - 1e-9)))

    record: dict[str, Any] = {"order": [], "seed": int(seed), "source_shape": [h0, w0], "shape": list(out_shape)}
    stain_op = None
    if shift is not None:
        scale, shift_sd, strength = shift
        std = _stain_std(pyr)
        bias = shift_sd * std
        stain_op = _Stain(scale, bias)
        record["order"].append("stain")
        record["stain"] = {
            "strength": strength, "scale": scale.tolist(), "shift": shift_sd.tolist(), "std": std.tolist(),
            "bias": bias.tolist(), "channels": ["hematoxylin", "eosin", "dab"],
        }
    if target is not None:
        record["order"].append("pixel_size")
    record["source_pixel_size"] = source_px
    record["pixel_size_source"] = source
    record["pixel_size"] = None if source_px is None else source_px * factor
    record["factor"] = factor
    mask = None
    if fill_name is not None:
        assert source_px is not None
        mask = tissue_mask(image, pixel_size=source_px)
        record["order"].append("background")
    if quality is not None:
        record["order"].append("jpeg_quality")
        record["jpeg_quality"] = quality

    rgb, painted = _render(
        pyr, factor=factor, out_shape=out_shape, stain=stain_op, mask=mask,
        fill=_FILL.get(fill_name or "black", 0), jpeg_quality=quality,
    )
    if fill_name is not None:
        assert mask is not None
        record["background"] = {
            "fill": fill_name, "value": _FILL[fill_name], "painted_fraction": painted,
            "mask_pixel_size": float(mask[1] * (source_px or 1.0)),
        }
    element = _element(image, rgb, factor, record)

    entries = _pixel_size_entries(sdata, image_key)
    # image features of the old pixels must not be reused: without their record they are recomputed
    stale = {t for t, _, _ in entries if Key.UNS_FEATURES in sdata.tables[t].uns.get(Key.UNS, {})}
    resized = {t for t, _, _ in entries} if factor != 1.0 else set()
    out = _copied(sdata, image_key, element, copy, stale | resized)
    for tkey, sample, px in entries:
        uns = out.tables[tkey].uns[Key.UNS]  # a copy of the input's (see _copied)
        if factor != 1.0:
            uns[Key.UNS_SPOTS][sample] = {**dict(uns[Key.UNS_SPOTS][sample]), "pixel_size": px * factor}
        if tkey in stale:
            uns.pop(Key.UNS_FEATURES, None)
    logger.info(
        f"degrade `{image_key}`: {' → '.join(record['order']) or 'nothing'}; {w0}×{h0} → {out_shape[1]}×"
        f"{out_shape[0]} px" + (f", {record['pixel_size']:.4g} µm/px" if record["pixel_size"] else "")
    )
    return out
