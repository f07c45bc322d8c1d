"""Domain-shift benchmark on Her2ST: held-out sections as other scanners, resolutions, stains and exports show them.

Leave-one-section-out over C2–C6 (validation section inside the training sections, as in
:func:`hyperst.tl.benchmark`). Every method trains on the full-resolution training sections (optionally with
the augmented views of :data:`hyperst.pp.DEFAULT_VIEWS`) and is scored on the held-out section clean and after
:func:`hyperst.datasets.degrade`: 1, 2 and 3.2 µm/px (resampled back by the normal crop path), JPEG q = 30, a
HED stain shift, and the background outside the tissue painted black or white. Targets are log2(1 + counts)
(raw) and log2(1 + counts per 10k) (library-size normalised). PCC@50 and MSE per shift and method, next to the
mean predictor's MSE.

Usage, from the repository root::

    python benchmarks/shift.py                    # the documented run (features cached in benchmarks/out/shift)
    python benchmarks/shift.py --features-only    # compute and cache the features only
    python benchmarks/shift.py --backbone lite1   # EfficientNet-Lite1 features (needs its weight package)

The features of every section under every degradation are computed once per backbone by
``hst.pp.image_features(..., views=...)`` and cached in ``<out>/features_<backbone>.h5ad``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
#: The shifts of the held-out section (degrade options).
SHIFTS: dict[str, dict] = {
    "1 µm/px": {"pixel_size": 1.0},
    "2 µm/px": {"pixel_size": 2.0},
    "3.2 µm/px": {"pixel_size": 3.2},
    "JPEG q=30": {"jpeg_quality": 30},
    "HED stain 0.3": {"stain": 0.3, "seed": 0},
    "black background": {"background": "black"},
    "white background": {"background": "white"},
}
#: Feature extractors: the backbone spec of each (pool="stages": the default features are its last columns).
BACKBONES: dict[str, dict] = {
    "lite0": {"name": "efficientnet_lite0", "pool": "stages"},
    "lite1": {"name": "efficientnet_lite1", "pool": "stages"},
    "lite2": {"name": "efficientnet_lite2", "pool": "stages"},
    "lite0_tta": {"name": "efficientnet_lite0", "pool": "stages", "tta": "dihedral"},
}


def degradations(shifts: list[str] | None = None) -> dict[str, dict]:
    """Every degradation the run needs, once: the test shifts and the training views (shared where equal).

    ``shifts``: only these test shifts and no training views (a cheaper feature set for comparing backbones).
    """
    import hyperst as hst

    out: dict[str, dict] = {}
    seen: dict[str, str] = {}
    items = [*SHIFTS.items(), *hst.pp.DEFAULT_VIEWS.items()] if shifts is None else \
        [(n, SHIFTS[n]) for n in shifts]
    for name, opts in items:
        key = json.dumps(opts, sort_keys=True)
        if key not in seen:
            seen[key] = name
            out[name] = dict(opts)
    return out


def view_name(opts: dict, table) -> str:
    """The name under which the cached table holds the features of a degradation."""
    from hyperst.pp._views import recorded_views

    key = json.dumps(opts, sort_keys=True)
    for name, o in recorded_views(table).items():
        if json.dumps(dict(o), sort_keys=True) == key:
            return name
    raise KeyError(opts)


def features(data: Path, out: Path, backbone: str, threads: int, shifts: list[str] | None = None):
    """Her2ST with clean and degraded features of every section (cached)."""
    import anndata as ad
    import torch

    import hyperst as hst

    cache = out / (f"features_{backbone}.h5ad" if shifts is None else
                   f"features_{backbone}_{'_'.join(s.split()[0] for s in shifts) or 'clean'}.h5ad")
    if cache.is_file():
        print(f"[shift] features from {cache}", flush=True)
        return ad.read_h5ad(cache)
    torch.set_num_threads(threads)
    views = degradations(shifts)
    tables = []
    t0 = time.perf_counter()
    for sec in SECTIONS:
        t1 = time.perf_counter()
        sd = hst.datasets.her2st(data, sections=[sec])
        tab = hst.pp.image_features(sd, backbone=BACKBONES[backbone], views=views, progress=False)
        tables.append(tab)
        print(f"[shift] {sec}: {tab.n_obs} spots × {1 + len(views)} images in {time.perf_counter() - t1:.0f} s",
              flush=True)
    table = ad.concat(tables, merge="first", uns_merge="first")
    table.uns["hyperst"]["features"]["samples"] = {}  # per-slide records of the first section only: drop
    table.uns["benchmark_seconds"] = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    table.write_h5ad(cache)
    print(f"[shift] features of {len(SECTIONS)} sections in {time.perf_counter() - t0:.0f} s → {cache}", flush=True)
    return table


#: What a configuration varies: the feature columns, the augmented views in training, the methods.
CONFIGS: dict[str, dict] = {
    "today": {"features": "default", "views": False},
    "views": {"features": "default", "views": True},
    "stages": {"features": "stages", "views": False},
    "stages+views": {"features": "stages", "views": True},
}
METHODS = ["hyperst", "ridge_niche", "mean"]
#: HyperST settings of the run (the CPU-sized configuration of the Her2ST benchmark)
FIT = {"config": {"emb_dim": 256}, "lr": 1e-3, "batch_size": 64, "max_epochs": 100}


def configured(table, features: str):
    """The table with the clean and view features of one feature set (``"stages"``: all columns; ``"default"``:
    the backbone's own pooled output, the last columns of the stage-pooled features)."""
    import anndata as ad

    from hyperst._constants import Key

    width = table.obsm[Key.OBSM_FEATURES_SPOT].shape[1]
    cols = slice(0, width) if features == "stages" else slice(width - 1280, width)
    out = ad.AnnData(X=table.X, obs=table.obs.copy(), var=table.var.copy(), uns={"hyperst": dict(table.uns["hyperst"])},
                     obsm={"spatial": table.obsm["spatial"]})
    for key in (Key.OBSM_FEATURES_SPOT, Key.OBSM_FEATURES_NICHE):
        out.obsm[key] = np.ascontiguousarray(table.obsm[key][:, cols])
    for key in (Key.OBSM_VIEWS_SPOT, Key.OBSM_VIEWS_NICHE):
        if key in table.obsm:  # feature sets of the clean sections only have no views
            out.obsm[key] = np.ascontiguousarray(table.obsm[key][:, :, cols])
    return out


def shift_tables(table) -> dict:
    """One feature table per test shift: the held-out features of every section as that shift shows them."""
    import anndata as ad

    from hyperst._constants import Key
    from hyperst.pp._views import recorded_views

    names = list(recorded_views(table))
    out = {}
    for name, opts in SHIFTS.items():
        try:
            k = names.index(view_name(opts, table))
        except KeyError:  # a feature set computed for some of the shifts only
            continue
        sh = ad.AnnData(obs=table.obs[["sample"]].copy())
        sh.obsm[Key.OBSM_FEATURES_SPOT] = table.obsm[Key.OBSM_VIEWS_SPOT][:, k]
        sh.obsm[Key.OBSM_FEATURES_NICHE] = table.obsm[Key.OBSM_VIEWS_NICHE][:, k]
        out[name] = sh
    return out


def run(table, config: str, *, normalize: bool, seeds: list[int], methods: list[str], out: Path):
    """One benchmark run (all folds and seeds) of a configuration; saved under ``out``."""
    import hyperst as hst
    from hyperst.tl import BenchmarkResult

    target = out / f"{config}_{'normalized' if normalize else 'raw'}"
    if (target / "meta.json").is_file():
        res = BenchmarkResult.load(target)
        if sorted(res.meta["methods"]) == sorted(methods) and res.meta["seeds"] == seeds:
            print(f"[shift] {target.name}: from the saved result", flush=True)
            return res
    cfg = CONFIGS[config]
    t = configured(table, cfg["features"])
    views = [view_name(o, table) for o in hst.pp.DEFAULT_VIEWS.values()] if cfg["views"] else False
    t0 = time.perf_counter()
    res = hst.tl.benchmark(t, methods=methods, seeds=seeds, gene_sets={"mean250": {"flavor": "mean", "n_top": 250}},
                           normalize=normalize, fit_kwargs=FIT, shifts=shift_tables(t), views=views,
                           progress=False)
    res.meta["config"] = {"name": config, **cfg, "backbone": table.uns["hyperst"]["features"]["backbone"]}
    res.save(target, overwrite=True, html=False)
    print(f"[shift] {target.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    for metric in ("PCC@50", "MSE"):
        table = res.shift_summary(metric) if res.shift_scores is not None else res.summary([metric])
        print(table.round(3).to_string(), flush=True)
    return res


BEGIN, END = "<!-- shift-benchmark:begin -->", "<!-- shift-benchmark:end -->"
DOCS = ROOT / "docs" / "benchmarks.md"
LABEL = {"today": "previous default (last-stage features)", "views": "last-stage features + views",
         "stages": "stage features (new default)", "stages+views": "stage features + views"}
#: the same without naming a default (the feature-extractor table: every backbone with each pooling)
SHORT = {"today": "last-stage features", "views": "last-stage features + views", "stages": "stage features",
         "stages+views": "stage features + views"}


def _cell(value: float, clean: float | None, digits: int = 3) -> str:
    if clean is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({value - clean:+.{digits}f})"


def shift_markdown(results: dict, metric: str, methods: list[str]) -> str:
    """One row per configuration × method: the clean score, then each shift with its difference from clean."""
    first = next(iter(results.values()))
    shifts = [c for c in first.shift_summary(metric).columns if c != "clean"]
    head = "| configuration | method | clean | " + " | ".join(shifts) + " | worst Δ |"
    lines = [head, "|---|---|---:|" + "---:|" * (len(shifts) + 1)]
    for config, res in results.items():
        table = res.shift_summary(metric)
        for method in methods:
            if method not in table.index:
                continue
            row = table.loc[method]
            clean = float(row["clean"])
            deltas = [float(row[sh]) - clean for sh in shifts]
            worst = min(deltas) if metric.startswith("PCC") else max(deltas)
            cells = [_cell(float(row[sh]), clean if method != "mean" else None) for sh in shifts]
            lines.append(f"| {LABEL.get(config, config)} | {method} | {clean:.3f} | " + " | ".join(cells)
                         + f" | {'–' if method == 'mean' else f'{worst:+.3f}'} |")
    return "\n".join(lines)


def compare_line(res, metric: str = "PCC@50") -> str:
    """HyperST against ridge on the same features, paired over folds (clean held-out sections)."""
    cmp = res.compare("hyperst", metric=metric).reset_index()
    row = cmp[cmp["method"] == "ridge_niche"].iloc[0]
    return (f"ridge_niche − hyperst = {row['mean_diff']:+.3f} (sd over folds {row['sd_diff']:.3f}, paired t p = "
            f"{row['p']:.2f}, ridge better on {int(row['wins'])}/{int(row['n_folds'])} folds; seed-to-seed sd "
            f"{row['seed_sd']:.3f})")


def variants_markdown(out: Path) -> str:
    """The feature-extractor comparison (one seed): clean and the shifts each feature set was computed for."""
    from hyperst.tl import BenchmarkResult

    rows = []
    for folder, backbone in (("lite0", "EfficientNet-Lite0"), ("lite1_subset", "EfficientNet-Lite1"),
                             ("lite2_subset", "EfficientNet-Lite2"), ("lite0_tta_subset", "Lite0 + dihedral TTA")):
        for config in ("today", "stages", "views", "stages+views"):
            for target in ("raw", "normalized"):
                path = out / folder / f"{config}_{target}"
                if not (path / "meta.json").is_file():
                    continue
                res = BenchmarkResult.load(path)
                sub = res.scores[(res.scores["seed"] == 0) & (res.scores["scope"] == "pooled")
                                 & (res.scores["metric"] == "PCC@50")]
                clean = sub.groupby("method")["value"].mean()
                worst = None
                if res.shift_scores is not None:
                    sh = res.shift_scores
                    sh = sh[(sh["seed"] == 0) & (sh["scope"] == "pooled") & (sh["metric"] == "PCC@50")]
                    worst = (sh[sh["method"] == "hyperst"].groupby("shift")["value"].mean() - clean["hyperst"]).min()
                    have = set(sh["shift"])
                    names = f"all {len(SHIFTS)}" if have == set(SHIFTS) else ", ".join(sorted(have))
                rows.append(f"| {backbone} | {SHORT.get(config, config)} | {target} | {clean['hyperst']:.3f} | "
                            f"{clean['ridge_niche']:.3f} | "
                            + ("–" if worst is None else f"{worst:+.3f} ({names})") + " |")
    head = ["| backbone | features, training | targets | HyperST PCC@50 | ridge_niche | HyperST worst Δ (shifts run) |",
            "|---|---|---|---:|---:|---|"]
    return "\n".join(head + rows)


def report(out: Path, command: str) -> str:
    """The generated block of docs/benchmarks.md."""
    from hyperst.tl import BenchmarkResult

    base = out / "lite0"
    blocks = [f"Command: `{command}`", ""]
    for target, title in (("normalized", "library-size normalised targets (log2(1 + counts per 10k))"),
                          ("raw", "raw targets (log2(1 + counts))")):
        results = {c: BenchmarkResult.load(base / f"{c}_{target}") for c in ("today", "stages", "stages+views")
                   if (base / f"{c}_{target}" / "meta.json").is_file()
                   and len(BenchmarkResult.load(base / f"{c}_{target}").meta["seeds"]) > 1}
        if not results:
            continue
        first = next(iter(results.values()))
        seeds = first.meta["seeds"]
        blocks += [f"**{title[0].upper() + title[1:]}**, mean over 5 folds × {len(seeds)} seeds:", "",
                   "PCC@50 (Δ: shifted − clean):", "", shift_markdown(results, "PCC@50", ["hyperst", "ridge_niche"]),
                   "", "MSE (lower is better; the mean predictor's MSE is the bar to beat):", "",
                   shift_markdown(results, "MSE", ["hyperst", "ridge_niche", "mean"]), ""]
        for config, res in results.items():
            blocks.append(f"- {LABEL[config]}, clean: {compare_line(res)}.")
        blocks.append("")
    variants = variants_markdown(out)
    blocks += ["**Feature extractors and training options** (seed 0 only, 5 folds; the worst HyperST Δ over the "
               "shifts that feature set was computed for):", "", variants, ""]
    return "\n".join(blocks)


FIGURE = ROOT / "docs" / "_static" / "benchmarks" / "shift_pcc50.png"


def figure(out: Path, path: Path = FIGURE) -> Path:
    """HyperST's PCC@50 clean and under each shift, one line per configuration, raw and normalised targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hyperst.tl import BenchmarkResult

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, target in zip(axes, ("raw", "normalized"), strict=True):
        for config, style in (("today", "o--"), ("stages", "s-"), ("stages+views", "D-")):
            folder = out / "lite0" / f"{config}_{target}"
            if not (folder / "meta.json").is_file():
                continue
            res = BenchmarkResult.load(folder)
            row = res.shift_summary("PCC@50").loc["hyperst"]
            n = len(res.meta["seeds"])
            ax.plot(range(len(row)), row.to_numpy(), style, alpha=0.85, lw=1,
                    label=f"{LABEL[config]} ({n} seed{'s' if n > 1 else ''})")
            ax.set_xticks(range(len(row)), list(row.index), rotation=35, ha="right")
        ax.set_title(f"HyperST on held-out Her2ST sections, {target} targets", fontsize=10)
        ax.set_ylabel("PCC@50 (mean over folds × seeds)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_docs(block: str) -> None:
    text = DOCS.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{DOCS} has no {BEGIN} marker")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def depth_check(table, seeds: list[int]) -> str:
    """Leave one section out: Pearson r of the predicted and measured log2 depth of the held-out section."""
    import hyperst as hst
    from hyperst._constants import Key

    t = configured(table, "stages")
    rows = []
    for i, held in enumerate(SECTIONS):
        val = SECTIONS[(i + 1) % len(SECTIONS)]
        train, test = t[t.obs["sample"] != held].copy(), t[t.obs["sample"] == held].copy()
        for seed in seeds:
            model = hst.tl.fit(train, genes=hst.pp.select_genes(train, flavor="mean", n_top=250, inplace=False),
                               normalize=True, views=False, validation=[val], n_members=1, seed=seed,
                               progress=False, **FIT)
            pred = hst.tl.predict(model, test, progress=False)
            depth = np.log2(1 + np.asarray(test.X.sum(1)).ravel())
            rows.append(float(np.corrcoef(pred.obs[Key.OBS_LOG2_DEPTH], depth)[0, 1]))
            print(f"[shift] depth {held} seed {seed}: r = {rows[-1]:.3f}", flush=True)
    return (f"predicted against measured log2 depth of the held-out section: Pearson r = {np.mean(rows):.2f} "
            f"(range {min(rows):.2f}–{max(rows):.2f} over {len(SECTIONS)} folds × {len(seeds)} seed(s))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("HYPERST_HER2ST", str(ROOT.parent / "shared/data/her2st")))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "shift"))
    parser.add_argument("--backbone", default="lite0", choices=sorted(BACKBONES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--features-only", action="store_true")
    parser.add_argument("--shifts", nargs="*", default=None, choices=sorted(SHIFTS),
                        help="compute only these test shifts and no training views (for comparing backbones)")
    parser.add_argument("--configs", nargs="+", default=["today", "stages+views"], choices=sorted(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--targets", nargs="+", default=["raw", "normalized"], choices=["raw", "normalized"])
    parser.add_argument("--docs", action="store_true", help="write the generated block of docs/benchmarks.md")
    parser.add_argument("--depth", action="store_true", help="only check the predicted depth (normalize=True)")
    parser.add_argument("--report-only", action="store_true", help="only print (and with --docs write) the report")
    args = parser.parse_args()
    if args.report_only:
        block = report(Path(args.out), "python benchmarks/shift.py")
        print(block)
        if args.docs:
            write_docs(block)
            figure(Path(args.out))
        return
    if not Path(args.data).is_dir():
        sys.exit(f"Her2ST not found at {args.data} (set --data or HYPERST_HER2ST)")
    table = features(Path(args.data), Path(args.out), args.backbone, args.threads, args.shifts)
    if args.features_only:
        return
    if args.depth:
        print(depth_check(table, args.seeds[:1]), flush=True)
        return
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out) / (args.backbone if args.shifts is None else f"{args.backbone}_subset")
    t0 = time.perf_counter()
    for config in args.configs:
        for target in args.targets:
            run(table, config, normalize=target == "normalized", seeds=args.seeds, methods=args.methods, out=out)
    print(f"[shift] all runs in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.backbone == "lite0" and args.shifts is None:
        block = report(Path(args.out), "python " + " ".join(sys.argv))
        print(block, flush=True)
        if args.docs:
            write_docs(block)
            figure(Path(args.out))


if __name__ == "__main__":
    main()
