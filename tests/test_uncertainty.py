"""Ensembles, calibrated prediction intervals and domain-shift checks (hst.tl.fit / predict / evaluate)."""

from __future__ import annotations

import functools
import operator

import anndata as ad
import numpy as np
import pytest

import hyperst as hst
from hyperst._constants import Key
from hyperst.data import DataSplitter
from hyperst.tl._domain import DomainReference, domain_reference
from hyperst.tl._uncertainty import FeatureSpace, MemberResiduals, calibrate

GENES = [f"g{i}" for i in range(10)]
FIT = {"config": {"emb_dim": 16}, "max_epochs": 15, "lr": 1e-3, "batch_size": 32, "seed": 0, "progress": False}


# ---------------------------------------------------------------------------------------------- splits
def test_member_splits_hold_out_every_slide_once() -> None:
    samples = np.repeat(["a", "b", "c", "d"], 5)
    splitter = DataSplitter(samples, validation="auto", seed=1)
    assert splitter.n_members("auto") == 4
    splits = splitter.member_splits("auto")
    held = [sorted(set(samples[v])) for _, v, _ in splits]
    # each slide is held out by exactly one member
    assert sorted(functools.reduce(operator.iadd, held, [])) == ["a", "b", "c", "d"]
    for train, val, how in splits:
        assert not (train & val).any()
        assert (train | val).all()
        assert how.startswith("slides")
    two = DataSplitter(samples, validation="auto", seed=1).member_splits(2)
    assert [int(v.sum()) for _, v, _ in two] == [10, 10]
    # one member: exactly the single-model split
    one = DataSplitter(samples, validation="auto", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(one.member_splits(1)[0][:2], one.split()[:2], strict=True))
    # fewer than three slides: one member (spatial blocks); explicit validation cannot rotate
    assert DataSplitter(samples[:10], validation="auto").n_members("auto") == 1
    with pytest.raises(ValueError, match="rotates the validation"):
        DataSplitter(samples, validation=["a"]).member_splits(2)
    with pytest.raises(ValueError, match="as many slides"):
        DataSplitter(samples, validation="slide").member_splits(5)
    with pytest.raises(ValueError, match="n_members"):
        hst.tl.DataOptions(n_members=0)


def test_spatial_members_draw_different_blocks() -> None:
    rng = np.random.default_rng(0)
    xy = np.column_stack([np.repeat(np.arange(12), 12), np.tile(np.arange(12), 12)]) * 100.0
    splits = DataSplitter(np.zeros(len(xy)), xy + rng.normal(scale=1e-3, size=xy.shape), validation="spatial",
                          seed=0).member_splits(3)
    vals = [v for _, v, _ in splits]
    assert all(v.any() for v in vals)
    assert not np.array_equal(vals[0], vals[1])


# ---------------------------------------------------------------------------------------------- calibration
def _members(rng: np.random.Generator, n: int, k: int, g: int, spread: np.ndarray, noise: float = 0.5):
    """Truth, and k member predictions whose errors are a shared noise + a member offset scaled by ``spread``.

    (Members share most of their training data, so most of their error is shared.)
    """
    truth = 3 + rng.normal(size=(n, g))
    common = noise * rng.normal(size=(n, g))
    preds = [np.maximum(truth + common + spread[:, None] * rng.normal(size=(1, g)), 0) for _ in range(k)]
    return truth, np.stack(preds)


