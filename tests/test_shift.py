"""hst.datasets.degrade: domain-shifted copies of a slide (resolution, JPEG, stain, painted background)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.color import hed_from_rgb, rgb2hed

import hyperst as hst
from hyperst._constants import Key

HER2ST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "her2st"
IMAGE = "sample0_image"
TINY = {"backbone": "resnet10t", "random_init": True, "progress": False, "batch_size": 32}


@pytest.fixture(scope="module")
def sdata(make_feature_sdata):
    """conftest's synthetic slide (one sample, 6 × 6 Visium spots, 1 µm/px, 905 × 789 px)."""
    return make_feature_sdata(1, 8)


def _rgb(sdata, key: str = IMAGE) -> np.ndarray:
    """Level 0 of an image as ``(y, x, 3)`` uint8."""
    arr = hst.pp.ImagePyramid(sdata.images[key]).levels[0].data
    return np.moveaxis(np.asarray(arr.compute() if hasattr(arr, "compute") else arr), 0, -1)


def _record(sdata, key: str = IMAGE) -> dict:
    return sdata.images[key].attrs[Key.UNS]["degrade"]


def _hed(rgb: np.ndarray) -> np.ndarray:
    """rgb2hed's linear unmixing (before its clamp at 0), ``(n, 3)``."""
    od = np.log(np.maximum(rgb.reshape(-1, 3) / 255.0, 1e-6)) / np.log(1e-6)
    return od @ hed_from_rgb


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _mask_on_output(sdata, shape: tuple[int, int], factor: float = 1.0) -> np.ndarray:
    """hst.pp.tissue_mask of the input slide, looked up at the centre of each output pixel."""
    mask, scale = hst.pp.tissue_mask(sdata.images[IMAGE], pixel_size=1.0)
    my = np.minimum(((np.arange(shape[0]) + 0.5) * factor / scale).astype(int), mask.shape[0] - 1)
    mx = np.minimum(((np.arange(shape[1]) + 0.5) * factor / scale).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(my, mx)]


# ------------------------------------------------------------------------------------------- input
def test_input_is_unchanged_and_result_is_new(sdata) -> None:
    from spatialdata.transformations import get_transformation

    before_img = _rgb(sdata).copy()
    table = sdata.tables["table"]
    before_x, before_obs = table.X.toarray().copy(), table.obs.copy()
    before_spatial, before_uns = table.obsm["spatial"].copy(), repr(table.uns)
    before_shapes = sdata.shapes["sample0_spots"].copy(deep=True)
    before_t = get_transformation(sdata.images[IMAGE], get_all=True)

    out = hst.datasets.degrade(sdata, pixel_size=2.0, jpeg_quality=30, stain=0.2, background="black")

    assert np.array_equal(_rgb(sdata), before_img)
    assert np.array_equal(table.X.toarray(), before_x)
    assert table.obs.equals(before_obs)
    assert np.array_equal(table.obsm["spatial"], before_spatial)
    assert repr(table.uns) == before_uns
    assert table.uns[Key.UNS][Key.UNS_SPOTS]["sample0"]["pixel_size"] == 1.0
    assert sdata.shapes["sample0_spots"].equals(before_shapes)
    assert get_transformation(sdata.images[IMAGE], get_all=True) == before_t
    assert "degrade" not in sdata.images[IMAGE].attrs.get(Key.UNS, {})
    # the result: same elements, new objects, same counts
    assert (set(out.images), set(out.shapes), set(out.tables)) == ({IMAGE}, {"sample0_spots"}, {"table"})
    assert out.tables["table"] is not table
    assert out.shapes["sample0_spots"] is not sdata.shapes["sample0_spots"]
    assert np.array_equal(out.tables["table"].X.toarray(), before_x)
    assert _record(out)["order"] == ["stain", "pixel_size", "background", "jpeg_quality"]


def test_copy_false_shares_unchanged_elements_and_still_leaves_input_alone(sdata) -> None:
    out = hst.datasets.degrade(sdata, pixel_size=2.0, copy=False)
    assert out.shapes["sample0_spots"] is sdata.shapes["sample0_spots"]
    assert out.tables["table"] is not sdata.tables["table"]  # its pixel size entry changes
    assert sdata.tables["table"].uns[Key.UNS][Key.UNS_SPOTS]["sample0"]["pixel_size"] == 1.0
    assert out.tables["table"].uns[Key.UNS][Key.UNS_SPOTS]["sample0"]["pixel_size"] == 2.0
    out = hst.datasets.degrade(sdata, jpeg_quality=50, copy=False)
    assert out.tables["table"] is sdata.tables["table"]  # nothing to change in it


