"""Training with Lightning: the training plan (steps and optimiser), its callbacks and the runner.

The plan wraps the nn module and does not own it (scvi-tools' ``TrainingPlan``); the runner
:func:`run_training` fits a plan on a :class:`hyperst.data.SpotDataModule` and returns the history.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn

from hyperst._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    from hyperst.data import SpotDataModule
    from hyperst.tl._options import TrainerOptions, TrainOptions

__all__ = ["TrainingPlan", "run_training"]


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
    """Tell the data module which epoch starts, so its random augmentation differs between epochs."""

    def __init__(self, datamodule: Any) -> None:
        self.datamodule = datamodule

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.datamodule.set_epoch(int(trainer.current_epoch))


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


def run_training(
    module: nn.Module, datamodule: SpotDataModule, options: TrainOptions, hardware: TrainerOptions
) -> dict[str, Any]:
    """Fit ``module`` on ``datamodule`` with Lightning; returns the history and the best epoch.

    Early stopping and best-weight restoring use the validation loss when the data module has validation
    spots; without them the model trains for ``options.max_epochs``. For several GPUs or nodes use
    ``strategy="ddp"`` (run from a script): the launching process is rank 0 and keeps the history and best
    weights; with spawn-based strategies the callbacks' state stays in the child processes.

    Returns
    -------
    ``{"history": [...], "best_epoch", "best_val_loss", "epochs", "global_step", "world_size"}``.
    """
    from lightning.pytorch.callbacks import EarlyStopping

    from hyperst._utils import resolve_device

    accelerator = "gpu" if resolve_device(hardware.device).type == "cuda" else "cpu"
    L.seed_everything(options.seed, workers=True, verbose=False)
    train_loader = datamodule.train_dataloader()
    val_loader = datamodule.val_dataloader()
    history = _History()
    callbacks: list[Any] = [history, _EpochSetter(datamodule)]
    best = None
    if val_loader is not None:
        best = _BestWeights()
        callbacks += [best, EarlyStopping(monitor="val/loss", patience=options.patience, mode="min")]
    kwargs: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": hardware.devices,
        # a Strategy object keeps the accelerator of the Trainer it served: each run (ensemble member) gets a
        # pristine copy of the caller's
        "strategy": hardware.strategy if isinstance(hardware.strategy, str) else copy.deepcopy(hardware.strategy),
        "num_nodes": hardware.num_nodes,
        "precision": _precision(hardware.precision, accelerator),
        "max_epochs": options.max_epochs,
        "callbacks": callbacks,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": options.progress,
        "num_sanity_val_steps": 0,
        "gradient_clip_val": options.gradient_clip_val,
        "deterministic": True,
        "log_every_n_steps": 1,
    }
    extra = dict(hardware.trainer_kwargs or {})
    callbacks += list(extra.pop("callbacks", []))  # the caller's callbacks come on top of ours
    kwargs.update(extra)
    pl_logger = logging.getLogger("lightning.pytorch")
    level = pl_logger.level
    if not options.progress:  # quiet runs: no "GPU available: ..." banners either
        pl_logger.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(**kwargs)
        plan = TrainingPlan(module, lr=options.lr, weight_decay=options.weight_decay)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*The number of training batches.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
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