def test_intervals_cover_and_widen_where_members_disagree() -> None:
    rng = np.random.default_rng(0)
    d, k, g = 6, 4, 8
    space = FeatureSpace.fit(rng.normal(size=(400, d)))
    # calibration: each member's held-out spots, homogeneous difficulty
    cal = []
    for _ in range(k):
        x = rng.normal(size=(300, d))
        truth = 3 + rng.normal(size=(300, g))
        cal.append(MemberResiduals(np.maximum(truth + 0.5 * rng.normal(size=truth.shape), 0), truth, x))
    calib = calibrate(space, cal)
    assert calib.atoms.shape == (k, 200, g)
    assert calib.weights.tolist() == [300.0] * k
    x = rng.normal(size=(2000, d))
    spread = np.where(np.arange(2000) < 1000, 0.0, 1.0)  # the second half: members disagree
    truth, preds = _members(rng, 2000, k, g, spread)
    bands = calib.intervals(preds, space.whiten(x), alpha=0.1)
    inside = (truth >= bands["lower"]) & (truth <= bands["upper"])
    cov_agree = inside[:1000].mean()
    assert 0.86 < cov_agree < 0.94  # nominal 0.9 where the calibration matches the test errors
    width = bands["upper"] - bands["lower"]
    assert width[1000:].mean() > 1.3 * width[:1000].mean()  # wider where members disagree
    assert bands["uncertainty"][1000:].mean() > bands["uncertainty"][:1000].mean()
    assert (bands["lower"] >= 0).all()
    assert (bands["upper"] >= bands["lower"]).all()
    # the predictive sd is the mixture's: member spread and residual variance (difficulty ≈ 1 here)
    u = calib.difficulty(space.whiten(x[:5]), preds[0, :5])
    assert np.allclose(u, u.mean(), rtol=0.2)
    # smaller alpha, wider intervals; bad alpha
    wide = calib.intervals(preds[:, :200], space.whiten(x[:200]), alpha=0.02)
    assert (wide["upper"] - wide["lower"]).mean() > width[:200].mean()
    with pytest.raises(ValueError, match="alpha"):
        calib.intervals(preds, space.whiten(x), alpha=1.5)


def test_difficulty_model_learns_which_spots_err() -> None:
    rng = np.random.default_rng(1)
    d, g = 4, 6
    feats = rng.normal(size=(2000, d))
    space = FeatureSpace.fit(feats)
    cal = []
    for _ in range(2):
        x = rng.normal(size=(600, d))
        noise = np.exp(0.8 * x[:, 0])  # errors grow along the first feature
        truth = 4 + rng.normal(size=(600, g))
        cal.append(MemberResiduals(truth + noise[:, None] * rng.normal(size=truth.shape) * 0.3, truth, x))
    calib = calibrate(space, cal)
    x = rng.normal(size=(1000, d))
    noise = np.exp(0.8 * x[:, 0])
    truth = 4 + rng.normal(size=(1000, g))
    pred = truth + noise[:, None] * rng.normal(size=truth.shape) * 0.3
    bands = calib.intervals(np.stack([pred, pred]), space.whiten(x))
    from scipy.stats import spearmanr

    assert spearmanr(bands["uncertainty"], np.abs(truth - pred).mean(1))[0] > 0.5
    inside = (truth >= bands["lower"]) & (truth <= bands["upper"])
    assert 0.85 < inside.mean() < 0.95
    # coverage holds in both halves of the difficulty range (locally weighted, not one width for all)
    hard = x[:, 0] > 0
    assert inside[hard].mean() > 0.82
    assert inside[~hard].mean() > 0.82


