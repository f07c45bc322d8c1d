"""Prediction from H&E alone: on tables with image features, on SpatialData with spots, or on a bare image.

:func:`hyperst.tl.predict` is also the model's :meth:`hyperst.tl.HyperST.predict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst._utils import jsonable, restore_on_error
from hyperst.tl._setup import check_feature_origin, feature_matrix, slide_records

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from hyperst.tl._model import HyperST

__all__ = ["predict"]


def predict(
    model: HyperST,
    data: AnnData | SpatialData,
    *,
    spot_key: str = Key.OBSM_FEATURES_SPOT,
    niche_key: str = Key.OBSM_FEATURES_NICHE,
    layer: Literal["auto"] | bool = "auto",
    table_key: str | None = None,
    shapes_key: str | None = None,
    image_key: str | None = None,
    pixel_size: float | None = None,
    key_added: str = Key.TABLE_PREDICTION,
    grid: Mapping[str, Any] | None = None,
    spatial_image: int | None = 2000,
    device: str = "auto",
    batch_size: int = 1024,
    alpha: float = 0.1,
    progress: bool = True,
) -> AnnData:
    """Predict expression from H&E alone, with prediction intervals and domain-shift checks.

    Works on a table with precomputed features, and on SpatialData that has spots with or without a
    table, or only an H&E image: then pseudo-spots are placed on a regular grid over the tissue at the
    model's spot geometry (:func:`hyperst.pp.grid_spots`). For SpatialData, image features are computed
    with the model's backbone and crop geometry (:func:`hyperst.pp.image_features`, reused when
    present) and the result is added as a new table annotating the spots.

    Parameters
    ----------
    model
        A trained :class:`HyperST`.
    data
        AnnData with features in ``.obsm`` (not modified), or SpatialData.
    spot_key, niche_key
        ``.obsm`` keys of the features.
    layer
        Where the prediction goes in the returned table: ``"auto"`` puts it in
        ``.layers["hyperst_pred"]`` when the input table holds measured counts of the model's genes
        (``.X`` then keeps those counts), else in ``.X``; ``True``/``False`` force either.
    table_key, shapes_key, image_key, pixel_size
        SpatialData only: which elements to use (see :func:`hyperst.pp.resolve_spots`).
    key_added
        SpatialData only: name of the new prediction table.
    grid
        SpatialData without spots only: options of :func:`hyperst.pp.grid_spots` (e.g.
        ``{"min_tissue": 0.5, "layout": "visium"}``).
    spatial_image
        SpatialData only: largest side in pixels of the downsampled copy of each sample's H&E written to the
        legacy ``.uns["spatial"][sample]`` block (``"images"``: ``"hires"`` at this size, ``"lowres"`` at
        ``min(600, spatial_image)``; ``"scalefactors"``: ``tissue_hires_scalef``, ``tissue_lowres_scalef``,
        ``spot_diameter_fullres`` in ``.obsm["spatial"]`` units), the layout of :func:`scanpy.read_visium`, so
        that :func:`squidpy.pl.spatial_scatter` and :func:`scanpy.pl.spatial` draw the prediction on the H&E.
        2000 (the default, Space Ranger's hires size) costs at most 13 MB per sample; ``None`` writes no
        ``.uns["spatial"]``.
    device
        Device of the backbone for SpatialData input.
    batch_size
        Spots per forward pass of the HyperST heads.
    alpha
        Miscoverage of the prediction intervals: they hold ``1 - alpha`` of the measured values (0.9 by
        default), as calibrated on the members' held-out slides.
    progress
        Show progress bars.

    Returns
    -------
    A new AnnData over the spots and the model's genes with

    - the prediction (log2(1 + counts) scale, ≥ 0; the ensemble mean) in ``.X`` or
      ``.layers["hyperst_pred"]`` (see ``layer``);
    - for calibrated models (trained with validation data): ``.layers["hyperst_lower"]`` and
      ``.layers["hyperst_upper"]``, the ``1 - alpha`` prediction interval of each spot and gene (built from
      the signed held-out residuals, so it is asymmetric where the model erred one way on held-out slides,
      and lies wholly above the prediction where it under-predicted them, as an under-trained model does);
      ``.layers["hyperst_std"]``, the predictive standard deviation (member spread and held-out residuals);
      ``.obs["hyperst_uncertainty"]``, the spot's mean predictive standard deviation over genes (log2 units;
      larger: trust the spot less; on held-out Her2ST sections it rises with the spot's error);
    - the domain checks: ``.obs["hyperst_ood_score"]`` (≈ 1 for spots like the training spots) and
      ``.obs["hyperst_ood"]`` (above the threshold that about 5 % of held-out training-domain spots exceed),
      and per slide in ``.uns["hyperst"]["predict"]["domain"]`` (flagged fraction and stain colour, each
      alarm logged as a warning; a pixel size coarser than the training slides' as a note);
    - ``.obs["hyperst_radius"]``, the hyperbolic radius of the spot's image embedding (a diagnostic, not a
      confidence: :meth:`HyperST.radius`), the image embeddings in ``.obsm["X_hyperst"]`` /
      ``.obsm["X_hyperst_niche"]``, and the input's ``.obs`` and ``.obsm["spatial"]``;
    - when the input holds measured counts of the model's genes: ``.layers["hyperst_observed"]``, their
      log2(1 + counts), on the prediction's scale (for side-by-side statistics such as
      ``squidpy.gr.spatial_autocorr(pred, layer="hyperst_observed")`` next to ``layer="hyperst_pred"``).

    The table is a SpatialData table annotating the spots (``.uns["spatialdata_attrs"]``: ``region``,
    ``region_key``, ``instance_key``; :class:`spatialdata.models.TableModel`), so spatialdata-plot can colour
    the spots by it. Input tables that annotate an element keep their annotation (restricted to the regions
    of their rows). A table without one gets ``region_key="region"`` and ``instance_key="instance_id"``: the
    region of a spot is ``f"{sample}_spots"`` (``.obs["sample"]``; ``"spots"`` without that column), the name
    hyperst's readers give a sample's spots element; an existing integer or string ``.obs["instance_id"]``
    unique within each region is kept, else it is the spot's position within its region.

    For SpatialData it is also stored as ``sdata.tables[key_added]``, with the legacy ``.uns["spatial"]``
    block (see ``spatial_image``), and each sample's entry of ``.uns["hyperst"]["spots"]`` records the image
    (``"image_key"``) and its level-0 pixels per ``.obsm["spatial"]`` unit (``"image_scale"``), from which
    :func:`hyperst.pl.spatial` finds the H&E.
    """
    from anndata import AnnData

    if isinstance(data, AnnData):
        return _predict_table(model, data, spot_key=spot_key, niche_key=niche_key, layer=layer, batch_size=batch_size,
                              alpha=alpha)
    if not hasattr(data, "images"):
        raise TypeError(f"`data` must be an AnnData or a SpatialData, got {type(data).__name__}.")
    if spatial_image is not None and (
        isinstance(spatial_image, bool) or not isinstance(spatial_image, int | np.integer) or spatial_image < 16
    ):
        raise ValueError(
            f"`spatial_image` must be the largest side in pixels of the H&E copy (an integer ≥ 16, e.g. 2000) or "
            f"None for no `.uns['spatial']`, got {spatial_image!r}."
        )
    with restore_on_error([data]):  # a failed call leaves no pseudo-spots, table or features behind
        return _predict_spatialdata(
            model, data, layer=layer, table_key=table_key, shapes_key=shapes_key, image_key=image_key,
            pixel_size=pixel_size, key_added=key_added, grid=grid, spatial_image=spatial_image, device=device,
            batch_size=batch_size, alpha=alpha, progress=progress,
        )


def _predict_spatialdata(
    model: HyperST,
    sdata: SpatialData,
    *,
    layer: Literal["auto"] | bool,
    table_key: str | None,
    shapes_key: str | None,
    image_key: str | None,
    pixel_size: float | None,
    key_added: str,
    grid: Mapping[str, Any] | None,
    spatial_image: int | None,
    device: str,
    batch_size: int,
    alpha: float,
    progress: bool,
) -> AnnData:
    from hyperst.pp import image_features, resolve_spots

    if model.backbone is None or model.crop_geometry is None:
        raise ValueError(
            "This model does not record the backbone and crop geometry of its features, so it cannot compute "
            "them from images. Compute features with the training backbone and pass the table instead."
        )
    if key_added in sdata.tables:
        raise ValueError(f"`sdata` already has a table {key_added!r}; pass another `key_added`.")
    if len(sdata.shapes) == 0 and len(sdata.points) == 0 and shapes_key is None:
        from hyperst.pp import grid_spots
        from hyperst.pp._layout import layout_defaults

        geom = model.crop_geometry
        pre = model.preprocessing
        layout = pre.get("layout", "visium")
        diameter, pitch = layout_defaults(layout if layout in ("visium", "st") else "visium")
        opts = {"spot_diameter": pre.get("spot_diameter", diameter), "pitch": pre.get("pitch", pitch),
                "layout": "visium" if layout == "visium" else "square"}
        opts.update(grid or {})
        if pixel_size is None and "pixel_size" not in opts:
            pixel_size = _slide_pixel_size(sdata)
        if pixel_size is None and "pixel_size" not in opts:
            raise ValueError("`sdata` has no spots: pass `pixel_size` (µm per pixel) to place pseudo-spots "
                             "(`hst.datasets.read_slide` records it for scanner slides).")
        opts.setdefault("pixel_size", pixel_size)
        shapes_key = grid_spots(sdata, image_key=image_key, **opts)
        logger.info(f"placed {len(sdata.shapes[shapes_key])} pseudo-spots on the tissue ({geom})")
        pixel_size = opts["pixel_size"]
    table = image_features(
        sdata, backbone=model.image_backbone or model.backbone, geometry=model.crop_geometry, table_key=table_key,
        shapes_key=shapes_key, image_key=image_key, pixel_size=pixel_size, device=device, progress=progress,
    )
    out = _predict_table(model, table, spot_key=Key.OBSM_FEATURES_SPOT, niche_key=Key.OBSM_FEATURES_NICHE,
                         layer=layer, batch_size=batch_size, alpha=alpha)
    features_key = next(k for k, t in sdata.tables.items() if t is table)
    samples = resolve_spots(sdata, image_key=image_key, shapes_key=shapes_key, table_key=features_key,
                            pixel_size=pixel_size)
    _record_images(out, sdata, samples, spatial_image=spatial_image)
    sdata.tables[key_added] = out
    return out


def _slide_pixel_size(sdata: SpatialData) -> float | None:
    """The pixel size :func:`hyperst.datasets.read_slide` recorded (``sdata.attrs``), when it read one slide."""
    records = dict(sdata.attrs.get(Key.UNS, {}).get(Key.ATTRS_SLIDE, {}) or {})
    if len(records) != 1:
        return None
    sample, record = next(iter(records.items()))
    value = record.get("pixel_size") if isinstance(record, Mapping) else None
    if value is None:
        return None
    logger.info(f"{sample}: pseudo-spots at the slide's recorded {float(value):.4g} µm/px "
                f"({record.get('pixel_size_source', 'read_slide')})")
    return float(value)


def _image_scale(xy: np.ndarray, centers_px: np.ndarray) -> float | None:
    """Level-0 pixels per ``.obsm["spatial"]`` unit when ``centers_px`` is ``xy`` times one number, else ``None``.

    The legacy ``.uns["spatial"]`` block knows one scale factor per image and no offset or rotation.
    """
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    px = np.asarray(centers_px, dtype=np.float64)
    norm = float((xy * xy).sum())
    if not len(xy) or norm == 0 or not np.isfinite(xy).all():
        return None
    scale = float((xy * px).sum() / norm)
    if not scale > 0 or np.abs(xy * scale - px).max() > 1.0:  # within a level-0 pixel
        return None
    return scale


def _record_images(out: AnnData, sdata: SpatialData, samples: list[Any], *, spatial_image: int | None) -> None:
    """Record each sample's image in ``out`` and write the legacy ``.uns["spatial"]`` block (``spatial_image``)."""
    from hyperst.pp._pyramid import thumbnail

    block = out.uns[Key.UNS].setdefault(Key.UNS_SPOTS, {})
    legacy: dict[str, Any] = {}
    for s in samples:
        if s.table_rows is None:
            continue
        scale = _image_scale(out.obsm[Key.OBSM_SPATIAL][s.table_rows], s.centers_px)
        entry = dict(block.get(s.sample, {}))
        entry["image_key"] = s.image_key
        entry.setdefault("pixel_size", float(s.pixel_size))
        entry.setdefault("spot_diameter", float(s.spot_diameter))
        if scale is None:
            logger.warning(
                f"sample {s.sample!r}: `.obsm['spatial']` is not a scaled copy of the spots' pixel positions on "
                f"`{s.image_key}`, so no image is recorded for plots (pass `image=` and `scale_factor=` to "
                "hst.pl.spatial)."
            )
        else:
            entry["image_scale"] = scale
        block[s.sample] = entry
        if scale is None or spatial_image is None:
            continue
        image = sdata.images[s.image_key]
        hires, hires_scale = thumbnail(image, max_side=int(spatial_image))
        lowres, lowres_scale = thumbnail(image, max_side=min(600, int(spatial_image)))
        legacy[s.sample] = {
            Key.SPATIAL_IMAGES: {Key.SPATIAL_HIRES: hires, Key.SPATIAL_LOWRES: lowres},
            Key.SPATIAL_SCALEFACTORS: {
                Key.SCALEF_HIRES: hires_scale * scale,
                Key.SCALEF_LOWRES: lowres_scale * scale,
                Key.SPOT_DIAMETER_FULLRES: float(entry["spot_diameter"]) / float(entry["pixel_size"]) / scale,
            },
            Key.SPATIAL_METADATA: {"image_key": s.image_key, "source": "hyperst.tl.predict"},
        }
    if legacy:
        out.uns[Key.UNS_SPATIAL] = {**out.uns.get(Key.UNS_SPATIAL, {}), **legacy}


