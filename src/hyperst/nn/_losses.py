"""HyperST losses: contrastive (HCA) and entailment-cone (HEA) alignment (METHOD §4)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from hyperst import geometry as geo

__all__ = [
    "contrastive_logits",
    "contrastive_loss",
    "entailment_loss",
    "hierarchical_contrastive_loss",
    "hierarchical_entailment_loss",
]


def _check_geometry(geometry: str) -> None:
    if geometry not in ("lorentz", "euclidean"):
        raise ValueError(f"`geometry` must be 'lorentz' or 'euclidean', got {geometry!r}.")


def contrastive_logits(
    query: Tensor,
    key: Tensor,
    *,
    scale: float | Tensor,
    c: float | Tensor = 1.0,
    geometry: str = "lorentz",
) -> Tensor:
    r"""Similarity logits between every query and every key.

    ``"lorentz"``: :math:`-s\,d_L(q_i, k_j)`; ``"euclidean"``: :math:`s\cos(q_i, k_j)` (CLIP).
    Computed in float32 even under autocast.

    Parameters
    ----------
    query, key
        Embeddings, shapes ``(n, d)`` and ``(m, d)`` (space components for ``"lorentz"``).
    scale
        Logit scale :math:`s = 1/\tau`.
    c
        Curvature magnitude (``"lorentz"`` only).
    geometry
        ``"lorentz"`` or ``"euclidean"``.

    Returns
    -------
    Logits of shape ``(n, m)``.
    """
    _check_geometry(geometry)
    if geometry == "lorentz":
        return -scale * geo.pairwise_dist(query, key, c)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(query.float(), dim=-1)
        k = F.normalize(key.float(), dim=-1)
        return scale * (q @ k.T)


def contrastive_loss(
    query: Tensor,
    key: Tensor,
    *,
    scale: float | Tensor,
    c: float | Tensor = 1.0,
    geometry: str = "lorentz",
) -> Tensor:
    r"""Directed contrastive loss CE(query → key): each query must pick its own key in the batch.

    Cross-entropy of :func:`contrastive_logits` with the diagonal as targets (row ``i`` of ``query``
    matches row ``i`` of ``key``).

    Parameters
    ----------
    query, key
        Matched embeddings, both ``(n, d)``.
    scale, c, geometry
        See :func:`contrastive_logits`.

    Returns
    -------
    Scalar loss (mean over the batch).
    """
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"`query` and `key` must have the same batch size, got {query.shape[0]} and {key.shape[0]}.")
    logits = contrastive_logits(query, key, scale=scale, c=c, geometry=geometry)
    targets = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, targets)


def entailment_loss(
    parent: Tensor,
    child: Tensor,
    *,
    aperture_scale: float = 1.0,
    c: float | Tensor = 1.0,
    min_radius: float = geo.MIN_RADIUS,
    geometry: str = "lorentz",
) -> Tensor:
    r"""Entailment-cone loss :math:`E_k = \mathrm{mean}\,\max(0, \mathrm{ext}(p,q) - k\,\mathrm{aper}(p))`.

    Zero when every child lies inside its parent's cone widened by ``k``; grows with the angle by
    which it lies outside.

    Parameters
    ----------
    parent, child
        Matched embeddings, both ``(n, d)``; row ``i`` of ``child`` should be entailed by row ``i`` of
        ``parent``.
    aperture_scale
        ``k``, the aperture multiplier.
    c
        Curvature magnitude (``"lorentz"`` only).
    min_radius
        ``K`` of the half-aperture.
    geometry
        ``"lorentz"`` (hyperbolic cones) or ``"euclidean"`` (Euclidean cones).

    Returns
    -------
    Scalar loss.
    """
    _check_geometry(geometry)
    if geometry == "lorentz":
        angle = geo.exterior_angle(parent, child, c)
        aperture = geo.half_aperture(parent, c, min_radius=min_radius)
    else:
        angle = geo.euclidean_exterior_angle(parent, child)
        aperture = geo.euclidean_half_aperture(parent, min_radius=min_radius)
    return torch.clamp(angle - aperture_scale * aperture, min=0.0).mean()


def hierarchical_contrastive_loss(
    embeddings: Mapping[str, Tensor],
    pairs: Mapping[str, tuple[tuple[str, str], float]],
    *,
    scale: float | Tensor,
    c: float | Tensor = 1.0,
    geometry: str = "lorentz",
) -> tuple[Tensor, dict[str, Tensor]]:
    """HCA: weighted mean of directed contrastive losses over stream pairs.

    Parameters
    ----------
    embeddings
        Stream name → embeddings (e.g. ``"image_spot"``, ``"gene_spot"``, …).
    pairs
        Term name → ``((query stream, key stream), weight)``, as returned by
        :meth:`hyperst.nn.HyperSTConfig.active_contrastive_pairs`.
    scale, c, geometry
        See :func:`contrastive_logits`.

    Returns
    -------
    The loss and each term's value (detached).
    """
    if not pairs:
        raise ValueError("`pairs` is empty: no contrastive term to compute.")
    total = None
    weight_sum = 0.0
    terms: dict[str, Tensor] = {}
    for name, ((q, k), weight) in pairs.items():
        loss = contrastive_loss(embeddings[q], embeddings[k], scale=scale, c=c, geometry=geometry)
        terms[name] = loss.detach()
        total = weight * loss if total is None else total + weight * loss
        weight_sum += weight
    return total / weight_sum, terms


def hierarchical_entailment_loss(
    embeddings: Mapping[str, Tensor],
    terms: Mapping[str, tuple[str, str, float, float]],
    *,
    c: float | Tensor = 1.0,
    min_radius: float = geo.MIN_RADIUS,
    geometry: str = "lorentz",
) -> tuple[Tensor, dict[str, Tensor]]:
    """HEA: weighted sum of entailment losses over (parent, child) stream pairs.

    Parameters
    ----------
    embeddings
        Stream name → embeddings.
    terms
        Term name → ``(parent stream, child stream, weight, k)``, as returned by
        :meth:`hyperst.nn.HyperSTConfig.active_entailment_terms`.
    c, min_radius, geometry
        See :func:`entailment_loss`.

    Returns
    -------
    The loss and each term's unweighted value (detached).
    """
    if not terms:
        raise ValueError("`terms` is empty: no entailment term to compute.")
    total = None
    values: dict[str, Tensor] = {}
    for name, (parent, child, weight, k) in terms.items():
        loss = entailment_loss(
            embeddings[parent], embeddings[child], aperture_scale=k, c=c, min_radius=min_radius, geometry=geometry
        )
        values[name] = loss.detach()
        total = weight * loss if total is None else total + weight * loss
    return total, values
