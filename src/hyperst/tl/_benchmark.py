"""``hst.tl.benchmark``: HyperST, its ablations and the field's baselines under one cross-validation protocol.

Every method sees the same folds, seeds, genes, frozen image features and training spots; every
hyperparameter (early stopping, ridge α, retrieval k) is chosen on a *validation group inside the training
groups*, never on the held-out group. The result holds tidy scores and timings and knows how to summarise,
compare (paired over folds), plot, save and load itself.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst._utils import jsonable

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["BENCHMARK_METHODS", "BenchmarkMethod", "BenchmarkResult", "benchmark"]

MethodKind = Literal["hyperst", "mean", "ridge", "retrieval", "mlp"]


@dataclass(frozen=True)
class BenchmarkMethod:
    """One method of :func:`benchmark`.

    Attributes
    ----------
    name
        Short name used in result tables.
    kind
        ``"hyperst"`` (:func:`hyperst.tl.fit` with ``preset``), ``"mean"`` (training mean of each gene),
        ``"ridge"`` (StandardScaler → PCA(256) → ridge, α chosen on the validation group), ``"retrieval"``
        (BLEEP-style: average expression of the k training spots whose gene embeddings are most similar to
        the query's image embedding, in the aligned space of the ``preset`` model; k chosen on validation)
        or ``"mlp"`` (a two-layer MLP on standardised features trained with MSE, early stopping on
        validation).
    group
        ``"hyperst"``, ``"ablation"`` or ``"baseline"`` (for tables and plots).
    description
        One line for reports.
    preset
        :data:`hyperst.nn.PRESETS` entry (``"hyperst"`` and ``"retrieval"`` kinds).
    niche
        Whether the ridge / MLP baselines use niche features beside spot features (spot ‖ niche).
    """

    name: str
    kind: MethodKind
    group: Literal["hyperst", "ablation", "baseline"]
    description: str
    preset: str | None = None
    niche: bool = False


def _methods() -> dict[str, BenchmarkMethod]:
    m = BenchmarkMethod
    items = [
        m("hyperst", "hyperst", "hyperst", "HyperST, reference loss weighting (½ ΣHEA, k = 0.7 / 1.2)", "hyperst"),
        m("hyperst_paper", "hyperst", "hyperst", "HyperST, the paper's loss weighting (¼ ΣHEA, k = 1)",
          "hyperst_paper"),
        m("no_image_gene_hea", "hyperst", "ablation", "without image→gene entailment", "no_image_gene_hea"),
        m("no_hea", "hyperst", "ablation", "without entailment (HEA)", "no_hea"),
        m("mse_only", "hyperst", "ablation", "without HEA and HCA (MSE only)", "mse_only"),
        m("reversed_spot_niche", "hyperst", "ablation", "spot–niche hierarchy reversed", "reversed_spot_niche"),
        m("reversed_image_gene", "hyperst", "ablation", "image–gene hierarchy reversed", "reversed_image_gene"),
        m("euclidean", "hyperst", "ablation", "Euclidean counterpart (cosine contrastive, Euclidean cones)",
          "euclidean"),
        m("meru", "hyperst", "ablation", "single level (spot only), hyperbolic: MERU-like", "meru"),
        m("clip", "hyperst", "ablation", "single level, Euclidean CLIP + MSE", "clip"),
        m("mean", "mean", "baseline", "mean predictor (training mean of each gene)"),
        m("ridge", "ridge", "baseline", "ridge on spot features (StandardScaler → PCA(256) → ridge, HEST)"),
        m("ridge_niche", "ridge", "baseline", "ridge on spot ‖ niche features", niche=True),
        m("bleep", "retrieval", "baseline", "BLEEP-style retrieval: top-k training spots in the CLIP space",
          "clip"),
        m("mlp_niche", "mlp", "baseline", "niche-aware MLP head on spot ‖ niche features, MSE, no alignment",
          niche=True),
    ]
    return {x.name: x for x in items}


#: Every method :func:`benchmark` knows, by name (HyperST variants, ablations, baselines).
BENCHMARK_METHODS: dict[str, BenchmarkMethod] = _methods()

#: Default gene sets: the TRIPLEX convention (top 250 by mean) and the reference's HMHVG (METHOD §1).
DEFAULT_GENE_SETS: dict[str, dict[str, Any]] = {
    "mean250": {"flavor": "mean", "n_top": 250},
    "hmhvg": {"flavor": "hmhvg", "n_top": 300},
}
#: ``fit`` options of the CPU-sized configuration shared by every HyperST variant.
DEFAULT_FIT_KWARGS: dict[str, Any] = {"config": {"emb_dim": 256}, "lr": 1e-3, "batch_size": 64, "max_epochs": 100}
#: Ridge α grid (chosen by validation MSE).
RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(0, 5, 11))
#: Retrieval k grid (chosen by validation MSE).
RETRIEVAL_KS: tuple[int, ...] = (1, 3, 5, 10, 20, 50, 100)
METRIC_ORDER = ("PCC@10", "PCC@50", "PCC@200", "MSE", "MAE")
_RESERVED_FIT = ("genes", "seed", "preset", "validation", "table_key", "progress", "normalize", "mode")


# ---------------------------------------------------------------------------------------------- jobs
@dataclass
class _Job:
    gene_set: str
    genes: list[str]
    fold: str
    test_groups: list[str]
    val_groups: list[str]
    fit_groups: list[str]
    seed: int


@dataclass
class _Shared:
    """What every job needs; sent once to each worker process."""

    table: AnnData
    groupby: str
    sample_key: str
    spot_key: str
    niche_key: str
    layer: str | None
    normalize: bool
    methods: list[BenchmarkMethod]
    ks: list[int]
    fit_kwargs: dict[str, Any]
    threads: int | None = None


_WORKER: dict[str, _Shared] = {}


def _init_worker(shared: _Shared) -> None:
    import torch

    if shared.threads is not None:
        torch.set_num_threads(shared.threads)
    import hyperst

    hyperst.settings.verbosity = 1  # warnings only inside workers
    _WORKER["shared"] = shared


def _run_in_worker(job: _Job) -> tuple[list[dict], list[dict], dict]:
    try:
        return _run_job(job, _WORKER["shared"])
    finally:
        _release_memory()


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS after a job.

    Each job builds and drops about ten networks and Trainers; glibc keeps the freed pages, so without the
    trim a long benchmark grows by ~0.2 GB per job although nothing stays alive.
    """
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        import contextlib
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl)
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``train`` and ``others`` scaled with a :class:`~sklearn.preprocessing.StandardScaler` fitted on ``train``."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    return [scaler.transform(x) for x in (train, *others)]


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


