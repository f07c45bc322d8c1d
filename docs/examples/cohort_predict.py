"""Image features and predictions for a cohort of slides, spread over processes with Lightning DDP.

``hst.pp.image_features_cohort`` and ``hst.tl.predict_cohort`` launch one process per device. With
``strategy="ddp"`` Lightning *re-launches this script* for the extra processes (``LOCAL_RANK=1``, ...), so a
distributed run is a script like this one (not a notebook or pytest); under SLURM (``srun``) or ``torchrun``
the processes come from there instead. Each process takes its share of the slides that are not yet in the
output store, runs the one-process function on each and writes its table as one group of the store; a killed
job resumes where it stopped when the same command runs again.

Usage::

    python docs/examples/cohort_predict.py MODEL_DIR SLIDE.zarr [SLIDE.zarr ...] --out OUT_DIR \\
        [--device cpu|cuda|auto] [--devices 2] [--num-nodes 1]

Writes ``OUT_DIR/features.zarr`` (the image features of every slide, with the model's backbone and crop
geometry), ``OUT_DIR/predictions.zarr`` (the prediction of every slide from those features) and one
``OUT_DIR/rank{r}.json`` per process (rank, world size, process-group backend, pid, the slides it computed).
On GPUs: ``--device cuda --devices 4`` (NCCL); on CPU the process-group backend is gloo.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import hyperst as hst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="folder of a saved HyperST model")
    p.add_argument("slides", type=Path, nargs="+", help="SpatialData zarr stores, one per slide")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--devices", type=int, default=1, help="processes (devices) per node")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64, help="crops per backbone forward pass")
    args = p.parse_args()

    import torch.distributed as dist

    model = hst.tl.HyperST.load(args.model)  # every process loads the model and reads its own slides
    common = {"device": args.device, "devices": args.devices, "num_nodes": args.num_nodes,
              "strategy": "ddp" if args.devices * args.num_nodes > 1 else "auto", "progress": False}
    features = hst.pp.image_features_cohort(
        args.slides, out=args.out / "features.zarr", backbone=model.backbone, geometry=model.crop_geometry,
        batch_size=args.batch_size, **common,
    )
    predictions = hst.tl.predict_cohort(model, features, out=args.out / "predictions.zarr", **common)

    # every process gets here, with the same stores; only rank 0 should write anything else
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    record = {
        "rank": rank,
        "world_size": dist.get_world_size() if distributed else 1,
        "backend": dist.get_backend() if distributed else None,
        "local_rank_env": os.environ.get("LOCAL_RANK"),
        "pid": os.getpid(),
        "features": sorted(n for n, r in features.manifest["complete"].items() if r["rank"] == rank),
        "predictions": sorted(n for n, r in predictions.manifest["complete"].items() if r["rank"] == rank),
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(record) + "\n")
    if rank == 0:
        print(f"{len(predictions)} slides predicted on {record['world_size']} processes: {predictions.path}")


if __name__ == "__main__":
    main()
