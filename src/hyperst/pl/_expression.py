"""Predicted vs observed expression: spatial maps (:func:`spatial`) and a per-gene scatter (:func:`scatter`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import numpy as np

from hyperst._constants import Key
from hyperst._utils import pearson_per_gene
from hyperst.pl._utils import (
    VALUE_LABEL,
    as_list,
    doc_figure,
    draw_map,
    finish,
    map_values,
    observed,
    prediction,
    prediction_table,
    shared_norm,
)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["scatter", "spatial"]


@doc_figure(None)
def spatial(
    adata_pred: AnnData | SpatialData,
    genes: str | Sequence[str],
    *,
    table_key: str = Key.TABLE_PREDICTION,
    truth: AnnData | None = None,
    image: np.ndarray | Literal[False] | None = None,
    scale_factor: float | None = None,
    spot_size: float | None = None,
    layer: str | None = "auto",
    truth_layer: str | None = None,
    truth_transform: Literal["log2p1", "none"] = "log2p1",
    sample: str | None = None,
    sample_key: str = Key.OBS_SAMPLE,
    cmap: str = "viridis",
    ncols: int = 1,
    panel_size: float = 3.5,
    show: bool | None = None,
    save: str | Path | None = None,
    dpi: int | None = None,
) -> Figure | None:
    """Maps of predicted and observed expression, side by side, for each gene.

    Each gene gets a pair of panels (predicted, observed) with spots drawn as circles at
    ``.obsm["spatial"]`` over the H&E (``image``; found in the data by default). Both panels of a gene
    share one colour scale (the minimum and maximum over predicted and observed), on the log2(1 + counts)
    scale: the prediction is already on it and the measured counts are transformed with log2(1 + x). The
    predicted panel's title gives the Pearson r over the plotted spots.

    Parameters
    ----------
    adata_pred
        Output of :func:`hyperst.tl.predict` (spots × model genes) with ``.obsm["spatial"]`` (x = column,
        y = row), or a SpatialData holding it (``table_key``): the H&E is then found from the table.
    genes
        One gene or a list of genes to plot, one row of panels each.
    table_key
        With a SpatialData: the prediction table (``key_added`` of :func:`hyperst.tl.predict`).
    truth
        Measured counts with the same spots (``obs_names``) as ``adata_pred``. Default: the measured counts
        :func:`hyperst.tl.predict` kept in ``adata_pred.X`` when the prediction is in
        ``.layers["hyperst_pred"]``; without either, only the prediction is drawn.
    image
        H&E drawn under the spots: an (H, W, 3) array (uint8, or float in [0, 1]) or a ("c", "y", "x")
        DataArray (with ``scale_factor`` for a downscaled level), ``False`` for none, or ``None`` (default)
        to find it: the ``"hires"`` image of ``.uns["spatial"][sample]`` that :func:`hyperst.tl.predict`
        writes for SpatialData (or a reader's), else, for a SpatialData, a thumbnail of the image recorded in
        ``.uns["hyperst"]["spots"][sample]["image_key"]``.
    scale_factor
        Factor from ``.obsm["spatial"]`` to the pixels of the ``image`` you pass (default 1), e.g. ``0.25``
        for level 2 of a multiscale image with factor 2 per level; found with the image otherwise.
    spot_size
        Spot diameter in ``.obsm["spatial"]`` units. Default: the diameter recorded in
        ``.uns["hyperst"]["spots"]`` (of ``truth`` or ``adata_pred``), else 0.8 × the spot pitch.
    layer
        Layer of ``adata_pred`` with the prediction: ``"auto"`` (``"hyperst_pred"`` when present, else
        ``.X``), a layer name, or ``None`` for ``.X``.
    truth_layer
        Layer of ``truth`` with the measured counts (default ``.X``).
    truth_transform
        ``"log2p1"`` (measured values are raw counts) or ``"none"`` (already on the log2(1 + x) scale).
    sample
        Sample to plot when the table holds several (``.obs[sample_key]``); their spots share pixel
        coordinates, so one is drawn at a time.
    sample_key
        ``.obs`` column with sample names.
    cmap
        Matplotlib colour map.
    ncols
        Number of genes (panel pairs) per row of the figure.
    panel_size
        Width of one panel in inches (the height follows the spots' extent).
    {figure_params}

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (``None`` when shown). Its panel axes come first in
    ``fig.axes`` (row-major, predicted then observed per gene), followed by one colour bar per gene.

    Raises
    ------
    ValueError
        For unknown genes or layers, misaligned ``truth``, missing ``.obsm["spatial"]``, several samples
        without ``sample``, or a malformed ``image``.
    """
    adata_pred, sdata = prediction_table(adata_pred, table_key)
    genes = as_list(genes, "genes")
    if ncols < 1:
        raise ValueError(f"`ncols` must be at least 1, got {ncols}.")
    pred, obs, frame = map_values(
        adata_pred, genes, truth=truth, layer=layer, truth_layer=truth_layer, truth_transform=truth_transform,
        image=image, scale_factor=scale_factor, spot_size=spot_size, sample=sample, sample_key=sample_key,
        sdata=sdata,
    )
    r = pearson_per_gene(obs, pred) if obs is not None else None

    n_per_gene = 2 if obs is not None else 1
    ncols = min(ncols, len(genes))
    nrows = -(-len(genes) // ncols)
    fig = plt.figure(
        figsize=(panel_size * n_per_gene * ncols + 0.9 * ncols, frame.panel_height(panel_size) * nrows + 0.3),
        layout="constrained",
    )
    axs = fig.subplots(nrows, ncols * n_per_gene, squeeze=False)
    for g, gene in enumerate(genes):
        row, col = divmod(g, ncols)
        pair = [axs[row, col * n_per_gene + j] for j in range(n_per_gene)]
        panels = [pred[:, g]] if obs is None else [pred[:, g], obs[:, g]]
        norm = shared_norm(panels)
        titles = [f"{gene} predicted" + (f" (r = {r[g]:.2f})" if r is not None else ""), f"{gene} observed"]
        mappable = None
        for ax, values, title in zip(pair, panels, titles, strict=False):
            mappable = draw_map(ax, frame, values, norm=norm, cmap=cmap, title=title)
        fig.colorbar(  # fraction and pad as for one panel (they are fractions of the whole pair)
            mappable, ax=pair, shrink=0.8, fraction=0.15 / len(pair), pad=0.05 / len(pair), label=VALUE_LABEL
        )
    for k in range(len(genes), nrows * ncols):  # unused panels of the last row
        row, col = divmod(k, ncols)
        for j in range(n_per_gene):
            axs[row, col * n_per_gene + j].remove()
    if frame.sample is not None:
        fig.suptitle(frame.sample)
    return finish(fig, fig, show=show, save=save, ax_given=False, dpi=dpi)


@doc_figure("ax")
def scatter(
    adata_pred: AnnData,
    gene: str,
    *,
    truth: AnnData | None = None,
    layer: str | None = "auto",
    truth_layer: str | None = None,
    truth_transform: Literal["log2p1", "none"] = "log2p1",
    size: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    dpi: int | None = None,
) -> Axes | None:
    """Predicted vs observed expression of one gene, one point per spot, with the identity line.

    Both axes are on the log2(1 + counts) scale (measured counts are transformed); the title gives the
    Pearson r over all spots of ``adata_pred``.

    Parameters
    ----------
    adata_pred
        Output of :func:`hyperst.tl.predict`.
    gene
        The gene to plot.
    truth
        Measured counts with the same spots as ``adata_pred``. Default: the counts
        :func:`hyperst.tl.predict` kept in ``adata_pred.X`` when the prediction is in
        ``.layers["hyperst_pred"]``.
    layer
        Layer of ``adata_pred`` with the prediction (``"auto"``: ``"hyperst_pred"`` when present, else
        ``.X``; ``None``: ``.X``).
    truth_layer
        Layer of ``truth`` with the measured counts (default ``.X``).
    truth_transform
        ``"log2p1"`` (raw counts) or ``"none"`` (already on the log2(1 + x) scale).
    size
        Marker size (points²); default scales with the number of spots.
    ax
        Axes to draw into (default: a new figure).
    {figure_params}

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (``None`` when shown); the points are ``ax.collections[0]``.

    Raises
    ------
    ValueError
        For an unknown gene or layer, misaligned ``truth``, or when no measured expression is available.
    """
    if not isinstance(gene, str):
        raise TypeError(f"`gene` must be one gene name (a string), got {type(gene).__name__}; use `spatial` for many.")
    pred, pred_layer = prediction(adata_pred, [gene], layer)
    obs = observed(
        adata_pred, [gene], truth=truth, pred_layer=pred_layer, truth_layer=truth_layer, truth_transform=truth_transform
    )
    if obs is None:
        raise ValueError(
            "No measured expression to compare with: pass `truth=` (the table with measured counts), or predict "
            "on a table that holds the genes' counts."
        )
    p, o = pred[:, 0], obs[:, 0]
    r = float(pearson_per_gene(o[:, None], p[:, None])[0])
    ax_given = ax is not None
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4.0), layout="constrained")
    n = len(p)
    ax.scatter(
        o,
        p,
        s=size if size is not None else float(np.clip(3000 / max(n, 1), 2, 30)),
        alpha=0.6,
        linewidths=0,
        color="#1f77b4",
    )
    lo = float(min(o.min(), p.min()))
    hi = float(max(o.max(), p.max()))
    pad = 0.03 * (hi - lo) if hi > lo else 0.5
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", color="0.4", lw=1, label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"observed {VALUE_LABEL}")
    ax.set_ylabel(f"predicted {VALUE_LABEL}")
    ax.set_title(f"{gene}: r = {r:.3f} ({n} spots)")
    return finish(ax.figure, ax, show=show, save=save, ax_given=ax_given, dpi=dpi)
