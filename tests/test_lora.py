"""LoRA mode: end-to-end training through a (tiny, random) ViT with adapters, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hyperst as hst
from hyperst._constants import Key
from hyperst.tl._lora import LoraSpec, add_lora

pytest.importorskip("peft")

LORA_FIT = {
    "mode": "lora",
    "backbone": "test_vit",
    "random_init": True,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "last_n_blocks": 2},
    "config": {"emb_dim": 32, "dropout": 0.0},
    "max_epochs": 8,
    "batch_size": 32,
    "lr": 3e-3,
    "progress": False,
    "patience": 12,
}


def test_add_lora_targets_the_last_blocks() -> None:
    backbone = hst.pp.load_backbone("test_vit", random_init=True)
    spec = add_lora(backbone, LoraSpec(r=2, alpha=4, last_n_blocks=2))
    assert spec.modules == ["blocks.4.attn.qkv", "blocks.5.attn.qkv"]
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n for n in trainable)
    assert all(n.startswith(("blocks.4.", "blocks.5.")) for n in trainable)
    with pytest.raises(ValueError, match="No module"):
        add_lora(hst.pp.load_backbone("test_vit", random_init=True), LoraSpec(target_modules=["nope"]))


@pytest.fixture(scope="module")
def data():
    sdata = hst.datasets.synthetic(n_samples=3, n_rows=8, n_cols=8, n_genes=24, seed=5)
    full = hst.datasets.synthetic(n_samples=4, n_rows=8, n_cols=8, n_genes=24, seed=5)
    test = full.subset(["sample3_image", "sample3_spots"], filter_tables=True)  # a slide not trained on
    return sdata, test


@pytest.fixture(scope="module")
def lora_model(data):
    sdata, _ = data
    torch.manual_seed(0)
    return hst.tl.fit(sdata, genes=list(sdata.tables["table"].var_names), **LORA_FIT)


@pytest.mark.slow
def test_lora_fit_trains_adapters_only_and_learns(data, lora_model) -> None:
    sdata, test = data
    model = lora_model
    assert model.training["mode"] == "lora"
    assert model.lora.modules == ["blocks.4.attn.qkv", "blocks.5.attn.qkv"]
    # the base weights stayed frozen, the adapters moved
    fresh = hst.pp.load_backbone("test_vit", random_init=True)
    bb = model.image_backbone
    assert not any(p.requires_grad for n, p in bb.named_parameters() if "lora_" not in n)
    lora_b = [p for n, p in bb.named_parameters() if "lora_B" in n]
    assert any(float(p.abs().sum()) > 0 for p in lora_b)  # B starts at zero in LoRA
    assert fresh is not bb
    # embeddings were written into the training table
    table = sdata.tables["table"]
    assert table.obsm[Key.OBSM_IMAGE_SPOT].shape == (table.n_obs, 32)
    assert np.isfinite(table.obsm[Key.OBSM_IMAGE_SPOT]).all()
    # held-out slide from H&E only: better than the mean predictor
    pred = hst.tl.predict(model, test, progress=False)
    res = hst.tl.evaluate(test.tables["table"], pred, ks=(10,))
    assert res["pooled", "PCC@10"] > 0.5
    truth = np.log2(1 + test.tables["table"].X.toarray())
    mean = np.log2(1 + table.X.toarray()).mean(0)
    assert res["pooled", "MSE"] < float(((truth - mean) ** 2).mean())


@pytest.mark.slow
def test_lora_save_load_identical(tmp_path, data, lora_model) -> None:
    _, test = data
    path = lora_model.save(tmp_path / "lora")
    assert (path / "backbone.pt").exists()
    loaded = hst.tl.HyperST.load(path)
    crops = hst.pp.crops(test, geometry=lora_model.crop_geometry, progress=False)[0]
    a = lora_model.crop_features(crops.spot[:8])
    b = loaded.crop_features(crops.spot[:8])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    pa, _ = lora_model.predict_features(a, lora_model.crop_features(crops.niche[:8]))
    pb, _ = loaded.predict_features(b, loaded.crop_features(crops.niche[:8]))
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-6)


def test_lora_needs_spatialdata() -> None:
    import anndata as ad

    with pytest.raises(TypeError, match="SpatialData"):
        hst.tl.fit(ad.AnnData(np.ones((4, 3), np.float32)), **LORA_FIT)


@pytest.mark.slow
def test_lora_beats_a_shuffled_label_model(data, lora_model) -> None:
    _, test = data
    shuffled = hst.datasets.synthetic(n_samples=3, n_rows=8, n_cols=8, n_genes=24, seed=5)
    table = shuffled.tables["table"]
    table.X = table.X[np.random.default_rng(0).permutation(table.n_obs)]
    torch.manual_seed(0)
    bad = hst.tl.fit(shuffled, genes=list(table.var_names), **LORA_FIT)
    n = table.n_vars
    scores = {}
    for name, model in (("model", lora_model), ("shuffled", bad)):
        pred = hst.tl.predict(model, test, progress=False, key_added=f"prediction_{name}")
        scores[name] = hst.tl.evaluate(test.tables["table"], pred, ks=(10, n))
    good, worse = scores["model"], scores["shuffled"]
    # measured: PCC@10 0.77 vs 0.34, PCC@24 0.58 vs -0.02, MSE 1.00 vs 1.70
    assert good["pooled", "PCC@10"] > worse["pooled", "PCC@10"] + 0.2
    assert good["pooled", f"PCC@{n}"] > worse["pooled", f"PCC@{n}"] + 0.3
    assert good["pooled", "MSE"] < 0.8 * worse["pooled", "MSE"]
