"""Prediction intervals on the H&E (:func:`intervals`) and a reliability diagnostic (:func:`reliability`)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize, to_rgba
from matplotlib.ticker import MaxNLocator

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst._utils import pearson_per_gene
from hyperst.pl._utils import (
    FLAG_COLOR,
    VALUE_LABEL,
    SpotFrame,
    as_list,
    doc_figure,
    draw_map,
    finish,
    map_values,
    outline_spots,
    predict_record,
    prediction_table,
    shared_norm,
    values_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["intervals", "reliability"]

NO_INTERVALS = (
    "run `hst.tl.predict` with a model trained as a calibrated ensemble (`hst.tl.fit` does so by default with "
    "validation slides held out, see `n_members`; a model trained with `validation=None` has no intervals)"
)


# ---------------------------------------------------------------------------------------------- reading
def _interval_layers(adata_pred: AnnData, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper interval ends of ``genes``; a clear error when the layers are missing or inverted."""
    missing = [k for k in (Key.LAYER_LOWER, Key.LAYER_UPPER) if k not in adata_pred.layers]
    if missing:
        raise ValueError(
            f"`adata_pred` has no prediction intervals (`.layers` lacks {missing}; it has "
            f"{sorted(adata_pred.layers)}): {NO_INTERVALS}."
        )
    lower = values_of(adata_pred, genes, Key.LAYER_LOWER, "lower interval end")
    upper = values_of(adata_pred, genes, Key.LAYER_UPPER, "upper interval end")
    if (lower > upper).any():
        raise ValueError(
            f"`.layers[{Key.LAYER_LOWER!r}]` exceeds `.layers[{Key.LAYER_UPPER!r}]` at {(lower > upper).sum()} "
            "entries: the intervals are corrupt (were the layers overwritten or swapped?)."
        )
    return lower, upper


def _alpha(adata_pred: AnnData) -> float | None:
    """Miscoverage ``alpha`` recorded by :func:`hyperst.tl.predict` (``None`` when not recorded)."""
    alpha = predict_record(adata_pred).get("alpha")
    if alpha is None:
        return None
    alpha = float(np.asarray(alpha).ravel()[0])
    if not 0 < alpha < 1:
        raise ValueError(f"`.uns['hyperst']['predict']['alpha']` must be in (0, 1), got {alpha}.")
    return alpha


def _percent(alpha: float | None) -> str:
    """``"90 % "`` for ``alpha = 0.1`` (empty when unknown)."""
    return "" if alpha is None else f"{100 * (1 - alpha):g} % "


def _pct(fraction: float) -> str:
    """A fraction as a whole percentage, ``"88 %"``."""
    return f"{100 * fraction:.0f} %"


def _obs_column(adata_pred: AnnData, key: str, what: str, fix: str) -> np.ndarray:
    """A finite float ``.obs`` column, with an error naming ``fix`` when it is missing."""
    if key not in adata_pred.obs.columns:
        raise ValueError(f"`adata_pred` has no {what} (`.obs[{key!r}]`): {fix}.")
    x = pd.to_numeric(adata_pred.obs[key], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"`.obs[{key!r}]` ({what}) contains NaN, infinite or non-numeric values.")
    return x


def _ood_flags(adata_pred: AnnData) -> np.ndarray | None:
    """The boolean ``.obs["hyperst_ood"]`` flags (``None`` when the table has none)."""
    if Key.OBS_OOD not in adata_pred.obs.columns:
        return None
    col = adata_pred.obs[Key.OBS_OOD]
    if not pd.api.types.is_bool_dtype(col):
        raise ValueError(
            f"`.obs[{Key.OBS_OOD!r}]` must hold booleans (the out-of-distribution flags), got {col.dtype}."
        )
    return col.to_numpy(dtype=bool)


@dataclass(frozen=True)
class SlideChecks:
    """What :func:`hyperst.tl.predict` recorded of one slide's domain checks."""

    #: OOD score above which a spot is flagged (``None``: not recorded).
    threshold: float | None
    #: Whether the slide is flagged (too many flagged spots, a coarser scan, a stain far from training).
    flagged: bool
    #: One line per flag of the slide.
    messages: list[str]


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(m) for m in np.asarray(value, dtype=object).ravel()]


