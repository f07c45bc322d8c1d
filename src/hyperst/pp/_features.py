"""``hst.pp.crops`` and ``hst.pp.image_features``: from SpatialData spots to crops and frozen features."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch

from hyperst._constants import DEFAULT_BACKBONE, Key
from hyperst._logging import logger
from hyperst._utils import centers_hash, release_memory
from hyperst.data._cache import CropCache
from hyperst.pp._backbone import BackboneSpec, extract_features, load_backbone, resolve_backbone_spec
from hyperst.pp._crops import iter_crops
from hyperst.pp._layout import CropGeometry
from hyperst.pp._pyramid import image_fingerprint
from hyperst.pp._spots import SampleSpots, resolve_spots, spot_table
from hyperst.pp._tissue import tissue_fraction, tissue_threshold

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["Extracted", "SampleCrops", "crop_geometry", "crops", "image_features", "slide_features"]


@dataclass
class SampleCrops:
    """Spot and niche crops of one sample: uint8 ``(n, s, s, 3)`` arrays memory-mapped from the on-disk cache.

    Attributes
    ----------
    spots
        The resolved spots (rows follow ``spots.obs_names``).
    geometry
        Crop geometry used.
    spot, niche
        The crops.
    pad_fraction
        Share of each spot window outside the image.
    tissue_fraction
        Share of each spot crop that is stained tissue (:func:`hyperst.pp.tissue_fraction` with the
        slide's :func:`hyperst.pp.tissue_threshold`).
    """

    spots: SampleSpots
    geometry: CropGeometry
    spot: np.ndarray
    niche: np.ndarray
    pad_fraction: np.ndarray
    tissue_fraction: np.ndarray


def crop_geometry(spots: Sequence[SampleSpots], *, out_size: int = 224) -> CropGeometry:
    """The crop geometry of METHOD §1 for resolved spots (one geometry shared by every sample).

    Raises
    ------
    ValueError
        When samples have different spot layouts or sizes (pass an explicit geometry then).
    """
    geoms = {
        CropGeometry.for_layout(
            s.layout if s.layout in ("visium", "st") else "generic",
            spot_diameter=s.spot_diameter,
            pitch=s.pitch,
            out_size=out_size,
        )
        for s in spots
    }
    if len(geoms) > 1:
        raise ValueError(
            f"Samples have different spot geometries {[g.to_dict() for g in geoms]}; pass "
            "`geometry=CropGeometry(spot_size_um=..., niche_size_um=...)` to use one for all of them."
        )
    return geoms.pop()


def _as_geometry(geometry: CropGeometry | Mapping[str, Any] | None, spots: Sequence[SampleSpots]) -> CropGeometry:
    if geometry is None:
        return crop_geometry(spots)
    if isinstance(geometry, CropGeometry):
        return geometry
    return CropGeometry.from_dict(geometry)


def _ensure_table(sdata: SpatialData, table_key: str | None, shapes_key: str | Sequence[str] | None) -> None:
    """Give an H&E + spots object without any table a measurement-free table (documented)."""
    if len(sdata.tables) == 0 and table_key is None:
        key = shapes_key if isinstance(shapes_key, str) else None
        spot_table(sdata, shapes_key=key, table_key=Key.TABLE_NAME)
        logger.info(f"added table {Key.TABLE_NAME!r} annotating the spots (no measurements)")


#: version of the tissue rule stored in cache keys (entries with another rule are recomputed)
_TISSUE_RULE = "otsu-per-slide-1"
#: batches between two hand-backs of freed heap pages to the OS while streaming (:func:`release_memory`)
_TRIM_EVERY = 8


def _slide_threshold(image: Any, s: SampleSpots) -> float:
    """The slide's tissue threshold (:func:`tissue_threshold`; grey images are measured by darkness)."""
    return tissue_threshold(image, pixel_size=s.pixel_size)


def _write_crops(
    image: Any, s: SampleSpots, geometry: CropGeometry, cache: CropCache, *, batch_size: int, progress: bool
) -> None:
    """Cut the spot and niche crops of a sample batch by batch into the staging entry of ``cache``, then commit.

    At most one batch of crops (plus the regions of :func:`iter_crops`) is in memory at a time.
    """
    threshold = _slide_threshold(image, s)
    spot_side, niche_side = geometry.sides_px(s.pixel_size)
    n, size = s.n_spots, geometry.out_size
    pad = np.zeros(n, dtype=np.float32)
    tissue = np.zeros(n, dtype=np.float32)
    try:
        for name, side in (("spot", spot_side), ("niche", niche_side)):
            with cache.writer(name, (n, size, size, 3), np.uint8) as writer:
                for batch in iter_crops(image, s.centers_px, side, out_size=size, batch_size=batch_size,
                                        progress=progress):
                    writer.write(batch.index, batch.crops)
                    if name == "spot":
                        pad[batch.index] = batch.pad_fraction
                        tissue[batch.index] = tissue_fraction(batch.crops, threshold=threshold)
        cache.save(pad=pad, tissue=tissue)  # commits the staged crops with them
    except BaseException:
        cache.clear()
        raise


class _TemporaryEntry:
    """Owns a temporary cache directory; deletes it when the last array mapped from it is garbage collected."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(path), ignore_errors=True)


def _load_temporary(cache: CropCache, owner: _TemporaryEntry) -> dict[str, np.ndarray]:
    arrays = cache.load()
    assert arrays is not None
    for arr in arrays.values():
        arr._hyperst_owner = owner  # type: ignore[attr-defined]  # keeps the directory while the array lives
    return arrays


def crops(
    sdata: SpatialData,
    *,
    geometry: CropGeometry | Mapping[str, Any] | None = None,
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    pixel_size: float | None = None,
    spot_diameter: float | None = None,
    pitch: float | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> list[SampleCrops]:
    """Spot and niche crops of every sample, resized to ``geometry.out_size``.

    Windows are physical (µm): spot side ``max(112 µm, spot diameter)``, niche side covering the
    niche (METHOD §1); read from the pyramid level closest to the target resolution, streamed with
    bounded memory, border windows padded with white (the padded fraction is returned).

    Parameters
    ----------
    sdata
        SpatialData with an H&E image and spots (see :func:`resolve_spots` for the key arguments).
    geometry
        Crop geometry; default :func:`crop_geometry` of the resolved spots.
    image_key, shapes_key, table_key, coordinate_system, pixel_size, spot_diameter, pitch
        Passed to :func:`resolve_spots`.
    cache_dir
        Directory of an on-disk uint8 cache (:class:`hyperst.data.CropCache`) keyed by crop geometry, image,
        spot centres and pixel size: crops found there are not recomputed. Default: a temporary directory,
        deleted when the returned arrays are garbage collected (or at exit).
    batch_size
        Crops per read/resample batch.
    progress
        Show progress bars.

    Returns
    -------
    One :class:`SampleCrops` per sample. Crops are written to disk batch by batch and the arrays are
    memory-mapped read-only from there, so memory does not grow with the number of spots.
    """
    spots = resolve_spots(
        sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key, coordinate_system=coordinate_system,
        pixel_size=pixel_size, spot_diameter=spot_diameter, pitch=pitch,
    )
    geom = _as_geometry(geometry, spots)
    out = []
    for s in spots:
        image = sdata.images[s.image_key]
        key = CropCache.make_key(geom, image_fingerprint(image), s.centers_px, pixel_size=s.pixel_size,
                                 tissue=_TISSUE_RULE)
        if cache_dir is not None:
            cache = CropCache(cache_dir, key)
            arrays = cache.load()
            if arrays is not None:
                logger.info(f"{s.sample}: crops loaded from cache {cache.path}")
            else:
                _write_crops(image, s, geom, cache, batch_size=batch_size, progress=progress)
                arrays = cache.load()
                assert arrays is not None
        else:
            owner = _TemporaryEntry(Path(tempfile.mkdtemp(prefix="hyperst-crops-")))
            cache = CropCache(owner.path, key)
            _write_crops(image, s, geom, cache, batch_size=batch_size, progress=progress)
            arrays = _load_temporary(cache, owner)
        out.append(SampleCrops(s, geom, arrays["spot"], arrays["niche"], arrays["pad"], arrays["tissue"]))
    return out


def _feature_record(
    spec: BackboneSpec, geom: CropGeometry, spots: Sequence[SampleSpots], sdata: SpatialData
) -> dict[str, Any]:
    """What the features depend on: backbone, crop geometry, and per slide the spots, pixel size and image.

    Features are reused only when this record matches, so an edited image (same spots) is featurised again.
    """
    return {
        "backbone": spec.to_dict(),
        "crop_geometry": geom.to_dict(),
        "samples": {s.sample: {"n": s.n_spots, "centers": centers_hash(s.centers_px), "pixel_size": s.pixel_size,
                               "image": image_fingerprint(sdata.images[s.image_key])}
                    for s in spots},
    }


def _same(a: Any, b: Any) -> bool:
    """Whether two records are equal as JSON (numpy arrays and scalars, as read back from h5ad/zarr, as lists)."""
    import json

    def plain(value: Any) -> Any:
        return value.tolist() if hasattr(value, "tolist") else str(value)

    return json.dumps(a, sort_keys=True, default=plain) == json.dumps(b, sort_keys=True, default=plain)


def image_features(
    sdata: SpatialData,
    *,
    backbone: str | BackboneSpec | Mapping[str, Any] | torch.nn.Module = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    allow_download: bool = False,
    random_init: bool = False,
    geometry: CropGeometry | Mapping[str, Any] | None = None,
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    pixel_size: float | None = None,
    spot_diameter: float | None = None,
    pitch: float | None = None,
    batch_size: int | Literal["auto"] = "auto",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    recompute: bool = False,
    compile: bool = False,
    views: Mapping[str, Mapping[str, Any]] | Literal["default"] | None = None,
    progress: bool = True,
) -> AnnData:
    """Frozen backbone features of every spot's spot and niche crop, written to the table.

    Crops are streamed (never all in memory) through the backbone in batches (bf16 autocast on GPU).
    When the table already holds features computed with the same backbone, crop geometry and spots,
    nothing is recomputed (unless ``recompute=True``).

    Parameters
    ----------
    sdata
        SpatialData with an H&E image and spots. A SpatialData without any table gets one annotating
        the spots (``sdata.tables["table"]``, no measurements).
    backbone
        A known name (default ``"efficientnet_lite0_stages"``: EfficientNet-Lite0 with multi-stage features;
        ``"efficientnet_lite0"``, ``"uni"``, …; see :data:`KNOWN_BACKBONES`), a timm model
        name, a :class:`BackboneSpec`, or a module from :func:`load_backbone` (e.g. LoRA fine-tuned).
    weights
        Local weights file (overrides the spec's). Hub ids only with ``allow_download=True``.
    allow_download
        Allow downloading hub weights (never done otherwise).
    random_init
        Use randomly initialised weights (for tests and timing only).
    geometry
        Crop geometry; default from the spot layout (METHOD §1).
    image_key, shapes_key, table_key, coordinate_system, pixel_size, spot_diameter, pitch
        See :func:`resolve_spots`.
    batch_size
        Crops per forward pass; ``"auto"``: 16 on CPU (faster there than large batches), 256 on CUDA, halved
        on out-of-memory. Crops are read in batches of 64 (of ``batch_size`` when it is a number).
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    cache_dir
        On-disk crop cache (see :func:`crops`).
    recompute
        Recompute even when matching features exist.
    compile
        ``torch.compile`` the backbone (see :func:`extract_features`): about a minute of compilation, then
        ≈2× faster on CPU; for slides with thousands of spots. Features match eager ones to ~1e-5.
    views
        Augmented views for training in frozen mode: ``name → options of`` :func:`hyperst.datasets.degrade`
        (``pixel_size``, ``stain``, ``background``, ``jpeg_quality``, ``seed``), e.g. :data:`DEFAULT_VIEWS`
        (the slides at 1, 2 and 4 µm/px, a HED stain shift, background painted black and white). Every slide
        is degraded that way and featurised by the same backbone and crop path; the features go to
        ``.obsm["hyperst_features_spot_views"]`` / ``["hyperst_features_niche_views"]`` (float32
        ``(n, n_views, D)``, views in the order given) and :func:`hyperst.tl.fit` draws one of the clean and
        view features of each spot per epoch, so the model learns from the spot as other scanners,
        resolutions, stain batches and exports show it. A ``pixel_size`` finer than a slide's own leaves that
        slide's resolution as it is. ``"default"``: :data:`DEFAULT_VIEWS`. Costs one extraction per view.
    progress
        Show progress bars (one per slide and crop kind, e.g. "spot features sample0").

    Returns
    -------
    The table, with ``.obsm["hyperst_features_spot"]`` and ``.obsm["hyperst_features_niche"]``
    (float32 ``(n, D)``), ``.obs["hyperst_tissue_fraction"]``, ``.obs["hyperst_pad_fraction"]``,
    ``.uns["hyperst"]["features"]`` (backbone, crop geometry, spots, views), the view features with ``views``,
    ``.uns["hyperst"]["spots"][sample]`` (the resolved geometry) and ``.uns["hyperst"]["colour"][sample]``
    (mean and standard deviation over spots of the spot crops' optical density per RGB channel,
    :func:`crop_optical_density`; :func:`hyperst.tl.predict` compares a new slide's with the training slides').
    """
    _ensure_table(sdata, table_key, shapes_key)
    spots = resolve_spots(
        sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key, coordinate_system=coordinate_system,
        pixel_size=pixel_size, spot_diameter=spot_diameter, pitch=pitch,
    )
    tkey = spots[0].table_key
    if tkey is None:
        raise ValueError("The spots are not annotated by a table: pass `table_key`.")
    table = sdata.tables[tkey]
    module = None
    if isinstance(backbone, torch.nn.Module):  # an already built (e.g. LoRA fine-tuned) backbone
        module = backbone
        spec = getattr(module, "hyperst_spec", None)
        if spec is None:
            raise ValueError("A backbone module must come from `hst.pp.load_backbone` (it carries `hyperst_spec`).")
    else:
        spec = resolve_backbone_spec(backbone)
        if weights is not None:
            spec.weights = str(weights)
    geom = _as_geometry(geometry, spots)
    record = _feature_record(spec, geom, spots, sdata)
    if views:
        from hyperst.pp._views import check_views, views_record

        record["views"] = views_record(check_views(views))
    if module is not None:
        record["backbone"]["adapters"] = _adapter_digest(module)
    uns = table.uns.setdefault(Key.UNS, {})
    have = (
        Key.OBSM_FEATURES_SPOT in table.obsm
        and Key.OBSM_FEATURES_NICHE in table.obsm
        and _same(uns.get(Key.UNS_FEATURES), record)
    )
    if have and not recompute:
        logger.info("image features with this backbone, crop geometry and spots exist: reusing them")
        return table

    model = module or load_backbone(spec, allow_download=allow_download, random_init=random_init, device="cpu")
    read = 64 if batch_size == "auto" else batch_size  # crops per read; the forward batch is extract_features'
    cached: list[SampleCrops | None] = [None] * len(spots)
    if cache_dir is not None:  # crops go through the on-disk cache (written once, memory-mapped after)
        cached = list(crops(sdata, geometry=geom, image_key={s.shapes_key: s.image_key for s in spots},
                            shapes_key=[s.shapes_key for s in spots], table_key=tkey,
                            coordinate_system=coordinate_system, pixel_size=pixel_size,
                            spot_diameter=spot_diameter, pitch=pitch, cache_dir=cache_dir,
                            batch_size=read, progress=progress))
    run = {"device": device, "batch_size": batch_size, "progress": progress, "compile": compile}
    got = slide_features(sdata, spots, model, geom, table.n_obs, cached=cached, **run)
    feats, pad, tissue, covered, colour = got.features, got.pad, got.tissue, got.covered, got.colour
    view_arrays = None
    if views:
        from hyperst.pp._views import view_features

        view_arrays = view_features(
            sdata, views, model, geom, table.n_obs, spots=spots,
            spots_kwargs={"image_key": image_key, "shapes_key": shapes_key, "table_key": table_key,
                          "coordinate_system": coordinate_system, "spot_diameter": spot_diameter, "pitch": pitch},
            **run,
        )
    if not covered.all():
        logger.warning(f"{int((~covered).sum())} table rows have no spot: their features are zero")
    table.obsm[Key.OBSM_FEATURES_SPOT] = feats["spot"]
    table.obsm[Key.OBSM_FEATURES_NICHE] = feats["niche"]
    for key in (Key.OBSM_VIEWS_SPOT, Key.OBSM_VIEWS_NICHE):
        table.obsm.pop(key, None)
    if view_arrays is not None:
        table.obsm[Key.OBSM_VIEWS_SPOT] = view_arrays["spot"]
        table.obsm[Key.OBSM_VIEWS_NICHE] = view_arrays["niche"]
    table.obs[Key.OBS_TISSUE_FRACTION] = tissue
    table.obs[Key.OBS_PAD_FRACTION] = pad
    uns[Key.UNS_FEATURES] = record
    uns[Key.UNS_COLOUR] = {**dict(uns.get(Key.UNS_COLOUR, {})), **colour}
    spots_meta = uns.setdefault(Key.UNS_SPOTS, {})
    for s in spots:
        summary = {k: v for k, v in s.summary().items() if v is not None}  # h5ad cannot store None
        spots_meta[s.sample] = {**dict(spots_meta.get(s.sample, {})), **summary}
    return table


class Extracted(NamedTuple):
    """What :func:`slide_features` computed, over the rows of the table."""

    features: dict[str, np.ndarray]  # "spot" / "niche" → (n_obs, D)
    pad: np.ndarray
    tissue: np.ndarray
    covered: np.ndarray
    colour: dict[str, dict[str, list[float]]]


def slide_features(
    sdata: SpatialData,
    spots: Sequence[SampleSpots],
    model: torch.nn.Module,
    geom: CropGeometry,
    n_obs: int,
    *,
    cached: Sequence[SampleCrops | None] | None = None,
    device: str = "auto",
    batch_size: int | Literal["auto"] = "auto",
    progress: bool = True,
    compile: bool = False,
    label: str = "",
) -> Extracted:
    """Spot and niche features of every slide's spots through ``model``, placed at the spots' table rows.

    The one extraction loop of :func:`image_features` (and of its augmented views): crops are streamed
    slide by slide and crop kind by crop kind, never all in memory.
    """
    feats: dict[str, np.ndarray] = {}
    pad = np.zeros(n_obs, dtype=np.float32)
    tissue = np.zeros(n_obs, dtype=np.float32)
    covered = np.zeros(n_obs, dtype=bool)
    colour: dict[str, dict[str, list[float]]] = {}
    read = 64 if batch_size == "auto" else batch_size  # crops per read; the forward batch is extract_features'
    cached = [None] * len(spots) if cached is None else cached
    for s, sc in zip(spots, cached, strict=True):
        if s.table_rows is None:
            raise ValueError(f"Spots `{s.shapes_key}` have no rows in the table.")
        image = sdata.images[s.image_key]
        threshold = _slide_threshold(image, s) if sc is None else None
        for name, side in zip(("spot", "niche"), geom.sides_px(s.pixel_size), strict=True):
            logger.info(f"{s.sample}: {name} features for {s.n_spots} spots{label}")
            seen: list[_Seen] = []  # rows, pad and tissue fraction of each batch, never the crops
            stream = _stream(image, s, side, geom, read, sc, name, threshold, seen)
            f = extract_features(model, stream, device=device, batch_size=batch_size, n_total=s.n_spots,
                                 progress=progress, compile=compile, desc=f"{name} features {s.sample}{label}")
            target = s.table_rows[np.concatenate([b.index for b in seen])]
            feats.setdefault(name, np.zeros((n_obs, f.shape[1]), dtype=np.float32))[target] = f
            if name == "spot":
                pad[target] = np.concatenate([b.pad for b in seen])
                tissue[target] = np.concatenate([b.tissue for b in seen])
                covered[target] = True
                od = np.concatenate([b.od for b in seen])
                od = od[np.isfinite(od).all(1)]
                if len(od):
                    colour[s.sample] = {"od_mean": od.mean(0).tolist(), "od_std": od.std(0).tolist()}
    return Extracted(feats, pad, tissue, covered, colour)


def _adapter_digest(module: torch.nn.Module) -> str:
    """Hash of a module's LoRA adapter weights (all weights when it has none): tells fine-tuned models apart."""
    import hashlib

    state = module.state_dict()
    keys = sorted(k for k in state if "lora_" in k) or sorted(state)
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode())
        h.update(state[k].detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:20]


class _Seen(NamedTuple):
    index: np.ndarray
    pad: np.ndarray
    tissue: np.ndarray
    od: np.ndarray | None  # mean optical density of the spot crops (set by _stream)


def crop_optical_density(crops: np.ndarray, *, step: int = 4, dark: int = 25, bright: int = 230) -> np.ndarray:
    """Mean optical density ``-log10((I + 1) / 256)`` of the stained pixels of each RGB crop → ``(n, 3)``.

    Optical density is the Beer–Lambert absorbance (stain amount) behind each channel: a stain or scanner
    shift moves it. Only stained pixels count: not black (brightest channel ≥ ``dark``, so background painted
    black by an export does not enter) and not glass (darkest channel ≤ ``bright``). Every ``step``-th pixel
    is read; a crop without stained pixels gives NaN.
    """
    sub = np.asarray(crops[:, ::step, ::step, :3], dtype=np.float32)
    keep = (sub.max(-1) >= dark) & (sub.min(-1) <= bright)
    od = -np.log10((sub + 1.0) / 256.0)
    n = keep.sum(axis=(1, 2))
    total = (od * keep[..., None]).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n[:, None] > 0, total / n[:, None], np.nan).astype(np.float32)


