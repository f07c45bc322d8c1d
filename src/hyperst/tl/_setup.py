"""Registering user data for training: tables, spots, genes, targets and image inputs as aligned arrays.

Like scvi-tools' ``setup_anndata``, this only reads: it finds the training tables behind AnnData /
SpatialData input, the genes and their targets, the image features (frozen mode) or crops (LoRA mode),
and records where every row came from so that embeddings can be written back. The data modules
(:mod:`hyperst.data`) and the model (:class:`hyperst.tl.HyperST`) are built from the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.tl._utils import tables

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from hyperst.pp import CropGeometry
    from hyperst.tl._options import DataOptions, ImageOptions

__all__ = ["Part", "TrainingData", "check_feature_origin", "feature_matrix", "niche_target_matrix", "register",
           "slide_records", "target_matrix", "training_slides"]


@dataclass
class Part:
    """Spots of one user table used for training: ``data`` is ``table[rows]`` (``table`` itself when whole)."""

    table: AnnData
    rows: np.ndarray
    data: AnnData


@dataclass
class TrainingData:
    """What a model trains on, over the concatenated training spots of every part.

    Attributes
    ----------
    parts
        Where the rows come from (for writing embeddings back).
    genes
        Predicted genes, in output order.
    targets, niche_targets
        ``(n, G)`` training targets; niche targets only for models that align niches (``None`` until
        :meth:`add_niche_targets`).
    samples, coords
        Sample label and spot centre (or ``None`` when unknown) of every row.
    spot, niche
        Frozen mode: backbone features ``(n, D)``. LoRA mode: uint8 crops ``(n, s, s, 3)`` as a
        :class:`~hyperst.data.StackedCrops` over the samples' memory-mapped crop caches.
    backbone, crop_geometry, spot_geometry
        Provenance records (backbone spec, crop geometry, spot layout) of the image inputs.
    """

    mode: Literal["frozen", "lora"]
    parts: list[Part]
    genes: list[str]
    targets: np.ndarray
    samples: np.ndarray
    coords: np.ndarray | None
    spot: np.ndarray
    niche: np.ndarray | None
    backbone: dict | None
    crop_geometry: dict | None
    spot_geometry: dict
    niche_targets: np.ndarray | None = None
    spot_views: np.ndarray | None = None
    niche_views: np.ndarray | None = None
    view_names: list[str] | None = None

    @property
    def adatas(self) -> list[AnnData]:
        """The training rows of each part."""
        return [p.data for p in self.parts]

    def add_niche_targets(self, options: DataOptions) -> None:
        """Compute the niche expression targets of :attr:`genes` (log2(1 + niche mean counts))."""
        self.niche_targets = niche_target_matrix(self.adatas, self.genes, options)


def target_matrix(adatas: Sequence[AnnData], genes: Sequence[str], options: DataOptions) -> np.ndarray:
    """Spot targets of ``genes`` over the concatenated tables (:func:`hyperst.pp.targets`)."""
    from hyperst.pp._genes import targets

    return np.concatenate([targets(a, genes, layer=options.layer, normalize=options.normalize) for a in adatas])


def niche_target_matrix(adatas: Sequence[AnnData], genes: Sequence[str], options: DataOptions) -> np.ndarray:
    """Niche targets of ``genes`` over the concatenated tables; niches never cross ``options.sample_key``."""
    from hyperst.pp._niches import niche_targets

    return np.concatenate([
        niche_targets(a, genes, layer=options.layer,
                      library_key=options.sample_key if options.sample_key in a.obs.columns else None)
        for a in adatas
    ])


def feature_matrix(adata: AnnData, key: str, what: str) -> np.ndarray:
    """``.obsm[key]`` as a float32 ``(n_obs, D)`` array, with an error naming the function to run first."""
    if key not in adata.obsm:
        raise ValueError(
            f"The table has no {what} features in `.obsm[{key!r}]`. Compute them first with "
            "`hst.pp.image_features(sdata, backbone=...)`, or pass the key holding them."
        )
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if x.ndim != 2 or len(x) != adata.n_obs:
        raise ValueError(f"`.obsm[{key!r}]` must be a 2-d array with one row per spot, got shape {x.shape}.")
    return x


def slide_records(tables: Sequence[AnnData]) -> dict[str, dict[str, Any]]:
    """What the feature tables recorded of each slide: ``{sample: {"pixel_size", "od_mean", "od_std"}}``.

    ``pixel_size`` comes from ``.uns["hyperst"]["features"]["samples"]`` and the optical density from
    ``.uns["hyperst"]["colour"]`` (both written by :func:`hyperst.pp.image_features`); missing ones are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for t in tables:
        uns = t.uns.get(Key.UNS, {})
        samples = dict(uns.get(Key.UNS_FEATURES, {}).get("samples", {}) or {})
        colour = dict(uns.get(Key.UNS_COLOUR, {}) or {})
        for name in set(samples) | set(colour):
            rec = out.setdefault(str(name), {})
            px = dict(samples.get(name, {})).get("pixel_size")
            if px is not None:
                rec["pixel_size"] = float(px)
            c = dict(colour.get(name, {}))
            for k in ("od_mean", "od_std"):
                if c.get(k) is not None:
                    rec[k] = [float(v) for v in np.asarray(c[k]).ravel()]
    return out


