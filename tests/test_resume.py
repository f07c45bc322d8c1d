"""Resumable, interruptible training: ``fit(checkpoint_dir=...)``, SIGINT/SIGTERM and a killed process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

import hyperst as hst
from hyperst._constants import Key

GENES = [f"g{i}" for i in range(8)]
TESTS = Path(__file__).resolve().parent
FIT = {"genes": GENES, "max_epochs": 6, "batch_size": 32, "progress": False, "seed": 3, "n_members": 2,
       "config": {"emb_dim": 16}}


def make_slides() -> list:
    sys.path.insert(0, str(TESTS))
    from conftest import feature_slide

    w = np.random.default_rng(0).normal(scale=0.5, size=(3, len(GENES)))
    return [feature_slide(f"s{i}", 8, i, w, genes=GENES, dim=16) for i in range(3)]


@pytest.fixture(scope="module")
def reference(one_thread) -> hst.tl.HyperST:
    """The uninterrupted run every resumed run must reproduce bit for bit."""
    return hst.tl.fit(make_slides(), **FIT)


def assert_same_weights(a: hst.tl.HyperST, b: hst.tl.HyperST) -> None:
    assert a.n_members == b.n_members
    for ma, mb in zip(a.members, b.members, strict=True):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert a.member_histories == b.member_histories


class Signal(L.Callback):
    """Send ``signum`` to this process during batch 1 of ``epoch`` of ensemble member ``member``."""

    def __init__(self, signum: int, *, epoch: int, member: int = 0) -> None:
        self.signum, self.epoch, self.member, self.runs = signum, epoch, member, -1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.runs += 1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.runs == self.member and trainer.current_epoch == self.epoch and batch_idx == 1:
            os.kill(os.getpid(), self.signum)


def test_killed_process_resumes_to_the_uninterrupted_weights(reference, tmp_path: Path, one_thread) -> None:
    ck = tmp_path / "ck"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import lightning as L, torch
        sys.path.insert(0, {str(TESTS)!r})
        torch.set_num_threads(1)
        import hyperst as hst
        from test_resume import FIT, make_slides

        class Kill(L.Callback):  # SIGKILL in member 2's epoch 3: nothing can be cleaned up
            runs = -1
            def on_train_start(self, trainer, pl_module):
                self.runs += 1
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if self.runs == 1 and trainer.current_epoch == 3 and batch_idx == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        hst.tl.fit(make_slides(), **FIT, checkpoint_dir={str(ck)!r}, trainer_kwargs={{"callbacks": [Kill()]}})
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert (ck / "member_0" / "final.pt").is_file()  # member 1 finished, member 2 died in its epoch 3
    assert not (ck / "member_1" / "final.pt").exists()
    saved = torch.load(ck / "member_1" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["epoch"] == 2  # the last complete epoch before the kill

    resumed = hst.tl.fit(make_slides(), **FIT, checkpoint_dir=ck)
    assert_same_weights(reference, resumed)
    assert not resumed.interrupted
    assert resumed.training["members"][1]["epochs"] == reference.training["members"][1]["epochs"]
    one = make_slides()[0]
    x = one.obsm[Key.OBSM_FEATURES_SPOT], one.obsm[Key.OBSM_FEATURES_NICHE]
    np.testing.assert_array_equal(resumed.predict_features(*x)[0], reference.predict_features(*x)[0])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_training_with_the_best_weights_and_resumes(
    reference, tmp_path: Path, signum: int, caplog, one_thread
) -> None:
    slides = make_slides()
    ck = tmp_path / "ck"
    handler = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN when the suite runs in the background
    with caplog.at_level(logging.WARNING, logger="hyperst"):
        model = hst.tl.fit(slides, **FIT, checkpoint_dir=ck,
                           trainer_kwargs={"callbacks": [Signal(signum, epoch=3, member=0)]})
    assert model.interrupted
    assert model.n_members == 1  # member 2 never started
    assert model.training["interruption"] == {"member": 0, "signal": signal.Signals(signum).name, "epochs": 3}
    assert len(model.history) == 3  # three whole epochs; the interrupted one is not recorded
    best = model.training["best_epoch"]
    assert best is not None
    assert best <= 2
    pred, _ = model.predict_features(slides[0].obsm[Key.OBSM_FEATURES_SPOT], slides[0].obsm[Key.OBSM_FEATURES_NICHE])
    assert np.isfinite(pred).all()
    assert slides[0].uns[Key.UNS][Key.UNS_FIT]["params"]["interrupted"]
    assert any("interrupted" in r.getMessage() for r in caplog.records)
    assert any("checkpoint_dir" in r.getMessage() for r in caplog.records)
    assert signal.getsignal(signal.SIGINT) is handler  # handlers are put back

    resumed = hst.tl.fit(make_slides(), **FIT, checkpoint_dir=ck)
    assert_same_weights(reference, resumed)


def test_interrupted_member_keeps_its_best_epoch(tmp_path: Path, one_thread) -> None:
    """The weights after an interrupt are those of the best validation epoch (kept by the checkpoint too)."""
    ck = tmp_path / "ck"
    model = hst.tl.fit(make_slides(), **{**FIT, "n_members": 1}, checkpoint_dir=ck,
                       trainer_kwargs={"callbacks": [Signal(signal.SIGINT, epoch=4)]})
    saved = torch.load(ck / "member_0" / "last.ckpt", weights_only=True, map_location="cpu")
    best = next(v for k, v in saved["callbacks"].items() if "_BestWeights" in k)
    assert best["best_epoch"] == model.training["best_epoch"]
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, best["state"][key]), key


def test_resume_after_early_stopping_trains_no_further(tmp_path: Path, one_thread) -> None:
    """A run killed after early stopping fired, before its final weights were written, stops at once."""
    opts = {**FIT, "n_members": 1, "max_epochs": 40, "patience": 1, "lr": 3e-2}
    first = hst.tl.fit(make_slides(), **opts, checkpoint_dir=tmp_path / "ck")
    assert first.training["epochs"] < 40  # early stopping fired
    for name in ("final.pt", "final.json"):
        (tmp_path / "ck" / "member_0" / name).unlink()
    again = hst.tl.fit(make_slides(), **opts, checkpoint_dir=tmp_path / "ck")
    assert again.training["epochs"] == first.training["epochs"]
    assert_same_weights(first, again)


def test_checkpoint_folder_of_another_run_is_refused(tmp_path: Path, one_thread) -> None:
    ck = tmp_path / "ck"
    opts = {**FIT, "n_members": 1, "max_epochs": 1}
    hst.tl.fit(make_slides(), **opts, checkpoint_dir=ck)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0\.0001 there, 0\.001 now\)"):
        hst.tl.fit(make_slides(), **opts, lr=1e-3, checkpoint_dir=ck)
    other = make_slides()
    other[0].X[0, 0] += 1
    with pytest.raises(ValueError, match="other training data"):
        hst.tl.fit(other, **opts, checkpoint_dir=ck)
    (ck / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run\.json.* is damaged"):
        hst.tl.fit(make_slides(), **opts, checkpoint_dir=ck)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        hst.tl.fit(make_slides(), **opts, checkpoint_dir=tmp_path / "file")
    with pytest.raises(TypeError, match="`checkpoint_dir` must be a folder path"):
        hst.tl.fit(make_slides(), **opts, checkpoint_dir=3)


def test_damaged_training_checkpoint_names_the_file(tmp_path: Path, one_thread) -> None:
    ck = tmp_path / "ck"
    opts = {**FIT, "n_members": 1, "max_epochs": 2}
    hst.tl.fit(make_slides(), **opts, checkpoint_dir=ck)
    (ck / "member_0" / "final.pt").unlink()
    (ck / "member_0" / "last.ckpt").write_bytes(b"\x00" * 64)
    slides = make_slides()
    with pytest.raises(ValueError, match=r"last\.ckpt.* cannot be read.*delete it"):
        hst.tl.fit(slides, **opts, checkpoint_dir=ck)
    assert Key.UNS not in slides[0].uns  # the failed fit left the tables as they were
    (ck / "member_0" / "final.json").write_text(json.dumps({"epochs": 2}))
    (ck / "member_0" / "final.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"member 0's final weights .* cannot be loaded"):
        hst.tl.fit(make_slides(), **opts, checkpoint_dir=ck)
