"""Shared helpers of :mod:`hyperst.pl`: figures, expression values and spot maps.

Showing/saving figures, reading predicted and measured expression, and drawing spots on the H&E.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

T = TypeVar("T")

#: The embeddings :func:`hyperst.tl.fit` writes, in plotting order, with display names.
STREAMS: dict[str, str] = {
    Key.OBSM_IMAGE_SPOT: "image spot",
    Key.OBSM_IMAGE_NICHE: "image niche",
    Key.OBSM_GENE_SPOT: "gene spot",
    Key.OBSM_GENE_NICHE: "gene niche",
}
#: Colour per stream: blue for image, orange for gene; dark for spot, light for niche (tab20 pairs).
STREAM_COLORS: dict[str, str] = {
    Key.OBSM_IMAGE_SPOT: "#1f77b4",
    Key.OBSM_IMAGE_NICHE: "#7fb5dc",
    Key.OBSM_GENE_SPOT: "#e8710a",
    Key.OBSM_GENE_NICHE: "#f6b36b",
}
#: Marker per stream (used when the colour shows an ``.obs`` column).
STREAM_MARKERS: dict[str, str] = {
    Key.OBSM_IMAGE_SPOT: "o",
    Key.OBSM_IMAGE_NICHE: "s",
    Key.OBSM_GENE_SPOT: "^",
    Key.OBSM_GENE_NICHE: "D",
}
#: Axis/colour-bar label of expression values (predictions and log-transformed counts).
VALUE_LABEL = "log2(1 + counts)"
#: Resolution (dots per inch) of figures written with ``save=`` when no ``dpi`` is given.
SAVE_DPI = 150
EXTRA_COLORS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
EXTRA_MARKERS = ("v", "P", "X", "*", "h", "p")


# ---------------------------------------------------------------------------------------------- show / save
#: Marker line that :func:`doc_figure` replaces in a plotting function's docstring.
FIGURE_PARAMS = "    {figure_params}\n"


def doc_figure(draw_into: str | None) -> Callable[[T], T]:
    """Fill the shared ``show``/``save``/``dpi`` entries into the ``Parameters`` of a plotting function.

    The docstring holds the line ``{figure_params}`` (indented as a parameter) where the entries go.
    ``draw_into`` names the function's own Axes argument (``"ax"``, ``"axes"``), or ``None`` when it has none;
    the ``show`` default is described accordingly (as :func:`finish` implements it).
    """
    unless = "``save``" + (f" or ``{draw_into}``" if draw_into else "") + " is given"
    text = (
        "    show\n"
        "        Call :func:`matplotlib.pyplot.show` and return ``None``. Default: show unless "
        f"{unless}.\n"
        "    save\n"
        "        Path of an image file to write the figure to.\n"
        "    dpi\n"
        f"        Resolution of the saved image in dots per inch (default: {SAVE_DPI}).\n"
    )

    def decorate(func: T) -> T:
        doc = func.__doc__
        if doc is None:  # python -OO strips docstrings
            return func
        if FIGURE_PARAMS not in doc:
            raise ValueError(f"{func.__name__}'s docstring lacks the line {FIGURE_PARAMS.strip()!r}.")
        func.__doc__ = doc.replace(FIGURE_PARAMS, text)
        return func

    return decorate


def finish(
    fig: Figure,
    result: T,
    *,
    show: bool | None,
    save: str | Path | None,
    ax_given: bool,
    dpi: int | None = None,
) -> T | None:
    """Save and/or show ``fig`` following scanpy: return ``result`` unless the figure is shown.

    ``show=None`` shows the figure only when neither ``save`` nor an ``ax`` was given. ``save`` writes the
    figure at ``dpi`` dots per inch (``None``: :data:`SAVE_DPI`).
    """
    if dpi is not None and (isinstance(dpi, bool) or not isinstance(dpi, int | float) or not dpi > 0):
        raise ValueError(f"`dpi` must be a positive number, got {dpi!r}.")
    if show is None:
        show = save is None and not ax_given
    if save is not None:
        path = Path(save)
        if not path.parent.exists():
            raise FileNotFoundError(f"`save={str(save)!r}`: the folder {str(path.parent)!r} does not exist.")
        fig.savefig(path, dpi=SAVE_DPI if dpi is None else dpi, bbox_inches="tight")
        logger.info(f"saved figure to {path}")
    if show:
        plt.show()
        return None
    return result


def as_list(value: str | Sequence[str], name: str) -> list[str]:
    """A string or a sequence of strings as a non-empty list."""
    items = [value] if isinstance(value, str) else [str(v) for v in value]
    if not items:
        raise ValueError(f"`{name}` is empty: pass at least one name.")
    return items


# ---------------------------------------------------------------------------------------------- expression
def check_genes(genes: list[str], var_names: pd.Index, name: str) -> None:
    """Raise a clear error for genes that are not in ``var_names``."""
    known = set(map(str, var_names))
    missing = [g for g in genes if g not in known]
    if missing:
        raise ValueError(
            f"Unknown gene(s) {missing[:10]} in `{name}` ({len(known)} genes, e.g. {list(map(str, var_names[:5]))}). "
            "Pass genes the model predicts (`model.genes` / `adata_pred.var_names`)."
        )


def _dense(x: Any) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def values_of(adata: AnnData, genes: list[str], layer: str | None, what: str) -> np.ndarray:
    """Dense ``(n_obs, len(genes))`` values of ``genes`` from ``.X`` or ``layer``; NaN/inf raise naming ``what``."""
    sub = adata[:, genes]
    x = _dense(sub.X if layer is None else sub.layers[layer])
    if not np.isfinite(x).all():
        raise ValueError(f"The {what} contains NaN or infinite values.")
    return x


def prediction(adata_pred: AnnData, genes: list[str], layer: str | None) -> tuple[np.ndarray, str | None]:
    """Predicted expression of ``genes`` (n, g) and the layer it came from (``None`` = ``.X``).

    ``layer="auto"``: ``.layers["hyperst_pred"]`` when present, else ``.X``.
    """
    check_genes(genes, adata_pred.var_names, "adata_pred")
    if layer == "auto":
        layer = Key.LAYER_PRED if Key.LAYER_PRED in adata_pred.layers else None
    if layer is not None and layer not in adata_pred.layers:
        raise ValueError(f"`layer={layer!r}` is not a layer of `adata_pred`; layers: {sorted(adata_pred.layers)}.")
    return values_of(adata_pred, genes, layer, "prediction"), layer


def observed(
    adata_pred: AnnData,
    genes: list[str],
    *,
    truth: AnnData | None,
    pred_layer: str | None,
    truth_layer: str | None,
    truth_transform: Literal["log2p1", "none"],
) -> np.ndarray | None:
    """Measured expression of ``genes`` on the log2(1 + x) scale, aligned with ``adata_pred`` (or ``None``).

    Without ``truth``, the measured counts :func:`hyperst.tl.predict` keeps in ``adata_pred.X`` (when the
    prediction sits in a layer) are used.
    """
    if truth_transform not in ("log2p1", "none"):
        raise ValueError(f"`truth_transform` must be 'log2p1' or 'none', got {truth_transform!r}.")
    if truth is None:
        if pred_layer is None:
            return None
        source, layer = adata_pred, None
    else:
        source, layer = align(truth, adata_pred), truth_layer
        check_genes(genes, source.var_names, "truth")
        if layer is not None and layer not in source.layers:
            raise ValueError(f"`truth_layer={layer!r}` is not a layer of `truth`; layers: {sorted(source.layers)}.")
    x = values_of(source, genes, layer, "measured expression")
    if truth_transform == "log2p1":
        if (x < 0).any():
            raise ValueError(
                "The measured expression has negative values but `truth_transform='log2p1'` expects raw counts; "
                "pass `truth_transform='none'` if it is already on the log2(1 + x) scale."
            )
        x = np.log2(1.0 + x)
    return x


def align(truth: AnnData, adata_pred: AnnData) -> AnnData:
    """``truth`` restricted to and ordered like the spots of ``adata_pred``."""
    from anndata import AnnData

    if not isinstance(truth, AnnData):
        raise TypeError(f"`truth` must be an AnnData with measured counts, got {type(truth).__name__}.")
    if truth.obs_names.equals(adata_pred.obs_names):
        return truth
    if adata_pred.obs_names.isin(truth.obs_names).all() and truth.obs_names.is_unique:
        return truth[adata_pred.obs_names]
    raise ValueError(
        "`truth` and `adata_pred` do not share their spots (obs_names): pass the table `hst.tl.predict` was "
        "run on, or align them first."
    )


# ---------------------------------------------------------------------------------------------- spot maps
def image_array(image: Any) -> np.ndarray | None:
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


def sample_mask(
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


def default_diameter(adatas: Sequence[AnnData | None], sample: str | None, xy: np.ndarray) -> float:
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


@dataclass(frozen=True)
class SpotFrame:
    """Where the spots of one sample go on a map: the image under them, their centres and size in its pixels."""

    #: The image drawn under the spots (``None``: none).
    image: np.ndarray | None
    #: Which spots of the table are drawn (the spots of :attr:`sample`).
    mask: np.ndarray
    #: The sample drawn (``None`` when the table has no sample column).
    sample: str | None
    #: Centres of the drawn spots in image pixels (``.obsm["spatial"]`` × ``scale_factor``).
    xy: np.ndarray
    #: Spot diameter in image pixels.
    diameter: float

    @property
    def n_spots(self) -> int:
        """Number of spots drawn."""
        return len(self.xy)

    def panel_height(self, width: float, *, title: float = 0.45) -> float:
        """Height in inches of a map ``width`` inches wide, plus ``title`` inches for its title.

        The map's aspect is that of the spots' extent, clipped to 0.5–2.
        """
        span = np.ptp(self.xy, axis=0) + 2 * self.diameter
        aspect = float(np.clip(span[1] / span[0], 0.5, 2.0)) if span[0] > 0 else 1.0
        return width * aspect + title


def prediction_table(data: Any, table_key: str) -> tuple[AnnData, Any]:
    """The prediction table of ``data`` (an AnnData, or ``sdata.tables[table_key]``) and the SpatialData or ``None``."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data, None
    tables = getattr(data, "tables", None)
    if tables is None or not hasattr(data, "images"):
        raise TypeError(
            "`adata_pred` must be the AnnData of hst.tl.predict or a SpatialData holding it, got "
            f"{type(data).__name__}."
        )
    if table_key not in tables:
        raise ValueError(
            f"`table_key={table_key!r}` is not a table of the SpatialData; tables: {sorted(tables.keys())}. Pass the "
            "`key_added` that hst.tl.predict used."
        )
    return tables[table_key], data


