"""Tests of ``hyperst.datasets``: the synthetic generator and the Her2ST reader."""

from __future__ import annotations

import gzip
import itertools
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.spatial import cKDTree

from hyperst._constants import Key
from hyperst.datasets._her2st import _read_tables, her2st
from hyperst.datasets._synthetic import BACKGROUND, TISSUES, synthetic
from hyperst.datasets._utils import (
    combine_genes,
    fit_pixels_per_step,
    normalise_chunks,
    raw_counts,
    reindex_columns,
    spot_metadata,
)
from hyperst.pp._layout import LAYOUTS

HER2ST = Path(__file__).parents[1] / ".." / "shared" / "data" / "her2st"
README_SPOTS = {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}
README_SIZE = {"C2": (9274, 9911), "C3": (9270, 9936), "C4": (9278, 9916), "C5": (9272, 9901), "C6": (9288, 9907)}


# ----------------------------------------------------------------------------------------------- helpers
def _image(sdata, sample: str) -> np.ndarray:
    """Level-0 image of ``sample`` as (y, x, 3) numpy."""
    element = sdata[f"{sample}_image"]
    if not hasattr(element, "dims"):  # DataTree
        element = element["scale0"]["image"]
    return np.asarray(element.data).transpose(1, 2, 0)


def _sample(table, sample: str):
    mask = (table.obs["sample"] == sample).to_numpy()
    return table[mask], table.obsm[Key.OBSM_SPATIAL][mask]


@pytest.fixture(scope="module")
def syn():
    return synthetic()


# ----------------------------------------------------------------------------------------------- synthetic
def test_synthetic_conventions(syn):
    from spatialdata.models import get_table_keys

    assert set(syn.images) == {"sample0_image", "sample1_image"}
    assert set(syn.shapes) == {"sample0_spots", "sample1_spots"}
    assert set(syn.tables) == {"table"}
    assert set(syn.coordinate_systems) == {"sample0", "sample1"}
    table = syn["table"]
    assert get_table_keys(table) == (["sample0_spots", "sample1_spots"], "region", "instance_id")
    assert sparse.issparse(table.X)
    assert table.X.format == "csr"
    assert table.X.dtype == np.int32
    assert table.shape == (2 * 16 * 16, 60)
    for col in ("sample", "array_row", "array_col", "tissue", "instance_id"):
        assert col in table.obs
    assert set(table.var["program"].cat.categories) == {*TISSUES, BACKGROUND}
    meta = table.uns[Key.UNS][Key.UNS_SPOTS]
    assert meta["sample1"] == {"spot_diameter": 55.0, "pitch": 100.0, "layout": "visium", "pixel_size": 1.0}
    for s in ("sample0", "sample1"):
        image = syn[f"{s}_image"]
        assert image.dims == ("c", "y", "x")
        assert image.dtype == np.uint8
        assert list(image.coords["c"].values) == ["r", "g", "b"]
        # default size stays small: 16 × 16 Visium spots at 1 µm/px is below 2000 px a side
        assert max(image.shape[1:]) < 2000
        shapes = syn[f"{s}_spots"]
        sub, xy = _sample(table, s)
        np.testing.assert_allclose(np.c_[shapes.geometry.x, shapes.geometry.y], xy)
        np.testing.assert_array_equal(shapes.index.to_numpy(), sub.obs["instance_id"].to_numpy())
        np.testing.assert_allclose(shapes["radius"], 27.5)


def test_synthetic_deterministic(syn):
    again = synthetic()
    for s in ("sample0", "sample1"):
        np.testing.assert_array_equal(_image(again, s), _image(syn, s))
    assert (again["table"].X != syn["table"].X).nnz == 0
    pd.testing.assert_frame_equal(again["table"].obs, syn["table"].obs)

    other = synthetic(seed=1)
    assert not np.array_equal(_image(other, "sample0"), _image(syn, "sample0"))
    assert (other["table"].X != syn["table"].X).nnz > 0
    # samples differ in geometry; sample i does not depend on how many samples are drawn
    t = syn["table"].obs["tissue"].to_numpy()
    assert (t[:256] != t[256:]).mean() > 0.3
    single = synthetic(n_samples=1)
    np.testing.assert_array_equal(_image(single, "sample0"), _image(syn, "sample0"))


