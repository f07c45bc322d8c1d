"""Tissue detection and pseudo-spot grids for H&E-only prediction."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy.spatial import cKDTree
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, Scale, get_transformation

from hyperst._constants import Key
from hyperst.pp._spots import resolve_spots
from hyperst.pp._tissue import grid_spots, tissue_fraction, tissue_mask, tissue_threshold

PX = 2.0  # µm per level-0 pixel of the test slides


# ----------------------------------------------------------------------------------------------- helpers
def _ellipse(h: int, w: int, centre=(0.45, 0.55), axes=(0.32, 0.36)) -> callable:
    """Truth function ``inside(x, y)`` (level-0 px) of a tissue ellipse in an ``h × w`` image."""
    cy, cx = centre[0] * h, centre[1] * w
    ay, ax = axes[0] * h, axes[1] * w

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0

    return inside


def _he(h: int = 1000, w: int = 1200, *, pad: int = 0, tissue: bool = True, seed: int = 0):
    """H&E-like ``(y, x, 3)`` uint8 slide: near-white noisy background, a pink ellipse of tissue with purple
    nuclei, and optionally ``pad`` columns of black padding on the left. Returns the image and the truth."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = (242, 240, 244)
    inside = _ellipse(h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    truth = inside(xx + 0.5, yy + 0.5)
    if tissue:
        nuclei = rng.random((h // 4 + 1, w // 4 + 1)) < 0.3
        nuclei = nuclei.repeat(4, 0).repeat(4, 1)[:h, :w]
        img[truth] = (228, 150, 196)  # eosin pink
        img[truth & nuclei] = (95, 55, 140)  # haematoxylin purple
    img += rng.normal(scale=5.0, size=img.shape).astype(np.float32)
    if pad:
        img[:, :pad] = 0
        truth[:, :pad] = False
    return np.clip(img, 0, 255).astype(np.uint8), inside


def _parse(img: np.ndarray, **kwargs):
    return Image2DModel.parse(
        da.from_array(img.transpose(2, 0, 1), chunks=(3, 512, 512)), dims=("c", "y", "x"), **kwargs
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _truth_on_mask(inside, shape: tuple[int, int], scale: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return inside((xx + 0.5) * scale, (yy + 0.5) * scale)


def _boom(block: np.ndarray) -> np.ndarray:
    raise AssertionError("a fine pyramid level was loaded")


def _poisoned(shape: tuple[int, int]) -> xr.DataArray:
    lazy = da.zeros((3, *shape), dtype=np.uint8, chunks=(3, 1024, 1024)).map_blocks(_boom, dtype=np.uint8)
    return xr.DataArray(lazy, dims=("c", "y", "x"))


# ----------------------------------------------------------------------------------------------- tissue_mask
def test_tissue_mask_matches_truth_and_skips_black_padding():
    img, inside = _he(pad=80)
    mask, scale = tissue_mask(_parse(img, transformations={"global": Identity()}), pixel_size=PX)
    # default: pixels of at least 4 µm, i.e. 2 level-0 pixels here (side ≤ 2048 holds already)
    assert scale == 2.0
    assert mask.shape == (500, 600)
    assert mask.dtype == bool
    truth = _truth_on_mask(inside, mask.shape, scale)
    assert _iou(mask, truth) > 0.95
    assert not mask[:, : 80 // 2].any()  # black padding is not tissue


def test_tissue_mask_coarsens_without_pyramid_and_keeps_the_extent():
    img, inside = _he(h=1003, w=1201)  # not a multiple of the coarsening factor
    mask, scale = tissue_mask(_parse(img), pixel_size=1.0, target_pixel_size=8.0)
    assert scale == 8.0
    assert mask.shape == (126, 151)  # ceil: the last (padded) block still covers the image border
    assert _iou(mask, _truth_on_mask(inside, mask.shape, scale)) > 0.9


def test_tissue_mask_uses_a_coarse_pyramid_level_never_level0():
    img, inside = _he(h=1024, w=1024)
    coarse = xr.DataArray(img.transpose(2, 0, 1), dims=("c", "y", "x"))
    tree = xr.DataTree.from_dict(
        {
            "scale0": xr.Dataset({"image": _poisoned((8192, 8192))}),
            "scale1": xr.Dataset({"image": _poisoned((4096, 4096))}),
            "scale2": xr.Dataset({"image": _poisoned((2048, 2048))}),
            "scale3": xr.Dataset({"image": coarse}),
        }
    )
    # default: side ≤ 2048 → factor 4, pixels ≥ 4 µm at 0.5 µm/px → factor 8: level 3 as is
    mask, scale = tissue_mask(tree, pixel_size=0.5)
    assert scale == 8.0
    assert mask.shape == (1024, 1024)
    assert _iou(mask, _truth_on_mask(inside, mask.shape, 1.0)) > 0.95
    # coarser target: level 3 block-averaged by 2
    mask2, scale2 = tissue_mask(tree, pixel_size=0.5, target_pixel_size=8.0)
    assert scale2 == 16.0
    assert mask2.shape == (512, 512)
    # a target finer than level 3 needs a fine level
    with pytest.raises(AssertionError, match="fine pyramid level"):
        tissue_mask(tree, pixel_size=0.5, target_pixel_size=2.0)


def test_tissue_mask_multiscale_spatialdata_image():
    img, inside = _he()
    tree = Image2DModel.parse(img.transpose(2, 0, 1), dims=("c", "y", "x"), scale_factors=[2, 2])
    mask, scale = tissue_mask(tree, pixel_size=PX, target_pixel_size=4 * PX)
    assert scale == 4.0  # level 2 as is
    assert mask.shape == (250, 300)
    assert _iou(mask, _truth_on_mask(inside, mask.shape, scale)) > 0.9


def test_tissue_mask_blank_and_black_images_have_no_tissue():
    blank, _ = _he(tissue=False)
    assert not tissue_mask(_parse(blank), pixel_size=PX)[0].any()
    black = np.zeros((300, 300, 3), dtype=np.uint8)
    assert not tissue_mask(_parse(black), pixel_size=PX)[0].any()


def test_tissue_threshold_is_skimage_otsu_of_the_slide():
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    img, _ = _he(pad=80)
    element = _parse(img)
    thr = tissue_threshold(element, pixel_size=PX)
    # by hand: the slide tissue_mask reads (2 px blocks at 2 µm/px -> 4 µm), blurred, saturation of bright pixels
    rgb = img.astype(np.float32).reshape(500, 2, 600, 2, 3).mean(axis=(1, 3)) / 255
    rgb = ndimage.gaussian_filter(rgb, sigma=(1.0, 1.0, 0.0), mode="nearest")
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    ref = float(threshold_otsu(sat[mx > 0.1].astype(np.float64)))
    assert 0.1 < ref < 0.25  # between the glass (≈ 0.02) and the eosin pink (≈ 0.35)
    assert thr == pytest.approx(ref, abs=1e-6)
    # a blank slide: the threshold is the floor (nothing is tissue); a black one has no bright pixel
    blank, _ = _he(tissue=False)
    assert tissue_threshold(_parse(blank), pixel_size=PX) == pytest.approx(0.05)
    assert tissue_threshold(_parse(np.zeros((64, 64, 3), np.uint8)), pixel_size=PX) == np.inf
    assert not thr.grey


def _grey(img: np.ndarray, channels: int) -> np.ndarray:
    """A grey version ``(y, x, channels)`` (luminance, rounded) of an RGB ``(y, x, 3)`` uint8 slide."""
    lum = np.rint(img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    return np.repeat(lum[..., None], channels, axis=-1)


@pytest.mark.parametrize("channels", [1, 3])
def test_grey_slide_tissue_by_darkness(channels):
    """A grey slide (one channel, or three equal ones) has no saturation: tissue is what is darker than the glass."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    from hyperst._warnings import HyperSTWarning

    img, inside = _he(pad=80)
    grey = _grey(img, channels)
    with pytest.warns(HyperSTWarning, match=r"grey .*Otsu on darkness.*no stain colour"):
        thr = tissue_threshold(_parse(grey), pixel_size=PX)
    assert thr.grey
    # by hand: 2 px blocks, blurred, Otsu of the darkness of the pixels away from black
    lum = grey[..., 0].astype(np.float32).reshape(500, 2, 600, 2).mean(axis=(1, 3)) / 255
    bright = ndimage.minimum_filter(lum, size=5) > 0.1  # not within 2 px of the black padding
    lum = ndimage.gaussian_filter(lum, sigma=1.0, mode="nearest")
    ref = float(threshold_otsu((1 - lum)[bright].astype(np.float64)))
    assert 0.1 < ref < 0.3  # glass ≈ 0.06 dark, eosin pink ≈ 0.3
    assert thr == pytest.approx(ref, abs=1e-6)
    mask, scale = tissue_mask(_parse(grey), pixel_size=PX)
    assert _iou(mask, _truth_on_mask(inside, mask.shape, scale)) > 0.95  # as good as on RGB
    assert not mask[:, : 80 // 2].any()
    # crops (always RGB: grey is replicated) with the grey threshold: tissue 1, glass 0, a border half
    rgb3 = _grey(img, 3)
    crops = np.stack([rgb3[480:512, 580:612], rgb3[20:52, 1150:1182], rgb3[440:472, 1074:1106]])
    tf = tissue_fraction(crops, threshold=thr)
    assert tf[0] == 1.0
    assert tf[1] == 0.0
    yy, xx = np.mgrid[440:472, 1074:1106]
    truth = inside(xx + 0.5, yy + 0.5).mean()
    assert 0.3 < truth < 0.7
    assert tf[2] == pytest.approx(truth, abs=0.08)
    # the RGB rule on the same crops finds nothing: the silently wrong 0.00 of grey images before
    np.testing.assert_array_equal(tissue_fraction(crops, threshold=float(thr)), 0.0)
    # threshold=None: the crops' own Otsu threshold, and they are detected as grey
    np.testing.assert_allclose(tissue_fraction(crops), tf, atol=0.02)


def test_grey_blank_slide_has_no_tissue():
    blank, _ = _he(tissue=False)
    with pytest.warns(match="grey"):
        thr = tissue_threshold(_parse(_grey(blank, 1)), pixel_size=PX)
    assert thr.grey
    assert thr == 1.0  # the two Otsu classes of glass noise differ by < 0.1 darkness
    assert not tissue_mask(_parse(_grey(blank, 3)), pixel_size=PX)[0].any()


def test_tissue_fraction_per_slide_threshold_rejects_tinted_glass():
    """Pink-tinted glass (saturation ≈ 0.12, like Her2ST's) is tissue for a fixed 0.07 threshold, not per slide."""
    rng = np.random.default_rng(2)
    h = w = 400
    img = np.empty((h, w, 3), np.float32)
    img[:] = (235, 210, 225)  # tinted glass: saturation (235 - 210) / 235 ≈ 0.11
    img[:, : w // 2] = (200, 110, 170)  # stained tissue on the left half: saturation 0.45
    img = np.clip(img + rng.normal(scale=4.0, size=img.shape), 0, 255).astype(np.uint8)
    thr = tissue_threshold(_parse(img), pixel_size=1.0)
    assert 0.15 < thr < 0.25
    glass = np.stack([img[y : y + 32, w - 40 - x : w - 8 - x] for y, x in ((20, 0), (200, 40), (300, 80))])
    tissue = np.stack([img[y : y + 32, 10 + x : 42 + x] for y, x in ((20, 0), (200, 40), (300, 80))])
    border = img[None, 100:132, w // 2 - 16 : w // 2 + 16]  # half tissue, half glass
    crops = np.concatenate([glass, tissue, border])
    tf = tissue_fraction(crops, threshold=thr)
    np.testing.assert_array_equal(tf[:3], 0.0)
    np.testing.assert_array_equal(tf[3:6], 1.0)
    assert tf[6] == pytest.approx(0.5, abs=0.04)
    # the old fixed rule (saturation > 0.07) calls the glass tissue
    assert (tissue_fraction(crops, threshold=0.07)[:3] > 0.95).all()
    # grey crops or a nan threshold: nan; float crops are refused
    assert np.isnan(tissue_fraction(crops, threshold=float("nan"))).all()
    with pytest.raises(ValueError, match="uint8"):
        tissue_fraction(crops.astype(np.float32), threshold=thr)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pixel_size": 0.0}, "pixel_size"),
        ({"pixel_size": 1.0, "target_pixel_size": -1.0}, "target_pixel_size"),
        ({"pixel_size": 1.0, "method": "li"}, "method"),
        ({"pixel_size": 1.0, "min_saturation": 1.5}, "min_saturation"),
    ],
)
def test_tissue_mask_bad_arguments(kwargs, match):
    img, _ = _he(h=64, w=64)
    with pytest.raises(ValueError, match=match):
        tissue_mask(_parse(img), **kwargs)


def test_tissue_mask_rejects_non_rgb():
    two = xr.DataArray(np.zeros((2, 32, 32), dtype=np.uint8), dims=("c", "y", "x"))
    with pytest.raises(ValueError, match=r"2 channels.*RGB"):
        tissue_mask(two, pixel_size=1.0)
    with pytest.raises(TypeError, match="image element"):
        tissue_mask(np.zeros((3, 32, 32), dtype=np.uint8), pixel_size=1.0)


# ----------------------------------------------------------------------------------------------- grid_spots
@pytest.fixture(scope="module")
def slide():
    img, inside = _he(pad=40)
    return img, inside


def _he_only(img: np.ndarray, transformations=None) -> SpatialData:
    return SpatialData(images={"he": _parse(img, transformations=transformations or {"slide": Identity()})})


def test_grid_spots_visium_hexagonal_on_tissue(slide):
    img, inside = slide
    sdata = _he_only(img)
    key = grid_spots(sdata, layout="visium", pixel_size=PX)
    assert key == "hyperst_grid"
    assert list(sdata.images) == ["he"]  # nothing else touched
    spots = sdata.shapes[key]
    xy = np.column_stack([spots.geometry.x, spots.geometry.y])
    pitch_px = 100.0 / PX

    on_tissue = inside(xy[:, 0], xy[:, 1]) & (xy[:, 0] >= 40)
    assert on_tissue.mean() > 0.95
    # hexagonal: every spot's nearest neighbour is exactly one pitch away, interior spots have 6 of them
    dist, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(dist[:, 1], pitch_px, rtol=1e-9)
    assert (np.abs(dist[:, 1:] - pitch_px) < 1e-6).sum(1).max() == 6
    np.testing.assert_allclose(spots["radius"], 55.0 / 2 / PX)
    # coverage: about one spot per hexagonal cell of the ellipse (area in px²)
    h, w = img.shape[:2]
    area = np.pi * (0.32 * h) * (0.36 * w)
    expected = area / (pitch_px**2 * np.sqrt(3) / 2)
    assert 0.85 * expected < len(spots) < 1.1 * expected
    # window tissue fractions above the threshold; array coordinates follow the Visium convention
    assert (spots[Key.OBS_TISSUE_FRACTION] >= 0.5).all()
    row, col = spots[Key.OBS_ARRAY_ROW].to_numpy(), spots[Key.OBS_ARRAY_COL].to_numpy()
    assert row.min() >= 0
    assert col.min() >= 0
    assert (row % 2 == col % 2).all()
    fit = np.polyfit(col, xy[:, 0], 1)
    np.testing.assert_allclose(fit[0], pitch_px / 2, rtol=1e-9)
    np.testing.assert_allclose(np.polyfit(row, xy[:, 1], 1)[0], pitch_px * np.sqrt(3) / 2, rtol=1e-9)

    params = spots.attrs[Key.UNS][Key.ATTRS_GRID]
    assert params["layout"] == "visium"
    assert params["spot_diameter"] == 55.0
    assert params["pitch"] == 100.0
    assert params["pixel_size"] == PX
    assert params["n_spots"] == len(spots)
    assert get_transformation(spots, get_all=True).keys() == {"slide"}

    (resolved,) = resolve_spots(sdata, shapes_key=key, pixel_size=PX)
    assert resolved.layout == "visium"
    assert resolved.image_key == "he"
    assert resolved.n_spots == len(spots)
    assert resolved.spot_diameter == pytest.approx(55.0)
    assert resolved.pitch == pytest.approx(100.0)
    np.testing.assert_allclose(resolved.centers_px, xy)


def test_grid_spots_square_layouts(slide):
    img, inside = slide
    sdata = _he_only(img)
    key = grid_spots(sdata, layout="st", pixel_size=PX, shapes_key="st_grid")
    spots = sdata.shapes[key]
    xy = np.column_stack([spots.geometry.x, spots.geometry.y])
    dist, _ = cKDTree(xy).query(xy, k=5)
    np.testing.assert_allclose(dist[:, 1], 200.0 / PX, rtol=1e-9)
    assert (np.abs(dist[:, 1:] - 200.0 / PX) < 1e-6).sum(1).max() == 4
    assert inside(xy[:, 0], xy[:, 1]).mean() > 0.95
    (resolved,) = resolve_spots(sdata, shapes_key=key, pixel_size=PX)
    assert resolved.layout == "st"
    assert resolved.spot_diameter == pytest.approx(100.0)

    with pytest.raises(ValueError, match="spot_diameter"):
        grid_spots(sdata, pixel_size=PX, shapes_key="sq")
    key = grid_spots(sdata, pixel_size=PX, spot_diameter=30.0, pitch=60.0, shapes_key="sq", min_tissue=0.9)
    xy = np.column_stack([sdata.shapes[key].geometry.x, sdata.shapes[key].geometry.y])
    np.testing.assert_allclose(cKDTree(xy).query(xy, k=2)[0][:, 1], 30.0, rtol=1e-9)
    assert inside(xy[:, 0], xy[:, 1]).all()  # ≥ 90 % tissue in the window: well inside


def test_grid_spots_min_tissue_controls_the_border(slide):
    img, _ = slide
    sdata = _he_only(img)
    n = []
    for i, min_tissue in enumerate((0.05, 0.5, 0.95)):
        key = grid_spots(sdata, layout="visium", pixel_size=PX, min_tissue=min_tissue, shapes_key=f"g{i}")
        n.append(len(sdata.shapes[key]))
    assert n[0] > n[1] > n[2] > 0


def test_grid_spots_follows_the_image_transformation(slide):
    img, _inside = slide
    sdata = _he_only(img, transformations={"global": Scale([0.5, 0.5], axes=("x", "y")), "aligned": Identity()})
    key = grid_spots(sdata, layout="visium", pixel_size=PX)
    spots = sdata.shapes[key]
    transforms = get_transformation(spots, get_all=True)
    assert set(transforms) == {"global", "aligned"}
    np.testing.assert_allclose(
        transforms["global"].to_affine_matrix(("x", "y"), ("x", "y")),
        get_transformation(sdata.images["he"], "global").to_affine_matrix(("x", "y"), ("x", "y")),
    )
    (resolved,) = resolve_spots(sdata, shapes_key=key, pixel_size=PX, coordinate_system="global")
    np.testing.assert_allclose(resolved.centers_px, np.column_stack([spots.geometry.x, spots.geometry.y]))

    key = grid_spots(sdata, layout="visium", pixel_size=PX, coordinate_system="aligned", shapes_key="only")
    assert set(get_transformation(sdata.shapes[key], get_all=True)) == {"aligned"}


def test_grid_spots_on_synthetic_slide():
    from hyperst.datasets import synthetic

    sdata = synthetic(n_samples=1, n_rows=10, n_cols=10, pixel_size=2.0)
    table = sdata.tables["table"]
    truth_xy, truth_tissue = table.obsm[Key.OBSM_SPATIAL], table.obs[Key.OBS_TISSUE].astype(str).to_numpy()
    del sdata.tables["table"]
    del sdata.shapes["sample0_spots"]  # an H&E-only slide
    key = grid_spots(sdata, layout="visium", pixel_size=2.0)
    xy = np.column_stack([sdata.shapes[key].geometry.x, sdata.shapes[key].geometry.y])
    dist, nearest = cKDTree(truth_xy).query(xy)
    near = dist < 0.5 * 100 / 2.0
    # the tissue reaches into the image margin around the spot array, so some grid spots have no true
    # spot nearby; most do, and those sit on tissue
    assert near.mean() > 0.6
    assert (truth_tissue[nearest[near]] != "background").mean() > 0.95
    covered = cKDTree(xy).query(truth_xy)[0] < 0.6 * 100 / 2.0
    assert covered[truth_tissue != "background"].mean() > 0.95  # every tissue spot gets a grid spot
    (resolved,) = resolve_spots(sdata, shapes_key=key, pixel_size=2.0)
    assert resolved.layout == "visium"
    assert resolved.coordinate_system == "sample0"


def test_grid_spots_errors(slide):
    img, _ = slide
    blank, _ = _he(tissue=False)
    with pytest.raises(ValueError, match="No tissue found"):
        grid_spots(_he_only(blank), pixel_size=PX, layout="visium")
    sdata = _he_only(img)
    with pytest.raises(ValueError, match="min_tissue"):
        grid_spots(sdata, pixel_size=PX, layout="visium", min_tissue=1.5)
    with pytest.raises(ValueError, match="pixel_size"):
        grid_spots(sdata, pixel_size=-1.0, layout="visium")
    with pytest.raises(ValueError, match="layout"):
        grid_spots(sdata, pixel_size=PX, layout="hex")
    with pytest.raises(ValueError, match="coordinate system"):
        grid_spots(sdata, pixel_size=PX, layout="visium", coordinate_system="nope")
    with pytest.raises(ValueError, match="image_key"):
        grid_spots(sdata, pixel_size=PX, layout="visium", image_key="nope")
    # a spot larger than any tissue: no window has enough tissue
    with pytest.raises(ValueError, match="Lower `min_tissue`"):
        grid_spots(sdata, pixel_size=PX, layout="square", spot_diameter=5000.0, pitch=5000.0, min_tissue=0.9)
    key = grid_spots(sdata, pixel_size=PX, layout="visium")
    with pytest.raises(ValueError, match="overwrite"):
        grid_spots(sdata, pixel_size=PX, layout="visium")
    n = len(sdata.shapes[key])
    grid_spots(sdata, pixel_size=PX, layout="st", overwrite=True)
    assert len(sdata.shapes[key]) < n
    two = SpatialData(images={"a": _parse(img), "b": _parse(img)})
    with pytest.raises(ValueError, match="image_key"):
        grid_spots(two, pixel_size=PX, layout="visium")


def test_synthetic_slide_in_grey_keeps_its_tissue_fractions():
    """The synthetic slide in grey: spot tissue fractions follow the RGB ones (before: 0.00 for every spot)."""
    import hyperst as hst
    from hyperst._warnings import HyperSTWarning

    sdata = hst.datasets.synthetic(n_samples=1, n_rows=6, n_cols=6, n_genes=12)
    rgb = hst.pp.crops(sdata, progress=False)[0].tissue_fraction
    assert 0.5 < rgb.mean() < 0.8
    image = sdata.images["sample0_image"]
    grey = _grey(np.moveaxis(image.values, 0, -1), 3)
    sdata.images["sample0_image"] = Image2DModel.parse(
        grey.transpose(2, 0, 1), dims=("c", "y", "x"), transformations=get_transformation(image, get_all=True)
    )
    with pytest.warns(HyperSTWarning, match="grey"):
        tf = hst.pp.crops(sdata, progress=False)[0].tissue_fraction
    assert abs(tf.mean() - rgb.mean()) < 0.05
    assert np.corrcoef(tf, rgb)[0, 1] > 0.95
    assert np.abs(tf - rgb).max() < 0.25
    # one channel or three equal ones: the same threshold
    with pytest.warns(HyperSTWarning):
        one = tissue_threshold(Image2DModel.parse(grey[..., :1].transpose(2, 0, 1), dims=("c", "y", "x")),
                               pixel_size=1.0)
    with pytest.warns(HyperSTWarning):
        three = tissue_threshold(sdata.images["sample0_image"], pixel_size=1.0)
    assert one.grey
    assert one == pytest.approx(three, abs=1e-6)
