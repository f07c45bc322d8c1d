r"""Hyperbolic embeddings: the Poincaré disk (:func:`poincare`) and distances to the origin (:func:`radius`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba_array
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Polygon

from hyperst.pl._utils import (
    EXTRA_COLORS,
    EXTRA_MARKERS,
    STREAM_COLORS,
    STREAM_MARKERS,
    STREAMS,
    curvature_of,
    doc_figure,
    embedding,
    embedding_keys,
    finish,
    geometry_of,
    hyperbolic_radius,
)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["disk_coordinates", "poincare", "radius"]


def _label(key: str) -> str:
    return f"{STREAMS[key]} ({key})" if key in STREAMS else key


def _style(keys: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    colors, markers = {}, {}
    extra = 0
    for k in keys:
        if k in STREAMS:
            colors[k], markers[k] = STREAM_COLORS[k], STREAM_MARKERS[k]
        else:
            colors[k] = EXTRA_COLORS[extra % len(EXTRA_COLORS)]
            markers[k] = EXTRA_MARKERS[extra % len(EXTRA_MARKERS)]
            extra += 1
    return colors, markers


def disk_coordinates(
    x: np.ndarray, curvature: float = 1.0, *, method: Literal["pca", "first2"] = "pca"
) -> tuple[np.ndarray, np.ndarray]:
    r"""Unit-Poincaré-disk positions of Lorentz embeddings that keep each point's distance to the origin.

    A point with space components :math:`x \in \mathbb{R}^d` lies at geodesic distance
    :math:`d(O, x) = \operatorname{asinh}(\sqrt c\,\lVert x\rVert)/\sqrt c` from the origin. It is drawn at
    the unit-disk radius :math:`r = \tanh(\sqrt c\, d(O, x)/2)` (exactly the norm of
    :math:`\sqrt c\cdot` :func:`hyperst.geometry.to_poincare` ``(x, c)``), in the direction of its 2-D
    projection: onto the two principal axes of all points about the origin (``"pca"``: the top two
    eigenvectors of :math:`X^\top X`; the origin is the root of the hierarchy, so it stays at the centre)
    or onto the first two space axes (``"first2"``). Radii, hence the hierarchy, are exact; angles between
    points are those of the projection, an approximation when :math:`d > 2`.

    Parameters
    ----------
    x
        Space components, shape ``(n, d)``.
    curvature
        Curvature magnitude :math:`c`.
    method
        ``"pca"`` or ``"first2"``.

    Returns
    -------
    Positions ``(n, 2)`` inside the unit disk and the hyperbolic distances to the origin ``(n,)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"`x` must be a 2-d array (n, d), got shape {x.shape}.")
    if method not in ("pca", "first2"):
        raise ValueError(f"`method` must be 'pca' or 'first2', got {method!r}.")
    if x.shape[1] == 1:
        x = np.column_stack([x, np.zeros(len(x))])
    if method == "first2":
        q = x[:, :2]
    else:
        _, vecs = np.linalg.eigh(x.T @ x)
        axes = vecs[:, ::-1][:, :2]
        # deterministic signs: the largest loading of each axis is positive
        axes = axes * np.sign(axes[np.abs(axes).argmax(0), [0, 1]])
        q = x @ axes
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    direction = np.where(qn > 1e-12, q / np.where(qn > 1e-12, qn, 1.0), np.array([[1.0, 0.0]]))
    dist = hyperbolic_radius(x, curvature)
    r = np.tanh(np.sqrt(curvature) * dist / 2.0)
    return direction * r[:, None], dist


