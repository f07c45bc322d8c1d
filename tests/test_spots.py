"""Spot geometry resolution: keys, transformations, pixel size and clear errors."""

from __future__ import annotations

import warnings

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation

from hyperst._warnings import HyperSTWarning
from hyperst.pp._spots import resolve_spots, spot_table


def _hex(n_rows: int, n_cols: int, pitch: float, origin: float) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = origin + cols * pitch + (rows % 2) * pitch / 2
    y = origin + rows * pitch * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()])


def _square(n: int, pitch: float, origin: float) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.column_stack([(origin + cols * pitch).ravel(), (origin + rows * pitch).ravel()])


def _sdata(
    xy: np.ndarray,
    radius: float,
    *,
    image_shape: tuple[int, int] = (400, 500),
    shapes_transform=None,
    image_transform=None,
    cs: str = "global",
    image_cs: str | None = None,
    table_order: np.ndarray | None = None,
) -> SpatialData:
    image = Image2DModel.parse(
        np.full((3, *image_shape), 200, dtype=np.uint8),
        dims=("c", "y", "x"),
        transformations={image_cs or cs: image_transform or Identity()},
    )
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(len(xy), radius)}, geometry=[Point(x, y) for x, y in xy], index=np.arange(len(xy))
    )
    shapes = ShapesModel.parse(gdf, transformations={cs: shapes_transform or Identity()})
    order = np.arange(len(xy)) if table_order is None else table_order
    obs = pd.DataFrame(
        {"region": pd.Categorical(["spots"] * len(xy)), "instance_id": order, "sample": "s0"},
        index=[f"spot{i}" for i in order],
    )
    table = TableModel.parse(
        ad.AnnData(np.ones((len(xy), 3), dtype=np.float32), obs=obs),
        region="spots", region_key="region", instance_key="instance_id",
    )
    return SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table})


def test_visium_hex_identity() -> None:
    pitch_px = 40.0
    xy = _hex(5, 6, pitch_px, origin=50)
    (spots,) = resolve_spots(_sdata(xy, radius=0.275 * pitch_px))
    np.testing.assert_allclose(spots.centers_px, xy)
    assert spots.layout == "visium"
    assert spots.pixel_size_source == "spot_diameter"
    assert spots.pixel_size == pytest.approx(55.0 / (0.55 * pitch_px))
    assert spots.pitch == pytest.approx(100.0)
    assert spots.spot_diameter == pytest.approx(55.0)
    assert (spots.sample, spots.image_key, spots.shapes_key, spots.table_key) == ("s0", "he", "spots", "table")
    assert spots.image_shape == (400, 500)
    assert list(spots.obs_names[:2]) == ["spot0", "spot1"]


def test_st_square_grid_uses_pitch_when_no_radius_information() -> None:
    xy = _square(4, 60.0, origin=40)
    (spots,) = resolve_spots(_sdata(xy, radius=15.0))
    assert spots.layout == "st"
    # radius 15 px → diameter 30 px = 100 µm → 3.33 µm/px; pitch then = 60 px × 3.33 = 200 µm
    assert spots.pixel_size == pytest.approx(100 / 30)
    assert spots.pitch == pytest.approx(200.0)
    # an override that contradicts the spots (3.33 µm/px) is used, with a warning naming both sizes
    with pytest.warns(HyperSTWarning, match=r"their diameter is 30 px = 60 µm, but the spot diameter is 100 µm"):
        (spots,) = resolve_spots(_sdata(xy, radius=15.0), pixel_size=2.0)
    assert (spots.pixel_size, spots.pixel_size_source) == (2.0, "argument")


def test_jittered_st_grid_is_still_a_square_lattice() -> None:
    # spot positions jitter by 5 % of the pitch (as in the Her2ST files): the nearest-neighbour distance is
    # then biased low, but the layout (and so the pixel size of an H&E-only slide) must still be found
    xy = _square(12, 60.0, origin=40) + np.random.default_rng(0).normal(scale=3.0, size=(144, 2))
    (spots,) = resolve_spots(_sdata(xy, radius=15.0, image_shape=(800, 800)))
    assert spots.layout == "st"
    assert spots.pixel_size_source == "spot_diameter"
    assert spots.pitch == pytest.approx(200.0, rel=0.02)


def test_non_identity_transformations() -> None:
    # spots stored in µm (pixel size 0.5 µm/px → scale 2 to pixels) and shifted; image translated too
    pitch_um = 100.0
    xy_px = _hex(4, 4, 200.0, origin=150)  # where the spots truly are, in image pixels
    image_tf = Sequence([Scale([0.5, 0.5], axes=("x", "y")), Translation([10.0, -5.0], axes=("x", "y"))])
    # cs = image pixels * 0.5 + (10, -5); spots given directly in cs coordinates
    xy_cs = xy_px * 0.5 + np.array([10.0, -5.0])
    sdata = _sdata(xy_cs, radius=27.5, image_shape=(1000, 1100), image_transform=image_tf, cs="micron")
    (spots,) = resolve_spots(sdata)
    np.testing.assert_allclose(spots.centers_px, xy_px, atol=1e-9)
    assert spots.coordinate_system == "micron"
    # radius 27.5 cs units = 55 px → diameter 110 px = 55 µm → 0.5 µm/px
    assert spots.pixel_size == pytest.approx(0.5)
    assert spots.pitch == pytest.approx(pitch_um)


