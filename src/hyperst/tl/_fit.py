"""``hst.tl.fit`` and ``hst.tl.predict`` on tables with precomputed image features (frozen mode)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst._utils import jsonable, resolve_device
from hyperst.nn import HyperSTConfig
from hyperst.pp._crops import CropGeometry
from hyperst.tl._lora import LoraSpec
from hyperst.tl._model import HyperST
from hyperst.tl._utils import tables

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from hyperst.tl._train import FeatureData

__all__ = ["fit", "predict"]

Validation = Literal["auto", "slide", "spatial"] | Sequence[str] | np.ndarray | None


# ---------------------------------------------------------------------------------------------- inputs
def _features(adata: AnnData, key: str, what: str) -> np.ndarray:
    if key not in adata.obsm:
        raise ValueError(
            f"The table has no {what} features in `.obsm[{key!r}]`. Compute them first with "
            "`hst.pp.image_features(sdata, backbone=...)`, or pass the key holding them."
        )
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if x.ndim != 2 or len(x) != adata.n_obs:
        raise ValueError(f"`.obsm[{key!r}]` must be a 2-d array with one row per spot, got shape {x.shape}.")
    return x


def _samples(adatas: list[AnnData], sample_key: str) -> np.ndarray:
    labels = []
    for i, a in enumerate(adatas):
        if sample_key in a.obs.columns:
            labels.append(a.obs[sample_key].astype(str).to_numpy())
        else:
            labels.append(np.full(a.n_obs, f"table{i}" if len(adatas) > 1 else "sample0"))
    return np.concatenate(labels)


def _provenance(adatas: list[AnnData]) -> tuple[dict | None, dict | None, dict]:
    """Backbone and crop geometry of the features, and the spot geometry, as recorded by ``hst.pp``."""
    uns = adatas[0].uns.get(Key.UNS, {})
    rec = uns.get(Key.UNS_FEATURES)
    spots = {}
    meta = uns.get(Key.UNS_SPOTS)
    if isinstance(meta, Mapping) and meta:
        first = next(iter(meta.values()))
        spots = {k: first[k] for k in ("layout", "spot_diameter", "pitch") if k in first}
    if not isinstance(rec, Mapping):
        return None, None, spots
    return rec.get("backbone"), rec.get("crop_geometry"), spots


def _split(
    adatas: list[AnnData],
    samples: np.ndarray,
    validation: Validation,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Boolean train/validation masks over the concatenated spots, and a description."""
    from hyperst.tl._train import spatial_block_split

    n = len(samples)
    uniq = list(pd.unique(samples))
    if validation is None:
        return np.ones(n, bool), np.zeros(n, bool), "none"
    if isinstance(validation, np.ndarray) and validation.dtype == bool:
        if len(validation) != n:
            raise ValueError(f"`validation` mask has {len(validation)} entries for {n} spots.")
        return ~validation, validation.copy(), "mask"
    if not isinstance(validation, str):
        names = [str(v) for v in validation]
        unknown = sorted(set(names) - set(uniq))
        if unknown:
            raise ValueError(f"`validation` names unknown samples {unknown}; samples: {uniq}.")
        val = np.isin(samples, names)
        if val.all():
            raise ValueError("`validation` holds every sample: nothing is left to train on.")
        return ~val, val, f"slides {names}"
    if validation not in ("auto", "slide", "spatial"):
        raise ValueError(
            f"`validation` must be 'auto', 'slide', 'spatial', sample names, a mask or None; got {validation!r}."
        )
    if validation == "slide" or (validation == "auto" and len(uniq) >= 3):
        if len(uniq) < 2:
            raise ValueError("`validation='slide'` needs at least two samples.")
        rng = np.random.default_rng(seed)
        n_val = min(len(uniq) - 1, max(1, round(val_fraction * len(uniq))))
        names = [uniq[i] for i in sorted(rng.choice(len(uniq), size=n_val, replace=False))]
        val = np.isin(samples, names)
        return ~val, val, f"slides {names}"
    # spatially blocked split inside every sample
    coords = np.concatenate([_coords(a) for a in adatas])
    train = np.zeros(n, bool)
    val = np.zeros(n, bool)
    for s in uniq:
        idx = np.flatnonzero(samples == s)
        xy = coords[idx]
        pitch = _pitch(xy)
        extent = float(np.max(xy.max(0) - xy.min(0)))
        block = max(3 * pitch, extent / 5)
        t, v = spatial_block_split(xy, val_fraction=val_fraction, block_size=block, buffer=1.5 * pitch, seed=seed)
        train[idx[t]] = True
        val[idx[v]] = True
    return train, val, "spatial blocks"


