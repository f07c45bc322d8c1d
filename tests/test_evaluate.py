"""Metrics against a hand-computed example."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from hyperst.tl._evaluate import evaluate, pcc_at_k, pearson_per_gene


def test_pearson_and_pcc_by_hand() -> None:
    truth = np.array([[1.0, 0.0, 5.0], [2.0, 1.0, 5.0], [3.0, 0.0, 5.0]])
    pred = np.array([[2.0, 1.0, 1.0], [4.0, 0.0, 2.0], [6.0, 1.0, 3.0]])
    r = pearson_per_gene(truth, pred)
    # gene 0: perfectly correlated; gene 1: anti-correlated (r = -1); gene 2: constant truth → 0
    np.testing.assert_allclose(r, [1.0, -1.0, 0.0])
    assert pcc_at_k(r, 1) == 1.0
    assert pcc_at_k(r, 2) == 0.5
    assert pcc_at_k(r, 10) == 0.0  # fewer genes than K: mean of all
    with pytest.raises(ValueError, match="K must be positive"):
        pcc_at_k(r, 0)


def test_evaluate_hand_example_pooled_and_per_slide() -> None:
    counts = np.array([[0, 1], [1, 3], [3, 0], [7, 7]], dtype=np.float32)
    obs = pd.DataFrame({"sample": ["a", "a", "b", "b"]}, index=[f"s{i}" for i in range(4)])
    truth = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=["G1", "G2"]))
    log_truth = np.log2(1 + counts)  # [[0,1],[1,2],[2,0],[3,3]]
    pred_x = np.array([[0.0, 1.0], [2.0, 2.0], [2.0, 1.0], [3.0, 3.0]])
    pred = ad.AnnData(np.zeros((4, 2), dtype=np.float32), obs=obs.copy(), var=pd.DataFrame(index=["G1", "G2"]))
    pred.layers["hyperst_pred"] = pred_x
    res = evaluate(truth, pred, ks=(1, 2))
    err = pred_x - log_truth
    assert res["pooled", "MSE"] == pytest.approx((err**2).mean())  # (1 + 1) / 8 = 0.25
    assert res["pooled", "MSE"] == pytest.approx(0.25)
    assert res["pooled", "MAE"] == pytest.approx(0.25)
    r_pooled = [np.corrcoef(log_truth[:, g], pred_x[:, g])[0, 1] for g in range(2)]
    assert res["pooled", "PCC@1"] == pytest.approx(max(r_pooled))
    assert res["pooled", "PCC@2"] == pytest.approx(np.mean(r_pooled))
    # slide a: G1 truth (0,1) pred (0,2) → r = 1; G2 truth (1,2) pred (1,2) → r = 1
    assert res["a", "PCC@2"] == pytest.approx(1.0)
    # slide b: G1 truth (2,3) pred (2,3) → 1; G2 truth (0,3) pred (1,3) → 1
    assert res["b", "PCC@2"] == pytest.approx(1.0)
    assert res["a", "MSE"] == pytest.approx(0.25)  # one error of 1 in four entries
    assert res["mean_over_slides", "PCC@2"] == pytest.approx(1.0)
    assert res["mean_over_slides", "n_spots"] == 4
    wide = res.wide()
    assert list(wide.index) == ["pooled", "a", "b", "mean_over_slides"]
    assert {"PCC@1", "PCC@2", "MSE", "MAE"} <= set(wide.columns)
    per_gene = res.per_gene
    assert set(per_gene.columns) == {"scope", "gene", "pearson_r"}
    assert len(per_gene) == 2 * 3


def test_evaluate_arrays_and_errors() -> None:
    t = np.abs(np.random.default_rng(0).normal(size=(10, 4)))
    res = evaluate(t, np.log2(1 + t), groups=None, ks=(2,))
    assert res["pooled", "PCC@2"] == pytest.approx(1.0)
    assert res["pooled", "MSE"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="do not align"):
        evaluate(t, t[:, :3], groups=None)
    bad = t.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(bad, t, groups=None)
    with pytest.raises(ValueError, match="negative"):
        evaluate(-t, t, groups=None)
    truth = ad.AnnData(t.astype(np.float32), var=pd.DataFrame(index=list("ABCD")))
    pred = ad.AnnData(t.astype(np.float32), var=pd.DataFrame(index=list("ABCE")))
    with pytest.raises(ValueError, match="missing from `truth`"):
        evaluate(truth, pred)
