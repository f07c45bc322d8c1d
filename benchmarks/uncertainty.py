"""Trust benchmark on Her2ST: ensemble intervals, per-spot uncertainty and domain-shift flags.

Part 1 (``--loso``): leave one section out over C2–C6 with :func:`hyperst.tl.benchmark`'s ``hyperst_ensemble``
method (one member per training section held out for early stopping; genes chosen per fold on the training
sections; nothing of the held-out section is used). Reports per fold and seed: empirical coverage of the 90 %
intervals, mean width, Spearman(per-spot uncertainty, per-spot MAE), ensemble PCC@50 against its members'
(single models), and the seed standard deviation of both.

Part 2 (``--shift``): trains one ensemble on C2–C5, then predicts C6 clean and degraded with
:func:`hyperst.datasets.degrade` (downsampled, JPEG, HED stain shift, background painted black, and
combinations up to a severe one), and reports PCC@50, coverage, the fraction of flagged spots and the
slide-level alarms of each.

Usage, from the repository root::

    python benchmarks/uncertainty.py --loso --shift --out benchmarks/out/uncertainty

Writes ``loso.csv``, ``shift.csv`` and ``summary.json`` to ``--out``. Two cores: about 15 minutes for both.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIT = {"config": {"emb_dim": 256}, "lr": 1e-3, "batch_size": 64, "max_epochs": 100}


def her2st_features(data: Path, cache: Path):
    import anndata as ad

    import hyperst as hst

    if cache.is_file():
        return ad.read_h5ad(cache)
    sdata = hst.datasets.her2st(data)
    hst.pp.image_features(sdata, backbone="efficientnet_lite0", progress=False)
    table = sdata.tables["table"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    table.write_h5ad(cache)
    return table


def loso(table, seeds: list[int]):
    import pandas as pd

    import hyperst as hst

    res = hst.tl.benchmark(table, methods=["hyperst_ensemble"], gene_sets={"mean250": {"flavor": "mean", "n_top": 250}},
                           seeds=seeds, fit_kwargs=FIT, n_jobs=1, progress=True)
    rows = []
    for job in res.meta["jobs"]:
        info = job["methods"]["hyperst_ensemble"]
        sc = res.scores[(res.scores.fold == job["fold"]) & (res.scores.seed == job["seed"])
                        & (res.scores.scope == "pooled")].set_index("metric")["value"]
        rows.append({"fold": job["fold"], "seed": job["seed"], "coverage": sc["coverage"], "width": sc["width"],
                     "spearman": sc["spearman_uncertainty_mae"], "ensemble_pcc50": sc["PCC@50"],
                     "member_pcc50_mean": float(np.mean(info["member_pcc50"])),
                     "member0_pcc50": float(info["member_pcc50"][0]), "ood_fraction": info["ood_fraction"],
                     "spearman_radius": info.get("spearman_radius_mae")})
    df = pd.DataFrame(rows)
    seed_sd = df.groupby("fold").agg(ensemble_sd=("ensemble_pcc50", "std"), single_sd=("member0_pcc50", "std"))
    return df, seed_sd


def shift(data: Path, seed: int = 0, save: Path | None = None):
    import pandas as pd

    import hyperst as hst

    sdata = hst.datasets.her2st(data)
    hst.pp.image_features(sdata, backbone="efficientnet_lite0", progress=False)
    table = sdata.tables["table"]
    train = table[table.obs["sample"] != "C6"].copy()
    genes = hst.pp.select_genes(train, flavor="mean", n_top=250, inplace=False)
    model = hst.tl.fit(train, genes=genes, seed=seed, progress=False, **FIT)
    c6 = hst.datasets.her2st(data, sections=["C6"])
    variants = {
        "clean": {},
        "3.2 µm/px": {"pixel_size": 3.2},
        "6.4 µm/px": {"pixel_size": 6.4},
        "JPEG q=30": {"jpeg_quality": 30},
        "stain 0.2": {"stain": 0.2},
        "stain 0.5": {"stain": 0.5},
        "black background": {"background": "black"},
        "black bg + stain 0.2 + 3.2 µm/px": {"background": "black", "stain": 0.2, "pixel_size": 3.2},
        "black bg + stain 0.5 + 6.4 µm/px + JPEG q=20": {"background": "black", "stain": 0.5, "pixel_size": 6.4,
                                                         "jpeg_quality": 20},
    }
    rows = []
    for name, kw in variants.items():
        sd = hst.datasets.degrade(c6, seed=seed, **kw) if kw else c6
        t0 = time.perf_counter()
        out = hst.tl.predict(model, sd, key_added="pred", progress=False)
        if save is not None:  # the variant's features, for studying the domain checks offline
            sd.tables["table"].write_h5ad(save / f"features_{len(rows)}.h5ad")
        if sd is c6:
            del c6.tables["pred"]  # the degraded copies are made from c6: keep it as read
        truth = sd.tables["table"]
        ev = hst.tl.evaluate(truth, out, genes=model.genes)
        dom = out.uns["hyperst"]["predict"]["domain"]
        slide = next(iter(dom["slides"].values()))
        rows.append({"variant": name, "PCC@50": ev["pooled", "PCC@50"], "MSE": ev["pooled", "MSE"],
                     "coverage": ev["pooled", "coverage"], "spearman": ev["pooled", "spearman_uncertainty_mae"],
                     "spearman_radius": _radius_rho(truth, out, model.genes), "ood_fraction": dom["ood_fraction"],
                     "median_score": slide["median_score"], "colour_z": slide.get("colour_z"),
                     "slide_flags": ",".join(slide["flags"]) or "-", "flagged": dom["flagged"],
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return pd.DataFrame(rows), model


def _radius_rho(truth, out, genes) -> float:
    """Spearman ρ between the hyperbolic radius of each spot and its mean absolute error."""
    from scipy.stats import spearmanr

    from hyperst._constants import Key

    counts = truth[out.obs_names, genes].X
    y = np.log2(1 + (counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)))
    pred = out.layers.get(Key.LAYER_PRED, out.X)
    return float(spearmanr(out.obs[Key.OBS_RADIUS], np.abs(y - np.asarray(pred)).mean(1))[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("HYPERST_HER2ST", str(ROOT.parent / "shared/data/her2st")))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "uncertainty"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loso", action="store_true")
    parser.add_argument("--shift", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    if args.loso:
        table = her2st_features(Path(args.data), out / "features.h5ad")
        df, sd = loso(table, args.seeds)
        df.to_csv(out / "loso.csv", index=False)
        sd.to_csv(out / "loso_seed_sd.csv")
        print(df.round(3).to_string(index=False))
        print(sd.round(4).to_string())
        summary["loso"] = {"min_coverage": float(df.coverage.min()), "max_coverage": float(df.coverage.max()),
                           "min_spearman": float(df.spearman.min()),
                           "ensemble_ge_members": bool((df.ensemble_pcc50 >= df.member_pcc50_mean).all()),
                           "sd_ratio": float((sd.ensemble_sd / sd.single_sd).mean())}
    if args.shift:
        df, model = shift(Path(args.data), save=out)
        model.save(out / "model", overwrite=True)
        df.to_csv(out / "shift.csv", index=False)
        print(df.round(3).to_string(index=False))
        summary["shift"] = df.to_dict(orient="records")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
