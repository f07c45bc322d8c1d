"""hst.pl: spatial maps, scatter, Poincaré disk, radii, training history, gene scores, intervals, reliability."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.patches import Polygon, Rectangle
from scipy.stats import rankdata

import hyperst as hst
from hyperst import geometry as geo
from hyperst._constants import Key
from hyperst.pl._embedding import disk_coordinates, poincare, radius
from hyperst.pl._expression import scatter, spatial
from hyperst.pl._training import gene_scores, history
from hyperst.pl._uncertainty import intervals, reliability

N_GENES, DIM, SIDE = 12, 16, 8
STREAM_KEYS = [Key.OBSM_IMAGE_SPOT, Key.OBSM_IMAGE_NICHE, Key.OBSM_GENE_SPOT, Key.OBSM_GENE_NICHE]


@pytest.fixture(scope="module")
def trained(make_feature_slide) -> dict:
    w = np.random.default_rng(0).normal(size=(3, N_GENES)) * 0.8
    genes = [f"G{i}" for i in range(N_GENES)]
    slides = [make_feature_slide(f"s{i}", SIDE, seed=i, w=w, genes=genes, dim=DIM, offset=60.0) for i in range(3)]
    train = [s.copy() for s in slides[:2]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: intra-op threads only contend on a busy CPU (30 s vs 0.3 s)
    try:
        model = hst.tl.fit(
            train,
            genes=[f"G{i}" for i in range(N_GENES)],
            config={"emb_dim": DIM, "dropout": 0.0},
            max_epochs=4,
            batch_size=32,
            lr=2e-3,
            progress=False,
            patience=10,
        )
    finally:
        torch.set_num_threads(threads)
    test = slides[2]
    pred = hst.tl.predict(model, test)
    return {"model": model, "train": train[0], "test": test, "pred": pred, "eval": hst.tl.evaluate(test, pred)}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _not_blank(path) -> None:
    img = mpimg.imread(path)
    assert img.ndim == 3
    assert min(img.shape[:2]) > 100
    assert img[..., :3].std() > 0.05


# ---------------------------------------------------------------------------------------------- spatial
def test_spatial_shared_scale_and_values(tmp_path, trained) -> None:
    pred, test = trained["pred"], trained["test"]
    genes = ["G0", "G3"]
    fig = spatial(pred, genes, truth=test, save=tmp_path / "spatial.png")
    _not_blank(tmp_path / "spatial.png")
    assert len(fig.axes) == 2 * len(genes) + len(genes)  # panels + one colour bar per gene
    panels = fig.axes[: 2 * len(genes)]
    r = trained["eval"].per_gene.query("scope == 'pooled'").set_index("gene")["pearson_r"]
    for g, gene in enumerate(genes):
        p_ax, o_ax = panels[2 * g], panels[2 * g + 1]
        p_col, o_col = p_ax.collections[0], o_ax.collections[0]
        assert len(p_col.get_offsets()) == len(o_col.get_offsets()) == test.n_obs
        np.testing.assert_allclose(p_col.get_offsets(), test.obsm["spatial"])
        p_vals = pred[:, gene].layers[Key.LAYER_PRED].ravel()
        o_vals = np.log2(1 + test[:, gene].X.ravel())
        np.testing.assert_allclose(p_col.get_array(), p_vals, rtol=1e-6)
        np.testing.assert_allclose(o_col.get_array(), o_vals, rtol=1e-6)
        assert p_col.get_clim() == o_col.get_clim()
        np.testing.assert_allclose(p_col.get_clim(), (min(p_vals.min(), o_vals.min()), max(p_vals.max(), o_vals.max())))
        assert p_ax.get_title() == f"{gene} predicted (r = {r[gene]:.2f})"
        assert o_ax.get_title() == f"{gene} observed"
        assert p_ax.get_ylim()[0] > p_ax.get_ylim()[1]  # image orientation
    # `truth` in another spot order is aligned on obs_names
    fig_rev = spatial(pred, "G3", truth=test[::-1].copy(), show=False)
    np.testing.assert_allclose(fig_rev.axes[1].collections[0].get_array(), np.log2(1 + test[:, "G3"].X.ravel()))
    # without `truth`, the counts hst.tl.predict kept in .X are the observed values
    fig2 = spatial(pred, "G3", show=False)
    np.testing.assert_allclose(fig2.axes[1].collections[0].get_array(), np.log2(1 + test[:, "G3"].X.ravel()))
    # layer=None plots .X (here the counts) as "prediction" and finds no observed values
    fig3 = spatial(pred, "G3", layer=None, show=False)
    assert len(fig3.axes) == 2
    np.testing.assert_allclose(fig3.axes[0].collections[0].get_array(), test[:, "G3"].X.ravel())


def test_spatial_image_samples_layout_and_errors(tmp_path, trained) -> None:
    pred, test = trained["pred"], trained["test"]
    image = np.random.default_rng(0).integers(0, 255, size=(400, 420, 3), dtype=np.uint8)
    fig = spatial(
        pred, ["G0", "G1", "G2"], image=image, scale_factor=0.5, ncols=2, spot_size=80, save=tmp_path / "img.png"
    )
    _not_blank(tmp_path / "img.png")
    assert len(fig.axes) == 6 + 3
    panels = fig.axes[:6]
    assert all(len(ax.images) == 1 for ax in panels)
    np.testing.assert_allclose(panels[0].collections[0].get_offsets(), 0.5 * test.obsm["spatial"])
    np.testing.assert_allclose(panels[0].collections[0].get_widths(), 40.0)  # 80 px × 0.5, in data units
    # two samples in one table: one at a time
    other = test.copy()
    other.obs_names = [f"x{i}" for i in range(other.n_obs)]
    other.obs["sample"] = "s9"
    both = ad.concat([test, other])
    pred_both = hst.tl.predict(trained["model"], both)
    with pytest.raises(ValueError, match="pass `sample=`"):
        spatial(pred_both, "G0", show=False)
    fig = spatial(pred_both, "G0", sample="s9", show=False)
    assert len(fig.axes[0].collections[0].get_offsets()) == other.n_obs
    with pytest.raises(ValueError, match="not in"):
        spatial(pred_both, "G0", sample="nope", show=False)
    with pytest.raises(ValueError, match=r"Unknown gene\(s\) \['NOPE'\]"):
        spatial(pred, ["G0", "NOPE"], show=False)
    with pytest.raises(ValueError, match="layer"):
        spatial(pred, "G0", layer="missing", show=False)
    with pytest.raises(ValueError, match="do not share their spots"):
        spatial(pred, "G0", truth=other, show=False)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        spatial(pred, "G0", image=np.zeros((5, 5, 7)), show=False)
    no_xy = pred.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(ValueError, match="obsm"):
        spatial(no_xy, "G0", show=False)


def test_scatter(tmp_path, trained) -> None:
    pred, test = trained["pred"], trained["test"]
    ax = scatter(pred, "G0", truth=test, save=tmp_path / "scatter.png")
    _not_blank(tmp_path / "scatter.png")
    pts = ax.collections[0].get_offsets()
    assert len(pts) == test.n_obs
    np.testing.assert_allclose(pts[:, 0], np.log2(1 + test[:, "G0"].X.ravel()), rtol=1e-6)
    np.testing.assert_allclose(pts[:, 1], pred[:, "G0"].layers[Key.LAYER_PRED].ravel(), rtol=1e-6)
    r = trained["eval"].per_gene.query("scope == 'pooled' and gene == 'G0'")["pearson_r"].item()
    assert ax.get_title().startswith(f"G0: r = {r:.3f}")
    identity = [ln for ln in ax.lines if ln.get_label() == "y = x"]
    assert len(identity) == 1
    np.testing.assert_array_equal(identity[0].get_xdata(), identity[0].get_ydata())
    with pytest.raises(ValueError, match="Unknown gene"):
        scatter(pred, "NOPE", show=False)
    only_pred = ad.AnnData(pred.layers[Key.LAYER_PRED], obs=pred.obs, var=pred.var)
    with pytest.raises(ValueError, match="truth="):
        scatter(only_pred, "G0", show=False)
    # show=True shows and returns None (scanpy convention); show=False returns the Axes
    assert scatter(pred, "G0", show=True) is None
    assert scatter(pred, "G0", show=False) is not None


# ---------------------------------------------------------------------------------------------- poincare / radius
def test_poincare_radii_exact_and_points(tmp_path, trained) -> None:
    adata = trained["train"]
    c = adata.uns[Key.UNS][Key.UNS_FIT]["curvature"]
    ax = poincare(adata, cones=3, save=tmp_path / "poincare.png")
    _not_blank(tmp_path / "poincare.png")
    assert [col.get_label() for col in ax.collections] == [
        "image spot (X_hyperst)",
        "image niche (X_hyperst_niche)",
        "gene spot (X_hyperst_gene)",
        "gene niche (X_hyperst_gene_niche)",
    ]
    for key, col in zip(STREAM_KEYS, ax.collections, strict=True):
        pos = np.asarray(col.get_offsets())
        assert len(pos) == adata.n_obs
        x = torch.as_tensor(adata.obsm[key], dtype=torch.float64)
        true_d = geo.dist(torch.zeros_like(x), x, c).numpy()
        r = np.linalg.norm(pos, axis=1)
        assert (r < 1).all()
        # the disk radius is the unit-disk Poincaré radius of the point: exact and monotone in d(O, x)
        np.testing.assert_allclose(r, np.sqrt(c) * np.linalg.norm(geo.to_poincare(x, c).numpy(), axis=1), rtol=1e-6)
        np.testing.assert_allclose(r, np.tanh(np.sqrt(c) * true_d / 2), rtol=1e-6)
        order = np.argsort(true_d)
        assert (np.diff(r[order]) >= -1e-12).all()
    cones = [p for p in ax.patches if isinstance(p, Polygon)]
    assert len(cones) == 3
    # a cone's apex angle is the half-aperture of geometry.half_aperture (the disk is conformal)
    verts = cones[0].get_xy()
    apex, e0, e1 = verts[0], verts[1], verts[-2]
    angle = np.arccos(np.dot(e0 - apex, e1 - apex) / np.linalg.norm(e0 - apex) / np.linalg.norm(e1 - apex))
    apex_idx = np.argmin(np.linalg.norm(np.asarray(ax.collections[0].get_offsets()) - apex, axis=1))
    x0 = torch.as_tensor(adata.obsm[Key.OBSM_IMAGE_SPOT][apex_idx : apex_idx + 1], dtype=torch.float64)
    np.testing.assert_allclose(angle / 2, geo.half_aperture(x0, c).item(), rtol=1e-6)
    assert (np.linalg.norm(verts, axis=1) <= 1 + 1e-9).all()


def test_disk_coordinates_directions() -> None:
    rng = np.random.default_rng(0)
    # points in a random 2-d plane of R^8: PCA about the origin keeps their angles exactly
    basis = np.linalg.qr(rng.normal(size=(8, 2)))[0]
    plane = rng.normal(size=(50, 2)) * 1.5
    pos, dist = disk_coordinates(plane @ basis.T, 0.7, method="pca")
    cos_true = (plane @ plane.T) / np.outer(np.linalg.norm(plane, axis=1), np.linalg.norm(plane, axis=1))
    cos_disk = (pos @ pos.T) / np.outer(np.linalg.norm(pos, axis=1), np.linalg.norm(pos, axis=1))
    np.testing.assert_allclose(cos_disk, cos_true, atol=1e-9)
    np.testing.assert_allclose(dist, np.arcsinh(np.sqrt(0.7) * np.linalg.norm(plane, axis=1)) / np.sqrt(0.7))
    x = rng.normal(size=(20, 5))
    pos2, _ = disk_coordinates(x, 1.0, method="first2")
    np.testing.assert_allclose(
        pos2 / np.linalg.norm(pos2, axis=1, keepdims=True), x[:, :2] / np.linalg.norm(x[:, :2], axis=1, keepdims=True)
    )
    with pytest.raises(ValueError, match="method"):
        disk_coordinates(x, 1.0, method="umap")  # type: ignore[arg-type]


def test_poincare_options_and_errors(trained) -> None:
    adata = trained["train"]
    ax = poincare(adata, keys=[Key.OBSM_IMAGE_SPOT, Key.OBSM_GENE_SPOT], n_max=20, color="array_row", show=False)
    assert [len(col.get_offsets()) for col in ax.collections] == [20, 20]
    assert len(ax.figure.axes) == 2  # the disk and the colour bar
    a = poincare(adata, keys=Key.OBSM_IMAGE_SPOT, n_max=20, show=False).collections[0].get_offsets()
    b = poincare(adata, keys=Key.OBSM_IMAGE_SPOT, n_max=20, show=False).collections[0].get_offsets()
    np.testing.assert_array_equal(a, b)  # seeded subset
    cat = adata.copy()
    cat.obs["half"] = pd.Categorical(np.where(cat.obs["array_row"] < SIDE // 2, "top", "bottom"))
    ax = poincare(cat, color="half", show=False)
    fc = ax.collections[0].get_facecolors()
    assert len(np.unique(fc.round(6), axis=0)) == 2
    # curvature from .uns, or explicit
    c = adata.uns[Key.UNS][Key.UNS_FIT]["curvature"]
    assert f"c = {c:.3g}" in poincare(adata, show=False).get_title()
    r2 = np.linalg.norm(
        poincare(adata, keys=Key.OBSM_IMAGE_SPOT, curvature=2.0, show=False).collections[0].get_offsets(), axis=1
    )
    x = np.linalg.norm(adata.obsm[Key.OBSM_IMAGE_SPOT], axis=1)
    np.testing.assert_allclose(r2, np.tanh(np.arcsinh(np.sqrt(2.0) * x) / 2), rtol=1e-6)
    with pytest.raises(ValueError, match=r"Unknown embedding key\(s\) \['X_nope'\]"):
        poincare(adata, keys=["X_nope"], show=False)
    with pytest.raises(ValueError, match="no HyperST embeddings"):
        poincare(ad.AnnData(np.zeros((3, 2))), show=False)
    with pytest.raises(ValueError, match=r"not an `\.obs` column"):
        poincare(adata, color="nope", show=False)
    with pytest.raises(ValueError, match="curvature"):
        poincare(adata, curvature=-1.0, show=False)
    eucl = adata.copy()
    eucl.uns[Key.UNS] = {Key.UNS_FIT: {"config": {"geometry": "euclidean"}}}
    with pytest.raises(ValueError, match="Euclidean"):
        poincare(eucl, show=False)
    assert radius(eucl, show=False).get_ylabel() == "Euclidean norm"


def test_radius(tmp_path, trained) -> None:
    adata = trained["train"]
    c = adata.uns[Key.UNS][Key.UNS_FIT]["curvature"]
    ax = radius(adata, save=tmp_path / "radius.png")
    _not_blank(tmp_path / "radius.png")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["image spot", "image niche", "gene spot", "gene niche"]
    medians = ax.collections[-1].get_segments()  # the median markers, one segment per violin
    assert len(medians) == 4
    for key, seg in zip(STREAM_KEYS, medians, strict=True):
        x = torch.as_tensor(adata.obsm[key], dtype=torch.float64)
        np.testing.assert_allclose(seg[0, 1], np.median(geo.dist(torch.zeros_like(x), x, c).numpy()), rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown embedding key"):
        radius(adata, keys="X_nope", show=False)


# ---------------------------------------------------------------------------------------------- history / scores
def test_history(tmp_path, trained) -> None:
    model = trained["model"]
    fig = history(model, save=tmp_path / "history.png")
    _not_blank(tmp_path / "history.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "mse", "hca", "hea"]
    hist = pd.DataFrame(model.history)
    best = int(hist["epoch"][hist["val/loss"].idxmin()])
    for ax in fig.axes:
        lines = {ln.get_label(): ln for ln in ax.lines}
        np.testing.assert_allclose(lines["train"].get_ydata(), hist[f"train/{ax.get_title()}"])
        np.testing.assert_allclose(lines["validation"].get_ydata(), hist[f"val/{ax.get_title()}"])
        assert lines["train"].get_linestyle() == "-"
        assert lines["validation"].get_linestyle() == "--"
        assert lines["best epoch"].get_xdata()[0] == best
    # the same history from the trained table and from a plain list; explicit components
    fig2 = history(trained["train"], components=["curvature"], show=False)
    assert len(fig2.axes) == 1
    np.testing.assert_allclose(fig2.axes[0].lines[0].get_ydata(), hist["train/curvature"])
    _, axs = plt.subplots(1, 2)
    fig3 = history(model.history, components=("mse", "hca/image_spot->gene_spot"), axes=axs)
    assert fig3 is axs[0].figure
    np.testing.assert_allclose(axs[1].lines[0].get_ydata(), hist["train/hca/image_spot->gene_spot"])
    with pytest.raises(ValueError, match=r"Unknown history component\(s\) \['nope'\]"):
        history(model, components=["nope"], show=False)
    with pytest.raises(ValueError, match="empty"):
        history([], show=False)
    with pytest.raises(ValueError, match="`axes` has 1"):
        history(model, axes=[axs[0]])
    with pytest.raises(ValueError, match="no training history"):
        history(trained["pred"], show=False)


def test_gene_scores(tmp_path, trained) -> None:
    ev = trained["eval"]
    ax = gene_scores(ev, ks=(5, 10, 50), save=tmp_path / "scores.png")
    _not_blank(tmp_path / "scores.png")
    r = ev.per_gene.query("scope == 'pooled'")["pearson_r"].to_numpy()
    ranked = ax.lines[0]
    assert len(ranked.get_xdata()) == N_GENES
    np.testing.assert_allclose(ranked.get_ydata(), np.sort(r)[::-1])
    marks = {ln.get_label().split(" = ")[0]: ln for ln in ax.lines if ln.get_label().startswith("PCC@")}
    assert set(marks) == {"PCC@5", "PCC@10"}  # PCC@50 > 12 genes is skipped
    for k in (5, 10):
        assert marks[f"PCC@{k}"].get_ydata()[0] == pytest.approx(hst.tl.pcc_at_k(r, k))
        assert marks[f"PCC@{k}"].get_xdata()[1] == pytest.approx(k + 0.4)
        assert marks[f"PCC@{k}"].get_label() == f"PCC@{k} = {hst.tl.pcc_at_k(r, k):.3f}"
    ax2 = gene_scores(ev.per_gene, scope="s2", top=4, show=False)
    assert len(ax2.patches) == 4
    top = ev.per_gene.query("scope == 's2'").sort_values("pearson_r", ascending=False)["gene"][:4]
    assert [t.get_text() for t in ax2.get_xticklabels()] == list(top)
    with pytest.raises(ValueError, match="scope='nope'"):
        gene_scores(ev, scope="nope", show=False)
    with pytest.raises(ValueError, match="more than once"):
        gene_scores(pd.Series([0.1, 0.2], index=["a", "a"]), show=False)
    with pytest.raises(TypeError, match="evaluate"):
        gene_scores([0.1, 0.2], show=False)


def test_save_to_missing_folder(tmp_path, trained) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        radius(trained["train"], save=tmp_path / "missing" / "r.png")


def test_history_from_table_read_back_from_h5ad(tmp_path, trained) -> None:
    # regression: the fit record's history was a list of dicts, which h5ad cannot store
    model = trained["model"]
    table = trained["train"]
    record = table.uns[Key.UNS][Key.UNS_FIT]["history"]
    assert record["columns"][0] == "epoch"
    assert record["data"].shape == (len(model.history), len(record["columns"]))
    table.write_h5ad(tmp_path / "train.h5ad")
    back = ad.read_h5ad(tmp_path / "train.h5ad")
    hist = pd.DataFrame(model.history)
    frame = pd.DataFrame(**back.uns[Key.UNS][Key.UNS_FIT]["history"])
    pd.testing.assert_frame_equal(frame[hist.columns], hist, check_dtype=False)
    fig = history(back, save=tmp_path / "history.png")
    _not_blank(tmp_path / "history.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "mse", "hca", "hea"]
    for ax in fig.axes:
        lines = {ln.get_label(): ln for ln in ax.lines}
        np.testing.assert_allclose(lines["train"].get_xdata(), hist["epoch"])
        np.testing.assert_allclose(lines["train"].get_ydata(), hist[f"train/{ax.get_title()}"])
        np.testing.assert_allclose(lines["validation"].get_ydata(), hist[f"val/{ax.get_title()}"])
    # the column record itself, and a mapping of columns with a metric missing in one epoch (NaN)
    fig2 = history(back.uns[Key.UNS][Key.UNS_FIT]["history"], components=["loss"], show=False)
    np.testing.assert_allclose(fig2.axes[0].lines[0].get_ydata(), hist["train/loss"])
    cols = {"epoch": [0, 1, 2], "train/loss": [3.0, 2.0, 1.0], "val/loss": [4.0, np.nan, 2.0]}
    fig3 = history(cols, components=["loss"], show=False)
    np.testing.assert_allclose(fig3.axes[0].lines[1].get_xdata(), [0, 2])


def test_pl_functions_take_keyword_only_dpi() -> None:
    import inspect

    for fn in (
        hst.pl.spatial,
        hst.pl.scatter,
        hst.pl.poincare,
        hst.pl.radius,
        hst.pl.history,
        hst.pl.gene_scores,
        hst.pl.intervals,
        hst.pl.reliability,
    ):
        params = inspect.signature(fn).parameters
        assert "save" in params, fn.__name__
        assert params["dpi"].kind is inspect.Parameter.KEYWORD_ONLY, fn.__name__
        assert params["dpi"].default is None, fn.__name__
        assert "    dpi\n" in fn.__doc__, fn.__name__


def test_save_dpi_scales_the_image(tmp_path, trained) -> None:
    shapes = {}
    for dpi in (50, 100):
        gene_scores(trained["eval"], save=tmp_path / f"scores{dpi}.png", dpi=dpi)
        radius(trained["train"], save=tmp_path / f"radius{dpi}.png", dpi=dpi)
        shapes[dpi] = [mpimg.imread(tmp_path / f"{name}{dpi}.png").shape[:2] for name in ("scores", "radius")]
    for small, big in zip(shapes[50], shapes[100], strict=True):
        for s, b in zip(small, big, strict=True):
            assert abs(b - 2 * s) <= 2, (small, big)
    with pytest.raises(ValueError, match="`dpi` must be a positive number"):
        gene_scores(trained["eval"], save=tmp_path / "bad.png", dpi=0)


# ---------------------------------------------------------------------------------------------- intervals / reliability
def _interval_table(n_side: int = 9, n_genes: int = 6, seed: int = 0, alpha: float = 0.1) -> ad.AnnData:
    """A synthetic hst.tl.predict output with intervals: measured counts in .X, prediction in a layer.

    The measured log-expression is the prediction plus noise scaled by the per-entry std, so wide intervals
    go with large errors; the OOD score is random with the top ~10 % flagged.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    xy = np.column_stack([cols.ravel() * 100.0 + 50, rows.ravel() * 100.0 + 50])
    n = len(xy)
    pred = np.clip(2 + np.sin(xy[:, :1] / 200 + np.arange(n_genes)) + 0.3 * rng.normal(size=(n, n_genes)), 0, None)
    std = rng.uniform(0.1, 0.8, size=(n, 1)) * rng.uniform(0.5, 1.5, size=(1, n_genes))
    counts = np.round(np.exp2(np.clip(pred + std * rng.normal(size=(n, n_genes)), 0, None)) - 1)
    lower, upper = np.clip(pred - 1.645 * std, 0, None), pred + 1.645 * std
    score = rng.gamma(2.0, 1.0, size=n)
    threshold = float(np.quantile(score, 0.9))
    obs = pd.DataFrame({Key.OBS_SAMPLE: "s0"}, index=[f"s0_{i}" for i in range(n)])
    a = ad.AnnData(counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    a.obsm[Key.OBSM_SPATIAL] = xy
    a.layers[Key.LAYER_PRED] = pred.astype(np.float32)
    a.layers[Key.LAYER_LOWER] = lower.astype(np.float32)
    a.layers[Key.LAYER_UPPER] = upper.astype(np.float32)
    a.layers[Key.LAYER_STD] = std.astype(np.float32)
    a.obs[Key.OBS_UNCERTAINTY] = std.mean(1)  # as hst.tl.predict: the mean predictive std over genes
    a.obs[Key.OBS_OOD_SCORE] = score
    a.obs[Key.OBS_OOD] = score > threshold
    frac = float((score > threshold).mean())
    domain = {  # the layout of hst.tl.predict's record
        "threshold": threshold,
        "ood_rate": 0.05,
        "ood_fraction": frac,
        "flagged": False,
        "slides": {"s0": {"n_spots": n, "ood_fraction": frac, "flags": []}},
        "messages": [],
    }
    a.uns[Key.UNS] = {Key.UNS_PREDICT: {"alpha": alpha, Key.UNS_DOMAIN: domain}}
    return a


def _log_counts(a: ad.AnnData, genes: list[str]) -> np.ndarray:
    return np.log2(1 + np.asarray(a[:, genes].X, dtype=np.float64))


def test_intervals_panels_shared_scale_and_flags(tmp_path) -> None:
    a = _interval_table()
    genes = ["G0", "G3"]
    flags = a.obs[Key.OBS_OOD].to_numpy()
    assert 0 < flags.sum() < a.n_obs
    fig = intervals(a, genes, save=tmp_path / "intervals.png")
    _not_blank(tmp_path / "intervals.png")
    assert len(fig.axes) == 4 * len(genes) + len(genes)  # predicted/lower/upper/observed + one colour bar per gene
    assert fig.get_suptitle() == "s0: 90 % prediction intervals (α = 0.1)"
    obs_log = _log_counts(a, genes)
    r = hst._utils.pearson_per_gene(obs_log, a[:, genes].layers[Key.LAYER_PRED].astype(np.float64))
    for g, gene in enumerate(genes):
        panels = fig.axes[4 * g : 4 * g + 4]
        expected = [a[:, gene].layers[k].ravel() for k in (Key.LAYER_PRED, Key.LAYER_LOWER, Key.LAYER_UPPER)]
        expected.append(obs_log[:, g])
        inside = np.mean((expected[1] <= obs_log[:, g]) & (obs_log[:, g] <= expected[2]))
        assert [ax.get_title() for ax in panels] == [
            f"{gene} predicted (r = {r[g]:.2f})",
            f"{gene} lower",
            f"{gene} upper",
            f"{gene} observed ({100 * inside:.0f} % inside)",
        ]
        clim = (min(v.min() for v in expected), max(v.max() for v in expected))
        for ax, values in zip(panels, expected, strict=True):
            spots, rings = ax.collections[0], ax.collections[1]
            np.testing.assert_allclose(spots.get_array(), values, rtol=1e-6)
            np.testing.assert_allclose(spots.get_clim(), clim, rtol=1e-6)  # one scale per gene
            # the flagged spots are ringed: one ring per flagged spot, at its centre, unfilled
            assert len(rings.get_offsets()) == flags.sum()
            np.testing.assert_allclose(rings.get_offsets(), a.obsm[Key.OBSM_SPATIAL][flags])
            assert rings.get_facecolor().size == 0 or (rings.get_facecolor()[:, 3] == 0).all()
        pr, lo, up = (ax.collections[0].get_array() for ax in panels[:3])
        assert (lo <= pr).all()
        assert (pr <= up).all()
        assert (up - lo).mean() > 0.5
    legend = fig.legends[0].get_texts()[0].get_text()
    assert legend.startswith(f"out of distribution ({flags.sum()} of {a.n_obs} spots")


def test_intervals_sources_image_and_options() -> None:
    a = _interval_table(n_genes=4)
    # `truth` (another spot order) gives the observed panel; its values are aligned on obs_names
    truth = a[::-1].copy()
    truth.X = truth.X * 0 + 3
    fig = intervals(a, "G1", truth=truth, show=False)
    np.testing.assert_allclose(fig.axes[3].collections[0].get_array(), 2.0)  # log2(1 + 3)
    # prediction in .X and no truth: no observed panel (three panels + colour bar)
    only = ad.AnnData(a.layers[Key.LAYER_PRED], obs=a.obs, var=a.var, obsm=dict(a.obsm), uns=a.uns)
    only.layers[Key.LAYER_LOWER] = a.layers[Key.LAYER_LOWER]
    only.layers[Key.LAYER_UPPER] = a.layers[Key.LAYER_UPPER]
    fig = intervals(only, ["G0", "G1", "G2"], ncols=2, show=False)
    assert len(fig.axes) == 3 * 3 + 3  # three panels per gene (the unused slot removed) + colour bars
    assert [ax.get_title() for ax in fig.axes[:3]] == ["G0 predicted", "G0 lower", "G0 upper"]
    # on an image: the image under every panel, offsets scaled into its pixels
    image = np.random.default_rng(0).integers(0, 255, size=(480, 480, 3), dtype=np.uint8)
    fig = intervals(a, "G0", image=image, scale_factor=0.5, spot_size=80, show=False)
    assert all(len(ax.images) == 1 for ax in fig.axes[:4])
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), 0.5 * a.obsm[Key.OBSM_SPATIAL])
    np.testing.assert_allclose(fig.axes[0].collections[0].get_widths(), 40.0)
    # ood=False, or no flag column: no rings and no legend
    fig = intervals(a, "G0", ood=False, show=False)
    assert all(len(ax.collections) == 1 for ax in fig.axes[:4])
    assert not fig.legends
    no_flags = a.copy()
    del no_flags.obs[Key.OBS_OOD]
    no_flags.uns = {}
    fig = intervals(no_flags, "G0", show=False)
    assert all(len(ax.collections) == 1 for ax in fig.axes[:4])
    assert fig.get_suptitle() == "s0: prediction intervals"


