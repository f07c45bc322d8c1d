"""hst.tl.benchmark: the shared protocol (folds, validation group, genes), baselines, statistics, report."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import hyperst as hst
import hyperst.tl._fit as fit_module
from hyperst.tl._benchmark import _validation_groups
from hyperst.tl._benchmark_methods import RIDGE_ALPHAS
from hyperst.tl._benchmark_report import BenchmarkResult, best_baseline, compare_markdown

N_GENES, DIM = 12, 16
GENES = [f"G{i}" for i in range(N_GENES)]
FIT = {"config": {"emb_dim": 16, "dropout": 0.0}, "max_epochs": 40, "batch_size": 32, "lr": 5e-3, "patience": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table(make_feature_slide) -> ad.AnnData:
    w = np.random.default_rng(0).normal(size=(3, N_GENES)) * 0.8
    return ad.concat([make_feature_slide(f"s{i}", 8, seed=i, w=w, genes=GENES, dim=DIM) for i in range(4)],
                     pairwise=True)


@pytest.fixture(scope="module")
def run(table: ad.AnnData) -> tuple[BenchmarkResult, list[dict], dict]:
    """Two methods, one fold, one seed; records what every ``fit`` call saw."""
    seen: list[dict] = []
    original = fit_module.fit

    def recording_fit(data, **kw):
        model = original(data, **kw)
        seen.append({"samples": set(data.obs["sample"]), "validation": kw["validation"],
                     "val_samples": model.training["validation_samples"], "genes": list(kw["genes"])})
        return model

    before = {k: set(getattr(table, k).keys()) for k in ("obsm", "obsp", "uns", "layers")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module, "fit", recording_fit)
        res = hst.tl.benchmark(table, methods=["hyperst", "ridge"], folds=["s0"], seeds=[0],
                               gene_sets={"all": GENES}, ks=(5, 10), fit_kwargs=FIT, progress=False)
    return res, seen, before


def test_shared_protocol_and_no_leakage(run: tuple, table: ad.AnnData) -> None:
    res, seen, before = run
    # fit saw the training groups only, and held out the validation group (the one after s0)
    assert len(seen) == 1
    assert seen[0]["samples"] == {"s1", "s2", "s3"}
    assert seen[0]["validation"] == ["s1"]
    job = res.meta["jobs"][0]
    assert job["test_groups"] == ["s0"]
    assert job["val_groups"] == ["s1"]
    assert job["fit_groups"] == ["s2", "s3"]
    assert (job["n_fit"], job["n_val"], job["n_test"]) == (128, 64, 64)
    # every method is scored on the held-out spots with the same metrics
    pooled = res.scores[res.scores["scope"] == "pooled"]
    assert set(pooled["method"]) == {"hyperst", "ridge"}
    for _, grp in pooled.groupby("method"):
        assert set(grp["metric"]) == {"PCC@5", "PCC@10", "MSE", "MAE", "n_spots"}
        assert grp.set_index("metric").loc["n_spots", "value"] == 64
    # per-slide scope: one held-out slide, so it equals the pooled scope
    slide = res.scores[res.scores["scope"] == "s0"].set_index(["method", "metric"])["value"]
    assert np.allclose(slide.loc[pooled.set_index(["method", "metric"]).index], pooled["value"])
    # the input table is not modified
    assert {k: set(getattr(table, k).keys()) for k in ("obsm", "obsp", "uns", "layers")} == before


def test_ridge_matches_a_hand_fit_with_alpha_from_validation(run: tuple, table: ad.AnnData) -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    res = run[0]
    s = table.obs["sample"].to_numpy()
    y = np.log2(1 + np.asarray(table[:, GENES].X))
    x = table.obsm["hyperst_features_spot"]
    fit_, val, test = np.isin(s, ["s2", "s3"]), s == "s1", s == "s0"

    def pipeline(alpha):
        sc = StandardScaler().fit(x[fit_])
        pca = PCA(n_components=DIM, svd_solver="full").fit(sc.transform(x[fit_]))
        z = {k: pca.transform(sc.transform(x[m])) for k, m in (("fit", fit_), ("val", val), ("test", test))}
        r = Ridge(alpha=alpha).fit(z["fit"], y[fit_])
        return r.predict(z["val"]), r.predict(z["test"])

    val_mse = {a: np.mean((pipeline(a)[0] - y[val]) ** 2) for a in RIDGE_ALPHAS}
    alpha = min(val_mse, key=val_mse.get)
    assert res.meta["jobs"][0]["methods"]["ridge"]["alpha"] == pytest.approx(alpha)
    ev = hst.tl.evaluate(y[test], pipeline(alpha)[1], truth_transform="none", groups=None, ks=(5, 10))
    got = res.scores[(res.scores["method"] == "ridge") & (res.scores["scope"] == "pooled")].set_index("metric")
    for metric in ("PCC@5", "MSE", "MAE"):
        assert got.loc[metric, "value"] == pytest.approx(ev["pooled", metric], rel=1e-4, abs=1e-5)
    # the signal is learnable: both methods beat the mean predictor (PCC 0, MSE = variance around the mean)
    mean_mse = np.mean((y[test] - y[fit_].mean(0)) ** 2)
    summary = res.summary()
    for method in ("hyperst", "ridge"):
        assert summary.loc[("all", method), ("PCC@5", "mean")] > 0.5
        assert summary.loc[("all", method), ("MSE", "mean")] < mean_mse


def test_result_report_plot_and_round_trip(run: tuple, tmp_path) -> None:
    res = run[0]
    md = res.to_markdown()
    assert "| `hyperst` |" in md
    assert "| `ridge` |" in md
    assert "PCC@10" in md
    assert res.timing_summary().index.tolist() == ["hyperst", "ridge"]
    assert (res.timing_summary()["fit_s"] > 0).all()
    per = res.per_slide("PCC@5")
    assert per.columns.tolist() == ["s0"]
    fig = res.plot("PCC@5")
    assert len(fig.axes[0].get_yticklabels()) == 2
    res.save(tmp_path / "r")
    with pytest.raises(FileExistsError):
        res.save(tmp_path / "r")
    back = BenchmarkResult.load(tmp_path / "r")
    pd.testing.assert_frame_equal(back.scores, res.scores, check_dtype=False)
    assert back.meta["jobs"] == res.meta["jobs"]
    with pytest.raises(FileNotFoundError, match="missing"):
        BenchmarkResult.load(tmp_path)


def _fake(diffs: dict[str, list[float]], seeds: int = 2) -> BenchmarkResult:
    """A result whose PCC@50 per fold and seed is known: ref = 0.5 + fold offset, method = ref + diff."""
    rows = []
    for f in range(5):
        for s in range(seeds):
            base = 0.5 + 0.05 * f + 0.001 * s
            rows.append(("g", "ref", f"f{f}", s, base))
            for name, d in diffs.items():
                rows.append(("g", name, f"f{f}", s, base + d[f] + 0.002 * s))
    df = pd.DataFrame(rows, columns=["gene_set", "method", "fold", "seed", "value"])
    df["scope"], df["metric"] = "pooled", "PCC@50"
    meta = {"methods": ["ref", *diffs], "ks": [50], "groups": {"ref": "hyperst", **dict.fromkeys(diffs, "baseline")}}
    return BenchmarkResult(scores=df, timings=pd.DataFrame(), meta=meta)


def test_paired_comparison_matches_a_paired_t_test() -> None:
    diffs = {"better": [0.05, 0.04, 0.06, 0.05, 0.03], "noise": [0.05, -0.06, 0.02, -0.01, -0.03]}
    res = _fake(diffs)
    cmp = res.compare("ref")
    for name, d in diffs.items():
        ref = np.array([0.5 + 0.05 * f + 0.0005 for f in range(5)])
        t = stats.ttest_rel(ref + np.array(d) + 0.001, ref)
        row = cmp.loc[("g", name)]
        assert row["mean_diff"] == pytest.approx(np.mean(d) + 0.001)
        assert row["t"] == pytest.approx(t.statistic)
        assert row["p"] == pytest.approx(t.pvalue)
        assert row["seed_sd"] == pytest.approx(np.std([0.0, 0.002], ddof=1))
    assert cmp.loc[("g", "better"), "exceeds_noise"]
    assert cmp.loc[("g", "better"), "wins"] == 5
    assert not cmp.loc[("g", "noise"), "exceeds_noise"]
    assert cmp.loc[("g", "noise"), "wins"] == 2
    # lower is better for MSE
    mse = _fake({"lower": [-0.1] * 5})
    mse.scores["metric"] = "MSE"
    assert mse.compare("ref", metric="MSE").loc[("g", "lower"), "wins"] == 5
    assert best_baseline(res, gene_set="g") == "better"
    folds = res.fold_means()
    assert folds.shape == (5, 3)
    assert folds.loc[("g", "f2"), "better"] == pytest.approx(0.5 + 0.1 + 0.0005 + 0.06 + 0.001)
    md = compare_markdown(cmp)
    assert "| `better` | +0.047 |" in md
    assert "**yes**" in md
    with pytest.raises(ValueError, match="was not run"):
        res.compare("nope")


def test_validation_group_is_the_next_training_group() -> None:
    groups = ["C2", "C3", "C4", "C5", "C6"]
    for i, held in enumerate(groups):
        train = [g for g in groups if g != held]
        assert _validation_groups(train, [held], groups, 1) == [groups[(i + 1) % 5]]
    assert _validation_groups(["C3", "C4", "C5"], ["C6", "C2"], groups, 2) == ["C3", "C4"]


def test_retrieval_reuses_the_clip_network_and_picks_k_on_validation(table: ad.AnnData) -> None:
    calls = []
    original = fit_module.fit

    def counting_fit(data, **kw):
        calls.append(kw["preset"])
        return original(data, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module, "fit", counting_fit)
        res = hst.tl.benchmark(table, methods=["clip", "bleep", "mean"], folds=["s2"], seeds=[0],
                               gene_sets={"all": GENES}, ks=(5,), fit_kwargs=FIT, progress=False)
    assert calls == ["clip"]
    info = res.meta["jobs"][0]["methods"]["bleep"]
    assert info["reused_fit"]
    assert info["k"] in (1, 3, 5, 10, 20, 50, 100)
    pooled = res.scores[(res.scores["scope"] == "pooled")].set_index(["method", "metric"])["value"]
    assert pooled[("mean", "PCC@5")] == 0.0
    assert pooled[("bleep", "PCC@5")] > 0.3  # retrieval finds spots of the same tissue state
    # the mean predictor (PCC 0 by construction) is left out of PCC plots, kept in MSE plots
    labels = [t.get_text() for t in res.plot("PCC@5").axes[0].get_yticklabels()]
    assert labels == ["clip", "bleep"]
    assert len(res.plot("MSE").axes[0].get_yticklabels()) == 3
    with pytest.raises(ValueError, match="no 'PCC@5' scores"):
        res.plot("PCC@5", methods=["ridge"])


def test_worker_processes_give_identical_results(table: ad.AnnData) -> None:
    kw = {"methods": ["ridge_niche", "mean"], "folds": ["s3"], "seeds": [0, 1], "gene_sets": {"all": GENES},
          "ks": (5,), "progress": False, "threads_per_job": 1}
    one = hst.tl.benchmark(table, n_jobs=1, **kw)
    two = hst.tl.benchmark(table, n_jobs=2, **kw)
    pd.testing.assert_frame_equal(one.scores, two.scores)


def test_normalized_targets_and_gene_selection_per_fold(table: ad.AnnData) -> None:
    res = hst.tl.benchmark(table, methods=["ridge", "mean"], folds=["s1"], seeds=[0], normalize=True,
                           gene_sets={"top6": {"flavor": "mean", "n_top": 6, "exclude_patterns": ()}},
                           progress=False)
    job = res.meta["jobs"][0]
    assert job["n_genes"] == 6
    assert res.meta["normalize"]
    # the mean predictor's MSE is the spread of the held-out normalised targets around the training mean
    s = table.obs["sample"].to_numpy()
    genes = hst.pp.select_genes(table[s != "s1"], flavor="mean", n_top=6, exclude_patterns=(),
                                library_key="sample", inplace=False)
    y = hst.pp.targets(table, genes, normalize=True)
    fit_ = np.isin(s, job["fit_groups"])
    expected = np.mean((y[s == "s1"] - y[fit_].mean(0)) ** 2)
    got = res.scores.set_index(["method", "scope", "metric"])["value"][("mean", "pooled", "MSE")]
    assert got == pytest.approx(expected, rel=1e-5)


def test_errors(table: ad.AnnData) -> None:
    kw = {"gene_sets": {"all": GENES}, "progress": False}
    with pytest.raises(ValueError, match="Unknown `methods`"):
        hst.tl.benchmark(table, methods=["nope"], **kw)
    with pytest.raises(ValueError, match="at least three"):
        hst.tl.benchmark(table[table.obs["sample"].isin(["s0", "s1"])], methods=["mean"], **kw)
    with pytest.raises(ValueError, match="sets itself"):
        hst.tl.benchmark(table, methods=["mean"], fit_kwargs={"seed": 1}, **kw)
    with pytest.raises(ValueError, match="no entry for fold"):
        hst.tl.benchmark(table, methods=["mean"], folds=["s0"], validation={"s1": ["s2"]}, **kw)
    with pytest.raises(ValueError, match="must name training groups"):
        hst.tl.benchmark(table, methods=["mean"], folds=["s0"], validation={"s0": ["s0"]}, **kw)
    with pytest.raises(ValueError, match="unknown genes"):
        hst.tl.benchmark(table, methods=["mean"], gene_sets={"x": ["NOPE"]}, progress=False)
    bare = table.copy()
    del bare.obsm["hyperst_features_niche"]
    with pytest.raises(ValueError, match="niche features"):
        hst.tl.benchmark(bare, methods=["ridge_niche"], **kw)
    del bare.obsm["hyperst_features_spot"]
    with pytest.raises(ValueError, match="image_features"):
        hst.tl.benchmark(bare, methods=["mean"], **kw)


def test_spatialdata_inputs_and_patient_grouping(make_feature_sdata) -> None:
    sdata = make_feature_sdata(4, DIM)
    t = sdata.tables["table"]
    t.obs["patient"] = t.obs["sample"].map({"sample0": "A", "sample1": "A", "sample2": "B", "sample3": "C"})
    res = hst.tl.benchmark(sdata, groupby="patient", methods=["ridge", "mean"], seeds=[0],
                           gene_sets={"all": list(t.var_names)}, ks=(5,), progress=False)
    assert res.meta["folds"] == ["A", "B", "C"]
    job_a = next(j for j in res.meta["jobs"] if j["fold"] == "A")
    assert job_a["val_groups"] == ["B"]
    assert job_a["fit_groups"] == ["C"]
    assert job_a["n_test"] == 72  # both slides of patient A held out together
    # a fold holding out two slides gets per-slide scores and their mean
    scopes = set(res.scores[res.scores["fold"] == "A"]["scope"])
    assert scopes == {"pooled", "sample0", "sample1", "mean_over_slides"}
    assert res.summary(scope="mean_over_slides").loc[("all", "ridge"), ("PCC@5", "mean")] > 0.5