def _legacy_image(adata: AnnData, sample: str | None) -> tuple[np.ndarray, float] | None:
    """The H&E of ``.uns["spatial"][sample]`` (hires, else lowres) and its pixels per ``.obsm["spatial"]`` unit."""
    legacy = adata.uns.get(Key.UNS_SPATIAL)
    if not isinstance(legacy, Mapping) or not legacy:
        return None
    if sample is not None and str(sample) in legacy:
        entry = legacy[str(sample)]
    elif len(legacy) == 1 and sample is None:
        entry = next(iter(legacy.values()))
    else:
        return None
    images = entry.get(Key.SPATIAL_IMAGES, {}) if isinstance(entry, Mapping) else {}
    factors = entry.get(Key.SPATIAL_SCALEFACTORS, {}) if isinstance(entry, Mapping) else {}
    for res, factor in ((Key.SPATIAL_HIRES, Key.SCALEF_HIRES), (Key.SPATIAL_LOWRES, Key.SCALEF_LOWRES)):
        if res in images and factors.get(factor):
            return image_array(images[res]), float(factors[factor])
    return None


def _recorded_image(adata: AnnData, sdata: Any, sample: str | None) -> tuple[np.ndarray, float] | None:
    """A thumbnail of the image :func:`hyperst.tl.predict` recorded for ``sample`` and its scale, from ``sdata``."""
    from hyperst.pp._pyramid import thumbnail

    block = adata.uns.get(Key.UNS, {})
    spots = block.get(Key.UNS_SPOTS, {}) if isinstance(block, Mapping) else {}
    if not isinstance(spots, Mapping):
        return None
    meta = spots.get(sample) if sample is not None else (next(iter(spots.values())) if len(spots) == 1 else None)
    if not isinstance(meta, Mapping) or meta.get("image_key") not in sdata.images or not meta.get("image_scale"):
        return None
    rgb, scale = thumbnail(sdata.images[meta["image_key"]], max_side=2000)
    return rgb, scale * float(meta["image_scale"])