def _predict_table(
    model: HyperST,
    data: AnnData,
    *,
    spot_key: str,
    niche_key: str,
    layer: Literal["auto"] | bool,
    batch_size: int,
    alpha: float,
) -> AnnData:
    import anndata as ad
    import scipy.sparse as sp

    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1) (0.1 gives 90 % intervals), got {alpha!r}.")
    if data.n_obs == 0:
        raise ValueError("`data` has no spots (0 rows): nothing to predict. Check the table or the spots you subset.")
    if spot_key == Key.OBSM_FEATURES_SPOT:  # the record describes the default feature keys
        check_feature_origin(data, backbone=model.backbone, crop_geometry=model.crop_geometry, what="`data`")
    spot = feature_matrix(data, spot_key, "spot")
    niche = feature_matrix(data, niche_key, "niche") if model.config.has_niche else None
    members, embs = model.predict_members(spot, niche, batch_size=batch_size)
    pred = members.mean(0).astype(np.float32)
    has_counts = set(model.genes) <= set(map(str, data.var_names))
    to_layer = has_counts if layer == "auto" else bool(layer)
    var = pd.DataFrame(index=pd.Index(model.genes, name=None))
    if to_layer and not has_counts:
        raise ValueError("`layer=True` needs the model's genes in `data` (their measured counts go to `.X`).")
    counts = None
    if has_counts:
        counts = data[:, model.genes].X
        counts = counts.copy() if sp.issparse(counts) else np.array(counts, copy=True)
    if to_layer:
        out = ad.AnnData(X=counts, obs=data.obs.copy(), var=var)
        out.layers[Key.LAYER_PRED] = pred
    else:
        out = ad.AnnData(X=pred, obs=data.obs.copy(), var=var)
    observed = _log_counts(counts) if counts is not None else None
    if observed is not None:
        out.layers[Key.LAYER_OBSERVED] = observed
    if Key.OBSM_SPATIAL in data.obsm:
        out.obsm[Key.OBSM_SPATIAL] = np.array(data.obsm[Key.OBSM_SPATIAL], copy=True)
    if isinstance(data.uns.get(Key.UNS_SPATIAL), Mapping):  # legacy images: new dicts, arrays shared (read only)
        out.uns[Key.UNS_SPATIAL] = {
            lib: {k: dict(v) if isinstance(v, Mapping) else v for k, v in entry.items()}
            if isinstance(entry, Mapping) else entry
            for lib, entry in data.uns[Key.UNS_SPATIAL].items()
        }
    out.obsm[Key.OBSM_IMAGE_SPOT] = embs["image_spot"]
    if "image_niche" in embs:
        out.obsm[Key.OBSM_IMAGE_NICHE] = embs["image_niche"]
    out.obs[Key.OBS_RADIUS] = model.radius(embs["image_spot"])
    x = spot if niche is None else np.concatenate([spot, niche], axis=1)  # what the depth and domain models see
    if model.depth is not None:  # normalised targets: the depth is a separate output
        out.obs[Key.OBS_LOG2_DEPTH] = model.depth.predict(x)
    record: dict[str, Any] = {
        "genes": model.genes, "layer": Key.LAYER_PRED if to_layer else "X",
        "observed_layer": Key.LAYER_OBSERVED if observed is not None else None, "backbone": model.backbone,
        "crop_geometry": model.crop_geometry, "curvature": float(model.network.curvature.detach().cpu()),
        "n_members": model.n_members,
    }
    if model.domain is not None and model.calibration is not None:
        samples = (data.obs[Key.OBS_SAMPLE].astype(str).to_numpy() if Key.OBS_SAMPLE in data.obs
                   else np.full(data.n_obs, "all"))
        score, flag, report = model.domain.check(x, samples, slide_records([data]))
        out.obs[Key.OBS_OOD_SCORE] = score
        out.obs[Key.OBS_OOD] = flag
        for message in report["messages"]:
            logger.warning(f"domain shift: {message}")
        for note in report["notes"]:
            logger.info(f"domain note: {note}")
        bands = model.calibration.intervals(members, model.domain.space.whiten(x), alpha=alpha)
        out.layers[Key.LAYER_LOWER] = bands["lower"]
        out.layers[Key.LAYER_UPPER] = bands["upper"]
        out.layers[Key.LAYER_STD] = bands["std"]
        out.obs[Key.OBS_UNCERTAINTY] = bands["uncertainty"]
        record.update(alpha=float(alpha), domain=report)
    else:
        logger.info("this model was trained without validation data: no prediction intervals or domain checks")
    out.uns[Key.UNS] = {Key.UNS_PREDICT: jsonable(record, drop_none=True)}
    spots = data.uns.get(Key.UNS, {}).get(Key.UNS_SPOTS)
    if spots is not None:  # the resolved spot geometry (pixel size, spot diameter): plots draw spots to scale
        out.uns[Key.UNS][Key.UNS_SPOTS] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in spots.items()}
    return _annotate(out, data)