def _ridge(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, xte: np.ndarray, seed: int):
    """StandardScaler → PCA(256) → ridge; α by validation MSE. Returns prediction and chosen α."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    xtr, xva, xte = _standardise(xtr, xva, xte)
    n_comp = min(256, xtr.shape[0] - 1, xtr.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed, svd_solver="full").fit(xtr)
    ztr, zva, zte = (pca.transform(x) for x in (xtr, xva, xte))
    best = (np.inf, RIDGE_ALPHAS[0])
    for alpha in RIDGE_ALPHAS:
        loss = _mse(Ridge(alpha=alpha).fit(ztr, ytr).predict(zva), yva)
        if loss < best[0]:
            best = (loss, alpha)
    model = Ridge(alpha=best[1]).fit(ztr, ytr)
    return model.predict(zte).astype(np.float32), {"alpha": best[1], "val_mse": best[0]}


def _mlp(xtr, ytr, xva, yva, xte, seed: int, *, hidden: int = 512, lr: float = 1e-3, batch_size: int = 64,
         max_epochs: int = 200, patience: int = 10, dropout: float = 0.1, weight_decay: float = 0.01):
    """Two-layer MLP (Linear → GELU → Dropout → Linear) on standardised features and targets; MSE; early stopping."""
    import torch
    from torch import nn

    xtr, xva, xte = (x.astype(np.float32) for x in _standardise(xtr, xva, xte))
    # standardised targets (the network starts at the training mean); predictions are scaled back
    y_mu, y_sd = ytr.mean(0), ytr.std(0)
    y_sd = np.where(y_sd < 1e-8, 1.0, y_sd)
    ytr, yva = (ytr - y_mu) / y_sd, (yva - y_mu) / y_sd
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(xtr.shape[1], hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, ytr.shape[1])
    )
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr.astype(np.float32))
    xv, yv = torch.from_numpy(xva), torch.from_numpy(yva.astype(np.float32))
    best, best_state, best_epoch, waited = np.inf, None, 0, 0
    for epoch in range(max_epochs):
        net.train()
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(net(xv), yv))
        if val < best - 1e-6:
            best, best_epoch, waited = val, epoch, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    assert best_state is not None
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(xte)).numpy() * y_sd + y_mu
    return pred, {"best_epoch": best_epoch, "epochs": epoch + 1, "val_mse_standardised": best}


#: MLP (learning rate, dropout) grid (chosen by validation MSE).
MLP_GRID: tuple[tuple[float, float], ...] = ((1e-3, 0.1), (1e-3, 0.5), (1e-4, 0.1), (1e-4, 0.5))


def _mlp_grid(xtr, ytr, xva, yva, xte, seed: int):
    """:func:`_mlp` for every (lr, dropout) of :data:`MLP_GRID`; the one with the lowest validation MSE."""
    best = None
    for lr, dropout in MLP_GRID:
        pred, info = _mlp(xtr, ytr, xva, yva, xte, seed, lr=lr, dropout=dropout)
        if best is None or info["val_mse_standardised"] < best[1]["val_mse_standardised"]:
            best = (pred, {**info, "lr": lr, "dropout": dropout})
    assert best is not None
    return best


def _retrieval(model: Any, xs_tr, xn_tr, y_tr, yn_tr, query: dict[str, np.ndarray], y_val: np.ndarray):
    """BLEEP-style retrieval in the model's aligned spot space; k chosen on the validation spots.

    ``query`` maps ``"val"``/``"test"`` to ``(spot, niche)`` features. Similarity is the model's own
    contrastive logit (−distance in Lorentz space, cosine in Euclidean space) between a query's image spot
    embedding and the gene spot embeddings of the training spots.
    """
    import torch

    from hyperst.nn import contrastive_logits

    net = model.network.eval()
    cfg = model.config
    with torch.inference_mode():
        gs = torch.from_numpy(y_tr.astype(np.float32))
        gn = torch.from_numpy(yn_tr.astype(np.float32)) if cfg.has_niche else None
        xs = torch.from_numpy(xs_tr.astype(np.float32))
        xn = torch.from_numpy(xn_tr.astype(np.float32)) if cfg.has_niche else None
        keys = net(xs, xn, gs, gn).embeddings["gene_spot"]
        c = net.curvature
        scores = {}
        for name, (qs, qn) in query.items():
            _, emb = model.predict_features(qs, qn)
            q = torch.from_numpy(emb["image_spot"])
            scores[name] = contrastive_logits(q, keys, scale=1.0, c=c, geometry=cfg.geometry).numpy()
    order = {name: np.argsort(-s, axis=1, kind="stable") for name, s in scores.items()}
    ks = [k for k in RETRIEVAL_KS if k <= len(y_tr)] or [len(y_tr)]
    losses = {k: _mse(y_tr[order["val"][:, :k]].mean(1), y_val) for k in ks}
    k = min(losses, key=losses.get)
    return y_tr[order["test"][:, :k]].mean(1).astype(np.float32), {"k": k, "val_mse": losses[k]}


def _run_job(job: _Job, shared: _Shared) -> tuple[list[dict], list[dict], dict]:
    """Fit and score every method on one (gene set, fold, seed)."""
    import hyperst.tl._fit as fit_module
    from hyperst.pp._genes import targets
    from hyperst.pp._niches import niche_targets
    from hyperst.tl._evaluate import evaluate

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
    groups_test = table.obs[shared.sample_key].astype(str).to_numpy()[test] if shared.sample_key in table.obs else None

    def feats(mask: np.ndarray, niche: bool) -> np.ndarray:
        if not niche:
            return xs_all[mask]
        if xn_all is None:
            raise ValueError(f"Method needs niche features in `.obsm[{shared.niche_key!r}]`.")
        return np.concatenate([xs_all[mask], xn_all[mask]], axis=1)

    # fit sees the training + validation groups and holds out the validation group for early stopping
    fit_table = table[trval] if shared.normalize else table[trval, genes]
    fit_table = fit_table.copy()
    models: dict[str, tuple[Any, float]] = {}

    def hyperst_model(preset: str) -> tuple[Any, float]:
        if preset not in models:
            t0 = time.perf_counter()
            model = fit_module.fit(
                fit_table, genes=genes, preset=preset, seed=job.seed, validation=list(job.val_groups),
                normalize=shared.normalize, progress=False, **shared.fit_kwargs,
            )
            models[preset] = (model, time.perf_counter() - t0)
        return models[preset]

    rows: list[dict] = []
    timings: list[dict] = []
    record: dict[str, Any] = {"gene_set": job.gene_set, "fold": job.fold, "seed": job.seed,
                              "test_groups": job.test_groups, "val_groups": job.val_groups,
                              "fit_groups": job.fit_groups, "n_genes": len(genes), "n_fit": int(fitm.sum()),
                              "n_val": int(val.sum()), "n_test": int(test.sum()), "methods": {}}
    for method in shared.methods:
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        fit_seconds = predict_seconds = 0.0
        if method.kind == "mean":
            pred = np.tile(ytr.mean(0), (int(test.sum()), 1))
            fit_seconds = time.perf_counter() - t0
        elif method.kind == "ridge":
            pred, info = _ridge(feats(fitm, method.niche), ytr, feats(val, method.niche), yva,
                                feats(test, method.niche), job.seed)
            fit_seconds = time.perf_counter() - t0
        elif method.kind == "mlp":
            pred, info = _mlp_grid(feats(fitm, method.niche), ytr, feats(val, method.niche), yva,
                                   feats(test, method.niche), job.seed)
            fit_seconds = time.perf_counter() - t0
        elif method.kind == "hyperst":
            model, fit_seconds = hyperst_model(str(method.preset))
            t1 = time.perf_counter()
            pred, _ = model.predict_features(xs_all[test], None if xn_all is None else xn_all[test])
            predict_seconds = time.perf_counter() - t1
            tr = model.training
            info = {"epochs": tr.get("epochs"), "best_epoch": tr.get("best_epoch"),
                    "best_val_loss": tr.get("best_val_loss")}
        elif method.kind == "retrieval":
            reused = str(method.preset) in models
            model, base_seconds = hyperst_model(str(method.preset))
            t1 = time.perf_counter()
            yn = ytr
            if model.config.has_niche:  # niche expression of the fitting spots (the model's gene-niche input)
                yn = niche_targets(table[fitm].copy(), genes, layer=shared.layer,
                                   library_key=shared.sample_key if shared.sample_key in table.obs.columns else None)
            nsl = None if xn_all is None else xn_all
            pred, info = _retrieval(
                model, xs_all[fitm], None if nsl is None else nsl[fitm], ytr, yn,
                {"val": (xs_all[val], None if nsl is None else nsl[val]),
                 "test": (xs_all[test], None if nsl is None else nsl[test])}, yva,
            )
            # the cost of running this method alone: its network's fit plus the retrieval
            fit_seconds = base_seconds + (time.perf_counter() - t1)
            info["reused_fit"] = reused
        else:  # pragma: no cover - guarded by BenchmarkMethod validation
            raise ValueError(method.kind)
        pred = np.asarray(pred, dtype=np.float32)
        ev = evaluate(yte, pred, truth_transform="none", groups=groups_test, ks=shared.ks)
        summary = ev.summary
        for scope, metric, value in summary[["scope", "metric", "value"]].itertuples(index=False):
            rows.append({"gene_set": job.gene_set, "method": method.name, "fold": job.fold, "seed": job.seed,
                         "scope": str(scope), "metric": str(metric), "value": float(value)})
        timings.append({"gene_set": job.gene_set, "method": method.name, "fold": job.fold, "seed": job.seed,
                        "fit_s": fit_seconds, "predict_s": predict_seconds, "total_s": fit_seconds + predict_seconds})
        record["methods"][method.name] = jsonable(info)
    return rows, timings, record


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
        validation group and at least one fitting group), an empty or invalid fold, an invalid gene set, or
        ``fit_kwargs`` setting an option reserved here.

    Examples
    --------
    >>> res = hst.tl.benchmark(table, methods=["hyperst", "ridge", "mean"], seeds=[0, 1])  # doctest: +SKIP
    >>> res.summary()  # mean ± std over folds × seeds  # doctest: +SKIP
    >>> res.compare(reference="hyperst")  # paired over folds  # doctest: +SKIP
    """
    from hyperst.pp._genes import select_genes
    from hyperst.tl._utils import FOLD_SEP, combined_table, group_folds

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

    table = combined_table(data, table_key, groupby)
    if groupby not in table.obs.columns:
        raise ValueError(
            f"The table has no `.obs[{groupby!r}]` column; columns: {list(table.obs.columns)}. "
            "Pass the column naming each spot's slide or patient as `groupby`."
        )
    if spot_key not in table.obsm:
        raise ValueError(
            f"The table has no image features in `.obsm[{spot_key!r}]`. Compute them first with "
            "`hst.pp.image_features(sdata, backbone=...)`."
        )
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

    gsets = dict(DEFAULT_GENE_SETS if gene_sets is None else gene_sets)
    if not gsets:
        raise ValueError("`gene_sets` is empty.")
    lib = sample_key if sample_key in table.obs.columns else None
    jobs: list[_Job] = []
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
                genes = select_genes(table[train_mask], layer=layer, library_key=lib, inplace=False, **dict(spec))
            else:
                genes = [str(g) for g in spec]
                missing = [g for g in genes if g not in table.var_names]
                if missing or not genes:
                    raise ValueError(f"Gene set {gname!r} is empty or names unknown genes, e.g. {missing[:5]}.")
            for seed in seeds:
                jobs.append(_Job(gname, list(genes), fold, list(held), val_groups, fit_groups, seed))

    threads = threads_per_job if threads_per_job is not None else (None if n_jobs == 1 else 1)
    shared = _Shared(table=table, groupby=groupby, sample_key=sample_key, spot_key=spot_key, niche_key=niche_key,
                     layer=layer, normalize=normalize, methods=chosen, ks=ks, fit_kwargs=opts, threads=threads)
    logger.info(f"benchmark: {len(names)} methods × {len(fold_list)} folds × {len(gsets)} gene sets × "
                f"{len(seeds)} seeds = {len(jobs)} jobs")
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    results: list[tuple[list[dict], list[dict], dict]] = []
    pbar = tqdm(total=len(jobs), disable=not progress, desc="benchmark", unit="job")
    if n_jobs == 1:
        import torch

        old = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for job in jobs:
                results.append(_run_job(job, shared))
                _release_memory()
                pbar.update(1)
        finally:
            torch.set_num_threads(old)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")  # torch and fork do not mix
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(shared,)) as pool:
            for res in pool.map(_run_in_worker, jobs):
                results.append(res)
                pbar.update(1)
    pbar.close()
    scores = pd.DataFrame([r for res in results for r in res[0]])
    timings = pd.DataFrame([t for res in results for t in res[1]])
    meta = {
        "methods": names,
        "descriptions": {m.name: m.description for m in chosen},
        "groups": {m.name: m.group for m in chosen},
        "groupby": groupby,
        "folds": [FOLD_SEP.join(f) for f in fold_list],
        "gene_sets": {k: (dict(v) if isinstance(v, Mapping) else "fixed list") for k, v in gsets.items()},
        "seeds": seeds,
        "normalize": normalize,
        "ks": ks,
        "fit_kwargs": jsonable(opts),
        "n_jobs": n_jobs,
        "wall_seconds": time.perf_counter() - t_start,
        "jobs": [res[2] for res in results],
    }
    return BenchmarkResult(scores=scores, timings=timings, meta=meta)