def training_slides(reg: TrainingData) -> dict[str, dict[str, Any]]:
    """:func:`slide_records` of the slides a model trains on (the samples of its registered spots)."""
    names = set(map(str, np.unique(reg.samples)))
    return {k: v for k, v in slide_records([p.table for p in reg.parts]).items() if k in names}


def register(
    data: Any,
    *,
    mode: Literal["frozen", "lora"],
    genes: Sequence[str] | None,
    options: DataOptions,
    image: ImageOptions,
    niche_features: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> TrainingData:
    """Read the training inputs of ``data`` (AnnData, SpatialData or a list of them).

    Frozen mode computes missing image features of SpatialData items (:func:`hyperst.pp.image_features`);
    LoRA mode cuts the spot/niche crops (:func:`hyperst.pp.crops`, memory-mapped from the crop cache).
    ``niche_features=False`` skips the niche features (single-level models).
    """
    if mode not in ("frozen", "lora"):
        raise ValueError(f"`mode` must be 'frozen' or 'lora', got {mode!r}.")
    items = list(data) if isinstance(data, list | tuple) else [data]
    geom = None
    if mode == "lora" and not hasattr(image.backbone, "hyperst_spec"):  # refused before any crop is cut
        from hyperst.pp import resolve_backbone_spec

        if resolve_backbone_spec(image.backbone).tta is not None:
            raise ValueError("`backbone` sets `tta`, a test-time augmentation of frozen features; LoRA training "
                             "augments its crops itself (`augment=True`): drop 'tta' for mode='lora'.")
    if mode == "lora":
        parts, crop_arrays, geom = _lora_parts(items, options.table_key, image.geometry, image.cache_dir, progress)
    else:
        _ensure_features(items, options, image, device=device, progress=progress)
        parts = [Part(a, np.arange(a.n_obs), a) for a in tables(items, options.table_key)]
        crop_arrays = None
    _check_spot_counts(parts, "")
    if options.min_tissue is not None:
        parts, crop_arrays = _tissue_filter(parts, crop_arrays, options.min_tissue)
        _check_spot_counts(parts, f" with a tissue fraction ≥ `min_tissue={options.min_tissue}`")
    adatas = [p.data for p in parts]
    genes = _genes(adatas, genes, options)
    y = target_matrix(adatas, genes, options)
    backbone, crop_record, spot_geometry = _provenance(adatas)
    if mode == "lora":
        spot, niche = crop_arrays
        crop_record = geom.to_dict()
    else:
        spot = np.concatenate([feature_matrix(a, options.spot_key, "spot") for a in adatas])
        niche = None
        if niche_features:
            niche = np.concatenate([feature_matrix(a, options.niche_key, "niche") for a in adatas])
            if niche.shape[1] != spot.shape[1]:
                raise ValueError(f"Spot ({spot.shape[1]}) and niche ({niche.shape[1]}) features differ in size.")
    views = view_matrices(adatas, options, niche=niche is not None) if mode == "frozen" else None
    return TrainingData(
        mode=mode, parts=parts, genes=genes, targets=y, samples=_samples(adatas, options.sample_key),
        coords=_coords(adatas), spot=spot, niche=niche, backbone=backbone, crop_geometry=crop_record,
        spot_geometry=spot_geometry, **(views or {}),
    )


def view_matrices(adatas: Sequence[AnnData], options: DataOptions, *, niche: bool) -> dict[str, Any] | None:
    """The augmented-view features of the training tables (``options.views``), or ``None`` when not used.

    Views are used only when every table has them under the same names (the feature record's ``"views"``);
    ``options.views`` as a list picks views by name.
    """
    if options.views is False or options.spot_key != Key.OBSM_FEATURES_SPOT:
        return None
    from hyperst.pp._views import recorded_views

    named = [recorded_views(a) for a in adatas]
    have = [Key.OBSM_VIEWS_SPOT in a.obsm and bool(n) for a, n in zip(adatas, named, strict=True)]
    wanted = options.views if isinstance(options.views, list) else None
    if not any(have):
        if wanted:
            raise ValueError(f"`views={wanted}`: the training tables have no view features; compute them with "
                             "`hst.pp.image_features(sdata, views=...)`.")
        return None
    names = list(named[have.index(True)])
    if not all(have) or any(list(n) != names for n in named):
        raise ValueError("Some training tables have augmented views and others have none or other ones "
                         f"({[list(n) for n in named]}): compute the same `views=` for every table, or pass "
                         "`views=False`.")
    pick = list(range(len(names)))
    if wanted:
        missing = [v for v in wanted if v not in names]
        if missing:
            raise ValueError(f"`views` names {missing}, which the tables do not have; they have {names}.")
        pick = [names.index(v) for v in wanted]
    spot = np.concatenate([np.asarray(a.obsm[Key.OBSM_VIEWS_SPOT], dtype=np.float32)[:, pick] for a in adatas])
    out: dict[str, Any] = {"spot_views": spot, "view_names": [names[i] for i in pick]}
    if niche:
        out["niche_views"] = np.concatenate(
            [np.asarray(a.obsm[Key.OBSM_VIEWS_NICHE], dtype=np.float32)[:, pick] for a in adatas])
    logger.info(f"training on {len(pick)} augmented views besides the clean features: {out['view_names']}")
    return out


def _check_spot_counts(parts: Sequence[Part], which: str) -> None:
    """Refuse empty training tables and fewer than two spots (the contrastive loss compares spots of a batch)."""
    where = "`data`" if len(parts) == 1 else "`data[{}]`"
    for i, p in enumerate(parts):
        if len(p.rows) == 0:
            raise ValueError(f"{where.format(i)} has no spots{which}: nothing to train on. Drop this table, or "
                             "check the subset you passed.")
    n = sum(len(p.rows) for p in parts)
    if n < 2:
        raise ValueError(f"`data` has {n} spot{which}: training needs at least 2 (the contrastive loss compares "
                         "the spots of a batch), and a useful model hundreds.")


def _genes(adatas: list[AnnData], genes: Sequence[str] | None, options: DataOptions) -> list[str]:
    from hyperst.pp._genes import select_genes

    if genes is None:
        first = adatas[0]
        if Key.VAR_SELECTED in first.var.columns and first.var[Key.VAR_SELECTED].any():
            sel = first.var[first.var[Key.VAR_SELECTED]]
            genes = list(sel.sort_values(Key.VAR_RANK).index) if Key.VAR_RANK in sel.columns else list(sel.index)
        else:
            lib = options.sample_key if options.sample_key in first.obs else None
            genes = select_genes(adatas, layer=options.layer, library_key=lib, inplace=False)
    if isinstance(genes, str):
        raise TypeError(f"`genes` must be a list of gene names, got the string {genes!r}; pass [{genes!r}].")
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("No genes to predict: `genes` is empty.")
    return genes


def _samples(adatas: list[AnnData], sample_key: str) -> np.ndarray:
    labels = []
    for i, a in enumerate(adatas):
        if sample_key in a.obs.columns:
            labels.append(a.obs[sample_key].astype(str).to_numpy())
        else:
            labels.append(np.full(a.n_obs, f"table{i}" if len(adatas) > 1 else "sample0"))
    return np.concatenate(labels)


def _coords(adatas: list[AnnData]) -> np.ndarray | None:
    if not all(Key.OBSM_SPATIAL in a.obsm for a in adatas):
        return None
    return np.concatenate([np.asarray(a.obsm[Key.OBSM_SPATIAL], dtype=np.float64)[:, :2] for a in adatas])


def _feature_origin(adata: AnnData) -> tuple[dict | None, dict | None]:
    """``(backbone, crop_geometry)`` recorded by :func:`hyperst.pp.image_features` (plain JSON), or ``None``s."""
    from hyperst._utils import jsonable

    rec = adata.uns.get(Key.UNS, {}).get(Key.UNS_FEATURES)
    if not isinstance(rec, Mapping):
        return None, None
    backbone, geometry = rec.get("backbone"), rec.get("crop_geometry")
    return (jsonable(dict(backbone)) if isinstance(backbone, Mapping) else None,
            jsonable(dict(geometry)) if isinstance(geometry, Mapping) else None)


def _same_backbone(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same architecture, pooling, test-time augmentation and weights file (by name: a folder moves between machines).

    The LoRA adapters must match too when both records have them.
    """
    from pathlib import PurePath

    def weights(spec: Mapping[str, Any]) -> str | None:
        w = spec.get("weights")
        return None if w is None else PurePath(str(w)).name

    def key(spec: Mapping[str, Any]) -> tuple:
        return spec.get("name"), spec.get("pool"), spec.get("tta"), weights(spec)

    same = key(a) == key(b)
    if "adapters" in a and "adapters" in b:
        same = same and a["adapters"] == b["adapters"]
    return same


def check_feature_origin(
    adata: AnnData, *, backbone: Mapping[str, Any] | None, crop_geometry: Mapping[str, Any] | None, what: str,
    reference: str = "the model's",
) -> None:
    """Raise when a table's features come from another backbone or crop geometry than the given ones.

    Features of the same size from another crop geometry (400/800 µm crops against 112/255 µm) or another
    backbone give predictions that look normal and are wrong. Tables without a record (features computed
    elsewhere) are accepted, with an info message.
    """
    from hyperst._utils import jsonable

    have_bb, have_geom = _feature_origin(adata)
    if have_bb is None and have_geom is None:
        if backbone is not None or crop_geometry is not None:
            logger.info(f"{what} does not record how its image features were made: they are assumed to come "
                        "from the model's backbone and crop geometry")
        return
    fix = ("Recompute them with `hst.pp.image_features(sdata, backbone=model.backbone, "
           "geometry=model.crop_geometry, recompute=True)`, or predict from the SpatialData itself.")
    if crop_geometry is not None and have_geom is not None and jsonable(dict(crop_geometry)) != have_geom:
        raise ValueError(f"The image features of {what} were made with crop geometry {have_geom}, "
                         f"{reference} with {jsonable(dict(crop_geometry))}. {fix}")
    if backbone is not None and have_bb is not None and not _same_backbone(jsonable(dict(backbone)), have_bb):
        def desc(spec: Mapping[str, Any]) -> str:
            return (f"{spec.get('name')!r} (weights {spec.get('weights')!r}, pool {spec.get('pool', 'default')!r}, "
                    f"tta {spec.get('tta')!r})")

        raise ValueError(f"The image features of {what} come from backbone {desc(have_bb)}, {reference} from "
                         f"{desc(backbone)}. {fix}")


def _provenance(adatas: list[AnnData]) -> tuple[dict | None, dict | None, dict]:
    """Backbone and crop geometry of the features, and the spot geometry, as recorded by ``hst.pp``.

    Every training table must record the same backbone and crop geometry as the first (or none).
    """
    backbone, geometry = _feature_origin(adatas[0])
    for i, a in enumerate(adatas[1:], start=1):
        check_feature_origin(a, backbone=backbone, crop_geometry=geometry, what=f"training table {i}",
                             reference="those of training table 0")
    spots = {}
    meta = adatas[0].uns.get(Key.UNS, {}).get(Key.UNS_SPOTS)
    if isinstance(meta, Mapping) and meta:
        first = next(iter(meta.values()))
        spots = {k: first[k] for k in ("layout", "spot_diameter", "pitch") if k in first}
    return backbone, geometry, spots


def _ensure_features(
    items: list[Any], options: DataOptions, image: ImageOptions, *, device: str, progress: bool
) -> None:
    """Compute image features for SpatialData items whose table lacks them (default keys only)."""
    from anndata import AnnData

    from hyperst.pp import image_features

    for item in items:
        if isinstance(item, AnnData) or not hasattr(item, "tables"):
            continue
        (table,) = tables([item], options.table_key)
        if options.spot_key in table.obsm and options.niche_key in table.obsm:
            continue
        if (options.spot_key, options.niche_key) != (Key.OBSM_FEATURES_SPOT, Key.OBSM_FEATURES_NICHE):
            raise ValueError(
                f"`.obsm[{options.spot_key!r}]`/`[{options.niche_key!r}]` are missing from a SpatialData table."
            )
        image_features(item, table_key=options.table_key, backbone=image.backbone, weights=image.weights,
                       random_init=image.random_init, geometry=image.geometry, cache_dir=image.cache_dir,
                       device=device, progress=progress)


def _lora_parts(
    items: list[Any], table_key: str | None, geometry: Any, cache_dir: str | None, progress: bool
) -> tuple[list[Part], tuple[np.ndarray, np.ndarray], CropGeometry]:
    from hyperst.data import StackedCrops
    from hyperst.pp import crops

    parts: list[Part] = []
    spot, niche = [], []
    geom = None
    for item in items:
        if not hasattr(item, "images"):
            raise TypeError("`mode='lora'` trains on images: pass SpatialData objects, not AnnData.")
        for sc in crops(item, geometry=geometry, table_key=table_key, cache_dir=cache_dir, progress=progress):
            if sc.spots.table_key is None or sc.spots.table_rows is None:
                raise ValueError(f"Spots `{sc.spots.shapes_key}` have no table with measured expression.")
            table = item.tables[sc.spots.table_key]
            rows = table[sc.spots.table_rows].copy()
            # the crops' own tissue fractions (for `min_tissue`), on the copy: the user's table is not touched
            rows.obs[Key.OBS_TISSUE_FRACTION] = np.asarray(sc.tissue_fraction, dtype=np.float32)
            parts.append(Part(table, sc.spots.table_rows, rows))
            spot.append(sc.spot)
            niche.append(sc.niche)
            if geom is not None and sc.geometry != geom:
                raise ValueError("The samples were cropped with different geometries: pass `geometry`.")
            geom = sc.geometry
    # one stack over the samples' memory-mapped crops: nothing is read into memory here
    return parts, (StackedCrops(spot), StackedCrops(niche)), geom


def _tissue_filter(
    parts: list[Part], crop_arrays: tuple[np.ndarray, np.ndarray] | None, min_tissue: float
) -> tuple[list[Part], tuple[np.ndarray, np.ndarray] | None]:
    out, keep_all = [], []
    for p in parts:
        if Key.OBS_TISSUE_FRACTION not in p.data.obs.columns:
            raise ValueError(
                f"`min_tissue` needs `.obs[{Key.OBS_TISSUE_FRACTION!r}]` (written by `hst.pp.image_features`)."
            )
        keep = p.data.obs[Key.OBS_TISSUE_FRACTION].to_numpy() >= min_tissue
        keep_all.append(keep)
        out.append(Part(p.table, p.rows[keep], p.data if keep.all() else p.data[keep].copy()))
    n_dropped = sum(int((~k).sum()) for k in keep_all)
    logger.info(f"min_tissue={min_tissue}: {n_dropped} spots with less tissue left out")
    if not any(k.any() for k in keep_all):
        raise ValueError(f"No spot has a tissue fraction of at least `min_tissue={min_tissue}`.")
    if crop_arrays is not None:
        keep = np.concatenate(keep_all)
        crop_arrays = (crop_arrays[0][keep], crop_arrays[1][keep])  # row selection, no copy
    return out, crop_arrays
