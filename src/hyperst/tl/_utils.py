"""Helpers shared by the ``hst.tl`` modules: the tables behind user data, combined tables, group folds.

And what cross-validation and the benchmark share: the checked feature table, the genes of a fold and
the table a fold's model is fitted on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hyperst._constants import Key

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["FOLD_SEP", "combined_table", "feature_table", "fit_table", "fold_genes", "group_folds", "tables"]

#: separator of several held-out groups in the ``fold`` column of cross-validation and benchmark results.
FOLD_SEP = "+"


def tables(data: Any, table_key: str | None) -> list[AnnData]:
    """The AnnData tables behind ``data`` (AnnData, SpatialData, or a list of either)."""
    from anndata import AnnData

    items = list(data) if isinstance(data, list | tuple) else [data]
    if not items:
        raise ValueError("`data` is empty: pass an AnnData, a SpatialData, or a list of them.")
    tables = []
    for item in items:
        if isinstance(item, AnnData):
            tables.append(item)
            continue
        if hasattr(item, "tables"):
            keys = list(item.tables.keys())
            key = table_key
            if key is None:  # outputs of hst.tl.predict are not training tables
                inputs = [k for k in keys if Key.UNS_PREDICT not in item.tables[k].uns.get(Key.UNS, {})]
                if len(inputs) != 1:
                    raise ValueError(f"A SpatialData in `data` has tables {sorted(keys)}: pass `table_key`.")
                key = inputs[0]
            if key not in item.tables:
                raise ValueError(f"`table_key={key!r}` is not a table of the SpatialData; tables: {sorted(keys)}.")
            tables.append(item.tables[key])
            continue
        raise TypeError(f"`data` must hold AnnData or SpatialData objects, got {type(item).__name__}.")
    return tables


def combined_table(data: Any, table_key: str | None, groupby: str) -> AnnData:
    """One AnnData over all spots of ``data``; the input objects are never modified."""
    import anndata as ad

    found = tables(data, table_key)
    if len(found) == 1:
        return found[0]
    missing = [i for i, t in enumerate(found) if groupby not in t.obs.columns]
    if missing:
        raise ValueError(
            f"Tables {missing} of `data` have no `.obs[{groupby!r}]` column: label every table's spots with "
            f"their group (e.g. `adata.obs[{groupby!r}] = 'slide1'`) or pass another `groupby`."
        )
    names = pd.Index(np.concatenate([np.asarray(t.obs_names) for t in found]))
    kwargs: dict[str, Any] = {}
    if not names.is_unique:
        # prefix by position so that spots of different tables never share a name
        kwargs = {"keys": [str(i) for i in range(len(found))], "index_unique": "-"}
    combined = ad.concat(found, join="inner", merge="same", uns_merge="unique", pairwise=True, **kwargs)
    if combined.n_vars == 0:
        raise ValueError("The tables of `data` share no genes.")
    return combined


def group_folds(labels: np.ndarray, folds: Sequence[Sequence[str] | str] | None, groupby: str) -> list[list[str]]:
    """Held-out groups of each fold: ``folds`` checked against the groups in ``labels`` (default: one per group)."""
    groups = [str(g) for g in pd.unique(labels)]
    if len(groups) < 2:
        raise ValueError(
            f"`.obs[{groupby!r}]` has {len(groups)} group(s); cross-validation needs at least two "
            "(pass another `groupby`, e.g. 'sample' or 'patient')."
        )
    if folds is None:
        return [[g] for g in groups]
    if isinstance(folds, str):
        raise TypeError("`folds` must be a sequence of folds (each a group name or a list of group names).")
    out = []
    for i, fold in enumerate(folds):
        held = [fold] if isinstance(fold, str) else [str(g) for g in fold]
        if not held:
            raise ValueError(f"Fold {i} of `folds` is empty.")
        unknown = sorted(set(held) - set(groups))
        if unknown:
            raise ValueError(f"Fold {i} of `folds` names unknown groups {unknown}; `.obs[{groupby!r}]` has {groups}.")
        if set(held) == set(groups):
            raise ValueError(f"Fold {i} of `folds` holds out every group: nothing is left to train on.")
        out.append(list(dict.fromkeys(held)))
    if not out:
        raise ValueError("`folds` is empty.")
    return out


def feature_table(data: Any, table_key: str | None, groupby: str, spot_key: str) -> AnnData:
    """:func:`combined_table` of ``data``, checked to have the ``groupby`` column and spot features."""
    table = combined_table(data, table_key, groupby)
    if groupby not in table.obs.columns:
        raise ValueError(
            f"The table has no `.obs[{groupby!r}]` column; columns: {list(table.obs.columns)}. "
            "Pass the column naming each spot's slide or patient as `groupby`."
        )
    if spot_key not in table.obsm:
        raise ValueError(
            f"The table has no image features in `.obsm[{spot_key!r}]`. Compute them first with "
            "`hst.pp.image_features(sdata, backbone=...)` (frozen backbone: no labels are used, so once for all "
            "folds is fine)."
        )
    return table


def fold_genes(
    table: AnnData, train_mask: np.ndarray, *, layer: str | None, sample_key: str, select: Mapping[str, Any]
) -> list[str]:
    """Genes of one fold: :func:`hyperst.pp.select_genes` with ``select`` on the training spots only.

    Libraries are ``.obs[sample_key]`` when the table has that column (else one library).
    """
    from hyperst.pp._genes import select_genes

    lib = sample_key if sample_key in table.obs.columns else None
    return select_genes(table[train_mask], layer=layer, library_key=lib, inplace=False, **dict(select))


def fit_table(table: AnnData, mask: np.ndarray, genes: Sequence[str], *, normalize: bool) -> AnnData:
    """A copy of the spots ``mask`` to fit on (``fit`` writes into its tables).

    Restricted to ``genes`` unless ``normalize``: library-size normalised targets need every gene.
    """
    sub = table[mask] if normalize else table[mask, list(genes)]
    return sub.copy()
