"""Tests of the crop engine (hyperst.pp._crops, _pyramid, _layout, _resample) and the torch-side crop data
(hyperst.data._crops, _augment, _cache): placement, pyramids, padding, streaming, dataset, cache."""

from __future__ import annotations

import itertools
import pickle

import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from scipy import sparse

from hyperst._constants import IMAGENET_MEAN, IMAGENET_STD
from hyperst.data._augment import dihedral, dihedral_inverse
from hyperst.data._cache import CropCache
from hyperst.data._crops import SpotCropDataset
from hyperst.pp._crops import extract_crops, iter_crops
from hyperst.pp._layout import CropGeometry
from hyperst.pp._pyramid import ImagePyramid, image_fingerprint
from hyperst.pp._tissue import tissue_fraction

BG = np.array([128, 128, 128], dtype=np.uint8)


# ----------------------------------------------------------------------------------------- helpers
def _palette(n: int) -> np.ndarray:
    levels = (0, 85, 170, 255)
    cols = [c for c in itertools.product(levels, repeat=3) if np.abs(np.array(c) - 128).max() > 100]
    assert len(cols) >= n
    return np.array(cols[:n], dtype=np.uint8)


def _marker_image(h: int, w: int, centers: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(3, h, w) grey image with a disk of a unique colour around each centre (pixel i spans [i, i+1))."""
    img = np.empty((3, h, w), dtype=np.uint8)
    img[:] = BG[:, None, None]
    colours = _palette(len(centers))
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    for (cx, cy), col in zip(centers, colours, strict=True):
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        img[:, disk] = col[:, None]
    return img, colours


def _grid_centers(h: int, w: int, spacing: float, margin: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xs = np.arange(margin, w - margin, spacing)
    ys = np.arange(margin, h - margin, spacing)
    c = np.array([(x, y) for y in ys for x in xs], dtype=np.float64)
    return c + rng.uniform(-0.5, 0.5, c.shape)  # sub-pixel positions


def _check_markers(crops: np.ndarray, colours: np.ndarray, tol_px: float) -> None:
    """Centre pixel has the own marker colour and the marker's centroid is the crop centre."""
    n, out = crops.shape[0], crops.shape[1]
    assert out % 2 == 1
    mid = out // 2
    pal = np.concatenate([colours, BG[None]]).astype(float)
    centre = crops[:, mid, mid].astype(float)
    nearest = np.argmin(((centre[:, None, :] - pal[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, np.arange(n))
    # marker share of every pixel by linear unmixing against the background (resampling is linear)
    d = colours.astype(float) - BG.astype(float)  # (n, 3)
    alpha = ((crops.astype(float) - BG.astype(float)) * d[:, None, None, :]).sum(-1)
    alpha /= (d**2).sum(-1)[:, None, None]
    yy, xx = np.mgrid[0:out, 0:out]
    tot = alpha.sum(axis=(1, 2))
    cy = (alpha * yy).sum(axis=(1, 2)) / tot
    cx = (alpha * xx).sum(axis=(1, 2)) / tot
    assert np.abs(cy - (out - 1) / 2).max() < tol_px
    assert np.abs(cx - (out - 1) / 2).max() < tol_px


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    img = np.empty((3, h, w), dtype=np.float64)
    for c in range(3):
        f = rng.uniform(0.02, 0.08, 4)
        ph = rng.uniform(0, 2 * np.pi, 4)
        img[c] = 128 + 30 * (np.sin(f[0] * xx + ph[0]) + np.cos(f[1] * yy + ph[1]))
        img[c] += 25 * np.sin(f[2] * (xx + yy) + ph[2]) * np.cos(f[3] * (xx - yy) + ph[3])
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    c, h, w = img.shape
    return img.reshape(c, h // f, f, w // f, f).mean(axis=(2, 4)).round().astype(np.uint8)


def _as_dataarray(img: np.ndarray) -> xr.DataArray:
    return xr.DataArray(img, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})


def _as_datatree(img: np.ndarray, n_levels: int) -> xr.DataTree:
    levels = {
        f"scale{i}": xr.Dataset({"image": _as_dataarray(_block_mean(img, 2**i) if i else img)}) for i in range(n_levels)
    }
    return xr.DataTree.from_dict(levels)


class RecordingArray:
    """Duck (c, y, x) uint8 array that records every region read from it."""

    def __init__(self, img: np.ndarray) -> None:
        self.img = img
        self.shape = img.shape
        self.dtype = img.dtype
        self.ndim = img.ndim
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        out = self.img[key]
        self.reads.append((out.shape[-2], out.shape[-1]))
        return out


# ----------------------------------------------------------------------------------------- geometry
def test_geometry_layouts_and_roundtrip() -> None:
    g = CropGeometry.for_layout("visium", spot_diameter=55.0, pitch=100.0)
    assert g.spot_size_um == 112.0
    assert g.niche_size_um == pytest.approx(255.0)
    g_st = CropGeometry.for_layout("st", spot_diameter=100.0, pitch=200.0)
    assert (g_st.spot_size_um, g_st.niche_size_um) == (112.0, 500.0)
    assert CropGeometry.for_layout("st", spot_diameter=100.0).niche_size_um == 500.0  # standard pitch
    g_big = CropGeometry.for_layout("generic", spot_diameter=150.0, pitch=300.0)
    assert (g_big.spot_size_um, g_big.niche_size_um) == (150.0, 750.0)
    g_gen = CropGeometry.for_layout("generic", spot_diameter=60.0)
    assert g_gen.niche_size_um == pytest.approx(112.0 * 2.28)
    assert CropGeometry.from_dict(g.to_dict()) == g
    assert g.sides_px(0.5) == pytest.approx((224.0, 510.0))
    with pytest.raises(ValueError, match="layout"):
        CropGeometry.for_layout("hex", spot_diameter=55.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spot_size_um"):
        CropGeometry(spot_size_um=-1.0, niche_size_um=10.0)
    with pytest.raises(ValueError, match="unknown keys"):
        CropGeometry.from_dict({"spot_size_um": 1.0, "niche_size_um": 2.0, "foo": 1})


def test_pyramid_levels_and_choose_level() -> None:
    img = np.zeros((3, 400, 600), dtype=np.uint8)
    pyr = ImagePyramid(_as_datatree(img, 3))
    assert [lv.shape for lv in pyr.levels] == [(400, 600), (200, 300), (100, 150)]
    assert [lv.factor for lv in pyr.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
    assert pyr.choose_level(100, 224) == 0  # even level 0 is too coarse: no upsampling is avoidable
    assert pyr.choose_level(447, 224) == 0
    assert pyr.choose_level(448, 224) == 1
    assert pyr.choose_level(900, 224) == 2
    assert pyr.choose_level(10_000, 224) == 2
    # transposed DataArray dims and a bare array are accepted
    arr = xr.DataArray(np.zeros((50, 60, 3), np.uint8), dims=("y", "x", "c"))
    assert ImagePyramid(arr).shape0 == (50, 60)
    assert ImagePyramid(np.zeros((4, 20, 30), np.uint8)).shape0 == (20, 30)
    with pytest.raises(ValueError, match="uint8"):
        ImagePyramid(np.zeros((3, 10, 10), np.float32))
    with pytest.raises(ValueError, match="dims"):
        ImagePyramid(xr.DataArray(np.zeros((3, 10, 10), np.uint8), dims=("c", "z", "x")))


# ----------------------------------------------------------------------------------------- placement
def test_markers_dataarray_level0() -> None:
    h, w = 260, 330
    centers = _grid_centers(h, w, spacing=40, margin=25, seed=1)
    img, colours = _marker_image(h, w, centers, radius=3.0)
    crops, pad = extract_crops(_as_dataarray(img), centers, 30.0, out_size=15, batch_size=7)
    assert crops.shape == (len(centers), 15, 15, 3)
    assert crops.dtype == np.uint8
    np.testing.assert_array_equal(pad, 0.0)
    # the centre pixel's footprint (±2 level-0 px) lies inside the disk: exactly the marker colour
    np.testing.assert_array_equal(crops[:, 7, 7], colours)
    _check_markers(crops, colours, tol_px=0.2)


def test_markers_multiscale_reads_level1() -> None:
    h, w = 320, 400  # divisible by 4: level factors exactly 2 and 4
    centers = _grid_centers(h, w, spacing=48, margin=30, seed=2)
    img, colours = _marker_image(h, w, centers, radius=3.0)
    tree = _as_datatree(img, 3)
    side, out = 44.0, 15  # level 1: 22 px >= 15, level 2: 11 px < 15
    assert ImagePyramid(tree).choose_level(side, out) == 1
    batches = list(iter_crops(tree, centers, side, out_size=out, batch_size=8))
    assert {b.level for b in batches} == {1}
    idx = np.concatenate([b.index for b in batches])
    np.testing.assert_array_equal(np.sort(idx), np.arange(len(centers)))
    crops = np.empty((len(centers), out, out, 3), np.uint8)
    crops[idx] = np.concatenate([b.crops for b in batches])
    _check_markers(crops, colours, tol_px=0.15)
    # the same windows read from level 0 place the markers at the same place
    crops0, _ = extract_crops(tree, centers, side, out_size=out, level=0)
    _check_markers(crops0, colours, tol_px=0.15)


def test_matches_torch_interpolate_for_aligned_windows() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 200, 240), dtype=np.uint8)
    for side, out in [(100, 40), (60, 60), (20, 40), (90, 31)]:
        centers = np.array([[120.0, 100.0], [70.0, 60.0]]) + (side % 2) / 2  # integer-aligned windows
        crops, _ = extract_crops(img, centers, float(side), out_size=out)
        for j, (cx, cy) in enumerate(centers):
            x0, y0 = int(cx - side / 2), int(cy - side / 2)
            sub = torch.from_numpy(img[:, y0 : y0 + side, x0 : x0 + side]).float()[None]
            ref = F.interpolate(sub, size=(out, out), mode="bilinear", antialias=True, align_corners=False)
            ref = ref[0].permute(1, 2, 0).round().numpy()
            # torch renormalises the filter at the crop edge, we read the real neighbours: compare inside
            b = int(np.ceil(side / out)) + 1
            diff = np.abs(ref[b:-b, b:-b] - crops[j, b:-b, b:-b].astype(float))
            assert diff.max() <= 1.0, (side, out, diff.max())


def test_border_padding_and_pad_fraction() -> None:
    rng = np.random.default_rng(3)
    h, w = 200, 300
    img = rng.integers(0, 200, (3, h, w), dtype=np.uint8)  # never 255: padding is recognisable
    centers = np.array([[5.0, 10.0], [290.5, 195.25], [-30.0, 100.0], [150.0, 100.0]])
    crops, pad = extract_crops(_as_dataarray(img), centers, 40.0, out_size=40, fill=255)
    expected = [1 - (25 / 40) * (30 / 40), 1 - (29.5 / 40) * (24.75 / 40), 1.0, 0.0]
    np.testing.assert_allclose(pad, expected, rtol=0, atol=1e-6)
    assert pad.dtype == np.float32
    # window [-15, 25) x [-10, 30) at scale 1: columns 0..13 and rows 0..8 only see padding,
    # the rest is the image itself (output pixel centres fall on pixel centres)
    assert (crops[0, :, :14] == 255).all()
    assert (crops[0, :9, :] == 255).all()
    np.testing.assert_array_equal(crops[0, 10:, 15:], img[:, 0:30, 0:25].transpose(1, 2, 0))
    assert (crops[2] == 255).all()
    np.testing.assert_array_equal(crops[3], img[:, 80:120, 130:170].transpose(1, 2, 0))
    # RGB fill
    crops_g, _ = extract_crops(img, centers[2:3], 40.0, out_size=8, fill=(0, 255, 0))
    assert (crops_g[0] == np.array([0, 255, 0], np.uint8)).all()
    # the empty-image share of a border window is the analytic pad fraction
    crops_w, pad_w = extract_crops(np.zeros((3, h, w), np.uint8), centers[:2], 40.0, out_size=40)
    np.testing.assert_allclose((crops_w == 255).all(-1).mean(axis=(1, 2)), pad_w, atol=0.03)


def test_same_physical_window_at_two_resolutions() -> None:
    img = _smooth_image(400, 480)
    half = _block_mean(img, 2)
    centers = np.array([[100.3, 120.7], [240.0, 200.0], [377.9, 301.2], [20.0, 30.0]])
    full, pad_full = extract_crops(img, centers, 96.0, out_size=48)
    low, pad_low = extract_crops(half, centers / 2, 48.0, out_size=48)
    np.testing.assert_allclose(pad_full, pad_low, atol=1e-6)
    mad = np.abs(full.astype(float) - low.astype(float)).mean(axis=(1, 2, 3))
    assert mad.max() < 8.0, mad
    # and through a pyramid: level 1 chosen automatically vs level 0 forced
    tree = _as_datatree(img, 2)
    auto, _ = extract_crops(tree, centers, 96.0, out_size=48)
    forced, _ = extract_crops(tree, centers, 96.0, out_size=48, level=0)
    assert np.abs(auto.astype(float) - forced.astype(float)).mean() < 8.0


def test_order_batching_and_input_validation() -> None:
    img = _smooth_image(150, 170)
    rng = np.random.default_rng(5)
    centers = rng.uniform(-10, 180, (37, 2))
    ref, pad_ref = extract_crops(img, centers, 33.3, out_size=21, batch_size=1, prefetch=False)
    got, pad = extract_crops(img, centers, 33.3, out_size=21, batch_size=8, max_region_px=60 * 60)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(pad, pad_ref)
    sizes = [len(b.index) for b in iter_crops(img, centers, 33.3, out_size=21, batch_size=8)]
    assert sizes == [8, 8, 8, 8, 5]
    out = np.zeros((37, 21, 21, 3), np.uint8)
    res, _ = extract_crops(img, centers, 33.3, out_size=21, out=out)
    assert res is out
    np.testing.assert_array_equal(out, ref)
    empty, pad_e = extract_crops(img, np.zeros((0, 2)), 10.0, out_size=4)
    assert empty.shape == (0, 4, 4, 3)
    assert pad_e.shape == (0,)
    with pytest.raises(ValueError, match="centers_px"):
        extract_crops(img, np.zeros((3, 3)), 10.0)
    with pytest.raises(ValueError, match="NaN"):
        extract_crops(img, np.array([[np.nan, 1.0]]), 10.0)
    with pytest.raises(ValueError, match="side_px"):
        extract_crops(img, centers, 0.0)
    with pytest.raises(ValueError, match="fill"):
        extract_crops(img, centers, 10.0, fill=300)
    with pytest.raises(ValueError, match="level"):
        extract_crops(img, centers, 10.0, level=3)
    with pytest.raises(ValueError, match="`out`"):
        extract_crops(img, centers, 10.0, out_size=4, out=np.zeros((37, 5, 5, 3), np.uint8))


# ----------------------------------------------------------------------------------------- streaming
def test_streaming_reads_bounded_regions_duck_array() -> None:
    img = _smooth_image(600, 800)
    rec = RecordingArray(img)
    rng = np.random.default_rng(0)
    centers = rng.uniform(0, 300, (60, 2))  # top-left corner only
    max_px = 120 * 120
    crops, _ = extract_crops(rec, centers, 40.0, out_size=16, max_region_px=max_px)
    ref, _ = extract_crops(img, centers, 40.0, out_size=16)
    np.testing.assert_array_equal(crops, ref)
    areas = [hh * ww for hh, ww in rec.reads]
    assert max(areas) <= max_px
    assert sum(areas) < 0.5 * 600 * 800  # never the whole image, only around the spots
    assert len(rec.reads) > 1


def test_streaming_dask_never_computes_whole_level(monkeypatch: pytest.MonkeyPatch) -> None:
    img = _smooth_image(512, 640)
    tree = xr.DataTree.from_dict(
        {
            "scale0": xr.Dataset({"image": _as_dataarray(img).chunk({"y": 64, "x": 64})}),
            "scale1": xr.Dataset({"image": _as_dataarray(_block_mean(img, 2)).chunk({"y": 64, "x": 64})}),
        }
    )
    computed: list[tuple[int, ...]] = []
    original = da.Array.compute

    def recording_compute(self: da.Array, **kwargs: object) -> object:
        computed.append(self.shape)
        return original(self, **kwargs)

    monkeypatch.setattr(da.Array, "compute", recording_compute)
    centers = _grid_centers(512, 640, spacing=30, margin=10)
    max_px = 150 * 150
    crops, _ = extract_crops(tree, centers, 60.0, out_size=24, max_region_px=max_px)  # level 1
    assert computed, "the dask path must be used"
    assert max(s[1] * s[2] for s in computed) <= max_px
    assert all(s[1:] != (256, 320) for s in computed)
    ref, _ = extract_crops(_block_mean(img, 2), centers / 2, 30.0, out_size=24)
    np.testing.assert_array_equal(crops, ref)


# ----------------------------------------------------------------------------------------- tissue
def test_tissue_fraction() -> None:
    rng = np.random.default_rng(0)
    n, s = 4, 32
    crops = np.full((n, s, s, 3), 255, np.uint8)  # white
    crops[1] = 0  # black padding
    # H&E-like: pink/purple with texture
    base = np.array([200, 120, 180], float)
    crops[2] = np.clip(base + rng.normal(0, 15, (s, s, 3)), 0, 255).astype(np.uint8)
    crops[3] = rng.integers(238, 256, (s, s, 3), dtype=np.uint8)  # noisy near-white background
    crops[3, :, : s // 2] = crops[2, :, : s // 2]  # half tissue
    tf = tissue_fraction(crops)
    assert tf.dtype == np.float32
    assert tf[0] == 0.0
    assert tf[1] == 0.0
    assert tf[2] > 0.99
    assert tf[3] == pytest.approx(0.5, abs=0.02)
    np.testing.assert_allclose(tissue_fraction(crops, batch_size=3), tf)
    with pytest.raises(ValueError, match="uint8"):
        tissue_fraction(crops.astype(np.float32))


# ----------------------------------------------------------------------------------------- dihedral
def test_dihedral_group() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    outs = [dihedral(x, k) for k in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    for k in range(8):
        np.testing.assert_array_equal(dihedral(dihedral(x, k), dihedral_inverse(k)), x)
        # closed under composition
        for j in range(8):
            comp = dihedral(dihedral(x, k), j)
            assert any(np.array_equal(comp, o) for o in outs)
    # torch CHW gives the same as numpy HWC
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for k in range(8):
        got = dihedral(t, k).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got, outs[k])
    np.testing.assert_array_equal(dihedral(x, 1)[0, :, :, 0], np.rot90(x[0, :, :, 0]))
    with pytest.raises(ValueError, match="layout"):
        dihedral(np.zeros((3, 5, 3)), 1)
    with pytest.raises(ValueError, match="k"):
        dihedral(x, 8)


# ----------------------------------------------------------------------------------------- dataset
def _dataset_arrays(n: int = 12, s: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    spot = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    niche = spot.copy()
    expr = rng.random((n, 5)).astype(np.float32)
    return spot, niche, expr


def test_dataset_same_transform_for_spot_and_niche() -> None:
    spot, niche, expr = _dataset_arrays()
    targets = {"expr": expr, "niche_expr": sparse.csr_matrix(expr)}
    ds = SpotCropDataset(spot, niche, targets=targets, augment=True)
    ks = [ds.transform_index(i) for i in range(len(ds))]
    assert len(set(ks)) > 1
    mean = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, np.float32)[:, None, None]
    for i in range(len(ds)):
        item = ds[i]
        assert item["dihedral"] == ks[i]
        assert item["spot"].shape == (3, 8, 8)
        assert item["spot"].dtype == torch.float32
        torch.testing.assert_close(item["spot"], item["niche"])
        expected = (dihedral(spot[i], ks[i]).transpose(2, 0, 1) / 255.0 - mean) / std
        np.testing.assert_allclose(item["spot"].numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(item["expr"].numpy(), expr[i])
        np.testing.assert_allclose(item["niche_expr"].numpy(), expr[i])
    # deterministic given (seed, epoch, index); new epoch -> new draws
    ds2 = SpotCropDataset(spot, niche, augment=True)
    assert [ds2.transform_index(i) for i in range(len(ds))] == ks
    ds2.set_epoch(1)
    assert [ds2.transform_index(i) for i in range(len(ds))] != ks
    assert SpotCropDataset(spot, augment=False)[0]["dihedral"] == 0
    # callable source
    src = SpotCropDataset(lambda i: (spot[i], niche[i]), length=len(spot), augment=True)
    torch.testing.assert_close(src[3]["niche"], ds[3]["niche"])
    with pytest.raises(ValueError, match="niche"):
        SpotCropDataset(spot, niche[:3])


def test_dataset_pickle_memmap_and_dataloader(tmp_path: pytest.TempPathFactory) -> None:
    spot, niche, expr = _dataset_arrays(n=40, s=16)
    np.save(tmp_path / "spot.npy", spot)
    np.save(tmp_path / "niche.npy", niche)
    spot_m = np.load(tmp_path / "spot.npy", mmap_mode="r")
    niche_m = np.load(tmp_path / "niche.npy", mmap_mode="r")
    ds = SpotCropDataset(spot_m, niche_m, targets={"expr": expr}, augment=True, seed=7)
    blob = pickle.dumps(ds)
    assert len(blob) < spot.nbytes // 4  # memmaps travel as file references, not data
    ds2 = pickle.loads(blob)
    assert isinstance(ds2.spot, np.memmap)
    torch.testing.assert_close(ds2[5]["spot"], ds[5]["spot"])
    loader = torch.utils.data.DataLoader(
        ds, batch_size=8, num_workers=2, multiprocessing_context="spawn", shuffle=False
    )
    batches = list(loader)
    spot_all = torch.cat([b["spot"] for b in batches])
    niche_all = torch.cat([b["niche"] for b in batches])
    torch.testing.assert_close(spot_all, niche_all)
    serial = torch.stack([ds[i]["spot"] for i in range(len(ds))])
    torch.testing.assert_close(spot_all, serial)


# ----------------------------------------------------------------------------------------- cache
def test_crop_cache_roundtrip(tmp_path: pytest.TempPathFactory) -> None:
    img = _smooth_image(100, 120)
    centers = np.array([[30.0, 40.0], [80.5, 60.25]])
    geom = CropGeometry(spot_size_um=20.0, niche_size_um=40.0, out_size=16)
    key = CropCache.make_key(geom, image_fingerprint(img), centers, pixel_size=0.5)
    cache = CropCache(tmp_path / "cache", key)
    assert cache.load() is None
    spot, pad = extract_crops(img, centers, 40.0, out_size=16)
    niche, _ = extract_crops(img, centers, 80.0, out_size=16)
    path = cache.save(spot=spot, niche=niche, pad=pad)
    assert path.name.startswith("crops-")
    again = CropCache(tmp_path / "cache", dict(key))
    assert again.hash == cache.hash
    got = again.load()
    assert got is not None
    assert set(got) == {"spot", "niche", "pad"}
    assert isinstance(got["spot"], np.memmap)
    np.testing.assert_array_equal(got["spot"], spot)
    np.testing.assert_array_equal(got["niche"], niche)
    np.testing.assert_array_equal(got["pad"], pad)
    # another centre set or geometry is another entry
    other = CropCache(tmp_path / "cache", CropCache.make_key(geom, image_fingerprint(img), centers + 1))
    assert other.hash != cache.hash
    assert other.load() is None
    assert image_fingerprint(img) != image_fingerprint(_smooth_image(100, 120, seed=1))
    # streaming into a staged memmap
    out = other.allocate("spot", (2, 16, 16, 3))
    extract_crops(img, centers + 1, 40.0, out_size=16, out=out)
    out.flush()
    other.commit()
    np.testing.assert_array_equal(other.load()["spot"], extract_crops(img, centers + 1, 40.0, out_size=16)[0])
    other.clear()
    assert other.load() is None


def test_stacked_crops_behave_like_the_concatenation(tmp_path: pytest.TempPathFactory) -> None:
    from hyperst.data._crops import StackedCrops

    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "b.npy", b)
    mb = np.load(tmp_path / "b.npy", mmap_mode="r")
    ref = np.concatenate([a, b])
    st = StackedCrops([a, mb])
    assert st.shape == (8, 8, 8, 3)
    assert st.dtype == np.uint8
    assert st.ndim == 4
    assert len(st) == 8
    for i in (0, 4, 5, 7, -1):
        np.testing.assert_array_equal(st[i], ref[i])
    keep = np.array([True, False, True, False, False, True, True, False])
    sub = st[keep]
    assert isinstance(sub, StackedCrops)
    assert len(sub) == 4
    np.testing.assert_array_equal(np.asarray(sub), ref[keep])
    np.testing.assert_array_equal(np.asarray(sub[1:3]), ref[keep][1:3])
    np.testing.assert_array_equal(np.concatenate(list(st.batches(3))), ref)
    ds_ref = SpotCropDataset(ref, ref, augment=True, seed=1)
    ds = pickle.loads(pickle.dumps(SpotCropDataset(st, st, augment=True, seed=1)))
    for i in range(8):
        torch.testing.assert_close(ds[i]["spot"], ds_ref[i]["spot"], rtol=0, atol=0)
        torch.testing.assert_close(ds[i]["niche"], ds_ref[i]["niche"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="differ"):
        StackedCrops([a, a[:, :4]])
    with pytest.raises(IndexError):
        st[8]
