"""Torch dataset of normalised spot (and niche) crops, with dihedral augmentation and optional targets."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hyperst._constants import IMAGENET_MEAN, IMAGENET_STD
from hyperst.data._augment import dihedral

__all__ = ["SpotCropDataset"]


def _memmap_state(arr: Any) -> Any:
    """Replace a file-backed memmap by a descriptor so that pickling does not copy the data.

    Only memmaps that map a file directly (not slices of one, whose ``offset`` attribute is the
    parent's) are replaced; anything else is pickled as is.
    """
    if isinstance(arr, np.memmap) and getattr(arr, "filename", None) and isinstance(arr.base, mmap.mmap):
        order = "C" if arr.flags.c_contiguous else ("F" if arr.flags.f_contiguous else None)
        if order is not None:
            return ("__memmap__", str(arr.filename), arr.dtype.str, arr.shape, int(arr.offset), order)
    return arr


def _memmap_restore(state: Any) -> Any:
    if isinstance(state, tuple) and len(state) == 6 and state[0] == "__memmap__":
        _, filename, dtype, shape, offset, order = state
        return np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=tuple(shape), offset=offset, order=order)
    return state


class SpotCropDataset(Dataset):
    """Torch dataset of normalised spot (and niche) crops with optional targets.

    Parameters
    ----------
    spot
        ``(n, h, w, 3)`` uint8 spot crops (numpy array or :class:`numpy.memmap`), or a callable
        ``source(i)`` returning the spot crop or a ``(spot, niche)`` tuple of ``(h, w, 3)`` uint8 crops.
        A callable must be picklable to be used with ``DataLoader(num_workers > 0)`` under ``spawn``.
    niche
        ``(n, h, w, 3)`` uint8 niche crops, or ``None`` (no ``"niche"`` entry, unless ``spot`` is a
        callable returning pairs).
    targets
        Optional mapping of name to ``(n, ...)`` arrays (dense or scipy sparse rows), e.g. spot and niche
        expression; returned as float32 tensors under their names.
    length
        Number of items; required when ``spot`` is a callable.
    indices
        Optional subset (rows of the arrays) the dataset exposes, in this order.
    mean, std
        Per-channel normalisation on the 0–1 scale (ImageNet by default).
    augment
        Apply one random :func:`dihedral` transform per item, the same to spot and niche.
    seed
        Seed of the augmentation. The transform of item ``i`` is drawn from a generator seeded with
        ``(seed, epoch, i)``, so runs are reproducible whatever the worker layout; call
        :meth:`set_epoch` before each epoch to draw new transforms.

    Raises
    ------
    ValueError
        If shapes or lengths disagree.
    """

    def __init__(
        self,
        spot: np.ndarray | Callable[[int], Any],
        niche: np.ndarray | None = None,
        *,
        targets: Mapping[str, Any] | None = None,
        length: int | None = None,
        indices: np.ndarray | Sequence[int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if callable(spot) and not isinstance(spot, np.ndarray):
            if length is None:
                raise ValueError("`length` is required when `spot` is a callable source.")
            n = int(length)
        else:
            if spot.ndim != 4 or spot.shape[-1] != 3 or np.dtype(spot.dtype) != np.uint8:
                raise ValueError(f"`spot` must be (n, h, w, 3) uint8 crops, got {spot.dtype} {spot.shape}.")
            n = int(spot.shape[0])
            if length is not None and int(length) != n:
                raise ValueError(f"`length`={length} disagrees with the {n} spot crops.")
        if niche is not None:
            if niche.ndim != 4 or niche.shape[-1] != 3 or np.dtype(niche.dtype) != np.uint8:
                raise ValueError(f"`niche` must be (n, h, w, 3) uint8 crops, got {niche.dtype} {niche.shape}.")
            if int(niche.shape[0]) != n:
                raise ValueError(f"`niche` has {niche.shape[0]} crops but `spot` has {n}.")
        self._targets: dict[str, Any] = {}
        for name, arr in (targets or {}).items():
            if name in ("spot", "niche", "index", "dihedral"):
                raise ValueError(f"`targets` key {name!r} is reserved; rename it.")
            if arr.shape[0] != n:
                raise ValueError(f"`targets[{name!r}]` has {arr.shape[0]} rows but there are {n} crops.")
            self._targets[name] = arr
        if indices is None:
            self._indices = None
        else:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(idx) and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"`indices` must lie in [0, {n}).")
            self._indices = idx
        mean_t = np.asarray(mean, dtype=np.float32).reshape(-1)
        std_t = np.asarray(std, dtype=np.float32).reshape(-1)
        if mean_t.shape != (3,) or std_t.shape != (3,) or (std_t <= 0).any():
            raise ValueError("`mean` and `std` must be three numbers each (RGB, 0–1 scale), std > 0.")
        self.spot = spot
        self.niche = niche
        self._n = n
        self.mean = mean_t
        self.std = std_t
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed the augmentation (call before each epoch).

        Parameters
        ----------
        epoch
            Epoch number.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._n if self._indices is None else len(self._indices)

    def transform_index(self, i: int) -> int:
        """Dihedral transform drawn for item ``i`` at the current epoch (0 when ``augment`` is off).

        Parameters
        ----------
        i
            Item index.

        Returns
        -------
        ``k`` of :func:`dihedral`.
        """
        if not self.augment:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return int(rng.integers(8))

    def _to_tensor(self, crop: np.ndarray, k: int) -> torch.Tensor:
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[-1] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"crops must be (h, w, 3) uint8, got {crop.dtype} {crop.shape}.")
        crop = np.array(dihedral(crop, k, layout="hwc"), dtype=np.float32)  # a writable copy
        x = torch.from_numpy(crop).permute(2, 0, 1).div_(255.0)
        mean = torch.from_numpy(self.mean)[:, None, None]
        std = torch.from_numpy(self.std)[:, None, None]
        return x.sub_(mean).div_(std).contiguous()

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items.")
        i = int(i) % len(self)
        row = i if self._indices is None else int(self._indices[i])
        k = self.transform_index(i)
        if isinstance(self.spot, np.ndarray):
            spot = self.spot[row]
            niche = self.niche[row] if self.niche is not None else None
        else:
            got = self.spot(row)
            spot, niche = got if isinstance(got, tuple) else (got, None)
            if self.niche is not None:
                niche = self.niche[row]
        item: dict[str, Any] = {"spot": self._to_tensor(spot, k), "index": row, "dihedral": k}
        if niche is not None:
            item["niche"] = self._to_tensor(niche, k)
        for name, arr in self._targets.items():
            r = arr[row]
            r = r.toarray().reshape(-1) if hasattr(r, "toarray") else np.asarray(r)
            item[name] = torch.as_tensor(np.asarray(r, dtype=np.float32))
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["spot"] = _memmap_state(self.spot)
        state["niche"] = _memmap_state(self.niche)
        state["_targets"] = {k: _memmap_state(v) for k, v in self._targets.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["spot"] = _memmap_restore(state["spot"])
        state["niche"] = _memmap_restore(state["niche"])
        state["_targets"] = {k: _memmap_restore(v) for k, v in state["_targets"].items()}
        self.__dict__.update(state)