def _cone_polygon(apex: np.ndarray, half_angle: float, n_arc: int = 48) -> np.ndarray:
    """Straight-sided wedge from ``apex`` around the outward radial direction, closed along the unit circle."""
    theta = float(np.arctan2(apex[1], apex[0])) if np.linalg.norm(apex) > 1e-12 else 0.0
    ends = []
    for phi in (theta - half_angle, theta + half_angle):
        u = np.array([np.cos(phi), np.sin(phi)])
        b = float(apex @ u)
        t = -b + np.sqrt(max(b * b - float(apex @ apex) + 1.0, 0.0))  # |apex + t u| = 1, t > 0
        ends.append(apex + t * u)
    a0, a1 = (theta + np.angle(np.exp(1j * (np.arctan2(e[1], e[0]) - theta))) for e in ends)
    arc = np.linspace(a0, a1, n_arc)
    return np.vstack([apex, np.column_stack([np.cos(arc), np.sin(arc)]), apex])


def _colors(adata: AnnData, color: str, idx: np.ndarray) -> tuple[str, np.ndarray, list[tuple[str, str]]]:
    """``("numeric", values, [])`` or ``("categorical", rgba-ready colours, legend entries)``."""
    if color not in adata.obs.columns:
        raise ValueError(f"`color={color!r}` is not an `.obs` column; columns: {list(adata.obs.columns)[:20]}.")
    col = adata.obs[color]
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        values = col.to_numpy(dtype=np.float64)[idx]
        return "numeric", values, []
    cats = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else sorted(map(str, col.unique()))
    cats = [str(c) for c in cats]
    palette = adata.uns.get(f"{color}_colors")
    if palette is None or len(palette) != len(cats):
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        palette = [cmap(i % cmap.N) for i in range(len(cats))]
    lut = dict(zip(cats, palette, strict=True))
    labels = col.astype(str).to_numpy()[idx]
    rgba = to_rgba_array([lut[v] for v in labels]) if len(labels) else np.zeros((0, 4))
    present = set(labels)  # the legend lists only the categories that are plotted
    return "categorical", rgba, [(c, v) for c, v in lut.items() if c in present]