def test_table_order_is_followed() -> None:
    xy = _hex(3, 4, 40.0, origin=60)
    order = np.random.default_rng(0).permutation(len(xy))
    (spots,) = resolve_spots(_sdata(xy, radius=11.0, table_order=order))
    np.testing.assert_allclose(spots.centers_px, xy[order])
    np.testing.assert_array_equal(spots.table_rows, np.arange(len(xy)))
    assert list(spots.obs_names) == [f"spot{i}" for i in order]


def test_errors() -> None:
    xy = _hex(3, 3, 40.0, origin=60)
    with pytest.raises(ValueError, match="outside image"):
        resolve_spots(_sdata(xy + 1000, radius=11.0))
    with pytest.raises(ValueError, match=r"share no coordinate system|No image shares"):
        resolve_spots(_sdata(xy, radius=11.0, cs="global", image_cs="other"))
    with pytest.raises(ValueError, match="`pixel_size` must be a positive"):
        resolve_spots(_sdata(xy, radius=11.0), pixel_size=0.0)
    sdata = _sdata(xy, radius=11.0)
    no_image = SpatialData(shapes=dict(sdata.shapes.items()), tables=dict(sdata.tables.items()))
    with pytest.raises(ValueError, match="no image element"):
        resolve_spots(no_image)
    two = SpatialData(
        images=dict(sdata.images.items()), shapes=dict(sdata.shapes.items()),
        tables={"a": sdata.tables["table"], "b": sdata.tables["table"].copy()},
    )
    with pytest.raises(ValueError, match=r"several tables \['a', 'b'\]"):
        resolve_spots(two)
    with pytest.raises(ValueError, match="not in coordinate system 'nope'"):
        resolve_spots(sdata, coordinate_system="nope")
    with pytest.raises(ValueError, match="`shapes_key`"):
        resolve_spots(sdata, shapes_key="cells")


def test_spot_table_for_he_only_data() -> None:
    xy = _hex(3, 3, 40.0, origin=60)
    sdata = _sdata(xy, radius=11.0)
    bare = SpatialData(images=dict(sdata.images.items()), shapes=dict(sdata.shapes.items()))
    table = spot_table(bare)
    assert table.n_obs == len(xy)
    assert table.n_vars == 0
    (spots,) = resolve_spots(bare)
    np.testing.assert_allclose(spots.centers_px, xy)
    with pytest.raises(ValueError, match="already has a table"):
        spot_table(bare)


@pytest.mark.her2st
def test_her2st_sections_without_tables_are_st_lattices() -> None:
    from pathlib import Path

    import hyperst as hst

    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"
    if not root.exists():
        pytest.skip("the Her2ST sections are not in ../shared/data/her2st")
    sdata = hst.datasets.her2st(root, sections=["C3", "C6"])
    for section, reader_pixel_size in (("C3", 0.686), ("C6", 0.6877)):
        bare = SpatialData(images={"he": sdata.images[f"{section}_image"]},
                           shapes={"spots": sdata.shapes[f"{section}_spots"]})
        with warnings.catch_warnings():
            warnings.simplefilter("error", HyperSTWarning)  # real data: no contradiction is reported
            (spots,) = resolve_spots(bare)  # H&E + spots only: the layout and pixel size come from the grid
            resolve_spots(sdata, shapes_key=f"{section}_spots")  # with the reader's metadata
        assert spots.layout == "st"
        assert spots.pixel_size == pytest.approx(reader_pixel_size, abs=0.002)


# ------------------------------------------------------------------------------ contradictions (issue 12)
def _with_metadata(sdata: SpatialData, **meta: float | str) -> SpatialData:
    sdata.tables["table"].uns["hyperst"] = {"spots": {"s0": {"image_key": "he", **meta}}}
    return sdata


def test_consistent_geometry_gives_no_warning() -> None:
    xy = _hex(5, 6, 40.0, origin=50)  # 100 µm pitch at 2.5 µm/px; 55 µm spots = 22 px
    with warnings.catch_warnings():
        warnings.simplefilter("error", HyperSTWarning)
        resolve_spots(_sdata(xy, radius=11.0))
        resolve_spots(_with_metadata(_sdata(xy, radius=11.0), pixel_size=2.5, spot_diameter=55.0, pitch=100.0,
                                     layout="visium"))
        resolve_spots(_sdata(xy, radius=11.0), pixel_size=2.5)
        resolve_spots(_sdata(xy, radius=13.0), pixel_size=2.5)  # 65 µm (Space Ranger's spot): 1.18×, tolerated