# ---------------------------------------------------------------------------------------------- domain
def test_ood_threshold_is_calibrated_and_flags_shifted_slides() -> None:
    rng = np.random.default_rng(2)
    mix = rng.normal(size=(20, 40))
    feats = rng.normal(size=(1200, 20)) @ mix + 0.1 * rng.normal(size=(1200, 40))
    samples = np.repeat(["a", "b", "c", "d"], 300)
    held = [samples == s for s in "abcd"]
    slides = {s: {"pixel_size": 0.5, "od_mean": [0.3 + 0.01 * i, 0.4, 0.2], "od_std": [0.1, 0.1, 0.1]}
              for i, s in enumerate("abcd")}
    ref = domain_reference(feats, samples, held, slides=slides, n_components=8)
    assert 0.03 < np.mean(list(ref.held_out.values())) < 0.08  # ≈ 5 % of held-out training-domain spots
    new = rng.normal(size=(300, 20)) @ mix + 0.1 * rng.normal(size=(300, 40))
    shifted = new + 8 * rng.normal(size=(1, 40))
    score, flag, report = ref.check(np.concatenate([new, shifted]), np.repeat(["same", "shifted"], 300),
                                    {"same": {"pixel_size": 0.5, "od_mean": [0.315, 0.4, 0.2]},
                                     "shifted": {"pixel_size": 2.0, "od_mean": [0.9, 0.4, 0.2]}})
    same, moved = report["slides"]["same"], report["slides"]["shifted"]
    assert same["flags"] == []
    assert same["ood_fraction"] < 0.12
    assert set(moved["flags"]) == {"ood", "colour"}
    assert moved["notes"] == ["pixel_size"]  # a coarser scan is a note, not an alarm
    assert moved["ood_fraction"] > 0.9
    assert report["flagged"]
    assert len(report["messages"]) == 2
    assert len(report["notes"]) == 1
    assert "2.00 µm/px" in report["notes"][0]
    assert "upsampled" in report["notes"][0]
    assert flag.dtype == bool
    assert score.shape == (600,)
    # the reference round-trips through its record and arrays
    back = DomainReference(FeatureSpace.from_tensors(ref.space.tensors()), **{
        k: v for k, v in ref.record().items()})
    np.testing.assert_array_equal(back.space.score(new), ref.space.score(new))


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def slides(make_feature_slide):
    w = np.random.default_rng(3).normal(scale=0.6, size=(3, len(GENES)))
    return [make_feature_slide(f"s{i}", 8, i, w, genes=GENES, dim=16) for i in range(5)]


@pytest.fixture(scope="module")
def ensemble(slides, one_thread):
    return hst.tl.fit(ad.concat(slides[:4], merge="same"), genes=GENES, **FIT)


def test_fit_trains_one_member_per_held_out_slide(ensemble, slides) -> None:
    assert ensemble.n_members == 4
    assert ensemble.training["n_members"] == 4
    held = [m["validation_samples"] for m in ensemble.training["members"]]
    assert sorted(functools.reduce(operator.iadd, held, [])) == ["s0", "s1", "s2", "s3"]
    assert [m["seed"] for m in ensemble.training["members"]] == [0, 1, 2, 3]
    assert len(ensemble.member_histories) == 4
    assert ensemble.history == ensemble.member_histories[0]
    # members differ (their own seed and validation slide); the prediction is their mean, never negative
    x = slides[4].obsm[Key.OBSM_FEATURES_SPOT], slides[4].obsm[Key.OBSM_FEATURES_NICHE]
    members, _ = ensemble.predict_members(*x)
    assert members.shape == (4, 64, len(GENES))
    assert not np.allclose(members[0], members[1])
    mean, _ = ensemble.predict_features(*x)
    np.testing.assert_allclose(mean, members.mean(0), rtol=1e-6)
    assert (members >= 0).all()
    assert ensemble.calibration is not None
    assert ensemble.domain is not None