# ---------------------------------------------------------------------------------------------- result
@dataclass
class BenchmarkResult:
    """Scores and timings of :func:`benchmark`.

    Attributes
    ----------
    scores
        Tidy scores: ``gene_set``, ``method``, ``fold``, ``seed``, ``scope`` (``"pooled"``, each held-out
        slide, ``"mean_over_slides"`` when a fold holds out several), ``metric`` (``PCC@K``, ``MSE``, ``MAE``,
        ``n_spots``) and ``value``.
    timings
        One row per gene set, method, fold and seed: ``fit_s``, ``predict_s`` and their sum ``total_s`` (seconds;
        scoring excluded).
    meta
        Settings (methods, folds, gene sets, seeds, fit options), total wall time, and one record per job
        (validation groups, spot counts, genes, and what each method chose: epochs, α, k).
    """

    scores: pd.DataFrame
    timings: pd.DataFrame
    meta: dict[str, Any]

    # ------------------------------------------------------------------ tables
    @property
    def methods(self) -> list[str]:
        """Methods in the order they were run."""
        return list(self.meta["methods"])

    def _select(self, metric: str, scope: str, gene_set: str | None) -> pd.DataFrame:
        df = self.scores
        df = df[(df["metric"] == metric) & (df["scope"] == scope)]
        if gene_set is not None:
            if gene_set not in set(self.scores["gene_set"]):
                raise ValueError(f"Unknown `gene_set` {gene_set!r}; have {sorted(set(self.scores['gene_set']))}.")
            df = df[df["gene_set"] == gene_set]
        if df.empty:
            raise ValueError(f"No scores for metric {metric!r} in scope {scope!r}.")
        return df

    def summary(self, metrics: Sequence[str] | None = None, *, scope: str = "pooled") -> pd.DataFrame:
        """Mean and standard deviation over folds × seeds.

        Parameters
        ----------
        metrics
            Metrics to include (default PCC@K for each K, MSE, MAE).
        scope
            ``"pooled"`` (the held-out spots of each fold) or ``"mean_over_slides"``.

        Returns
        -------
        Rows ``(gene_set, method)`` in run order; columns ``(metric, "mean" | "std")``.
        """
        have = list(dict.fromkeys(self.scores["metric"]))
        metrics = [m for m in (metrics or [*(f"PCC@{k}" for k in self.meta["ks"]), "MSE", "MAE"]) if m in have]
        df = self.scores[(self.scores["scope"] == scope) & self.scores["metric"].isin(metrics)]
        out = df.groupby(["gene_set", "method", "metric"], sort=False)["value"].agg(["mean", "std"]).unstack("metric")
        out = out.swaplevel(axis=1)[[(m, s) for m in metrics for s in ("mean", "std")]]
        order = [(g, m) for g in dict.fromkeys(self.scores["gene_set"]) for m in self.methods if (g, m) in out.index]
        return out.loc[order]

    def per_slide(self, metric: str = "PCC@50", *, gene_set: str | None = None) -> pd.DataFrame:
        """``metric`` on each held-out slide (mean over seeds): rows ``(gene_set, method)``, one column per slide."""
        df = self.scores[(self.scores["metric"] == metric)
                         & ~self.scores["scope"].isin(["pooled", "mean_over_slides"])]
        if gene_set is not None:
            df = df[df["gene_set"] == gene_set]
        out = df.groupby(["gene_set", "method", "scope"], sort=False)["value"].mean().unstack("scope")
        order = [(g, m) for g in dict.fromkeys(df["gene_set"]) for m in self.methods if (g, m) in out.index]
        return out.loc[order]

    def fold_means(self, metric: str = "PCC@50", *, scope: str = "pooled") -> pd.DataFrame:
        """``metric`` per fold averaged over seeds: rows ``(gene_set, fold)``, one column per method."""
        df = self._select(metric, scope, None)
        out = df.groupby(["gene_set", "fold", "method"], sort=False)["value"].mean().unstack("method")
        return out[[m for m in self.methods if m in out.columns]]

    def compare(
        self,
        reference: str = "hyperst",
        *,
        metric: str = "PCC@50",
        scope: str = "pooled",
        alpha: float = 0.05,
    ) -> pd.DataFrame:
        """Paired comparison of every method with ``reference``, fold by fold.

        Seeds are averaged within each fold first (they share the fold's data, so they are not independent);
        the folds are the paired units. For each method and gene set: the mean difference (method −
        reference) over folds, its standard deviation, the paired t statistic and two-sided p value over
        folds, the number of folds the method wins, and the seed-to-seed standard deviation of the difference
        (averaged over folds) for scale. ``exceeds_noise`` is ``p < alpha``: the difference is larger than the
        fold-to-fold variation of the difference explains. With five folds this needs a consistent
        difference; a non-significant result means "not shown", not "equal".

        Parameters
        ----------
        reference
            Method every other method is compared with.
        metric
            Metric compared (higher is better for PCC, lower for MSE/MAE).
        scope
            ``"pooled"`` or ``"mean_over_slides"``.
        alpha
            Significance level of ``exceeds_noise``.

        Returns
        -------
        One row per ``(gene_set, method)``: ``reference``, ``mean_diff``, ``sd_diff``, ``t``, ``p``,
        ``wins`` (folds where the method is better), ``n_folds``, ``seed_sd`` and ``exceeds_noise``.
        """
        from scipy import stats

        if reference not in self.methods:
            raise ValueError(f"`reference` {reference!r} was not run; methods: {self.methods}.")
        df = self._select(metric, scope, None)
        higher_better = metric.startswith("PCC")
        rows = []
        for gene_set, sub in df.groupby("gene_set", sort=False):
            wide = sub.pivot_table(index=["fold", "seed"], columns="method", values="value")
            folds = wide.groupby(level="fold", sort=False).mean()
            for method in self.methods:
                if method == reference or method not in folds.columns:
                    continue
                d = (folds[method] - folds[reference]).to_numpy()
                per_seed = (wide[method] - wide[reference]).groupby(level="fold").std(ddof=1)
                n = len(d)
                sd = float(np.std(d, ddof=1)) if n > 1 else float("nan")
                if n > 1 and sd > 0:
                    t = float(np.mean(d) / (sd / np.sqrt(n)))
                    p = float(2 * stats.t.sf(abs(t), df=n - 1))
                else:
                    t = p = float("nan")
                better = d > 0 if higher_better else d < 0
                rows.append({
                    "gene_set": gene_set, "method": method, "reference": reference, "metric": metric,
                    "mean_diff": float(np.mean(d)), "sd_diff": sd, "t": t, "p": p,
                    "wins": int(better.sum()), "n_folds": n,
                    "seed_sd": float(per_seed.mean()) if per_seed.notna().any() else float("nan"),
                    "exceeds_noise": bool(np.isfinite(p) and p < alpha),
                })
        return pd.DataFrame(rows).set_index(["gene_set", "method"])

    def timing_summary(self) -> pd.DataFrame:
        """Mean seconds per job (one fold × gene set × seed) for each method: fit, predict and total."""
        out = self.timings.groupby("method", sort=False)[["fit_s", "predict_s", "total_s"]].mean()
        return out.loc[[m for m in self.methods if m in out.index]]

    # ------------------------------------------------------------------ report
    def to_markdown(self, *, scope: str = "pooled", digits: int = 3) -> str:
        """The summary as a Markdown table (``mean ± std`` over folds × seeds), one block per gene set."""
        summ = self.summary(scope=scope)
        metrics = list(dict.fromkeys(summ.columns.get_level_values(0)))
        lines = []
        for gene_set in dict.fromkeys(summ.index.get_level_values(0)):
            lines += [f"**Gene set `{gene_set}`**", "", "| method | " + " | ".join(metrics) + " |",
                      "|---|" + "---:|" * len(metrics)]
            sub = summ.loc[gene_set]
            best = {m: (sub[(m, "mean")].max() if m.startswith("PCC") else sub[(m, "mean")].min()) for m in metrics}
            for method, row in sub.iterrows():
                cells = []
                for m in metrics:
                    mean, sd = row[(m, "mean")], row[(m, "std")]
                    txt = f"{mean:.{digits}f} ± {0.0 if np.isnan(sd) else sd:.{digits}f}"
                    cells.append(f"**{txt}**" if np.isclose(mean, best[m]) else txt)
                lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)

    def plot(
        self,
        metric: str = "PCC@50",
        *,
        scope: str = "pooled",
        gene_sets: Sequence[str] | None = None,
        methods: Sequence[str] | None = None,
        figsize: tuple[float, float] | None = None,
    ) -> Figure:
        """Per-method ``metric``: one dot per fold (mean over seeds), mean ± std over folds × seeds.

        Parameters
        ----------
        metric
            Metric to plot.
        scope
            ``"pooled"`` or ``"mean_over_slides"``.
        gene_sets
            Gene sets to show (one panel each); default all.
        methods
            Methods to show, in this order. Default: all, except the mean predictor for PCC metrics (its
            correlations are 0 by construction and would squeeze the axis; the title says so).
        figsize
            Figure size; default scales with the number of methods.

        Returns
        -------
        The matplotlib figure.
        """
        import matplotlib.pyplot as plt

        df = self._select(metric, scope, None)
        sets = list(gene_sets or dict.fromkeys(df["gene_set"]))
        dropped = []
        if methods is None:
            methods = [m for m in self.methods if m in set(df["method"])]
            if metric.startswith("PCC") and "mean" in methods and len(methods) > 1:
                methods.remove("mean")
                dropped.append("mean")
        else:
            methods = [str(m) for m in methods]
            unknown = [m for m in methods if m not in set(df["method"])]
            if unknown:
                raise ValueError(f"`methods` {unknown} have no {metric!r} scores; have {sorted(set(df['method']))}.")
        folds = list(dict.fromkeys(df["fold"]))
        colours = plt.get_cmap("tab10")
        groups = self.meta.get("groups", {})
        fig, axes = plt.subplots(1, len(sets), sharey=True, squeeze=False,
                                 figsize=figsize or (4.2 * len(sets) + 1.5, 0.38 * len(methods) + 1.4))
        y = np.arange(len(methods))[::-1]
        for ax, gene_set in zip(axes[0], sets, strict=True):
            sub = df[df["gene_set"] == gene_set]
            for yi, method in zip(y, methods, strict=True):
                vals = sub[sub["method"] == method]
                mean, sd = vals["value"].mean(), vals["value"].std(ddof=1)
                face = {"hyperst": "C3", "ablation": "0.35", "baseline": "C0"}.get(groups.get(method, ""), "k")
                ax.errorbar(mean, yi, xerr=0 if np.isnan(sd) else sd, fmt="D", color=face, ms=6, capsize=3, zorder=3)
                per_fold = vals.groupby("fold", sort=False)["value"].mean()
                for fi, fold in enumerate(folds):
                    if fold in per_fold.index:
                        ax.scatter(per_fold[fold], yi + 0.22, s=12, color=colours(fi % 10), zorder=2,
                                   label=fold if yi == y[0] else None)
            ax.set_title(f"{metric} ({scope}), genes: {gene_set}", fontsize=10)
            ax.set_xlabel(metric + (" (mean predictor: 0, not shown)" if dropped else ""))
            ax.grid(axis="x", alpha=0.3)
        axes[0][0].set_yticks(y, methods)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.legend(handles, labels, title="held-out fold (mean over seeds); ◆ mean ± std over folds × seeds",
                   fontsize=8, title_fontsize=8, loc="lower center", ncol=max(1, len(folds)), frameon=False)
        return fig

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``scores.csv``, ``timings.csv`` and ``meta.json`` into the folder ``path``."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass `overwrite=True`.")
        path.mkdir(parents=True, exist_ok=True)
        self.scores.to_csv(path / "scores.csv", index=False)
        self.timings.to_csv(path / "timings.csv", index=False)
        (path / "meta.json").write_text(json.dumps(jsonable(self.meta), indent=1) + os.linesep)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BenchmarkResult:
        """Read a result written by :meth:`save`."""
        path = Path(path)
        missing = [f for f in ("scores.csv", "timings.csv", "meta.json") if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a saved benchmark result: missing {missing}.")
        str_cols = {"gene_set": str, "method": str, "fold": str, "scope": str, "metric": str}
        scores = pd.read_csv(path / "scores.csv", dtype=str_cols)
        timings = pd.read_csv(path / "timings.csv", dtype={k: str for k in ("gene_set", "method", "fold")})
        return cls(scores=scores, timings=timings, meta=json.loads((path / "meta.json").read_text()))


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def compare_markdown(table: pd.DataFrame, *, digits: int = 3) -> str:
    """A :meth:`BenchmarkResult.compare` table as Markdown (one block per gene set)."""
    lines = []
    for gene_set in dict.fromkeys(table.index.get_level_values(0)):
        sub = table.loc[gene_set]
        ref = sub["reference"].iloc[0]
        metric = sub["metric"].iloc[0]
        lines += [f"**Gene set `{gene_set}`: {metric}, method − `{ref}`, paired over folds**", "",
                  "| method | mean diff | sd over folds | t | p | folds won | seed sd | beyond fold noise |",
                  "|---|---:|---:|---:|---:|---:|---:|:---:|"]
        for method, row in sub.iterrows():
            lines.append(
                f"| `{method}` | {row['mean_diff']:+.{digits}f} | {_fmt(row['sd_diff'], digits)} | {_fmt(row['t'], 2)} "
                f"| {_fmt(row['p'], 3)} | {row['wins']}/{row['n_folds']} | {_fmt(row['seed_sd'], digits)} "
                f"| {'**yes**' if row['exceeds_noise'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def best_baseline(result: BenchmarkResult, *, metric: str = "PCC@50", gene_set: str | None = None) -> str:
    """The baseline (``group == "baseline"``) with the best mean ``metric`` over folds × seeds."""
    groups = result.meta.get("groups", {})
    base = [m for m in result.methods if groups.get(m) == "baseline" and m != "mean"]
    if not base:
        raise ValueError("The result has no baseline besides the mean predictor.")
    df = result._select(metric, "pooled", gene_set)
    means = df[df["method"].isin(base)].groupby("method")["value"].mean()
    return str(means.idxmax() if metric.startswith("PCC") else means.idxmin())
