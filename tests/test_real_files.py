"""Readers and tissue detection on real files of ``../shared/data`` (skipped when absent) and on small
synthetic pyramidal TIFFs written with tifffile.

- ``wsi/cmu_small_region.svs``: a real Aperio slide (level 0 + thumbnail, label, macro; MPP 0.499);
- ``visium_mouse_brain_lowres/``: a real Space Ranger 1.x folder with a lowres image only;
- ``her2st/``: five real ST sections, for the tissue detection of H&E-only prediction.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("spatialdata")

import hyperst as hst  # noqa: E402
from hyperst._constants import Key  # noqa: E402
from hyperst.datasets._slide import _consistent_levels  # noqa: E402
from hyperst.pp._pyramid import image_levels  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SVS = DATA / "wsi" / "cmu_small_region.svs"
VISIUM = DATA / "visium_mouse_brain_lowres"
HER2ST = DATA / "her2st"


def _record(sdata, sample):
    return sdata.attrs[Key.UNS][Key.ATTRS_SLIDE][sample]


# ----------------------------------------------------------------------------------------------- real .svs
@pytest.fixture(scope="module")
def svs() -> Path:
    if not SVS.is_file():
        pytest.skip(f"{SVS} is absent")
    return SVS


def test_svs_reads_baseline_with_aperio_mpp_and_ignores_label_macro(svs):
    sdata = hst.datasets.read_slide(svs)
    assert list(sdata.images) == ["cmu_small_region_image"]
    rec = _record(sdata, "cmu_small_region")
    assert rec["format"] == "svs"
    assert rec["series"] == "Baseline"
    assert rec["pixel_size"] == pytest.approx(0.499)
    assert rec["pixel_size_source"] == "Aperio MPP"
    assert rec["ignored_series"] == ["Thumbnail", "Label", "Macro"]
    assert rec["file_levels"] == [[2967, 2220]]  # no intermediate pyramid level in this file
    levels = image_levels(sdata.images["cmu_small_region_image"])
    assert levels[0].shape == (3, 2967, 2220)
    for lv in levels[1:]:  # the lazily built levels keep level 0's aspect ratio (no 387x463 label, 1280x431 macro)
        h, w = lv.shape[1:]
        assert abs(h / w - 2967 / 2220) < 0.01
        assert h < 2967
    # level 0 holds the baseline pixels, not the thumbnail's
    with tifffile.TiffFile(svs) as tif:
        ref = tif.series[0].asarray()[1000:1100, 500:640]
    got = np.moveaxis(levels[0][:, 1000:1100, 500:640].values, 0, -1)
    np.testing.assert_array_equal(got, ref)
    # H&E: mean RGB is pinkish-purple, not white or black
    mean = levels[-1].values.reshape(3, -1).mean(1)
    assert 120 < mean.min() < mean.max() < 240
    assert mean[1] < mean[0]


def test_svs_pixel_size_argument_and_contradiction(svs, caplog):
    sdata = hst.datasets.read_slide(svs, sample="cmu", pixel_size=0.5)
    assert _record(sdata, "cmu")["pixel_size_source"] == "argument"
    with caplog.at_level("WARNING", logger="hyperst"):
        sdata = hst.datasets.read_slide(svs, sample="cmu", pixel_size=0.25)
    assert _record(sdata, "cmu")["pixel_size"] == 0.25
    assert "contradicts the file's 0.499" in caplog.text
    with pytest.raises(ValueError, match="`pixel_size` must be a positive"):
        hst.datasets.read_slide(svs, pixel_size=-1)


def test_svs_tissue_and_grid(svs):
    sdata = hst.datasets.read_slide(svs)
    image = sdata.images["cmu_small_region_image"]
    mask, _ = hst.pp.tissue_mask(image, pixel_size=0.499)
    assert 0.3 < mask.mean() < 0.95  # a tissue region with some glass
    key = hst.pp.grid_spots(sdata, pixel_size=0.499, layout="visium")
    grid = sdata.shapes[key]
    # the 1.1 x 1.5 mm region holds on the order of a hundred 100 µm-pitch spots
    assert 40 < len(grid) < 160
    assert grid.attrs[Key.UNS][Key.ATTRS_GRID]["pixel_size"] == pytest.approx(0.499)


# ----------------------------------------------------------------------------------------------- synthetic TIFFs
def _he(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, np.uint8)
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (180, 90, 160)
    return np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)


def _write_pyramid(path: Path, base: np.ndarray, *, ome: bool, **kwargs) -> None:
    with tifffile.TiffWriter(path, ome=ome) as tw:
        tw.write(base, tile=(64, 64), subifds=2 if ome else None, **kwargs)
        tw.write(base[::2, ::2], tile=(64, 64), subfiletype=1)
        tw.write(base[::4, ::4], tile=(64, 64), subfiletype=1)


def test_ome_tiff_pyramid_and_physical_size_unit(tmp_path):
    base = _he(256, 192)
    path = tmp_path / "slide.ome.tif"
    _write_pyramid(path, base, ome=True,
                   metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm",
                             "PhysicalSizeY": 250, "PhysicalSizeYUnit": "nm"})
    sdata = hst.datasets.read_slide(path)
    rec = _record(sdata, "slide")
    assert rec["format"] == "ome-tiff"
    assert rec["pixel_size"] == pytest.approx(0.25)
    assert rec["pixel_size_source"] == "OME PhysicalSizeX"
    levels = image_levels(sdata.images["slide_image"])
    assert [lv.shape for lv in levels] == [(3, 256, 192), (3, 128, 96), (3, 64, 48)]
    np.testing.assert_array_equal(np.moveaxis(levels[1].values, 0, -1), base[::2, ::2])


def test_plain_tiff_resolution_tags_and_label_page(tmp_path):
    base = _he(256, 192, seed=1)
    path = tmp_path / "plain.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(64, 64), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
        tw.write(base[::2, ::2], tile=(64, 64), subfiletype=1)
        tw.write(_he(40, 100, seed=2), subfiletype=1)  # a label-like reduced page of another aspect ratio
    sdata = hst.datasets.read_slide(path, sample="s1")
    rec = _record(sdata, "s1")
    assert rec["pixel_size"] == pytest.approx(0.5)
    assert rec["pixel_size_source"] == "TIFF resolution tags"
    assert rec["file_levels"] == [[256, 192], [128, 96]]
    element, px = hst.datasets.read_wsi(path, coordinate_system="s1", multiscale=False)
    assert px == pytest.approx(0.5)
    assert element.shape == (3, 256, 192)


def test_level_check_drops_label_and_macro_shapes():
    # level 0, two downsamplings, then a label (387 x 463) and a macro (1280 x 431) image of an Aperio file
    shapes = [(2967, 2220), (1483, 1110), (741, 555), (463, 387), (431, 1280)]
    assert _consistent_levels(shapes) == [0, 1, 2]
    assert _consistent_levels([(1000, 800), (1000, 800), (500, 400)]) == [0, 2]


def test_tiff_without_resolution_needs_pixel_size(tmp_path):
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, _he(128, 96), tile=(64, 64))
    _, px = hst.datasets.read_wsi(path, coordinate_system="bare")
    assert px is None
    with pytest.raises(ValueError, match=r"records no pixel size.*pass `pixel_size=`"):
        hst.datasets.read_slide(path)
    sdata = hst.datasets.read_slide(path, pixel_size=0.8)
    assert _record(sdata, "bare")["pixel_size"] == 0.8
    assert _record(sdata, "bare")["pixel_size_source"] == "argument"


def test_non_tiff_names_the_optional_extra(tmp_path, monkeypatch):
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"not a tiff at all")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("openslide", "tiffslide") else real(name, *a))
    with pytest.raises(ValueError, match=r"hyperst\[slides\]"):
        hst.datasets.read_slide(path, pixel_size=0.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hst.datasets.read_slide(tmp_path / "missing.svs")
    with pytest.raises(ValueError, match="`backend="):
        hst.datasets.read_slide(path, backend="pillow")


def test_openslide_fallback_reads_levels_and_mpp(tmp_path, monkeypatch):
    """A format tifffile cannot open goes through an OpenSlide-like API (a stand-in module here)."""
    from PIL import Image

    base = _he(300, 200, seed=3)
    levels = [base, base[::2, ::2]]

    class FakeSlide:
        def __init__(self, path):
            self.properties = {"openslide.mpp-x": "0.2527", "openslide.vendor": "mirax"}
            self.level_dimensions = [(lv.shape[1], lv.shape[0]) for lv in levels]
            self.level_downsamples = [1.0, 2.0]
            self.associated_images = {"label": None, "macro": None}

        def read_region(self, location, level, size):
            x, y = location[0] // int(self.level_downsamples[level]), location[1] // int(self.level_downsamples[level])
            out = np.zeros((size[1], size[0], 4), np.uint8)
            tile = levels[level][y : y + size[1], x : x + size[0]]
            out[: tile.shape[0], : tile.shape[1], :3], out[..., 3] = tile, 255
            return Image.fromarray(out, "RGBA")

    fake = types.ModuleType("openslide")
    fake.OpenSlide = FakeSlide
    monkeypatch.setitem(sys.modules, "openslide", fake)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "openslide" else real(name, *a))
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"MIRAX index")
    sdata = hst.datasets.read_slide(path, chunks=128)
    rec = _record(sdata, "slide")
    assert rec["backend"] == "openslide"
    assert rec["format"] == "mirax"
    assert rec["pixel_size"] == pytest.approx(0.2527)
    assert rec["ignored_series"] == ["label", "macro"]
    got = image_levels(sdata.images["slide_image"])
    assert [lv.shape for lv in got] == [(3, 300, 200), (3, 150, 100)]
    np.testing.assert_array_equal(np.moveaxis(got[0].values, 0, -1), base)
    np.testing.assert_array_equal(np.moveaxis(got[1].values, 0, -1), base[::2, ::2])


# ----------------------------------------------------------------------------------------------- real Visium
@pytest.fixture(scope="module")
def visium_lowres():
    if not (VISIUM / "spatial" / "tissue_lowres_image.png").is_file():
        pytest.skip(f"{VISIUM} is absent")
    return hst.datasets.visium(VISIUM)


def test_visium_lowres_only_folder(visium_lowres):
    sdata = visium_lowres
    sample = "visium_mouse_brain_lowres"  # Space Ranger 1.x names no library: the folder name
    assert set(sdata.images) == {f"{sample}_image"}
    image = sdata.images[f"{sample}_image"]
    assert image.shape == (3, 599, 600)
    table = sdata.tables["table"]
    assert table.n_obs == 2695
    assert table.n_vars == 100
    meta = table.uns[Key.UNS][Key.UNS_SPOTS][sample]
    # full-resolution pixel size fitted on the spot grid (100 µm pitch), divided by the lowres scale factor
    assert meta["pixel_size"] == pytest.approx(0.7248 / 0.051635113, rel=2e-3)
    assert meta["spot_diameter"] == 55.0
    assert meta["pitch"] == 100.0
    assert meta["layout"] == "visium"
    radius = sdata.shapes[f"{sample}_spots"].radius.to_numpy()
    assert radius == pytest.approx(55 / 2 / 0.7248, rel=2e-3)  # full-resolution pixels
    (spots,) = hst.pp.resolve_spots(sdata)
    assert spots.image_shape == (599, 600)
    assert spots.pixel_size == pytest.approx(14.04, rel=2e-3)
    xy = spots.centers_px  # in lowres pixels: full-resolution positions times tissue_lowres_scalef
    np.testing.assert_allclose(xy, table.obsm["spatial"] * 0.051635113, rtol=1e-6)
    assert (xy > 0).all()
    assert (xy[:, 0] < 600).all()
    assert (xy[:, 1] < 599).all()


def test_visium_lowres_spots_fall_on_tissue(visium_lowres):
    sample = "visium_mouse_brain_lowres"
    table = visium_lowres.tables["table"]
    px = table.uns[Key.UNS][Key.UNS_SPOTS][sample]["pixel_size"]
    mask, scale = hst.pp.tissue_mask(visium_lowres.images[f"{sample}_image"], pixel_size=px)

    def on_tissue(xy_fullres):
        ij = np.floor(xy_fullres[:, ::-1] * 0.051635113 / scale).astype(int)
        return mask[ij[:, 0].clip(0, mask.shape[0] - 1), ij[:, 1].clip(0, mask.shape[1] - 1)]

    assert on_tissue(table.obsm["spatial"]).mean() > 0.97  # the in-tissue spots of Space Ranger
    positions = pd.read_csv(VISIUM / "spatial" / "tissue_positions_list.csv", header=None)
    outside = positions[positions[1] == 0][[5, 4]].to_numpy(np.float64)  # x = pxl_col, y = pxl_row
    assert on_tissue(outside).mean() < 0.1  # and the off-tissue ones are not: the mapping is right


# ----------------------------------------------------------------------------------------------- Her2ST tissue
def _her2st_section(section: str, reduce: int = 8):
    """The section's H&E decoded at 1/``reduce`` (JPEG DCT scaling), measured spot centres and pixel size."""
    from PIL import Image
    from spatialdata.models import Image2DModel

    from hyperst.datasets._utils import fit_pixels_per_step

    folder = HER2ST / section
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(folder / "he.jpg") as im:
            im.draft("RGB", (im.width // reduce, im.height // reduce))
            rgb = np.asarray(im.convert("RGB"))
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    array_xy, pixel_xy = spots[["x", "y"]].to_numpy(float), spots[["pixel_x", "pixel_y"]].to_numpy(float)
    pixel_size = 200.0 / fit_pixels_per_step(array_xy, pixel_xy)
    measured = pd.read_csv(folder / "counts.tsv.gz", sep="\t", index_col=0, usecols=[0]).index.astype(str)
    spots = spots.loc[spots.index.intersection(measured)]
    image = Image2DModel.parse(np.moveaxis(rgb, -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"])
    return image, spots[["pixel_x", "pixel_y"]].to_numpy(float) / reduce, pixel_size * reduce


@pytest.mark.parametrize("section", ["C2", "C3", "C4", "C5", "C6"])
def test_her2st_measured_spots_lie_on_detected_tissue_and_grid(section):
    """Pale stroma and adipose count as tissue: ≥ 95 % of the measured spots (measured 98–99 %; 93–97 % before)."""
    from scipy.spatial import cKDTree
    from spatialdata import SpatialData

    if not (HER2ST / section / "he.jpg").is_file():
        pytest.skip(f"{HER2ST / section} is absent")
    image, xy, pixel_size = _her2st_section(section)
    assert pixel_size == pytest.approx(0.69 * 8, rel=0.02)
    mask, scale = hst.pp.tissue_mask(image, pixel_size=pixel_size)
    ij = np.floor(xy[:, ::-1] / scale).astype(int)
    on_tissue = mask[ij[:, 0].clip(0, mask.shape[0] - 1), ij[:, 1].clip(0, mask.shape[1] - 1)].mean()
    assert on_tissue >= 0.95
    assert 0.12 < mask.mean() < 0.25  # the tissue, not the pink-tinted glass around it (≈ 17 % of the image)
    sdata = SpatialData(images={"he": image})
    key = hst.pp.grid_spots(sdata, pixel_size=pixel_size, layout="st")
    grid = sdata.shapes[key]
    centres = np.column_stack([grid.geometry.x, grid.geometry.y])
    # no measured spot falls in a hole of the grid: a pseudo-spot lies within pitch/√2 (the corner of its 200 µm
    # cell; the grid's phase is not the array's, so a measured spot may sit up to a cell corner away)
    d, _ = cKDTree(centres).query(xy)
    assert (d * pixel_size <= 200.0 / np.sqrt(2)).mean() >= 0.95
    assert len(grid) < 1.15 * len(xy)  # and the grid does not spill over the glass


@pytest.mark.parametrize("section", ["C2", "C6"])
def test_her2st_pale_staining_keeps_the_tissue(section):
    """Haematoxylin and eosin at 40 % (a pale batch): ≥ 95 % of the measured spots stay on tissue (was 78–88 %)."""
    from skimage.color import hed2rgb, rgb2hed
    from spatialdata.models import Image2DModel

    if not (HER2ST / section / "he.jpg").is_file():
        pytest.skip(f"{HER2ST / section} is absent")
    image, xy, pixel_size = _her2st_section(section)
    hed = rgb2hed(np.moveaxis(image.values, 0, -1))
    pale = (np.clip(hed2rgb(hed * np.array([0.4, 0.4, 1.0])), 0, 1) * 255).astype(np.uint8)
    pale_image = Image2DModel.parse(np.moveaxis(pale, -1, 0), dims=("c", "y", "x"), c_coords=["r", "g", "b"])
    mask, scale = hst.pp.tissue_mask(pale_image, pixel_size=pixel_size)
    ij = np.floor(xy[:, ::-1] / scale).astype(int)
    assert mask[ij[:, 0].clip(0, mask.shape[0] - 1), ij[:, 1].clip(0, mask.shape[1] - 1)].mean() >= 0.95
    assert 0.12 < mask.mean() < 0.25