def spot_frame(
    adata_pred: AnnData,
    *,
    truth: AnnData | None,
    image: Any,
    scale_factor: float | None,
    spot_size: float | None,
    sample: str | None,
    sample_key: str,
    sdata: Any = None,
) -> SpotFrame:
    """Resolve image, sample, spot centres and spot size of a map of ``adata_pred`` (checks each argument).

    ``image=None`` finds the H&E: ``.uns["spatial"][sample]`` of the table (hires, else lowres, with its
    scale factor), else, with ``sdata``, the image recorded in ``.uns["hyperst"]["spots"][sample]``
    (``"image_key"``, ``"image_scale"``; a thumbnail of at most 2000 pixels a side); ``image=False`` draws none.
    """
    if scale_factor is not None and (image is None or image is False):
        raise ValueError(
            "`scale_factor` goes with an `image=` you pass (it maps `.obsm['spatial']` to that image's pixels); "
            "leave it None when the image is found in the data."
        )
    if scale_factor is None:
        scale_factor = 1.0
    if isinstance(scale_factor, bool) or not scale_factor > 0:
        raise ValueError(f"`scale_factor` must be positive, got {scale_factor}.")
    img = None if image is None or image is False else image_array(image)
    if Key.OBSM_SPATIAL not in adata_pred.obsm:
        raise ValueError(
            f"`adata_pred` has no spot coordinates in `.obsm[{Key.OBSM_SPATIAL!r}]`: predict on a table that has "
            "them (hst.tl.predict copies them)."
        )
    xy_all = np.asarray(adata_pred.obsm[Key.OBSM_SPATIAL], dtype=np.float64)[:, :2]
    mask, sample_name = sample_mask(
        [adata_pred, truth], adata_pred.n_obs, sample, sample_key, image is not False
    )
    if image is None:
        found = _legacy_image(adata_pred, sample_name)
        if found is None and sdata is not None:
            found = _recorded_image(adata_pred, sdata, sample_name)
            if found is None:
                logger.warning(
                    f"no H&E found for sample {sample_name!r}: the table has no `.uns[{Key.UNS_SPATIAL!r}]` entry "
                    "or recorded image (hst.tl.predict writes both); pass `image=` and `scale_factor=`."
                )
        if found is not None:
            img, scale_factor = found
    xy = xy_all[mask]
    if not len(xy):
        raise ValueError("No spots to plot.")
    diameter = spot_size if spot_size is not None else default_diameter([truth, adata_pred], sample_name, xy)
    if not diameter > 0:
        raise ValueError(f"`spot_size` must be positive, got {spot_size}.")
    return SpotFrame(img, mask, sample_name, xy * scale_factor, float(diameter) * scale_factor)


