"""``hst.tl.cross_validate``: leave-one-group-out (or given folds) evaluation of frozen-mode HyperST."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.tl._utils import FOLD_SEP, feature_table, fit_table, fold_genes, group_folds

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["cross_validate"]

#: ``fit`` options that ``cross_validate`` sets itself (per fold / per seed).
_RESERVED = ("genes", "seed", "table_key")
#: metric rows with the wall time of each fold and seed (fit + predict + evaluate, gene selection excluded).
SECONDS = "seconds"


def cross_validate(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    groupby: str = Key.OBS_SAMPLE,
    folds: Sequence[Sequence[str] | str] | None = None,
    genes: Sequence[str] | None = None,
    ks: Sequence[int] = (10, 50, 200),
    seeds: Sequence[int] = (42,),
    fit_kwargs: Mapping[str, Any] | None = None,
    select_kwargs: Mapping[str, Any] | None = None,
    table_key: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Cross-validate frozen-mode HyperST by holding out whole groups (slides or patients).

    For every fold (by default each group of ``.obs[groupby]`` in turn: leave-one-group-out) and every
    seed, a model is trained with :func:`hyperst.tl.fit` on the other groups only, predicts the held-out
    spots (:func:`hyperst.tl.predict`), and is scored with :func:`hyperst.tl.evaluate`. Nothing about the
    held-out group is used in training: early stopping uses ``fit``'s own validation split *inside* the
    training groups (``validation="auto"`` unless ``fit_kwargs`` says otherwise), and when ``genes`` is
    ``None`` the genes are chosen per fold with :func:`hyperst.pp.select_genes` on the training groups
    only (any ``.var["hyperst_selected"]`` already in the table is ignored, since it may have seen the
    held-out group).

    Parameters
    ----------
    data
        An AnnData with image features in ``.obsm`` (see :func:`hyperst.pp.image_features`), a SpatialData
        whose table has them, or a list of these (their tables are concatenated: shared genes, features,
        ``.obsm["spatial"]``, niche graphs; spot names made unique). Not modified.
    groupby
        ``.obs`` column of the groups that are held out together: ``"sample"`` (slide) or e.g.
        ``"patient"`` for patient-grouped folds.
    folds
        Explicit folds: one entry per fold, the group(s) it holds out (a name or a list of names).
        ``None``: leave-one-group-out over all groups.
    genes
        Genes to predict in every fold. ``None``: selected per fold on the training groups.
    ks
        The K of PCC@K.
    seeds
        Seeds of the repeated fits (each fold is trained once per seed).
    fit_kwargs
        Options of :func:`hyperst.tl.fit` (e.g. ``{"max_epochs": 50, "config": {"emb_dim": 256}}``);
        ``genes``, ``seed`` and ``table_key`` are set here. Frozen mode only. ``sample_key``, ``layer``,
        ``spot_key`` and ``niche_key`` are also used for predicting and evaluating.
    select_kwargs
        Options of :func:`hyperst.pp.select_genes` for the per-fold gene selection (e.g. ``{"n_top": 250}``).
    table_key
        Table of the SpatialData in ``data`` (when it has several).
    progress
        Show a progress bar over folds × seeds (``fit``'s own progress bar stays off unless ``fit_kwargs``
        turns it on).

    Returns
    -------
    A tidy DataFrame with columns ``fold`` (held-out group(s), joined by ``"+"``), ``seed``, ``scope``,
    ``metric`` and ``value``. Scopes are as in :attr:`Evaluation.summary`: ``"pooled"`` over the held-out
    spots, each held-out slide (``fit_kwargs["sample_key"]``, default ``"sample"``), and
    ``"mean_over_slides"`` when a fold holds out several slides. Metrics are ``PCC@K``, ``MSE``, ``MAE``,
    ``n_spots`` and ``"seconds"`` (wall time of fit + predict + evaluate, scope ``"pooled"``).
    ``df.attrs["folds"]`` lists one record per fold and seed: held-out and training groups, genes, number
    of training/validation spots, the validation split, epochs and seconds.

    Raises
    ------
    ValueError
        If ``groupby`` is missing or has fewer than two groups, ``folds`` names unknown groups or holds out
        everything, ``genes`` names unknown genes, ``seeds``/``ks`` are empty, or ``fit_kwargs`` sets
        ``genes``/``seed``/``table_key`` or a boolean validation mask.
    NotImplementedError
        For ``fit_kwargs["mode"] == "lora"``.
    """
    import hyperst.tl._fit as fit_module
    from hyperst.tl._evaluate import evaluate
    from hyperst.tl._predict import predict

    fit_opts = dict(fit_kwargs or {})
    clash = [k for k in _RESERVED if k in fit_opts]
    if clash:
        raise ValueError(
            f"`fit_kwargs` sets {clash}: pass `genes`, `seeds` and `table_key` to `cross_validate` instead."
        )
    if fit_opts.get("mode", "frozen") != "frozen":
        raise NotImplementedError("`cross_validate` supports frozen mode only (precomputed image features).")
    validation = fit_opts.get("validation", "auto")
    if isinstance(validation, np.ndarray):
        raise ValueError(
            "`fit_kwargs['validation']` cannot be a spot mask in cross-validation (the training spots change "
            "per fold); use 'auto', 'slide', 'spatial', slide names or None."
        )
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("`seeds` is empty: pass at least one seed.")
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("`ks` is empty.")
    fit_opts.setdefault("progress", False)
    sample_key = fit_opts.get("sample_key", Key.OBS_SAMPLE)
    layer = fit_opts.get("layer")
    normalize = bool(fit_opts.get("normalize", False))
    predict_opts = {k: fit_opts[k] for k in ("spot_key", "niche_key") if k in fit_opts}

    table = feature_table(data, table_key, groupby, fit_opts.get("spot_key", Key.OBSM_FEATURES_SPOT))
    labels = table.obs[groupby].astype(str).to_numpy()
    fold_list = group_folds(labels, folds, groupby)
    if genes is not None:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in table.var_names]
        if missing:
            raise ValueError(f"{len(missing)} of `genes` are not in the data, e.g. {missing[:5]}.")
        if not genes:
            raise ValueError("`genes` is empty; pass None to select genes per fold.")
    from tqdm.auto import tqdm

    pbar = tqdm(total=len(fold_list) * len(seeds), disable=not progress, desc="cross-validation", unit="fit")
    frames, records = [], []
    for held in fold_list:
        name = FOLD_SEP.join(held)
        test_mask = np.isin(labels, held)
        train_mask = ~test_mask
        train_groups = [str(g) for g in pd.unique(labels[train_mask])]
        if genes is None:
            chosen = fold_genes(table, train_mask, layer=layer, sample_key=sample_key, select=select_kwargs or {})
        else:
            chosen = list(genes)
        train = fit_table(table, train_mask, chosen, normalize=normalize)
        test = table[test_mask]
        for seed in seeds:
            t0 = time.perf_counter()
            model = fit_module.fit(train, genes=chosen, seed=seed, **fit_opts)
            pred = predict(model, test, progress=False, **predict_opts)
            if normalize:
                from hyperst.pp._genes import targets

                truth = targets(test, model.genes, layer=layer, normalize=True)
                groups = test.obs[sample_key].to_numpy() if sample_key in test.obs.columns else None
                ev = evaluate(truth, pred, truth_transform="none", groups=groups, ks=ks)
            else:
                ev = evaluate(test, pred, genes=model.genes, truth_layer=layer, groups=sample_key, ks=ks)
            seconds = time.perf_counter() - t0
            summary = ev.summary.copy()
            summary = pd.concat(
                [summary, pd.DataFrame({"scope": ["pooled"], "metric": [SECONDS], "value": [seconds]})],
                ignore_index=True,
            )
            summary.insert(0, "seed", seed)
            summary.insert(0, "fold", name)
            frames.append(summary)
            tr = model.training
            records.append({
                "fold": name, "seed": seed, "test_groups": list(held), "train_groups": train_groups,
                "genes": list(model.genes), "n_train": tr.get("n_train"), "n_val": tr.get("n_val"),
                "validation": tr.get("validation"), "validation_samples": tr.get("validation_samples"),
                "epochs": tr.get("epochs"), "best_epoch": tr.get("best_epoch"), "seconds": seconds,
            })
            logger.info(
                f"fold {name} seed {seed}: pooled PCC@{ks[0]} {ev['pooled', f'PCC@{ks[0]}']:.3f} ({seconds:.1f} s)"
            )
            pbar.update(1)
    pbar.close()
    out = pd.concat(frames, ignore_index=True)[["fold", "seed", "scope", "metric", "value"]]
    out.attrs["folds"] = records
    out.attrs["groupby"] = groupby
    return out