@pytest.mark.parametrize(("layout", "pitch", "diameter"), [("visium", 100.0, 55.0), ("st", 200.0, 100.0)])
def test_synthetic_grid_geometry(layout, pitch, diameter):
    pixel_size = 2.0
    sd = synthetic(layout=layout, n_samples=1, n_rows=6, n_cols=7, pixel_size=pixel_size)
    assert LAYOUTS[layout] == {"spot_diameter": diameter, "pitch": pitch}
    table = sd["table"]
    assert table.uns[Key.UNS][Key.UNS_SPOTS]["sample0"]["layout"] == layout
    xy_um = table.obsm[Key.OBSM_SPATIAL] * pixel_size
    tree = cKDTree(xy_um)
    dist, _ = tree.query(xy_um, k=2)
    np.testing.assert_allclose(dist[:, 1], pitch, rtol=1e-9)
    # neighbours within 1.5 pitch: 6 (hexagonal) / 8 (square, diagonals included) for interior spots
    counts = np.array([len(n) - 1 for n in tree.query_ball_point(xy_um, 1.5 * pitch)])
    row, col = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    if layout == "visium":
        assert np.all(row % 2 == col % 2)  # Visium: odd rows hold odd columns (shifted by half a pitch)
        np.testing.assert_allclose(np.diff(xy_um[:, 0][row == 1])[:3], pitch)
        interior = (row > 0) & (row < 5) & (col > 1) & (col < 12)
        assert counts[interior].min() == counts[interior].max() == 6
    else:
        interior = (row > 0) & (row < 5) & (col > 0) & (col < 6)
        assert counts[interior].min() == counts[interior].max() == 8
    assert counts.max() == (6 if layout == "visium" else 8)
    np.testing.assert_allclose(sd["sample0_spots"]["radius"], diameter / 2 / pixel_size)
    # every spot crop and niche crop (spot + neighbours) lies inside the image
    height, width = sd["sample0_image"].shape[1:]
    half = max(pitch + diameter / 2, max(112.0, diameter) / 2) / pixel_size
    xy = table.obsm[Key.OBSM_SPATIAL]
    assert xy[:, 0].min() - half >= 0
    assert xy[:, 1].min() - half >= 0
    assert xy[:, 0].max() + half <= width
    assert xy[:, 1].max() + half <= height


def test_synthetic_regions_look_different(syn):
    table = syn["table"]
    sub, xy = _sample(table, "sample0")
    img = _image(syn, "sample0").astype(np.float64)
    tissue = sub.obs["tissue"].to_numpy()
    colour, texture = {}, {}
    for t in (*TISSUES, BACKGROUND):
        crops = [img[y - 56 : y + 56, x - 56 : x + 56] for x, y in xy[tissue == t].astype(int)]
        assert len(crops) >= 15, t
        colour[t] = np.mean([c.mean((0, 1)) for c in crops], 0)
        texture[t] = np.mean([np.abs(np.diff(c.mean(2), axis=1)).mean() for c in crops])
    names = list(colour)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.linalg.norm(colour[a] - colour[b]) > 15, (a, b, colour[a], colour[b])
    assert colour[BACKGROUND].min() > 225  # near white
    assert colour["stroma"][0] > colour["tumour"][0] + 20  # eosin pink vs purple
    assert texture["immune"] > 1.3 * texture["tumour"]  # small dense nuclei: high-frequency texture
    assert texture["tumour"] > 1.3 * texture[BACKGROUND]