def map_values(
    adata_pred: AnnData,
    genes: list[str],
    *,
    truth: AnnData | None,
    layer: str | None,
    truth_layer: str | None,
    truth_transform: str,
    image: Any,
    scale_factor: float | None,
    spot_size: float | None,
    sample: str | None,
    sample_key: str,
    sdata: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, SpotFrame]:
    """What a map of predicted (and observed) expression draws: both ``(n_drawn, G)`` and the spot frame.

    The one sequence behind :func:`hyperst.pl.spatial`, :func:`~hyperst.pl.intervals` and
    :func:`~hyperst.pl.reliability`: the prediction (:func:`prediction`), the observed values of ``truth`` or
    of the table (:func:`observed`, ``None`` when there are none), and :func:`spot_frame`, rows restricted to
    the drawn spots.
    """
    pred, pred_layer = prediction(adata_pred, genes, layer)
    truth = align(truth, adata_pred) if truth is not None else None
    obs = observed(
        adata_pred, genes, truth=truth, pred_layer=pred_layer, truth_layer=truth_layer, truth_transform=truth_transform
    )
    frame = spot_frame(adata_pred, truth=truth, image=image, scale_factor=scale_factor, spot_size=spot_size,
                       sample=sample, sample_key=sample_key, sdata=sdata)
    return pred[frame.mask], None if obs is None else obs[frame.mask], frame


def _circles(ax: Axes, xy: np.ndarray, diameter: float, **kwargs: Any) -> EllipseCollection:
    from matplotlib.collections import EllipseCollection

    n = len(xy)
    return EllipseCollection(
        widths=np.full(n, diameter),
        heights=np.full(n, diameter),
        angles=np.zeros(n),
        units="xy",
        offsets=xy,
        offset_transform=ax.transData,
        **kwargs,
    )


def shared_norm(panels: Sequence[np.ndarray]) -> Normalize:
    """One colour scale over all ``panels``: from their minimum to their maximum."""
    from matplotlib.colors import Normalize

    vmin = float(min(np.min(p) for p in panels))
    vmax = float(max(np.max(p) for p in panels))
    return Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9)


def draw_map(
    ax: Axes, frame: SpotFrame, values: np.ndarray, *, norm: Normalize, cmap: str, title: str
) -> EllipseCollection:
    """One map panel: the image (if any), the spots as filled circles coloured by ``values``, image orientation.

    The spots are the first collection of ``ax``.
    """
    if frame.image is not None:
        ax.imshow(frame.image, cmap="gray" if frame.image.ndim == 2 else None, interpolation="antialiased")
    col = _circles(ax, frame.xy, frame.diameter, cmap=cmap, norm=norm, linewidths=0)
    col.set_array(values)
    ax.add_collection(col, autolim=False)
    lo = frame.xy.min(0) - frame.diameter
    hi = frame.xy.max(0) + frame.diameter
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return col


