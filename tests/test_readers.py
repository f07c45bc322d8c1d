"""HEST-1k and Visium readers, on tiny on-disk examples of each layout built in ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("spatialdata_io")

from hyperst._constants import Key  # noqa: E402
from hyperst.datasets import hest, read_wsi  # noqa: E402
from hyperst.datasets._visium import legacy, visium, visium_pixel_size  # noqa: E402

BACKGROUND = 240


# ----------------------------------------------------------------------------------------------- helpers
def _hex_grid(n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Visium array coordinates: ``array_col`` doubled, one parity per row."""
    rows, cols = [], []
    for r in range(n_rows):
        for c in range(r % 2, 2 * n_cols, 2):
            rows.append(r)
            cols.append(c)
    return np.array(rows), np.array(cols)


def _marker(i: int) -> tuple[int, int, int]:
    """Colour painted at spot ``i`` (unique per spot, never the background)."""
    return (10 + i % 200, 50 + i // 200, 200)


def _paint(shape: tuple[int, int], centres: np.ndarray, half: int) -> np.ndarray:
    img = np.full((*shape, 3), BACKGROUND, np.uint8)
    for i, (x, y) in enumerate(np.round(centres).astype(int)):
        img[y - half : y + half + 1, x - half : x + half + 1] = _marker(i)
    return img


def _counts(n_spots: int, n_genes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n_spots, n_genes))
    x[rng.random(x.shape) < 0.5] = 0
    return x.astype(np.int64)


def _pyramid(img: np.ndarray, n: int) -> list[np.ndarray]:
    levels = [img]
    for _ in range(n):
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    return levels


def _centres_px(sdata, shapes_key: str) -> np.ndarray:
    geom = sdata.shapes[shapes_key].geometry
    return np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])


def _pixels_at(image_cyx: np.ndarray, centres_xy: np.ndarray) -> np.ndarray:
    ij = np.floor(centres_xy).astype(int)
    return image_cyx[:, ij[:, 1], ij[:, 0]].T


# ----------------------------------------------------------------------------------------------- HEST fixture
HEST_PIXEL = 0.5  # µm/px of the Visium sample
ST_PIXEL = 1.0  # µm/px of the ST sample (TIFF tags only)


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hest")
    for d in ("wsis", "st", "metadata", "tissue_seg", "spatial_plots"):
        (root / d).mkdir()
    info: dict = {"root": root}

    # -- V1: Visium hex grid, pyramidal TIFF written page by page (as libvips does), 0.5 µm/px
    rows, cols = _hex_grid(10, 9)
    xy = np.column_stack([150 + cols * 50 / HEST_PIXEL, 150 + rows * 50 * np.sqrt(3) / HEST_PIXEL])
    xy = np.round(xy)
    img = _paint((2048, 2048), xy, half=4)
    levels = _pyramid(img, 3)
    with tifffile.TiffWriter(root / "wsis" / "V1.tif") as tw:
        for k, level in enumerate(levels):
            extra = {"resolution": (1e4 / 0.55, 1e4 / 0.55), "resolutionunit": "CENTIMETER"} if k == 0 else {}
            tw.write(level, tile=(256, 256), photometric="rgb", subfiletype=1 if k else 0, metadata=None, **extra)
    x1 = _counts(len(xy), 12, seed=1)
    genes1 = [f"G{i}" for i in range(12)]
    a1 = ad.AnnData(
        X=sparse.csr_matrix(x1.astype(np.float32)),
        obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"AC{i:03d}-1" for i in range(len(xy))]),
        var=pd.DataFrame(index=genes1),
    )
    a1.obsm["spatial"] = xy
    a1.write_h5ad(root / "st" / "V1.h5ad")
    meta1 = {
        "pixel_size_um_estimated": HEST_PIXEL,
        "pixel_size_um_embedded": 0.55,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "st_technology": "Visium",
    }
    (root / "metadata" / "V1.json").write_text(json.dumps(meta1))
    info["V1"] = {"xy": xy, "x": x1, "genes": genes1, "levels": levels, "rows": rows, "cols": cols}

    # -- ST1: legacy ST square grid, single-level TIFF with SubIFD-less pages, pixel size only in the TIFF tags
    gx, gy = np.meshgrid(np.arange(4), np.arange(4))
    st_xy = np.column_stack([212 + gx.ravel() * 200 / ST_PIXEL, 212 + gy.ravel() * 200 / ST_PIXEL])
    st_img = _paint((1024, 1024), st_xy, half=6)
    tifffile.imwrite(
        root / "wsis" / "ST1.tif",
        st_img,
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / ST_PIXEL, 1e4 / ST_PIXEL),
        resolutionunit="CENTIMETER",
    )
    genes2 = [f"G{i}" for i in range(6, 18)]  # shares G6..G11 with V1
    x2 = _counts(len(st_xy), 12, seed=2)
    names = [f"{c}x{r}" for r, c in zip(gy.ravel() + 1, gx.ravel() + 1, strict=True)]
    a2 = ad.AnnData(X=sparse.csr_matrix(x2), obs=pd.DataFrame(index=names), var=pd.DataFrame(index=genes2))
    a2.obsm["spatial"] = st_xy
    a2.write_h5ad(root / "st" / "ST1.h5ad")
    meta2 = {"st_technology": "Spatial Transcriptomics", "spot_diameter": 100.0, "inter_spot_dist": 200.0}
    (root / "metadata" / "ST1.json").write_text(json.dumps(meta2))
    info["ST1"] = {"xy": st_xy, "x": x2, "genes": genes2, "img": st_img}

    # -- an incomplete sample (no WSI)
    (root / "metadata" / "X9.json").write_text(json.dumps(meta1))
    a1.write_h5ad(root / "st" / "X9.h5ad")
    return info


