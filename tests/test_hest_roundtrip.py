"""HEST-1k layout round trip: synthetic SpatialData → ``wsis/``, ``st/``, ``metadata/`` → ``hst.datasets.hest``.

The sample is written the way HEST-1k ships it: a tiled pyramidal TIFF (level 0 with its reduced levels as
SubIFDs, as libvips and OME writers do), ``st/<id>.h5ad`` with spot centres in level-0 pixels in
``obsm["spatial"]``, and ``metadata/<id>.json`` with the fitted pixel size and the spot geometry. Reading it
back must give the same pixels, spot positions, counts and physical geometry as the synthetic original.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import hyperst as hst
from hyperst._constants import Key

tifffile = pytest.importorskip("tifffile")

PIXEL = 0.5  # µm per level-0 pixel of the synthetic slide
SAMPLE = "SYN0"


def _downsample(img: np.ndarray) -> np.ndarray:
    """2 × 2 mean of an (h, w, 3) uint8 image (odd edges cropped), as a pyramid level."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)


def write_hest_sample(sdata, root: Path, sample_id: str, *, pixel_size: float) -> dict:
    """Write the single sample of a synthetic SpatialData in the HEST-1k layout under ``root``."""
    table = sdata.tables["table"]
    (name,) = table.obs[Key.OBS_SAMPLE].unique()
    image = np.moveaxis(np.asarray(sdata.images[f"{name}_image"].values), 0, -1)  # (y, x, rgb)
    levels = [image]
    for _ in range(2):
        levels.append(_downsample(levels[-1]))
    for d in ("wsis", "st", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # embedded resolution deliberately off by 10 %: HEST's fitted estimate must win
    res = 1e4 / (pixel_size * 1.1)
    with tifffile.TiffWriter(root / "wsis" / f"{sample_id}.tif", bigtiff=True) as tw:
        tw.write(levels[0], tile=(256, 256), photometric="rgb", subifds=len(levels) - 1,
                 resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
        for level in levels[1:]:
            tw.write(level, tile=(256, 256), photometric="rgb", subfiletype=1, metadata=None)
    geom = sdata.shapes[f"{name}_spots"].geometry
    xy = np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()])
    barcodes = [f"BC{i:04d}-1" for i in range(table.n_obs)]
    counts = table.X.toarray() if sparse.issparse(table.X) else np.asarray(table.X)
    st = ad.AnnData(
        X=sparse.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame({"array_row": table.obs["array_row"].to_numpy(),
                          "array_col": table.obs["array_col"].to_numpy()}, index=barcodes),
        var=pd.DataFrame(index=list(map(str, table.var_names))),
    )
    st.obsm["spatial"] = xy
    st.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    spots = table.uns[Key.UNS][Key.UNS_SPOTS][name]
    meta = {"pixel_size_um_estimated": pixel_size, "pixel_size_um_embedded": pixel_size * 1.1,
            "spot_diameter": spots["spot_diameter"], "inter_spot_dist": spots["pitch"], "st_technology": "Visium",
            "fullres_px_width": image.shape[1], "fullres_px_height": image.shape[0]}
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))
    return {"levels": levels, "xy": xy, "counts": counts, "barcodes": barcodes, "name": name}


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    sdata = hst.datasets.synthetic(n_samples=1, n_rows=5, n_cols=6, n_genes=12, pixel_size=PIXEL, seed=3)
    root = tmp_path_factory.mktemp("hest")
    written = write_hest_sample(sdata, root, SAMPLE, pixel_size=PIXEL)
    return sdata, hst.datasets.hest(root, SAMPLE, chunks=256), written


def test_hest_round_trip_pixels_and_levels(round_trip: tuple) -> None:
    original, back, written = round_trip
    image = back.images[f"{SAMPLE}_image"]
    assert list(image.keys()) == ["scale0", "scale1", "scale2"]  # the TIFF's own levels, not rebuilt ones
    for k, level in enumerate(written["levels"]):
        np.testing.assert_array_equal(image[f"scale{k}"]["image"].values, np.moveaxis(level, -1, 0))
    np.testing.assert_array_equal(image["scale0"]["image"].values,
                                  np.asarray(original.images[f"{written['name']}_image"].values))


def test_hest_round_trip_spots_counts_and_pixel_size(round_trip: tuple) -> None:
    original, back, written = round_trip
    table = back.tables["table"]
    geom = back.shapes[f"{SAMPLE}_spots"].geometry
    np.testing.assert_allclose(np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]), written["xy"])
    np.testing.assert_allclose(table.obsm[Key.OBSM_SPATIAL], written["xy"])
    # 55 µm Visium spots at 0.5 µm/px: radius 55 px; the fitted pixel size wins over the embedded one (0.55)
    np.testing.assert_allclose(back.shapes[f"{SAMPLE}_spots"]["radius"], 27.5 / PIXEL)
    meta = table.uns[Key.UNS][Key.UNS_SPOTS][SAMPLE]
    assert meta == {"spot_diameter": 55.0, "pitch": 100.0, "layout": "visium", "pixel_size": PIXEL}
    np.testing.assert_array_equal(table.X.toarray(), written["counts"])
    assert list(table.var_names) == list(original.tables["table"].var_names)
    assert list(table.obs["barcode"]) == written["barcodes"]
    np.testing.assert_array_equal(table.obs[Key.OBS_ARRAY_ROW], original.tables["table"].obs["array_row"])
    # the data path sees the same sample: same centres, pixel size, spot size and layout as the original
    (a,) = hst.pp.resolve_spots(original)
    (b,) = hst.pp.resolve_spots(back)
    np.testing.assert_allclose(b.centers_px, a.centers_px)
    assert (b.pixel_size, b.spot_diameter, b.pitch, b.layout) == (a.pixel_size, a.spot_diameter, a.pitch, a.layout)
    assert b.image_shape == a.image_shape


def test_hest_round_trip_same_crops(round_trip: tuple) -> None:
    """Spot crops cut from the read-back pyramid equal the original's; niche crops agree up to the level used.

    Spot windows (112 µm → 224 px, 0.5 µm/px) come from level 0 in both; the wider niche windows are read from
    the TIFF's 2× level, which the synthetic original does not have, so they agree only closely.
    """
    original, back, _ = round_trip
    (a,) = hst.pp.crops(original, progress=False)
    (b,) = hst.pp.crops(back, progress=False)
    assert a.spot.shape == b.spot.shape == (30, 224, 224, 3)
    np.testing.assert_array_equal(a.spot, b.spot)
    np.testing.assert_array_equal(a.pad_fraction, b.pad_fraction)
    # the slide's tissue threshold is found on a coarse level, which the TIFF's own pyramid makes slightly different
    np.testing.assert_allclose(a.tissue_fraction, b.tissue_fraction, atol=2e-3)
    diff = np.abs(a.niche.astype(np.int16) - b.niche.astype(np.int16))
    assert a.niche.shape == b.niche.shape
    assert diff.mean() < 3.0, diff.mean()
