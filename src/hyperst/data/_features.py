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

    Raises
    ------
    ValueError
        When the arrays disagree in length or hold NaN/infinite values.
    """

    spot: np.ndarray
    niche: np.ndarray | None
    targets: np.ndarray
    niche_targets: np.ndarray | None

    def __post_init__(self) -> None:
        n = len(self.spot)
        for name in ("niche", "targets", "niche_targets"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"`{name}` has {len(arr)} rows, the spot features {n}.")
        for name in ("spot", "niche", "targets", "niche_targets"):
            arr = getattr(self, name)
            if arr is not None and not np.isfinite(arr).all():
                raise ValueError(f"`{name}` contains NaN or infinite values.")

    def __len__(self) -> int:
        return len(self.spot)


class FeatureDataset(Dataset):
    """Rows ``index`` of a :class:`FeatureData` as dicts of float32 tensors (picklable).

    Items have the keys the network's ``forward`` takes: ``"spot"``, ``"niche"``, ``"targets"`` and
    ``"niche_targets"`` (those the data has).
    """

    def __init__(self, data: FeatureData, index: np.ndarray) -> None:
        def take(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a[index], dtype=np.float32))

        arrays = {"spot": data.spot, "niche": data.niche, "targets": data.targets, "niche_targets": data.niche_targets}
        self.tensors = {k: t for k, t in ((k, take(v)) for k, v in arrays.items()) if t is not None}
        self.n = len(index)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}
