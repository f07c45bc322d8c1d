"""Predicted vs observed expression: spatial maps (:func:`spatial`) and a per-gene scatter (:func:`scatter`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import EllipseCollection
from matplotlib.colors import Normalize

from hyperst._constants import Key
from hyperst._utils import pearson_per_gene
from hyperst.pl._utils import align, as_list, doc_figure, finish, observed, prediction

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["scatter", "spatial"]

VALUE_LABEL = "log2(1 + counts)"


def _image(image: Any) -> np.ndarray | None:
    """An (H, W), (H, W, 3) or (H, W, 4) array from an array or a ("c", "y", "x") DataArray."""
    if image is None:
        return None
    dims = getattr(image, "dims", None)
    arr = np.asarray(image)
    if dims is not None and tuple(dims)[:1] == ("c",):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(
            f"`image` must be an (H, W, 3) RGB array (uint8, or float in [0, 1]) or (H, W), got shape {arr.shape}."
        )
    return arr


def _sample_mask(
    adatas: Sequence[AnnData | None], n_obs: int, sample: str | None, sample_key: str, image: bool
) -> tuple[np.ndarray, str | None]:
    """Spots of ``sample`` (all spots when the table holds one sample) and the sample's name."""
    labels = None
    for a in adatas:
        if a is not None and sample_key in a.obs.columns:
            labels = a.obs[sample_key].astype(str).to_numpy()
            break
    if labels is None:
        if sample is not None:
            raise ValueError(f"`sample={sample!r}` but the table has no `.obs[{sample_key!r}]` column (`sample_key`).")
        return np.ones(n_obs, dtype=bool), None
    names = list(dict.fromkeys(labels))
    if sample is None:
        if len(names) > 1:
            raise ValueError(
                f"The table holds {len(names)} samples {names[:10]}: pass `sample=` to plot one of them "
                f"(their spots share pixel coordinates{' and the image belongs to one' if image else ''})."
            )
        return np.ones(n_obs, dtype=bool), names[0]
    if str(sample) not in names:
        raise ValueError(f"`sample={sample!r}` is not in `.obs[{sample_key!r}]`; samples: {names[:20]}.")
    return labels == str(sample), str(sample)


def _default_diameter(adatas: Sequence[AnnData | None], sample: str | None, xy: np.ndarray) -> float:
    """Spot diameter in ``.obsm["spatial"]`` units: from ``.uns["hyperst"]["spots"]``, else 0.8 × the pitch."""
    for a in adatas:
        if a is None:
            continue
        spots = a.uns.get(Key.UNS, {}).get(Key.UNS_SPOTS, {}) if isinstance(a.uns.get(Key.UNS), Mapping) else {}
        if not isinstance(spots, Mapping) or not spots:
            continue
        meta = spots.get(sample) if sample is not None else (next(iter(spots.values())) if len(spots) == 1 else None)
        if isinstance(meta, Mapping) and meta.get("spot_diameter") and meta.get("pixel_size"):
            return float(meta["spot_diameter"]) / float(meta["pixel_size"])
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(d[:, 1]))
    return 0.8 * pitch if pitch > 0 else 1.0


def _spots(
    ax: Axes, xy: np.ndarray, values: np.ndarray, diameter: float, norm: Normalize, cmap: str
) -> EllipseCollection:
    """Spots as filled circles of ``diameter`` data units, coloured by ``values``."""
    n = len(xy)
    col = EllipseCollection(
        widths=np.full(n, diameter),
        heights=np.full(n, diameter),
        angles=np.zeros(n),
        units="xy",
        offsets=xy,
        offset_transform=ax.transData,
        cmap=cmap,
        norm=norm,
        linewidths=0,
    )
    col.set_array(values)
    ax.add_collection(col, autolim=False)
    return col


