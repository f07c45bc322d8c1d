"""hst.tl.cross_validate: grouped folds, no test leakage into training or gene selection."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import hyperst as hst
import hyperst.tl._fit as fit_module
from hyperst._constants import Key
from hyperst.tl._cv import cross_validate

N_GENES, DIM = 12, 16
FIT = {"config": {"emb_dim": 16, "dropout": 0.0}, "max_epochs": 3, "batch_size": 32, "lr": 2e-3, "patience": 5}
GENES = [f"G{i}" for i in range(N_GENES)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def slides(make_feature_slide) -> list[ad.AnnData]:
    w = np.random.default_rng(0).normal(size=(3, N_GENES)) * 0.8
    return [make_feature_slide(f"s{i}", 8, seed=i, w=w, genes=GENES, dim=DIM) for i in range(4)]


@pytest.fixture(scope="module")
def table(slides: list[ad.AnnData]) -> ad.AnnData:
    return ad.concat(slides, pairwise=True)


@pytest.fixture(scope="module")
def cv(table: ad.AnnData) -> tuple[pd.DataFrame, list[dict], dict]:
    """Leave-one-slide-out with two seeds; records what every ``fit`` call trained on."""
    seen: list[dict] = []
    original = fit_module.fit

    def recording_fit(data, **kw):
        model = original(data, **kw)
        seen.append({"samples": set(data.obs["sample"]), "n": data.n_obs, "val": model.training["validation_samples"]})
        return model

    before = {k: set(getattr(table, k).keys()) for k in ("obsm", "obsp", "uns", "layers")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module, "fit", recording_fit)
        res = cross_validate(table, genes=GENES, ks=(5, 50), seeds=(0, 1), fit_kwargs=FIT)
    return res, seen, before


def test_one_row_group_per_fold_and_seed(cv: tuple, table: ad.AnnData) -> None:
    cv = cv[0]
    assert list(cv.columns) == ["fold", "seed", "scope", "metric", "value"]
    assert set(map(tuple, cv[["fold", "seed"]].drop_duplicates().to_numpy())) == {
        (f"s{i}", s) for i in range(4) for s in (0, 1)
    }
    # the default fit is an ensemble (one member per training slide): its intervals are scored too
    metrics = {"PCC@5", "PCC@50", "MSE", "MAE", "n_spots", "seconds", "coverage", "width", "spearman_uncertainty_mae"}
    for (fold, _), grp in cv.groupby(["fold", "seed"]):
        # single held-out slide: pooled and that slide (identical numbers), no mean over slides
        assert set(grp["scope"]) == {"pooled", fold}
        assert set(grp["metric"]) == metrics
        pooled = grp[grp["scope"] == "pooled"].set_index("metric")["value"]
        per_slide = grp[grp["scope"] == fold].set_index("metric")["value"]
        assert pooled["n_spots"] == (table.obs["sample"] == fold).sum() == 64
        assert pooled["PCC@5"] == pytest.approx(per_slide["PCC@5"])
        assert pooled["seconds"] > 0
        assert -1 <= pooled["PCC@5"] <= 1
        assert pooled["MSE"] > 0
        assert pooled["PCC@50"] <= pooled["PCC@5"]  # all 12 genes vs the top 5
        assert 0.6 <= pooled["coverage"] <= 1
        assert pooled["width"] > 0
    # different seeds give different models
    a = cv[(cv["seed"] == 0) & (cv["metric"] == "MSE") & (cv["scope"] == "pooled")]["value"].to_numpy()
    b = cv[(cv["seed"] == 1) & (cv["metric"] == "MSE") & (cv["scope"] == "pooled")]["value"].to_numpy()
    assert not np.allclose(a, b)
    assert len(cv.attrs["folds"]) == 8


def test_held_out_slide_never_trained_on(cv: tuple, table: ad.AnnData) -> None:
    res, seen, before = cv
    assert len(seen) == 8  # 4 folds x 2 seeds, in that order
    for rec, record in zip(seen, res.attrs["folds"], strict=True):
        fold = record["fold"]
        assert fold not in rec["samples"]
        assert rec["samples"] == {"s0", "s1", "s2", "s3"} - {fold} == set(record["train_groups"])
        assert rec["n"] == record["n_train"] + record["n_val"] == 3 * 64
        # early stopping validates on one of the training slides, never the test slide
        assert len(rec["val"]) == 1
        assert rec["val"][0] in rec["samples"]
        assert record["validation_samples"] == rec["val"]
    assert [(r["fold"], r["seed"]) for r in res.attrs["folds"]] == [(f"s{i}", s) for i in range(4) for s in (0, 1)]
    # the user's table is untouched (fit wrote its embeddings into a copy)
    assert {k: set(getattr(table, k).keys()) for k in before} == before


def test_metrics_equal_evaluate_on_a_hand_fit(cv: tuple, slides: list[ad.AnnData]) -> None:
    cv = cv[0]
    # fold s2, seed 1, rebuilt by hand from the separate slides
    model = hst.tl.fit([slides[i].copy() for i in (0, 1, 3)], genes=GENES, seed=1, progress=False, **FIT)
    ev = hst.tl.evaluate(slides[2], hst.tl.predict(model, slides[2]), ks=(5, 50))
    got = cv[(cv["fold"] == "s2") & (cv["seed"] == 1)]
    got = got[got["metric"] != "seconds"].reset_index(drop=True)
    expected = ev.summary.reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["scope", "metric"]], expected[["scope", "metric"]])
    np.testing.assert_allclose(got["value"].to_numpy(), expected["value"].to_numpy(), rtol=1e-6, atol=1e-7)


def test_genes_selected_on_training_slides_only(slides: list[ad.AnnData]) -> None:
    # gene "GX" is highly expressed on slide s3 only: with s3 it is top by mean, without it is not
    tables = []
    for s in slides:
        a = s.copy()
        gx = np.full((a.n_obs, 1), 500.0 if a.obs["sample"].iloc[0] == "s3" else 0.0, np.float32)
        a = ad.AnnData(np.hstack([a.X, gx]), obs=a.obs, var=pd.DataFrame(index=[*GENES, "GX"]), obsm=dict(a.obsm))
        tables.append(a)
    sel = {"flavor": "mean", "n_top": 6}
    assert "GX" in hst.pp.select_genes(tables, inplace=False, **sel)
    assert "GX" not in hst.pp.select_genes(tables[:3], inplace=False, **sel)
    # a stale selection on all slides in .var must be ignored
    hst.pp.select_genes(tables, **sel)
    res = cross_validate(tables, folds=["s3", ["s0"]], ks=(5,), fit_kwargs={**FIT, "max_epochs": 1}, select_kwargs=sel)
    records = {r["fold"]: r for r in res.attrs["folds"]}
    assert "GX" not in records["s3"]["genes"]
    assert records["s3"]["genes"] == hst.pp.select_genes(tables[:3], inplace=False, **sel)
    assert "GX" in records["s0"]["genes"]  # s3 is a training slide there
    assert len(records["s0"]["genes"]) == 6


def test_grouped_folds_lists_and_inputs_unchanged(slides: list[ad.AnnData]) -> None:
    # patients of two slides each; tables as a list with clashing spot names
    tables = []
    for i, s in enumerate(slides):
        a = s.copy()
        a.obs["patient"] = f"p{i // 2}"
        a.obs_names = [f"spot{j}" for j in range(a.n_obs)]
        tables.append(a)
    keys = [set(a.obsm.keys()) for a in tables]
    res = cross_validate(tables, groupby="patient", genes=GENES[:6], ks=(3,), fit_kwargs={**FIT, "max_epochs": 1})
    assert sorted(res["fold"].unique()) == ["p0", "p1"]
    p0 = res[res["fold"] == "p0"]
    assert set(p0["scope"]) == {"pooled", "s0", "s1", "mean_over_slides"}
    assert p0[(p0["scope"] == "pooled") & (p0["metric"] == "n_spots")]["value"].item() == 128
    rec = {r["fold"]: r for r in res.attrs["folds"]}
    assert rec["p0"]["train_groups"] == ["p1"]
    # two training slides: fit's "auto" validation falls back to spatial blocks inside them (a buffer
    # of spots around the validation blocks is dropped)
    assert rec["p0"]["validation"] == "spatial blocks"
    assert 64 < rec["p0"]["n_train"] + rec["p0"]["n_val"] <= 128
    assert [set(a.obsm.keys()) for a in tables] == keys
    # explicit multi-group fold
    res2 = cross_validate(tables, folds=[["s0", "s1"]], genes=GENES[:6], ks=(3,), fit_kwargs={**FIT, "max_epochs": 1})
    assert list(res2["fold"].unique()) == ["s0+s1"]


def test_errors(table: ad.AnnData) -> None:
    with pytest.raises(ValueError, match="groupby"):
        cross_validate(table, groupby="patient", genes=GENES)
    with pytest.raises(ValueError, match="unknown groups"):
        cross_validate(table, folds=[["s9"]], genes=GENES)
    with pytest.raises(ValueError, match="every group"):
        cross_validate(table, folds=[["s0", "s1", "s2", "s3"]], genes=GENES)
    with pytest.raises(ValueError, match="seeds"):
        cross_validate(table, fit_kwargs={"seed": 3}, genes=GENES)
    with pytest.raises(ValueError, match="spot mask"):
        cross_validate(table, fit_kwargs={"validation": np.zeros(table.n_obs, bool)}, genes=GENES)
    with pytest.raises(NotImplementedError, match="frozen"):
        cross_validate(table, fit_kwargs={"mode": "lora"}, genes=GENES)
    with pytest.raises(ValueError, match="not in the data"):
        cross_validate(table, genes=["nope"])
    one = table[table.obs["sample"] == "s0"].copy()
    with pytest.raises(ValueError, match="at least two"):
        cross_validate(one, genes=GENES)
    bare = table.copy()
    del bare.obsm[Key.OBSM_FEATURES_SPOT]
    with pytest.raises(ValueError, match="image_features"):
        cross_validate(bare, genes=GENES)


def test_spatialdata_input_with_features(make_feature_sdata) -> None:
    sdata = make_feature_sdata(3, DIM)
    t = sdata.tables["table"]
    res = cross_validate(sdata, genes=list(t.var_names), ks=(5,), fit_kwargs={**FIT, "max_epochs": 1})
    assert sorted(res["fold"].unique()) == ["sample0", "sample1", "sample2"]
    n = res[(res["scope"] == "pooled") & (res["metric"] == "n_spots")]["value"]
    assert (n == 36).all()
    assert Key.OBSM_IMAGE_SPOT not in t.obsm  # the SpatialData's table is not modified