def _slide_checks(adata_pred: AnnData, sample: str | None) -> SlideChecks:
    """The domain checks of ``sample`` from ``.uns["hyperst"]["predict"]["domain"]``.

    The record holds ``threshold``, ``flagged`` (any slide), ``messages`` (each starting with ``"<slide>:"``)
    and, per slide, ``slides[<slide>]["flags"]``; for a table of several slides, the drawn slide's flags and
    messages are used.
    """
    rec = predict_record(adata_pred).get(Key.UNS_DOMAIN)
    if not isinstance(rec, Mapping):
        return SlideChecks(None, False, [])
    threshold = rec.get("threshold")
    threshold = None if threshold is None else float(np.asarray(threshold).ravel()[0])
    messages = _strings(rec.get("messages"))
    flagged = bool(rec.get("flagged", False))
    slides = rec.get("slides")
    if sample is not None and isinstance(slides, Mapping) and isinstance(slides.get(sample), Mapping):
        flagged = len(_strings(slides[sample].get("flags"))) > 0
        messages = [m for m in messages if m.startswith(f"{sample}:")] or (messages if flagged else [])
    return SlideChecks(threshold, flagged, messages)


def _outline(axs: Sequence[Axes], frame: SpotFrame, flags: np.ndarray | None) -> None:
    """Rings around the flagged spots on every map of ``axs`` (no-op without flags)."""
    if flags is None:
        return
    for ax in axs:
        outline_spots(ax, frame, flags, label="out of distribution")


def _flag_legend(fig: Figure, flags: np.ndarray | None) -> None:
    from matplotlib.lines import Line2D

    if flags is None or not flags.any():
        return
    ring = Line2D([], [], ls="none", marker="o", markerfacecolor="none", markeredgecolor=FLAG_COLOR, markersize=9)
    label = f"out of distribution ({int(flags.sum())} of {len(flags)} spots, `.obs['{Key.OBS_OOD}']`)"
    fig.legend([ring], [label], loc="outside lower center", frameon=False)