# ----------------------------------------------------------------------------------------------- HEST tests
def test_hest_image_levels_are_the_tiff_pyramid_and_lazy(hest_root: dict) -> None:
    from spatialdata.transformations import get_transformation
    from xarray import DataTree

    sdata = hest(hest_root["root"], "V1", chunks=512)
    image = sdata.images["V1_image"]
    assert isinstance(image, DataTree)
    levels = hest_root["V1"]["levels"]
    assert list(image.keys()) == ["scale0", "scale1", "scale2", "scale3"]
    for k, expected in enumerate(levels):
        arr = image[f"scale{k}"]["image"]
        assert arr.shape == (3, *expected.shape[:2])
        assert isinstance(arr.data, da.Array)
        # read through tifffile's zarr store, not an in-memory copy
        assert any("from-zarr" in str(name) for name in arr.data.__dask_graph__().layers)
        scale = get_transformation(arr, to_coordinate_system="V1").to_affine_matrix(("x", "y"), ("x", "y"))
        np.testing.assert_allclose(np.diag(scale)[:2], [2**k, 2**k])
    assert image["scale0"]["image"].data.chunksize == (3, 512, 512)
    np.testing.assert_array_equal(image["scale2"]["image"].values, levels[2].transpose(2, 0, 1))
    np.testing.assert_array_equal(
        image["scale0"]["image"][:, 300:340, 1000:1100].values, levels[0][300:340, 1000:1100].transpose(2, 0, 1)
    )

    single = hest(hest_root["root"], "V1", multiscale=False)
    assert single.images["V1_image"].shape == (3, 2048, 2048)
    assert isinstance(single.images["V1_image"].data, da.Array)


def test_hest_spots_fall_on_the_painted_markers(hest_root: dict) -> None:
    sdata = hest(hest_root["root"], ["V1"])
    centres = _centres_px(sdata, "V1_spots")
    table = sdata.tables["table"]
    np.testing.assert_allclose(centres, hest_root["V1"]["xy"])
    np.testing.assert_allclose(table.obsm[Key.OBSM_SPATIAL], hest_root["V1"]["xy"])
    level0 = sdata.images["V1_image"]["scale0"]["image"].values
    expected = np.array([_marker(i) for i in range(len(centres))])
    np.testing.assert_array_equal(_pixels_at(level0, centres), expected)
    # radius: 55 µm spots at 0.5 µm/px (the estimate wins over the embedded 0.55)
    np.testing.assert_allclose(sdata.shapes["V1_spots"]["radius"], 27.5 / HEST_PIXEL)
    meta = table.uns[Key.UNS][Key.UNS_SPOTS]["V1"]
    assert meta == {"spot_diameter": 55.0, "pitch": 100.0, "layout": "visium", "pixel_size": HEST_PIXEL}
    np.testing.assert_array_equal(table.obs[Key.OBS_ARRAY_ROW], hest_root["V1"]["rows"])
    np.testing.assert_array_equal(table.obs[Key.OBS_ARRAY_COL], hest_root["V1"]["cols"])