def test_intervals_errors() -> None:
    a = _interval_table(n_genes=3)
    for key in (Key.LAYER_LOWER, Key.LAYER_UPPER):
        b = a.copy()
        del b.layers[key]
        with pytest.raises(ValueError, match=rf"no prediction intervals .*{key}.*ensemble"):
            intervals(b, "G0", show=False)
        with pytest.raises(ValueError, match="ensemble"):
            reliability(b, show=False)
    swapped = a.copy()
    swapped.layers[Key.LAYER_LOWER], swapped.layers[Key.LAYER_UPPER] = (
        a.layers[Key.LAYER_UPPER],
        a.layers[Key.LAYER_LOWER],
    )
    with pytest.raises(ValueError, match="corrupt"):
        intervals(swapped, "G0", show=False)
    bad = a.copy()
    bad.obs[Key.OBS_OOD] = bad.obs[Key.OBS_OOD].astype(float)
    with pytest.raises(ValueError, match="booleans"):
        intervals(bad, "G0", show=False)
    with pytest.raises(ValueError, match="Unknown gene"):
        intervals(a, "NOPE", show=False)
    two = ad.concat([a, a.copy()], index_unique="-", keys=["x", "y"], label="which", uns_merge="first")
    two.obs[Key.OBS_SAMPLE] = two.obs["which"].astype(str)
    with pytest.raises(ValueError, match="pass `sample="):
        intervals(two, "G0", show=False)
    fig = intervals(two, "G0", sample="y", show=False)
    assert len(fig.axes[0].collections[0].get_offsets()) == a.n_obs


