"""Training with Lightning: the training plan, data splits and the loop (frozen-feature mode)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hyperst._logging import logger

__all__ = ["FeatureData", "TrainingPlan", "spatial_block_split", "train"]


# ---------------------------------------------------------------------------------------------- data
@dataclass
class FeatureData:
    """Everything the frozen-mode loop needs, as aligned arrays over spots.

    Attributes
    ----------
    spot, niche
        Backbone features ``(n, D)`` of the spot and niche crops (``niche`` may be ``None`` for
        single-level models).
    targets
        Spot expression ``(n, G)`` on the training scale (log2(1 + counts)).
    niche_targets
        Niche expression ``(n, G)`` or ``None``.
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


class _TensorDataset(Dataset):
    """Rows of :class:`FeatureData` as dicts of float32 tensors (picklable)."""

    def __init__(self, data: FeatureData, index: np.ndarray) -> None:
        def take(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a[index], dtype=np.float32))

        self.tensors = {
            k: v
            for k, v in {
                "spot": take(data.spot),
                "niche": take(data.niche),
                "targets": take(data.targets),
                "niche_targets": take(data.niche_targets),
            }.items()
            if v is not None
        }
        self.n = len(index)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


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
        keep = dist > buffer
        idx = np.flatnonzero(train)
        train[idx[~keep]] = False
    if not train.any() or not val.any():
        raise ValueError(
            "The spatial split left an empty side: too few spots for blocks of this size. "
            "Lower `block_size`, or pass `validation=None`."
        )
    return train, val


# ---------------------------------------------------------------------------------------------- plan
class TrainingPlan(L.LightningModule):
    """Lightning module around a :class:`~hyperst.nn.HyperSTNetwork` (or :class:`~hyperst.nn.ImageHyperST`).

    Logs every loss component per epoch (``train/<name>``, ``val/<name>``) and optimises with AdamW,
    weight decay on the weights only.

    Parameters
    ----------
    module
        The network; its ``forward(spot, niche, gene_spot, gene_niche)`` and ``loss(output, target)``
        are used.
    lr
        Learning rate.
    weight_decay
        AdamW weight decay (not applied to the learnable scalars).
    """

    def __init__(self, module: nn.Module, *, lr: float = 1e-4, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.module = module
        self.lr = lr
        self.weight_decay = weight_decay

    def _step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self.module(batch["spot"], batch.get("niche"), batch.get("targets"), batch.get("niche_targets"))
        losses = self.module.loss(out, batch["targets"])
        n = batch["spot"].shape[0]
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True,
                prog_bar=name == "loss",
            )
        return losses["loss"]

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step on a batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss components on a validation batch."""
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the network's parameter groups."""
        network = getattr(self.module, "network", self.module)
        groups = network.parameter_groups(self.weight_decay)
        if network is not self.module:  # backbone parameters (e.g. LoRA adapters) are decayed too
            extra = [p for n, p in self.module.named_parameters() if not n.startswith("network.") and p.requires_grad]
            if extra:
                groups.append({"params": extra, "weight_decay": self.weight_decay})
        return torch.optim.AdamW(groups, lr=self.lr)


class _History(L.Callback):
    """Collects the epoch-level metrics into a list of dicts (rank 0's view)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        self.history.append({"epoch": int(trainer.current_epoch), **metrics})


class _EpochSetter(L.Callback):
    """Tell a dataset which epoch starts, so its random augmentation differs between epochs."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.dataset.set_epoch(int(trainer.current_epoch))


class _BestWeights(L.Callback):
    """Keeps the weights of the best validation epoch in memory and restores them at the end.

    (The reference evaluates the last epoch's weights instead of the best checkpoint: METHOD §5.)
    """

    def __init__(self, monitor: str = "val/loss") -> None:
        self.monitor = monitor
        self.best = math.inf
        self.best_epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if value < self.best:
            self.best = value
            self.best_epoch = int(trainer.current_epoch)
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.module.state_dict().items()}

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.state is not None:
            pl_module.module.load_state_dict(self.state)


def _precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def train(
    module: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    *,
    max_epochs: int = 200,
    batch_size: int = 128,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    patience: int = 10,
    gradient_clip_val: float | None = 1.0,
    seed: int = 42,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | Any = "auto",
    num_nodes: int = 1,
    precision: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``module`` with Lightning; returns the history and the best epoch.

    Early stopping and best-weight restoring use the validation loss when ``val_set`` is given;
    without it the model trains for ``max_epochs``. Any Lightning ``Trainer`` option can be passed in
    ``trainer_kwargs``. For several GPUs or nodes use ``strategy="ddp"`` (run from a script): the
    launching process is rank 0 and keeps the history and best weights; with spawn-based strategies
    the callbacks' state stays in the child processes.

    Returns
    -------
    ``{"history": [...], "best_epoch": int | None, "best_val_loss": float | None, "epochs": int}``.
    """
    from lightning.pytorch.callbacks import EarlyStopping

    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    n_train = len(train_set)
    if n_train < 2:
        raise ValueError(f"Only {n_train} training spots: the contrastive loss needs batches of at least 2.")
    bs = min(batch_size, n_train)
    # drop_last (as the reference) unless that would drop everything or leave single-spot batches
    drop_last = n_train > bs
    L.seed_everything(seed, workers=True, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train_set, batch_size=bs, shuffle=True, drop_last=drop_last, generator=generator,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )
    val_loader = None
    if val_set is not None and len(val_set) > 0:
        val_loader = DataLoader(val_set, batch_size=max(bs, 2), shuffle=False, num_workers=num_workers,
                                persistent_workers=num_workers > 0)
    history = _History()
    callbacks: list[Any] = [history]
    if hasattr(train_set, "set_epoch"):  # per-epoch augmentation draws (SpotCropDataset)
        callbacks.append(_EpochSetter(train_set))
    best = None
    if val_loader is not None:
        best = _BestWeights()
        callbacks += [best, EarlyStopping(monitor="val/loss", patience=patience, mode="min")]
    kwargs: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "num_nodes": num_nodes,
        "precision": _precision(precision, accelerator),
        "max_epochs": max_epochs,
        "callbacks": callbacks,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": progress,
        "num_sanity_val_steps": 0,
        "gradient_clip_val": gradient_clip_val,
        "deterministic": True,
        "log_every_n_steps": 1,
    }
    extra = dict(trainer_kwargs or {})
    callbacks += list(extra.pop("callbacks", []))  # the caller's callbacks come on top of ours
    kwargs.update(extra)
    pl_logger = logging.getLogger("lightning.pytorch")
    level = pl_logger.level
    if not progress:  # quiet runs: no "GPU available: ..." banners either
        pl_logger.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(**kwargs)
        plan = TrainingPlan(module, lr=lr, weight_decay=weight_decay)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*The number of training batches.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
            trainer.fit(plan, train_dataloaders=train_loader, val_dataloaders=val_loader)
    finally:
        pl_logger.setLevel(level)
    result = {
        "history": history.history,
        "best_epoch": None if best is None else best.best_epoch,
        "best_val_loss": None if best is None or not math.isfinite(best.best) else best.best,
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "world_size": int(trainer.world_size),
    }
    if best is not None and best.best_epoch is not None:
        logger.info(f"best validation loss {best.best:.4f} at epoch {best.best_epoch}")
    return result
