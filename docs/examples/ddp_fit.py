"""Data-parallel HyperST training with Lightning DDP: two CPU processes talking over gloo.

``hst.tl.fit`` hands ``devices``, ``strategy`` and ``num_nodes`` to the Lightning ``Trainer``. With
``strategy="ddp"`` Lightning *re-launches this script* once per extra process (with ``LOCAL_RANK=1``, ...),
so DDP training must run from a script (not a notebook or pytest) and every process must build the same
data: here a small deterministic synthetic data set, in practice the same ``read_*`` + ``image_features``
calls (or a saved ``.h5ad``/``.zarr`` read by every rank). Each process trains on its share of every
epoch's batches (Lightning inserts a ``DistributedSampler``) and the gradients are averaged, so all ranks
end with the same weights. On GPUs use ``device="cuda", devices=4, strategy="ddp"`` (NCCL); on CPU the
process-group backend is gloo.

After ``fit`` returns, every rank continues with the rest of the script: only rank 0 should save the model
or write results (``torch.distributed.get_rank() == 0``).

Usage::

    python docs/examples/ddp_fit.py OUT_DIR [--devices 2] [--epochs 3]

Writes ``OUT_DIR/rank{r}.json`` (one per process: rank, world size, backend, pid, a checksum of the
trained weights), and on rank 0 ``OUT_DIR/result.json`` (world size, every rank's record, history,
training record), the model in ``OUT_DIR/model`` and ``OUT_DIR/heldout.npz`` (features of a held-out slide
and the model's prediction for them).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import hyperst as hst
from hyperst._constants import Key

N_GENES, DIM = 16, 32


def synthetic_slide(name: str, *, n_side: int = 10, seed: int = 0) -> ad.AnnData:
    """A square grid of spots whose latent tissue state drives both the image features and the counts.

    Deterministic given ``seed`` (every DDP process builds the same data).
    """
    w = np.random.default_rng(0).normal(size=(3, N_GENES)) * 0.8  # gene programs, shared by the slides
    proj = np.random.default_rng(99).normal(size=(3, DIM))  # the "image backbone"
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    xy = np.column_stack([cols.ravel() * 100.0, rows.ravel() * 100.0])
    state = np.column_stack([np.sin(xy[:, 0] / 300 + seed), np.cos(xy[:, 1] / 250 - seed), rng.normal(size=len(xy))])
    counts = rng.poisson(np.exp(state @ w + 1.0)).astype(np.float32)
    spot = state @ proj + 0.1 * rng.normal(size=(len(xy), DIM))
    obs = pd.DataFrame(
        {"sample": name, "array_row": rows.ravel(), "array_col": cols.ravel()},
        index=[f"{name}_{i}" for i in range(len(xy))],
    )
    a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))
    a.obsm[Key.OBSM_SPATIAL] = xy
    a.obsm[Key.OBSM_FEATURES_SPOT] = spot.astype(np.float32)
    a.obsm[Key.OBSM_FEATURES_NICHE] = (spot + 0.2 * rng.normal(size=spot.shape)).astype(np.float32)
    return a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--devices", type=int, default=2, help="number of processes")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    slides = [synthetic_slide(f"s{i}", seed=i) for i in range(4)]
    train, heldout = slides[:3], slides[3]

    # gloo is Lightning's default on CPU; naming it (and a timeout, so that a lost process fails the run
    # instead of hanging it) keeps the example explicit
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120))
    model = hst.tl.fit(
        train,
        genes=[f"G{i}" for i in range(N_GENES)],
        config={"emb_dim": 32, "dropout": 0.0},
        device="cpu",  # -> Lightning accelerator "cpu"
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        batch_size=32,
        lr=2e-3,
        seed=0,
        progress=False,
    )

    # every process gets here; the process group Lightning opened stays up until exit
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    record = {
        "rank": rank,
        "world_size": world_size,
        "backend": dist.get_backend() if distributed else None,
        "local_rank_env": os.environ.get("LOCAL_RANK"),
        "pid": os.getpid(),
        # DDP averages gradients, so every rank must hold the same weights
        "weights_checksum": float(sum(p.detach().double().sum() for p in model.network.parameters())),
        "epochs": model.training["epochs"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(record) + "\n")
    records = [record]
    if distributed:
        records = [None] * world_size
        dist.all_gather_object(records, record)  # also a barrier: every rank has written its marker
    if rank != 0:
        return

    model.save(args.out / "model", overwrite=True)
    spot = heldout.obsm[Key.OBSM_FEATURES_SPOT]
    niche = heldout.obsm[Key.OBSM_FEATURES_NICHE]
    pred, _ = model.predict_features(spot, niche)
    np.savez(args.out / "heldout.npz", spot=spot, niche=niche, prediction=pred)
    evaluation = hst.tl.evaluate(heldout, pred, genes=model.genes, groups=None, ks=(5,))
    last = model.history[-1] if model.history else {}
    result = {
        "world_size": world_size,
        "ranks": records,
        "history_length": len(model.history),
        "final_losses": {k: v for k, v in last.items() if k.endswith("/loss")},
        "training": model.training,
        "heldout_pcc@5": evaluation["pooled", "PCC@5"],
        "torch_threads": torch.get_num_threads(),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"trained on {world_size} processes; held-out PCC@5 = {result['heldout_pcc@5']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
