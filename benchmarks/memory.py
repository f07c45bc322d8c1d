"""Peak extra memory of ``hst.pp.image_features`` and ``hst.pp.crops`` for 1,000 and 8,000 spots on one image.

Both functions stream crops with bounded memory, so the peak must not grow with the number of spots:
``image_features`` keeps only each batch's rows, pad and tissue fractions (plus the ``(n, D)`` features it
returns), ``crops`` writes the crops batch by batch to an on-disk :class:`hyperst.data.CropCache` and
returns memory-mapped arrays.

Measurement: each case runs in a fresh subprocess. The same synthetic H&E-like image (numpy, 5,400 ×
4,600 px at 2 µm/px, 75 MB) and a hexagonal Visium grid (100 µm pitch) are built first; the first ``n``
spots are used. A warm-up call on 64 spots compiles the resampling kernel and builds the backbone, then
the resident set size (RSS, ``/proc/self/statm``) is sampled every 2 ms by a thread during the measured
call; "extra" is the RSS high-water mark minus the RSS just before the call. RSS counts every resident
page of the process (heap, torch and numpy buffers, and the file-backed pages it maps); it is what the
operating system must find.

Usage::

    python benchmarks/memory.py            # 1,000 and 8,000 spots, both functions
    python benchmarks/memory.py --spots 1000 8000 --out-size 224
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

PIXEL_SIZE = 2.0  # µm per pixel
HEIGHT, WIDTH = 4600, 5400  # px: 9.2 mm × 10.8 mm, room for 8,832 Visium spots


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling the RSS in a thread; ``extra`` = high-water mark minus the RSS at entry."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _sdata(n_spots: int):
    import numpy as np
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel

    rng = np.random.default_rng(0)
    img = np.empty((3, HEIGHT, WIDTH), dtype=np.uint8)
    for c, (lo, hi) in enumerate(((170, 240), (90, 200), (150, 230))):  # pink/purple texture
        img[c] = rng.integers(lo, hi, size=(HEIGHT, WIDTH), dtype=np.uint8)
    pitch = 100.0 / PIXEL_SIZE
    rows, cols = np.meshgrid(np.arange(92), np.arange(96), indexing="ij")
    x = 4 * pitch + cols * pitch + (rows % 2) * pitch / 2
    y = 4 * pitch + rows * pitch * np.sqrt(3) / 2
    xy = np.c_[x.ravel(), y.ravel()]
    xy = xy[(xy[:, 0] < WIDTH - 4 * pitch) & (xy[:, 1] < HEIGHT - 4 * pitch)][:n_spots]
    if len(xy) < n_spots:
        raise SystemExit(f"the image holds only {len(xy)} spots")
    shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), 27.5 / PIXEL_SIZE))
    return SpatialData(images={"he": Image2DModel.parse(img, dims=("c", "y", "x"))}, shapes={"spots": shapes})


def _case(function: str, n_spots: int, out_size: int) -> dict:
    import torch

    import hyperst as hst

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    geometry = hst.pp.CropGeometry(spot_size_um=112.0, niche_size_um=255.0, out_size=out_size)
    kwargs = {"geometry": geometry, "pixel_size": PIXEL_SIZE, "spot_diameter": 55.0, "progress": False}
    model = hst.pp.load_backbone("test_vit", random_init=True) if function == "image_features" else None

    def call(sdata):
        if function == "image_features":
            return hst.pp.image_features(sdata, backbone=model, batch_size=32, **kwargs)
        return hst.pp.crops(sdata, batch_size=32, **kwargs)

    call(_sdata(64))  # warm-up: numba kernel, backbone, lazy imports
    sdata = _sdata(n_spots)
    import gc

    gc.collect()
    t0 = time.perf_counter()
    with PeakRSS() as m:
        result = call(sdata)
    seconds = time.perf_counter() - t0
    if function == "crops":
        assert result[0].spot.shape == (n_spots, out_size, out_size, 3)
    crop_bytes = n_spots * out_size * out_size * 3
    del result
    return {"function": function, "n_spots": n_spots, "out_size": out_size, "extra_mb": m.extra / 2**20,
            "seconds": seconds, "one_stream_of_crops_mb": crop_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, nargs="+", default=[1000, 8000])
    parser.add_argument("--functions", nargs="+", default=["image_features", "crops"])
    parser.add_argument("--out-size", type=int, default=224)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_case(args.case[0], int(args.case[1]), int(args.case[2]))))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("| function | spots | peak extra RSS (MB) | all spot crops of one stream (MB) | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for function in args.functions:
        for n in args.spots:
            out = subprocess.run([sys.executable, __file__, "--case", function, str(n), str(args.out_size)],
                                 capture_output=True, text=True, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {r['function']} | {r['n_spots']:,} | {r['extra_mb']:.0f} | {r['one_stream_of_crops_mb']:.0f} | "
                  f"{r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