def test_synthetic_expression_signal(syn):
    table = syn["table"]
    x = table.X.toarray().astype(np.float64)
    tissue = table.obs["tissue"].to_numpy()
    program = table.var["program"].to_numpy()
    on = tissue != BACKGROUND
    assert (program == BACKGROUND).sum() == 30
    assert all((program == t).sum() == 10 for t in TISSUES)
    for t in TISSUES:
        inside = x[tissue == t][:, program == t].mean()
        elsewhere = x[on & (tissue != t)][:, program == t].mean()
        assert inside > 5 * elsewhere, (t, inside, elsewhere)
    housekeeping = program == BACKGROUND
    assert x[on][:, housekeeping].mean() > 5 * x[~on][:, housekeeping].mean()
    assert x[on].sum(1).mean() > 10 * x[~on].sum(1).mean()
    assert 0.08 < (~on).mean() < 0.25  # some spots lie off tissue


def test_synthetic_multiscale():
    from xarray import DataTree

    sd = synthetic(n_samples=1, n_rows=4, n_cols=5, multiscale=True)
    tree = sd["sample0_image"]
    assert isinstance(tree, DataTree)
    levels = sorted(tree.children)
    assert levels == ["scale0", "scale1", "scale2", "scale3"]
    shapes = [tree[k]["image"].shape for k in levels]
    for prev, cur in itertools.pairwise(shapes):
        assert cur == (3, prev[1] // 2, prev[2] // 2)
    assert all(tree[k]["image"].dtype == np.uint8 for k in levels)
    flat = synthetic(n_samples=1, n_rows=4, n_cols=5)
    np.testing.assert_array_equal(np.asarray(tree["scale0"]["image"].data), np.asarray(flat["sample0_image"].data))


def test_synthetic_without_table():
    sd = synthetic(n_samples=2, n_rows=4, n_cols=4, with_table=False)
    assert len(sd.tables) == 0
    assert set(sd.images) == {"sample0_image", "sample1_image"}
    assert set(sd.shapes) == {"sample0_spots", "sample1_spots"}


def test_synthetic_zarr_roundtrip(tmp_path):
    import spatialdata

    sd = synthetic(n_samples=2, n_rows=4, n_cols=4, layout="st", pixel_size=4.0)
    sd.write(tmp_path / "syn.zarr")
    back = spatialdata.read_zarr(tmp_path / "syn.zarr")
    assert set(back.images) == set(sd.images)
    assert set(back.shapes) == set(sd.shapes)
    np.testing.assert_array_equal(_image(back, "sample1"), _image(sd, "sample1"))
    assert (sparse.csr_matrix(back["table"].X) != sd["table"].X).nnz == 0
    assert back["table"].uns[Key.UNS][Key.UNS_SPOTS]["sample0"]["pitch"] == 200.0
    np.testing.assert_allclose(back["sample0_spots"]["radius"], sd["sample0_spots"]["radius"])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"layout": "hex"}, "layout"),
        ({"n_rows": 1}, "n_rows"),
        ({"n_samples": 0}, "n_samples"),
        ({"n_genes": 3}, "n_genes"),
        ({"pixel_size": 0.0}, "pixel_size"),
        ({"pixel_size": 0.01}, "pixel_size"),
    ],
)
def test_synthetic_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        synthetic(**kwargs)


# ----------------------------------------------------------------------------------------------- Her2ST layout
def _write_fake_section(folder: Path, genes: list[str], *, step: float, rng: np.random.Generator) -> pd.DataFrame:
    """A tiny Her2ST-style section: 8 × 7 grid, one off-grid spot, two spots without count rows."""
    from PIL import Image

    folder.mkdir(parents=True)
    x, y = np.meshgrid(np.arange(5, 13), np.arange(5, 12))
    x, y = x.ravel(), y.ravel()
    px = 20.0 + (x - 5) * step + rng.normal(0, 0.2, x.size)
    py = 30.0 + (y - 5) * step * 1.002 + rng.normal(0, 0.2, y.size)
    px[7] += 0.4 * step  # one spot detected far off its grid position
    spots = pd.DataFrame({"x": x, "y": y, "new_x": x, "new_y": y, "pixel_x": px, "pixel_y": py, "selected": 1})
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    names = (spots["x"].astype(str) + "x" + spots["y"].astype(str)).to_numpy()
    counts = pd.DataFrame(rng.poisson(2.0, (len(spots) - 2, len(genes))), index=names[2:], columns=genes)
    with gzip.open(folder / "counts.tsv.gz", "wt") as fh:
        counts.to_csv(fh, sep="\t")
    Image.fromarray(rng.integers(0, 255, (int(py.max()) + 40, int(px.max()) + 40, 3), dtype=np.uint8)).save(
        folder / "he.jpg"
    )
    return counts