def test_predict_writes_calibrated_intervals_and_domain_checks(ensemble, slides, tmp_path) -> None:
    test = slides[4]
    before = test.copy()
    out = hst.tl.predict(ensemble, test)
    pred, lo, hi = out.layers[Key.LAYER_PRED], out.layers[Key.LAYER_LOWER], out.layers[Key.LAYER_UPPER]
    assert (lo <= pred + 1e-6).mean() > 0.99
    assert (pred <= hi + 1e-6).mean() > 0.99
    y = np.log2(1 + test[:, GENES].X)
    ev = hst.tl.evaluate(test, out)
    cov = ev["pooled", "coverage"]
    assert cov == pytest.approx(((y >= lo) & (y <= hi)).mean())
    assert 0.75 < cov <= 1.0
    assert ev["pooled", "width"] == pytest.approx((hi - lo).mean())
    assert np.isfinite(ev["pooled", "spearman_uncertainty_mae"])
    np.testing.assert_allclose(out.obs[Key.OBS_UNCERTAINTY], out.layers[Key.LAYER_STD].mean(1), rtol=1e-5)
    assert out.obs[Key.OBS_OOD].dtype == bool
    rec = out.uns[Key.UNS][Key.UNS_PREDICT]
    assert rec["alpha"] == 0.1
    assert rec["n_members"] == 4
    assert rec[Key.UNS_DOMAIN]["slides"]["s4"]["ood_fraction"] == pytest.approx(out.obs[Key.OBS_OOD].mean())
    assert not rec[Key.UNS_DOMAIN]["flagged"]  # same distribution as training
    assert test.obs.equals(before.obs)
    assert set(test.layers) == set(before.layers)
    out.write_h5ad(tmp_path / "pred.h5ad")  # every record stores in h5ad
    # a heavily shifted copy is flagged, with a warning
    moved = test.copy()
    for key in (Key.OBSM_FEATURES_SPOT, Key.OBSM_FEATURES_NICHE):
        moved.obsm[key] = moved.obsm[key] + 5.0
    shifted = hst.tl.predict(ensemble, moved)
    dom = shifted.uns[Key.UNS][Key.UNS_PREDICT][Key.UNS_DOMAIN]
    assert dom["flagged"]
    assert shifted.obs[Key.OBS_OOD].mean() > 0.9
    # narrower intervals with a larger alpha
    narrow = hst.tl.predict(ensemble, test, alpha=0.5)
    assert (narrow.layers[Key.LAYER_UPPER] - narrow.layers[Key.LAYER_LOWER]).mean() < (hi - lo).mean()
    with pytest.raises(ValueError, match="alpha"):
        hst.tl.predict(ensemble, test, alpha=0)


def test_ensemble_round_trips_through_a_model_folder(ensemble, slides, tmp_path) -> None:
    import torch

    path = ensemble.save(tmp_path / "m")
    assert (path / "members.pt").exists()
    assert (path / "calibration.pt").exists()
    for f in ("weights.pt", "members.pt", "calibration.pt"):
        state = torch.load(path / f, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = hst.tl.HyperST.load(path)
    assert back.n_members == 4
    assert len(back.member_histories) == 4
    a, b = hst.tl.predict(ensemble, slides[4]), hst.tl.predict(back, slides[4])
    for layer in (Key.LAYER_PRED, Key.LAYER_LOWER, Key.LAYER_UPPER, Key.LAYER_STD):
        np.testing.assert_array_equal(a.layers[layer], b.layers[layer])
    np.testing.assert_array_equal(a.obs[Key.OBS_OOD_SCORE], b.obs[Key.OBS_OOD_SCORE])
    # saving a single model over it removes the stale ensemble files
    single = hst.tl.fit(ad.concat(slides[:4], merge="same"), genes=GENES, n_members=1, validation=None,
                        **{**FIT, "max_epochs": 2})
    single.save(path, overwrite=True)
    assert not (path / "members.pt").exists()
    assert not (path / "calibration.pt").exists()
    loaded = hst.tl.HyperST.load(path)
    assert loaded.n_members == 1
    assert loaded.calibration is None
    plain = hst.tl.predict(loaded, slides[4])
    assert Key.LAYER_LOWER not in plain.layers
    assert Key.OBS_OOD not in plain.obs


def test_evaluate_interval_metrics_on_known_values() -> None:
    truth = np.array([[0.0, 1.0], [2.0, 3.0], [1.0, 1.0]])
    pred = np.array([[0.5, 1.0], [2.0, 2.0], [1.0, 0.0]])
    lower, upper = pred - 0.6, pred + 0.6
    ev = hst.tl.evaluate(truth, pred, truth_transform="none", groups=None, ks=[1], intervals=(lower, upper),
                         uncertainty=np.array([0.1, 0.9, 0.5]))
    assert ev["pooled", "coverage"] == pytest.approx(4 / 6)
    assert ev["pooled", "width"] == pytest.approx(1.2)
    # per-spot MAE: 0.25, 0.5, 0.5 → ranks agree partly with the uncertainty 0.1 < 0.5 < 0.9
    assert ev["pooled", "spearman_uncertainty_mae"] == pytest.approx(0.866, abs=1e-3)
    with pytest.raises(ValueError, match="intervals"):
        hst.tl.evaluate(truth, pred, truth_transform="none", groups=None, intervals=(lower[:2], upper))
