"""The methods of :func:`hyperst.tl.benchmark`: the registry and the baselines that are not HyperST.

:data:`BENCHMARK_METHODS` names every method (HyperST variants, ablations, baselines). The baselines are
plain functions of train / validation / test arrays: each chooses its hyperparameter (ridge α, MLP
learning rate and dropout, retrieval k) on the validation spots and returns the test prediction and what
it chose. A new baseline on the feature arrays is a function here, its ``kind`` in :data:`MethodKind` and
:data:`FEATURE_BASELINES`, and an entry in the registry; the benchmark's job calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "BENCHMARK_METHODS",
    "FEATURE_BASELINES",
    "MLP_GRID",
    "RETRIEVAL_KS",
    "RIDGE_ALPHAS",
    "BenchmarkMethod",
    "MethodKind",
    "Prediction",
    "mean_predict",
    "mlp_grid_predict",
    "mlp_predict",
    "mse",
    "retrieval_predict",
    "ridge_predict",
    "standardise",
]

#: What a baseline returns: the test prediction ``(n_test, n_genes)`` and what it chose (α, k, epochs, …).
Prediction = tuple[np.ndarray, dict[str, Any]]
MethodKind = Literal["hyperst", "ensemble", "mean", "ridge", "retrieval", "mlp"]


@dataclass(frozen=True)
class BenchmarkMethod:
    """One method of :func:`hyperst.tl.benchmark`.

    Attributes
    ----------
    name
        Short name used in result tables.
    kind
        ``"hyperst"`` (:func:`hyperst.tl.fit` with ``preset``), ``"ensemble"`` (the same with one member
        per training group held out, ≤ 5, scored with its calibrated intervals), ``"mean"`` (training mean of
        each gene),
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


def _registry() -> dict[str, BenchmarkMethod]:
    m = BenchmarkMethod
    items = [
        m("hyperst", "hyperst", "hyperst", "HyperST, reference loss weighting (½ ΣHEA, k = 0.7 / 1.2)", "hyperst"),
        m("hyperst_ensemble", "ensemble", "hyperst", "HyperST ensemble: one member per training group held out "
          "(≤ 5), mean prediction, calibrated 90 % intervals", "hyperst"),
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


#: Every method :func:`hyperst.tl.benchmark` knows, by name (HyperST variants, ablations, baselines).
BENCHMARK_METHODS: dict[str, BenchmarkMethod] = _registry()

#: Ridge α grid (chosen by validation MSE).
RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(0, 5, 11))
#: Retrieval k grid (chosen by validation MSE).
RETRIEVAL_KS: tuple[int, ...] = (1, 3, 5, 10, 20, 50, 100)

#: MLP (learning rate, dropout) grid (chosen by validation MSE).
MLP_GRID: tuple[tuple[float, float], ...] = ((1e-3, 0.1), (1e-3, 0.5), (1e-4, 0.1), (1e-4, 0.5))


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``train`` and ``others`` scaled with a :class:`~sklearn.preprocessing.StandardScaler` fitted on ``train``."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    return [scaler.transform(x) for x in (train, *others)]


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared difference of ``a`` and ``b`` over all entries."""
    return float(np.mean((a - b) ** 2))


def mean_predict(
    xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, xte: np.ndarray, seed: int
) -> Prediction:
    """The training mean of each gene for every test spot (nothing to choose)."""
    return np.tile(ytr.mean(0), (len(xte), 1)), {}


def ridge_predict(
    xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, xte: np.ndarray, seed: int
) -> Prediction:
    """StandardScaler → PCA(256) → ridge; α by validation MSE. Returns prediction and chosen α."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    xtr, xva, xte = standardise(xtr, xva, xte)
    n_comp = min(256, xtr.shape[0] - 1, xtr.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed, svd_solver="full").fit(xtr)
    ztr, zva, zte = (pca.transform(x) for x in (xtr, xva, xte))
    best = (np.inf, RIDGE_ALPHAS[0])
    for alpha in RIDGE_ALPHAS:
        loss = mse(Ridge(alpha=alpha).fit(ztr, ytr).predict(zva), yva)
        if loss < best[0]:
            best = (loss, alpha)
    model = Ridge(alpha=best[1]).fit(ztr, ytr)
    return model.predict(zte).astype(np.float32), {"alpha": best[1], "val_mse": best[0]}


def mlp_predict(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xva: np.ndarray,
    yva: np.ndarray,
    xte: np.ndarray,
    seed: int,
    *,
    hidden: int = 512,
    lr: float = 1e-3,
    batch_size: int = 64,
    max_epochs: int = 200,
    patience: int = 10,
    dropout: float = 0.1,
    weight_decay: float = 0.01,
) -> Prediction:
    """Two-layer MLP (Linear → GELU → Dropout → Linear) on standardised features and targets; MSE; early stopping."""
    import torch
    from torch import nn

    xtr, xva, xte = (x.astype(np.float32) for x in standardise(xtr, xva, xte))
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


def mlp_grid_predict(
    xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, xte: np.ndarray, seed: int
) -> Prediction:
    """:func:`mlp_predict` for every (lr, dropout) of :data:`MLP_GRID`; the one with the lowest validation MSE."""
    best = None
    for lr, dropout in MLP_GRID:
        pred, info = mlp_predict(xtr, ytr, xva, yva, xte, seed, lr=lr, dropout=dropout)
        if best is None or info["val_mse_standardised"] < best[1]["val_mse_standardised"]:
            best = (pred, {**info, "lr": lr, "dropout": dropout})
    assert best is not None
    return best


def retrieval_predict(
    model: Any,
    xs_tr: np.ndarray,
    xn_tr: np.ndarray | None,
    y_tr: np.ndarray,
    yn_tr: np.ndarray,
    query: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    y_val: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """BLEEP-style retrieval in the model's aligned spot space; k chosen on the validation spots.

    ``query`` maps ``"val"`` and any other names (``"test"``, shifted test sets) to ``(spot, niche)`` features;
    the result maps every name but ``"val"`` to its prediction, and the info gives the chosen k. Similarity is
    the model's own contrastive logit (−distance in Lorentz space, cosine in Euclidean space) between a query's
    image spot embedding and the gene spot embeddings of the training spots.
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
    losses = {k: mse(y_tr[order["val"][:, :k]].mean(1), y_val) for k in ks}
    k = min(losses, key=losses.get)
    preds = {name: y_tr[o[:, :k]].mean(1).astype(np.float32) for name, o in order.items() if name != "val"}
    return preds, {"k": k, "val_mse": losses[k]}


#: The baselines that fit on feature arrays, by :attr:`BenchmarkMethod.kind`: each is called as
#: ``f(x_fit, y_fit, x_val, y_val, x_test, seed)`` and returns a :data:`Prediction`.
FEATURE_BASELINES: dict[str, Callable[..., Prediction]] = {
    "mean": mean_predict,
    "ridge": ridge_predict,
    "mlp": mlp_grid_predict,
}
