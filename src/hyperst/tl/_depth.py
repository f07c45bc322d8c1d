"""Sequencing depth predicted from the image, next to library-size normalised predictions.

A model trained with ``normalize=True`` predicts each spot's composition (log2(1 + counts per 10k)), which
does not carry the training slides' sequencing depth. The depth itself is then a separate output: a ridge
regression from the spot ‖ niche image features to log2(1 + total counts), fitted on the training spots
with α chosen on the validation spots (leave-one-out when there are none), written by
:func:`hyperst.tl.predict` to ``.obs["hyperst_log2_depth"]``. Multiply ``2**depth − 1`` by the composition
over 10k to get counts at the predicted depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hyperst._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from hyperst.data import FeatureData
    from hyperst.tl._options import DataOptions
    from hyperst.tl._setup import TrainingData

__all__ = ["DEPTH_ALPHAS", "DepthModel", "fit_depth", "log2_depth", "training_depth"]

#: Ridge α grid of the depth model (chosen on the validation spots).
DEPTH_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(0, 5, 11))


@dataclass
class DepthModel:
    """Standardised ridge regression of log2(1 + library size) on image features (``x`` → ``x·coef + b``)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float
    val_pearson: float | None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted log2(1 + total counts) of each row of ``x`` (the spot ‖ niche features)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.coef):
            raise ValueError(f"The depth model takes {len(self.coef)} features per spot, got shape {x.shape}.")
        return (((x - self.mean) / self.scale) @ self.coef + self.intercept).astype(np.float32)

    def record(self) -> dict[str, Any]:
        """The JSON part (the arrays are in :meth:`tensors`)."""
        return {"intercept": self.intercept, "alpha": self.alpha, "val_pearson": self.val_pearson,
                "target": "log2(1 + total counts over all genes)"}

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays, for the model folder."""
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef}

    @classmethod
    def from_parts(cls, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> DepthModel:
        """Rebuild from :meth:`record` and :meth:`tensors`."""
        val = record.get("val_pearson")
        return cls(np.asarray(arrays["mean"], np.float64), np.asarray(arrays["scale"], np.float64),
                   np.asarray(arrays["coef"], np.float64), float(record["intercept"]), float(record["alpha"]),
                   None if val is None else float(val))


def log2_depth(adatas: Sequence[AnnData], layer: str | None) -> np.ndarray:
    """log2(1 + total counts over all genes) of every spot of ``adatas`` (the library size of ``normalize``)."""
    from hyperst.pp._utils import counts_matrix

    return np.concatenate([
        np.log2(1.0 + np.asarray(counts_matrix(a, layer).sum(axis=1), dtype=np.float64).ravel()) for a in adatas
    ])


def fit_depth(x: np.ndarray, depth: np.ndarray, train: np.ndarray, val: np.ndarray) -> DepthModel:
    """Ridge from ``x[train]`` to ``depth[train]``, α by the MSE on ``val`` (leave-one-out without ``val``)."""
    from sklearn.linear_model import Ridge, RidgeCV

    x = np.asarray(x, dtype=np.float64)
    mean = x[train].mean(0)
    scale = x[train].std(0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    ztr, ytr = z[train], depth[train]
    if val.any():
        losses = {a: float(np.mean((Ridge(alpha=a).fit(ztr, ytr).predict(z[val]) - depth[val]) ** 2))
                  for a in DEPTH_ALPHAS}
        alpha = min(losses, key=losses.get)
        model = Ridge(alpha=alpha).fit(ztr, ytr)
        pv = model.predict(z[val])
        r = float(np.corrcoef(pv, depth[val])[0, 1]) if np.std(pv) > 0 and np.std(depth[val]) > 0 else None
    else:
        model = RidgeCV(alphas=DEPTH_ALPHAS).fit(ztr, ytr)
        alpha, r = float(model.alpha_), None
    return DepthModel(mean, scale, np.asarray(model.coef_, np.float64), float(model.intercept_), float(alpha), r)


def training_depth(reg: TrainingData, data: FeatureData, options: DataOptions, val_mask: np.ndarray) -> DepthModel:
    """The depth model of a model's registered training spots (``val_mask``: its validation spots)."""
    x = data.spot if data.niche is None else np.concatenate([data.spot, data.niche], axis=1)
    val = np.asarray(val_mask, dtype=bool)
    model = fit_depth(x, log2_depth(reg.adatas, options.layer), ~val, val)
    r = model.val_pearson
    logger.info(f"depth model: ridge α = {model.alpha:g}" + ("" if r is None else f", Pearson r = {r:.2f} on the "
                                                                                   "validation spots"))
    return model
