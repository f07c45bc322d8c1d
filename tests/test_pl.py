"""hst.pl: spatial maps, scatter, Poincaré disk, radii, training history and gene scores."""

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
from matplotlib.patches import Polygon

import hyperst as hst
from hyperst import geometry as geo
from hyperst._constants import Key
from hyperst.pl._embedding import disk_coordinates, poincare, radius
from hyperst.pl._expression import scatter, spatial
from hyperst.pl._training import gene_scores, history

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

    for fn in (hst.pl.spatial, hst.pl.scatter, hst.pl.poincare, hst.pl.radius, hst.pl.history, hst.pl.gene_scores):
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