def test_hest_table_counts_two_samples(hest_root: dict) -> None:
    sdata = hest(hest_root["root"], ["V1", "ST1"])
    table = sdata.tables["table"]
    shared = [f"G{i}" for i in range(6, 12)]
    assert list(table.var_names) == shared
    assert sparse.issparse(table.X)
    assert table.X.dtype == np.int32
    v1 = hest_root["V1"]
    st = hest_root["ST1"]
    n1 = len(v1["xy"])
    np.testing.assert_array_equal(table.X[:n1].toarray(), v1["x"][:, 6:12])
    np.testing.assert_array_equal(table.X[n1:].toarray(), st["x"][:, :6])
    assert list(table.obs[Key.OBS_SAMPLE].cat.categories) == ["V1", "ST1"]
    assert (table.obs[Key.OBS_SAMPLE] == "ST1").sum() == len(st["xy"])
    assert table.obs_names[0] == "V1_AC000-1"
    assert table.obs["barcode"].iloc[n1] == "1x1"
    # array coordinates are dropped when one sample lacks them
    assert Key.OBS_ARRAY_ROW not in table.obs
    assert set(table.obs[Key.TABLE_REGION_KEY].cat.categories) == {"V1_spots", "ST1_spots"}

    union = hest(hest_root["root"], ["V1", "ST1"], genes="union").tables["table"]
    assert union.n_vars == 18
    np.testing.assert_array_equal(union[union.obs[Key.OBS_SAMPLE] == "ST1", [f"G{i}" for i in range(6)]].X.toarray(), 0)
    np.testing.assert_array_equal(union[union.obs[Key.OBS_SAMPLE] == "ST1", st["genes"]].X.toarray(), st["x"])


def test_hest_st_sample_pixel_size_from_tiff_and_built_levels(hest_root: dict) -> None:
    from xarray import DataTree

    sdata = hest(hest_root["root"], "ST1")
    meta = sdata.tables["table"].uns[Key.UNS][Key.UNS_SPOTS]["ST1"]
    assert meta == {"spot_diameter": 100.0, "pitch": 200.0, "layout": "st", "pixel_size": ST_PIXEL}
    image = sdata.images["ST1_image"]
    assert isinstance(image, DataTree)  # the file has no pyramid: levels built lazily (1024 → 512 → 256)
    assert [image[k]["image"].shape[1] for k in image] == [1024, 512, 256]
    centres = _centres_px(sdata, "ST1_spots")
    level0 = image["scale0"]["image"].values
    np.testing.assert_array_equal(_pixels_at(level0, centres), [_marker(i) for i in range(len(centres))])
    np.testing.assert_allclose(sdata.shapes["ST1_spots"]["radius"], 50.0 / ST_PIXEL)


def test_hest_feeds_resolve_spots(hest_root: dict) -> None:
    import hyperst as hst

    sdata = hest(hest_root["root"], ["V1", "ST1"])
    resolved = {s.sample: s for s in hst.pp.resolve_spots(sdata)}
    assert set(resolved) == {"V1", "ST1"}
    assert resolved["V1"].pixel_size == HEST_PIXEL
    assert resolved["V1"].pixel_size_source == "metadata"
    assert resolved["ST1"].layout == "st"
    np.testing.assert_allclose(resolved["V1"].centers_px, hest_root["V1"]["xy"])


