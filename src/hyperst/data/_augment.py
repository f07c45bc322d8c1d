"""Dihedral augmentation: the 8 symmetries of the square, for numpy arrays and torch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["dihedral", "dihedral_inverse"]


def _layout(x: Any, layout: str | None) -> str:
    if layout is not None:
        if layout not in ("hwc", "chw"):
            raise ValueError(f"`layout` must be 'hwc', 'chw' or None, got {layout!r}.")
        return layout
    if x.ndim < 3:
        raise ValueError(f"dihedral: need (..., H, W, C) or (..., C, H, W), got {x.ndim} dims; pass `layout`")
    last, third = int(x.shape[-1]), int(x.shape[-3])
    ch = (1, 3, 4)
    if last in ch and third not in ch:
        return "hwc"
    if third in ch and last not in ch:
        return "chw"
    raise ValueError(
        f"dihedral: cannot tell channels-last from channels-first for shape {tuple(x.shape)}; pass `layout`."
    )


def dihedral(x: np.ndarray | torch.Tensor, k: int, *, layout: str | None = None) -> np.ndarray | torch.Tensor:
    """Apply one of the 8 symmetries of the square to images.

    ``k % 4`` quarter turns (counter-clockwise, as :func:`numpy.rot90`) after a left-right flip when
    ``k >= 4``. :func:`dihedral_inverse` gives the inverse.

    Parameters
    ----------
    x
        Array or tensor ``(..., H, W, C)`` or ``(..., C, H, W)``.
    k
        Element of the group, ``0 <= k < 8`` (0 = identity).
    layout
        ``"hwc"`` or ``"chw"``; inferred from which axis has 1, 3 or 4 entries when ``None``.

    Returns
    -------
    The transformed array (a numpy view) or tensor (a copy).

    Raises
    ------
    ValueError
        If ``k`` is outside ``0..7`` or the layout is ambiguous.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= int(k) < 8:
        raise ValueError(f"`k` must be an int in 0..7, got {k!r}.")
    k = int(k)
    lay = _layout(x, layout)
    h_ax, w_ax = (-3, -2) if lay == "hwc" else (-2, -1)
    if isinstance(x, torch.Tensor):
        y = torch.flip(x, dims=(w_ax,)) if k >= 4 else x
        return torch.rot90(y, k % 4, dims=(h_ax, w_ax))
    y = np.flip(x, axis=w_ax) if k >= 4 else x
    return np.rot90(y, k % 4, axes=(h_ax, w_ax))


def dihedral_inverse(k: int) -> int:
    """Index of the inverse of :func:`dihedral` ``k``.

    Parameters
    ----------
    k
        Element of the group, ``0 <= k < 8``.

    Returns
    -------
    ``k'`` such that ``dihedral(dihedral(x, k), k') == x``.

    Raises
    ------
    ValueError
        If ``k`` is outside ``0..7``.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= int(k) < 8:
        raise ValueError(f"`k` must be an int in 0..7, got {k!r}.")
    k = int(k)
    return (4 - k) % 4 if k < 4 else k  # reflections are involutions
