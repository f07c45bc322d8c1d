"""Frozen-feature inputs: aligned arrays over spots and the torch dataset that serves their rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["FeatureData", "FeatureDataset"]


@dataclass
class FeatureData:
    """Everything a frozen-feature model trains on, as aligned arrays over spots.

    Attributes
    ----------
    spot, niche
        Backbone features ``(n, D)`` of the spot and niche crops (``niche`` may be ``None`` for
        single-level models).
    targets
        Spot expression ``(n, G)`` on the training scale (log2(1 + counts)).
    niche_targets
        Niche expression ``(n, G)`` or ``None``.
    spot_views, niche_views
        Features of augmented views of the same spots ``(n, V, D)`` (degraded copies of the slides,
        :func:`hyperst.pp.image_features` with ``views=``), or ``None``. A training dataset draws, per spot and
        epoch, one of the clean and the ``V`` view features (the same view for the spot and niche crops).

    Raises
    ------
    ValueError
        When the arrays disagree in length or hold NaN/infinite values.
    """

    spot: np.ndarray
    niche: np.ndarray | None
    targets: np.ndarray
    niche_targets: np.ndarray | None
    spot_views: np.ndarray | None = None
    niche_views: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.spot)
        for name in ("niche", "targets", "niche_targets", "spot_views", "niche_views"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"`{name}` has {len(arr)} rows, the spot features {n}.")
        for name, base in (("spot_views", self.spot), ("niche_views", self.niche)):
            arr = getattr(self, name)
            if arr is None:
                continue
            if base is None or arr.ndim != 3 or arr.shape[2] != base.shape[1]:
                raise ValueError(f"`{name}` must be (n, n_views, D) with the width of the clean features, got "
                                 f"{arr.shape}.")
        if (self.niche_views is None) != (self.spot_views is None) and self.niche is not None:
            raise ValueError("`spot_views` and `niche_views` come together (views of both crops).")
        if self.spot_views is not None and self.niche_views is not None and \
                self.spot_views.shape[1] != self.niche_views.shape[1]:
            raise ValueError("`spot_views` and `niche_views` hold different numbers of views.")
        for name in ("spot", "niche", "targets", "niche_targets", "spot_views", "niche_views"):
            arr = getattr(self, name)
            if arr is not None and not np.isfinite(arr).all():
                raise ValueError(f"`{name}` contains NaN or infinite values.")

    def __len__(self) -> int:
        return len(self.spot)

    @property
    def n_views(self) -> int:
        """Number of augmented views (0 without)."""
        return 0 if self.spot_views is None else int(self.spot_views.shape[1])


class FeatureDataset(Dataset):
    """Rows ``index`` of a :class:`FeatureData` as dicts of float32 tensors (picklable).

    Items have the keys the network's ``forward`` takes: ``"spot"``, ``"niche"``, ``"targets"`` and
    ``"niche_targets"`` (those the data has). With ``views=True`` and view features in ``data``, item ``i``
    of epoch ``e`` shows the clean or one of the view features, drawn uniformly from a generator seeded with
    ``(seed, e)`` (:meth:`set_epoch`), the same view for its spot and niche crops.
    """

    def __init__(self, data: FeatureData, index: np.ndarray, *, views: bool = False, seed: int = 0) -> None:
        def take(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a[index], dtype=np.float32))

        arrays = {"spot": data.spot, "niche": data.niche, "targets": data.targets, "niche_targets": data.niche_targets}
        self.tensors = {k: t for k, t in ((k, take(v)) for k, v in arrays.items()) if t is not None}
        self.n = len(index)
        self.views: dict[str, torch.Tensor] = {}
        if views and data.n_views:
            for name, arr in (("spot", data.spot_views), ("niche", data.niche_views)):
                if arr is not None and name in self.tensors:  # (n, 1 + V, D): the clean features first
                    self.views[name] = torch.cat([self.tensors[name][:, None], take(arr)], dim=1)
        self.seed = int(seed)
        self.view = np.zeros(self.n, dtype=np.int64)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the view of every item for ``epoch`` (no-op without views)."""
        if self.views:
            n_choices = next(iter(self.views.values())).shape[1]
            self.view = np.random.default_rng((self.seed, int(epoch))).integers(0, n_choices, self.n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: v[i] for k, v in self.tensors.items()}
        for k, v in self.views.items():
            item[k] = v[i, self.view[i]]
        return item