def test_image_scale_with_spots_in_identity_warns() -> None:
    # the image gets a Scale transform (downscaled 2×) while the spots stay in identity: in image pixels they
    # are then half as large and half as far apart as the metadata's pixel size allows
    xy = _hex(5, 6, 40.0, origin=50)
    sdata = _with_metadata(_sdata(xy, radius=11.0, image_transform=Scale([2.0, 2.0], axes=("x", "y"))),
                           pixel_size=2.5, spot_diameter=55.0, pitch=100.0, layout="visium")
    with pytest.warns(HyperSTWarning, match=r"their diameter is 11 px = 27\.5 µm, but the spot diameter is 55 µm "
                                            r"\(the metadata\); their spacing is 20 px = 50 µm") as rec:
        (spots,) = resolve_spots(sdata)
    assert "another coordinate system than the image" in str(rec[0].message)
    assert spots.pixel_size == 2.5  # the warning changes nothing


def test_radius_holding_the_diameter_warns() -> None:
    # no pixel size anywhere: it comes from the radius, which the lattice spacing contradicts (2× too big)
    xy = _hex(5, 6, 40.0, origin=50)
    with pytest.warns(HyperSTWarning, match=r"gives 1\.25 µm/px but their spacing \(40 px for a 100 µm pitch, the "
                                            r"visium default\) gives 2\.5 µm/px.*radius column holds diameters"):
        resolve_spots(_sdata(xy, radius=22.0))


def test_pixel_size_override_contradicting_metadata_warns_once() -> None:
    xy = _hex(5, 6, 40.0, origin=50)
    sdata = _with_metadata(_sdata(xy, radius=11.0), pixel_size=2.5, spot_diameter=55.0, pitch=100.0, layout="visium")
    with pytest.warns(HyperSTWarning) as rec:
        (spots,) = resolve_spots(sdata, pixel_size=5.0)
    assert len(rec) == 1  # not also the geometry warning the same mistake causes
    assert str(rec[0].message).startswith(
        "s0: pixel_size=5 µm/px contradicts the metadata of image `he` (2.5 µm/px, a factor 2.00); using pixel_size=5"
    )
    assert (spots.pixel_size, spots.pixel_size_source) == (5.0, "argument")
    with warnings.catch_warnings():
        warnings.simplefilter("error", HyperSTWarning)
        resolve_spots(sdata, pixel_size=2.6)  # a small correction is no contradiction


def test_absurd_radius_is_refused_before_any_crop() -> None:
    xy = _hex(3, 3, 40.0, origin=60)
    with pytest.raises(ValueError, match=r"median diameter of 2e\+05 px, more than image `he` \(500×400 px\).*"
                                         r"pixel size 0\.000275 µm.*pass `pixel_size`"):
        resolve_spots(_sdata(xy, radius=1e5))


def test_table_region_matching_no_shapes() -> None:
    xy = _hex(3, 3, 40.0, origin=60)
    sdata = _sdata(xy, radius=11.0)
    table = sdata.tables["table"]
    table.obs["region"] = pd.Categorical(["spots_typo"] * table.n_obs)
    table.uns["spatialdata_attrs"]["region"] = "spots_typo"
    with pytest.raises(ValueError, match=r"Table `table` annotates region 'spots_typo', which matches no element of "
                                         r"`sdata` \(shapes: \['spots'\], points: \[\]\)"):
        resolve_spots(sdata)
    (spots,) = resolve_spots(sdata, shapes_key="spots")  # explicit spots: used without the table's rows
    assert spots.table_rows is None


def test_grid_record_gives_the_pseudo_spot_geometry() -> None:
    # pseudo-spots of another size than the layout default: the grid record, not the default, is expected
    from hyperst.pp._tissue import grid_spots

    img = np.full((3, 600, 600), 240, dtype=np.uint8)
    img[:, 100:500, 100:500] = np.array([200, 110, 170], dtype=np.uint8)[:, None, None]
    img = (img.astype(np.int16) + np.random.default_rng(0).integers(-6, 7, size=img.shape)).clip(0, 255)
    sdata = SpatialData(images={"he": Image2DModel.parse(img.astype(np.uint8), dims=("c", "y", "x"),
                                                         transformations={"global": Identity()})})
    key = grid_spots(sdata, pixel_size=2.0, layout="visium", spot_diameter=30.0, pitch=150.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HyperSTWarning)
        (spots,) = resolve_spots(sdata, shapes_key=key, pixel_size=2.0)
    assert spots.spot_diameter == pytest.approx(30.0)
    assert spots.pitch == pytest.approx(150.0)
    with pytest.warns(HyperSTWarning, match="contradicts the grid record"):
        resolve_spots(sdata, shapes_key=key, pixel_size=4.0)
