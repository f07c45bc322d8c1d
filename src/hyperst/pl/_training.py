"""Training curves (:func:`history`) and per-gene correlations (:func:`gene_scores`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.pl._utils import doc_figure, finish

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["gene_scores", "history"]

DEFAULT_COMPONENTS = ("loss", "mse", "hca", "hea")
TRAIN, VAL = "train/", "val/"


def _history_frame(obj: Any) -> pd.DataFrame:
    """Per-epoch history as a DataFrame from a model, an AnnData, a column record, a list of dicts or a DataFrame."""
    from anndata import AnnData

    if isinstance(obj, AnnData):
        fit = obj.uns.get(Key.UNS, {}).get(Key.UNS_FIT, {})
        if not isinstance(fit, Mapping) or "history" not in fit:
            raise ValueError(
                "The AnnData has no training history in `.uns['hyperst']['fit']['history']`: pass the model "
                "`hst.tl.fit` returned, or a table it was trained on."
            )
        obj = fit["history"]
    elif not isinstance(obj, pd.DataFrame | Mapping) and hasattr(obj, "history"):
        obj = obj.history
    if isinstance(obj, pd.DataFrame):
        records = obj
    elif isinstance(obj, Mapping) and "columns" in obj and "data" in obj:  # the layout hst.tl.fit writes to .uns
        columns = [str(c) for c in np.asarray(obj["columns"]).ravel()]
        data = np.asarray(obj["data"], dtype=np.float64).reshape(-1, len(columns))
        records = pd.DataFrame(data, columns=columns)
    elif isinstance(obj, Mapping):  # columns: name → per-epoch values
        records = pd.DataFrame({str(k): np.asarray(v).ravel() for k, v in obj.items()})
    elif isinstance(obj, Sequence) and not isinstance(obj, str):
        records = pd.DataFrame([dict(h) for h in obj])
    else:
        raise TypeError(
            "`model_or_history` must be a HyperST model, a table trained by `hst.tl.fit`, its "
            "`.uns['hyperst']['fit']['history']`, a list of per-epoch dicts or a DataFrame; got "
            f"{type(obj).__name__}."
        )
    if records.empty:
        raise ValueError("The training history is empty: train the model first (`hst.tl.fit`).")
    records = records.reset_index(drop=True)
    if "epoch" not in records.columns:
        records = records.assign(epoch=np.arange(len(records)))
    epoch = pd.to_numeric(records["epoch"], errors="coerce")
    if epoch.notna().all() and (epoch == epoch.round()).all():
        records = records.assign(epoch=epoch.astype(np.int64))
    return records.sort_values("epoch", kind="stable").reset_index(drop=True)


def _components(frame: pd.DataFrame) -> list[str]:
    names = []
    for col in frame.columns:
        for prefix in (TRAIN, VAL):
            if str(col).startswith(prefix):
                names.append(str(col)[len(prefix) :])
    return list(dict.fromkeys(names))


@doc_figure("axes")
def history(
    model_or_history: Any,
    *,
    components: Sequence[str] | None = None,
    logy: bool = False,
    axes: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    dpi: int | None = None,
) -> Figure | None:
    """Training (solid) and validation (dashed) curves of loss components over epochs, one panel each.

    A dotted vertical line marks the epoch with the lowest validation loss (the weights
    :func:`hyperst.tl.fit` restores).

    Parameters
    ----------
    model_or_history
        A :class:`hyperst.tl.HyperST` (its ``.history``), a table trained by :func:`hyperst.tl.fit`
        (also after an ``.h5ad``/``.zarr`` round trip), its ``.uns["hyperst"]["fit"]["history"]``
        (``{"columns": names, "data": (n_epochs, n_columns) array}``), a list of per-epoch dicts with keys
        ``"epoch"``, ``"train/<name>"`` and ``"val/<name>"``, a mapping of such columns to per-epoch
        values, or a DataFrame of them.
    components
        Component names (``"loss"``, ``"mse"``, ``"hca"``, ``"hea"``, ``"curvature"``,
        ``"hca/image_spot->gene_spot"``, …). Default: those of ``("loss", "mse", "hca", "hea")`` that the
        history has (a ``"mse_only"`` model has no alignment terms).
    logy
        Logarithmic y axes.
    axes
        One Axes per component to draw into (default: a new figure, at most four panels per row).
    {figure_params}

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (``None`` when shown); panel ``i`` of ``fig.axes`` shows
    ``components[i]`` with the lines labelled ``"train"`` and ``"validation"``.

    Raises
    ------
    ValueError
        For an empty history, unknown components, or a wrong number of ``axes``.
    """
    frame = _history_frame(model_or_history)
    available = _components(frame)
    if components is None:
        comps = [c for c in DEFAULT_COMPONENTS if c in available]
        if not comps:
            raise ValueError(f"The history has none of {list(DEFAULT_COMPONENTS)}; it has {available}.")
    else:
        comps = [components] if isinstance(components, str) else [str(c) for c in components]
        unknown = [c for c in comps if c not in available]
        if not comps or unknown:
            raise ValueError(f"Unknown history component(s) {unknown or comps}; available: {available}.")
    ax_given = axes is not None
    if axes is None:
        ncols = min(len(comps), 4)
        nrows = -(-len(comps) // ncols)
        fig = plt.figure(figsize=(3.4 * ncols, 2.9 * nrows), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for extra in grid[len(comps) :]:
            extra.remove()
        axs = list(grid[: len(comps)])
    else:
        axs = list(axes)
        if len(axs) != len(comps):
            raise ValueError(f"`axes` has {len(axs)} Axes for {len(comps)} components {comps}.")
        fig = axs[0].figure
    epochs = frame["epoch"].to_numpy()
    best = None
    if f"{VAL}loss" in frame.columns and frame[f"{VAL}loss"].notna().any():
        best = int(epochs[int(np.nanargmin(frame[f"{VAL}loss"].to_numpy(dtype=np.float64)))])
    for ax, comp in zip(axs, comps, strict=True):
        for prefix, style, label, color in ((TRAIN, "-", "train", "C0"), (VAL, "--", "validation", "C1")):
            col = f"{prefix}{comp}"
            if col in frame.columns:
                y = frame[col].to_numpy(dtype=np.float64)
                ok = np.isfinite(y)
                ax.plot(epochs[ok], y[ok], ls=style, color=color, label=label, marker="." if ok.sum() < 30 else None)
        if best is not None:
            ax.axvline(best, color="0.5", ls=":", lw=1, label="best epoch")
        if logy:
            ax.set_yscale("log")
        ax.set_title(comp)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axs[0].legend(frameon=False, fontsize="small")
    return finish(fig, fig, show=show, save=save, ax_given=ax_given, dpi=dpi)


def _per_gene(data: Any, scope: str) -> pd.Series:
    """Pearson r per gene of one scope, from an Evaluation, its per_gene DataFrame, or a Series."""
    table = getattr(data, "per_gene", data)
    if isinstance(table, pd.Series):
        r = table.astype(np.float64)
    elif isinstance(table, pd.DataFrame):
        missing = {"gene", "pearson_r"} - set(table.columns)
        if missing:
            raise ValueError(
                f"The per-gene table lacks columns {sorted(missing)}: pass an `hst.tl.evaluate` result or its "
                "`.per_gene`."
            )
        if "scope" in table.columns:
            scopes = list(dict.fromkeys(table["scope"].astype(str)))
            if scope not in scopes:
                raise ValueError(f"`scope={scope!r}` is not in the evaluation; scopes: {scopes}.")
            table = table[table["scope"].astype(str) == scope]
        r = pd.Series(table["pearson_r"].to_numpy(dtype=np.float64), index=table["gene"].astype(str).to_numpy())
    else:
        raise TypeError(
            "`evaluation` must be an `hst.tl.evaluate` result, its `.per_gene` DataFrame, or a Series of r "
            f"indexed by gene; got {type(data).__name__}."
        )
    if r.empty:
        raise ValueError("No per-gene correlations to plot.")
    if not r.index.is_unique:
        raise ValueError("Genes appear more than once in the per-gene table (several scopes?): pass `scope`.")
    return r.sort_values(ascending=False, kind="stable")


@doc_figure("ax")
def gene_scores(
    evaluation: Any,
    *,
    scope: str = "pooled",
    ks: Sequence[int] = (10, 50, 200),
    top: int | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    dpi: int | None = None,
) -> Axes | None:
    """Per-gene Pearson r ranked from best to worst, with PCC@K marked.

    PCC@K, the mean of the K largest correlations (:func:`hyperst.tl.pcc_at_k`), is drawn as a horizontal
    segment over ranks 1…K at its value, with the value in the legend. Ks larger than the number of genes are skipped.

    Parameters
    ----------
    evaluation
        An :class:`hyperst.tl.Evaluation`, its ``per_gene`` DataFrame (columns ``scope``, ``gene``,
        ``pearson_r``), or a Series of r indexed by gene.
    scope
        Scope of the evaluation: ``"pooled"`` or a slide name.
    ks
        The K of PCC@K.
    top
        Show only the ``top`` best genes as bars labelled with their names (PCC@K is still computed over
        all genes, and marked for K ≤ ``top``). Default: a line over all genes.
    ax
        Axes to draw into (default: a new figure).
    {figure_params}

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (``None`` when shown). The ranked correlations are ``ax.lines[0]``
    (or the bars ``ax.patches``); the PCC@K segments are the lines labelled ``"PCC@K = value"``.

    Raises
    ------
    ValueError
        For an unknown scope, a malformed table, non-positive K or ``top``.
    """
    r = _per_gene(evaluation, scope)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"`ks` must be positive, got {ks}.")
    if top is not None and top < 1:
        raise ValueError(f"`top` must be positive, got {top}.")
    n = len(r)
    shown = n if top is None else min(top, n)
    values = r.to_numpy()
    ax_given = ax is not None
    if ax is None:
        width = 6.0 if top is None else max(4.0, 0.22 * shown + 1.5)
        _, ax = plt.subplots(figsize=(width, 3.8), layout="constrained")
    ranks = np.arange(1, shown + 1)
    if top is None:
        ax.plot(
            ranks, values[:shown], color="#1f77b4", marker="o" if shown <= 60 else None, ms=3, lw=1.5, label="Pearson r"
        )
    else:
        ax.bar(ranks, values[:shown], color="#1f77b4", width=0.8, label="Pearson r")
        ax.set_xticks(ranks, list(r.index[:shown]), rotation=90, fontsize="small")
    ax.axhline(0.0, color="0.6", lw=0.8)
    skipped, marks = [], []
    for i, k in enumerate(sorted(set(ks))):
        if k > shown:
            skipped.append(k)
            continue
        value = float(values[:k].mean())
        color = f"C{(i + 1) % 10}"
        marks += ax.plot([0.6, k + 0.4], [value, value], color=color, lw=2.5, zorder=3, label=f"PCC@{k} = {value:.3f}")
    if skipped:
        logger.info(f"gene_scores: PCC@{skipped} not marked ({shown} genes shown)")
    ax.set_xlim(0.4, shown + 0.6)
    if marks:
        ax.legend(handles=marks, frameon=False, fontsize="small", loc="upper right")
    ax.set_xlabel("gene rank" if top is None else "gene")
    ax.set_ylabel("Pearson r")
    ax.set_title(f"per-gene Pearson r ({scope}, {n} genes)")
    ax.grid(axis="y", alpha=0.3)
    return finish(ax.figure, ax, show=show, save=save, ax_given=ax_given, dpi=dpi)