def test_reliability_numbers(tmp_path) -> None:
    a = _interval_table(n_side=10, n_genes=8, seed=1)
    fig = reliability(a, save=tmp_path / "reliability.png")
    _not_blank(tmp_path / "reliability.png")
    assert len(fig.axes) == 4 + 2  # four panels, colour bars of the two maps
    unc_ax, ood_ax, err_ax, cov_ax = fig.axes[:4]
    flags = a.obs[Key.OBS_OOD].to_numpy()
    # maps: uncertainty and OOD score per spot, flagged spots ringed, the threshold on the OOD colour bar
    np.testing.assert_allclose(unc_ax.collections[0].get_array(), a.obs[Key.OBS_UNCERTAINTY])
    np.testing.assert_allclose(ood_ax.collections[0].get_array(), a.obs[Key.OBS_OOD_SCORE])
    assert len(ood_ax.collections[1].get_offsets()) == flags.sum()
    assert ood_ax.get_title() == f"out of distribution ({flags.sum()} / {a.n_obs})"
    threshold = a.uns[Key.UNS][Key.UNS_PREDICT][Key.UNS_DOMAIN]["threshold"]
    assert [ln.get_ydata()[0] for ln in fig.axes[5].lines] == [pytest.approx(threshold)]
    # error vs uncertainty: per-spot MAE over all genes on the log2(1 + x) scale; Spearman from ranks
    obs = _log_counts(a, list(a.var_names))
    mae = np.abs(a.layers[Key.LAYER_PRED].astype(np.float64) - obs).mean(1)
    unc = a.obs[Key.OBS_UNCERTAINTY].to_numpy()
    pts = err_ax.collections[0].get_offsets()
    np.testing.assert_allclose(pts[:, 0], unc)
    np.testing.assert_allclose(pts[:, 1], mae, rtol=1e-6)
    rho = np.corrcoef(rankdata(unc), rankdata(mae))[0, 1]
    assert rho > 0.3  # the table is built so that error follows uncertainty
    assert err_ax.get_title() == f"error vs uncertainty (ρ = {rho:.2f})"
    # coverage per gene: histogram counts, mean and nominal lines
    cov = np.array(
        [
            np.mean((a.layers[Key.LAYER_LOWER][:, j] <= obs[:, j]) & (obs[:, j] <= a.layers[Key.LAYER_UPPER][:, j]))
            for j in range(a.n_vars)
        ]
    )
    bars = [p for p in cov_ax.patches if isinstance(p, Rectangle)]
    edges = np.array([b.get_x() for b in bars] + [bars[-1].get_x() + bars[-1].get_width()])
    np.testing.assert_array_equal([b.get_height() for b in bars], np.histogram(cov, bins=edges)[0])
    assert sum(b.get_height() for b in bars) == a.n_vars
    lines = {ln.get_label(): ln.get_xdata()[0] for ln in cov_ax.lines}
    assert lines == {f"mean {100 * cov.mean():.0f} %": pytest.approx(cov.mean()), "nominal 90 %": pytest.approx(0.9)}


