"""The end-to-end demo behind ``hyperst demo``: features → genes → fit → predict → evaluate → report.

:func:`run_demo` runs it on synthetic data (or the Her2ST folder) and writes a report folder with a
self-contained ``index.html``; :func:`demo_data` splits the data into training slides and a held-out slide
with its H&E image only; :func:`fresh_folder` names a report folder that no other run uses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hyperst._constants import DEFAULT_BACKBONE, Key
from hyperst._version import __version__

__all__ = ["DEFAULT_MARKERS", "REPORTED", "demo_data", "fresh_folder", "run_demo", "say"]

#: Metrics of the held-out slide written to ``metrics.json`` (model and mean predictor).
REPORTED = ("PCC@10", "PCC@50", "PCC@200", "MSE", "MAE")
#: Genes the figures show when the data have them: Her2ST's markers (HER2 amplicon, epithelium, immune/MHC-II),
#: then one gene of each synthetic tissue program.
DEFAULT_MARKERS = ("ERBB2", "KRT19", "CD74", "tumour_0", "stroma_0", "immune_0")


def fresh_folder(prefix: str = "hyperst-demo", parent: str | Path = ".") -> Path:
    """A folder under ``parent`` that does not exist yet: ``{prefix}-YYYYMMDD-HHMMSS`` (``-2``, … on a clash)."""
    base = Path(parent) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def say(msg: str) -> None:
    """Print a progress line of the ``hyperst`` command (``[hyperst] msg``), flushed at once."""
    print(f"[hyperst] {msg}", flush=True)


def demo_data(her2st: str | None, seed: int, *, grid: int = 12) -> tuple[Any, Any, Any, str]:
    """Training SpatialData, held-out H&E-only SpatialData, held-out truth table, and a description.

    Synthetic data: four slides of ``grid`` × ``grid`` spots (three to train on, one held out).
    """
    import hyperst as hst

    if her2st is not None:
        sections = ["C2", "C3", "C4", "C5", "C6"]
        train = hst.datasets.her2st(her2st, sections=sections[:4])
        full = hst.datasets.her2st(her2st, sections=sections[4:])
        held = sections[4]
        desc = f"Her2ST: fit on {sections[:4]}, predict {held} from H&E only"
    else:
        full_all = hst.datasets.synthetic(n_samples=4, n_rows=grid, n_cols=grid, n_genes=36, seed=seed)
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
    out: str | Path | None = None,
    *,
    her2st: str | Path | None = None,
    seed: int = 42,
    epochs: int = 60,
    backbone: str = DEFAULT_BACKBONE,
    progress: bool = True,
    markers: Sequence[str] | None = None,
    grid: int = 12,
) -> dict[str, Any]:
    """Run the end-to-end demo and write a report folder.

    Synthetic data (or the Her2ST folder): image features → gene selection → fit on the training
    slides → predict the held-out slide from its H&E image alone → evaluate against its measured
    expression and against the mean predictor → figures, ``metrics.json``, ``per_gene.csv``, the model
    and ``index.html`` (the page to open: metrics, every figure with what to look for, the command) in
    ``out``.

    Parameters
    ----------
    out
        Report folder. Default: a new ``hyperst-demo-YYYYMMDD-HHMMSS`` in the working directory
        (:func:`fresh_folder`), so that no earlier report is overwritten; an existing folder is written into.
    her2st
        The Her2ST folder: fit on C2–C5, predict C6. Default: synthetic data.
    seed
        Seed of the data (synthetic) and of the fit.
    epochs
        Most training epochs (early stopping on the held-out training slides).
    backbone
        Frozen image backbone.
    progress
        Progress bars for the steps that take more than a few seconds (features, epochs).
    markers
        Genes to show in the figures (those the data have, in this order; genes the gene selection did not
        pick are added to the model's genes). Default: :data:`DEFAULT_MARKERS` present in the data, else the
        three best-predicted genes.
    grid
        Side of the synthetic slides' spot grid (ignored with ``her2st``); small values make a quick run.

    Returns
    -------
    The metrics written to ``metrics.json``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    import hyperst as hst

    if grid < 3:
        raise ValueError(f"`grid` must be at least 3 spots per side, got {grid}.")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    train, he_only, truth, desc = demo_data(None if her2st is None else str(her2st), seed, grid=grid)
    table = train.tables["table"]
    wanted = DEFAULT_MARKERS if markers is None else tuple(map(str, markers))
    present = set(map(str, table.var_names)) & set(map(str, truth.var_names))
    unknown = [g for g in wanted if g not in present]
    if markers is not None and unknown:
        raise ValueError(f"`markers` {unknown} are not measured in the demo data; choose among its genes.")
    marker_genes = [g for g in wanted if g in present]
    out = fresh_folder() if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"report folder {out}/")
    say(desc)
    times["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    say(f"image features ({backbone}) of the training spots")
    hst.pp.image_features(train, backbone=backbone, progress=progress)
    times["features_train"] = time.perf_counter() - t

    t = time.perf_counter()
    if her2st is not None:
        genes = hst.pp.select_genes(table, flavor="mean", n_top=250, library_key="sample", inplace=False)
    else:
        genes = list(map(str, table.var_names))
    genes = [*genes, *[g for g in marker_genes if g not in genes]]
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
    figures = _figures(out, model, table, truth, pred_aligned, res, he_only, marker_genes)
    times["total"] = time.perf_counter() - t0
    metrics["seconds"]["total"] = round(times["total"], 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _index(out, metrics, figures, _command(out, her2st, seed, epochs, backbone, progress, markers, grid))
    say(
        f"held-out PCC@10 {metrics['model']['PCC@10']:.3f} (mean predictor {metrics['mean_predictor']['PCC@10']:.3f}), "
        f"MSE {metrics['model']['MSE']:.3f} (mean predictor {metrics['mean_predictor']['MSE']:.3f}); "
        f"report: {out / 'index.html'} ({times['total']:.0f} s)"
    )
    return metrics


def _figures(out: Path, model: Any, table: Any, truth: Any, pred: Any, res: Any, he_only: Any,
             marker_genes: list[str]) -> list[tuple[str, str]]:
    """Draw the demo's figures into ``out``; ``(file, caption saying what to look for)`` for each."""
    import matplotlib.pyplot as plt

    import hyperst as hst
    from hyperst.pp._pyramid import thumbnail

    truth_plot = truth.copy()
    pred_plot = pred.copy()
    pred_plot.obsm["spatial"] = truth.obsm["spatial"]
    ranked = res.per_gene.sort_values("pearson_r", ascending=False)["gene"].tolist()
    shown = [g for g in marker_genes if g in model.genes][:3] or ranked[:3]
    which = "marker genes" if marker_genes else "the three best-predicted genes"
    r = res.per_gene.set_index("gene")["pearson_r"]
    image, scale = thumbnail(next(iter(he_only.images.values())))
    figs: list[tuple[str, str]] = []

    hst.pl.spatial(pred_plot, shown, truth=truth_plot, image=image, scale_factor=scale, show=False,
                   save=out / "spatial.png")
    scores = ", ".join(f"{g} {r[g]:.2f}" for g in shown)
    figs.append(("spatial.png", f"Held-out slide, {which} {', '.join(shown)}: predicted from the H&E alone (left) "
                 "and measured (right), log2(1 + counts) on one colour scale per gene. Look for the same regions "
                 f"lighting up in both columns (Pearson r: {scores})."))
    if Key.LAYER_LOWER in pred_plot.layers:  # the 90 % intervals and the trust diagnostics
        hst.pl.intervals(pred_plot, shown[0], truth=truth_plot, image=image, scale_factor=scale, show=False,
                         save=out / "intervals.png")
        figs.append(("intervals.png", f"{shown[0]}: predicted, lower and upper end of the 90 % prediction interval, "
                     "and measured, on one colour scale. The measured map should lie between the lower and upper "
                     "maps (its title gives the fraction of spots inside); ringed spots look unlike the training "
                     "data."))
        hst.pl.reliability(pred_plot, truth=truth_plot, image=image, scale_factor=scale, show=False,
                           save=out / "reliability.png")
        figs.append(("reliability.png", "How far to trust this slide: per-spot uncertainty, out-of-distribution score "
                     "(red mark: the flag threshold), error against uncertainty (Spearman ρ; it should be positive) "
                     "and the coverage of each gene's interval (it should sit near the dashed nominal 90 %)."))
    hst.pl.scatter(pred_plot, shown[0], truth=truth_plot, show=False, save=out / "scatter.png")
    figs.append(("scatter.png", f"{shown[0]}, one point per held-out spot: predicted against measured, y = x dashed. "
                 "Points along the line are good predictions; a flat horizontal cloud means the model only "
                 "learned the mean."))
    hst.pl.gene_scores(res, show=False, save=out / "gene_scores.png")
    figs.append(("gene_scores.png", "Pearson r of every predicted gene on the held-out slide, ranked; PCC@10/50/200 "
                 "(the means of the top 10, 50, 200) are marked. Look at how many genes stay well above 0."))
    hst.pl.history(model, show=False, save=out / "history.png")
    figs.append(("history.png", "Training (solid) and validation (dashed) loss per term and epoch. Validation should "
                 f"flatten rather than rise; early stopping kept epoch {model.training['best_epoch']}."))
    colour = "tissue" if "tissue" in table.obs.columns else "sample"  # synthetic data know the tissue type
    _poincare_panels(table, colour, out / "poincare.png")
    plt.close("all")
    figs.append(("poincare.png", f"Training spots on the Poincaré disk, one panel per stream, coloured by {colour} "
                 "(drawn in random order, so no section hides another). Each point keeps its true hyperbolic "
                 f"distance to the origin. Look for {colour} groups occupying their own directions, and for the "
                 "niche and gene streams lying further out than the image spot stream."))
    hst.pl.radius(table, show=False, save=out / "radius.png")
    figs.append(("radius.png", "Distance of each training spot's embedding to the origin of hyperbolic space, per "
                 "stream (violin with median). HyperST's entailment losses place general concepts near the origin "
                 "and specific ones further out, so the streams should sit at different distances (on Her2ST: image "
                 "spot < gene spot < image niche < gene niche). It describes the learned hierarchy; it is not a "
                 "confidence, so do not filter spots by it."))
    plt.close("all")
    return figs


def _poincare_panels(table: Any, colour: str, path: Path) -> None:
    """One Poincaré disk per embedding stream, the spots in random order so that no group is drawn last."""
    import matplotlib.pyplot as plt
    import numpy as np

    import hyperst as hst

    keys = [k for k in (Key.OBSM_IMAGE_SPOT, f"{Key.OBSM_IMAGE_SPOT}_niche", f"{Key.OBSM_IMAGE_SPOT}_gene",
                        f"{Key.OBSM_IMAGE_SPOT}_gene_niche") if k in table.obsm]
    shuffled = table[np.random.default_rng(0).permutation(table.n_obs)].copy()
    names = {Key.OBSM_IMAGE_SPOT: "image, spot", f"{Key.OBSM_IMAGE_SPOT}_niche": "image, niche",
             f"{Key.OBSM_IMAGE_SPOT}_gene": "gene, spot", f"{Key.OBSM_IMAGE_SPOT}_gene_niche": "gene, niche"}
    ncols = 2 if len(keys) == 4 else len(keys)
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 1.4, 4.4 * nrows), squeeze=False,
                             layout="constrained")
    for j, (ax, key) in enumerate(zip(axes.ravel(), keys, strict=False)):
        hst.pl.poincare(shuffled, keys=[key], color=colour, legend=j % ncols == ncols - 1, ax=ax, show=False)
        ax.set_title(f"{names[key]} ({key})", fontsize=10)
    fig.suptitle(f"Poincaré disk per stream, {shuffled.n_obs} training spots coloured by {colour}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _command(out: Path, her2st: Any, seed: int, epochs: int, backbone: str, progress: bool,
             markers: Sequence[str] | None, grid: int) -> str:
    """The command that made the report: this process's ``hyperst …`` line, else the ``run_demo`` call."""
    from hyperst.tl._benchmark_report import command_line

    line = command_line()
    if line.startswith("hyperst "):
        return line
    args = [repr(str(out))]
    if her2st is not None:
        args.append(f"her2st={str(her2st)!r}")
    args += [f"seed={seed}", f"epochs={epochs}", f"backbone={backbone!r}", f"progress={progress}"]
    if markers is not None:
        args.append(f"markers={list(map(str, markers))!r}")
    args.append(f"grid={grid}")
    return f"from hyperst._demo import run_demo; run_demo({', '.join(args)})   # in: {line}"