def _coords(adata: AnnData) -> np.ndarray:
    if Key.OBSM_SPATIAL not in adata.obsm:
        raise ValueError(
            f"A spatially blocked validation split needs spot coordinates in `.obsm[{Key.OBSM_SPATIAL!r}]`; "
            "pass `validation=None` or sample names instead."
        )
    return np.asarray(adata.obsm[Key.OBSM_SPATIAL], dtype=np.float64)[:, :2]


def _pitch(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 1.0
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


# ---------------------------------------------------------------------------------------------- fit
def fit(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    mode: Literal["frozen", "lora"] = "frozen",
    genes: Sequence[str] | None = None,
    preset: str = "hyperst",
    config: Mapping[str, Any] | None = None,
    backbone: str | Mapping[str, Any] | Any = "efficientnet_lite0",
    weights: str | None = None,
    random_init: bool = False,
    lora: LoraSpec | Mapping[str, Any] | None = None,
    geometry: CropGeometry | Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    augment: bool = True,
    validation: Validation = "auto",
    val_fraction: float = 0.15,
    sample_key: str = Key.OBS_SAMPLE,
    table_key: str | None = None,
    layer: str | None = None,
    normalize: bool = False,
    min_tissue: float | None = None,
    spot_key: str = Key.OBSM_FEATURES_SPOT,
    niche_key: str = Key.OBSM_FEATURES_NICHE,
    max_epochs: int = 200,
    batch_size: int = 128,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    patience: int = 10,
    seed: int = 42,
    device: str = "auto",
    precision: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | Any = "auto",
    num_nodes: int = 1,
    num_workers: int = 0,
    progress: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
    key_added: str = Key.OBSM_IMAGE_SPOT,
) -> HyperST:
    """Train HyperST on spots with measured expression.

    Two modes:

    - ``"frozen"`` (default): image features of a frozen backbone (:func:`hyperst.pp.image_features`,
      computed here for SpatialData that lack them) and only the HyperST heads train. Runs on a
      laptop CPU (minutes for a few thousand spots).
    - ``"lora"``: end to end through the image backbone with LoRA adapters (peft; ``hyperst[lora]``)
      on its last blocks, streaming the spot/niche crops of :func:`hyperst.pp.crops` with the shared
      random dihedral augmentation. The GPU path; it also runs (slowly, with a tiny backbone) on CPU.

    Parameters
    ----------
    data
        One AnnData/SpatialData or a list of them (``"lora"`` needs SpatialData: it reads the images).
        Tables hold raw counts and, for spatial validation, ``.obsm["spatial"]``; samples are told
        apart by ``.obs[sample_key]``.
    mode
        ``"frozen"`` or ``"lora"``.
    genes
        Genes to predict. Default: the genes marked by :func:`hyperst.pp.select_genes` in the first
        table (``.var["hyperst_selected"]``), else a fresh ``select_genes`` (HMHVG).
    preset
        Model variant (see :data:`hyperst.nn.PRESETS`).
    config
        Overrides of :class:`hyperst.nn.HyperSTConfig` fields (e.g. ``{"emb_dim": 256}``).
    backbone, weights, random_init
        Image backbone (see :func:`hyperst.pp.image_features`): used to compute missing features in
        frozen mode, and fine-tuned in LoRA mode.
    lora
        LoRA settings (:class:`LoraSpec`; default r = 8, α = 16, dropout 0.1 on the last 11 blocks).
    geometry
        Crop geometry (default from the spot layout, METHOD §1).
    cache_dir
        On-disk crop cache (see :func:`hyperst.pp.crops`).
    augment
        LoRA mode: random dihedral augmentation of the training crops.
    validation
        ``"auto"``: hold out whole slides when there are three or more, else a spatially blocked split
        (whole blocks of spots, with a one-niche buffer dropped from training so no neighbourhood
        straddles the split); ``"slide"``, ``"spatial"``; a list of sample names; a boolean mask; or
        ``None`` (train on everything for ``max_epochs``, no early stopping).
    val_fraction
        Fraction of slides (or spots) held out for validation.
    sample_key
        ``.obs`` column with sample names.
    table_key
        Table of each SpatialData (when it has several).
    layer
        Layer with raw counts (default ``.X``).
    normalize
        Library-size normalised targets (log2(1 + normalize_total)) instead of log2(1 + raw counts).
    min_tissue
        Train only on spots whose crop is at least this fraction tissue (``.obs["hyperst_tissue_fraction"]``,
        from :func:`hyperst.pp.image_features`; the reference uses 0.15). ``None``: all spots.
    spot_key, niche_key
        ``.obsm`` keys of the spot and niche image features (frozen mode).
    max_epochs, batch_size, lr, weight_decay, patience
        Optimisation (reference: 200, 128, 1e-4, 0.01, 10). Early stopping and best-weight
        restoring use the validation loss.
    seed
        Seed of the initialisation, split, batching and augmentation: the same seed gives the same
        model on CPU.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    precision
        Lightning precision; ``"auto"``: bf16 mixed on GPU, fp32 on CPU.
    devices, strategy, num_nodes
        Passed to the Lightning ``Trainer`` (e.g. ``devices=4, strategy="ddp"``).
    num_workers
        DataLoader workers.
    progress
        Show progress bars.
    trainer_kwargs
        Any other ``Trainer`` option.
    key_added
        ``.obsm`` key of the image spot embedding written to each training table; the other streams go to
        ``f"{key_added}_niche"``, ``f"{key_added}_gene"`` and ``f"{key_added}_gene_niche"``. The default
        gives ``"X_hyperst"``, ``"X_hyperst_niche"``, ``"X_hyperst_gene"`` and ``"X_hyperst_gene_niche"``;
        pass another key to keep the embeddings of an earlier fit.

    Returns
    -------
    The trained :class:`HyperST`. Each training table also gains the embeddings in ``.obsm[key_added]``
    (image spot), ``.obsm[f"{key_added}_niche"]``, ``.obsm[f"{key_added}_gene"]``,
    ``.obsm[f"{key_added}_gene_niche"]`` (Lorentz space coordinates, for the streams the model has) and
    ``.uns["hyperst"]["fit"]``: ``"params"`` (training parameters), ``"genes"``, ``"config"``,
    ``"curvature"``, ``"key_added"``, ``"obsm_keys"`` (stream → ``.obsm`` key) and ``"history"``, the
    per-epoch history as ``{"columns": names, "data": (n_epochs, n_columns) float64 array}`` (``"epoch"``,
    ``"train/<metric>"``, ``"val/<metric>"``; NaN where an epoch lacks a metric; rebuild it with
    ``pandas.DataFrame(**history)``), a layout that ``.h5ad`` and ``.zarr`` can store. The record of the
    latest fit replaces an earlier one. Gene selection, niche expression and image feature keys are added
    when they had to be computed.
    """
    import torch

    from hyperst.pp._genes import select_genes, targets
    from hyperst.pp._niches import niche_targets
    from hyperst.tl._train import FeatureData, _TensorDataset, train

    if mode not in ("frozen", "lora"):
        raise ValueError(f"`mode` must be 'frozen' or 'lora', got {mode!r}.")
    obsm_keys = _obsm_keys(key_added, reserved=(spot_key, niche_key, Key.OBSM_SPATIAL, Key.OBSM_NICHE_EXPRESSION))
    items = list(data) if isinstance(data, list | tuple) else [data]
    if mode == "lora":
        parts, crop_arrays, geom = _lora_parts(items, table_key, geometry, cache_dir, progress)
    else:
        _ensure_features(items, table_key, spot_key, niche_key, backbone=backbone, weights=weights,
                         random_init=random_init, geometry=geometry, cache_dir=cache_dir, device=device,
                         progress=progress)
        parts = [_Part(a, np.arange(a.n_obs), a) for a in tables(items, table_key)]
        crop_arrays, geom = None, None
    if min_tissue is not None:
        parts, crop_arrays = _tissue_filter(parts, crop_arrays, min_tissue)
    adatas = [p.data for p in parts]
    if genes is None:
        first = adatas[0]
        if Key.VAR_SELECTED in first.var.columns and first.var[Key.VAR_SELECTED].any():
            sel = first.var[first.var[Key.VAR_SELECTED]]
            genes = list(sel.sort_values(Key.VAR_RANK).index) if Key.VAR_RANK in sel.columns else list(sel.index)
        else:
            genes = select_genes(adatas, layer=layer, library_key=sample_key if sample_key in first.obs else None,
                                 inplace=False)
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("No genes to predict: `genes` is empty.")
    y = np.concatenate([targets(a, genes, layer=layer, normalize=normalize) for a in adatas])

    backbone_record, crop_record, spot_geometry = _provenance(adatas)
    image_module = lora_spec = None
    if mode == "lora":
        from hyperst.pp._backbone import load_backbone, resolve_backbone_spec
        from hyperst.tl._lora import ResizeTo, add_lora

        spec = resolve_backbone_spec(backbone)
        if weights is not None:
            spec.weights = str(weights)
        backbone_record, crop_record = spec.to_dict(), geom.to_dict()
        torch.manual_seed(seed)
        trunk = load_backbone(spec, random_init=random_init)
        lora_spec = add_lora(trunk, LoraSpec.from_dict(lora) if isinstance(lora, Mapping) else lora)
        image_dim = int(trunk.feature_dim)
    else:
        spot = np.concatenate([_features(a, spot_key, "spot") for a in adatas])
        image_dim = spot.shape[1]
    cfg = HyperSTConfig.from_preset(preset, n_genes=len(genes), image_dim=image_dim, **(config or {}))
    yn = None
    if cfg.uses_alignment and cfg.has_niche:
        lib = sample_key if sample_key in adatas[0].obs.columns else None
        yn = np.concatenate([niche_targets(a, genes, layer=layer, library_key=lib) for a in adatas])

    samples = _samples(adatas, sample_key)
    train_mask, val_mask, split = _split(adatas, samples, validation, val_fraction, seed)
    logger.info(f"training on {train_mask.sum()} spots, validating on {val_mask.sum()} ({split})")
    torch.manual_seed(seed)
    if mode == "lora":
        from hyperst.nn import ImageHyperST
        from hyperst.pp._crops import SpotCropDataset

        image_module = ImageHyperST(ResizeTo(trunk, spec.input_size), cfg)
        tgt = {"targets": y} if yn is None else {"targets": y, "niche_targets": yn}

        def dataset(mask: np.ndarray, aug: bool) -> SpotCropDataset:
            return SpotCropDataset(
                crop_arrays[0], crop_arrays[1] if cfg.has_niche else None, targets=tgt,
                indices=np.flatnonzero(mask), mean=spec.mean, std=spec.std, augment=aug, seed=seed,
            )

        module, train_set = image_module, dataset(train_mask, augment)
        val_set = dataset(val_mask, False) if val_mask.any() else None
    else:
        niche = None
        if cfg.has_niche:
            niche = np.concatenate([_features(a, niche_key, "niche") for a in adatas])
            if niche.shape[1] != spot.shape[1]:
                raise ValueError(f"Spot ({spot.shape[1]}) and niche ({niche.shape[1]}) features differ in size.")
        arrays = FeatureData(spot=spot, niche=niche, targets=y, niche_targets=yn)
        module = None
        train_set = _TensorDataset(arrays, np.flatnonzero(train_mask))
        val_set = _TensorDataset(arrays, np.flatnonzero(val_mask)) if val_mask.any() else None

    model = HyperST(
        cfg,
        genes=genes,
        backbone=backbone_record,
        crop_geometry=crop_record,
        preprocessing={"targets": "log2p1", "normalize": bool(normalize), "layer": layer, **spot_geometry},
        network=None if image_module is None else image_module.network,
        image_model=image_module,
        lora=lora_spec,
    )
    dev = resolve_device(device)
    result = train(
        module if module is not None else model.network,
        train_set,
        val_set,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        seed=seed,
        accelerator="gpu" if dev.type == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        precision=precision,
        num_workers=num_workers,
        progress=progress,
        trainer_kwargs=trainer_kwargs,
    )
    model.to(dev)
    model.network.eval()
    model.history = result["history"]
    model.training = {
        "mode": mode,
        "preset": preset,
        "validation": split,
        "n_train": int(train_mask.sum()),
        "n_val": int(val_mask.sum()),
        "validation_samples": sorted(set(samples[val_mask])) if split.startswith("slides") else None,
        "max_epochs": max_epochs,
        "epochs": result["epochs"],
        "global_step": result["global_step"],
        "world_size": result["world_size"],
        "best_epoch": result["best_epoch"],
        "best_val_loss": result["best_val_loss"],
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "patience": patience,
        "seed": seed,
        "precision": precision,
        "min_tissue": min_tissue,
    }
    if mode == "lora":  # embeddings of the fine-tuned model: features from the adapted backbone
        spot_f = model.crop_features(crop_arrays[0], progress=progress)
        niche_f = model.crop_features(crop_arrays[1], progress=progress) if cfg.has_niche else None
        arrays = FeatureData(spot=spot_f, niche=niche_f, targets=y, niche_targets=yn)
    elif any(p.data is not p.table for p in parts):
        # spots left out of training (min_tissue) still get embeddings: every spot has features
        parts = [_Part(p.table, np.arange(p.table.n_obs), p.table) for p in parts]
        whole = [p.table for p in parts]
        arrays = FeatureData(
            spot=np.concatenate([_features(a, spot_key, "spot") for a in whole]),
            niche=np.concatenate([_features(a, niche_key, "niche") for a in whole]) if cfg.has_niche else None,
            targets=np.concatenate([targets(a, genes, layer=layer, normalize=normalize) for a in whole]),
            niche_targets=None if yn is None else np.concatenate(
                [niche_targets(a, genes, layer=layer, library_key=lib) for a in whole]),
        )
    _write_embeddings(model, parts, arrays, obsm_keys)
    return model


@dataclass
class _Part:
    """Spots of one user table used for training: ``data`` is ``table[rows]`` (``table`` itself when whole)."""

    table: AnnData
    rows: np.ndarray
    data: AnnData


def _ensure_features(
    items: list[Any], table_key: str | None, spot_key: str, niche_key: str, **kwargs: Any
) -> None:
    """Compute image features for SpatialData items whose table lacks them (default keys only)."""
    from anndata import AnnData

    from hyperst.pp._features import image_features

    for item in items:
        if isinstance(item, AnnData) or not hasattr(item, "tables"):
            continue
        (table,) = tables([item], table_key)
        if spot_key in table.obsm and niche_key in table.obsm:
            continue
        if (spot_key, niche_key) != (Key.OBSM_FEATURES_SPOT, Key.OBSM_FEATURES_NICHE):
            raise ValueError(f"`.obsm[{spot_key!r}]`/`[{niche_key!r}]` are missing from a SpatialData table.")
        image_features(item, table_key=table_key, **kwargs)


def _lora_parts(
    items: list[Any], table_key: str | None, geometry: Any, cache_dir: str | None, progress: bool
) -> tuple[list[_Part], tuple[np.ndarray, np.ndarray], CropGeometry]:
    from hyperst.pp._features import crops

    parts: list[_Part] = []
    spot, niche = [], []
    geom = None
    for item in items:
        if not hasattr(item, "images"):
            raise TypeError("`mode='lora'` trains on images: pass SpatialData objects, not AnnData.")
        for sc in crops(item, geometry=geometry, table_key=table_key, cache_dir=cache_dir, progress=progress):
            if sc.spots.table_key is None or sc.spots.table_rows is None:
                raise ValueError(f"Spots `{sc.spots.shapes_key}` have no table with measured expression.")
            table = item.tables[sc.spots.table_key]
            parts.append(_Part(table, sc.spots.table_rows, table[sc.spots.table_rows].copy()))
            spot.append(sc.spot)
            niche.append(sc.niche)
            if geom is not None and sc.geometry != geom:
                raise ValueError("The samples were cropped with different geometries: pass `geometry`.")
            geom = sc.geometry
    return parts, (np.concatenate(spot), np.concatenate(niche)), geom


def _tissue_filter(
    parts: list[_Part], crop_arrays: tuple[np.ndarray, np.ndarray] | None, min_tissue: float
) -> tuple[list[_Part], tuple[np.ndarray, np.ndarray] | None]:
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"`min_tissue` must be in [0, 1], got {min_tissue}.")
    out, keep_all = [], []
    for p in parts:
        if Key.OBS_TISSUE_FRACTION not in p.data.obs.columns:
            raise ValueError(
                f"`min_tissue` needs `.obs[{Key.OBS_TISSUE_FRACTION!r}]` (written by `hst.pp.image_features`)."
            )
        keep = p.data.obs[Key.OBS_TISSUE_FRACTION].to_numpy() >= min_tissue
        keep_all.append(keep)
        out.append(_Part(p.table, p.rows[keep], p.data if keep.all() else p.data[keep].copy()))
    n_dropped = sum(int((~k).sum()) for k in keep_all)
    logger.info(f"min_tissue={min_tissue}: {n_dropped} spots with less tissue left out")
    if not any(k.any() for k in keep_all):
        raise ValueError(f"No spot has a tissue fraction of at least `min_tissue={min_tissue}`.")
    if crop_arrays is not None:
        keep = np.concatenate(keep_all)
        crop_arrays = (crop_arrays[0][keep], crop_arrays[1][keep])
    return out, crop_arrays