@doc_figure(None)
def spatial(
    adata_pred: AnnData,
    genes: str | Sequence[str],
    *,
    truth: AnnData | None = None,
    image: np.ndarray | None = None,
    scale_factor: float = 1.0,
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
    ``.obsm["spatial"]`` over the H&E ``image`` (when given). Both panels of a gene share one colour scale
    (the minimum and maximum over predicted and observed), on the log2(1 + counts) scale: the prediction
    is already on it and the measured counts are transformed with log2(1 + x). The predicted panel's title
    gives the Pearson r over the plotted spots.

    Parameters
    ----------
    adata_pred
        Output of :func:`hyperst.tl.predict` (spots × model genes) with ``.obsm["spatial"]`` (level-0 pixel
        coordinates, x = column, y = row).
    genes
        One gene or a list of genes to plot, one row of panels each.
    truth
        Measured counts with the same spots (``obs_names``) as ``adata_pred``. Default: the measured counts
        :func:`hyperst.tl.predict` kept in ``adata_pred.X`` when the prediction is in
        ``.layers["hyperst_pred"]``; without either, only the prediction is drawn.
    image
        H&E image as an (H, W, 3) array (uint8, or float in [0, 1]) or a ("c", "y", "x") DataArray, drawn
        under the spots. Pass a downscaled level together with ``scale_factor`` for large slides.
    scale_factor
        Factor from ``.obsm["spatial"]`` (level-0 pixels) to ``image`` pixels, e.g. ``0.25`` for level 2 of
        a multiscale image with factor 2 per level.
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
        Size of one panel in inches.
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
    genes = as_list(genes, "genes")
    if ncols < 1:
        raise ValueError(f"`ncols` must be at least 1, got {ncols}.")
    if not scale_factor > 0:
        raise ValueError(f"`scale_factor` must be positive, got {scale_factor}.")
    img = _image(image)
    pred, pred_layer = prediction(adata_pred, genes, layer)
    truth = align(truth, adata_pred) if truth is not None else None
    obs = observed(
        adata_pred, genes, truth=truth, pred_layer=pred_layer, truth_layer=truth_layer, truth_transform=truth_transform
    )
    if Key.OBSM_SPATIAL not in adata_pred.obsm:
        raise ValueError(
            f"`adata_pred` has no spot coordinates in `.obsm[{Key.OBSM_SPATIAL!r}]`: predict on a table that has "
            "them (hst.tl.predict copies them)."
        )
    xy_all = np.asarray(adata_pred.obsm[Key.OBSM_SPATIAL], dtype=np.float64)[:, :2]
    mask, sample_name = _sample_mask([adata_pred, truth], adata_pred.n_obs, sample, sample_key, img is not None)
    xy = xy_all[mask]
    if not len(xy):
        raise ValueError("No spots to plot.")
    diameter = spot_size if spot_size is not None else _default_diameter([truth, adata_pred], sample_name, xy)
    if not diameter > 0:
        raise ValueError(f"`spot_size` must be positive, got {spot_size}.")
    xy = xy * scale_factor
    diameter = diameter * scale_factor
    pred = pred[mask]
    obs = obs[mask] if obs is not None else None
    r = pearson_per_gene(obs, pred) if obs is not None else None

    n_per_gene = 2 if obs is not None else 1
    ncols = min(ncols, len(genes))
    nrows = -(-len(genes) // ncols)
    fig = plt.figure(figsize=(panel_size * n_per_gene * ncols + 0.9 * ncols, panel_size * nrows), layout="constrained")
    axs = fig.subplots(nrows, ncols * n_per_gene, squeeze=False)
    lo = xy.min(0) - diameter
    hi = xy.max(0) + diameter
    for g, gene in enumerate(genes):
        row, col = divmod(g, ncols)
        pair = [axs[row, col * n_per_gene + j] for j in range(n_per_gene)]
        panels = [pred[:, g]] if obs is None else [pred[:, g], obs[:, g]]
        vmin = float(min(p.min() for p in panels))
        vmax = float(max(p.max() for p in panels))
        norm = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9)
        titles = [f"{gene} predicted" + (f" (r = {r[g]:.2f})" if r is not None else ""), f"{gene} observed"]
        mappable = None
        for ax, values, title in zip(pair, panels, titles, strict=False):
            if img is not None:
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="antialiased")
            mappable = _spots(ax, xy, values, diameter, norm, cmap)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(hi[1], lo[1])  # image convention: y grows downwards
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title)
        fig.colorbar(mappable, ax=pair, shrink=0.8, label=VALUE_LABEL)
    for k in range(len(genes), nrows * ncols):  # unused panels of the last row
        row, col = divmod(k, ncols)
        for j in range(n_per_gene):
            axs[row, col * n_per_gene + j].remove()
    if sample_name is not None:
        fig.suptitle(sample_name)
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
