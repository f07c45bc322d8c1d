"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from hyperst._constants import Key


def feature_slide(
    name: str, n_side: int, seed: int, w: np.ndarray, *, genes: Sequence[str], dim: int, offset: float = 0.0
) -> ad.AnnData:
    """Square grid of spots (100 µm pitch) whose latent tissue state drives both image features and counts.

    ``w`` (3 × len(genes)) maps the latent state to log expression; the features are a fixed random
    projection of the same state plus noise, so a good model can predict counts from features. ``offset``
    shifts the spot coordinates (µm) away from the origin.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    xy = np.column_stack([cols.ravel() * 100.0 + offset, rows.ravel() * 100.0 + offset])
    state = np.column_stack([np.sin(xy[:, 0] / 300 + seed), np.cos(xy[:, 1] / 250 - seed), rng.normal(size=len(xy))])
    counts = rng.poisson(np.exp(state @ w + 1.0)).astype(np.float32)
    proj = np.random.default_rng(99).normal(size=(3, dim))
    spot = state @ proj + 0.1 * rng.normal(size=(len(xy), dim))
    obs = pd.DataFrame(
        {"sample": name, "array_row": rows.ravel(), "array_col": cols.ravel()},
        index=[f"{name}_{i}" for i in range(len(xy))],
    )
    a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=list(genes)))
    a.obsm["spatial"] = xy
    a.obsm[Key.OBSM_FEATURES_SPOT] = spot.astype(np.float32)
    a.obsm[Key.OBSM_FEATURES_NICHE] = (spot + 0.2 * rng.normal(size=spot.shape)).astype(np.float32)
    return a


def feature_sdata(n_samples: int, dim: int, *, seed: int = 0) -> Any:
    """:func:`hyperst.datasets.synthetic` (6 × 6 spots, 12 genes) with tissue-driven features in its table.

    The features are a random embedding of each spot's tissue type plus noise (spot = niche features), so
    they predict the tissue programs without running an image backbone.
    """
    import hyperst as hst

    sdata = hst.datasets.synthetic(n_samples=n_samples, n_rows=6, n_cols=6, n_genes=12, seed=seed)
    t = sdata.tables["table"]
    rng = np.random.default_rng(seed)
    onehot = pd.get_dummies(t.obs[Key.OBS_TISSUE]).to_numpy(np.float32)
    feats = onehot @ rng.normal(size=(onehot.shape[1], dim)) + 0.1 * rng.normal(size=(t.n_obs, dim))
    t.obsm[Key.OBSM_FEATURES_SPOT] = feats.astype(np.float32)
    t.obsm[Key.OBSM_FEATURES_NICHE] = feats.astype(np.float32)
    return sdata


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op torch thread avoids OpenMP oversubscription on shared CPUs (10x faster)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def make_feature_slide() -> Callable[..., ad.AnnData]:
    """:func:`feature_slide`: synthetic slides with image features in ``.obsm`` and Poisson counts."""
    return feature_slide


@pytest.fixture(scope="session")
def make_feature_sdata() -> Callable[..., Any]:
    """:func:`feature_sdata`: a synthetic SpatialData whose table already has image features."""
    return feature_sdata


_RANK_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK",
              "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "SLURM_JOB_ID", "SLURM_NTASKS")


@contextlib.contextmanager
def rank_group(cmd: Sequence[str], *, timeout: float, what: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run a script that launches CPU DDP ranks (gloo) and yield ``(process, output)`` once it has exited.

    The script runs in its own session, so Lightning's extra ranks join its process group and are killed with
    it on exit; the environment has no rank variables of an outer launcher, no GPU and one thread per rank.
    Skips without gloo; fails with the output when the script exits non-zero or runs past ``timeout``.
    """
    import pytest
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a (possibly) two-core machine
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            pytest.fail(f"{what} did not finish in {timeout} s:\n{log[-4000:]}")
        assert proc.returncode == 0, log[-4000:]
        yield proc, log
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of our group only


@pytest.fixture(scope="session")
def ddp_ranks() -> Callable[..., Any]:
    """:func:`rank_group`: run a CPU DDP launch script in its own process group."""
    return rank_group