def _index(out: Path, metrics: dict[str, Any], figures: list[tuple[str, str]], command: str) -> Path:
    """``index.html`` of the demo: the metrics table, the trust numbers, every figure with its caption."""
    import pandas as pd

    from hyperst.tl._benchmark_report import write_html_report

    scores = pd.DataFrame({"HyperST": metrics["model"], "mean predictor": metrics["mean_predictor"]}).T
    trust = {k: v for k, v in metrics["trust"].items() if k != "domain_messages"}
    run = {"training spots": metrics["n_train_spots"], "held-out spots": metrics["n_test_spots"],
           "genes": metrics["n_genes"], "epochs (best)": f"{metrics['epochs']} ({metrics['best_epoch']})",
           **{f"seconds: {k}": v for k, v in metrics["seconds"].items()}, "hyperst": metrics["hyperst_version"]}
    verdict = "beats" if metrics["beats_mean_predictor"] else "does NOT beat"
    summary = (f"{metrics['description']}. On the held-out slide HyperST {verdict} the mean predictor "
               "(lower MSE and higher PCC@10). Metrics are pooled over the held-out spots; PCC@K is the mean "
               "Pearson r of the K best-predicted genes.")
    messages = metrics["trust"].get("domain_messages") or []
    return write_html_report(
        out, title="hyperst demo", command=command, summary=summary,
        tables=[("Held-out slide: HyperST against the mean predictor (training mean everywhere).", scores),
                ("How far to trust the prediction: ensemble members, 90 % interval coverage and width, Spearman "
                 "of uncertainty with error, fraction of spots out of the training domain.", trust),
                ("Run: data sizes, epochs and seconds per step.", run)],
        figures=figures,
        details={"domain messages": messages} if messages else None,
        files=["metrics.json", "per_gene.csv", "model/hyperst.json"],
    )