#: Colour of the rings around flagged (out-of-distribution) spots.
FLAG_COLOR = "#ff1f5b"


def outline_spots(ax: Axes, frame: SpotFrame, which: np.ndarray, *, label: str | None = None) -> EllipseCollection:
    """Rings around the drawn spots where ``which`` (a boolean per drawn spot) is true."""
    col = _circles(
        ax,
        frame.xy[which],
        frame.diameter * 1.08,
        facecolors="none",
        edgecolors=FLAG_COLOR,
        linewidths=1.3,
        label=label,
    )
    ax.add_collection(col, autolim=False)
    return col


# ---------------------------------------------------------------------------------------------- embeddings
def embedding_keys(adata: AnnData, keys: str | Sequence[str]) -> list[str]:
    """Resolve ``keys`` (``"auto"``: the HyperST embeddings present) and check they exist and match."""
    if isinstance(keys, str) and keys == "auto":
        out = [k for k in STREAMS if k in adata.obsm]
        if not out:
            raise ValueError(
                f"`adata` has no HyperST embeddings in `.obsm` (looked for {list(STREAMS)}): run `hst.tl.fit` "
                "(training tables) or `hst.tl.predict` first, or pass `keys`."
            )
        return out
    out = as_list(keys, "keys")
    missing = [k for k in out if k not in adata.obsm]
    if missing:
        raise ValueError(f"Unknown embedding key(s) {missing}: `.obsm` holds {sorted(adata.obsm)}.")
    if len(set(out)) != len(out):
        raise ValueError(f"`keys` contains duplicates: {out}.")
    dims = {k: np.shape(adata.obsm[k]) for k in out}
    if any(len(s) != 2 for s in dims.values()) or len({s[1] for s in dims.values()}) != 1:
        raise ValueError(f"The embeddings must be 2-d arrays of the same width, got shapes {dims}.")
    return out


def embedding(adata: AnnData, key: str) -> np.ndarray:
    """``.obsm[key]`` as a finite float64 array."""
    x = np.asarray(adata.obsm[key], dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"`.obsm[{key!r}]` contains NaN or infinite values.")
    return x


def _fit_record(adata: AnnData) -> Mapping[str, Any]:
    rec = adata.uns.get(Key.UNS, {})
    return rec if isinstance(rec, Mapping) else {}


def predict_record(adata: AnnData) -> Mapping[str, Any]:
    """``.uns["hyperst"]["predict"]``, the record :func:`hyperst.tl.predict` writes (``{}`` when absent)."""
    rec = _fit_record(adata).get(Key.UNS_PREDICT, {})
    return rec if isinstance(rec, Mapping) else {}


def geometry_of(adata: AnnData) -> str:
    """``"lorentz"`` or ``"euclidean"`` as recorded by :func:`hyperst.tl.fit` (``"lorentz"`` when unknown)."""
    fit = _fit_record(adata).get(Key.UNS_FIT, {})
    config = fit.get("config", {}) if isinstance(fit, Mapping) else {}
    return str(config.get("geometry", "lorentz")) if isinstance(config, Mapping) else "lorentz"


def curvature_of(adata: AnnData, curvature: float | None) -> float:
    """``curvature`` if given, else the learned one recorded in ``.uns["hyperst"]`` (fit, then predict), else 1."""
    if curvature is None:
        rec = _fit_record(adata)
        for sub in (Key.UNS_FIT, Key.UNS_PREDICT):
            entry = rec.get(sub, {})
            if isinstance(entry, Mapping) and entry.get("curvature") is not None:
                curvature = float(entry["curvature"])
                break
        else:
            logger.warning(
                "no curvature recorded in `.uns['hyperst']`; using c = 1. Pass `curvature=float(model.network."
                "curvature)` for the learned one."
            )
            curvature = 1.0
    curvature = float(curvature)
    if not (np.isfinite(curvature) and curvature > 0):
        raise ValueError(f"`curvature` must be a positive number, got {curvature}.")
    return curvature


def hyperbolic_radius(x: np.ndarray, c: float) -> np.ndarray:
    r"""Geodesic distance to the origin of points given by Lorentz space components.

    :math:`d(O, x) = \operatorname{asinh}(\sqrt c\,\lVert x\rVert)/\sqrt c` (the same value as
    :func:`hyperst.geometry.dist` to the origin, in closed form).
    """
    return np.arcsinh(np.sqrt(c) * np.linalg.norm(x, axis=-1)) / np.sqrt(c)