@pytest.fixture(scope="module")
def fake_her2st(tmp_path_factory):
    root = tmp_path_factory.mktemp("her2st")
    rng = np.random.default_rng(0)
    a = _write_fake_section(root / "A1", [f"g{i}" for i in range(10)], step=29.0, rng=rng)
    b = _write_fake_section(root / "B1", [f"g{i}" for i in range(2, 12)], step=30.0, rng=rng)
    return root, a, b


def test_fit_pixels_per_step_is_robust():
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(15)), -1).reshape(-1, 2).astype(float)
    theta = 0.02
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pixels = grid @ rot.T * 290.0 + 100 + rng.normal(0, 3.0, grid.shape)
    pixels[:6] += rng.uniform(60, 120, (6, 2))  # off-grid spots
    assert fit_pixels_per_step(grid, pixels) == pytest.approx(290.0, rel=2e-3)
    with pytest.raises(ValueError, match="non-collinear"):
        fit_pixels_per_step(grid[:20:5] * [1, 0], pixels[:20:5])


def test_reader_helpers_by_hand():
    a, b = pd.Index(["g1", "g2", "g3"]), pd.Index(["g3", "g4", "g1"])
    assert list(combine_genes([a, b], "intersection")) == ["g1", "g3"]  # order of the first sample
    assert list(combine_genes([a, b], "union")) == ["g1", "g2", "g3", "g4"]  # first seen
    x = sparse.csr_matrix(np.array([[1, 0, 7], [0, 5, 2]], dtype=np.int32))  # columns g3, g4, g1 (sample b)
    out = reindex_columns(x, b, pd.Index(["g1", "g2", "g3"]))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out.toarray(), [[7, 0, 1], [2, 0, 0]])  # g4 dropped, g2 absent
    assert normalise_chunks(None) is None
    assert normalise_chunks(512) == (3, 512, 512)
    assert normalise_chunks((3, 64, 32)) == (3, 64, 32)
    with pytest.raises(ValueError, match="positive"):
        normalise_chunks(0)
    with pytest.raises(TypeError, match="must be an int"):
        normalise_chunks(1.5)
    assert spot_metadata(spot_diameter=55, pitch=100, layout="visium", pixel_size=0.5) == {
        "spot_diameter": 55.0,
        "pitch": 100.0,
        "layout": "visium",
        "pixel_size": 0.5,
    }
    adata = ad.AnnData(np.array([[0.5, 1.0], [2.0, 0.0]], dtype=np.float32))  # .X is not counts
    adata.layers[Key.LAYER_COUNTS] = sparse.csr_matrix(np.array([[3.0, 0.0], [1.0, 4.0]]))
    counts = raw_counts(adata, source="test")
    assert counts.dtype == np.int32
    np.testing.assert_array_equal(counts.toarray(), [[3, 0], [1, 4]])
    with pytest.raises(ValueError, match="test holds no raw integer counts"):
        raw_counts(ad.AnnData(-np.ones((2, 2), dtype=np.float32)), source="test")


def test_readers_share_one_helper_module():
    from hyperst.datasets import _her2st, _hest, _synthetic, _utils, _visium

    for module in (_her2st, _hest, _synthetic, _visium):
        for name in ("image_key", "spots_key", "spot_metadata", "parse_circles", "parse_table"):
            assert getattr(module, name) is getattr(_utils, name), (module.__name__, name)
    assert _hest.raw_counts is _visium.raw_counts is _utils.raw_counts
    assert _visium.fit_pixels_per_step is _her2st.fit_pixels_per_step is _utils.fit_pixels_per_step
    assert (_her2st.ST_SPOT_DIAMETER, _her2st.ST_PITCH) == (100.0, 200.0)