# ---------------------------------------------------------------------------------------------- intervals
@doc_figure(None)
def intervals(
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
    ood: bool = True,
    cmap: str = "viridis",
    ncols: int = 1,
    panel_size: float = 3.0,
    show: bool | None = None,
    save: str | Path | None = None,
    dpi: int | None = None,
) -> Figure | None:
    """Maps of the prediction and its interval (lower, upper), next to the observed expression, for each gene.

    Each gene gets a row of panels: predicted, lower end, upper end of the prediction interval that
    :func:`hyperst.tl.predict` writes (coverage 1 − α, ``.layers["hyperst_lower"]`` and
    ``["hyperst_upper"]``) and, when measured counts are available, observed — drawn as in
    :func:`spatial`: spots at ``.obsm["spatial"]`` over the H&E (``image``; found in the data by default).
    The panels of a gene share one colour scale (log2(1 + counts)), so a spot reads darker on the lower map
    and brighter on the upper map by the width of its interval. The predicted panel's title gives the
    Pearson r, the observed panel's the fraction of spots whose measured value lies inside the interval.
    Spots flagged out of distribution (``.obs["hyperst_ood"]``) are ringed on every panel.

    Parameters
    ----------
    adata_pred
        Output of :func:`hyperst.tl.predict` with prediction intervals and ``.obsm["spatial"]``, or a
        SpatialData holding it (``table_key``; its H&E is then found from the table).
    table_key
        With a SpatialData: the prediction table (``key_added`` of :func:`hyperst.tl.predict`).
    genes
        One gene or a list of genes, one row of panels each.
    truth
        Measured counts with the same spots (``obs_names``) as ``adata_pred``. Default: the measured counts
        :func:`hyperst.tl.predict` kept in ``adata_pred.X`` when the prediction is in
        ``.layers["hyperst_pred"]``; without either, no observed panel is drawn.
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
        Spot diameter in ``.obsm["spatial"]`` units. Default: the recorded diameter, else 0.8 × the pitch.
    layer
        Layer of ``adata_pred`` with the prediction: ``"auto"`` (``"hyperst_pred"`` when present, else
        ``.X``), a layer name, or ``None`` for ``.X``.
    truth_layer
        Layer of ``truth`` with the measured counts (default ``.X``).
    truth_transform
        ``"log2p1"`` (measured values are raw counts) or ``"none"`` (already on the log2(1 + x) scale).
    sample
        Sample to plot when the table holds several (``.obs[sample_key]``).
    sample_key
        ``.obs`` column with sample names.
    ood
        Ring the spots flagged in ``.obs["hyperst_ood"]`` (when the table has the column).
    cmap
        Matplotlib colour map.
    ncols
        Number of genes (rows of panels) side by side.
    panel_size
        Width of one panel in inches (the height of the maps follows the spots' extent).
    {figure_params}

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (``None`` when shown). Its panel axes come first in ``fig.axes``
    (row-major: predicted, lower, upper[, observed] per gene), followed by one colour bar per gene. In each
    panel the spots are ``ax.collections[0]``; the rings around flagged spots, ``ax.collections[1]``.

    Raises
    ------
    ValueError
        When ``adata_pred`` has no interval layers, and for the errors of :func:`spatial`.
    """
    adata_pred, sdata = prediction_table(adata_pred, table_key)
    genes = as_list(genes, "genes")
    if ncols < 1:
        raise ValueError(f"`ncols` must be at least 1, got {ncols}.")
    pred, obs, frame = map_values(  # checks the genes first
        adata_pred, genes, truth=truth, layer=layer, truth_layer=truth_layer, truth_transform=truth_transform,
        image=image, scale_factor=scale_factor, spot_size=spot_size, sample=sample, sample_key=sample_key,
        sdata=sdata,
    )
    m = frame.mask
    lower, upper = _interval_layers(adata_pred, genes)
    lower, upper = lower[m], upper[m]
    flags = _ood_flags(adata_pred) if ood else None
    flags = flags[m] if flags is not None else None
    alpha = _alpha(adata_pred)
    r = pearson_per_gene(obs, pred) if obs is not None else None

    n_per_gene = 3 if obs is None else 4
    ncols = min(ncols, len(genes))
    nrows = -(-len(genes) // ncols)
    width = panel_size * n_per_gene * ncols + 0.9 * ncols
    extra = 0.45 + (0.35 if flags is not None and flags.any() else 0.0)  # the title, the legend of the rings
    fig = plt.figure(figsize=(width, frame.panel_height(panel_size) * nrows + extra), layout="constrained")
    axs = fig.subplots(nrows, ncols * n_per_gene, squeeze=False)
    for g, gene in enumerate(genes):
        row, col = divmod(g, ncols)
        group = [axs[row, col * n_per_gene + j] for j in range(n_per_gene)]
        panels = [pred[:, g], lower[:, g], upper[:, g]]
        titles = [
            f"{gene} predicted" + (f" (r = {r[g]:.2f})" if r is not None else ""),
            f"{gene} lower",
            f"{gene} upper",
        ]
        if obs is not None:
            inside = float(np.mean((lower[:, g] <= obs[:, g]) & (obs[:, g] <= upper[:, g])))
            panels.append(obs[:, g])
            titles.append(f"{gene} observed ({_pct(inside)} inside)")
        norm = shared_norm(panels)
        mappable = None
        for ax, values, title in zip(group, panels, titles, strict=True):
            mappable = draw_map(ax, frame, values, norm=norm, cmap=cmap, title=title)
        _outline(group, frame, flags)
        fig.colorbar(  # fraction and pad as for one panel (they are fractions of the whole group)
            mappable, ax=group, shrink=0.8, fraction=0.15 / len(group), pad=0.05 / len(group), label=VALUE_LABEL
        )
    for k in range(len(genes), nrows * ncols):  # unused panels of the last row
        row, col = divmod(k, ncols)
        for j in range(n_per_gene):
            axs[row, col * n_per_gene + j].remove()
    head = f"{_percent(alpha)}prediction intervals" + (f" (α = {alpha:g})" if alpha is not None else "")
    fig.suptitle(head if frame.sample is None else f"{frame.sample}: {head}")
    _flag_legend(fig, flags)
    return finish(fig, fig, show=show, save=save, ax_given=False, dpi=dpi)


# ---------------------------------------------------------------------------------------------- reliability
def _coverage_bins(coverage: np.ndarray, nominal: float | None, bins: int) -> np.ndarray:
    """Histogram edges from a round number below the lowest coverage (or nominal level) up to 1."""
    low = float(min(coverage.min(), nominal if nominal is not None else 1.0))
    low = max(0.0, np.floor(20 * low - 1) / 20)
    return np.linspace(low, 1.0, bins + 1)


def _score_norm(score: np.ndarray, threshold: float | None) -> Normalize:
    """Colour scale of the OOD scores.

    Up to their 98th percentile (a few extreme spots would flatten the map), and past the threshold when there
    is one, so that it shows on the colour bar.
    """
    vmin = float(score.min())
    vmax = float(np.quantile(score, 0.98))
    if threshold is not None:
        vmin = min(vmin, threshold)
        vmax = max(vmax, threshold + 0.05 * (threshold - vmin))
    return Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9)


