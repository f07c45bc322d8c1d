"""Torch dataset of normalised spot (and niche) crops, with dihedral augmentation and optional targets."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hyperst._constants import IMAGENET_MEAN, IMAGENET_STD
from hyperst.data._augment import dihedral

__all__ = ["SpotCropDataset", "StackedCrops"]


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
        ``(n, h, w, 3)`` uint8 spot crops (numpy array, :class:`numpy.memmap` or :class:`StackedCrops`), or a callable
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
        if not callable(self.spot) or isinstance(self.spot, np.ndarray):
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


class StackedCrops:
    """Read-only stack of several ``(n_i, h, w, 3)`` crop arrays (e.g. memory-mapped, one per sample), never copied.

    Behaves like the concatenation of the arrays for what crop consumers need: ``shape``, ``dtype``,
    ``ndim``, ``len``, an integer index (one crop, read from its array) and row selection (a slice, an
    integer or boolean array) that returns another :class:`StackedCrops` without reading any crop.
    :meth:`batches` reads consecutive rows batch by batch (for :func:`hyperst.pp.extract_features`);
    ``numpy.asarray`` materialises the whole stack. Pickles memory-mapped parts by file name.

    Parameters
    ----------
    arrays
        The arrays, each ``(n_i, h, w, 3)`` with the same crop shape and dtype.
    rows
        Optional ``(m,)`` int64 rows of the concatenation this stack exposes, in order.

    Raises
    ------
    ValueError
        If the arrays disagree in crop shape or dtype, or ``rows`` is out of range.
    """

    def __init__(self, arrays: Sequence[Any], rows: np.ndarray | None = None) -> None:
        self.arrays = list(arrays)
        if not self.arrays:
            raise ValueError("StackedCrops needs at least one array.")
        first = self.arrays[0]
        for a in self.arrays:
            same = tuple(a.shape[1:]) == tuple(first.shape[1:]) and np.dtype(a.dtype) == np.dtype(first.dtype)
            if a.ndim != 4 or not same:
                raise ValueError(f"StackedCrops: crops {a.shape} {a.dtype} and {first.shape} {first.dtype} differ.")
        self._offsets = np.cumsum([0] + [int(a.shape[0]) for a in self.arrays])
        total = int(self._offsets[-1])
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if len(rows) and (rows.min() < 0 or rows.max() >= total):
                raise ValueError(f"StackedCrops: rows must lie in [0, {total}).")
        self.rows = rows
        self._total = total

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n, h, w, 3)``."""
        n = self._total if self.rows is None else len(self.rows)
        return (n, *tuple(int(v) for v in self.arrays[0].shape[1:]))

    @property
    def dtype(self) -> np.dtype:
        """Crop dtype."""
        return np.dtype(self.arrays[0].dtype)

    @property
    def ndim(self) -> int:
        """4."""
        return 4

    def __len__(self) -> int:
        return self.shape[0]

    def _locate(self, i: int) -> tuple[int, int]:
        row = i if self.rows is None else int(self.rows[i])
        part = int(np.searchsorted(self._offsets, row, side="right")) - 1
        return part, row - int(self._offsets[part])

    def __getitem__(self, key: Any) -> Any:
        n = len(self)
        if isinstance(key, int | np.integer) and not isinstance(key, bool):
            if not -n <= key < n:
                raise IndexError(f"index {key} out of range for {n} crops.")
            part, local = self._locate(int(key) % n)
            return np.asarray(self.arrays[part][local])
        base = np.arange(self._total) if self.rows is None else self.rows
        if isinstance(key, slice):
            sel = base[key]
        else:
            idx = np.asarray(key)
            if idx.dtype == np.bool_:
                if idx.shape != (n,):
                    raise IndexError(f"boolean index of shape {idx.shape} for {n} crops.")
                sel = base[idx]
            elif np.issubdtype(idx.dtype, np.integer):
                sel = base[idx.reshape(-1)]
            else:
                raise IndexError(f"StackedCrops: cannot index with {key!r}.")
        return StackedCrops(self.arrays, sel)

    def batches(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """Yield ``(b, h, w, 3)`` copies of consecutive rows, ``batch_size`` at a time.

        Parameters
        ----------
        batch_size
            Rows per batch.

        Yields
        ------
        The crops of each batch.
        """
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield np.stack([self[i] for i in range(start, stop)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(list(self.batches(256))) if len(self) else np.zeros(self.shape, self.dtype)
        return out if dtype is None else out.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["arrays"] = [_memmap_state(a) for a in self.arrays]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["arrays"] = [_memmap_restore(a) for a in state["arrays"]]
        self.__dict__.update(state)

