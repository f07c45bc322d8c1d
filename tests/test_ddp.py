"""Lightning DDP with two CPU processes (gloo) through hst.tl.fit, via docs/examples/ddp_fit.py.

``strategy="ddp"`` re-launches the running *script* for the extra ranks, so the training runs in a
subprocess (the example script), never inside pytest.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hyperst as hst

SCRIPT = Path(__file__).parents[1] / "docs" / "examples" / "ddp_fit.py"
TIMEOUT_S = 240


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - pid reused by another user's process
        return False
    return True


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path, ddp_ranks) -> None:
    pytest.importorskip("lightning")
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), str(out), "--devices", "2", "--epochs", "3"]
    with ddp_ranks(cmd, timeout=TIMEOUT_S, what="DDP run") as (proc, _):
        markers = sorted(out.glob("rank*.json"))
        ranks = [json.loads(m.read_text()) for m in markers]
        # give the rank-1 process a moment to exit by itself
        deadline = time.monotonic() + 30
        while any(_alive(r["pid"]) for r in ranks if r["pid"] != proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)

    # two processes took part, in one gloo process group of size 2
    assert [m.name for m in markers] == ["rank0.json", "rank1.json"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["local_rank_env"] for r in ranks] == ["0", "1"]
    assert all(r["world_size"] == 2 for r in ranks)
    assert all(r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["pid"] == proc.pid != ranks[1]["pid"]
    # gradients were averaged: both ranks end with the same weights
    assert ranks[0]["weights_checksum"] == pytest.approx(ranks[1]["weights_checksum"], rel=1e-6, abs=1e-6)
    assert all(r["epochs"] == 3 for r in ranks)

    # training finished on rank 0 with a full history
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["ranks"] == ranks
    assert result["history_length"] == 3
    assert result["final_losses"]
    assert all(math.isfinite(v) for v in result["final_losses"].values())
    assert result["training"]["validation_samples"] == ["s2"]

    # the saved model loads and reproduces rank 0's prediction, with finite values
    model = hst.tl.HyperST.load(out / "model")
    saved = np.load(out / "heldout.npz")
    pred, _ = model.predict_features(saved["spot"], saved["niche"])
    assert pred.shape == (100, 16)
    assert np.isfinite(pred).all()
    np.testing.assert_allclose(pred, saved["prediction"], rtol=1e-5, atol=1e-6)
    assert len(model.history) == 3
