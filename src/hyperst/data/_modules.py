"""Data modules: one data splitter and two inputs (frozen features, streamed crops) behind one interface.

A :class:`DataSplitter` turns sample labels (and, for spatially blocked validation, spot coordinates) into
train/validation masks. :class:`FeatureDataModule` serves backbone features (the frozen mode),
:class:`CropDataModule` normalised, optionally augmented image crops (the LoRA mode). Both are
Lightning data modules with the same constructor arguments for the split and the
loaders, so the training runner (:func:`hyperst.tl.HyperST.train`) does not care which one it gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from hyperst._constants import IMAGENET_MEAN, IMAGENET_STD, Key
from hyperst._utils import spot_pitch
from hyperst.data._features import FeatureData, FeatureDataset

__all__ = ["CropDataModule", "DataSplitter", "FeatureDataModule", "SpotDataModule", "Validation", "spatial_block_split"]

#: What :class:`DataSplitter` accepts as ``validation``.
Validation = Literal["auto", "slide", "spatial"] | Sequence[str] | np.ndarray | None


# ---------------------------------------------------------------------------------------------- splits
def spatial_block_split(
    coords: np.ndarray,
    *,
    val_fraction: float = 0.15,
    block_size: float,
    buffer: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Spatially blocked train/validation split of the spots of one slide.

    The slide is cut into square blocks of side ``block_size``; whole blocks are drawn (seeded) for
    validation until ``val_fraction`` of the spots is reached. Training spots closer than ``buffer``
    to any validation spot are dropped, so no niche straddles the split.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres.
    val_fraction
        Target fraction of validation spots.
    block_size
        Side of the blocks (same unit as ``coords``).
    buffer
        Exclusion distance around validation spots (e.g. the niche radius).
    seed
        Seed of the block draw.

    Returns
    -------
    Boolean masks ``(train, validation)``; spots in neither are in the buffer.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    if not 0 < val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
    if not block_size > 0:
        raise ValueError(f"`block_size` must be positive, got {block_size}.")
    blocks = np.floor((coords - coords.min(axis=0)) / block_size).astype(np.int64)
    _, block_id = np.unique(blocks, axis=0, return_inverse=True)
    block_id = block_id.ravel()
    rng = np.random.default_rng(seed)
    order = rng.permutation(block_id.max() + 1)
    counts = np.bincount(block_id)
    target = val_fraction * len(coords)
    chosen, total = [], 0
    for b in order:
        if total >= target:
            break
        if total + counts[b] > 2 * target and total > 0:
            continue
        chosen.append(b)
        total += counts[b]
    val = np.isin(block_id, chosen)
    train = ~val
    if buffer > 0 and val.any():
        dist, _ = cKDTree(coords[val]).query(coords[train], k=1)
        idx = np.flatnonzero(train)
        train[idx[dist <= buffer]] = False
    if not train.any() or not val.any():
        raise ValueError(
            "The spatial split left an empty side: too few spots for blocks of this size. "
            "Lower `block_size`, or pass `validation=None`."
        )
    return train, val


class DataSplitter:
    """Train/validation masks over spots, from sample labels and (for spatial blocks) coordinates.

    Parameters
    ----------
    samples
        Sample (slide) label of every spot.
    coords
        ``(n, 2)`` spot centres; needed only for the spatially blocked split.
    validation
        ``"auto"``: hold out whole slides when there are three or more, else a spatially blocked split
        inside every slide (whole blocks, with a buffer of 1.5 pitches dropped from training so no niche
        straddles the split); ``"slide"``, ``"spatial"``; a list of sample names; a boolean mask over the
        spots; or ``None`` (no validation).
    val_fraction
        Fraction of slides (or spots) held out.
    seed
        Seed of the draw.
    """

    def __init__(
        self,
        samples: np.ndarray,
        coords: np.ndarray | None = None,
        *,
        validation: Validation = "auto",
        val_fraction: float = 0.15,
        seed: int = 42,
    ) -> None:
        self.samples = np.asarray(samples)
        self.coords = coords
        self.validation = validation
        self.val_fraction = val_fraction
        self.seed = seed

    def split(self) -> tuple[np.ndarray, np.ndarray, str]:
        """Boolean ``(train, validation)`` masks and a description of the split.

        The description is ``"none"``, ``"mask"``, ``"slides [...]"`` or ``"spatial blocks"``.
        """
        samples, validation, n = self.samples, self.validation, len(self.samples)
        uniq = list(pd.unique(samples))
        if validation is None:
            return np.ones(n, bool), np.zeros(n, bool), "none"
        if isinstance(validation, np.ndarray) and validation.dtype == bool:
            if len(validation) != n:
                raise ValueError(f"`validation` mask has {len(validation)} entries for {n} spots.")
            return ~validation, validation.copy(), "mask"
        if not isinstance(validation, str):
            names = [str(v) for v in validation]
            unknown = sorted(set(names) - set(uniq))
            if unknown:
                raise ValueError(f"`validation` names unknown samples {unknown}; samples: {uniq}.")
            val = np.isin(samples, names)
            if val.all():
                raise ValueError("`validation` holds every sample: nothing is left to train on.")
            return ~val, val, f"slides {names}"
        if validation not in ("auto", "slide", "spatial"):
            raise ValueError(
                f"`validation` must be 'auto', 'slide', 'spatial', sample names, a mask or None; got {validation!r}."
            )
        if validation == "slide" or (validation == "auto" and len(uniq) >= 3):
            if len(uniq) < 2:
                raise ValueError("`validation='slide'` needs at least two samples.")
            rng = np.random.default_rng(self.seed)
            n_val = min(len(uniq) - 1, max(1, round(self.val_fraction * len(uniq))))
            names = [uniq[i] for i in sorted(rng.choice(len(uniq), size=n_val, replace=False))]
            val = np.isin(samples, names)
            return ~val, val, f"slides {names}"
        if self.coords is None:
            raise ValueError(
                f"A spatially blocked validation split needs spot coordinates in `.obsm[{Key.OBSM_SPATIAL!r}]`; "
                "pass `validation=None` or sample names instead."
            )
        coords = np.asarray(self.coords, dtype=np.float64)[:, :2]
        train, val = np.zeros(n, bool), np.zeros(n, bool)
        for s in uniq:
            idx = np.flatnonzero(samples == s)
            xy = coords[idx]
            pitch = spot_pitch(xy) if len(xy) >= 2 else 1.0
            extent = float(np.max(xy.max(0) - xy.min(0)))
            block = max(3 * pitch, extent / 5)
            t, v = spatial_block_split(
                xy, val_fraction=self.val_fraction, block_size=block, buffer=1.5 * pitch, seed=self.seed
            )
            train[idx[t]] = True
            val[idx[v]] = True
        return train, val, "spatial blocks"

    def n_members(self, requested: int | str = "auto") -> int:
        """How many ensemble members :meth:`member_splits` gives for ``requested`` (``"auto"``: see there)."""
        if requested == "auto":
            n_slides = len(pd.unique(self.samples))
            slide_level = self.validation == "slide" or (self.validation == "auto" and n_slides >= 3)
            return min(5, n_slides) if slide_level else 1
        if isinstance(requested, bool) or not isinstance(requested, int | np.integer) or requested < 1:
            raise ValueError(f"`n_members` must be 'auto' or an integer ≥ 1, got {requested!r}.")
        return int(requested)

    def member_splits(self, n_members: int | str = "auto") -> list[tuple[np.ndarray, np.ndarray, str]]:
        """One ``(train, validation, description)`` split per ensemble member.

        One member: :meth:`split`. Several, with slide-level validation (``"auto"`` with three or more
        slides, or ``"slide"``): the slides are shuffled with the seed and dealt into ``n_members`` folds;
        member ``k`` validates on fold ``k`` and trains on the others, so every slide is held out by exactly
        one member (``n_members`` = number of slides: leave one slide out). With spatially blocked
        validation (``"spatial"``, or ``"auto"`` with one or two slides), member ``k`` draws its blocks with
        seed ``seed + k``. ``"auto"`` members: ``min(5, n_slides)`` with slide-level validation, else 1.
        """
        k = self.n_members(n_members)
        if k == 1:
            return [self.split()]
        uniq = list(pd.unique(self.samples))
        validation = self.validation
        slide_level = validation == "slide" or (validation == "auto" and len(uniq) >= 3)
        if isinstance(validation, str) and slide_level:
            if k > len(uniq):
                raise ValueError(f"`n_members={k}` needs as many slides to hold out; the data has {len(uniq)}.")
            order = np.random.default_rng(self.seed).permutation(len(uniq))
            folds = np.array_split(order, k)
            out = []
            for fold in folds:
                names = [uniq[i] for i in sorted(fold)]
                val = np.isin(self.samples, names)
                out.append((~val, val, f"slides {names}"))
            return out
        if validation in ("auto", "spatial"):
            return [DataSplitter(self.samples, self.coords, validation="spatial", val_fraction=self.val_fraction,
                                 seed=self.seed + i).split() for i in range(k)]
        raise ValueError(
            f"`n_members={k}` rotates the validation data between members; it needs `validation` 'auto', 'slide' "
            f"or 'spatial', not {validation!r} (or pass `n_members=1`)."
        )


# ---------------------------------------------------------------------------------------------- modules
class SpotDataModule(L.LightningDataModule):
    """Loaders over the training and validation spots; subclasses say how a set of rows becomes a dataset.

    Parameters
    ----------
    train_mask, val_mask
        Boolean masks over the spots (from :meth:`DataSplitter.split`).
    batch_size
        Training batch size (capped at the number of training spots; the last incomplete batch is dropped,
        as in the reference, unless that would drop everything).
    seed
        Seed of the shuffling (and of the augmentation, for crops).
    num_workers
        DataLoader workers.
    """

    def __init__(
        self, train_mask: np.ndarray, val_mask: np.ndarray, *, batch_size: int = 128, seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_mask = np.asarray(train_mask, dtype=bool)
        self.val_mask = np.asarray(val_mask, dtype=bool)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def n_train(self) -> int:
        """Number of training spots."""
        return int(self.train_mask.sum())

    @property
    def n_val(self) -> int:
        """Number of validation spots."""
        return int(self.val_mask.sum())

    def dataset(self, index: np.ndarray, *, train: bool) -> Dataset:
        """The dataset of the rows ``index`` (``train``: with training-time augmentation)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the training and validation datasets (once)."""
        if self.train_set is None:
            self.train_set = self.dataset(np.flatnonzero(self.train_mask), train=True)
            self.val_set = self.dataset(np.flatnonzero(self.val_mask), train=False) if self.val_mask.any() else None

    def _loader_batch(self) -> int:
        n = self.n_train
        if n < 2:
            raise ValueError(f"Only {n} training spots: the contrastive loss needs batches of at least 2.")
        return min(self.batch_size, n)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded generator)."""
        self.setup()
        bs = self._loader_batch()
        return DataLoader(
            self.train_set, batch_size=bs, shuffle=True, drop_last=self.n_train > bs,
            generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | None:
        """Validation batches in order, or ``None`` without validation spots."""
        self.setup()
        if self.val_set is None or len(self.val_set) == 0:
            return None
        return DataLoader(
            self.val_set, batch_size=max(self._loader_batch(), 2), shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        """Tell the training set which epoch starts (new augmentation draws for crops; no-op for features)."""
        if self.train_set is not None and hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)


class FeatureDataModule(SpotDataModule):
    """Frozen-mode input: rows of a :class:`~hyperst.data.FeatureData` (backbone features and targets).

    Parameters
    ----------
    data
        Features and targets of every spot.
    train_mask, val_mask, batch_size, seed, num_workers
        See :class:`SpotDataModule`.
    """

    def __init__(self, data: FeatureData, train_mask: np.ndarray, val_mask: np.ndarray, **kwargs: Any) -> None:
        super().__init__(train_mask, val_mask, **kwargs)
        self.data = data

    def dataset(self, index: np.ndarray, *, train: bool) -> Dataset:
        """Feature rows ``index`` as tensors (training rows draw among the augmented views, if any)."""
        return FeatureDataset(self.data, index, views=train, seed=self.seed)


class CropDataModule(SpotDataModule):
    """LoRA-mode input: uint8 spot (and niche) crops, normalised on the fly, dihedral-augmented in training.

    Parameters
    ----------
    spot, niche
        ``(n, s, s, 3)`` uint8 crops: arrays, memory-mapped arrays or a :class:`~hyperst.data.StackedCrops`
        (read from disk item by item); ``niche`` may be ``None``.
    targets
        ``{"targets": (n, G), "niche_targets": (n, G)}`` (niche targets optional).
    mean, std
        Input normalisation of the backbone (0–1 scale).
    augment
        Random dihedral transform of the training crops (one per spot and epoch, the same for spot and niche).
    train_mask, val_mask, batch_size, seed, num_workers
        See :class:`SpotDataModule`.
    """

    def __init__(
        self,
        spot: np.ndarray,
        niche: np.ndarray | None,
        targets: Mapping[str, np.ndarray],
        train_mask: np.ndarray,
        val_mask: np.ndarray,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_mask, val_mask, **kwargs)
        self.spot, self.niche, self.targets = spot, niche, dict(targets)
        self.mean, self.std, self.augment = tuple(mean), tuple(std), bool(augment)

    def dataset(self, index: np.ndarray, *, train: bool) -> Dataset:
        """Crop rows ``index`` (augmented when ``train`` and ``augment``)."""
        from hyperst.data._crops import SpotCropDataset

        return SpotCropDataset(
            self.spot, self.niche, targets=self.targets, indices=index, mean=self.mean, std=self.std,
            augment=self.augment and train, seed=self.seed,
        )