def _obsm_keys(key_added: str, *, reserved: Sequence[str] = ()) -> dict[str, str]:
    """``.obsm`` key of each stream embedding written by :func:`fit`, derived from ``key_added``.

    ``"image_spot"`` → ``key_added``, ``"image_niche"`` → ``f"{key_added}_niche"``, ``"gene_spot"`` →
    ``f"{key_added}_gene"``, ``"gene_niche"`` → ``f"{key_added}_gene_niche"`` (the defaults are the
    ``Key.OBSM_*`` embedding keys). Raises for an empty key or one that would overwrite ``reserved`` keys.
    """
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    keys = {
        "image_spot": key_added,
        "image_niche": f"{key_added}_niche",
        "gene_spot": f"{key_added}_gene",
        "gene_niche": f"{key_added}_gene_niche",
    }
    clash = sorted(set(keys.values()) & set(reserved))
    if clash:
        raise ValueError(f"`key_added={key_added!r}` would overwrite `.obsm` {clash}; pass another key.")
    return keys


def _history_table(history: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-epoch history as ``{"columns": names, "data": (n_epochs, n_columns) float64}`` for ``.uns``.

    h5ad cannot store a list of dicts, nor keys with ``/`` (``"train/loss"``), so the names are a string
    array and the values one matrix (NaN where an epoch lacks a metric); ``pandas.DataFrame(**table)``
    rebuilds the table. ``"epoch"`` is the first column.
    """
    names = list(dict.fromkeys(["epoch", *(str(k) for h in history for k in h)]))
    col = {name: j for j, name in enumerate(names)}
    data = np.full((len(history), len(names)), np.nan, dtype=np.float64)
    for i, h in enumerate(history):
        data[i, 0] = i
        for k, v in h.items():
            data[i, col[str(k)]] = np.nan if v is None else float(v)
    return {"columns": np.array(names, dtype=object), "data": data}


def _write_embeddings(model: HyperST, parts: list[_Part], data: FeatureData, keys: Mapping[str, str]) -> None:
    """Write the stream embeddings (``.obsm[keys[stream]]``) and the fit record into each table (NaN: unused rows)."""
    import torch

    net = model.network.eval()
    embs: dict[str, list[np.ndarray]] = {}
    dev = model.device

    def rows(a: np.ndarray | None, sl: slice) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a[sl], np.float32)).to(dev)

    with torch.inference_mode():
        for start in range(0, len(data), 1024):
            sl = slice(start, start + 1024)
            out = net(rows(data.spot, sl), rows(data.niche, sl), rows(data.targets, sl), rows(data.niche_targets, sl))
            for k, v in out.embeddings.items():
                embs.setdefault(k, []).append(v.float().cpu().numpy())
    merged = {k: np.concatenate(v) for k, v in embs.items()}
    record = jsonable(
        {"params": model.training, "genes": model.genes, "config": model.config.to_dict(),
         "curvature": float(model.network.curvature.detach().cpu()), "key_added": keys["image_spot"],
         "obsm_keys": {k: keys[k] for k in merged}},
        drop_none=True,
    )
    record["history"] = _history_table(model.history)  # after _jsonable: keeps the NaN of missing metrics
    offset = 0
    for p in parts:
        n = len(p.rows)
        for k, v in merged.items():
            if p.data is p.table and n == p.table.n_obs:
                p.table.obsm[keys[k]] = v[offset : offset + n]
            else:
                full = p.table.obsm.get(keys[k])
                if full is None or full.shape != (p.table.n_obs, v.shape[1]):
                    full = np.full((p.table.n_obs, v.shape[1]), np.nan, dtype=np.float32)
                full[p.rows] = v[offset : offset + n]
                p.table.obsm[keys[k]] = full
        p.table.uns.setdefault(Key.UNS, {})[Key.UNS_FIT] = record
        offset += n


# ---------------------------------------------------------------------------------------------- predict
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
    device: str = "auto",
    batch_size: int = 1024,
    progress: bool = True,
) -> AnnData:
    """Predict expression from H&E alone.

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
    device
        Device of the backbone for SpatialData input.
    batch_size
        Spots per forward pass of the HyperST heads.
    progress
        Show progress bars.

    Returns
    -------
    A new AnnData over the spots and the model's genes with the prediction (log2(1 + counts) scale),
    the image embeddings in ``.obsm["X_hyperst"]`` / ``.obsm["X_hyperst_niche"]``, a confidence score in
    ``.obs["hyperst_confidence"]`` (see :meth:`HyperST.confidence`), and the input's ``.obs`` and
    ``.obsm["spatial"]``. For SpatialData it is also stored as ``sdata.tables[key_added]``.
    """
    from anndata import AnnData

    if isinstance(data, AnnData):
        return _predict_table(model, data, spot_key=spot_key, niche_key=niche_key, layer=layer, batch_size=batch_size)
    if not hasattr(data, "images"):
        raise TypeError(f"`data` must be an AnnData or a SpatialData, got {type(data).__name__}.")
    return _predict_spatialdata(
        model, data, layer=layer, table_key=table_key, shapes_key=shapes_key, image_key=image_key,
        pixel_size=pixel_size, key_added=key_added, grid=grid, device=device, batch_size=batch_size, progress=progress,
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
    device: str,
    batch_size: int,
    progress: bool,
) -> AnnData:
    from spatialdata.models import TableModel

    from hyperst.pp._features import image_features

    if model.backbone is None or model.crop_geometry is None:
        raise ValueError(
            "This model does not record the backbone and crop geometry of its features, so it cannot compute "
            "them from images. Compute features with the training backbone and pass the table instead."
        )
    if key_added in sdata.tables:
        raise ValueError(f"`sdata` already has a table {key_added!r}; pass another `key_added`.")
    if len(sdata.shapes) == 0 and len(sdata.points) == 0 and shapes_key is None:
        from hyperst.pp._tissue import grid_spots

        geom = model.crop_geometry
        pre = model.preprocessing
        opts = {"spot_diameter": pre.get("spot_diameter", 55.0), "pitch": pre.get("pitch", 100.0),
                "layout": "visium" if pre.get("layout", "visium") == "visium" else "square"}
        opts.update(grid or {})
        if pixel_size is None and "pixel_size" not in opts:
            raise ValueError("`sdata` has no spots: pass `pixel_size` (µm per pixel) to place pseudo-spots.")
        opts.setdefault("pixel_size", pixel_size)
        shapes_key = grid_spots(sdata, image_key=image_key, **opts)
        logger.info(f"placed {len(sdata.shapes[shapes_key])} pseudo-spots on the tissue ({geom})")
        pixel_size = opts["pixel_size"]
    table = image_features(
        sdata, backbone=model.image_backbone or model.backbone, geometry=model.crop_geometry, table_key=table_key,
        shapes_key=shapes_key, image_key=image_key, pixel_size=pixel_size, device=device, progress=progress,
    )
    out = _predict_table(model, table, spot_key=Key.OBSM_FEATURES_SPOT, niche_key=Key.OBSM_FEATURES_NICHE,
                         layer=layer, batch_size=batch_size)
    attrs = table.uns.get("spatialdata_attrs", {})
    if attrs:
        out = TableModel.parse(out, region=attrs["region"], region_key=attrs["region_key"],
                               instance_key=attrs["instance_key"])
    sdata.tables[key_added] = out
    return out


def _predict_table(
    model: HyperST,
    data: AnnData,
    *,
    spot_key: str,
    niche_key: str,
    layer: Literal["auto"] | bool,
    batch_size: int,
) -> AnnData:
    import anndata as ad
    import scipy.sparse as sp

    spot = _features(data, spot_key, "spot")
    niche = _features(data, niche_key, "niche") if model.config.has_niche else None
    pred, embs = model.predict_features(spot, niche, batch_size=batch_size)
    has_counts = set(model.genes) <= set(map(str, data.var_names))
    to_layer = has_counts if layer == "auto" else bool(layer)
    var = pd.DataFrame(index=pd.Index(model.genes, name=None))
    if to_layer:
        if not has_counts:
            raise ValueError("`layer=True` needs the model's genes in `data` (their measured counts go to `.X`).")
        x = data[:, model.genes].X
        x = x.copy() if sp.issparse(x) else np.array(x, copy=True)
        out = ad.AnnData(X=x, obs=data.obs.copy(), var=var)
        out.layers[Key.LAYER_PRED] = pred
    else:
        out = ad.AnnData(X=pred, obs=data.obs.copy(), var=var)
    if Key.OBSM_SPATIAL in data.obsm:
        out.obsm[Key.OBSM_SPATIAL] = np.array(data.obsm[Key.OBSM_SPATIAL], copy=True)
    if "spatial" in data.uns:
        out.uns["spatial"] = data.uns["spatial"]
    out.obsm[Key.OBSM_IMAGE_SPOT] = embs["image_spot"]
    if "image_niche" in embs:
        out.obsm[Key.OBSM_IMAGE_NICHE] = embs["image_niche"]
    out.obs[Key.OBS_CONFIDENCE] = model.confidence(embs["image_spot"])
    out.uns[Key.UNS] = {Key.UNS_PREDICT: jsonable({
        "genes": model.genes, "layer": Key.LAYER_PRED if to_layer else "X", "backbone": model.backbone,
        "crop_geometry": model.crop_geometry, "curvature": float(model.network.curvature.detach().cpu()),
    }, drop_none=True)}
    return out
