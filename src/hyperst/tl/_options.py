"""Typed option groups of training: what to optimise, on which hardware, from which data and images.

:func:`hyperst.tl.fit` keeps its flat keywords (scanpy style); :class:`hyperst.tl.HyperST` takes these
groups, so each concern is spelled and validated once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hyperst._constants import DEFAULT_BACKBONE, Key

__all__ = ["DataOptions", "ImageOptions", "TrainOptions", "TrainerOptions"]


def _positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer ≥ {minimum}, got {value!r}.")


def _positive_float(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}.")


@dataclass(frozen=True)
class TrainOptions:
    """What the optimiser does (METHOD §5; reference values for a GPU: 200, 128, 1e-4, 0.01, 10).

    Parameters
    ----------
    max_epochs
        Upper bound on epochs; early stopping on the validation loss ends training sooner.
    batch_size
        Spots per batch (capped at the number of training spots).
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay (not on the learnable scalars).
    patience
        Epochs without a better validation loss before stopping. The best epoch's weights are restored.
    gradient_clip_val
        Gradient norm clipping (``None``: off).
    seed
        Seed of the initialisation, split, batching and augmentation: the same seed gives the same model.
    num_workers
        DataLoader workers.
    progress
        Show progress bars.
    checkpoint_dir
        Folder for resumable training: the training state is saved there after every epoch, and a run with
        the same data and settings resumes from it (finished ensemble members are loaded, not retrained). A
        killed run resumed this way ends with the weights the uninterrupted run would have (CPU, same seed).
        ``None``: no checkpoints. SIGINT (Ctrl-C) or SIGTERM stops training in any case after the current
        batch, keeping the best weights so far (the model is marked as interrupted).
    """

    max_epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.01
    patience: int = 10
    gradient_clip_val: float | None = 1.0
    seed: int = 42
    num_workers: int = 0
    progress: bool = True
    checkpoint_dir: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str | os.PathLike):
            kind = type(self.checkpoint_dir).__name__
            raise TypeError(f"`checkpoint_dir` must be a folder path or None, got {kind}.")
        _positive_int("max_epochs", self.max_epochs)
        _positive_int("batch_size", self.batch_size, minimum=2)
        _positive_float("lr", self.lr)
        _positive_float("weight_decay", self.weight_decay, allow_zero=True)
        _positive_int("patience", self.patience)
        if self.gradient_clip_val is not None:
            _positive_float("gradient_clip_val", self.gradient_clip_val)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")
        _positive_int("num_workers", self.num_workers, minimum=0)


@dataclass(frozen=True)
class TrainerOptions:
    """Where training runs (passed to the Lightning ``Trainer``).

    Parameters
    ----------
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    precision
        Lightning precision; ``"auto"``: bf16 mixed on GPU, fp32 on CPU.
    devices, strategy, num_nodes
        Passed to the ``Trainer`` (e.g. ``devices=4, strategy="ddp"``).
    trainer_kwargs
        Any other ``Trainer`` option (callbacks are added to hyperst's own).
    """

    device: str = "auto"
    precision: str = "auto"
    devices: int | str | Sequence[int] = "auto"
    strategy: str | Any = "auto"
    num_nodes: int = 1
    trainer_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _positive_int("num_nodes", self.num_nodes)
        if isinstance(self.devices, str) and self.devices != "auto" and not self.devices.lstrip("-").isdigit():
            raise ValueError(f"`devices` must be 'auto', a count or a list of device ids, got {self.devices!r}.")


@dataclass(frozen=True)
class DataOptions:
    """Which spots and values of the user's tables a model trains on.

    Parameters
    ----------
    validation
        ``"auto"``: hold out whole slides when there are three or more, else a spatially blocked split
        (whole blocks of spots, with a one-niche buffer dropped from training so no neighbourhood
        straddles the split); ``"slide"``, ``"spatial"``; a list of sample names; a boolean mask; or
        ``None`` (train on everything for ``max_epochs``, no early stopping). See
        :class:`hyperst.data.DataSplitter`.
    val_fraction
        Fraction of slides (or spots) held out for validation.
    sample_key
        ``.obs`` column with sample names.
    table_key
        Table of each SpatialData (when it has several).
    layer
        Layer with raw counts (default ``.X``).
    normalize
        Library-size normalised targets (log2(1 + normalize_total)) instead of log2(1 + raw counts).
    min_tissue
        Train only on spots whose crop is at least this fraction tissue (``.obs["hyperst_tissue_fraction"]``,
        from :func:`hyperst.pp.image_features`; the reference uses 0.15). ``None``: all spots.
    spot_key, niche_key
        ``.obsm`` keys of the spot and niche image features (frozen mode).
    views
        Frozen mode: also train on the augmented views of the spots (``.obsm["hyperst_features_spot_views"]``
        and ``["hyperst_features_niche_views"]``, from ``hst.pp.image_features(..., views=...)``) when every
        training table has them: each epoch shows every training spot as its clean or one of its view features
        (validation spots: clean). ``True``: all views; a list of view names: those; ``False``: clean only.
    n_members
        Ensemble members. ``"auto"``: one per validation fold of slides, ``min(5, n_slides)`` when slides are
        held out (three or more slides), else 1. Each member validates on its own slides (every slide is
        held out by one member), which gives the held-out residuals behind the prediction intervals
        (:meth:`hyperst.data.DataSplitter.member_splits`). ``1`` trains a single model, as ``"auto"`` does in
        LoRA mode (each member would fine-tune its own backbone).
    """

    validation: Any = "auto"
    val_fraction: float = 0.15
    sample_key: str = Key.OBS_SAMPLE
    table_key: str | None = None
    layer: str | None = None
    normalize: bool = False
    min_tissue: float | None = None
    spot_key: str = Key.OBSM_FEATURES_SPOT
    niche_key: str = Key.OBSM_FEATURES_NICHE
    views: bool | Sequence[str] = True
    n_members: int | str = "auto"

    def __post_init__(self) -> None:
        if self.n_members != "auto" and (
            isinstance(self.n_members, bool) or not isinstance(self.n_members, int) or self.n_members < 1
        ):
            raise ValueError(f"`n_members` must be 'auto' or an integer ≥ 1, got {self.n_members!r}.")
        ok = isinstance(self.val_fraction, int | float) and not isinstance(self.val_fraction, bool)
        if not ok or not 0 < self.val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {self.val_fraction!r}.")
        if not isinstance(self.views, bool):
            if isinstance(self.views, str) or not all(isinstance(v, str) for v in self.views):
                raise TypeError(f"`views` must be True, False or a list of view names, got {self.views!r}.")
            object.__setattr__(self, "views", [str(v) for v in self.views])
        if self.min_tissue is not None and not 0 <= self.min_tissue <= 1:
            raise ValueError(f"`min_tissue` must be in [0, 1], got {self.min_tissue}.")


@dataclass(frozen=True)
class ImageOptions:
    """The image side: the backbone, its LoRA adapters and the crops it sees.

    Parameters
    ----------
    backbone, weights, random_init
        Image backbone (see :func:`hyperst.pp.image_features`): used to compute missing features in
        frozen mode, and fine-tuned in LoRA mode.
    lora
        LoRA settings (:class:`hyperst.tl.LoraSpec` or a dict; default r = 8, α = 16, dropout 0.1 on the
        last 11 blocks).
    geometry
        Crop geometry (default from the spot layout, METHOD §1).
    cache_dir
        On-disk crop cache (see :func:`hyperst.pp.crops`).
    augment
        LoRA mode: random dihedral augmentation of the training crops.
    """

    backbone: Any = DEFAULT_BACKBONE
    weights: str | None = None
    random_init: bool = False
    lora: Any = None
    geometry: Any = None
    cache_dir: str | None = None
    augment: bool = True