@doc_figure("ax")
def poincare(
    adata: AnnData,
    *,
    keys: str | Sequence[str] = "auto",
    color: str | None = None,
    curvature: float | None = None,
    method: Literal["pca", "first2"] = "pca",
    cones: int = 0,
    n_max: int = 2000,
    seed: int = 0,
    size: float | None = None,
    cmap: str = "viridis",
    legend: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    dpi: int | None = None,
) -> Axes | None:
    r"""HyperST embeddings on the Poincaré disk, one point per spot and stream.

    The embeddings are Lorentz space coordinates in :math:`d` dimensions. Each point is drawn at the unit-disk
    radius :math:`r = \tanh(\sqrt c\,d(O, x)/2)` of its true geodesic distance :math:`d(O, x)` to the origin
    (so radii, the learned hierarchy, are exact) and in the direction of its 2-D projection (principal
    axes about the origin, or the first two axes), see :func:`disk_coordinates`. Generic (parent) embeddings
    lie near the centre, specific (child) ones near the boundary. Dotted circles mark geodesic distances
    1, 2, 3, … from the origin.

    Parameters
    ----------
    adata
        Table with embeddings in ``.obsm`` (written by :func:`hyperst.tl.fit` or :func:`hyperst.tl.predict`).
    keys
        ``.obsm`` keys to draw; ``"auto"``: those of ``"X_hyperst"``, ``"X_hyperst_niche"``,
        ``"X_hyperst_gene"``, ``"X_hyperst_gene_niche"`` that are present.
    color
        ``.obs`` column to colour by (numeric: colour map; otherwise categories, with ``.uns[f"{color}_colors"]``
        when it matches). Streams are then told apart by marker. Default: one colour per stream
        (blue image, orange gene; dark spot, light niche).
    curvature
        Curvature magnitude :math:`c`. Default: the learned one in ``.uns["hyperst"]["fit"]["curvature"]``
        (or ``["predict"]``), else 1 with a warning.
    method
        2-D projection of the directions: ``"pca"`` (principal axes of all drawn points about the origin) or
        ``"first2"`` (the first two coordinates).
    cones
        Number of entailment cones to draw, at points of the first key chosen at evenly spaced quantiles of
        their distance to the origin. The half-aperture is :func:`hyperst.geometry.half_aperture` of the full
        :math:`d`-dimensional point; the cone is drawn as a straight-sided wedge of that half-angle around the
        outward radial direction, closed along the disk boundary. The disk is conformal, so the angle at the
        apex is the true one, but the cone's sides are geodesics (circular arcs) drawn straight and the
        direction is projected: an approximate picture of which points lie in the cone.
    n_max
        At most this many spots are drawn (a seeded random subset, the same spots for every key).
    seed
        Seed of the subset.
    size
        Marker size (points²); default scales with the number of points.
    cmap
        Colour map of a numeric ``color``.
    legend
        Draw a legend (or a colour bar for numeric ``color``).
    ax
        Axes to draw into (default: a new figure).
    {figure_params}

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (``None`` when shown). One scatter collection per key, in ``keys``
    order (``ax.collections``); the boundary, distance circles and cones are patches.

    Raises
    ------
    ValueError
        For unknown keys or ``color``, Euclidean embeddings (``geometry="euclidean"`` presets), a bad
        ``method``, ``n_max`` or ``cones``.
    """
    keys = embedding_keys(adata, keys)
    if geometry_of(adata) != "lorentz":
        raise ValueError(
            "These embeddings are Euclidean (a `geometry='euclidean'` preset): the Poincaré disk applies to "
            "Lorentz embeddings only. Use `hst.pl.radius` to compare norms."
        )
    if method not in ("pca", "first2"):
        raise ValueError(f"`method` must be 'pca' or 'first2', got {method!r}.")
    if n_max < 1:
        raise ValueError(f"`n_max` must be positive, got {n_max}.")
    if cones < 0:
        raise ValueError(f"`cones` must be non-negative, got {cones}.")
    c = curvature_of(adata, curvature)
    n = adata.n_obs
    idx = np.arange(n)
    if n > n_max:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=n_max, replace=False))
    xs = [embedding(adata, k)[idx] for k in keys]
    pos, dist = disk_coordinates(np.concatenate(xs), c, method=method)
    m = len(idx)

    ax_given = ax is not None
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4 if legend else 5.0, 5.0), layout="constrained")
    ax.add_patch(Circle((0, 0), 1.0, fill=False, color="0.2", lw=1.2, zorder=3))
    rc = np.sqrt(c)
    for d in range(1, int(np.ceil(dist.max() if len(dist) else 0)) + 1):
        ax.add_patch(Circle((0, 0), np.tanh(rc * d / 2), fill=False, color="0.75", lw=0.6, ls=":", zorder=0))
    colors, markers = _style(keys)
    s = size if size is not None else float(np.clip(4000 / max(m * len(keys), 1), 3, 40))
    kind, values, entries = ("none", None, []) if color is None else _colors(adata, color, idx)
    vmin = vmax = None
    if kind == "numeric":
        finite = values[np.isfinite(values)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    mappable = None
    for j, key in enumerate(keys):
        p = pos[j * m : (j + 1) * m]
        common = {"s": s, "marker": markers[key] if kind != "none" else "o", "linewidths": 0, "alpha": 0.8, "zorder": 2}
        if kind == "none":
            ax.scatter(p[:, 0], p[:, 1], color=colors[key], label=_label(key), **common)
        elif kind == "numeric":
            mappable = ax.scatter(
                p[:, 0],
                p[:, 1],
                c=values,
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                label=_label(key),
                plotnonfinite=True,
                **common,
            )
        else:
            ax.scatter(p[:, 0], p[:, 1], color=values, label=_label(key), **common)

    if cones:
        import torch

        from hyperst import geometry as geo

        first = xs[0]
        k = min(cones, m)
        order = np.argsort(dist[:m], kind="stable")
        chosen = order[np.unique(np.round(np.linspace(0, m - 1, k)).astype(int))]
        with torch.no_grad():
            half = geo.half_aperture(torch.as_tensor(first[chosen]), c).numpy()
        for i, psi in zip(chosen, half, strict=True):
            poly = _cone_polygon(pos[i], float(psi))
            ax.add_patch(
                Polygon(
                    poly,
                    closed=True,
                    facecolor=colors[keys[0]],
                    edgecolor=colors[keys[0]],
                    alpha=0.12,
                    lw=0.8,
                    zorder=1,
                )
            )
            ax.plot(*pos[i], marker="*", color="black", ms=8, zorder=4, ls="none")

    if legend:
        if kind == "numeric" and mappable is not None:
            ax.figure.colorbar(mappable, ax=ax, shrink=0.7, label=color)
        handles = []
        if kind == "categorical":
            handles += [Line2D([], [], ls="none", marker="o", color=col, label=cat) for cat, col in entries]
        if kind == "none" or len(keys) > 1:
            handles += [
                Line2D(
                    [],
                    [],
                    ls="none",
                    marker=markers[k] if kind != "none" else "o",
                    color=colors[k] if kind == "none" else "0.4",
                    label=_label(k),
                )
                for k in keys
            ]
        if handles:
            ax.legend(
                handles=handles,
                loc="center left",
                bbox_to_anchor=(1.02, 0.5),
                frameon=False,
                title=color if kind == "categorical" else None,
            )
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(f"Poincaré disk (c = {c:.3g}, {m} spots)")
    return finish(ax.figure, ax, show=show, save=save, ax_given=ax_given, dpi=dpi)


@doc_figure("ax")
def radius(
    adata: AnnData,
    *,
    keys: str | Sequence[str] = "auto",
    curvature: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    dpi: int | None = None,
) -> Axes | None:
    r"""Distribution of the distance to the origin per stream: the learned hierarchy at a glance.

    One violin (with its median) per embedding key. For Lorentz embeddings the value is the geodesic distance
    :math:`d(O, x) = \operatorname{asinh}(\sqrt c\,\lVert x\rVert)/\sqrt c`; for Euclidean presets the
    Euclidean norm. Entailment training pushes children (gene, niche) further out than their parents
    (image, spot).

    Parameters
    ----------
    adata
        Table with embeddings in ``.obsm``.
    keys
        ``.obsm`` keys; ``"auto"``: the HyperST embeddings present.
    curvature
        Curvature magnitude; default as in :func:`poincare`.
    ax
        Axes to draw into (default: a new figure).
    {figure_params}

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (``None`` when shown); violins at x = 1, 2, … in ``keys`` order.

    Raises
    ------
    ValueError
        For unknown keys or a non-positive curvature.
    """
    keys = embedding_keys(adata, keys)
    lorentz = geometry_of(adata) == "lorentz"
    c = curvature_of(adata, curvature) if lorentz else None
    data = [
        hyperbolic_radius(embedding(adata, k), c) if lorentz else np.linalg.norm(embedding(adata, k), axis=1)
        for k in keys
    ]
    ax_given = ax is not None
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * len(keys) + 1.8, 4.0), layout="constrained")
    positions = np.arange(1, len(keys) + 1)
    parts = ax.violinplot(data, positions=positions, showmedians=True, showextrema=False, widths=0.8)
    colors, _ = _style(keys)
    for body, key in zip(parts["bodies"], keys, strict=True):
        body.set_facecolor(colors[key])
        body.set_edgecolor(colors[key])
        body.set_alpha(0.7)
    parts["cmedians"].set_color("black")
    ax.set_xticks(positions, [STREAMS.get(k, k) for k in keys])
    ax.set_ylabel("geodesic distance to origin" if lorentz else "Euclidean norm")
    ax.set_title(f"distance to origin (c = {c:.3g})" if lorentz else "embedding norm")
    ax.grid(axis="y", alpha=0.3)
    return finish(ax.figure, ax, show=show, save=save, ax_given=ax_given, dpi=dpi)
