"""``hst.tl.fit``: the thin scanpy-style wrapper over :class:`hyperst.tl.HyperST`'s setup and training.

``fit`` groups its keywords into the option objects of :mod:`hyperst.tl._options`, then runs
:meth:`HyperST.setup` → :meth:`HyperST.train` and writes the embeddings into the training tables.
(``hst.tl.predict``, the model's ``predict``, lives in :mod:`hyperst.tl._predict`.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hyperst._constants import DEFAULT_BACKBONE, Key
from hyperst._utils import jsonable, restore_on_error
from hyperst.data._modules import Validation
from hyperst.tl._lora import LoraSpec
from hyperst.tl._model import HyperST
from hyperst.tl._options import DataOptions, ImageOptions, TrainerOptions, TrainOptions

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from hyperst.pp import CropGeometry

__all__ = ["fit"]


# ---------------------------------------------------------------------------------------------- fit
def fit(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    mode: Literal["frozen", "lora"] = "frozen",
    genes: Sequence[str] | None = None,
    preset: str = "hyperst",
    config: Mapping[str, Any] | None = None,
    backbone: str | Mapping[str, Any] | Any = DEFAULT_BACKBONE,
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
    n_members: int | Literal["auto"] = "auto",
    spot_key: str = Key.OBSM_FEATURES_SPOT,
    niche_key: str = Key.OBSM_FEATURES_NICHE,
    views: bool | Sequence[str] = True,
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
    checkpoint_dir: str | os.PathLike[str] | None = None,
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
    backbone, weights, random_init, lora, geometry, cache_dir, augment
        The image side (:class:`ImageOptions`): the backbone that computes missing features in frozen mode
        and is fine-tuned in LoRA mode, its LoRA settings (:class:`LoraSpec`), the crop geometry, an
        on-disk crop cache and the dihedral augmentation of LoRA training crops.
    validation, val_fraction, sample_key, table_key, layer, normalize, min_tissue, spot_key, niche_key, views
        Which spots and values the model trains on (:class:`DataOptions`). ``views``: train also on the
        augmented views that ``hst.pp.image_features(..., views=...)`` computed (other resolutions, stains,
        exports of the same spots), when the tables have them. ``validation="auto"`` holds out
        whole slides when there are three or more, else spatially blocked spots
        (:class:`hyperst.data.DataSplitter`); ``None`` trains on everything for ``max_epochs`` (and the
        model then has no prediction intervals).
    n_members
        Ensemble members (:class:`DataOptions`). ``"auto"``: ``min(5, n_slides)`` when whole slides are held
        out, each member validating on its own slides (every slide is held out once), else 1. The
        prediction is the members' mean, and their held-out residuals calibrate the intervals of
        :func:`hyperst.tl.predict`. Members train one after another (``n_members`` × the time of one).
    max_epochs, batch_size, lr, weight_decay, patience, seed, num_workers, progress
        Optimisation (:class:`TrainOptions`; reference: 200, 128, 1e-4, 0.01, 10). Early stopping and
        best-weight restoring use the validation loss; the same seed gives the same model on CPU.
    device, precision, devices, strategy, num_nodes, trainer_kwargs
        Where training runs (:class:`TrainerOptions`), e.g. ``devices=4, strategy="ddp"``.
    checkpoint_dir
        Folder for resumable training (:class:`TrainOptions`): the full training state is saved there after
        every epoch, and calling ``fit`` again with the same data, settings and folder resumes where the
        last run stopped (killed, interrupted or crashed) and ends with the same weights as an uninterrupted
        run (CPU, same seed). Ctrl-C / SIGINT / SIGTERM during training stop it after the current batch,
        with or without this folder: ``fit`` then returns the model with the best weights so far, marked
        ``model.interrupted`` (and ``params["interrupted"]`` in the fit record), and logs a warning.
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
    obsm_keys = _obsm_keys(key_added, reserved=(spot_key, niche_key, Key.OBSM_SPATIAL, Key.OBSM_NICHE_EXPRESSION))
    train = TrainOptions(max_epochs=max_epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         patience=patience, seed=seed, num_workers=num_workers, progress=progress,
                         checkpoint_dir=checkpoint_dir)
    hardware = TrainerOptions(device=device, precision=precision, devices=devices, strategy=strategy,
                              num_nodes=num_nodes, trainer_kwargs=trainer_kwargs)
    options = DataOptions(validation=validation, val_fraction=val_fraction, sample_key=sample_key, table_key=table_key,
                          layer=layer, normalize=normalize, min_tissue=min_tissue, spot_key=spot_key,
                          niche_key=niche_key, views=views, n_members=n_members)
    image = ImageOptions(backbone=backbone, weights=weights, random_init=random_init, lora=lora, geometry=geometry,
                         cache_dir=cache_dir, augment=augment)
    with restore_on_error(data if isinstance(data, Sequence) else [data]):  # a failed fit leaves `data` as it was
        model = HyperST.setup(data, mode=mode, genes=genes, preset=preset, config=config, options=options,
                              image=image, seed=seed, device=device, progress=progress)
        model.train(train, hardware=hardware)
        _write_embeddings(model, obsm_keys, progress=progress)
    return model


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


def _write_embeddings(model: HyperST, keys: Mapping[str, str], *, progress: bool) -> None:
    """Write the stream embeddings (``.obsm[keys[stream]]``) and the fit record into each training table.

    Rows a table did not train on get NaN, except spots left out by ``min_tissue`` in frozen mode: every
    spot has features, so every spot gets embeddings.
    """
    from hyperst.data import FeatureData
    from hyperst.tl._setup import Part, feature_matrix, niche_target_matrix, target_matrix

    reg = model.registered
    parts, features = reg.parts, None
    if reg.mode == "frozen" and any(p.data is not p.table for p in parts):
        whole = [p.table for p in parts]
        opts = model.data_options
        features = FeatureData(
            spot=np.concatenate([feature_matrix(a, opts.spot_key, "spot") for a in whole]),
            niche=np.concatenate([feature_matrix(a, opts.niche_key, "niche") for a in whole])
            if model.config.has_niche else None,
            targets=target_matrix(whole, reg.genes, opts),
            niche_targets=None if reg.niche_targets is None else niche_target_matrix(whole, reg.genes, opts),
        )
        parts = [Part(t, np.arange(t.n_obs), t) for t in whole]
    merged = model.get_embeddings(features, progress=progress)
    params = {k: v for k, v in model.training.items() if k != "members"}  # h5ad stores no list of dicts
    members = model.training.get("members") or []
    params["member_validation"] = [str(m.get("validation")) for m in members]
    params["member_best_epoch"] = [-1 if m.get("best_epoch") is None else int(m["best_epoch"]) for m in members]
    record = jsonable(
        {"params": params, "genes": model.genes, "config": model.config.to_dict(),
         "curvature": float(model.network.curvature.detach().cpu()), "key_added": keys["image_spot"],
         "obsm_keys": {k: keys[k] for k in merged}},
        drop_none=True,
    )
    record["history"] = _history_table(model.history)  # after jsonable: keeps the NaN of missing metrics
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
