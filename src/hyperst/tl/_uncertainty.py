"""Prediction intervals of an ensemble from its members' held-out residuals (cross-conformal, CV+ style).

Every ensemble member early-stops on its own validation slides, so its predictions there are
out-of-sample. From those residuals :class:`Calibration` builds, for a new spot and gene, the mixture over
members of ``member prediction + spot difficulty × member residual`` and reads its ``alpha / 2`` and
``1 - alpha / 2`` quantiles (the CV+ / jackknife+ construction of Barber et al. 2021 with signed,
locally weighted residuals, Lei et al. 2018). Intervals are therefore wide where members disagree
(their predictions spread the mixture) and where the spot is predicted to be hard (the difficulty
model, fit on the held-out errors). :class:`FeatureSpace` is the standardised PCA of the image features
that the difficulty model and the domain checks (:mod:`hyperst.tl._domain`) share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Calibration", "FeatureSpace", "MemberResiduals", "calibrate"]

#: number of residual quantile atoms kept per member and gene
N_ATOMS = 200
#: elements of the (spots × genes × atoms) block sorted at once when reading mixture quantiles
_BLOCK = 8_000_000


@dataclass
class FeatureSpace:
    """Standardised PCA of image features: whitened coordinates and an out-of-distribution score.

    The score of a spot is ``sqrt((Σ_j z_j² + r² / r̄²) / (p + 1))``: its whitened coordinates ``z`` on the
    ``p`` principal axes plus its distance ``r`` to their span, relative to the training spots' mean
    ``r̄²`` (a Mahalanobis distance that also sees directions the training spots never vary in). Training
    spots score about 1.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual: float

    @classmethod
    def fit(cls, x: np.ndarray, *, n_components: int = 32, seed: int = 0) -> FeatureSpace:
        """Fit on training features ``(n, D)``."""
        from sklearn.decomposition import PCA

        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(0)
        scale = x.std(0)
        scale = np.where(scale > 1e-8 * max(float(scale.max()), 1e-12), scale, 1.0)
        xs = (x - mean) / scale
        p = int(max(1, min(n_components, x.shape[0] - 1, x.shape[1])))
        pca = PCA(n_components=p, svd_solver="full", random_state=seed).fit(xs)
        comps = pca.components_.astype(np.float64)
        var = np.maximum(pca.explained_variance_.astype(np.float64), 1e-12)
        res = xs - (xs @ comps.T) @ comps
        residual = float(max((res**2).sum(1).mean(), 1e-12))
        return cls(mean, scale, comps, var, residual)

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Whitened principal coordinates ``(n, p)``."""
        xs = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return (xs @ self.components.T) / np.sqrt(self.variances)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Out-of-distribution score ``(n,)`` (≈ 1 for training spots, larger when unlike them)."""
        xs = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        proj = xs @ self.components.T
        res = xs - proj @ self.components
        z2 = (proj**2 / self.variances).sum(1)
        r2 = (res**2).sum(1) / self.residual
        return np.sqrt((z2 + r2) / (len(self.variances) + 1))

    def tensors(self) -> dict[str, np.ndarray]:
        """Arrays for the model folder."""
        return {"mean": self.mean, "scale": self.scale, "components": self.components,
                "variances": self.variances, "residual": np.array([self.residual])}

    @classmethod
    def from_tensors(cls, t: Mapping[str, Any]) -> FeatureSpace:
        """Inverse of :meth:`tensors`."""
        a = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}
        return cls(a["mean"], a["scale"], a["components"], a["variances"], float(a["residual"][0]))


@dataclass
class MemberResiduals:
    """One member's out-of-sample material: predictions and targets on its validation spots."""

    prediction: np.ndarray
    targets: np.ndarray
    features: np.ndarray