def _colorbar_threshold(cbar: Any, threshold: float, norm: Normalize) -> None:
    if norm.vmin <= threshold <= norm.vmax:
        cbar.ax.axhline(threshold, color=FLAG_COLOR, lw=2)


@doc_figure(None)
def reliability(
    adata_pred: AnnData | SpatialData,
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
    bins: int = 20,
    panel_size: float = 3.2,
    show: bool | None = None,
    save: str | Path | None = None,
    dpi: int | None = None,
) -> Figure | None:
    """How far to trust a prediction: uncertainty and domain shift on the tissue, and how they relate to error.

    Panels, left to right:

    1. **uncertainty**: ``.obs["hyperst_uncertainty"]`` (the per-spot uncertainty :func:`hyperst.tl.predict`
       writes with the intervals) on the H&E;
    2. **out of distribution**: ``.obs["hyperst_ood_score"]`` per spot, the flagged spots
       (``.obs["hyperst_ood"]``) ringed and the flag threshold marked on the colour bar (drawn when the
       table has the score); the title says whether :func:`hyperst.tl.predict` flagged the whole slide;

    and when measured counts are available (``truth``, or the counts in ``.X`` as in :func:`spatial`):

    3. **error vs uncertainty**: per-spot mean absolute error over the genes (log2(1 + counts) scale)
       against the uncertainty, with the Spearman ρ in the title (flagged spots in the flag colour);
    4. **coverage**: histogram over genes of the fraction of spots whose measured value lies inside the
       interval, with the nominal level 1 − α (dashed) and the mean coverage (solid).

    Parameters
    ----------
    adata_pred
        Output of :func:`hyperst.tl.predict` with prediction intervals and ``.obsm["spatial"]``, or a
        SpatialData holding it (``table_key``; its H&E is then found from the table).
    table_key
        With a SpatialData: the prediction table (``key_added`` of :func:`hyperst.tl.predict`).
    truth
        Measured counts with the same spots (``obs_names``) and all genes of ``adata_pred``. Default: the
        counts :func:`hyperst.tl.predict` kept in ``adata_pred.X`` when the prediction is in a layer.
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
        Spot diameter in ``.obsm["spatial"]`` units. Default: the recorded diameter, else 0.8 × the pitch.
    layer
        Layer of ``adata_pred`` with the prediction (``"auto"``: ``"hyperst_pred"`` when present, else ``.X``).
    truth_layer
        Layer of ``truth`` with the measured counts (default ``.X``).
    truth_transform
        ``"log2p1"`` (raw counts) or ``"none"`` (already on the log2(1 + x) scale).
    sample
        Sample to plot when the table holds several (``.obs[sample_key]``); all panels use its spots.
    sample_key
        ``.obs`` column with sample names.
    cmap
        Colour map of the two maps.
    bins
        Number of histogram bins of the coverage panel.
    panel_size
        Width of one panel in inches (the height of the maps follows the spots' extent).
    {figure_params}

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (``None`` when shown). ``fig.axes`` holds the panels in the order
    above (those drawn), then the colour bars of the maps. The error scatter's points are
    ``ax.collections[0]`` (x: uncertainty, y: error).

    Raises
    ------
    ValueError
        When ``adata_pred`` has no uncertainty or interval layers, for malformed columns, and for the
        errors of :func:`spatial`.
    """
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"`bins` must be a positive integer, got {bins!r}.")
    adata_pred, sdata = prediction_table(adata_pred, table_key)
    genes = [str(g) for g in adata_pred.var_names]
    uncertainty = _obs_column(adata_pred, Key.OBS_UNCERTAINTY, "per-spot uncertainty", NO_INTERVALS)
    lower, upper = _interval_layers(adata_pred, genes)
    has_score = Key.OBS_OOD_SCORE in adata_pred.obs.columns
    score = _obs_column(adata_pred, Key.OBS_OOD_SCORE, "OOD score", "") if has_score else None
    flags = _ood_flags(adata_pred)
    pred, obs, frame = map_values(
        adata_pred, genes, truth=truth, layer=layer, truth_layer=truth_layer, truth_transform=truth_transform,
        image=image, scale_factor=scale_factor, spot_size=spot_size, sample=sample, sample_key=sample_key,
        sdata=sdata,
    )
    m = frame.mask
    uncertainty = uncertainty[m]
    flags = flags[m] if flags is not None else None
    alpha = _alpha(adata_pred)
    nominal = None if alpha is None else 1 - alpha
    checks = _slide_checks(adata_pred, frame.sample)
    if not has_score:
        logger.info(f"`adata_pred` has no `.obs[{Key.OBS_OOD_SCORE!r}]`: the out-of-distribution panel is left out.")

    n_panels = 1 + has_score + (2 if obs is not None else 0)
    height = max(frame.panel_height(panel_size), 0.75 * panel_size + 0.45)  # room for the scatter's labels
    fig = plt.figure(figsize=(panel_size * n_panels + 0.7 * (1 + has_score), height + 0.9), layout="constrained")
    axs = list(fig.subplots(1, n_panels, squeeze=False)[0])
    panels = iter(axs)

    ax = next(panels)
    norm = shared_norm([uncertainty])
    mappable = draw_map(ax, frame, uncertainty, norm=norm, cmap=cmap, title="uncertainty")
    _outline([ax], frame, flags)
    fig.colorbar(mappable, ax=ax, shrink=0.8, label=f"uncertainty, {VALUE_LABEL}")

    if score is not None:
        ax = next(panels)
        score = score[m]
        threshold = checks.threshold
        norm = _score_norm(score, threshold)
        n_flag = int(flags.sum()) if flags is not None else 0
        title = "out of distribution" + (f" ({n_flag} / {frame.n_spots})" if flags is not None else "")
        if checks.flagged:
            title += "\nslide flagged"
        mappable = draw_map(ax, frame, score, norm=norm, cmap=cmap, title=title)
        if checks.flagged:
            ax.title.set_color(FLAG_COLOR)
        _outline([ax], frame, flags)
        cbar = fig.colorbar(
            mappable, ax=ax, shrink=0.8, label="OOD score", extend="max" if score.max() > norm.vmax else "neither"
        )
        if threshold is not None:
            _colorbar_threshold(cbar, threshold, norm)

    if obs is not None:
        lower, upper = lower[m], upper[m]
        from scipy.stats import spearmanr

        error = np.abs(pred - obs).mean(axis=1)
        rho = float(spearmanr(uncertainty, error).statistic)
        ax = next(panels)
        ring = flags if flags is not None else np.zeros(frame.n_spots, dtype=bool)
        ax.scatter(  # flagged spots as rings, as on the maps
            uncertainty,
            error,
            s=float(np.clip(3000 / max(frame.n_spots, 1), 4, 30)),
            facecolors=np.where(ring[:, None], (0, 0, 0, 0), to_rgba("#1f77b4", 0.7)),
            edgecolors=np.where(ring[:, None], to_rgba(FLAG_COLOR), (0, 0, 0, 0)),
            linewidths=np.where(ring, 1.2, 0.0),
        )
        ax.set_xlabel(f"uncertainty (`.obs['{Key.OBS_UNCERTAINTY}']`)")
        ax.set_ylabel(f"mean absolute error, {VALUE_LABEL}")
        ax.set_title(f"error vs uncertainty (ρ = {rho:.2f})")
        ax.grid(alpha=0.3)

        ax = next(panels)
        coverage = ((lower <= obs) & (obs <= upper)).mean(axis=0)
        ax.hist(coverage, bins=_coverage_bins(coverage, nominal, bins), color="0.6", edgecolor="white")
        mean_cov = float(coverage.mean())
        ax.axvline(mean_cov, color="#1f77b4", lw=2, label=f"mean {_pct(mean_cov)}")
        if nominal is not None:
            ax.axvline(nominal, color="0.2", ls="--", lw=1.5, label=f"nominal {_pct(nominal)}")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("coverage (fraction of spots inside)")
        ax.set_ylabel("genes")
        ax.set_title(f"coverage per gene ({len(genes)} genes)")
        ax.legend(frameon=False, fontsize="small", loc="upper left")

    head = "reliability" if frame.sample is None else f"{frame.sample}: reliability"
    if checks.flagged and checks.messages:
        width = int(10 * fig.get_figwidth())  # characters per line of the title
        head += "\n" + "\n".join(textwrap.fill(m, width=width) for m in checks.messages)
    fig.suptitle(head)
    _flag_legend(fig, flags)
    return finish(fig, fig, show=show, save=save, ax_given=False, dpi=dpi)
