"""One-shot GPU check: LoRA training through a UNI-sized ViT-L/16, prediction from images, the GPU tests.

Made to run in one call on a bare H100/H200 machine (≤ 8 minutes) with Python 3.12, torch, timm, lightning
and peft: it needs none of anndata, scanpy, spatialdata or geoopt (it drives hyperst's nn module, training
plan and data module on synthetic crops, not the AnnData/SpatialData front end). Run it from the repository
root with ``PYTHONPATH=src`` (or an installed hyperst).

Sections, each timed, all numbers also written to ``--out`` (JSON):

1. **LoRA training** (``--backbone``, default timm ``vit_large_patch16_224`` with random weights: UNI's
   architecture; LoRA r = 8 on the last 11 blocks; bf16 autocast on CUDA): training spots/s (a spot is its
   spot + niche crop), peak GPU memory, the fraction of wall time the GPU is busy (NVML utilisation sampled
   every 50 ms when ``nvidia-ml-py`` is installed) and the fraction of step time spent waiting for the next
   batch (data loading is the bottleneck when it is large).
2. **Prediction from images**: :func:`hyperst.pp.extract_features` over spot + niche crops, the batch size
   backing off on out-of-memory, then the HyperST heads: spots/s (goal ≥ 2,000 spots/s for ViT-L in bf16
   on one H100/H200), also with ``torch.compile`` when time allows.
3. **The ``gpu``-marked tests** (``pytest -m gpu tests/test_gpu.py``).

``--cpu-smoke`` runs the same code on CPU with timm's tiny ``test_vit`` and a few spots (about half a
minute); ``tests/test_gpu_script.py`` runs it in the suite so the script cannot rot.

Usage::

    PYTHONPATH=src python benchmarks/gpu.py --out gpu.json          # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu.py --cpu-smoke --out s.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- setup
def environment(device: str) -> dict[str, Any]:
    import lightning
    import timm
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "lightning": lightning.__version__, "cpus": os.cpu_count(), "device": device,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover - peft is needed for section 1
        info["peft"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return info


def synthetic_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 crops: smooth random blobs (cheap to make, not constant)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 230, size=(n, 8, 8, 3), dtype=np.uint8)
    reps = -(-size // 8)
    return np.ascontiguousarray(np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :size, :size])


class _Utilisation:
    """Samples NVML GPU utilisation in a thread (``None`` without nvidia-ml-py or a GPU)."""

    def __init__(self, enabled: bool) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._handle = None
        if enabled:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            except Exception:  # optional: no NVML, no numbers
                self._handle = None

    def __enter__(self) -> _Utilisation:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            time.sleep(0.05)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    @property
    def busy(self) -> float | None:
        return None if not self.samples else float(np.mean(self.samples)) / 100


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- 1. LoRA
def lora_training(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch

    from hyperst.data import CropDataModule
    from hyperst.nn import HyperSTConfig, ImageHyperST
    from hyperst.pp import load_backbone
    from hyperst.tl import LoraSpec, TrainerOptions, TrainOptions
    from hyperst.tl._lora import add_lora  # the pieces fit() assembles
    from hyperst.tl._train import run_training

    torch.manual_seed(0)
    trunk = load_backbone(args.backbone, random_init=True, device="cpu")
    spec = trunk.hyperst_spec
    add_lora(trunk, LoraSpec())
    size = int(spec.input_size)
    n, genes = args.train_spots, 250
    spot, niche = synthetic_crops(n, size, 0), synthetic_crops(n, size, 1)
    targets = np.log2(1 + np.random.default_rng(2).poisson(2.0, size=(n, genes))).astype(np.float32)
    val = np.zeros(n, dtype=bool)
    val[: max(2, n // 8)] = True
    dm = CropDataModule(spot, niche, {"targets": targets, "niche_targets": targets}, ~val, val, mean=spec.mean,
                        std=spec.std, batch_size=args.batch_size, seed=0, num_workers=args.workers)
    model = ImageHyperST(trunk, HyperSTConfig(n_genes=genes, image_dim=int(trunk.feature_dim)))

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.wait = self.step = 0.0
            self.spots = 0
            self._t = None

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            _sync(args.device)
            self._t = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            now = time.perf_counter()
            self.wait += now - self._t  # from the end of the last step: the wait for this batch
            self._t = now

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            _sync(args.device)
            now = time.perf_counter()
            self.step += now - self._t
            self.spots += int(batch["spot"].shape[0])
            self._t = now

    timer = Timer()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train = TrainOptions(max_epochs=args.epochs, batch_size=args.batch_size, lr=1e-4, patience=100,
                         progress=False, num_workers=args.workers)
    hardware = TrainerOptions(device=args.device, trainer_kwargs={"callbacks": [timer]})
    t0 = time.perf_counter()
    with _Utilisation(args.device == "cuda") as util:
        result = run_training(model, dm, train, hardware)
    wall = time.perf_counter() - t0
    busy_time = timer.wait + timer.step
    out = {
        "backbone": args.backbone, "params_total_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "params_trainable_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
        "spots": n, "batch_size": args.batch_size, "epochs": result["epochs"], "workers": args.workers,
        "train_spots_per_s": round(timer.spots / max(busy_time, 1e-9), 1),
        "data_wait_fraction": round(timer.wait / max(busy_time, 1e-9), 3),
        "gpu_busy_fraction": util.busy, "wall_s": round(wall, 1),
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if args.device == "cuda" else None),
    }
    out["data_loading_is_bottleneck"] = out["data_wait_fraction"] > 0.2
    return out


# ------------------------------------------------------------------------------------------- 2. predict
def prediction(args: argparse.Namespace, *, compile: bool) -> dict[str, Any]:
    import torch

    from hyperst.nn import HyperSTConfig, HyperSTNetwork
    from hyperst.pp import extract_features, load_backbone

    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, random_init=True, device=args.device)
    size = int(backbone.hyperst_spec.input_size)
    n = args.predict_spots
    spot, niche = synthetic_crops(n, size, 3), synthetic_crops(n, size, 4)
    warm = synthetic_crops(args.predict_batch, size, 5)
    kwargs = {"device": args.device, "batch_size": args.predict_batch, "progress": False, "compile": compile}
    t0 = time.perf_counter()
    extract_features(backbone, warm, **kwargs)  # warm-up (and compilation)
    _sync(args.device)
    warmup = time.perf_counter() - t0
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with _Utilisation(args.device == "cuda") as util:
        t0 = time.perf_counter()
        fs = extract_features(backbone, spot, **kwargs)
        fn = extract_features(backbone, niche, **kwargs)
        _sync(args.device)
        t_backbone = time.perf_counter() - t0
    net = HyperSTNetwork(HyperSTConfig(n_genes=250, image_dim=fs.shape[1])).to(args.device).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, n, 4096):
            net(torch.from_numpy(fs[a : a + 4096]).to(args.device), torch.from_numpy(fn[a : a + 4096]).to(args.device))
    _sync(args.device)
    t_heads = time.perf_counter() - t0
    return {
        "compile": compile, "spots": n, "batch_size": args.predict_batch, "warmup_s": round(warmup, 1),
        "backbone_s": round(t_backbone, 2), "heads_s": round(t_heads, 3),
        "spots_per_s": round(n / (t_backbone + t_heads), 1), "gpu_busy_fraction": util.busy,
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if args.device == "cuda" else None),
    }


# ------------------------------------------------------------------------------------------- 3. tests
def gpu_tests(timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_gpu.py")]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep
                                  + os.environ.get("PYTHONPATH", "")})
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in run.stdout.strip().splitlines() if ln.strip()]
    return {"returncode": run.returncode, "summary": lines[-1] if lines else run.stderr[-500:]}


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny ViT on CPU, a few spots (the suite runs this)")
    p.add_argument("--backbone", default="vit_large_patch16_224")
    p.add_argument("--train-spots", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--predict-spots", type=int, default=8192)
    p.add_argument("--predict-batch", type=int, default=512)
    p.add_argument("--budget-s", type=float, default=420, help="skip the optional sections past this time")
    p.add_argument("--out", default=None, help="JSON file for the numbers")
    args = p.parse_args(argv)
    import torch

    if args.cpu_smoke:
        args.device, args.backbone = "cpu", "test_vit"
        args.train_spots, args.batch_size, args.epochs, args.workers = 16, 8, 1, 0
        args.predict_spots, args.predict_batch, args.budget_s = 16, 8, 60
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU machine, or pass --cpu-smoke")
        args.device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(args.device)}

    def say(name: str, value: Any) -> None:
        report[name] = value
        print(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {json.dumps(value)}", flush=True)

    say("environment", report["environment"])
    say("lora_training", lora_training(args))
    say("prediction", prediction(args, compile=False))
    if not args.cpu_smoke and time.perf_counter() - t_start < args.budget_s - 120:
        say("prediction_compiled", prediction(args, compile=True))
    say("gpu_tests", gpu_tests(timeout=max(30.0, args.budget_s + 60 - (time.perf_counter() - t_start))))
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    print(f"total {report['total_s']} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    main()