def test_reliability_without_truth_score_and_flagged_slide(tmp_path) -> None:
    a = _interval_table(n_genes=3)
    # prediction in .X, no truth: the two maps only
    only = ad.AnnData(a.layers[Key.LAYER_PRED], obs=a.obs, var=a.var, obsm=dict(a.obsm), uns=a.uns)
    for key in (Key.LAYER_LOWER, Key.LAYER_UPPER):
        only.layers[key] = a.layers[key]
    fig = reliability(only, show=False)
    assert [ax.get_title() for ax in fig.axes[:2]] == [
        "uncertainty",
        f"out of distribution ({a.obs[Key.OBS_OOD].sum()} / {a.n_obs})",
    ]
    assert len(fig.axes) == 4
    # no OOD score: the uncertainty map alone
    del only.obs[Key.OBS_OOD_SCORE]
    assert len(reliability(only, show=False).axes) == 2
    # a slide flagged by hst.tl.predict: red title and the messages in the figure title
    flagged = a.copy()
    dom = flagged.uns[Key.UNS][Key.UNS_PREDICT][Key.UNS_DOMAIN]
    dom.update(flagged=True, messages=["s0: scanned at 3.20 µm/px, coarser", "s0: stain colour far from training"])
    dom["slides"]["s0"]["flags"] = ["pixel_size", "colour"]
    fig = reliability(flagged, show=False)
    assert fig.axes[1].get_title().endswith("\nslide flagged")
    assert fig.get_suptitle().split("\n") == ["s0: reliability", *dom["messages"]]
    # several slides: the drawn slide's own flags and messages
    other = a.copy()
    other.obs_names = [f"s1_{i}" for i in range(a.n_obs)]
    other.obs[Key.OBS_SAMPLE] = "s1"
    both = ad.concat([flagged, other], uns_merge="first")
    both.uns[Key.UNS][Key.UNS_PREDICT][Key.UNS_DOMAIN]["slides"]["s1"] = {"flags": []}
    fig = reliability(both, sample="s1", show=False)
    assert "slide flagged" not in fig.axes[1].get_title()
    assert fig.get_suptitle() == "s1: reliability"
    fig = reliability(both, sample="s0", show=False)
    assert fig.get_suptitle().split("\n")[1:] == dom["messages"]
    # read back from h5ad (messages become an array, flags numpy booleans)
    flagged.write_h5ad(tmp_path / "flagged.h5ad")
    fig = reliability(ad.read_h5ad(tmp_path / "flagged.h5ad"), show=False)
    assert fig.get_suptitle().split("\n") == ["s0: reliability", *dom["messages"]]
    missing = a.copy()
    del missing.obs[Key.OBS_UNCERTAINTY]
    with pytest.raises(ValueError, match=r"per-spot uncertainty.*ensemble"):
        reliability(missing, show=False)
    with pytest.raises(ValueError, match="`bins`"):
        reliability(a, bins=0, show=False)
