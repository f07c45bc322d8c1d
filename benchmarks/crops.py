"""Benchmark: hst spot + niche crop extraction vs ``spatialdata.dataloader.ImageTilesDataset``.

A synthetic multiscale H&E-sized image (default 20,000 × 20,000 px, 4 levels, RGB uint8) is built lazily
as dask arrays: every chunk is generated on demand by a cheap texture function, nothing is held in RAM.
5,000 Visium spots lie on a hexagonal grid (100 µm pitch, 55 µm spots) at 0.5 µm/px, so a spot window of
112 µm is 224 px (read from level 0) and a niche window of 255 µm is 510 px (read from level 1); both
are resized to 224 × 224.

- hst: ``extract_crops`` for the spot and the niche windows of all spots (streamed by spatial tiles).
- ImageTilesDataset (spatialdata 0.7.3): ``tile_dim_in_units`` = window side, ``rasterize=True``,
  ``rasterize_kwargs={"target_width": 224}`` (it picks the pyramid level itself), one dataset per window
  size; each tile is computed to numpy. It is timed on a random subset of the spots and its throughput
  is extrapolated (printed as such).

Each method runs in its own subprocess so that the peak RSS (``ru_maxrss``) of each is measured
separately; "setup" is the RSS after imports and the lazy image, "peak" the maximum during the run.

Usage::

    python benchmarks/crops.py            # full run (20k × 20k, 5,000 spots)
    python benchmarks/crops.py --quick    # 6k × 6k, 500 spots
    python benchmarks/crops.py --size 30000 --n-spots 8000 --itd-spots 100
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PIXEL_SIZE = 0.5  # µm / px
PITCH_UM, SPOT_UM = 100.0, 55.0
N_LEVELS = 4
OUT = 224


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _texture(block_info: dict | None = None, factor: int = 1) -> np.ndarray:
    """RGB texture of a chunk, a function of level-0 coordinates (so levels are consistent)."""
    assert block_info is not None
    (c0, c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    y = (np.arange(y0, y1) + 0.5) * factor
    x = (np.arange(x0, x1) + 0.5) * factor
    out = np.empty((c1 - c0, y1 - y0, x1 - x0), dtype=np.uint8)
    for c in range(c0, c1):
        ya = (64 + 40 * np.sin(y / 37.0 + c) + 20 * np.sin(y / 7.3 - c)).astype(np.uint8)
        xa = (64 + 40 * np.cos(x / 53.0 - c) + 20 * np.cos(x / 5.9 + 2 * c)).astype(np.uint8)
        np.add(ya[:, None], xa[None, :], out=out[c - c0])
    return out


def build_image(size: int, chunk: int):  # -> xr.DataTree
    import dask.array as da
    import xarray as xr
    from spatialdata.transformations import Identity, set_transformation

    levels = {}
    for lvl in range(N_LEVELS):
        f = 2**lvl
        shape = (3, size // f, size // f)
        arr = da.map_blocks(
            _texture,
            factor=f,
            dtype=np.uint8,
            chunks=da.core.normalize_chunks((3, chunk, chunk), shape),
            meta=np.empty((0, 0, 0), np.uint8),
        )
        levels[f"scale{lvl}"] = xr.Dataset(
            {"image": xr.DataArray(arr, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})}
        )
    tree = xr.DataTree.from_dict(levels)
    set_transformation(tree, {"global": Identity()}, set_all=True)
    return tree


def visium_centres(n: int, size: int) -> np.ndarray:
    """``n`` hexagonal-grid centres (x, y) in px, centred in the image."""
    pitch = PITCH_UM / PIXEL_SIZE
    n_cols = max(1, round(math.sqrt(n * math.sqrt(3) / 2)))
    n_rows = math.ceil(n / n_cols)
    rows, cols = np.divmod(np.arange(n), n_cols)
    x = cols * pitch + (rows % 2) * pitch / 2
    y = rows * pitch * math.sqrt(3) / 2
    niche = 2 * (PITCH_UM + SPOT_UM / 2) / PIXEL_SIZE
    width, height = x.max() + niche, y.max() + niche
    if width > size or height > size:
        raise SystemExit(f"{n} spots need a {width:.0f} × {height:.0f} px image; raise --size (now {size}).")
    x += (size - (x.max() - x.min())) / 2 - x.min()
    y += (size - (y.max() - y.min())) / 2 - y.min()
    assert n_rows * n_cols >= n
    return np.stack([x, y], axis=1) + 0.25  # not on pixel centres


def sides_px() -> tuple[float, float]:
    from hyperst.pp._layout import CropGeometry

    geom = CropGeometry.for_layout("visium", spot_diameter=SPOT_UM, pitch=PITCH_UM)
    return geom.sides_px(PIXEL_SIZE)


# ------------------------------------------------------------------------------------------- workers
def worker_hst(args: argparse.Namespace) -> dict:
    from hyperst.pp._crops import extract_crops, iter_crops
    from hyperst.pp._pyramid import ImagePyramid

    tree = build_image(args.size, args.chunk)
    centres = visium_centres(args.n_spots, args.size)
    spot_side, niche_side = sides_px()
    pyr = ImagePyramid(tree)
    # load the compiled kernel (numba cache) outside the timing
    extract_crops(np.zeros((3, 64, 64), np.uint8), np.array([[32.0, 32.0]]), 40.0, out_size=OUT)
    setup_mb = _rss_mb()
    res = {"setup_rss_mb": setup_mb, "n": len(centres)}
    for name, side in (("spot", spot_side), ("niche", niche_side)):
        # stream the batches as feature extraction would (keep only the crops compared with ITD)
        keep = np.zeros((args.compare, OUT, OUT, 3), np.uint8)
        n_done = 0
        t0 = time.perf_counter()
        for batch in iter_crops(
            tree, centres, side, out_size=OUT, batch_size=args.batch_size, max_region_px=args.max_region_px
        ):
            sel = batch.index < args.compare
            keep[batch.index[sel]] = batch.crops[sel]
            n_done += len(batch.index)
        res[f"{name}_s"] = time.perf_counter() - t0
        assert n_done == len(centres)
        res[f"{name}_level"] = pyr.choose_level(side, OUT)
        np.save(Path(args.dump) / f"hst_{name}.npy", keep)
    res["peak_rss_mb"] = _rss_mb()
    return res


def worker_itd(args: argparse.Namespace) -> dict:
    import anndata as ad
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.dataloader import ImageTilesDataset
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    tree = build_image(args.size, args.chunk)
    centres = visium_centres(args.n_spots, args.size)
    n = len(centres)
    spot_side, niche_side = sides_px()
    rng = np.random.default_rng(0)
    first = np.arange(min(args.compare, n))
    m = max(min(args.itd_spots, n) - len(first), 0)
    subset = np.concatenate([first, np.sort(rng.choice(np.arange(len(first), n), m, replace=False))])
    radius = SPOT_UM / 2 / PIXEL_SIZE
    shapes = ShapesModel.parse(centres, geometry=0, radius=np.full(n, radius), transformations={"global": Identity()})
    obs = pd.DataFrame(
        {
            "region": pd.Categorical(["spots"] * n),
            "instance_id": np.arange(n),
            "spot": np.arange(n, dtype=float),
        }
    )
    obs.index = obs.index.astype(str)
    table = TableModel.parse(
        ad.AnnData(np.zeros((n, 1), np.float32), obs=obs),
        region="spots",
        region_key="region",
        instance_key="instance_id",
    )
    sdata = SpatialData(images={"he": tree}, shapes={"spots": shapes}, tables={"table": table})
    setup_mb = _rss_mb()
    res = {"setup_rss_mb": setup_mb, "n": len(subset)}
    for name, side in (("spot", spot_side), ("niche", niche_side)):
        t0 = time.perf_counter()
        ds = ImageTilesDataset(
            sdata,
            regions_to_images={"spots": "he"},
            regions_to_coordinate_systems={"spots": "global"},
            tile_dim_in_units=side,
            rasterize=True,
            return_annotations="spot",
            table_name="table",
            rasterize_kwargs={"target_width": OUT},
        )
        res[f"{name}_init_s"] = time.perf_counter() - t0
        tiles = []
        t0 = time.perf_counter()
        for i in subset:
            tile, _ = ds[int(i)]
            arr = np.asarray(tile.data.compute())  # (3, 224, 224)
            tiles.append(arr)
        res[f"{name}_s"] = time.perf_counter() - t0
        res[f"{name}_shape"] = list(tiles[0].shape)
        first = np.stack([t.transpose(1, 2, 0) for t in tiles[: args.compare]])
        np.save(Path(args.dump) / f"itd_{name}.npy", first)
        del tiles
    res["peak_rss_mb"] = _rss_mb()
    return res


def chunk_cost(args: argparse.Namespace) -> float:
    tree = build_image(args.size, args.chunk)
    arr = tree["scale0"]["image"].data
    arr.blocks[0, 1, 1].compute()
    t0 = time.perf_counter()
    for i in range(3):
        arr.blocks[0, 2, i].compute()
    return (time.perf_counter() - t0) / 3 * 1000


# ------------------------------------------------------------------------------------------- driver
def run_worker(method: str, args: argparse.Namespace, dump: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--dump", dump]
    for k in ("size", "n_spots", "chunk", "itd_spots", "batch_size", "compare", "max_region_px"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=20_000, help="image side in px (level 0)")
    p.add_argument("--n-spots", type=int, default=5_000)
    p.add_argument("--chunk", type=int, default=1024, help="dask chunk side in px")
    p.add_argument("--itd-spots", type=int, default=150, help="spots timed with ImageTilesDataset")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-region-px", type=int, default=2**23, help="hst: pixels of one region read at once")
    p.add_argument("--compare", type=int, default=8, help="spots whose crops are compared across methods")
    p.add_argument("--quick", action="store_true", help="6,000 px image, 500 spots, 40 ITD spots")
    p.add_argument("--worker", choices=["hst", "itd"], help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.size, args.n_spots, args.itd_spots = 6_000, 500, 40
    if args.worker:
        res = worker_hst(args) if args.worker == "hst" else worker_itd(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    import spatialdata
    import torch

    spot_side, niche_side = sides_px()
    print(
        f"image {args.size} × {args.size} px ({N_LEVELS} levels, lazy dask, chunks {args.chunk}²), "
        f"{args.n_spots} Visium spots, {PIXEL_SIZE} µm/px; windows: spot {spot_side:.0f} px, "
        f"niche {niche_side:.0f} px -> {OUT}²; spatialdata {spatialdata.__version__}, "
        f"{torch.get_num_threads()} threads; hst max_region_px {args.max_region_px}"
    )
    ms = chunk_cost(args)
    print(f"generating one {args.chunk}² RGB chunk costs {ms:.1f} ms (stands in for a zarr read)")
    with tempfile.TemporaryDirectory() as dump:
        hst = run_worker("hst", args, dump)
        itd = run_worker("itd", args, dump)
        diffs = {}
        for name in ("spot", "niche"):
            a = np.load(Path(dump) / f"hst_{name}.npy").astype(float)
            b = np.load(Path(dump) / f"itd_{name}.npy").astype(float)
            k = min(len(a), len(b))
            diffs[name] = float(np.abs(a[:k] - b[:k]).mean()) if b.shape[1:] == a.shape[1:] else float("nan")

    hst_t = hst["spot_s"] + hst["niche_s"]
    itd_t = itd["spot_s"] + itd["niche_s"]
    hst_rate = hst["n"] / hst_t
    itd_rate = itd["n"] / itd_t
    print()
    head = f"{'method':<22}{'spots':>7}{'spot s':>9}{'niche s':>9}{'spots/s':>10}{'setup MB':>10}{'peak MB':>9}"
    print(head)
    print(
        f"{'hst extract_crops':<22}{hst['n']:>7}{hst['spot_s']:>9.2f}{hst['niche_s']:>9.2f}{hst_rate:>10.1f}"
        f"{hst['setup_rss_mb']:>10.0f}{hst['peak_rss_mb']:>9.0f}"
    )
    print(
        f"{'ImageTilesDataset':<22}{itd['n']:>7}{itd['spot_s']:>9.2f}{itd['niche_s']:>9.2f}{itd_rate:>10.1f}"
        f"{itd['setup_rss_mb']:>10.0f}{itd['peak_rss_mb']:>9.0f}"
    )
    print(
        f"\nImageTilesDataset was timed on {itd['n']} of {args.n_spots} spots (random subset) and its "
        f"throughput extrapolated: all {args.n_spots} spots would take ~{args.n_spots / itd_rate:.0f} s "
        f"(+ dataset init {itd['spot_init_s'] + itd['niche_init_s']:.1f} s) vs {hst_t:.1f} s for hst."
    )
    print(f"speed-up hst / ImageTilesDataset: {hst_rate / itd_rate:.1f}×  (spot + niche crop per spot)")
    print(
        f"peak RSS above setup: hst {hst['peak_rss_mb'] - hst['setup_rss_mb']:.0f} MB, "
        f"ImageTilesDataset {itd['peak_rss_mb'] - itd['setup_rss_mb']:.0f} MB (hst streams with iter_crops "
        f"and keeps no crops; holding all would add {args.n_spots * OUT * OUT * 3 / 2**20:.0f} MB per window "
        "size, or use extract_crops(out=memmap))"
    )
    print(
        f"levels read by hst: spot {hst['spot_level']}, niche {hst['niche_level']}; mean |hst - ITD| on the "
        f"first {args.compare} spots: spot {diffs['spot']:.1f}, niche {diffs['niche']:.1f} grey levels "
        "(ITD samples nearest-neighbour without antialiasing)"
    )


if __name__ == "__main__":
    main()