def _stream(
    image: Any,
    s: SampleSpots,
    side: float,
    geom: CropGeometry,
    batch_size: int,
    cached: SampleCrops | None,
    name: str,
    threshold: float | None,
    seen: list[_Seen],
) -> Iterator[np.ndarray]:
    """Yield crop batches for the backbone, recording their rows, pad and tissue fractions in ``seen``.

    Only these per-spot numbers are kept: each batch of crops is dropped once the backbone has seen it,
    and freed crop and activation buffers go back to the OS every few batches (:func:`release_memory`).
    """
    for k, (crops_, record) in enumerate(_batches(image, s, side, geom, batch_size, cached, name, threshold)):
        od = crop_optical_density(crops_) if name == "spot" else np.full((len(crops_), 3), np.nan, np.float32)
        seen.append(record._replace(od=od))
        yield crops_
        if k % _TRIM_EVERY == _TRIM_EVERY - 1:
            release_memory(collect=False)


def _batches(
    image: Any,
    s: SampleSpots,
    side: float,
    geom: CropGeometry,
    batch_size: int,
    cached: SampleCrops | None,
    name: str,
    threshold: float | None,
) -> Iterator[tuple[np.ndarray, _Seen]]:
    """Crop batches with their rows, pad and tissue fractions: read from the crop cache or cut from the image.

    The tissue fraction is computed for the spot stream only (``nan`` placeholders for the niche stream).
    """
    if cached is not None:
        arr = cached.spot if name == "spot" else cached.niche
        for start in range(0, len(arr), batch_size):
            idx = np.arange(start, min(start + batch_size, len(arr)))
            record = _Seen(idx, np.asarray(cached.pad_fraction[idx]), np.asarray(cached.tissue_fraction[idx]), None)
            yield np.array(arr[start : start + len(idx)]), record  # a writable copy of one batch
        return
    for b in iter_crops(image, s.centers_px, side, out_size=geom.out_size, batch_size=batch_size):
        if name == "spot":
            frac = tissue_fraction(b.crops, threshold=threshold)
        else:
            frac = np.full(len(b.index), np.nan, dtype=np.float32)
        yield b.crops, _Seen(b.index, b.pad_fraction, frac, None)
