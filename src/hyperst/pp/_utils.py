"""Count-table helpers shared by :mod:`hyperst.pp._genes`, :mod:`hyperst.pp._niches` and :mod:`hyperst.tl`.

Reading the raw counts of an AnnData (``.X`` or a layer), checking that they look like raw counts,
validating a user gene list, splitting a table into its samples and reaching hyperst's ``.uns`` block.
numpy/scipy/pandas only: importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from hyperst._constants import Key
from hyperst._logging import logger

__all__ = ["check_counts", "counts_matrix", "layer_name", "libraries", "uns_block", "validate_gene_list"]


def layer_name(layer: str | None) -> str:
    """Human-readable place of the counts for messages: ``"adata.X"`` or ``"adata.layers['name']"``."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def counts_matrix(
    adata: AnnData,
    layer: str | None,
    genes: pd.Index | Sequence[str] | None = None,
    *,
    cols: np.ndarray | None = None,
) -> np.ndarray | sparse.csr_matrix:
    """The count matrix of ``adata`` (``.X`` or ``layer``), optionally restricted to some genes.

    Parameters
    ----------
    adata
        AnnData holding the counts.
    layer
        Layer holding the raw counts; ``None`` uses ``.X``.
    genes
        Gene names (in ``adata.var_names``) of the columns to keep, in that order.
    cols
        Column indices to keep instead of ``genes`` (ignored when ``genes`` is given).

    Returns
    -------
    A dense :class:`numpy.ndarray` (dense inputs, in their dtype) or a CSR matrix (sparse inputs); no
    values are converted.

    Raises
    ------
    ValueError
        If ``layer`` is not a layer of ``adata``, the matrix is missing, or it cannot be read as an array
        (e.g. backed or lazy arrays).
    """
    if layer is None:
        mat = adata.X
    else:
        if layer not in adata.layers:
            raise ValueError(
                f"`layer`={layer!r} is not in adata.layers (available: {list(adata.layers.keys())}); pass "
                "the layer that holds raw counts, or layer=None for .X."
            )
        mat = adata.layers[layer]
    if mat is None:
        raise ValueError(f"{layer_name(layer)} is empty; raw counts are required.")
    if genes is not None:
        cols = adata.var_names.get_indexer(pd.Index(genes))
    if sparse.issparse(mat):
        mat = sparse.csr_matrix(mat)
        return mat if cols is None else mat[:, cols]
    if not isinstance(mat, np.ndarray):
        try:
            mat = np.asarray(mat)
        except Exception as err:  # e.g. backed or lazy arrays that cannot be materialised
            raise ValueError(
                f"{layer_name(layer)} of type {type(mat).__name__} cannot be read as an array; load it "
                "into memory (numpy or scipy.sparse) first."
            ) from err
    return mat if cols is None else mat[:, cols]


def check_counts(mat: np.ndarray | sparse.spmatrix, where: str, *, sample: str | None = None) -> None:
    """Check that ``mat`` holds raw counts.

    Parameters
    ----------
    mat
        Dense or sparse matrix (for sparse matrices only the stored values are checked).
    where
        Where the matrix comes from, for messages (e.g. :func:`layer_name`).
    sample
        Which sample it belongs to, for messages (``None``: not mentioned).

    Raises
    ------
    ValueError
        For a non-numeric dtype, NaN/inf or negative values. Non-integer values only log a warning (the
        matrix may not hold raw counts).
    """
    values = np.asarray(mat.data if sparse.issparse(mat) else mat)
    label = where if sample is None else f"{where} of {sample}"
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{label} has dtype {values.dtype}; raw counts must be numeric.")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise ValueError(
                f"{label} holds NaN or infinite values; raw counts must be finite and non-negative "
                "(fill missing counts with 0, or pass the `layer` that holds raw counts)."
            )
        if values.size and (values < 0).any():
            raise ValueError(
                f"{label} holds negative values; raw counts must be non-negative (was the matrix scaled? pass "
                "the `layer` that holds raw counts)."
            )
        if values.size and (values != np.round(values)).any():
            logger.warning(
                f"{label} holds non-integer values; hyperst expects raw counts there (log2(1 + x) is applied on top)."
            )
    elif values.dtype.kind == "i" and values.size and (values < 0).any():
        raise ValueError(f"{label} holds negative values; raw counts must be non-negative.")


def validate_gene_list(genes: Sequence[str] | None, available: pd.Index, *, argument: str) -> list[str]:
    """Check a user gene list: given, non-empty, no duplicates, every name in ``available``.

    Parameters
    ----------
    genes
        The user's gene names.
    available
        The genes that may be chosen (e.g. ``adata.var_names``).
    argument
        Name of the user's argument, for messages.

    Returns
    -------
    The names as a list of ``str``, order kept.

    Raises
    ------
    ValueError
        If ``genes`` is ``None`` or empty, holds duplicates or names not in ``available``.
    TypeError
        If ``genes`` is a single string.
    """
    if genes is None:
        raise ValueError(f"`{argument}` is required here: pass a list of gene names.")
    if isinstance(genes, str | bytes):
        raise TypeError(f"`{argument}` must be a sequence of gene names, not a single string ({genes!r}).")
    names = [str(g) for g in genes]
    if not names:
        raise ValueError(f"`{argument}` is empty: select at least one gene.")
    seen = pd.Index(names)
    if not seen.is_unique:
        dup = seen[seen.duplicated()].unique()[:5].tolist()
        raise ValueError(f"`{argument}` holds duplicated genes: {dup}.")
    missing = seen[~seen.isin(available)]
    if len(missing):
        shown = ", ".join(repr(g) for g in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"`{argument}`: {len(missing)} genes not found in var_names (of every sample): {shown}{more}.")
    return names


def libraries(adata: AnnData, library_key: str | None) -> list[tuple[Any, np.ndarray]]:
    """``(sample, row indices)`` of every sample of ``adata``, in order of first appearance.

    Without ``library_key`` the whole table is one sample: ``[(None, arange(n_obs))]``.

    Raises
    ------
    ValueError
        If ``library_key`` is not an ``obs`` column or has missing values.
    """
    if library_key is None:
        return [(None, np.arange(adata.n_obs))]
    if library_key not in adata.obs:
        raise ValueError(
            f"`library_key`={library_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)[:10]})."
        )
    lib = adata.obs[library_key]
    if lib.isna().any():
        raise ValueError(f"adata.obs[{library_key!r}] has missing values; every spot needs a sample.")
    codes, uniques = pd.factorize(lib, sort=False)
    return [(uniques[k], np.flatnonzero(codes == k)) for k in range(len(uniques))]


def uns_block(adata: AnnData) -> dict[str, Any]:
    """``adata.uns[Key.UNS]`` (hyperst's block of ``.uns``) as a dict, created when missing.

    Raises
    ------
    ValueError
        If ``adata.uns[Key.UNS]`` exists but is not a dict.
    """
    block = adata.uns.get(Key.UNS)
    if block is None:
        adata.uns[Key.UNS] = {}
        block = adata.uns[Key.UNS]
    if not isinstance(block, dict):
        raise ValueError(f"adata.uns[{Key.UNS!r}] must be a dict, got {type(block).__name__}.")
    return block
