"""Augmented views for frozen-mode training: the same spots featurised on degraded copies of their slides.

A frozen backbone sees a training slide only as it was scanned. Users' slides come from other scanners,
magnifications, stain batches and exports, so :func:`hyperst.pp.image_features` can also featurise each
training slide the way :func:`hyperst.pp.degrade` (``hst.datasets.degrade``) shifts it, and
:func:`hyperst.tl.fit` draws one of the clean and shifted features per spot and epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hyperst._logging import logger
from hyperst.pp._degrade import degrade
from hyperst.pp._spots import resolve_spots

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from spatialdata import SpatialData

    from hyperst.pp._layout import CropGeometry

__all__ = ["DEFAULT_VIEWS", "VIEW_OPTIONS", "check_views", "recorded_views", "view_features", "views_record"]

#: The options of :func:`hyperst.pp.degrade` a view may set.
VIEW_OPTIONS: tuple[str, ...] = ("pixel_size", "stain", "background", "jpeg_quality", "seed")
#: Views of ``image_features(views="default")``: coarser scans in octaves, a stain batch, blanked glass.
DEFAULT_VIEWS: dict[str, dict[str, Any]] = {
    "1 µm/px": {"pixel_size": 1.0},
    "2 µm/px": {"pixel_size": 2.0},
    "4 µm/px": {"pixel_size": 4.0},
    "stain 0.3": {"stain": 0.3, "seed": 1},
    "black background": {"background": "black"},
    "white background": {"background": "white"},
}


def check_views(views: Mapping[str, Mapping[str, Any]] | str) -> dict[str, dict[str, Any]]:
    """Validate ``views`` (``"default"`` or ``name → degrade options``) and return it as plain JSON values."""
    if isinstance(views, str):
        if views != "default":
            raise ValueError(f"`views={views!r}`: pass 'default' (DEFAULT_VIEWS) or a dict name → degrade options.")
        views = DEFAULT_VIEWS
    if not isinstance(views, Mapping) or not views:
        raise TypeError("`views` must be a non-empty dict name → degrade options, e.g. "
                        "{'2 µm/px': {'pixel_size': 2.0}, 'stain': {'stain': 0.3}}, or 'default'.")
    out: dict[str, dict[str, Any]] = {}
    for name, opts in views.items():
        if not isinstance(opts, Mapping) or not opts:
            raise ValueError(f"`views[{name!r}]` must be a non-empty dict of degrade options {VIEW_OPTIONS}.")
        bad = sorted(set(opts) - set(VIEW_OPTIONS))
        if bad:
            raise ValueError(f"`views[{name!r}]` has unknown options {bad}; a view may set {VIEW_OPTIONS}.")
        if set(opts) == {"seed"}:
            raise ValueError(f"`views[{name!r}]` sets only a seed: it would repeat the clean features.")
        out[str(name)] = {k: (v.item() if hasattr(v, "item") else v) for k, v in opts.items()}
    return out


def views_record(views: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """The views as the feature record stores them: ordered lists of names and JSON options.

    Lists, because h5ad and zarr sort mapping keys and read a ``/`` in a key as a group.
    """
    import json

    return {"names": list(views), "options": [json.dumps(dict(o), sort_keys=True) for o in views.values()]}


def recorded_views(adata: Any) -> dict[str, dict[str, Any]]:
    """The views of a feature table in the order of its ``.obsm`` view arrays: ``name → degrade options``.

    Empty when the table has none (no ``views=`` given to :func:`hyperst.pp.image_features`).
    """
    import json

    from hyperst._constants import Key

    rec = adata.uns.get(Key.UNS, {}).get(Key.UNS_FEATURES, {}).get("views")
    if not isinstance(rec, Mapping) or "names" not in rec:
        return {}
    names = [str(n) for n in np.asarray(rec["names"]).tolist()]
    options = [json.loads(str(o)) for o in np.asarray(rec["options"]).tolist()]
    return dict(zip(names, options, strict=True))


def view_features(
    sdata: SpatialData,
    views: Mapping[str, Mapping[str, Any]] | str,
    model: torch.nn.Module,
    geom: CropGeometry,
    n_obs: int,
    *,
    spots: Sequence[Any],
    spots_kwargs: Mapping[str, Any],
    device: str = "auto",
    batch_size: int | str = "auto",
    progress: bool = True,
    compile: bool = False,
) -> dict[str, np.ndarray]:
    """Spot and niche features of every view, stacked: ``{"spot": (n, V, D), "niche": (n, V, D)}``.

    Each view degrades every slide image of ``sdata`` (a copy; ``sdata`` is not changed) and featurises it by
    :func:`hyperst.pp.image_features`' own loop. A ``pixel_size`` finer than a slide's own leaves that slide's
    resolution as it is (the view is then the slide at its own resolution, with the other options applied).
    ``spots`` are the clean slides' resolved spots; ``spots_kwargs`` resolve them again on a resampled copy.
    """
    from hyperst.pp._features import slide_features

    views = check_views(views)
    out: dict[str, list[np.ndarray]] = {"spot": [], "niche": []}
    for name, opts in views.items():
        shifted, resampled = sdata, False
        for s in {s.image_key: s for s in spots}.values():  # each image once, whatever the spots on it
            kw = dict(opts)
            if kw.get("pixel_size") is not None and float(kw["pixel_size"]) <= s.pixel_size * (1 + 1e-6):
                kw.pop("pixel_size")
            resampled |= kw.get("pixel_size") is not None
            if set(kw) - {"seed"}:
                shifted = degrade(shifted, image_key=s.image_key, copy=False, **kw)
        # only a resampled image moves the spots' pixel coordinates: resolve them on the copy then
        view_spots = resolve_spots(shifted, **spots_kwargs) if resampled else spots
        _check_same_spots(spots, view_spots, name)
        logger.info(f"view {name!r}: features of the degraded slides")
        got = slide_features(shifted, view_spots, model, geom, n_obs, device=device, batch_size=batch_size,
                             progress=progress, compile=compile, label=f" ({name})")
        for kind in out:
            out[kind].append(got.features[kind])
        del shifted
    return {kind: np.stack(arrs, axis=1) for kind, arrs in out.items()}


def _check_same_spots(spots: Sequence[Any], view_spots: Sequence[Any], name: str) -> None:
    """The degraded copy must resolve to the same spots on the same rows (only the pixel grid may change)."""
    same = len(spots) == len(view_spots) and all(
        a.sample == b.sample and np.array_equal(a.table_rows, b.table_rows)
        for a, b in zip(spots, view_spots, strict=True)
    )
    if not same:  # pragma: no cover - degrade keeps every element; a guard against silent misalignment
        raise RuntimeError(f"view {name!r}: the degraded slides resolve to other spots than the clean ones.")