def test_hest_errors(hest_root: dict, tmp_path: Path) -> None:
    root = hest_root["root"]
    with pytest.raises(ValueError, match=r"Unknown HEST sample id.*available.*ST1, V1"):
        hest(root, "NOPE")
    with pytest.raises(FileNotFoundError, match=r"X9.*wsis/X9.tif"):
        hest(root, ["V1", "X9"])
    with pytest.raises(ValueError, match="more than once"):
        hest(root, ["V1", "V1"])
    with pytest.raises(ValueError, match="empty"):
        hest(root, [])
    with pytest.raises(ValueError, match="genes"):
        hest(root, "V1", genes="all")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hest(tmp_path / "missing", "V1")
    with pytest.raises(FileNotFoundError, match="lacks the folder"):
        hest(tmp_path, "V1")

    # a sample without any pixel size, and one whose counts are normalised
    bad = tmp_path / "bad"
    for d in ("wsis", "st", "metadata"):
        (bad / d).mkdir(parents=True)
    tifffile.imwrite(bad / "wsis" / "A.tif", np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    adata = ad.read_h5ad(root / "st" / "V1.h5ad")
    adata.write_h5ad(bad / "st" / "A.h5ad")
    (bad / "metadata" / "A.json").write_text(json.dumps({"st_technology": "Visium"}))
    with pytest.raises(ValueError, match=r"No pixel size.*pixel_size_um_estimated"):
        hest(bad, "A")
    (bad / "metadata" / "A.json").write_text(json.dumps({"st_technology": "Visium", "pixel_size_um_estimated": 0.5}))
    adata.X = adata.X / 3.0
    adata.write_h5ad(bad / "st" / "A.h5ad")
    with pytest.raises(ValueError, match="no raw integer counts"):
        hest(bad, "A")


def test_read_wsi_rejects_non_rgb(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "grey.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        read_wsi(tmp_path / "grey.tif", coordinate_system="s")
    tifffile.imwrite(tmp_path / "u16.tif", np.zeros((64, 64, 3), np.uint16), photometric="rgb")
    with pytest.raises(ValueError, match="uint8"):
        read_wsi(tmp_path / "u16.tif", coordinate_system="s")
    with pytest.raises(FileNotFoundError):
        read_wsi(tmp_path / "none.tif", coordinate_system="s")


# ----------------------------------------------------------------------------------------------- Visium fixture
VISIUM_PIXEL = 0.8  # µm per full-resolution pixel
HIRES, LOWRES = 0.25, 0.1


def _write_10x_h5(file: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """A Cell Ranger / Space Ranger v3 feature-barcode matrix (genes × barcodes, CSC)."""
    import h5py

    csc = sparse.csc_matrix(counts.T.astype(np.int32))  # genes × spots; columns = spots
    with h5py.File(file, "w") as f:
        f.attrs["library_ids"] = np.array([b"LIB1"])
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=csc.data.astype(np.int32))
        m.create_dataset("indices", data=csc.indices.astype(np.int64))
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        feats = m.create_group("features")
        feats.create_dataset("id", data=np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S"))
        feats.create_dataset("name", data=np.array(genes, dtype="S"))
        feats.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(genes), dtype="S"))
        feats.create_dataset("genome", data=np.array(["GRCh38"] * len(genes), dtype="S"))


def _space_ranger(folder: Path, *, prefix: str = "", old_positions: bool = False) -> dict:
    from PIL import Image

    (folder / "spatial").mkdir(parents=True)
    rows, cols = _hex_grid(6, 6)
    xy = np.column_stack([90 + cols * 50 / VISIUM_PIXEL, 90 + rows * 50 * np.sqrt(3) / VISIUM_PIXEL])
    full = _paint((1000, 1000), xy, half=8)
    barcodes = [f"AAAC{i:04d}-1" for i in range(len(xy))]
    genes = [f"Gene{i}" for i in range(8)]
    counts = _counts(len(xy), len(genes), seed=3)
    in_counts = np.arange(len(xy)) != 5  # one spot off tissue, absent from the filtered matrix
    _write_10x_h5(
        folder / f"{prefix}filtered_feature_bc_matrix.h5", counts[in_counts], list(np.array(barcodes)[in_counts]), genes
    )
    positions = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_counts.astype(int),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    )
    if old_positions:
        positions.to_csv(folder / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    else:
        positions.to_csv(folder / "spatial" / "tissue_positions.csv", index=False)
    scalefactors = {
        "spot_diameter_fullres": 65.0 / VISIUM_PIXEL,
        "tissue_hires_scalef": HIRES,
        "tissue_lowres_scalef": LOWRES,
        "fiducial_diameter_fullres": 1.6 * 65.0 / VISIUM_PIXEL,
    }
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    hires = np.ascontiguousarray(full[::4, ::4])
    lowres = np.ascontiguousarray(full[::10, ::10])
    Image.fromarray(hires).save(folder / "spatial" / "tissue_hires_image.png")
    Image.fromarray(lowres).save(folder / "spatial" / "tissue_lowres_image.png")
    tifffile.imwrite(folder / "fullres.tif", full, photometric="rgb")
    return {
        "xy": xy[in_counts],
        "counts": counts[in_counts],
        "barcodes": list(np.array(barcodes)[in_counts]),
        "rows": rows[in_counts],
        "cols": cols[in_counts],
        "genes": genes,
        "full": full,
        "hires": hires,
        "lowres": lowres,
        "markers": np.array([_marker(i) for i in np.flatnonzero(in_counts)]),
    }


@pytest.fixture(scope="module")
def space_ranger(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("visium") / "outs"
    info = _space_ranger(folder)
    info["path"] = folder
    return info


def _check_visium_table(table: ad.AnnData, info: dict, sample: str) -> None:
    assert table.X.dtype == np.int32
    np.testing.assert_array_equal(table.X.toarray(), info["counts"])
    assert list(table.var_names) == info["genes"]
    assert list(table.obs["barcode"]) == info["barcodes"]
    assert table.obs_names[0] == f"{sample}_{info['barcodes'][0]}"
    assert (table.obs[Key.OBS_SAMPLE] == sample).all()
    np.testing.assert_array_equal(table.obs[Key.OBS_ARRAY_ROW], info["rows"])
    np.testing.assert_array_equal(table.obs[Key.OBS_ARRAY_COL], info["cols"])
    np.testing.assert_allclose(table.obsm[Key.OBSM_SPATIAL], info["xy"])


# ----------------------------------------------------------------------------------------------- Visium tests
def test_visium_pixel_size_from_grid_and_scalefactor() -> None:
    rows, cols = _hex_grid(5, 5)
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    um = np.column_stack([cols * 50.0, rows * 50.0 * np.sqrt(3)])
    px = um @ rot.T / 0.37 + 100
    size, source = visium_pixel_size(px, array_row=rows, array_col=cols, spot_diameter_fullres=65 / 0.37)
    assert source == "grid"
    assert size == pytest.approx(0.37, rel=1e-9)
    size, source = visium_pixel_size(px, spot_diameter_fullres=65 / 0.37)
    assert (size, source) == (pytest.approx(0.37), "spot_diameter_fullres")
    with pytest.raises(ValueError, match="spot_diameter_fullres"):
        visium_pixel_size(px)


def test_visium_hires_is_the_image_without_fullres(space_ranger: dict) -> None:
    import hyperst as hst

    sdata = visium(space_ranger["path"], sample="S1")
    assert set(sdata.images) == {"S1_image", "S1_lowres_image"}
    table = sdata.tables["table"]
    _check_visium_table(table, space_ranger, "S1")
    meta = table.uns[Key.UNS][Key.UNS_SPOTS]["S1"]
    assert meta["layout"] == "visium"
    assert (meta["spot_diameter"], meta["pitch"]) == (55.0, 100.0)
    assert meta["pixel_size"] == pytest.approx(VISIUM_PIXEL / HIRES, rel=1e-6)
    np.testing.assert_allclose(sdata.shapes["S1_spots"]["radius"], 27.5 / VISIUM_PIXEL, rtol=1e-6)
    np.testing.assert_array_equal(sdata.images["S1_image"].values, space_ranger["hires"].transpose(2, 0, 1))

    (spots,) = hst.pp.resolve_spots(sdata)
    assert spots.image_key == "S1_image"
    assert spots.coordinate_system == "S1"
    np.testing.assert_allclose(spots.centers_px, space_ranger["xy"] * HIRES, rtol=1e-6)
    assert spots.pixel_size == pytest.approx(VISIUM_PIXEL / HIRES, rel=1e-6)
    # spot size in hires pixels × µm per hires pixel = 55 µm
    assert spots.spot_diameter == 55.0
    np.testing.assert_array_equal(
        _pixels_at(sdata.images["S1_image"].values, spots.centers_px), space_ranger["markers"]
    )
    # the lowres image stays registered with the spots in its own coordinate system
    from spatialdata.transformations import get_transformation

    assert set(get_transformation(sdata.images["S1_lowres_image"], get_all=True)) == {"S1_downscaled_lowres"}
    assert "S1_downscaled_lowres" in get_transformation(sdata.shapes["S1_spots"], get_all=True)


def test_visium_fullres_image(space_ranger: dict) -> None:
    import hyperst as hst

    sdata = visium(space_ranger["path"], sample="S1", fullres_image_file="fullres.tif")
    assert set(sdata.images) == {"S1_image", "S1_hires_image", "S1_lowres_image"}
    meta = sdata.tables["table"].uns[Key.UNS][Key.UNS_SPOTS]["S1"]
    assert meta["pixel_size"] == pytest.approx(VISIUM_PIXEL, rel=1e-6)
    (spots,) = hst.pp.resolve_spots(sdata)
    assert spots.image_key == "S1_image"
    np.testing.assert_allclose(spots.centers_px, space_ranger["xy"], rtol=1e-9)
    from spatialdata import get_pyramid_levels

    level0 = get_pyramid_levels(sdata.images["S1_image"], n=0).values
    np.testing.assert_array_equal(_pixels_at(level0, spots.centers_px), space_ranger["markers"])

    lowres = visium(space_ranger["path"], sample="S1", image="lowres")
    assert lowres.tables["table"].uns[Key.UNS][Key.UNS_SPOTS]["S1"]["pixel_size"] == pytest.approx(
        VISIUM_PIXEL / LOWRES
    )
    with pytest.raises(ValueError, match="not available"):
        visium(space_ranger["path"], sample="S1", image="fullres")


def test_visium_spaceranger1_positions_and_prefixed_counts(tmp_path: Path) -> None:
    folder = tmp_path / "outs"
    info = _space_ranger(folder, prefix="S2_", old_positions=True)
    sdata = visium(folder)
    assert "S2_spots" in sdata.shapes
    _check_visium_table(sdata.tables["table"], info, "S2")


def test_visium_errors(space_ranger: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        visium(tmp_path / "missing")
    with pytest.raises(TypeError, match="sample"):
        visium(space_ranger["path"], dataset_id="S1")
    with pytest.raises(ValueError, match="image"):
        visium(space_ranger["path"], image="best")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="fullres_image_file"):
        visium(space_ranger["path"], sample="S1", fullres_image_file="nope.tif")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="counts file"):
        visium(empty)


# ----------------------------------------------------------------------------------------------- legacy AnnData
def _legacy_adata(info: dict) -> ad.AnnData:
    adata = ad.AnnData(
        X=sparse.csr_matrix(info["counts"].astype(np.float32)),
        obs=pd.DataFrame(
            {
                "array_row": info["rows"],
                "array_col": info["cols"],
                "cluster": pd.Categorical(["a", "b"] * (len(info["rows"]) // 2) + ["a"] * (len(info["rows"]) % 2)),
            },
            index=info["barcodes"],
        ),
        var=pd.DataFrame(index=info["genes"]),
    )
    adata.obsm["spatial"] = info["xy"].copy()
    adata.uns["spatial"] = {
        "LIB1": {
            "images": {"hires": info["hires"].astype(np.float32) / 255.0, "lowres": info["lowres"]},
            "scalefactors": {
                "spot_diameter_fullres": 65.0 / VISIUM_PIXEL,
                "tissue_hires_scalef": HIRES,
                "tissue_lowres_scalef": LOWRES,
            },
        }
    }
    return adata


def test_legacy_anndata(space_ranger: dict) -> None:
    import hyperst as hst

    adata = _legacy_adata(space_ranger)
    before = adata.copy()
    sdata = legacy(adata)
    assert set(sdata.images) == {"LIB1_image", "LIB1_lowres_image"}
    image = sdata.images["LIB1_image"]
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image.values, space_ranger["hires"].transpose(2, 0, 1))
    table = sdata.tables["table"]
    _check_visium_table(table, space_ranger, "LIB1")
    assert list(table.obs["cluster"]) == list(adata.obs["cluster"])
    (spots,) = hst.pp.resolve_spots(sdata)
    assert spots.pixel_size == pytest.approx(VISIUM_PIXEL / HIRES, rel=1e-6)
    np.testing.assert_array_equal(_pixels_at(image.values, spots.centers_px), space_ranger["markers"])
    # the input is left alone
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert set(adata.uns) == set(before.uns)
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())

    low = legacy(adata, sample="P1", image="lowres")
    assert "P1_image" in low.images
    assert low.tables["table"].uns[Key.UNS][Key.UNS_SPOTS]["P1"]["pixel_size"] == pytest.approx(VISIUM_PIXEL / LOWRES)


def test_legacy_errors(space_ranger: dict) -> None:
    adata = _legacy_adata(space_ranger)
    with pytest.raises(ValueError, match=r"uns\['spatial'\]"):
        legacy(ad.AnnData(X=adata.X))
    two = adata.copy()
    two.uns["spatial"]["LIB2"] = two.uns["spatial"]["LIB1"]
    with pytest.raises(ValueError, match="several libraries"):
        legacy(two)
    with pytest.raises(ValueError, match="library_key"):
        legacy(two, library_id="LIB1")
    two.obs["library"] = "LIB1"
    assert legacy(two, library_id="LIB1", library_key="library").tables["table"].n_obs == two.n_obs
    logged = adata.copy()
    logged.X = np.log1p(logged.X.toarray())
    with pytest.raises(ValueError, match="raw integer counts"):
        legacy(logged)
    logged.layers["counts"] = adata.X.copy()
    assert legacy(logged).tables["table"].X.sum() == adata.X.sum()
