"""The model object and its data path: same seed, same numbers as before the redesign; the life-cycle verbs.

``tests/data/redesign_baseline.npz`` holds predictions and embeddings made by ``hst.tl.fit`` /
``hst.tl.predict`` of main at commit 0885989 (before :class:`hyperst.tl.HyperST` owned its life cycle),
with the recipes of :func:`record`, one torch thread, in a fresh process on the project's CPU machine. The
redesigned code must give them bit for bit, through the ``fit``/``predict`` wrappers and through the model's
own verbs. The recipes run in a fresh interpreter too (the ``fresh`` fixture), as the baseline did: tests that
ran before in the same process can leave torch in another state (kernels, thread pools), which moves float32
results by an ulp.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import hyperst as hst
from hyperst._constants import Key

BASELINE = Path(__file__).parent / "data" / "redesign_baseline.npz"
GENES = [f"g{i}" for i in range(10)]
# one member: the pre-redesign model (ensembles, the default since, are tested in test_uncertainty.py)
FROZEN = {"config": {"emb_dim": 16}, "max_epochs": 12, "lr": 1e-3, "batch_size": 32, "seed": 3, "progress": False,
          "n_members": 1}


LORA = {
    "mode": "lora", "backbone": "test_vit", "random_init": True, "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
    "last_n_blocks": 2}, "config": {"emb_dim": 16, "dropout": 0.0}, "max_epochs": 3, "batch_size": 16, "lr": 3e-3,
    "progress": False, "seed": 2,
}


def _slides(make_slide) -> list[ad.AnnData]:
    w = np.random.default_rng(3).normal(scale=0.6, size=(3, len(GENES)))
    return [make_slide(f"s{i}", 8, i, w, genes=GENES, dim=16) for i in range(4)]


def _lora_data():
    sdata = hst.datasets.synthetic(n_samples=2, n_rows=6, n_cols=6, n_genes=12, seed=5)
    full = hst.datasets.synthetic(n_samples=3, n_rows=6, n_cols=6, n_genes=12, seed=5)
    return sdata, full.subset(["sample2_image", "sample2_spots"], filter_tables=True)


def record(path: str) -> None:
    """Run every recipe and save its outputs to ``path`` (called in a fresh interpreter by ``fresh``)."""
    import torch

    from conftest import feature_slide

    torch.set_num_threads(1)
    slides = _slides(feature_slide)
    out: dict[str, np.ndarray] = {}
    train = ad.concat(slides[:3], merge="same")  # three slides: one held out for early stopping
    model = hst.tl.fit(train, genes=GENES, **FROZEN)
    pred = hst.tl.predict(model, slides[3])
    out["frozen_validation"] = np.array(model.training["validation"])
    out["frozen_pred"] = pred.layers[Key.LAYER_PRED]
    out["frozen_emb"] = pred.obsm[Key.OBSM_IMAGE_SPOT]
    out["frozen_train_emb"] = train.obsm[Key.OBSM_GENE_SPOT]
    # the same through the model's verbs
    verbs = hst.tl.HyperST.setup(ad.concat(slides[:3], merge="same"), genes=GENES, config={"emb_dim": 16}, seed=3,
                                 options=hst.tl.DataOptions(n_members=1))
    verbs.train(hst.tl.TrainOptions(max_epochs=12, lr=1e-3, batch_size=32, seed=3, progress=False))
    out["verbs_pred"] = verbs.predict(slides[3]).layers[Key.LAYER_PRED]
    out["verbs_train_emb"] = verbs.get_embeddings()["gene_spot"]
    # two slides: spatially blocked validation; the Euclidean variant
    two = ad.concat(slides[:2], merge="same")
    m2 = hst.tl.fit(two, genes=GENES, preset="euclidean", config={"emb_dim": 16}, max_epochs=10, lr=1e-3,
                    batch_size=32, seed=1, progress=False)
    out["spatial_validation"] = np.array(m2.training["validation"])
    out["spatial_pred"] = hst.tl.predict(m2, slides[3]).layers[Key.LAYER_PRED]
    # LoRA through a tiny random ViT, predicted from the H&E image of a slide it did not see
    sdata, test = _lora_data()
    lora = hst.tl.fit(sdata, genes=list(sdata.tables["table"].var_names), **LORA)
    out["lora_pred"] = np.asarray(hst.tl.predict(lora, test, key_added="pred", progress=False).layers[Key.LAYER_PRED])
    np.savez(path, **out)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("redesign") / "fresh.npz"
    here = Path(__file__).resolve()
    code = (
        f"import sys, runpy; sys.path.insert(0, {str(here.parent)!r}); "
        f"runpy.run_path({str(here)!r})['record']({str(path)!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(path))


@pytest.fixture(scope="module")
def slides(make_feature_slide):
    return _slides(make_feature_slide)


@pytest.fixture(scope="module")
def baseline():
    return np.load(BASELINE)


def test_fit_and_predict_are_bit_identical_to_the_pre_redesign_main(fresh, baseline) -> None:
    assert str(fresh["frozen_validation"]).startswith("slides")
    assert str(fresh["spatial_validation"]) == "spatial blocks"
    for key in ("frozen_emb", "frozen_train_emb"):
        np.testing.assert_array_equal(fresh[key], baseline[key], err_msg=key)
    # predictions are now clamped at 0 (the log scale has no negative values); otherwise unchanged
    for key in ("frozen_pred", "spatial_pred"):
        assert (baseline[key] < 0).any(), key  # the clamp is exercised
        np.testing.assert_array_equal(fresh[key], np.maximum(baseline[key], 0), err_msg=key)


def test_model_verbs_are_bit_identical_to_the_pre_redesign_main(fresh, baseline) -> None:
    np.testing.assert_array_equal(fresh["verbs_pred"], np.maximum(baseline["frozen_pred"], 0))
    np.testing.assert_array_equal(fresh["verbs_train_emb"], baseline["frozen_train_emb"])


def test_lora_fit_is_bit_identical_to_the_pre_redesign_main(fresh, baseline) -> None:
    pytest.importorskip("peft")
    np.testing.assert_array_equal(fresh["lora_pred"], np.maximum(baseline["lora_pred"], 0))


def test_model_life_cycle(slides, one_thread) -> None:
    train = ad.concat(slides[:3], merge="same")
    before = train.copy()
    one = hst.tl.DataOptions(n_members=1)
    model = hst.tl.HyperST.setup(train, genes=GENES, config={"emb_dim": 16}, seed=3, options=one)
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
    emb = model.get_embeddings()
    assert set(emb) == {"image_spot", "image_niche", "gene_spot", "gene_niche"}
    # the wrapper gives the same numbers in the same process, and writes them into the table
    wrapped_train = ad.concat(slides[:3], merge="same")
    wrapped = hst.tl.fit(wrapped_train, genes=GENES, **FROZEN)
    np.testing.assert_array_equal(emb["gene_spot"], wrapped_train.obsm[Key.OBSM_GENE_SPOT])
    pred = model.predict(slides[3])
    wrapped_pred = hst.tl.predict(wrapped, slides[3]).layers[Key.LAYER_PRED]
    np.testing.assert_array_equal(pred.layers[Key.LAYER_PRED], wrapped_pred)
    # keyword overrides of single training options
    again = hst.tl.HyperST.setup(train, genes=GENES, config={"emb_dim": 16}, seed=3, options=one)
    again.train(hst.tl.TrainOptions(lr=1e-3, batch_size=32, seed=3, progress=False), max_epochs=12)
    np.testing.assert_array_equal(again.predict(slides[3]).layers[Key.LAYER_PRED], pred.layers[Key.LAYER_PRED])


def test_lora_path_keeps_crops_on_disk(one_thread) -> None:
    pytest.importorskip("peft")
    sdata, _ = _lora_data()
    image = hst.tl.ImageOptions(backbone="test_vit", random_init=True, lora=LORA["lora"])
    model = hst.tl.HyperST.setup(sdata, mode="lora", config=LORA["config"], image=image, seed=2, progress=False)
    assert isinstance(model.datamodule(hst.tl.TrainOptions(seed=2)), hst.data.CropDataModule)
    # the crops of both slides stay on disk: one stack over the memory-mapped crop caches, nothing copied
    stack = model.registered.spot
    assert isinstance(stack, hst.data.StackedCrops)
    assert len(stack.arrays) == 2
    assert all(isinstance(a, np.memmap) for a in stack.arrays)
    assert stack.shape == (72, 224, 224, 3)
    # min_tissue selects rows of the stack without reading crops
    options = hst.tl.DataOptions(min_tissue=0.5)
    kept = hst.tl.HyperST.setup(sdata, mode="lora", config=LORA["config"], image=image, options=options, seed=2,
                                progress=False)
    assert isinstance(kept.registered.spot, hst.data.StackedCrops)
    # the crops' own tissue fractions decide (hst.pp.image_features has not run on this data)
    assert Key.OBS_TISSUE_FRACTION not in sdata.tables["table"].obs
    tissue = np.concatenate([p.data.obs[Key.OBS_TISSUE_FRACTION].to_numpy() for p in model.registered.parts])
    assert 0 < int((tissue >= 0.5).sum()) < 72
    assert len(kept.registered.spot) == int((tissue >= 0.5).sum())
    np.testing.assert_array_equal(kept.registered.spot[0], stack[int(np.flatnonzero(tissue >= 0.5)[0])])


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


def test_frozen_min_tissue_trains_on_tissue_spots_and_embeds_every_spot(slides, one_thread) -> None:
    train = ad.concat(slides[:3], merge="same")
    frac = np.linspace(0.0, 1.0, train.n_obs, dtype=np.float32)
    train.obs[Key.OBS_TISSUE_FRACTION] = frac
    model = hst.tl.fit(train, genes=GENES, min_tissue=0.25, validation=None, config={"emb_dim": 16}, max_epochs=2,
                       lr=1e-3, batch_size=32, seed=3, progress=False)
    keep = frac >= 0.25
    assert model.training["n_train"] == int(keep.sum()) == 144
    # every spot has features, so every spot gets embeddings (the gene streams from its own counts)
    for key in (Key.OBSM_IMAGE_SPOT, Key.OBSM_GENE_SPOT, Key.OBSM_GENE_NICHE):
        assert train.obsm[key].shape == (192, 16)
        assert np.isfinite(train.obsm[key]).all()
    emb = model.get_embeddings()  # the 144 registered training spots
    np.testing.assert_allclose(train.obsm[Key.OBSM_IMAGE_SPOT][keep], emb["image_spot"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(train.obsm[Key.OBSM_GENE_SPOT][keep], emb["gene_spot"], rtol=1e-5, atol=1e-6)
    # niche targets in training come from the training spots only (as before the redesign), those written
    # back from every measured spot: they differ exactly for kept spots that neighbour a left-out one
    xy, sample = train.obsm["spatial"], train.obs["sample"].to_numpy()
    near = np.linalg.norm(xy[:, None] - xy[None], axis=-1) <= 150  # the 3 × 3 niche of a square grid
    borders = (near & (sample[:, None] == sample[None]) & ~keep[None]).any(axis=1)[keep]
    differs = ~np.isclose(train.obsm[Key.OBSM_GENE_NICHE][keep], emb["gene_niche"], rtol=1e-5, atol=1e-6).all(1)
    assert borders.sum() == 8
    np.testing.assert_array_equal(differs, borders)