# ------------------------------------------------------------------------------------------- resolution
def test_downsample_is_area_average_with_new_pixel_size_and_same_tissue_under_spots(sdata) -> None:
    from spatialdata.transformations import get_transformation

    rgb = _rgb(sdata)
    h, w = rgb.shape[:2]
    out = hst.datasets.degrade(sdata, pixel_size=2.0)
    small = _rgb(out)
    assert small.shape == (int(np.ceil(h / 2)), int(np.ceil(w / 2)), 3)
    # exact 2 × 2 area means (rounded)
    ref = rgb[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    assert np.abs(small[: h // 2, : w // 2] - ref).max() <= 0.5 + 1e-6
    t = get_transformation(out.images[IMAGE], to_coordinate_system="sample0")
    assert np.allclose(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), np.diag([2.0, 2.0, 1.0]))

    before, after = hst.pp.resolve_spots(sdata)[0], hst.pp.resolve_spots(out)[0]
    assert (after.pixel_size, after.pixel_size_source) == (pytest.approx(2.0), "metadata")
    assert after.spot_diameter == pytest.approx(55.0)
    assert np.allclose(after.centers_px, before.centers_px / 2)
    # the crops hst.pp cuts (resampled back to 224 px) show the same tissue
    c0, c1 = hst.pp.crops(sdata, progress=False)[0], hst.pp.crops(out, progress=False)[0]
    assert c1.spot.shape == c0.spot.shape
    tissue = c0.tissue_fraction > 0.05  # crops of bare glass are flat noise
    assert tissue.sum() >= 25
    same = np.array([_corr(c0.spot[i], c1.spot[i]) for i in np.flatnonzero(tissue)])
    shifted = np.array([_corr(c0.spot[i], c1.spot[(i + 1) % len(c1.spot)]) for i in np.flatnonzero(tissue)])
    assert same.min() > 0.9
    assert np.median(shifted) < 0.3
    assert np.allclose(c1.tissue_fraction, c0.tissue_fraction, atol=0.1)


def test_downsample_non_integer_factor_keeps_mean_and_geometry(sdata) -> None:
    rgb = _rgb(sdata)
    out = hst.datasets.degrade(sdata, pixel_size=3.2)
    small = _rgb(out)
    assert small.shape[:2] == (int(np.ceil(rgb.shape[0] / 3.2)), int(np.ceil(rgb.shape[1] / 3.2)))
    inner = small[:-1, :-1].reshape(-1, 3).mean(0)  # the last row/column average a partial footprint
    full = rgb[: (small.shape[0] - 1) * 16 // 5, : (small.shape[1] - 1) * 16 // 5].reshape(-1, 3).mean(0)
    assert np.abs(inner - full).max() < 0.5
    spots = hst.pp.resolve_spots(out)[0]
    assert spots.pixel_size == pytest.approx(3.2)
    assert np.allclose(spots.centers_px, hst.pp.resolve_spots(sdata)[0].centers_px / 3.2)
    rec = _record(out)
    assert (rec["factor"], rec["source_pixel_size"], rec["pixel_size"]) == (pytest.approx(3.2), 1.0, 3.2)


def test_downsample_multiscale_input_is_re_pyramided() -> None:
    import xarray as xr

    sd = hst.datasets.synthetic(n_samples=1, n_rows=6, n_cols=6, n_genes=12, multiscale=True, seed=0)
    single = hst.datasets.synthetic(n_samples=1, n_rows=6, n_cols=6, n_genes=12, seed=0)
    out = hst.datasets.degrade(sd, pixel_size=2.0)
    image = out.images[IMAGE]
    assert isinstance(image, xr.DataTree)
    pyr = hst.pp.ImagePyramid(image)
    assert [lv.shape for lv in pyr.levels] == [(395, 453), (197, 226), (98, 113), (49, 56)]
    assert np.array_equal(_rgb(out), _rgb(hst.datasets.degrade(single, pixel_size=2.0)))
    assert hst.pp.resolve_spots(out)[0].pixel_size == pytest.approx(2.0)
    assert len(hst.pp.crops(out, progress=False)[0].spot) == 36


def test_pixel_size_without_metadata_follows_the_spots() -> None:
    bare = hst.datasets.synthetic(n_samples=1, n_rows=6, n_cols=6, n_genes=12, seed=0, with_table=False)
    assert hst.pp.resolve_spots(bare)[0].pixel_size_source == "spot_diameter"
    out = hst.datasets.degrade(bare, pixel_size=2.5)
    assert _record(out)["pixel_size_source"] == "spot_diameter"
    assert hst.pp.resolve_spots(out)[0].pixel_size == pytest.approx(2.5)


def test_pixel_size_errors(sdata) -> None:
    from spatialdata import SpatialData

    with pytest.raises(ValueError, match=r"pixel_size=0\.5.*finer than the slide's own 1 µm"):
        hst.datasets.degrade(sdata, pixel_size=0.5)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`pixel_size="):
            hst.datasets.degrade(sdata, pixel_size=bad)
    with pytest.raises(TypeError, match="`pixel_size` must be a number"):
        hst.datasets.degrade(sdata, pixel_size="3.2")
    image_only = SpatialData(images={IMAGE: sdata.images[IMAGE]})
    with pytest.raises(ValueError, match=r"`pixel_size` needs the pixel size.*uns\['hyperst'\]\['spots'\]"):
        hst.datasets.degrade(image_only, pixel_size=2.0)
    with pytest.raises(ValueError, match=r"`background` needs the pixel size"):
        hst.datasets.degrade(image_only, background="white")
    # jpeg and stain need no pixel size
    assert _rgb(hst.datasets.degrade(image_only, jpeg_quality=90)).shape == _rgb(sdata).shape


# ------------------------------------------------------------------------------------------- jpeg
def test_jpeg_changes_pixels_but_keeps_the_mean(sdata) -> None:
    rgb = _rgb(sdata).astype(np.float64)
    out = _rgb(hst.datasets.degrade(sdata, jpeg_quality=10)).astype(np.float64)
    assert out.shape == rgb.shape
    assert np.mean(np.any(out != rgb, axis=-1)) > 0.5
    assert np.abs(out - rgb).mean() > 2.0
    luma = np.array([0.299, 0.587, 0.114])  # JPEG keeps luma best; near-white blue is clipped at 255
    assert abs(float((out - rgb).reshape(-1, 3).mean(0) @ luma)) < 2.0
    assert np.abs(out.reshape(-1, 3).mean(0) - rgb.reshape(-1, 3).mean(0)).max() < 6.0
    # a milder export is closer to the original
    mild = _rgb(hst.datasets.degrade(sdata, jpeg_quality=90)).astype(np.float64)
    assert np.abs(mild - rgb).mean() < 0.5 * np.abs(out - rgb).mean()


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (96, ValueError), (10.0, TypeError), (True, TypeError)])
def test_jpeg_quality_is_checked(sdata, value, error) -> None:
    with pytest.raises(error, match="`jpeg_quality"):
        hst.datasets.degrade(sdata, jpeg_quality=value)


# ------------------------------------------------------------------------------------------- stain
def test_explicit_stain_shift_moves_hed_means_by_the_requested_amount(sdata) -> None:
    rgb = _rgb(sdata)
    hed0 = _hed(rgb)
    scale, shift = (1.2, 0.8, 1.0), (0.5, -0.3, 0.0)
    out = hst.datasets.degrade(sdata, stain={"scale": scale, "shift": shift})
    rec = _record(out)["stain"]
    std = np.array(rec["std"])
    assert np.allclose(std, hed0.std(0), rtol=0.01)  # the slide's own spread of each stain
    hed1 = _hed(_rgb(out))
    expected = np.array(scale) * hed0.mean(0) + np.array(shift) * std
    assert np.allclose(hed1.mean(0), expected, rtol=0.02, atol=2e-4)
    assert hed1.mean(0)[0] > 2 * hed0.mean(0)[0]  # the haematoxylin mean more than doubles
    # skimage's own rgb2hed (clamped at 0) sees the same haematoxylin shift
    h_before, h_after = rgb2hed(rgb)[..., 0].mean(), rgb2hed(_rgb(out))[..., 0].mean()
    assert h_after - h_before == pytest.approx(expected[0] - hed0.mean(0)[0], rel=0.05)
    # a zero shift is the identity (no rgb2hed clamp, exact inverse)
    same = hst.datasets.degrade(sdata, stain={"scale": (1, 1, 1), "shift": (0, 0, 0)})
    assert np.array_equal(_rgb(same), rgb)


def test_random_stain_shift_is_drawn_from_the_seed(sdata) -> None:
    a = hst.datasets.degrade(sdata, stain=0.2, seed=3)
    b = hst.datasets.degrade(sdata, stain=0.2, seed=3)
    c = hst.datasets.degrade(sdata, stain=0.2, seed=4)
    assert np.array_equal(_rgb(a), _rgb(b))
    assert not np.array_equal(_rgb(a), _rgb(c))
    rec = _record(a)["stain"]
    rng = np.random.default_rng(3)
    assert np.allclose(rec["scale"], 1 + rng.uniform(-0.2, 0.2, 3))
    assert np.allclose(rec["shift"], rng.uniform(-0.2, 0.2, 3))
    assert rec["strength"] == 0.2
    hed0, hed1 = _hed(_rgb(sdata)), _hed(_rgb(a))
    expected = np.array(rec["scale"]) * hed0.mean(0) + np.array(rec["bias"])
    assert np.allclose(hed1.mean(0)[:2], expected[:2], rtol=0.05, atol=3e-4)


@pytest.mark.parametrize(
    ("stain", "error", "match"),
    [
        (1.5, ValueError, r"strength in \[0, 1\)"),
        (-0.1, ValueError, r"strength in \[0, 1\)"),
        ("strong", TypeError, "must be a number"),
        ({"scale": (1, 1)}, ValueError, "three finite numbers"),
        ({"scale": (1, -1, 1)}, ValueError, "must be positive"),
        ({"bias": (0, 0, 0)}, ValueError, "unknown keys"),
    ],
)
def test_stain_is_checked(sdata, stain, error, match) -> None:
    with pytest.raises(error, match=match):
        hst.datasets.degrade(sdata, stain=stain)


# ------------------------------------------------------------------------------------------- background
@pytest.mark.parametrize(("background", "value"), [("black", 0), ("white", 255)])
def test_background_is_painted_outside_the_tissue_only(sdata, background, value) -> None:
    rgb = _rgb(sdata)
    out = hst.datasets.degrade(sdata, background=background)
    painted = _rgb(out)
    tissue = _mask_on_output(sdata, rgb.shape[:2])
    assert 0.2 < (~tissue).mean() < 0.8
    assert np.all(painted[~tissue] == value)
    assert np.array_equal(painted[tissue], rgb[tissue])
    assert _record(out)["background"]["painted_fraction"] == pytest.approx((~tissue).mean())


def test_background_after_downsampling_uses_the_output_grid(sdata) -> None:
    out = hst.datasets.degrade(sdata, pixel_size=2.0, background="black")
    painted = _rgb(out)
    tissue = _mask_on_output(sdata, painted.shape[:2], factor=2.0)
    assert np.all(painted[~tissue] == 0)
    plain = _rgb(hst.datasets.degrade(sdata, pixel_size=2.0))
    assert np.array_equal(painted[tissue], plain[tissue])


# ------------------------------------------------------------------------------------------- input checks
def test_bad_input_is_named() -> None:
    from spatialdata import SpatialData

    two = hst.datasets.synthetic(n_samples=2, n_rows=4, n_cols=4, n_genes=12, seed=0)
    with pytest.raises(ValueError, match=r"several images.*pass `image_key`"):
        hst.datasets.degrade(two, jpeg_quality=50)
    with pytest.raises(ValueError, match="`image_key='nope'` is not an image"):
        hst.datasets.degrade(two, image_key="nope")
    with pytest.raises(ValueError, match="`background='grey'`"):
        hst.datasets.degrade(two, image_key="sample1_image", background="grey")
    with pytest.raises(ValueError, match="no image element"):
        hst.datasets.degrade(SpatialData(), jpeg_quality=50)
    with pytest.raises(TypeError, match="`sdata` must be a SpatialData"):
        hst.datasets.degrade(two.tables["table"], jpeg_quality=50)
    with pytest.raises(TypeError, match="`seed`"):
        hst.datasets.degrade(two, image_key="sample1_image", stain=0.1, seed=0.5)
    # one image of two: the other image and sample keep their pixels and pixel size
    out = hst.datasets.degrade(two, image_key="sample1_image", pixel_size=2.0)
    meta = out.tables["table"].uns[Key.UNS][Key.UNS_SPOTS]
    assert (meta["sample0"]["pixel_size"], meta["sample1"]["pixel_size"]) == (1.0, 2.0)
    assert np.array_equal(_rgb(out, "sample0_image"), _rgb(two, "sample0_image"))
    assert [s.pixel_size for s in hst.pp.resolve_spots(out)] == [1.0, 2.0]


def test_degrading_twice_keeps_the_earlier_record(sdata) -> None:
    once = hst.datasets.degrade(sdata, pixel_size=2.0)
    twice = hst.datasets.degrade(once, pixel_size=4.0, jpeg_quality=50)
    rec = _record(twice)
    assert (rec["source_pixel_size"], rec["factor"]) == (2.0, pytest.approx(2.0))
    assert rec["previous"]["pixel_size"] == 2.0
    spots = hst.pp.resolve_spots(twice)[0]  # image → coordinate system: Sequence([Scale(2), Scale(2)])
    assert spots.pixel_size == pytest.approx(4.0)
    assert np.allclose(spots.centers_px, hst.pp.resolve_spots(sdata)[0].centers_px / 4)
    assert hst.datasets.degrade(sdata)  # nothing asked: a copy
    assert _record(hst.datasets.degrade(sdata))["order"] == []


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not (HER2ST / "C6").is_dir(), reason="Her2ST data not available")
def test_her2st_c6_shift_of_issue_11_runs_through_image_features() -> None:
    from spatialdata import SpatialData

    sd = hst.datasets.her2st(HER2ST, sections=["C6"])
    source_px = hst.pp.resolve_spots(sd)[0].pixel_size
    assert 0.6 < source_px < 0.8
    out = hst.datasets.degrade(sd, pixel_size=3.2, background="black", stain=0.2, copy=False)
    rec = _record(out, "C6_image")
    assert rec["order"] == ["stain", "pixel_size", "background"]
    assert rec["factor"] == pytest.approx(3.2 / source_px)
    assert 0.1 < rec["background"]["painted_fraction"] < 0.9
    spots = hst.pp.resolve_spots(out)[0]
    assert spots.pixel_size == pytest.approx(3.2)
    h, w = hst.pp.ImagePyramid(sd.images["C6_image"]).shape0
    assert spots.image_shape == (int(np.ceil(h * source_px / 3.2)), int(np.ceil(w * source_px / 3.2)))
    rgb = _rgb(out, "C6_image")
    assert np.mean(np.all(rgb == 0, axis=-1)) == pytest.approx(rec["background"]["painted_fraction"], abs=0.02)

    # 48 spots, to keep the backbone run short
    table = out.tables["table"][:48].copy()
    shapes = out.shapes["C6_spots"]
    small = SpatialData(
        images={"C6_image": out.images["C6_image"]},
        shapes={"C6_spots": shapes.loc[table.obs[Key.TABLE_INSTANCE_KEY].to_numpy()]},
        tables={"table": table},
    )
    result = hst.pp.image_features(small, **TINY)
    feats = result.obsm[Key.OBSM_FEATURES_SPOT]
    assert feats.shape[0] == 48
    assert np.isfinite(feats).all()
    assert result.uns[Key.UNS][Key.UNS_SPOTS]["C6"]["pixel_size"] == pytest.approx(3.2)
    # the spots lie on tissue, which the painting left in place: little of their crops is painted black
    crops = hst.pp.crops(small, progress=False)[0].spot
    black = np.all(crops == 0, axis=-1).mean(axis=(1, 2))
    assert np.median(black) < 0.1
    assert rec["background"]["painted_fraction"] > 3 * np.median(black)
    # (a slide painted black shifts hst.pp's per-slide tissue threshold to its 0.25 cap: the painted pixels
    # are excluded from the Otsu split, which then cuts the tissue itself; median crop tissue fraction
    # 0.72 on clean C6 -> 0.40 here, measured when this test was written)
    assert np.median(result.obs[Key.OBS_TISSUE_FRACTION]) > 0.2


def test_degraded_slide_recomputes_its_image_features(sdata) -> None:
    """Features of the old pixels are not reused: predict/image_features recompute them on the new image."""
    import copy

    src = copy.deepcopy(sdata)
    table = src.tables["table"]
    spots = table.uns.setdefault(Key.UNS, {}).setdefault(Key.UNS_SPOTS, {})
    sample = str(table.obs[Key.OBS_SAMPLE].iloc[0])
    spots.setdefault(sample, {"image_key": next(iter(src.images)), "pixel_size": 1.0})
    table.uns[Key.UNS][Key.UNS_FEATURES] = {"backbone": {"name": "x"}}
    out = hst.datasets.degrade(src, stain=0.2, seed=0)
    assert Key.UNS_FEATURES not in out.tables["table"].uns[Key.UNS]
    assert Key.UNS_FEATURES in src.tables["table"].uns[Key.UNS]  # the input keeps its record