def _design(z: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Covariates of the difficulty model: whitened features and the member's mean predicted level."""
    level = prediction.mean(1, keepdims=True)
    return np.concatenate([z, level, level**2], axis=1)


def _fit_difficulty(design: np.ndarray, mae: np.ndarray) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import RidgeCV

    target = np.log(np.maximum(mae, 1e-3))
    ridge = RidgeCV(alphas=np.logspace(-1, 4, 16)).fit(design, target)
    return np.asarray(ridge.coef_, dtype=np.float64), float(ridge.intercept_)


@dataclass
class Calibration:
    """Residual quantiles of every member and the spot difficulty model: what :meth:`intervals` needs.

    Attributes
    ----------
    atoms
        ``(K, N_ATOMS, G)`` quantiles of each member's held-out residuals (signed, divided by the spot
        difficulty), at levels ``(j + 0.5) / N_ATOMS``.
    weights
        ``(K,)`` number of held-out spots behind each member's residuals (mixture weights).
    moments
        ``(K, 2, G)`` mean and variance of those normalised residuals.
    coef, intercept
        Difficulty model: ``log u = intercept + coef · [z, level, level²]``, fit on held-out mean absolute
        errors (ridge; ``z`` from :class:`FeatureSpace`).
    """

    atoms: np.ndarray
    weights: np.ndarray
    moments: np.ndarray
    coef: np.ndarray
    intercept: float

    @property
    def n_members(self) -> int:
        """Members the residuals come from."""
        return int(self.atoms.shape[0])

    def difficulty(self, z: np.ndarray, prediction: np.ndarray) -> np.ndarray:
        """Relative difficulty ``u`` of each spot ``(n,)`` for one member's prediction ``(n, G)``."""
        return np.exp(np.clip(_design(z, prediction) @ self.coef + self.intercept, -10.0, 10.0))

    def intervals(
        self, predictions: np.ndarray, z: np.ndarray, *, alpha: float = 0.1
    ) -> dict[str, np.ndarray]:
        """Lower and upper ends (coverage ``1 - alpha``), predictive standard deviation and spot uncertainty.

        Parameters
        ----------
        predictions
            ``(K, n, G)`` member predictions (non-negative, log2(1 + counts) scale).
        z
            ``(n, p)`` whitened features of the spots (:meth:`FeatureSpace.whiten`).
        alpha
            Miscoverage: intervals cover ``1 - alpha`` of held-out values (``alpha / 2`` in each tail).

        Returns
        -------
        ``{"lower", "upper", "std"}`` ``(n, G)`` float32 (``lower`` clipped at 0) and ``"uncertainty"``
        ``(n,)``, the mean predictive standard deviation over genes (unlike the interval width it is not
        shortened where the lower end is clipped at 0, so it keeps ordering spots by their expected error).
        """
        if not 0 < alpha < 1:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
        k, n, g = predictions.shape
        if k != self.n_members:
            raise ValueError(f"{k} member predictions for a calibration of {self.n_members} members.")
        u = np.stack([self.difficulty(z, predictions[i]) for i in range(k)])  # (K, n)
        w = self.weights / self.weights.sum()
        mu, var = self.moments[:, 0], self.moments[:, 1]  # (K, G)
        shifted = predictions + u[:, :, None] * mu[:, None, :]
        mean = np.einsum("k,kng->ng", w, shifted)
        second = np.einsum("k,kng->ng", w, (shifted - mean) ** 2 + (u[:, :, None] ** 2) * var[:, None, :])
        lower = np.empty((n, g), np.float32)
        upper = np.empty((n, g), np.float32)
        q = self.atoms.shape[1]
        atom_w = np.repeat(w, q) / q  # (K*Q,)
        rows = max(1, _BLOCK // max(1, g * k * q))
        for start in range(0, n, rows):
            sl = slice(start, start + rows)
            # values (n_b, G, K*Q) of the mixture atoms: member prediction + difficulty × residual quantile
            vals = predictions[:, sl, :, None] + u[:, sl, None, None] * self.atoms.transpose(0, 2, 1)[:, None]
            vals = vals.transpose(1, 2, 0, 3).reshape(vals.shape[1], g, k * q)
            order = np.argsort(vals, axis=-1)
            cum = np.cumsum(atom_w[order], axis=-1)
            sorted_vals = np.take_along_axis(vals, order, axis=-1)
            for target, out in ((alpha / 2, lower), (1 - alpha / 2, upper)):
                idx = np.minimum((cum < target).sum(-1), k * q - 1)
                out[sl] = np.take_along_axis(sorted_vals, idx[..., None], axis=-1)[..., 0]
        np.maximum(lower, 0.0, out=lower)
        upper = np.maximum(upper, lower)
        std = np.sqrt(np.maximum(second, 0)).astype(np.float32)
        return {"lower": lower, "upper": upper, "std": std, "uncertainty": std.mean(1)}

    def tensors(self) -> dict[str, np.ndarray]:
        """Arrays for the model folder."""
        return {"atoms": self.atoms, "weights": self.weights, "moments": self.moments, "coef": self.coef,
                "intercept": np.array([self.intercept])}

    @classmethod
    def from_tensors(cls, t: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`tensors`."""
        a = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}
        return cls(a["atoms"], a["weights"], a["moments"], a["coef"], float(a["intercept"][0]))


def calibrate(space: FeatureSpace, members: Sequence[MemberResiduals]) -> Calibration:
    """Calibration from each member's held-out predictions (see :class:`Calibration`).

    The difficulty model of member ``k``'s residuals is fit on the other members' held-out errors
    (cross-fitting, so no residual scores a model it trained); the stored model is fit on all of them.
    """
    if not members or any(len(m.targets) == 0 for m in members):
        raise ValueError("Every member needs held-out spots to calibrate intervals.")
    designs = [_design(space.whiten(m.features), m.prediction) for m in members]
    maes = [np.abs(m.targets - m.prediction).mean(1) for m in members]
    coef, intercept = _fit_difficulty(np.concatenate(designs), np.concatenate(maes))
    levels = (np.arange(N_ATOMS) + 0.5) / N_ATOMS
    atoms, moments = [], []
    for i, m in enumerate(members):
        others = [j for j in range(len(members)) if j != i]
        c, b = (_fit_difficulty(np.concatenate([designs[j] for j in others]), np.concatenate([maes[j] for j in others]))
                if others else (coef, intercept))
        u = np.exp(np.clip(designs[i] @ c + b, -10.0, 10.0))
        r = (m.targets - m.prediction) / u[:, None]
        atoms.append(np.quantile(r, levels, axis=0))
        moments.append(np.stack([r.mean(0), r.var(0)]))
    return Calibration(np.stack(atoms), np.array([len(m.targets) for m in members], dtype=np.float64),
                       np.stack(moments), coef, intercept)
