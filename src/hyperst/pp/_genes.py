"""Gene selection and regression targets (:func:`hyperst.pp.select_genes`, :func:`hyperst.pp.targets`).

HyperST (following Stem) predicts a few hundred genes chosen from the training slides. The selection
rules are those of METHOD §1:

- per slide: ``normalize_total`` + ``log1p`` + the top ``n_hvg`` highly variable genes
  (:func:`scanpy.pp.highly_variable_genes`, flavor ``"seurat"``), union over slides;
- drop mitochondrial and ribosomal genes;
- pool the raw counts of all slides and rank genes by their mean and standard deviation.

Count access and validation, gene look-up and the ``.uns`` block come from :mod:`hyperst.pp._utils`
(shared with :mod:`hyperst.pp._niches` and :mod:`hyperst.tl`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.pp._utils import (
    check_counts,
    counts_matrix,
    layer_name,
    libraries,
    uns_block,
    validate_gene_list,
)

__all__ = ["select_genes", "targets"]

_FLAVORS = ("hmhvg", "mean", "hvg", "list")
_SCALES = ("raw", "log2")


def select_genes(
    adatas: AnnData | Sequence[AnnData],
    *,
    flavor: Literal["hmhvg", "mean", "hvg", "list"] = "hmhvg",
    n_top: int = 300,
    genes: Sequence[str] | None = None,
    n_hvg: int = 2000,
    exclude_patterns: Sequence[str] = ("^MT-", "^RP[SL]"),
    layer: str | None = None,
    library_key: str | None = None,
    scale: Literal["raw", "log2"] = "raw",
    inplace: bool = True,
) -> list[str]:
    """Select the genes HyperST predicts, jointly over one or several samples.

    Only genes measured in every sample are considered (the intersection of the ``var_names``; how many
    genes this drops is logged). The flavors follow METHOD §1 (ref: Stem's preprocessing):

    ``"hmhvg"`` (default, ref)
        Per sample: drop spots/genes without counts, ``normalize_total`` + ``log1p``, top-``n_hvg``
        highly variable genes (:func:`scanpy.pp.highly_variable_genes`, flavor ``"seurat"``). Union
        over samples, minus genes matching ``exclude_patterns``. Pool the spots of all samples and keep
        the genes that are both in the top ``n_top`` by mean and in the top ``n_top`` by standard
        deviation (so at most ``n_top`` genes).
    ``"hvg"``
        Same HVG union and exclusion, then the top ``n_top`` by pooled mean.
    ``"mean"``
        Top ``n_top`` by pooled mean over all shared genes (minus ``exclude_patterns``), TRIPLEX-style.
    ``"list"``
        The user's ``genes``, validated (present in every sample, no duplicates), order kept;
        ``exclude_patterns`` is not applied.

    Mean and standard deviation (``ddof=1``, as pandas) are computed on the pooled **raw counts** by
    default (``scale="raw"``), which is what the Stem reference code does (its ``all_count_df`` holds
    the raw ``.X``, not the log-normalised copy used for the HVG step); ``scale="log2"`` ranks on
    log2(1 + raw) instead. The returned list is ordered by pooled mean, highest first (ties by gene
    name); ``"list"`` keeps the user's order.

    Parameters
    ----------
    adatas
        One AnnData or a sequence of AnnData, raw counts in ``.X`` or in ``layer``. Each AnnData is one
        sample (slide) unless ``library_key`` splits it.
    flavor
        Selection rule, see above.
    n_top
        Size of each ranked list (``"hmhvg"``: both the mean and the std list; the result is their
        intersection). Ignored for ``"list"``.
    genes
        The genes for ``flavor="list"``; must be ``None`` for the other flavors.
    n_hvg
        Number of highly variable genes per sample (``"hmhvg"``/``"hvg"``); capped at the number of
        genes with counts in that sample.
    exclude_patterns
        Regular expressions (case-insensitive, :func:`re.search`) of genes never selected. The default
        drops mitochondrial (``MT-``) and ribosomal protein (``RPS*``/``RPL*``) genes. The Stem code uses
        the prefixes ``"MT"``, ``"mt"``, ``"RPS"``, ``"RPL"``, which also drops e.g. the metallothioneins
        (``MT1X``, ``MT2A``) and ``MTOR``; pass ``("^MT", "^RP[SL]")`` to reproduce it exactly.
    layer
        Layer holding the raw counts; ``None`` uses ``.X``.
    library_key
        ``obs`` column naming the sample of each spot, for tables that hold several samples (e.g. the
        ``"sample"`` column of a multi-sample SpatialData table): the HVG step then runs per sample, as
        in the reference. ``None``: every AnnData is one sample.
    scale
        ``"raw"`` (ref) ranks by mean/std of raw counts, ``"log2"`` by mean/std of log2(1 + raw).
    inplace
        Write ``.var[Key.VAR_SELECTED]`` (bool), ``.var[Key.VAR_RANK]`` (int, ``-1`` when not selected)
        and ``.uns[Key.UNS][Key.UNS_GENES]`` (parameters and the gene list) into every AnnData.

    Returns
    -------
    The selected gene names, in rank order.

    Raises
    ------
    ValueError
        If the inputs are empty, share no genes, hold negative or non-finite counts, if an option is
        invalid, if ``genes`` is missing for ``"list"`` (or given for another flavor), names unknown genes
        or duplicates, or if no gene is left to select.
    TypeError
        If ``adatas`` is not an AnnData or a sequence of AnnData.
    """
    adata_list = _as_adata_list(adatas)
    if flavor not in _FLAVORS:
        raise ValueError(f"`flavor` must be one of {_FLAVORS}, got {flavor!r}.")
    if scale not in _SCALES:
        raise ValueError(f"`scale` must be one of {_SCALES}, got {scale!r}.")
    if flavor != "list":
        _check_positive_int(n_top, "n_top")
        if genes is not None:
            raise ValueError(
                f"`genes` is only used with flavor='list' (got flavor={flavor!r}); pass genes=None or flavor='list'."
            )
    if flavor in ("hmhvg", "hvg"):
        _check_positive_int(n_hvg, "n_hvg")
    if isinstance(exclude_patterns, str):
        exclude_patterns = (exclude_patterns,)
    try:
        compiled = [re.compile(p, flags=re.IGNORECASE) for p in exclude_patterns]
    except re.error as err:
        raise ValueError(f"`exclude_patterns` holds an invalid regular expression: {err}.") from err

    n_samples = sum(len(_sample_rows(a, library_key)) for a in adata_list)
    common = _common_genes(adata_list)
    matrices = [counts_matrix(a, layer, common) for a in adata_list]
    for a, m in zip(adata_list, matrices, strict=True):
        check_counts(m, layer_name(layer), sample=_sample_label(a, adata_list))

    if flavor == "list":
        selected = validate_gene_list(genes, common, argument="genes")
        n_candidates = len(selected)
    else:
        if flavor == "mean":
            candidates = common
        else:
            hvg_union: set[str] = set()
            for a, m in zip(adata_list, matrices, strict=True):
                for rows in _sample_rows(a, library_key):
                    hvg_union |= _hvgs(m if rows is None else m[rows], common, n_hvg)
            candidates = common[common.isin(hvg_union)]
            logger.info(f"select_genes: {len(candidates)} genes in the union of per-sample HVGs.")
        excluded = np.array([any(p.search(g) for p in compiled) for g in candidates], dtype=bool)
        if excluded.any():
            logger.info(f"select_genes: excluded {int(excluded.sum())} genes matching {list(exclude_patterns)}.")
        candidates = candidates[~excluded]
        if len(candidates) == 0:
            raise ValueError(
                "select_genes: no candidate gene left after the HVG step and `exclude_patterns`; relax "
                "`exclude_patterns` or use flavor='mean'."
            )
        n_candidates = len(candidates)
        if n_candidates < n_top:
            logger.warning(f"select_genes: only {n_candidates} candidate genes for n_top={n_top}; all are ranked.")
        cols = common.get_indexer(candidates)
        mean, std = _pooled_mean_std([m[:, cols] for m in matrices], log2=scale == "log2")
        names = np.asarray(candidates, dtype=object)
        by_mean = _top(mean, names, n_top)
        if flavor == "hmhvg":
            by_std = _top(std, names, n_top)
            keep = np.isin(by_mean, by_std)
            chosen = by_mean[keep]  # already ordered by mean
        else:
            chosen = by_mean
        selected = [str(g) for g in names[chosen]]
        if not selected:
            raise ValueError("select_genes: the top genes by mean and by std do not overlap; increase `n_top`.")

    logger.info(f"select_genes: selected {len(selected)} genes (flavor={flavor!r}).")
    if inplace:
        record: dict[str, Any] = {
            "flavor": flavor,
            "n_top": int(n_top),
            "n_hvg": int(n_hvg),
            "exclude_patterns": [str(p) for p in exclude_patterns],
            "scale": scale,
            "n_samples": int(n_samples),
            "n_common_genes": len(common),
            "n_candidates": int(n_candidates),
            "genes": list(selected),
        }
        for name, value in (("layer", layer), ("library_key", library_key)):
            if value is not None:
                record[name] = value
        rank = pd.Series(np.arange(len(selected)), index=pd.Index(selected))
        for a in adata_list:
            r = rank.reindex(a.var_names).fillna(-1).to_numpy().astype(np.int64)
            a.var[Key.VAR_SELECTED] = r >= 0
            a.var[Key.VAR_RANK] = r
            uns_block(a)[Key.UNS_GENES] = dict(record)
    return selected


def targets(
    adata: AnnData,
    genes: Sequence[str],
    *,
    layer: str | None = None,
    normalize: bool = False,
    target_sum: float = 1e4,
) -> np.ndarray:
    """Regression targets of HyperST: log2(1 + raw counts) of the chosen genes.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``.X`` or ``layer``.
    genes
        Gene names (in ``adata.var_names``), in output column order, e.g. from :func:`select_genes`.
    layer
        Layer holding the raw counts; ``None`` uses ``.X``.
    normalize
        ``False`` (ref): y = log2(1 + raw). ``True``: y = log2(1 + counts scaled to ``target_sum`` per
        spot), the library size being taken over **all** genes of ``adata`` (as
        :func:`scanpy.pp.normalize_total`); spots without counts stay 0.
    target_sum
        Counts per spot after normalisation (only with ``normalize=True``).

    Returns
    -------
    Dense ``float32`` array of shape ``(n_obs, len(genes))``.

    Raises
    ------
    ValueError
        If ``genes`` is empty, holds duplicates or unknown names, if the counts are negative or not
        finite, or if ``target_sum`` is not a positive number.
    TypeError
        If ``genes`` is a single string.
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    names = validate_gene_list(genes, adata.var_names, argument="genes")
    idx = adata.var_names.get_indexer(names)
    where = layer_name(layer)
    if normalize:
        if not (np.isfinite(target_sum) and target_sum > 0):
            raise ValueError(f"`target_sum` must be a positive finite number, got {target_sum!r}.")
        full = counts_matrix(adata, layer)
        check_counts(full, where)
        size = np.asarray(full.sum(axis=1), dtype=np.float64).ravel()
        n_empty = int((size == 0).sum())
        if n_empty:
            logger.warning(f"targets: {n_empty} spots have no counts in {where}; their targets are 0.")
        scale = np.divide(target_sum, size, out=np.zeros_like(size), where=size > 0)
        sub = _to_dense64(full[:, idx]) * scale[:, None]
    else:
        sub_raw = counts_matrix(adata, layer, cols=idx)
        check_counts(sub_raw, where)
        sub = _to_dense64(sub_raw)
    return np.log2(1.0 + sub).astype(np.float32)


# --------------------------------------------------------------------------------------- helpers


def _as_adata_list(adatas: AnnData | Sequence[AnnData]) -> list[AnnData]:
    if isinstance(adatas, AnnData):
        return [adatas]
    if isinstance(adatas, str | bytes) or not isinstance(adatas, Sequence):
        raise TypeError(f"`adatas` must be an AnnData or a sequence of AnnData, got {type(adatas).__name__}.")
    out = list(adatas)
    if not out:
        raise ValueError("`adatas` is empty: pass at least one AnnData.")
    bad = [type(a).__name__ for a in out if not isinstance(a, AnnData)]
    if bad:
        raise TypeError(f"`adatas` must hold only AnnData objects, got {bad[:3]}.")
    return out


def _sample_rows(adata: AnnData, library_key: str | None) -> list[np.ndarray | None]:
    """Row indices of each sample of ``adata`` (``[None]``: the whole AnnData is one sample)."""
    if library_key is None:
        return [None]
    return [rows for _, rows in libraries(adata, library_key)]


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _sample_label(adata: AnnData, adata_list: list[AnnData]) -> str | None:
    if len(adata_list) == 1:
        return None
    return f"adatas[{next(i for i, a in enumerate(adata_list) if a is adata)}]"


def _common_genes(adata_list: list[AnnData]) -> pd.Index:
    """Genes present in every AnnData, in the order of the first one."""
    for i, a in enumerate(adata_list):
        if not a.var_names.is_unique:
            dup = a.var_names[a.var_names.duplicated()].unique()[:5].tolist()
            raise ValueError(
                f"adatas[{i}] has duplicated var_names (e.g. {dup}); call `adata.var_names_make_unique()`."
            )
    common = adata_list[0].var_names
    union = adata_list[0].var_names
    for a in adata_list[1:]:
        common = common[common.isin(a.var_names)]
        union = union.union(a.var_names, sort=False)
    if len(common) == 0:
        raise ValueError("The AnnData objects share no gene (no common var_names).")
    n_dropped = len(union) - len(common)
    if n_dropped:
        logger.warning(
            f"select_genes: {n_dropped} of {len(union)} genes are missing from at least one sample and are "
            f"not considered; {len(common)} shared genes remain."
        )
    return pd.Index(common)


def _to_dense64(mat: np.ndarray | sparse.spmatrix) -> np.ndarray:
    if sparse.issparse(mat):
        return mat.toarray().astype(np.float64, copy=False)
    return np.asarray(mat, dtype=np.float64)


def _hvgs(mat: np.ndarray | sparse.spmatrix, genes: pd.Index, n_hvg: int) -> set[str]:
    """Top-``n_hvg`` HVGs of one sample as in Stem: filter, normalize_total, log1p, seurat dispersion."""
    import scanpy as sc

    x = sparse.csr_matrix(mat, dtype=np.float32)
    keep_obs = np.asarray(x.sum(axis=1)).ravel() > 0
    x = x[keep_obs]
    keep_var = np.asarray((x > 0).sum(axis=0)).ravel() > 0
    if keep_obs.sum() < 2 or keep_var.sum() < 2:
        raise ValueError(
            "select_genes: a sample has fewer than 2 spots or genes with counts; the HVG step cannot run "
            "(drop the sample or use flavor='mean')."
        )
    tmp = AnnData(x[:, keep_var])
    tmp.var_names = pd.Index(genes[keep_var], dtype=str)
    sc.pp.normalize_total(tmp)
    sc.pp.log1p(tmp)
    n = min(int(n_hvg), tmp.n_vars)
    df = sc.pp.highly_variable_genes(tmp, n_top_genes=n, flavor="seurat", inplace=False)
    return set(tmp.var_names[np.asarray(df["highly_variable"], dtype=bool)])


def _pooled_mean_std(mats: list[np.ndarray | sparse.spmatrix], *, log2: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and std (ddof=1) over the spots of all matrices pooled together."""
    n = 0
    s = 0.0
    ss = 0.0
    for m in mats:
        if sparse.issparse(m):
            m = sparse.csr_matrix(m, dtype=np.float64, copy=True)
            if log2:
                m.data = np.log2(1.0 + m.data)
            s = s + np.asarray(m.sum(axis=0)).ravel()
            ss = ss + np.asarray(m.multiply(m).sum(axis=0)).ravel()
        else:
            d = np.asarray(m, dtype=np.float64)
            if log2:
                d = np.log2(1.0 + d)
            s = s + d.sum(axis=0)
            ss = ss + (d * d).sum(axis=0)
        n += m.shape[0]
    s = np.asarray(s, dtype=np.float64)
    ss = np.asarray(ss, dtype=np.float64)
    mean = s / max(n, 1)
    var = np.maximum(ss - n * mean * mean, 0.0) / (n - 1) if n > 1 else np.full_like(mean, np.nan)
    return mean, np.sqrt(var)


def _top(values: np.ndarray, names: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values (descending; ties by name; NaN last)."""
    v = np.where(np.isnan(values), -np.inf, values)
    order = np.lexsort((names.astype(str), -v))
    return order[:n]
