"""Training checkpoint folders: resume a killed or interrupted :func:`hyperst.tl.fit` where it stopped.

Layout of ``checkpoint_dir``::

    run.json                 what the run trains (settings and a hash of the data); a resume must match it
    member_0/last.ckpt       Lightning's training state after the last complete epoch (hyperst.tl._train)
    member_0/final.pt        the member's final weights (state dict) once it has finished ...
    member_0/final.json      ... and its training record (epochs, best epoch, history)
    member_1/...

Everything is read with ``torch.load(weights_only=True)`` or as JSON: a checkpoint folder never runs code.
Files are written to a temporary name and renamed, so a kill leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hyperst._logging import logger
from hyperst._utils import jsonable
from hyperst._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from hyperst.tl._model import HyperST
    from hyperst.tl._options import TrainOptions
    from hyperst.tl._setup import TrainingData

__all__ = ["RUN_FILE", "CheckpointDir", "checkpoint_dir", "data_digest"]

RUN_FILE = "run.json"
_FORMAT = 1


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def data_digest(*arrays: np.ndarray | None) -> str:
    """SHA-256 over the shapes and bytes of the training arrays (memory maps are hashed by shape only)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        h.update(repr((tuple(a.shape), str(a.dtype))).encode())
        if not isinstance(a, np.memmap) and a.nbytes <= 2**31:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class CheckpointDir:
    """One training run's checkpoint folder.

    Parameters
    ----------
    path
        The folder (created when missing).
    settings
        What the run trains with (options, genes, configuration, number of members): JSON-compatible.
    data
        :func:`data_digest` of the training arrays.

    Raises
    ------
    ValueError
        When the folder holds another run (other settings or data), naming what differs, or a damaged
        ``run.json``.
    """

    def __init__(self, path: str | Path, *, settings: Mapping[str, Any], data: str) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"`checkpoint_dir={str(path)!r}` is a file; pass a folder (it is created when missing).")
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"format": _FORMAT, "hyperst_version": __version__, "settings": jsonable(dict(settings)),
                  "data_sha256": data}
        run = self.path / RUN_FILE
        if run.is_file():
            self._check(run, record)
        else:
            _atomic_write(run, lambda p: p.write_text(json.dumps(record, indent=1)))

    def _check(self, run: Path, record: Mapping[str, Any]) -> None:
        try:
            have = json.loads(run.read_text())
            settings = dict(have["settings"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"`checkpoint_dir`: {str(run)!r} is damaged ({err}); delete the folder to start "
                             "again, or pass another `checkpoint_dir`.") from None
        want = record["settings"]
        differ = sorted(k for k in set(want) | set(settings) if want.get(k) != settings.get(k))
        if differ:
            shown = ", ".join(f"{k}: {settings.get(k)!r} there, {want.get(k)!r} now" for k in differ[:4])
            raise ValueError(f"`checkpoint_dir={str(self.path)!r}` holds a run with other settings ({shown}); "
                             "resume with the same settings, or pass an empty folder.")
        if have.get("data_sha256") != record["data_sha256"]:
            raise ValueError(f"`checkpoint_dir={str(self.path)!r}` holds a run on other training data (other "
                             "spots, genes or values); resume with the same data, or pass an empty folder.")
        logger.info(f"resuming the training run in {str(self.path)!r}")

    def member(self, k: int) -> Path:
        """Folder of member ``k``'s Lightning checkpoint (``last.ckpt``)."""
        return self.path / f"member_{k}"

    def finished(self, k: int, module: nn.Module) -> dict[str, Any] | None:
        """Load member ``k``'s final weights into ``module`` and return its record, or ``None`` if unfinished."""
        weights, info = self.member(k) / "final.pt", self.member(k) / "final.json"
        if not (weights.is_file() and info.is_file()):
            return None
        try:
            record = json.loads(info.read_text())
            state = torch.load(weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as err:  # any failure means the same to the user
            raise ValueError(f"`checkpoint_dir`: member {k}'s final weights in {str(self.member(k))!r} cannot be "
                             f"loaded ({type(err).__name__}: {err}); delete that folder to train the member "
                             "again.") from None
        logger.info(f"member {k + 1}: finished in an earlier run, loaded from the checkpoint folder")
        return dict(record)

    def finish(self, k: int, module: nn.Module, record: Mapping[str, Any]) -> None:
        """Store member ``k``'s final weights and record (after its training ended normally)."""
        folder = self.member(k)
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().cpu() for name, t in module.state_dict().items()}
        _atomic_write(folder / "final.pt", lambda p: torch.save(state, p))
        _atomic_write(folder / "final.json", lambda p: p.write_text(json.dumps(jsonable(dict(record)))))


def checkpoint_dir(model: HyperST, reg: TrainingData, options: TrainOptions) -> CheckpointDir:
    """The checkpoint folder of ``options.checkpoint_dir`` for training ``model`` on ``reg``.

    A resume must match the optimisation settings (not ``progress``/``num_workers``), the mode, members,
    genes, configuration, image provenance and split, and the training arrays (frozen features or the
    crops' shape, targets and samples).
    """
    from dataclasses import asdict

    train = {k: v for k, v in asdict(options).items() if k not in ("progress", "num_workers", "checkpoint_dir")}
    opts = model.data_options
    settings = {
        **train, "mode": reg.mode, "n_members": model.n_members, "genes": list(model.genes),
        "config": model.config.to_dict(), "backbone": model.backbone, "crop_geometry": model.crop_geometry,
        "validation": _validation_record(opts.validation), "val_fraction": opts.val_fraction,
    }
    frozen = reg.mode == "frozen"
    data = data_digest(reg.spot if frozen else np.asarray(reg.spot.shape), reg.niche if frozen else None,
                       reg.targets, reg.niche_targets, reg.samples.astype(str), reg.spot_views, reg.niche_views)
    assert options.checkpoint_dir is not None
    return CheckpointDir(options.checkpoint_dir, settings=settings, data=data)


def _validation_record(validation: Any) -> Any:
    """``DataOptions.validation`` as JSON: names as they are, a mask as the SHA-256 of its bytes."""
    if validation is None or isinstance(validation, str):
        return validation
    arr = np.asarray(validation)
    if arr.dtype == bool:
        return "mask:" + hashlib.sha256(np.packbits(arr).tobytes()).hexdigest()
    return sorted(map(str, arr.ravel().tolist()))
