"""hst.tl.fit / predict / save / load on tables with precomputed features (frozen mode)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import hyperst as hst
from hyperst._constants import Key

N_GENES, DIM = 24, 32
SMALL = {"emb_dim": 32, "dropout": 0.0}


@pytest.fixture(scope="module")
def slides(make_feature_slide) -> list[ad.AnnData]:
    w = np.random.default_rng(0).normal(size=(3, N_GENES)) * 0.8
    genes = [f"G{i}" for i in range(N_GENES)]
    return [make_feature_slide(f"s{i}", 14, seed=i, w=w, genes=genes, dim=DIM) for i in range(4)]


def _fit(train: list[ad.AnnData], **kw) -> hst.tl.HyperST:
    opts = {"genes": [f"G{i}" for i in range(N_GENES)], "config": SMALL, "max_epochs": 30, "batch_size": 64,
            "lr": 2e-3, "progress": False, "patience": 30, "n_members": 1}  # ensembles: test_uncertainty.py
    opts.update(kw)
    return hst.tl.fit(train, **opts)


@pytest.fixture(scope="module")
def fitted(slides: list[ad.AnnData]) -> hst.tl.HyperST:
    return _fit([s.copy() for s in slides[:3]])


def test_fit_beats_mean_and_shuffled(slides: list[ad.AnnData], fitted: hst.tl.HyperST) -> None:
    test = slides[3]
    pred = hst.tl.predict(fitted, test)
    res = hst.tl.evaluate(test, pred, ks=(10,))
    pcc = res["pooled", "PCC@10"]
    # the mean predictor has no spatial variation: its correlations are 0 by definition (NaN → 0)
    mean_pred = np.tile(np.log2(1 + np.vstack([s.X for s in slides[:3]])).mean(0), (test.n_obs, 1))
    mean_res = hst.tl.evaluate(test, mean_pred, groups=None, ks=(10,))
    assert mean_res["pooled", "PCC@10"] == 0.0
    # shuffled labels: the same model trained with the spots' expression permuted
    shuffled = [s.copy() for s in slides[:3]]
    rng = np.random.default_rng(1)
    for s in shuffled:
        s.X = s.X[rng.permutation(s.n_obs)]
    bad = _fit(shuffled)
    bad_pcc = hst.tl.evaluate(test, hst.tl.predict(bad, test), ks=(10,))["pooled", "PCC@10"]
    assert pcc > 0.6
    assert pcc > bad_pcc + 0.3
    assert res["pooled", "MSE"] < mean_res["pooled", "MSE"]


def test_fit_writes_documented_keys(slides: list[ad.AnnData]) -> None:
    train = [s.copy() for s in slides[:3]]
    before = {k: set(getattr(train[0], k).keys()) for k in ("obsm", "obsp", "uns", "layers")}
    model = _fit(train, max_epochs=3)
    a = train[0]
    assert a.obsm[Key.OBSM_IMAGE_SPOT].shape == (a.n_obs, SMALL["emb_dim"])
    for key in (Key.OBSM_IMAGE_NICHE, Key.OBSM_GENE_SPOT, Key.OBSM_GENE_NICHE):
        assert a.obsm[key].shape == (a.n_obs, SMALL["emb_dim"])
    fit_record = a.uns[Key.UNS][Key.UNS_FIT]
    assert fit_record["genes"] == model.genes
    assert fit_record["history"]["data"].shape == (len(model.history), len(fit_record["history"]["columns"]))
    assert len(model.history) >= 1
    assert fit_record["key_added"] == Key.OBSM_IMAGE_SPOT
    assert fit_record["obsm_keys"] == {"image_spot": Key.OBSM_IMAGE_SPOT, "image_niche": Key.OBSM_IMAGE_NICHE,
                                       "gene_spot": Key.OBSM_GENE_SPOT, "gene_niche": Key.OBSM_GENE_NICHE}
    assert {"train/loss", "val/loss", "train/mse", "train/hca", "train/hea"} <= set(model.history[-1])
    added = {k: set(getattr(a, k).keys()) - before[k] for k in before}
    assert added["obsm"] == {Key.OBSM_IMAGE_SPOT, Key.OBSM_IMAGE_NICHE, Key.OBSM_GENE_SPOT, Key.OBSM_GENE_NICHE,
                             Key.OBSM_NICHE_EXPRESSION}
    assert added["obsp"] <= {Key.OBSP_NICHE_CONNECTIVITIES, Key.OBSP_NICHE_DISTANCES}
    assert added["uns"] == {Key.UNS}
    assert added["layers"] == set()
    # validation by slide (three samples): one slide held out
    assert model.training["validation"].startswith("slides")
    assert len(model.training["validation_samples"]) == 1


def test_fit_key_added_keeps_earlier_embeddings(slides: list[ad.AnnData]) -> None:
    train = [s.copy() for s in slides[:2]]
    _fit(train, max_epochs=1, validation=None)
    first = {k: train[0].obsm[k].copy() for k in (Key.OBSM_IMAGE_SPOT, Key.OBSM_IMAGE_NICHE, Key.OBSM_GENE_SPOT,
                                                  Key.OBSM_GENE_NICHE)}
    _fit(train, max_epochs=1, validation=None, seed=7, key_added="X_second")
    a = train[0]
    for k, v in first.items():  # the first fit's embeddings are untouched
        np.testing.assert_array_equal(a.obsm[k], v)
    for k in ("X_second", "X_second_niche", "X_second_gene", "X_second_gene_niche"):
        assert a.obsm[k].shape == (a.n_obs, SMALL["emb_dim"])
    assert not np.allclose(a.obsm["X_second"], first[Key.OBSM_IMAGE_SPOT])
    rec = a.uns[Key.UNS][Key.UNS_FIT]
    assert rec["key_added"] == "X_second"
    assert rec["obsm_keys"]["gene_niche"] == "X_second_gene_niche"
    with pytest.raises(ValueError, match="would overwrite"):
        _fit(train, max_epochs=1, key_added=Key.OBSM_FEATURES_SPOT)
    with pytest.raises(ValueError, match="non-empty string"):
        _fit(train, max_epochs=1, key_added="")


def test_same_seed_same_model(slides: list[ad.AnnData]) -> None:
    a = _fit([s.copy() for s in slides[:3]], max_epochs=2)
    b = _fit([s.copy() for s in slides[:3]], max_epochs=2)
    for (ka, va), (kb, vb) in zip(a.network.state_dict().items(), b.network.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka


def test_save_load_predict_identical(tmp_path, slides: list[ad.AnnData], fitted: hst.tl.HyperST) -> None:
    path = fitted.save(tmp_path / "model")
    loaded = hst.tl.HyperST.load(path)
    a = hst.tl.predict(fitted, slides[3])
    b = hst.tl.predict(loaded, slides[3])
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.obsm[Key.OBSM_IMAGE_SPOT], b.obsm[Key.OBSM_IMAGE_SPOT])
    assert loaded.genes == fitted.genes
    assert loaded.history == fitted.history
    # the weights file holds tensors only
    state = torch.load(path / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    with pytest.raises(FileExistsError, match="overwrite"):
        fitted.save(path)
    with pytest.raises(FileNotFoundError):
        hst.tl.HyperST.load(tmp_path / "nothing")


def test_predict_output_layout_and_errors(slides: list[ad.AnnData], fitted: hst.tl.HyperST) -> None:
    test = slides[3]
    out = hst.tl.predict(fitted, test)
    # the table holds measured counts of the genes: prediction goes to the layer, counts stay in X
    np.testing.assert_array_equal(out.X, test[:, fitted.genes].X)
    assert out.layers[Key.LAYER_PRED].shape == (test.n_obs, N_GENES)
    radius = out.obs[Key.OBS_RADIUS].to_numpy()
    assert (radius > 0).all()
    assert np.isfinite(radius).all()
    assert (out.layers[Key.LAYER_PRED] >= 0).all()
    assert out.obsm["spatial"].shape == (test.n_obs, 2)
    he_only = ad.AnnData(np.zeros((test.n_obs, 0), np.float32), obs=test.obs.copy())
    he_only.obsm[Key.OBSM_FEATURES_SPOT] = test.obsm[Key.OBSM_FEATURES_SPOT]
    he_only.obsm[Key.OBSM_FEATURES_NICHE] = test.obsm[Key.OBSM_FEATURES_NICHE]
    out2 = hst.tl.predict(fitted, he_only)
    np.testing.assert_allclose(out2.X, out.layers[Key.LAYER_PRED], rtol=1e-6, atol=1e-6)
    wrong = he_only.copy()
    wrong.obsm[Key.OBSM_FEATURES_SPOT] = np.zeros((test.n_obs, DIM + 1), np.float32)
    with pytest.raises(ValueError, match=f"expects \\(n, {DIM}\\) features"):
        hst.tl.predict(fitted, wrong)
    no_feat = ad.AnnData(np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"hst\.pp\.image_features"):
        hst.tl.predict(fitted, no_feat)


def test_spatial_split_on_a_single_slide(slides: list[ad.AnnData]) -> None:
    model = _fit([slides[0].copy()], max_epochs=2)
    assert model.training["validation"] == "spatial blocks"
    assert 0 < model.training["n_val"] < slides[0].n_obs
    train, val = hst.tl.spatial_block_split(slides[0].obsm["spatial"], val_fraction=0.2, block_size=300,
                                            buffer=150, seed=0)
    xy = slides[0].obsm["spatial"]
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy[val]).query(xy[train])
    assert d.min() > 150  # no training spot within a niche of a validation spot
    assert not (train & val).any()


@pytest.mark.parametrize("preset", ["mse_only", "clip", "meru"])
def test_variants_train(slides: list[ad.AnnData], preset: str) -> None:
    model = _fit([s.copy() for s in slides[:3]], preset=preset, max_epochs=2)
    out = hst.tl.predict(model, slides[3])
    assert np.isfinite(out.layers[Key.LAYER_PRED]).all()
