"""The end-to-end demo behind ``hyperst demo``: features → genes → fit → predict → evaluate → report.

:func:`run_demo` runs it on synthetic data (or the Her2ST folder) and writes a report folder;
:func:`demo_data` splits the data into training slides and a held-out slide with its H&E image only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hyperst._constants import Key
from hyperst._version import __version__

__all__ = ["REPORTED", "demo_data", "run_demo", "say"]

#: Metrics of the held-out slide written to ``metrics.json`` (model and mean predictor).
REPORTED = ("PCC@10", "PCC@50", "PCC@200", "MSE", "MAE")


def say(msg: str) -> None:
    """Print a progress line of the ``hyperst`` command (``[hyperst] msg``), flushed at once."""
    print(f"[hyperst] {msg}", flush=True)


def demo_data(her2st: str | None, seed: int) -> tuple[Any, Any, Any, str]:
    """Training SpatialData, held-out H&E-only SpatialData, held-out truth table, and a description."""
    import hyperst as hst

    if her2st is not None:
        sections = ["C2", "C3", "C4", "C5", "C6"]
        train = hst.datasets.her2st(her2st, sections=sections[:4])
        full = hst.datasets.her2st(her2st, sections=sections[4:])
        held = sections[4]
        desc = f"Her2ST: fit on {sections[:4]}, predict {held} from H&E only"
    else:
        full_all = hst.datasets.synthetic(n_samples=4, n_rows=12, n_cols=12, n_genes=36, seed=seed)
        train = full_all.subset([f"sample{i}_{k}" for i in range(3) for k in ("image", "spots")], filter_tables=True)
        full = full_all.subset(["sample3_image", "sample3_spots"], filter_tables=True)
        held = "sample3"
        desc = "synthetic: fit on sample0-2, predict sample3 from H&E only"
    truth = full.tables["table"]
    he_only = full.subset([f"{held}_image", f"{held}_spots"], filter_tables=False)
    for key in list(he_only.tables.keys()):
        del he_only.tables[key]
    return train, he_only, truth, desc


def run_demo(
    out: str | Path = "hyperst-demo",
    *,
    her2st: str | Path | None = None,
    seed: int = 42,
    epochs: int = 60,
    backbone: str = "efficientnet_lite0",
    progress: bool = False,
) -> dict[str, Any]:
    """Run the end-to-end demo and write a report folder.

    Synthetic data (or the Her2ST folder): image features → gene selection → fit on the training
    slides → predict the held-out slide from its H&E image alone → evaluate against its measured
    expression and against the mean predictor → figures and ``metrics.json`` in ``out``.

    Returns
    -------
    The metrics written to ``metrics.json``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    import hyperst as hst
    from hyperst.pp._pyramid import thumbnail

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    train, he_only, truth, desc = demo_data(None if her2st is None else str(her2st), seed)
    say(desc)
    times["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    say(f"image features ({backbone}) of the training spots")
    hst.pp.image_features(train, backbone=backbone, progress=progress)
    table = train.tables["table"]
    times["features_train"] = time.perf_counter() - t

    t = time.perf_counter()
    if her2st is not None:
        genes = hst.pp.select_genes(table, flavor="mean", n_top=250, library_key="sample", inplace=False)
    else:
        genes = list(map(str, table.var_names))
    say(f"fit on {table.n_obs} spots, {len(genes)} genes")
    model = hst.tl.fit(train, genes=genes, config={"emb_dim": 256}, max_epochs=epochs, lr=1e-3, batch_size=64,
                       seed=seed, progress=progress, min_tissue=0.15)
    times["fit"] = time.perf_counter() - t
    model.save(out / "model", overwrite=True)

    t = time.perf_counter()
    say("predict the held-out slide from H&E only")
    pred = hst.tl.predict(model, he_only, progress=progress)
    times["predict"] = time.perf_counter() - t

    # align the prediction with the measured spots of the held-out slide
    inst_pred = pred.obs["instance_id"].to_numpy()
    truth = truth[:, model.genes].copy()
    order = {v: i for i, v in enumerate(inst_pred)}
    rows = np.array([order[v] for v in truth.obs["instance_id"].to_numpy()])
    pred_aligned = pred[rows].copy()
    pred_aligned.obs_names = truth.obs_names
    bands = {}
    if Key.LAYER_LOWER in pred_aligned.layers:
        bands = {"intervals": (pred_aligned.layers[Key.LAYER_LOWER], pred_aligned.layers[Key.LAYER_UPPER]),
                 "uncertainty": pred_aligned.obs[Key.OBS_UNCERTAINTY].to_numpy()}
    res = hst.tl.evaluate(truth, pred_aligned.X, genes=model.genes, groups=None, **bands)
    train_log = np.log2(1 + np.asarray(table[:, model.genes].X.todense() if hasattr(table.X, "todense")
                                       else table[:, model.genes].X))
    mean_pred = np.tile(train_log.mean(0), (truth.n_obs, 1))
    res_mean = hst.tl.evaluate(truth, mean_pred, genes=model.genes, groups=None)
    metrics = {
        "description": desc,
        "n_train_spots": int(table.n_obs),
        "n_test_spots": int(truth.n_obs),
        "n_genes": len(model.genes),
        "model": {m: res["pooled", m] for m in REPORTED},
        "mean_predictor": {m: res_mean["pooled", m] for m in REPORTED},
        "trust": {
            "n_members": model.n_members,
            **({m: res["pooled", m] for m in ("coverage", "width", "spearman_uncertainty_mae")} if bands else {}),
            "ood_fraction": float(pred.obs[Key.OBS_OOD].mean()) if Key.OBS_OOD in pred.obs else None,
            "domain_messages": list(pred.uns[Key.UNS][Key.UNS_PREDICT].get(Key.UNS_DOMAIN, {}).get("messages", [])),
        },
        "epochs": model.training["epochs"],
        "best_epoch": model.training["best_epoch"],
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "hyperst_version": __version__,
    }
    metrics["beats_mean_predictor"] = bool(
        metrics["model"]["MSE"] < metrics["mean_predictor"]["MSE"]
        and metrics["model"]["PCC@10"] > metrics["mean_predictor"]["PCC@10"]
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    res.per_gene.to_csv(out / "per_gene.csv", index=False)

    say("figures")
    truth_plot = truth.copy()
    pred_plot = pred_aligned.copy()
    pred_plot.obsm["spatial"] = truth.obsm["spatial"]
    best = res.per_gene.sort_values("pearson_r", ascending=False)["gene"].head(3).tolist()
    image = thumbnail(next(iter(he_only.images.values())))
    hst.pl.spatial(pred_plot, best, truth=truth_plot, image=image[0], scale_factor=image[1], show=False,
                   save=out / "spatial.png")
    if Key.LAYER_LOWER in pred_plot.layers:  # the 90 % intervals and the trust diagnostics
        hst.pl.intervals(pred_plot, best[0], truth=truth_plot, image=image[0], scale_factor=image[1], show=False,
                         save=out / "intervals.png")
        hst.pl.reliability(pred_plot, truth=truth_plot, image=image[0], scale_factor=image[1], show=False,
                           save=out / "reliability.png")
    hst.pl.scatter(pred_plot, best[0], truth=truth_plot, show=False, save=out / "scatter.png")
    hst.pl.gene_scores(res, show=False, save=out / "gene_scores.png")
    hst.pl.history(model, show=False, save=out / "history.png")
    colour = "tissue" if "tissue" in table.obs.columns else "sample"  # synthetic data know the tissue type
    hst.pl.poincare(table, color=colour, show=False, save=out / "poincare.png")
    hst.pl.radius(table, show=False, save=out / "radius.png")
    times["total"] = time.perf_counter() - t0
    metrics["seconds"]["total"] = round(times["total"], 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    say(
        f"held-out PCC@10 {metrics['model']['PCC@10']:.3f} (mean predictor {metrics['mean_predictor']['PCC@10']:.3f}), "
        f"MSE {metrics['model']['MSE']:.3f} (mean predictor {metrics['mean_predictor']['MSE']:.3f}); "
        f"report in {out}/ ({times['total']:.0f} s)"
    )
    return metrics
