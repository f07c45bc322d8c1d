"""Training with Lightning: the training plan (steps and optimiser), its callbacks and the runner.

The plan wraps the nn module and does not own it (scvi-tools' ``TrainingPlan``); the runner
:func:`run_training` fits a plan on a :class:`hyperst.data.SpotDataModule` and returns the history.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from torch import nn

from hyperst._logging import Verbosity, logger, settings

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
    """Collects the epoch-level metrics into a list of dicts (rank 0's view); part of a checkpoint."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        self.history.append({"epoch": int(trainer.current_epoch), **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict["history"]]


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
        self.restore(pl_module.module)

    def restore(self, module: nn.Module) -> None:
        """Load the best weights into ``module`` (no-op before the first validation)."""
        if self.state is not None:
            module.load_state_dict(self.state)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.state = state_dict["best"], state_dict["best_epoch"], state_dict["state"]


class _Interrupted(Exception):
    """Raised between two batches after SIGINT/SIGTERM: training stops, the best weights are kept."""


class _RunState(L.Callback):
    """What a bit-identical resume needs besides Lightning's own state, and the interrupt flag.

    The checkpoint keeps the random states (torch's and the training loader's generator) as they
    are at the end of an epoch, and whether training was about to stop (early stopping); resuming restores
    them at the start of the next epoch. A signal sets :attr:`interrupted`; training stops after the batch.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.interrupted = False
        self.signal: str | None = None
        self._pending: dict[str, Any] | None = None
        self._trainer: Any = None

    # -- interrupts
    def interrupt(self, signum: int) -> None:
        self.interrupted = True
        self.signal = signal.Signals(signum).name

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.interrupted:
            raise _Interrupted(self.signal)

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),  # dropout; NumPy and Python draws go through seeded generators
            "loader": None if self.generator is None else self.generator.get_state(),
            "stopping": bool(self._trainer is not None and self._trainer.should_stop),  # early stopping fired
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer = trainer
        if self._pending is not None and self._pending.get("stopping"):
            trainer.should_stop = True  # the run had already stopped early when it was saved

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if self.generator is not None and state["loader"] is not None:
            self.generator.set_state(state["loader"])
            # Lightning made this epoch's loader iterator before the restore; an uninterrupted run makes it now,
            # and a DataLoader iterator draws its base seed from the generator first
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)


class _EpochCheckpoint(Checkpoint):
    """Writes ``last.ckpt`` (Lightning's full training state) at the end of every epoch, atomically.

    An interrupted epoch is not saved: the file always holds a whole epoch, from which a resumed run continues
    as the uninterrupted one would.
    """

    def __init__(self, directory: Path, run_state: _RunState) -> None:
        self.directory = directory
        self.run_state = run_state

    @property
    def path(self) -> Path:
        return self.directory / LAST_CHECKPOINT

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run_state.interrupted:
            return
        tmp = self.directory / f".{LAST_CHECKPOINT}.tmp"
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


LAST_CHECKPOINT = "last.ckpt"


@contextlib.contextmanager
def _signals_stop(run_state: _RunState) -> Iterator[None]:
    """SIGINT/SIGTERM during training set the interrupt flag; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if run_state.interrupted and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning(f"{signal.Signals(signum).name} received: training stops after this batch and keeps the "
                       "best weights so far (press Ctrl-C again to abort)")
        run_state.interrupt(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def run_training(
    module: nn.Module, datamodule: SpotDataModule, options: TrainOptions, hardware: TrainerOptions,
    *, checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fit ``module`` on ``datamodule`` with Lightning; returns the history and the best epoch.

    Early stopping and best-weight restoring use the validation loss when the data module has validation
    spots; without them the model trains for ``options.max_epochs``. For several GPUs or nodes use
    ``strategy="ddp"`` (run from a script): the launching process is rank 0 and keeps the history and best
    weights; with spawn-based strategies the callbacks' state stays in the child processes.

    With ``checkpoint_dir``, the whole training state is written to ``checkpoint_dir/last.ckpt`` after every
    epoch and a run resumes from it (Lightning's ``ckpt_path``, loaded with ``weights_only=True``): a killed
    run continues to the weights the uninterrupted run reaches (CPU, same seed). SIGINT (Ctrl-C) or SIGTERM
    stops training after the current batch and keeps the best weights so far (``"interrupted": True``).

    Returns
    -------
    ``{"history": [...], "best_epoch", "best_val_loss", "epochs", "global_step", "world_size", "interrupted",
    "signal", "resumed_epoch"}`` (``resumed_epoch``: epochs already done when the run resumed, else ``None``).
    """
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from hyperst._utils import resolve_device

    accelerator = "gpu" if resolve_device(hardware.device).type == "cuda" else "cpu"
    L.seed_everything(options.seed, workers=True, verbose=False)
    train_loader = datamodule.train_dataloader()
    val_loader = datamodule.val_dataloader()
    history = _History()
    run_state = _RunState(getattr(train_loader, "generator", None))
    callbacks: list[Any] = [history, _EpochSetter(datamodule), run_state]
    resume: Path | None = None
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir)
        directory.mkdir(parents=True, exist_ok=True)
        callbacks.append(_EpochCheckpoint(directory, run_state))
        if (directory / LAST_CHECKPOINT).is_file():
            resume = directory / LAST_CHECKPOINT
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
        "enable_checkpointing": resume is not None or checkpoint_dir is not None,  # only ours (_EpochCheckpoint)
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
    if settings.verbosity < Verbosity.info:  # Lightning's "GPU available: ..." banners and tips only when asked
        pl_logger.setLevel(logging.WARNING)
    resumed_epoch = None
    try:
        trainer = L.Trainer(**kwargs)
        plan = TrainingPlan(module, lr=options.lr, weight_decay=options.weight_decay)
        with warnings.catch_warnings(), _signals_stop(run_state):
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*The number of training batches.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            if resume is not None:
                resumed_epoch = _checkpoint_epochs(resume)
                logger.info(f"resuming from {str(resume)!r} after {resumed_epoch} epoch(s)")
            try:
                trainer.fit(plan, train_dataloaders=train_loader, val_dataloaders=val_loader,
                            ckpt_path=None if resume is None else str(resume), weights_only=True)
            except (_Interrupted, SIGTERMException):
                run_state.interrupted = True
                run_state.signal = run_state.signal or "SIGTERM"
                if best is not None:
                    best.restore(module)
    finally:
        pl_logger.setLevel(level)
    result = {
        "history": history.history,
        "best_epoch": None if best is None else best.best_epoch,
        "best_val_loss": None if best is None or not math.isfinite(best.best) else best.best,
        "epochs": len(history.history) if run_state.interrupted else int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "world_size": int(trainer.world_size),
        "interrupted": run_state.interrupted,
        "signal": run_state.signal,
        "resumed_epoch": resumed_epoch,
    }
    if run_state.interrupted:
        kept = "no validation yet: the weights are the last batch's" if result["best_epoch"] is None else (
            f"keeping the best weights (epoch {result['best_epoch']})")
        logger.warning(f"training interrupted ({run_state.signal}) after {result['epochs']} complete epoch(s); {kept}")
    elif best is not None and best.best_epoch is not None:
        logger.info(f"best validation loss {best.best:.4f} at epoch {best.best_epoch}")
    return result


def _checkpoint_epochs(path: Path) -> int:
    """Completed epochs of a ``last.ckpt``, with an error naming the file when it cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["epoch"]) + 1
    except Exception as err:  # any failure means the same thing to the user
        raise ValueError(f"The training checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}); "
                         "delete it to start this run again, or pass another `checkpoint_dir`.") from None
