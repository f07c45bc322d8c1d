"""The model object and its data path: same seed, same numbers as before the redesign; the life-cycle verbs.

``tests/data/redesign_baseline.npz`` holds predictions and embeddings made by ``hst.tl.fit`` /
``hst.tl.predict`` of main at commit 0885989 (before :class:`hyperst.tl.HyperST` owned its life cycle),
with the recipes below, one torch thread, on the project's CPU machine. The redesigned code must give
them bit for bit: through the ``fit``/``predict`` wrappers and through the model's own verbs.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import hyperst as hst
from hyperst._constants import Key

BASELINE = Path(__file__).parent / "data" / "redesign_baseline.npz"
GENES = [f"g{i}" for i in range(10)]
FROZEN = {"config": {"emb_dim": 16}, "max_epochs": 12, "lr": 1e-3, "batch_size": 32, "seed": 3, "progress": False}


@pytest.fixture(scope="module")
def slides(make_feature_slide):
    w = np.random.default_rng(3).normal(scale=0.6, size=(3, len(GENES)))
    return [make_feature_slide(f"s{i}", 8, i, w, genes=GENES, dim=16) for i in range(4)]


@pytest.fixture(scope="module")
def baseline():
    return np.load(BASELINE)


def test_fit_and_predict_are_bit_identical_to_the_pre_redesign_main(slides, baseline, one_thread) -> None:
    train = ad.concat(slides[:3], merge="same")
    model = hst.tl.fit(train, genes=GENES, **FROZEN)  # three slides: one held out for early stopping
    pred = hst.tl.predict(model, slides[3])
    assert model.training["validation"].startswith("slides")
    np.testing.assert_array_equal(pred.layers[Key.LAYER_PRED], baseline["frozen_pred"])
    np.testing.assert_array_equal(pred.obsm[Key.OBSM_IMAGE_SPOT], baseline["frozen_emb"])
    np.testing.assert_array_equal(train.obsm[Key.OBSM_GENE_SPOT], baseline["frozen_train_emb"])
    # two slides: spatially blocked validation; the Euclidean variant
    two = ad.concat(slides[:2], merge="same")
    m2 = hst.tl.fit(two, genes=GENES, preset="euclidean", config={"emb_dim": 16}, max_epochs=10, lr=1e-3,
                    batch_size=32, seed=1, progress=False)
    assert m2.training["validation"] == "spatial blocks"
    np.testing.assert_array_equal(hst.tl.predict(m2, slides[3]).layers[Key.LAYER_PRED], baseline["spatial_pred"])


def test_model_verbs_give_the_same_numbers_as_the_wrappers(slides, baseline, one_thread) -> None:
    train = ad.concat(slides[:3], merge="same")
    before = train.copy()
    model = hst.tl.HyperST.setup(train, genes=GENES, config={"emb_dim": 16}, seed=3)
    assert not model.is_trained
    # setup writes no embedding; only the niche graph it had to build (documented keys of hst.pp.niches)
    assert set(train.obsm.keys()) - set(before.obsm.keys()) == {Key.OBSM_NICHE_EXPRESSION}
    assert Key.OBSP_NICHE_CONNECTIVITIES in train.obsp
    dm = model.datamodule(hst.tl.TrainOptions(seed=3))
    assert isinstance(dm, hst.data.FeatureDataModule)
    assert (dm.n_train, dm.n_val) == (128, 64)  # one of three 64-spot slides validates
    model.train(hst.tl.TrainOptions(max_epochs=12, lr=1e-3, batch_size=32, seed=3, progress=False))
    assert model.is_trained
    assert model.training["epochs"] >= 1
    pred = model.predict(slides[3])
    np.testing.assert_array_equal(pred.layers[Key.LAYER_PRED], baseline["frozen_pred"])
    emb = model.get_embeddings()
    assert set(emb) == {"image_spot", "image_niche", "gene_spot", "gene_niche"}
    np.testing.assert_array_equal(emb["gene_spot"], baseline["frozen_train_emb"])
    # keyword overrides of single training options
    again = hst.tl.HyperST.setup(train, genes=GENES, config={"emb_dim": 16}, seed=3)
    again.train(hst.tl.TrainOptions(lr=1e-3, batch_size=32, seed=3, progress=False), max_epochs=12)
    np.testing.assert_array_equal(again.predict(slides[3]).layers[Key.LAYER_PRED], baseline["frozen_pred"])


def test_lora_fit_is_bit_identical_to_the_pre_redesign_main(baseline, one_thread) -> None:
    pytest.importorskip("peft")
    import torch

    sdata = hst.datasets.synthetic(n_samples=2, n_rows=6, n_cols=6, n_genes=12, seed=5)
    full = hst.datasets.synthetic(n_samples=3, n_rows=6, n_cols=6, n_genes=12, seed=5)
    test = full.subset(["sample2_image", "sample2_spots"], filter_tables=True)
    torch.manual_seed(0)
    model = hst.tl.fit(
        sdata, genes=list(sdata.tables["table"].var_names), mode="lora", backbone="test_vit", random_init=True,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "last_n_blocks": 2}, config={"emb_dim": 16, "dropout": 0.0},
        max_epochs=3, batch_size=16, lr=3e-3, progress=False, seed=2,
    )
    assert isinstance(model.datamodule(hst.tl.TrainOptions(seed=2)), hst.data.CropDataModule)
    # the crops of both slides stay on disk: one stack over the memory-mapped crop caches, nothing copied
    stack = model.registered.spot
    assert isinstance(stack, hst.data.StackedCrops)
    assert len(stack.arrays) == 2
    assert all(isinstance(a, np.memmap) for a in stack.arrays)
    assert stack.shape == (72, 224, 224, 3)
    pred = hst.tl.predict(model, test, key_added="pred", progress=False)
    np.testing.assert_array_equal(np.asarray(pred.layers[Key.LAYER_PRED]), baseline["lora_pred"])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_epochs": 0}, "`max_epochs` must be an integer ≥ 1"),
        ({"batch_size": 0}, "`batch_size` must be an integer ≥ 2"),
        ({"lr": -1}, "`lr` must be a positive number"),
        ({"weight_decay": -0.1}, "`weight_decay` must be a non-negative number"),
        ({"num_workers": -1}, "`num_workers` must be an integer ≥ 0"),
        ({"val_fraction": 1.5}, r"`val_fraction` must be in \(0, 1\)"),
        ({"min_tissue": 2.0}, r"`min_tissue` must be in \[0, 1\]"),
        ({"devices": "two"}, "`devices` must be 'auto', a count"),
    ],
)
def test_bad_training_options_fail_before_anything_changes(slides, options, match) -> None:
    table = slides[0].copy()
    keys = set(table.obsm.keys())
    with pytest.raises(ValueError, match=match):
        hst.tl.fit(table, genes=GENES, progress=False, **options)
    assert set(table.obsm.keys()) == keys
    assert Key.UNS not in table.uns


def test_untrained_model_without_data_says_how_to_build_one(slides) -> None:
    cfg = hst.nn.HyperSTConfig.from_preset("hyperst", n_genes=len(GENES), image_dim=16, emb_dim=8)
    model = hst.tl.HyperST(cfg, genes=GENES)
    with pytest.raises(ValueError, match=r"HyperST\.setup"):
        model.train()


def test_data_splitter_rules() -> None:
    from hyperst.data import DataSplitter

    samples = np.repeat(["a", "b", "c", "d"], 25)
    train, val, how = DataSplitter(samples, validation="auto", val_fraction=0.25, seed=0).split()
    assert how.startswith("slides")
    assert val.sum() == 25
    assert not (train & val).any()
    assert len(set(samples[val])) == 1
    # the same seed draws the same slide, another seed may draw another one
    assert np.array_equal(DataSplitter(samples, validation="auto", val_fraction=0.25, seed=0).split()[1], val)
    # two slides: spatial blocks inside each, with a buffer of 1.5 pitches left out of training
    xy = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2) * 100
    two = np.repeat(["a", "b"], 100)
    train, val, how = DataSplitter(two, np.concatenate([xy, xy]), val_fraction=0.2, seed=1).split()
    assert how == "spatial blocks"
    assert 0 < val[:100].sum() < 60
    assert 0 < val[100:].sum() < 60
    for half in (slice(0, 100), slice(100, 200)):
        t, v = xy[train[half]], xy[val[half]]
        gap = np.linalg.norm(t[:, None] - v[None], axis=-1).min()
        assert gap > 150  # 1.5 × the 100 µm pitch
    with pytest.raises(ValueError, match="spot coordinates"):
        DataSplitter(two, None, validation="spatial").split()
    with pytest.raises(ValueError, match="unknown samples"):
        DataSplitter(two, validation=["z"]).split()


def test_api_page_lifecycle_snippet_runs(slides, tmp_path, monkeypatch, one_thread) -> None:
    import re

    page = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    code = re.search(r"<!-- lifecycle-snippet -->\n```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    train = ad.concat(slides[:3], merge="same")
    train.var["hyperst_selected"] = True  # the genes to predict
    scope = {"hst": hst, "train": train, "test": slides[3].copy()}
    exec(compile(code, "docs/api.md", "exec"), scope)
    model, pred, emb = scope["model"], scope["pred"], scope["embeddings"]
    assert (tmp_path / "hyperst_model" / "hyperst.json").exists()
    assert model.is_trained
    assert pred.layers[Key.LAYER_PRED].shape == (64, len(GENES))
    assert emb["image_spot"].shape == (192, 64)  # Lorentz space components, one row per training spot
    # the snippet ends with the model loaded back from its folder: it predicts the same numbers
    again = model.predict(slides[3].copy())
    np.testing.assert_array_equal(again.layers[Key.LAYER_PRED], pred.layers[Key.LAYER_PRED])