def test_her2st_reader_on_fake_layout(fake_her2st, caplog):
    import hyperst

    root, a, b = fake_her2st
    hyperst.settings.verbosity = "info"
    try:
        with caplog.at_level(logging.INFO, logger="hyperst"):
            logger = logging.getLogger("hyperst")
            logger.addHandler(caplog.handler)
            try:
                sd = her2st(root, chunks=32)
            finally:
                logger.removeHandler(caplog.handler)
    finally:
        hyperst.settings.verbosity = "warning"
    assert "2 of 56 spots have no count row" in caplog.text
    assert set(sd.images) == {"A1_image", "B1_image"}
    assert set(sd.coordinate_systems) == {"A1", "B1"}
    table = sd["table"]
    assert table.shape == (108, 8)  # 54 + 54 spots, genes g2..g9 shared
    assert list(table.var_names) == [f"g{i}" for i in range(2, 10)]
    assert table.X.dtype == np.int32
    assert table.X.format == "csr"
    sub, xy = _sample(table, "A1")
    np.testing.assert_array_equal(sub.X.toarray(), a[[f"g{i}" for i in range(2, 10)]].to_numpy())
    assert list(sub.obs_names[:2]) == ["A1_7x5", "A1_8x5"]
    np.testing.assert_array_equal(sub.obs["array_col"].to_numpy()[:2], [7, 8])
    np.testing.assert_array_equal(sub.obs["array_row"].to_numpy()[:2], [5, 5])
    meta = table.uns[Key.UNS][Key.UNS_SPOTS]
    assert meta["A1"]["pixel_size"] == pytest.approx(200 / 29.0 / np.sqrt(1.002), rel=2e-3)
    assert meta["B1"]["pixel_size"] == pytest.approx(200 / 30.0 / np.sqrt(1.002), rel=2e-3)
    assert meta["A1"]["layout"] == "st"
    assert meta["A1"]["spot_diameter"] == 100.0
    assert meta["A1"]["pitch"] == 200.0
    np.testing.assert_allclose(sd["A1_spots"]["radius"], 50.0 / meta["A1"]["pixel_size"])
    np.testing.assert_allclose(np.c_[sd["A1_spots"].geometry.x, sd["A1_spots"].geometry.y], xy)
    assert sd["A1_image"].data.chunksize == (3, 32, 32)

    union = her2st(root, sections=["B1", "A1"], genes="union", multiscale=True)
    ut = union["table"]
    assert ut.shape == (108, 12)
    assert list(ut.obs["sample"].cat.categories) == ["B1", "A1"]
    b_sub, _ = _sample(ut, "B1")
    assert b_sub[:, ["g0", "g1"]].X.nnz == 0  # not measured in B1: zero-filled
    np.testing.assert_array_equal(b_sub[:, [f"g{i}" for i in range(2, 12)]].X.toarray(), b.to_numpy())
    assert sorted(union["A1_image"].children) == ["scale0", "scale1", "scale2", "scale3"]


def test_her2st_errors(fake_her2st, tmp_path):
    root, _, _ = fake_her2st
    with pytest.raises(FileNotFoundError, match="does not exist"):
        her2st(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="No Her2ST section"):
        her2st(tmp_path)
    with pytest.raises(ValueError, match=r"Unknown Her2ST section.*available: \['A1', 'B1'\]"):
        her2st(root, sections=["A1", "Z9"])
    with pytest.raises(ValueError, match="more than once"):
        her2st(root, sections=["A1", "A1"])
    with pytest.raises(ValueError, match="empty"):
        her2st(root, sections=[])
    with pytest.raises(ValueError, match="genes"):
        her2st(root, genes="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunks"):
        her2st(root, chunks=0)
    broken = tmp_path / "broken" / "C9"
    broken.mkdir(parents=True)
    (broken / "spots.tsv").write_text("x\ty\tpixel_x\tpixel_y\n")
    with pytest.raises(FileNotFoundError, match=r"lacks \['he.jpg', 'counts.tsv.gz'\]"):
        her2st(broken.parent, sections="C9")


