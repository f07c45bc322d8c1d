"""``hst.tl.benchmark``: HyperST, its ablations and the field's baselines under one cross-validation protocol.

Every method sees the same folds, seeds, genes, frozen image features and training spots; every
hyperparameter (early stopping, ridge α, retrieval k) is chosen on a *validation group inside the training
groups*, never on the held-out group. The result holds tidy scores and timings and knows how to summarise,
compare (paired over folds), plot, save and load itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst._utils import jsonable
from hyperst.tl._benchmark_methods import BENCHMARK_METHODS, FEATURE_BASELINES, BenchmarkMethod, retrieval_predict
from hyperst.tl._benchmark_pool import Job, JobResult, Shared, run_jobs
from hyperst.tl._benchmark_report import BenchmarkResult
from hyperst.tl._utils import FOLD_SEP, feature_table, fit_table, fold_genes, group_folds

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["BENCHMARK_METHODS", "DEFAULT_FIT_KWARGS", "DEFAULT_GENE_SETS", "BenchmarkMethod", "BenchmarkResult",
           "benchmark"]

#: Default gene sets: the TRIPLEX convention (top 250 by mean) and the reference's HMHVG (METHOD §1).
DEFAULT_GENE_SETS: dict[str, dict[str, Any]] = {
    "mean250": {"flavor": "mean", "n_top": 250},
    "hmhvg": {"flavor": "hmhvg", "n_top": 300},
}
#: ``fit`` options of the CPU-sized configuration shared by every HyperST variant.
DEFAULT_FIT_KWARGS: dict[str, Any] = {"config": {"emb_dim": 256}, "lr": 1e-3, "batch_size": 64, "max_epochs": 100}
_RESERVED_FIT = ("genes", "seed", "preset", "validation", "table_key", "progress", "normalize", "mode", "views")


# ---------------------------------------------------------------------------------------------- one job
def _run_job(job: Job, shared: Shared) -> JobResult:
    """Fit and score every method on one (gene set, fold, seed)."""
    import hyperst.tl._fit as fit_module
    from hyperst.pp._genes import targets
    from hyperst.pp._niches import niche_targets
    from hyperst.tl._evaluate import evaluate, pcc_at_k, pearson_per_gene, spearman

    table = shared.table
    labels = table.obs[shared.groupby].astype(str).to_numpy()
    test = np.isin(labels, job.test_groups)
    val = np.isin(labels, job.val_groups)
    fitm = np.isin(labels, job.fit_groups)
    trval = fitm | val
    genes = job.genes
    y_all = targets(table, genes, layer=shared.layer, normalize=shared.normalize).astype(np.float32)
    xs_all = np.asarray(table.obsm[shared.spot_key], dtype=np.float32)
    xn_all = np.asarray(table.obsm[shared.niche_key], dtype=np.float32) if shared.niche_key in table.obsm else None
    ytr, yva, yte = y_all[fitm], y_all[val], y_all[test]
    groups_all = table.obs[shared.sample_key].astype(str).to_numpy() if shared.sample_key in table.obs else None

    def feats(mask: np.ndarray, niche: bool, xs: np.ndarray = xs_all, xn: np.ndarray | None = xn_all) -> np.ndarray:
        if not niche:
            return xs[mask]
        if xn is None:
            raise ValueError(f"Method needs niche features in `.obsm[{shared.niche_key!r}]`.")
        return np.concatenate([xs[mask], xn[mask]], axis=1)

    # the held-out spots as the shifted slides show them: rows covered by each shift's features
    shifted = {name: (xs, xn, test & covered) for name, (xs, xn, covered) in shared.shifts.items()
               if (test & covered).any()}  # a shift without this fold's held-out spots is not scored here
    views = _view_arrays(table, shared) if shared.views else None

    def fit_rows(niche: bool) -> tuple[np.ndarray, np.ndarray]:
        """Features and targets of the fitting spots, with their augmented views as extra rows."""
        if views is None:
            return feats(fitm, niche), ytr
        vs, vn = views
        xs = [feats(fitm, niche)] + [feats(fitm, niche, vs[:, k], None if vn is None else vn[:, k])
                                     for k in range(vs.shape[1])]
        return np.concatenate(xs), np.tile(ytr, (len(xs), 1))

    # fit sees the training + validation groups and holds out the validation group for early stopping
    train = fit_table(table, trval, genes, normalize=shared.normalize)
    view_option: bool | list[str] = list(shared.views) if shared.views else False
    models: dict[str, tuple[Any, float]] = {}

    def hyperst_model(preset: str) -> tuple[Any, float]:
        if preset not in models:
            t0 = time.perf_counter()
            model = fit_module.fit(
                train, genes=genes, preset=preset, seed=job.seed, validation=list(job.val_groups),
                normalize=shared.normalize, views=view_option, progress=False, **shared.fit_kwargs,
            )
            models[preset] = (model, time.perf_counter() - t0)
        return models[preset]

    rows: list[dict] = []
    shift_rows: list[dict] = []
    timings: list[dict] = []
    record: dict[str, Any] = {"gene_set": job.gene_set, "fold": job.fold, "seed": job.seed,
                              "test_groups": job.test_groups, "val_groups": job.val_groups,
                              "fit_groups": job.fit_groups, "n_genes": len(genes), "n_fit": int(fitm.sum()),
                              "n_val": int(val.sum()), "n_test": int(test.sum()), "methods": {}}
    for method in shared.methods:
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        fit_seconds = predict_seconds = 0.0
        # "clean" and each shift → (prediction, extra evaluate arguments: intervals, uncertainty)
        preds: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        if method.kind in FEATURE_BASELINES:  # fit and predict on the feature arrays, every test set at once
            tests = {"clean": feats(test, method.niche), **{n: feats(m, method.niche, xs, xn)
                                                            for n, (xs, xn, m) in shifted.items()}}
            xfit, yfit = fit_rows(method.niche)
            pred, info = FEATURE_BASELINES[method.kind](xfit, yfit, feats(val, method.niche), yva,
                                                        np.concatenate(list(tests.values())), job.seed)
            bounds = np.cumsum([0, *(len(x) for x in tests.values())])
            preds = {n: (pred[a:b], {}) for n, a, b in zip(tests, bounds[:-1], bounds[1:], strict=True)}
            fit_seconds = time.perf_counter() - t0
        elif method.kind == "hyperst":
            model, fit_seconds = hyperst_model(str(method.preset))
            t1 = time.perf_counter()
            for n, (xs, xn, m) in {"clean": (xs_all, xn_all, test), **shifted}.items():
                preds[n] = (model.predict_features(xs[m], None if xn is None else xn[m])[0], {})
            predict_seconds = time.perf_counter() - t1
            tr = model.training
            info = {"epochs": tr.get("epochs"), "best_epoch": tr.get("best_epoch"),
                    "best_val_loss": tr.get("best_val_loss")}
        elif method.kind == "ensemble":
            t0 = time.perf_counter()
            groups = sorted(set(job.fit_groups) | set(job.val_groups))
            model = fit_module.fit(
                train, genes=genes, preset=str(method.preset), seed=job.seed, validation="slide",
                n_members=min(5, len(groups)), normalize=shared.normalize, views=view_option, progress=False,
                **shared.fit_kwargs,
            )
            fit_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            for n, (xs, xn, m) in {"clean": (xs_all, xn_all, test), **shifted}.items():
                out = model.predict(_test_table(table, m, xs, xn, shared), progress=False)
                # a feature table holds no counts: the prediction is in .X
                preds[n] = (out.X, {"intervals": (out.layers[Key.LAYER_LOWER], out.layers[Key.LAYER_UPPER]),
                                    "uncertainty": out.obs[Key.OBS_UNCERTAINTY].to_numpy()})
                if n == "clean":
                    members, _ = model.predict_members(xs_all[test], None if xn_all is None else xn_all[test])
                    info = {"member_pcc50": [pcc_at_k(pearson_per_gene(yte, p), 50) for p in members],
                            "member_validation": [m["validation"] for m in model.training["members"]],
                            "ood_fraction": float(out.obs[Key.OBS_OOD].mean()),
                            "spearman_radius_mae": spearman(out.obs[Key.OBS_RADIUS].to_numpy(),
                                                            np.abs(yte - np.asarray(out.X)).mean(1))}
                else:
                    info.setdefault("shift_ood_fraction", {})[n] = float(out.obs[Key.OBS_OOD].mean())
            predict_seconds = time.perf_counter() - t1
        elif method.kind == "retrieval":
            reused = str(method.preset) in models
            model, base_seconds = hyperst_model(str(method.preset))
            t1 = time.perf_counter()
            yn = ytr
            if model.config.has_niche:  # niche expression of the fitting spots (the model's gene-niche input)
                yn = niche_targets(table[fitm].copy(), genes, layer=shared.layer,
                                   library_key=shared.sample_key if shared.sample_key in table.obs.columns else None)
            nsl = None if xn_all is None else xn_all
            queries = {n: (xs[m], None if xn is None else xn[m])
                       for n, (xs, xn, m) in {"test": (xs_all, nsl, test), **shifted}.items()}
            got, info = retrieval_predict(
                model, xs_all[fitm], None if nsl is None else nsl[fitm], ytr, yn,
                {"val": (xs_all[val], None if nsl is None else nsl[val]), **queries}, yva,
            )
            preds = {("clean" if n == "test" else n): (p, {}) for n, p in got.items()}
            # the cost of running this method alone: its network's fit plus the retrieval
            fit_seconds = base_seconds + (time.perf_counter() - t1)
            info["reused_fit"] = reused
        else:  # pragma: no cover - every registered kind is handled above
            raise ValueError(method.kind)
        for n, (pred, extra) in preds.items():
            mask = test if n == "clean" else shifted[n][2]
            groups = None if groups_all is None else groups_all[mask]
            ev = evaluate(y_all[mask], np.asarray(pred, dtype=np.float32), truth_transform="none", groups=groups,
                          ks=shared.ks, **extra)
            target = rows if n == "clean" else shift_rows
            for scope, metric, value in ev.summary[["scope", "metric", "value"]].itertuples(index=False):
                row = {"gene_set": job.gene_set, "method": method.name, "fold": job.fold, "seed": job.seed,
                       "scope": str(scope), "metric": str(metric), "value": float(value)}
                target.append(row if n == "clean" else {"shift": n, **row})
        timings.append({"gene_set": job.gene_set, "method": method.name, "fold": job.fold, "seed": job.seed,
                        "fit_s": fit_seconds, "predict_s": predict_seconds, "total_s": fit_seconds + predict_seconds})
        record["methods"][method.name] = jsonable(info)
    record["shift_scores"] = shift_rows
    return rows, timings, record



def _view_arrays(table: AnnData, shared: Shared) -> tuple[np.ndarray, np.ndarray | None]:
    """The spot (and niche) features of the views ``shared.views`` of every row: ``(n, V, D)`` each."""
    from hyperst.pp._views import recorded_views

    names = list(recorded_views(table))
    pick = [names.index(v) for v in shared.views or []]
    vs = np.asarray(table.obsm[Key.OBSM_VIEWS_SPOT], dtype=np.float32)[:, pick]
    vn = np.asarray(table.obsm[Key.OBSM_VIEWS_NICHE], dtype=np.float32)[:, pick] \
        if Key.OBSM_VIEWS_NICHE in table.obsm else None
    return vs, vn


def _test_table(table: AnnData, test: np.ndarray, xs: np.ndarray, xn: np.ndarray | None, shared: Shared) -> AnnData:
    """The held-out spots as a feature table for :func:`hyperst.tl.predict` (features, sample, pixel metadata)."""
    import anndata as ad

    out = ad.AnnData(obs=table.obs.loc[test, [c for c in (shared.sample_key,) if c in table.obs]].copy())
    out.obsm[Key.OBSM_FEATURES_SPOT] = xs[test]
    if xn is not None:
        out.obsm[Key.OBSM_FEATURES_NICHE] = xn[test]
    if shared.sample_key != Key.OBS_SAMPLE and shared.sample_key in out.obs:
        out.obs[Key.OBS_SAMPLE] = out.obs[shared.sample_key]
    out.uns[Key.UNS] = {k: v for k, v in table.uns.get(Key.UNS, {}).items() if k in (Key.UNS_FEATURES, Key.UNS_COLOUR)}
    return out


# ---------------------------------------------------------------------------------------------- API
def _validation_groups(train_groups: list[str], held: list[str], all_groups: list[str], n_val: int) -> list[str]:
    """The ``n_val`` training groups that follow the held-out group(s) in cyclic order of ``all_groups``."""
    start = max(all_groups.index(g) for g in held)
    cyc = [all_groups[(start + i) % len(all_groups)] for i in range(1, len(all_groups))]
    return [g for g in cyc if g in train_groups][:n_val]


def benchmark(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    methods: Sequence[str] | None = None,
    groupby: str = Key.OBS_SAMPLE,
    folds: Sequence[Sequence[str] | str] | None = None,
    validation: Mapping[str, Sequence[str]] | int = 1,
    gene_sets: Mapping[str, Mapping[str, Any] | Sequence[str]] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    normalize: bool = False,
    ks: Sequence[int] = (10, 50, 200),
    fit_kwargs: Mapping[str, Any] | None = None,
    sample_key: str = Key.OBS_SAMPLE,
    spot_key: str = Key.OBSM_FEATURES_SPOT,
    niche_key: str = Key.OBSM_FEATURES_NICHE,
    layer: str | None = None,
    table_key: str | None = None,
    shifts: Mapping[str, AnnData] | None = None,
    views: bool | Sequence[str] = False,
    n_jobs: int = 1,
    threads_per_job: int | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """Benchmark HyperST, its ablations and baselines by cross-validation over groups (slides, patients).

    For every fold (by default leave-one-group-out over ``.obs[groupby]``), every gene set and every seed,
    each method is trained on the same spots and scored on the held-out group with
    :func:`hyperst.tl.evaluate`. Nothing about the held-out group is used for training or model choice:

    - genes are selected per fold with :func:`hyperst.pp.select_genes` on the training groups only;
    - one training group per fold (``validation``) is the **validation group**: HyperST variants and the MLP
      early-stop on it (best weights restored), the ridge α and the retrieval k are chosen on it (MSE), and
      no method trains on it, so all methods fit on exactly the same spots;
    - image features are those in ``.obsm`` (a frozen backbone uses no labels, so computing them once for
      all folds leaks nothing).

    Parameters
    ----------
    data
        An AnnData with image features in ``.obsm[spot_key]`` / ``.obsm[niche_key]`` (see
        :func:`hyperst.pp.image_features`) and raw counts, a SpatialData whose table has them, or a list of
        these (tables are concatenated on shared genes). Not modified.
    methods
        Names from :data:`BENCHMARK_METHODS`; default: all of them.
    groupby
        ``.obs`` column whose groups are held out together (``"sample"``: slides; e.g. ``"patient"``).
    folds
        Explicit folds (each a group name or a list of names). ``None``: leave-one-group-out.
    validation
        Number of validation groups per fold, taken from the training groups in cyclic order after the
        held-out group (so that every group serves as validation once in leave-one-out), or a mapping from
        fold name (held-out groups joined by ``"+"``) to its validation group names.
    gene_sets
        ``name → select_genes options`` (e.g. ``{"flavor": "mean", "n_top": 250}``; selected per fold on the
        training groups) or ``name → list of genes`` (fixed). Default: :data:`DEFAULT_GENE_SETS` (top 250 by
        mean, and HMHVG).
    seeds
        Seeds; every method is run once per fold, gene set and seed.
    normalize
        Library-size normalised targets (log2(1 + counts per 10k, library over all genes)) instead of
        log2(1 + raw counts), for every method.
    ks
        The K of PCC@K.
    fit_kwargs
        Options of :func:`hyperst.tl.fit` shared by every HyperST variant (default
        :data:`DEFAULT_FIT_KWARGS`: embedding 256, lr 1e-3, batch 64, ≤ 100 epochs). ``genes``, ``seed``,
        ``preset``, ``validation``, ``normalize`` and ``progress`` are set here.
    sample_key
        ``.obs`` column naming each spot's slide (per-slide scores).
    spot_key, niche_key
        ``.obsm`` keys of the spot and niche image features.
    layer
        Layer with raw counts (default ``.X``).
    table_key
        Table of the SpatialData in ``data``.
    shifts
        Domain-shifted copies of the held-out spots: ``name → AnnData`` whose ``.obsm[spot_key]`` /
        ``.obsm[niche_key]`` hold the features of (some of) the same spots (matched by ``obs_names``) computed
        on a degraded image (:func:`hyperst.datasets.degrade`: coarser, recompressed, stain-shifted, painted
        background). Every method is trained once per job as usual and also scored on each shifted copy of
        its held-out spots, into :attr:`BenchmarkResult.shift_scores` (:meth:`BenchmarkResult.shift_summary`).
    views
        Train every method on the augmented views of ``.obsm["hyperst_features_spot_views"]`` too
        (``hst.pp.image_features(..., views=...)``): HyperST draws one view per spot and epoch
        (``fit(views=...)``), the feature baselines get the views as extra training rows. ``True``: every view;
        a list of names: those; ``False`` (default): clean features only, whatever the table holds.
    n_jobs
        Worker processes (one job = one fold × gene set × seed, all methods). With the same
        ``threads_per_job`` the results do not depend on it (the Her2ST run gave identical scores twice).
    threads_per_job
        Torch threads per job (default: unchanged with ``n_jobs=1``, 1 otherwise).
    progress
        Show a progress bar over jobs.

    Returns
    -------
    :class:`BenchmarkResult`.

    Raises
    ------
    ValueError
        Unknown methods, missing features or groups, fewer than three groups (a training fold needs a
        validation group and at least one fitting group), an empty or invalid fold, an invalid gene set,
        ``fit_kwargs`` setting an option reserved here, a shift table with unknown spots or features of another
        width, or views the table does not have.

    Examples
    --------
    >>> res = hst.tl.benchmark(table, methods=["hyperst", "ridge", "mean"], seeds=[0, 1])  # doctest: +SKIP
    >>> res.summary()  # mean ± std over folds × seeds  # doctest: +SKIP
    >>> res.compare(reference="hyperst")  # paired over folds  # doctest: +SKIP
    """
    names = list(BENCHMARK_METHODS) if methods is None else [str(m) for m in methods]
    unknown = [m for m in names if m not in BENCHMARK_METHODS]
    if unknown:
        raise ValueError(f"Unknown `methods` {unknown}; choose from {list(BENCHMARK_METHODS)}.")
    if not names:
        raise ValueError("`methods` is empty.")
    names = list(dict.fromkeys(names))
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("`seeds` is empty: pass at least one seed.")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError("`ks` must be positive integers.")
    if n_jobs < 1:
        raise ValueError(f"`n_jobs` must be at least 1, got {n_jobs}.")
    opts = dict(DEFAULT_FIT_KWARGS if fit_kwargs is None else fit_kwargs)
    clash = [k for k in _RESERVED_FIT if k in opts]
    if clash:
        raise ValueError(f"`fit_kwargs` sets {clash}, which `benchmark` sets itself; pass them as its arguments.")
    for k in ("sample_key", "layer", "spot_key", "niche_key"):
        if k in opts:
            raise ValueError(f"`fit_kwargs` sets {k!r}: pass it to `benchmark` directly.")
    opts.update(sample_key=sample_key, layer=layer, spot_key=spot_key, niche_key=niche_key)

    table = feature_table(data, table_key, groupby, spot_key)
    chosen = [BENCHMARK_METHODS[m] for m in names]
    needs_niche = [m.name for m in chosen if m.niche]
    if needs_niche and niche_key not in table.obsm:
        raise ValueError(f"Methods {needs_niche} need niche features in `.obsm[{niche_key!r}]`; none found.")
    for arr_key in (spot_key, niche_key):
        if arr_key in table.obsm and not np.isfinite(np.asarray(table.obsm[arr_key])).all():
            raise ValueError(f"`.obsm[{arr_key!r}]` contains NaN or infinite values.")
    labels = table.obs[groupby].astype(str).to_numpy()
    all_groups = [str(g) for g in pd.unique(labels)]
    fold_list = group_folds(labels, folds, groupby)
    if len(all_groups) < 3:
        raise ValueError(
            f"`.obs[{groupby!r}]` has {len(all_groups)} groups; the benchmark needs at least three (one held out, "
            "one for validation, one or more to fit on)."
        )

    shift_arrays = _shift_arrays(table, shifts, spot_key, niche_key)
    view_names = _check_views(table, views)

    gsets = dict(DEFAULT_GENE_SETS if gene_sets is None else gene_sets)
    if not gsets:
        raise ValueError("`gene_sets` is empty.")
    jobs: list[Job] = []
    for held in fold_list:
        fold = FOLD_SEP.join(held)
        train_groups = [g for g in all_groups if g not in held]
        if isinstance(validation, Mapping):
            if fold not in validation:
                raise ValueError(f"`validation` has no entry for fold {fold!r}; folds: "
                                 f"{[FOLD_SEP.join(f) for f in fold_list]}.")
            val_groups = [str(g) for g in validation[fold]]
            bad = [g for g in val_groups if g not in train_groups]
            if bad or not val_groups:
                raise ValueError(f"`validation[{fold!r}]` must name training groups of that fold "
                                 f"({train_groups}); got {val_groups}.")
        else:
            n_val = int(validation)
            if not 1 <= n_val < len(train_groups):
                raise ValueError(f"`validation` must leave at least one fitting group; fold {fold!r} has "
                                 f"{len(train_groups)} training groups.")
            val_groups = _validation_groups(train_groups, held, all_groups, n_val)
        fit_groups = [g for g in train_groups if g not in val_groups]
        train_mask = np.isin(labels, train_groups)
        for gname, spec in gsets.items():
            if isinstance(spec, Mapping):
                genes = fold_genes(table, train_mask, layer=layer, sample_key=sample_key, select=spec)
            else:
                genes = [str(g) for g in spec]
                missing = [g for g in genes if g not in table.var_names]
                if missing or not genes:
                    raise ValueError(f"Gene set {gname!r} is empty or names unknown genes, e.g. {missing[:5]}.")
            for seed in seeds:
                jobs.append(Job(gname, list(genes), fold, list(held), val_groups, fit_groups, seed))

    threads = threads_per_job if threads_per_job is not None else (None if n_jobs == 1 else 1)
    shared = Shared(table=table, groupby=groupby, sample_key=sample_key, spot_key=spot_key, niche_key=niche_key,
                    layer=layer, normalize=normalize, methods=chosen, ks=ks, fit_kwargs=opts, threads=threads,
                    shifts=shift_arrays, views=view_names)
    logger.info(f"benchmark: {len(names)} methods × {len(fold_list)} folds × {len(gsets)} gene sets × "
                f"{len(seeds)} seeds = {len(jobs)} jobs")
    t_start = time.perf_counter()
    results = run_jobs(_run_job, jobs, shared, n_jobs=n_jobs, progress=progress)
    scores = pd.DataFrame([r for res in results for r in res[0]])
    timings = pd.DataFrame([t for res in results for t in res[1]])
    shift_scores = pd.DataFrame([r for res in results for r in res[2].pop("shift_scores", [])])
    meta = {
        "methods": names,
        "descriptions": {m.name: m.description for m in chosen},
        "groups": {m.name: m.group for m in chosen},
        "groupby": groupby,
        "folds": [FOLD_SEP.join(f) for f in fold_list],
        "gene_sets": {k: (dict(v) if isinstance(v, Mapping) else "fixed list") for k, v in gsets.items()},
        "seeds": seeds,
        "normalize": normalize,
        "shifts": list(shift_arrays),
        "views": view_names or [],
        "ks": ks,
        "fit_kwargs": jsonable(opts),
        "n_jobs": n_jobs,
        "wall_seconds": time.perf_counter() - t_start,
        "jobs": [res[2] for res in results],
    }
    return BenchmarkResult(scores=scores, timings=timings, meta=meta,
                           shift_scores=shift_scores if len(shift_scores) else None)


def _shift_arrays(
    table: AnnData, shifts: Mapping[str, AnnData] | None, spot_key: str, niche_key: str
) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """Each shift's features over the rows of ``table`` (clean features where the shift has none) and its rows."""
    out: dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray]] = {}
    if shifts is None:
        return out
    if not isinstance(shifts, Mapping):
        raise TypeError("`shifts` must be a dict name → AnnData of shifted features.")
    for name, sh in shifts.items():
        if str(name) == "clean":
            raise ValueError("`shifts` may not be named 'clean': that name is the unshifted score.")
        rows = table.obs_names.get_indexer(sh.obs_names)
        if (rows < 0).any() or len(sh) == 0:
            raise ValueError(f"`shifts[{name!r}]` has {int((rows < 0).sum())} spots that `data` lacks (matched by "
                             f"obs_names), e.g. {list(sh.obs_names[rows < 0][:3])}, or none at all.")
        arrays = []
        for key in (spot_key, niche_key):
            if key not in table.obsm:
                arrays.append(None)
                continue
            if key not in sh.obsm:
                raise ValueError(f"`shifts[{name!r}]` has no `.obsm[{key!r}]` features.")
            clean = np.asarray(table.obsm[key], dtype=np.float32)
            x = np.asarray(sh.obsm[key], dtype=np.float32)
            if x.shape[1:] != clean.shape[1:] or not np.isfinite(x).all():
                raise ValueError(f"`shifts[{name!r}].obsm[{key!r}]` must be finite features of width "
                                 f"{clean.shape[1]}, got shape {x.shape}.")
            full = clean.copy()
            full[rows] = x
            arrays.append(full)
        covered = np.zeros(table.n_obs, dtype=bool)
        covered[rows] = True
        out[str(name)] = (arrays[0], arrays[1], covered)
    return out


def _check_views(table: AnnData, views: bool | Sequence[str]) -> list[str] | None:
    """The view names every method trains on (``None``: none), checked against the table's views."""
    if views is False:
        return None
    from hyperst.pp._views import recorded_views

    have = list(recorded_views(table))
    if not have or Key.OBSM_VIEWS_SPOT not in table.obsm:
        raise ValueError("`views`: the table has no augmented views; compute them with "
                         "`hst.pp.image_features(sdata, views=...)` or pass `views=False`.")
    if views is True:
        return have
    if isinstance(views, str):
        raise TypeError("`views` must be True, False or a list of view names.")
    names = [str(v) for v in views]
    missing = [v for v in names if v not in have]
    if missing or not names:
        raise ValueError(f"`views` names {missing or 'nothing'}; the table has the views {have}.")
    return names
