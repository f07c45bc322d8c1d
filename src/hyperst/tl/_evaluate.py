"""Evaluation of predicted expression: per-gene Pearson r, PCC@K, MSE and MAE (METHOD §6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._utils import pearson_per_gene

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["Evaluation", "evaluate", "pcc_at_k", "pearson_per_gene"]

POOLED = "pooled"
SLIDE_MEAN = "mean_over_slides"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (NaN for fewer than three values or a constant input)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def pcc_at_k(r: np.ndarray, k: int) -> float:
    """PCC@K: the mean of the ``k`` largest per-gene correlations (all genes when fewer than ``k``)."""
    if k < 1:
        raise ValueError(f"K must be positive, got {k}.")
    r = np.sort(np.asarray(r, dtype=np.float64))[::-1]
    return float(r[: min(k, len(r))].mean())


@dataclass
class Evaluation:
    """Metrics returned by :func:`evaluate`, as tidy (long) DataFrames.

    Attributes
    ----------
    per_gene
        Columns ``scope`` (``"pooled"`` or a slide name), ``gene``, ``pearson_r``.
    summary
        Columns ``scope`` (``"pooled"``, each slide, and ``"mean_over_slides"``, the TRIPLEX-style
        average of per-slide values), ``metric`` (``"PCC@K"``, ``"MSE"``, ``"MAE"``, ``"n_spots"``, and
        for predictions with intervals ``"coverage"``, ``"width"``, ``"spearman_uncertainty_mae"``) and
        ``value``.
    """

    per_gene: pd.DataFrame
    summary: pd.DataFrame

    def wide(self) -> pd.DataFrame:
        """The summary as one row per scope and one column per metric."""
        out = self.summary.pivot(index="scope", columns="metric", values="value")
        order = [s for s in self.summary["scope"].unique()]
        return out.loc[order, list(dict.fromkeys(self.summary["metric"]))]

    def __getitem__(self, item: tuple[str, str]) -> float:
        scope, metric = item
        row = self.summary[(self.summary["scope"] == scope) & (self.summary["metric"] == metric)]
        if row.empty:
            raise KeyError(f"No metric {metric!r} for scope {scope!r}.")
        return float(row["value"].iloc[0])


def _matrix(
    data: AnnData | np.ndarray, genes: Sequence[str] | None, layer: str | None, name: str
) -> tuple[np.ndarray, list[str] | None]:
    import scipy.sparse as sp

    if isinstance(data, np.ndarray):
        return np.asarray(data, dtype=np.float64), None
    adata = data
    if genes is not None:
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise ValueError(f"{len(missing)} genes are missing from `{name}`, e.g. {missing[:5]}.")
        adata = adata[:, list(genes)]
    if layer is None:
        x = adata.X
    else:
        if layer not in adata.layers:
            raise ValueError(f"`{name}` has no layer {layer!r}; layers: {sorted(adata.layers)}.")
        x = adata.layers[layer]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return np.asarray(x, dtype=np.float64), list(map(str, adata.var_names))


def evaluate(
    truth: AnnData | np.ndarray,
    prediction: AnnData | np.ndarray,
    *,
    genes: Sequence[str] | None = None,
    truth_layer: str | None = None,
    prediction_layer: str | None = None,
    truth_transform: Literal["log2p1", "none"] = "log2p1",
    groups: str | Sequence | np.ndarray | None = "sample",
    ks: Sequence[int] = (10, 50, 200),
    intervals: tuple[np.ndarray, np.ndarray] | None = None,
    uncertainty: np.ndarray | None = None,
) -> Evaluation:
    """Per-gene Pearson r, PCC@K, MSE and MAE, pooled and per slide; coverage of prediction intervals.

    Follows METHOD §6: Pearson r per gene over all held-out spots (NaN → 0); PCC@K is the mean of the
    K largest r; MSE and MAE are averaged over genes and spots, on the log2(1 + x) scale. Per-slide
    values and their mean over slides (as TRIPLEX reports) are given beside the pooled ones.

    Parameters
    ----------
    truth
        Measured expression: an AnnData (raw counts by default) or an ``(n, G)`` array.
    prediction
        Predicted expression on the log2(1 + x) scale: an AnnData (``.layers["hyperst_pred"]`` when
        present, else ``.X``) or an array aligned with ``truth``.
    genes
        Genes to evaluate (default: the prediction's genes, which must all be in ``truth``).
    truth_layer
        Layer of ``truth`` with the counts (default ``.X``).
    prediction_layer
        Layer of ``prediction`` (default: ``"hyperst_pred"`` if present, else ``.X``).
    truth_transform
        ``"log2p1"`` (truth holds raw counts) or ``"none"`` (truth is already on the log2(1 + x) scale).
    groups
        Slide of each spot: an ``.obs`` column of ``truth`` (default ``"sample"``, ignored when absent)
        or an array of labels. ``None`` reports pooled metrics only.
    ks
        The K of PCC@K.
    intervals
        ``(lower, upper)`` arrays aligned with ``prediction`` (default: ``.layers["hyperst_lower"]`` /
        ``["hyperst_upper"]`` of a prediction AnnData). Adds ``"coverage"`` (fraction of measured values
        inside, on the log2(1 + x) scale) and ``"width"`` (mean upper − lower).
    uncertainty
        Per-spot uncertainty (default: ``.obs["hyperst_uncertainty"]`` of a prediction AnnData). Adds
        ``"spearman_uncertainty_mae"``: Spearman ρ between it and the spot's mean absolute error.

    Returns
    -------
    :class:`Evaluation` with tidy ``per_gene`` and ``summary`` tables.
    """
    from anndata import AnnData

    if isinstance(prediction, AnnData):
        if prediction_layer is None and Key.LAYER_PRED in prediction.layers:
            prediction_layer = Key.LAYER_PRED
        if genes is None:
            genes = list(map(str, prediction.var_names))
        if intervals is None and Key.LAYER_LOWER in prediction.layers and Key.LAYER_UPPER in prediction.layers:
            intervals = (_matrix(prediction, genes, Key.LAYER_LOWER, "prediction")[0],
                         _matrix(prediction, genes, Key.LAYER_UPPER, "prediction")[0])
        if uncertainty is None and Key.OBS_UNCERTAINTY in prediction.obs:
            uncertainty = prediction.obs[Key.OBS_UNCERTAINTY].to_numpy()
    if (
        genes is None
        and isinstance(truth, AnnData)
        and isinstance(prediction, np.ndarray)
        and prediction.shape[1] != truth.n_vars
    ):
        raise ValueError(
                f"`prediction` has {prediction.shape[1]} columns but `truth` has {truth.n_vars} genes: pass `genes`."
            )
    t, t_genes = _matrix(truth, genes, truth_layer, "truth")
    p, p_genes = _matrix(prediction, genes, prediction_layer, "prediction")
    gene_names = list(genes) if genes is not None else (t_genes or p_genes or [f"gene{i}" for i in range(t.shape[1])])
    if t.shape != p.shape:
        raise ValueError(f"`truth` {t.shape} and `prediction` {p.shape} do not align.")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError("Nothing to evaluate: no spots or no genes.")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError("`truth` or `prediction` contains NaN or infinite values.")
    if truth_transform == "log2p1":
        if (t < 0).any():
            raise ValueError("`truth` has negative values but `truth_transform='log2p1'` expects raw counts.")
        t = np.log2(1.0 + t)
    elif truth_transform != "none":
        raise ValueError(f"`truth_transform` must be 'log2p1' or 'none', got {truth_transform!r}.")
    if intervals is not None:
        lower, upper = (np.asarray(a, dtype=np.float64) for a in intervals)
        if lower.shape != t.shape or upper.shape != t.shape:
            raise ValueError(f"`intervals` must be two arrays of shape {t.shape}, got {lower.shape}, {upper.shape}.")
    if uncertainty is not None:
        uncertainty = np.asarray(uncertainty, dtype=np.float64)
        if uncertainty.shape != (t.shape[0],):
            raise ValueError(f"`uncertainty` must have one value per spot ({t.shape[0]}), got {uncertainty.shape}.")
    if isinstance(truth, AnnData) and isinstance(prediction, AnnData) and not truth.obs_names.equals(
        prediction.obs_names
    ):
        raise ValueError("`truth` and `prediction` have different obs_names: align them first.")

    labels = None
    if isinstance(groups, str):
        if isinstance(truth, AnnData) and groups in truth.obs.columns:
            labels = truth.obs[groups].astype(str).to_numpy()
    elif groups is not None:
        labels = np.asarray(groups).astype(str)
        if len(labels) != t.shape[0]:
            raise ValueError(f"`groups` has {len(labels)} labels for {t.shape[0]} spots.")

    scopes: list[tuple[str, np.ndarray]] = [(POOLED, np.ones(t.shape[0], dtype=bool))]
    if labels is not None:
        scopes += [(str(g), labels == g) for g in pd.unique(labels)]
    gene_rows, rows = [], []
    for scope, mask in scopes:
        r = pearson_per_gene(t[mask], p[mask])
        gene_rows.append(pd.DataFrame({"scope": scope, "gene": gene_names, "pearson_r": r}))
        err = p[mask] - t[mask]
        metrics = {f"PCC@{k}": pcc_at_k(r, k) for k in ks}
        metrics.update({"MSE": float((err**2).mean()), "MAE": float(np.abs(err).mean()), "n_spots": float(mask.sum())})
        if intervals is not None:
            inside = (t[mask] >= lower[mask]) & (t[mask] <= upper[mask])
            metrics.update({"coverage": float(inside.mean()), "width": float((upper[mask] - lower[mask]).mean())})
        if uncertainty is not None:
            metrics["spearman_uncertainty_mae"] = spearman(uncertainty[mask], np.abs(err).mean(1))
        rows += [{"scope": scope, "metric": m, "value": v} for m, v in metrics.items()]
    summary = pd.DataFrame(rows)
    if labels is not None and len(scopes) > 2:
        per_slide = summary[~summary["scope"].isin([POOLED])]
        mean = per_slide.groupby("metric", sort=False)["value"].mean()
        mean["n_spots"] = float(per_slide[per_slide["metric"] == "n_spots"]["value"].sum())
        summary = pd.concat(
            [summary, pd.DataFrame({"scope": SLIDE_MEAN, "metric": mean.index, "value": mean.to_numpy()})],
            ignore_index=True,
        )
    return Evaluation(per_gene=pd.concat(gene_rows, ignore_index=True), summary=summary)