# ----------------------------------------------------------------------------------------------- real Her2ST
@pytest.fixture(scope="module")
def her2st_path() -> Path:
    if not (HER2ST / "C2" / "he.jpg").is_file():
        pytest.skip(f"Her2ST data not found at {HER2ST}")
    return HER2ST


@pytest.fixture(scope="module")
def her2st_c2(her2st_path):
    return her2st(her2st_path, sections="C2")


@pytest.mark.her2st
def test_her2st_one_section_full(her2st_c2, her2st_path):
    sd = her2st_c2
    assert set(sd.images) == {"C2_image"}
    assert set(sd.shapes) == {"C2_spots"}
    image = sd["C2_image"]
    assert image.dims == ("c", "y", "x")
    assert image.dtype == np.uint8
    assert image.shape == (3, README_SIZE["C2"][1], README_SIZE["C2"][0])
    table = sd["table"]
    assert table.shape == (README_SPOTS["C2"], 15706)
    pixel_size = table.uns[Key.UNS][Key.UNS_SPOTS]["C2"]["pixel_size"]
    assert pixel_size == pytest.approx(0.69, rel=0.05)
    xy = table.obsm[Key.OBSM_SPATIAL]
    radius = sd["C2_spots"]["radius"].to_numpy()
    np.testing.assert_allclose(radius, 50.0 / pixel_size)
    assert 140 < 2 * radius[0] < 150  # README: a 100 µm spot is ≈145 px across
    assert (xy - radius[:, None]).min() >= 0
    assert (xy[:, 0] + radius).max() <= image.shape[2]
    assert (xy[:, 1] + radius).max() <= image.shape[1]
    # spot names and array coordinates agree; counts match the file
    first = table.obs_names[0]
    x, y = (int(v) for v in first.removeprefix("C2_").split("x"))
    assert (table.obs["array_col"].iloc[0], table.obs["array_row"].iloc[0]) == (x, y)
    counts = pd.read_csv(her2st_path / "C2" / "counts.tsv.gz", sep="\t", index_col=0, usecols=[0, 1, 2])
    column = table[:, counts.columns[0]].X.toarray().ravel()
    np.testing.assert_array_equal(column, counts.loc[[n.removeprefix("C2_") for n in table.obs_names]].iloc[:, 0])
    # tissue is darker than the slide background around it: the spots sit on the H&E
    img = np.asarray(image.data[:, ::16, ::16]).mean(0)
    on_spots = img[(xy[:, 1] / 16).astype(int), (xy[:, 0] / 16).astype(int)].mean()
    assert on_spots < img.mean()


@pytest.mark.her2st
def test_her2st_all_sections_metadata(her2st_path):
    sections = ["C2", "C3", "C4", "C5", "C6"]
    adata, spots, pixel_sizes = _read_tables(her2st_path, sections, "intersection")
    n_obs = adata.obs["sample"].value_counts()
    assert {s: int(n_obs[s]) for s in sections} == {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}
    for s in sections:
        assert abs(int(n_obs[s]) - README_SPOTS[s]) <= 5
        assert pixel_sizes[s] == pytest.approx(0.69, rel=0.05)
        width, height = README_SIZE[s]
        px = spots[s][["pixel_x", "pixel_y"]].to_numpy()
        assert px.min() > 0
        assert px[:, 0].max() < width
        assert px[:, 1].max() < height
    assert 13_500 < adata.n_vars < 14_500  # README: ≈13.9k genes shared
    for marker in ("ERBB2", "GRB7", "KRT19", "CD74", "COL1A1", "MGP", "FN1"):
        assert marker in adata.var_names
    assert adata.obs_names.is_unique
    assert adata.X.dtype == np.int32