def _log_counts(counts: Any) -> Any:
    """log2(1 + counts) as float32 (sparse stays sparse), or ``None`` (logged) when they are not counts."""
    import scipy.sparse as sp

    values = counts.data if sp.issparse(counts) else np.asarray(counts)
    if values.dtype.kind not in "biuf" or not np.isfinite(values).all() or (values < 0).any():
        logger.warning(
            "the input's values of the model's genes are not non-negative counts (negative, NaN or non-numeric): "
            f"no `.layers[{Key.LAYER_OBSERVED!r}]` with their log2(1 + counts)."
        )
        return None
    if sp.issparse(counts):
        out = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        out.data = np.log2(1.0 + out.data.astype(np.float64)).astype(np.float32)
        return out
    return np.log2(1.0 + values.astype(np.float64)).astype(np.float32)


def _annotate(out: AnnData, data: AnnData) -> AnnData:
    """``out`` as a SpatialData table annotating the spots of ``data`` (see :func:`predict`)."""
    from spatialdata.models import TableModel

    attrs = data.uns.get(TableModel.ATTRS_KEY)
    obs = out.obs
    if isinstance(attrs, Mapping):
        region_key, instance_key = attrs.get(TableModel.REGION_KEY_KEY), attrs.get(TableModel.INSTANCE_KEY)
        regions = attrs.get(TableModel.REGION_KEY)
        regions = [regions] if isinstance(regions, str) else [str(r) for r in np.atleast_1d(regions)]
        if region_key in obs.columns and instance_key in obs.columns:
            values = obs[region_key].astype(str)
            region = [r for r in regions if r in set(values)]  # a subset table annotates only its regions' spots
            try:
                if not values.isin(region).all():
                    raise ValueError(f"`.obs[{region_key!r}]` names regions outside {regions[:5]}")
                obs[region_key] = pd.Categorical(values, categories=region)
                return TableModel.parse(out, region=region, region_key=region_key, instance_key=instance_key,
                                        overwrite_metadata=True)
            except (ValueError, TypeError) as err:
                reason = str(err)
        else:
            reason = f"its region/instance columns {region_key!r}/{instance_key!r} are missing"
        logger.warning(
            f"the input table's spatialdata annotation cannot be kept ({reason}); the prediction table annotates "
            f"f'{{sample}}_spots' by `.obs[{Key.TABLE_INSTANCE_KEY!r}]` instead."
        )
    elif Key.TABLE_REGION_KEY in obs.columns:
        logger.warning(
            f"`data` has an `.obs[{Key.TABLE_REGION_KEY!r}]` column but no spatialdata annotation: the prediction "
            f"table's `.obs[{Key.TABLE_REGION_KEY!r}]` names the spots element instead (f'{{sample}}_spots')."
        )
    region_key, instance_key = Key.TABLE_REGION_KEY, Key.TABLE_INSTANCE_KEY
    samples = obs[Key.OBS_SAMPLE].astype(str) if Key.OBS_SAMPLE in obs.columns else pd.Series("", index=obs.index)
    names = np.where(samples.to_numpy() == "", "spots", samples.to_numpy() + "_spots").astype(str)
    region = list(dict.fromkeys(names))
    obs[region_key] = pd.Categorical(names, categories=region)
    ids = obs[instance_key] if instance_key in obs.columns else None
    usable = (ids is not None and not ids.isna().any()
              and (pd.api.types.is_integer_dtype(ids) or pd.api.types.is_string_dtype(ids))
              and not pd.DataFrame({"r": names, "i": ids.to_numpy()}).duplicated().any())
    if not usable:
        obs[instance_key] = obs.groupby(region_key, observed=True).cumcount().to_numpy().astype(np.int64)
    return TableModel.parse(out, region=region, region_key=region_key, instance_key=instance_key,
                            overwrite_metadata=True)
