"""A small deterministic synthetic spatial-transcriptomics dataset with a learnable image → expression signal.

Each sample is an H&E-like RGB image with a few tissue types laid out as smooth blobs on a tissue area
surrounded by near-white background. Each tissue type has its own colour and texture (nucleus size and
density, stromal fibres) and its own gene program (marker genes with high rates there); background genes are
expressed in all tissue. Spots sample the tissue, and their expected counts follow the tissue composition
inside the spot, so a model that sees the spot image can learn the expression.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import ndimage, sparse

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.datasets._utils import (
    image_key,
    parse_circles,
    parse_rgb_image,
    parse_table,
    spot_metadata,
    spots_key,
)
from hyperst.pp._layout import LAYOUTS, layout_defaults

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

__all__ = ["synthetic"]

#: tissue types, in order; ``BACKGROUND`` is the off-tissue label
TISSUES: tuple[str, ...] = ("tumour", "stroma", "immune")
BACKGROUND = "background"


# Appearance (RGB in [0, 1]) and texture per tissue type. Nuclei are thresholded smooth noise: ``cell`` is the
# noise cell in µm (y, x before orientation), ``cover`` the area fraction covered by nuclei.
_BASE = np.array(
    [
        [0.85, 0.64, 0.80],  # tumour: lilac cytoplasm
        [0.96, 0.70, 0.79],  # stroma: eosin pink
        [0.90, 0.82, 0.90],  # immune: pale
        [0.96, 0.95, 0.96],  # background: near white
    ],
    dtype=np.float32,
)
_NUCLEUS = np.array(
    [
        [0.36, 0.20, 0.52],  # tumour: large purple nuclei
        [0.45, 0.28, 0.56],  # stroma: sparse spindle nuclei
        [0.18, 0.12, 0.42],  # immune: small dark blue-purple nuclei
        [0.96, 0.95, 0.96],
    ],
    dtype=np.float32,
)
_FIBRE = np.array([0.83, 0.42, 0.60], dtype=np.float32)
_TEXTURE = {  # noise cell (µm along y, µm along x; blobs are ~2.5 cells), cover
    "tumour": ((4.0, 4.0), 0.30),
    "stroma": ((1.5, 6.0), 0.06),
    "immune": ((2.0, 2.0), 0.32),
    "fibre": ((1.5, 20.0), 0.35),
}

_OFF_TISSUE_FRACTION = 0.15
_MIN_TYPE_FRACTION = 0.15


# --------------------------------------------------------------------------- geometry
def _grid(layout: str, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot centres (µm, x/y from the first spot) and array row/col, row-major."""
    _, pitch = layout_defaults(layout)
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    if layout == "visium":
        array_col = 2 * cols + (rows % 2)  # odd rows are shifted by half a pitch
        xy = np.c_[array_col * pitch / 2, rows * pitch * np.sqrt(3) / 2]
    else:
        array_col = cols
        xy = np.c_[cols * pitch, rows * pitch].astype(np.float64)
    return xy.astype(np.float64), rows.astype(np.int64), array_col.astype(np.int64)


class _Field:
    """Smooth random field (random Fourier features of a Gaussian-kernel process), in µm."""

    def __init__(self, rng: np.random.Generator, length: float, n_features: int = 24) -> None:
        self.w = rng.normal(scale=1.0 / length, size=(2, n_features))
        self.b = rng.uniform(0, 2 * np.pi, size=n_features)
        self.a = rng.normal(size=n_features) * np.sqrt(2.0 / n_features)

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        return np.cos(xy @ self.w + self.b) @ self.a

    def grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Values on the grid ``ys × xs`` (separable: cos(u + v) = cos u cos v − sin u sin v)."""
        u = xs[:, None] * self.w[0] + self.b  # (nx, J)
        v = ys[:, None] * self.w[1]  # (ny, J)
        cu, su = (np.cos(u) * self.a).astype(np.float32), (np.sin(u) * self.a).astype(np.float32)
        cv, sv = np.cos(v).astype(np.float32), np.sin(v).astype(np.float32)
        return cv @ cu.T - sv @ su.T


class _Layout:
    """Tissue geometry of one sample: tissue-type fields (argmax) inside a tissue-mask field."""

    def __init__(self, rng: np.random.Generator, spots_um: np.ndarray, extent_um: np.ndarray, pitch: float) -> None:
        length = max(1.5 * pitch, 0.15 * float(extent_um.max()))
        self.centre = extent_um / 2 + rng.uniform(-0.1, 0.1, size=2) * extent_um
        self.half_axes = np.maximum(extent_um / 2, pitch) * rng.uniform(0.85, 1.1, size=2)
        self.wobble = _Field(rng, length=max(2 * pitch, 0.25 * float(extent_um.max())))
        score = self.tissue_score(spots_um[:, 0], spots_um[:, 1], self.wobble(spots_um))
        # a fixed share of the spots lies off tissue
        self.threshold = float(np.quantile(score, _OFF_TISSUE_FRACTION))
        on = score > self.threshold
        n_on = max(int(on.sum()), 1)

        best: tuple[float, list[_Field], np.ndarray] | None = None
        for _ in range(64):
            fields = [_Field(rng, length=length) for _ in TISSUES]
            values = np.stack([f(spots_um[on]) for f in fields], 1)
            bias = np.zeros(len(TISSUES))
            for _ in range(20):  # nudge biases towards balanced tissue types
                frac = np.bincount((values + bias).argmax(1), minlength=len(TISSUES)) / n_on
                bias += 0.5 * (1.0 / len(TISSUES) - frac)
            frac = np.bincount((values + bias).argmax(1), minlength=len(TISSUES)) / n_on
            if best is None or frac.min() > best[0]:
                best = (float(frac.min()), fields, bias.copy())
            if frac.min() >= _MIN_TYPE_FRACTION:
                break
        assert best is not None
        self.fields, self.bias = best[1], best[2]

    def tissue_score(self, x: np.ndarray, y: np.ndarray, wobble: np.ndarray) -> np.ndarray:
        dx, dy = (x - self.centre[0]) / self.half_axes[0], (y - self.centre[1]) / self.half_axes[1]
        return 1.0 - dx**2 - dy**2 + 0.35 * wobble

    def label_map(self, shape: tuple[int, int], cell_um: float) -> np.ndarray:
        """Tissue label (0..K-1; K = background) on a grid of ``cell_um`` cells (cell centres)."""
        xs = (np.arange(shape[1]) + 0.5) * cell_um
        ys = (np.arange(shape[0]) + 0.5) * cell_um
        label = np.zeros(shape, dtype=np.int8)
        best = self.fields[0].grid(xs, ys) + np.float32(self.bias[0])
        for k in range(1, len(TISSUES)):
            value = self.fields[k].grid(xs, ys) + np.float32(self.bias[k])
            better = value > best
            label[better] = k
            np.maximum(best, value, out=best)
        score = self.tissue_score(xs[None, :], ys[:, None], self.wobble.grid(xs, ys))
        label[score <= self.threshold] = len(TISSUES)
        return label


def _disk_offsets(radius: float) -> np.ndarray:
    """Hexagonal lattice of about 37 points inside a disk of ``radius`` (to sample spot composition)."""
    step = radius / 3.0
    i, j = np.mgrid[-4:5, -4:5]
    xy = np.c_[(i + 0.5 * (j % 2)).ravel() * step, j.ravel() * step * np.sqrt(3) / 2]
    return xy[np.hypot(xy[:, 0], xy[:, 1]) <= radius + 1e-9]


# --------------------------------------------------------------------------- image
def _blobs(rng: np.random.Generator, shape: tuple[int, int], cell_px: tuple[float, float], cover: float) -> np.ndarray:
    """Soft blob mask in [0, 1] covering about ``cover`` of the image, blobs of about 2.5 ``cell_px`` pixels."""
    from PIL import Image

    cy, cx = max(cell_px[0], 1.0), max(cell_px[1], 1.0)
    coarse_shape = (int(np.ceil(shape[0] / cy)) + 1, int(np.ceil(shape[1] / cx)) + 1)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32), 1.0)
    threshold = float(np.quantile(coarse, 1.0 - cover))
    spread = 0.35 * float(coarse.std())
    size = (round(coarse_shape[1] * cx), round(coarse_shape[0] * cy))  # PIL: (width, height)
    fine = np.array(Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR))[: shape[0], : shape[1]]
    fine -= threshold - 0.5 * spread
    fine /= spread
    return np.clip(fine, 0.0, 1.0, out=fine)


def _render(rng: np.random.Generator, label: np.ndarray, pixel_size: float) -> np.ndarray:
    """H&E-like RGB uint8 image ``(y, x, 3)`` from the per-pixel tissue label map."""
    shape = label.shape
    vertical = bool(rng.integers(2))  # orientation of stromal fibres in this sample

    def layer(name: str) -> np.ndarray:
        (ay, ax), cover = _TEXTURE[name]
        if vertical and name in ("stroma", "fibre"):
            ay, ax = ax, ay
        return _blobs(rng, shape, (ay / pixel_size, ax / pixel_size), cover)

    nuclei = np.zeros(shape, dtype=np.float32)
    for k, name in enumerate(TISSUES):
        np.copyto(nuclei, layer(name), where=label == k)
    stroma = label == TISSUES.index("stroma")
    fibre = layer("fibre")
    fibre *= 0.55 * stroma

    grain = rng.standard_normal(shape, dtype=np.float32)
    tint = rng.normal(scale=0.015, size=3).astype(np.float32)  # mild stain variation between samples
    out = np.empty((*shape, 3), dtype=np.uint8)
    for c in range(3):
        base = _BASE[:, c][label]
        base += fibre * (_FIBRE[c] - base)
        base += nuclei * (_NUCLEUS[:, c][label] - base)
        base += grain * 0.025 + tint[c]
        base *= 255.0
        np.clip(base, 0, 255, out=base)
        out[..., c] = base
    return out


# --------------------------------------------------------------------------- expression
def _programs(rng: np.random.Generator, n_genes: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Gene annotation and the rate matrix ``(n_types + 1, n_genes)`` (last row: off tissue)."""
    n_types = len(TISSUES)
    n_markers = max(1, n_genes // (2 * n_types))
    program = [t for t in TISSUES for _ in range(n_markers)]
    program += [BACKGROUND] * (n_genes - len(program))
    program_arr = np.array(program)
    names = [f"{p}_{i}" for p in (*TISSUES, BACKGROUND) for i in range(int((program_arr == p).sum()))]

    rates = np.empty((n_types + 1, n_genes))
    housekeeping = program_arr == BACKGROUND
    level = np.exp(rng.normal(np.log(3.0), 0.5, size=n_genes))
    rates[:n_types] = level * np.exp(rng.normal(0.0, 0.15, size=(n_types, n_genes)))
    for k, t in enumerate(TISSUES):
        marker = program_arr == t
        low = np.exp(rng.normal(np.log(0.4), 0.3, size=(n_types, marker.sum())))
        high = np.exp(rng.normal(np.log(12.0), 0.35, size=marker.sum()))
        rates[:n_types, marker] = low
        rates[k, marker] = high
    rates[n_types] = 0.03 * np.where(housekeeping, level, 1.0)
    var = pd.DataFrame({Key.VAR_PROGRAM: pd.Categorical(program, categories=[*TISSUES, BACKGROUND])}, index=names)
    return var, rates


def _counts(rng: np.random.Generator, fractions: np.ndarray, rates: np.ndarray) -> sparse.csr_matrix:
    """Negative-binomial (gamma–Poisson, dispersion 5) counts with spot-level size factors."""
    size_factor = np.exp(rng.normal(0.0, 0.25, size=(fractions.shape[0], 1)))
    mean = (fractions @ rates) * size_factor
    lam = mean * rng.gamma(5.0, 1.0 / 5.0, size=mean.shape)
    x = sparse.csr_matrix(rng.poisson(lam).astype(np.int32))
    x.eliminate_zeros()
    return x


# --------------------------------------------------------------------------- public API
def synthetic(
    *,
    n_samples: int = 2,
    layout: Literal["visium", "st"] = "visium",
    n_rows: int = 16,
    n_cols: int = 16,
    n_genes: int = 60,
    pixel_size: float = 1.0,
    multiscale: bool = False,
    seed: int = 0,
    with_table: bool = True,
) -> SpatialData:
    """Deterministic synthetic H&E + spot expression data with a known image → expression signal.

    Every sample is an H&E-like slide: a tissue area made of three tissue types (``"tumour"``: large dense
    purple nuclei; ``"stroma"``: pink eosin with fibres and sparse spindle nuclei; ``"immune"``: dense small
    dark nuclei on a pale background), laid out as smooth blobs, surrounded by near-white background where
    about 15 % of the spots fall. Each tissue type drives a gene program: its marker genes have a ~30× higher
    rate there; background genes are expressed at similar levels in all tissue; off-tissue spots have
    near-zero counts. A spot's expected counts follow the tissue composition inside the spot (negative
    binomial noise, spot size factors). Samples share programs but differ in geometry, so held-out samples
    make sense.

    Layouts follow the real arrays: ``"visium"`` is a hexagonal grid (100 µm pitch, 55 µm spots, odd rows
    shifted by half a pitch, ``array_col`` = 2·column + row parity), ``"st"`` a square grid (200 µm pitch,
    100 µm spots). The image margin leaves room for every spot crop (max(112 µm, diameter)) and niche crop
    (spot plus neighbours) around every spot.

    Elements follow hyperst's conventions: per sample ``s`` (``"sample0"``, ``"sample1"``, ...) a coordinate
    system ``s`` with ``f"{s}_image"`` and ``f"{s}_spots"`` (circles in level-0 pixels); one table
    ``"table"`` with raw counts (CSR int32), ``obs["sample"]``, ``obs["array_row"]``, ``obs["array_col"]``,
    ground truth ``obs["tissue"]`` and ``var["program"]``, ``obsm["spatial"]`` and
    ``uns["hyperst"]["spots"][s]`` (spot diameter, pitch, layout, pixel size).

    Parameters
    ----------
    n_samples
        Number of samples (slides).
    layout
        ``"visium"`` (hexagonal) or ``"st"`` (legacy Spatial Transcriptomics, square).
    n_rows, n_cols
        Spots per column and per row of the array.
    n_genes
        Number of genes: ``n_genes // 6`` (at least 1) markers per tissue type, the rest background genes.
    pixel_size
        Micrometres per level-0 pixel.
    multiscale
        Store images as multiscale :class:`xarray.DataTree` (``scale0`` … ``scale3``, factor 2 per level).
    seed
        Random seed; the same seed gives identical data. Sample ``i`` does not depend on ``n_samples``.
    with_table
        If ``False``, return images and spot shapes only (an H&E-only slide, e.g. for prediction).

    Returns
    -------
    The synthetic dataset.

    Raises
    ------
    ValueError
        If an argument is out of range (named in the message).
    """
    from spatialdata import SpatialData

    if layout not in LAYOUTS:
        raise ValueError(f"`layout={layout!r}` must be one of {list(LAYOUTS)}.")
    for name, value, minimum in (("n_samples", n_samples, 1), ("n_rows", n_rows, 2), ("n_cols", n_cols, 2)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"`{name}={value!r}` must be an integer ≥ {minimum}.")
    if not isinstance(n_genes, int | np.integer) or n_genes < len(TISSUES) + 1:
        raise ValueError(f"`n_genes={n_genes!r}` must be an integer ≥ {len(TISSUES) + 1} (one marker per tissue).")
    if not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"`pixel_size={pixel_size!r}` must be a positive number of µm per pixel.")

    diameter, pitch = layout_defaults(layout)
    spots_um, array_row, array_col = _grid(layout, n_rows, n_cols)
    grid_extent = spots_um.max(0)
    # room for the niche crop (spot + neighbours) around every spot, plus a background border
    margin = 1.5 * pitch + diameter / 2
    extent_um = grid_extent + 2 * margin
    spots_um = spots_um + margin
    shape = (int(np.ceil(extent_um[1] / pixel_size)), int(np.ceil(extent_um[0] / pixel_size)))
    if shape[0] * shape[1] > 2e8:
        raise ValueError(
            f"The images would be {shape[1]}×{shape[0]} px; increase `pixel_size` or reduce `n_rows`/`n_cols`."
        )
    offsets = _disk_offsets(diameter / 2)

    seeds = np.random.SeedSequence(seed).spawn(n_samples + 1)
    var, rates = _programs(np.random.default_rng(seeds[0]), n_genes)

    images: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    obs_frames: list[pd.DataFrame] = []
    mats: list[sparse.csr_matrix] = []
    spatial: list[np.ndarray] = []
    samples = [f"sample{i}" for i in range(n_samples)]
    for i, s in enumerate(samples):
        rng = np.random.default_rng(seeds[i + 1])
        # tissue labels on cells of about 2 µm (whole pixels), then per pixel
        factor = max(1, round(2.0 / pixel_size))
        cells = (-(-shape[0] // factor), -(-shape[1] // factor))
        label = _Layout(rng, spots_um, extent_um, pitch).label_map(cells, factor * pixel_size)
        if factor > 1:
            label = label.repeat(factor, 0).repeat(factor, 1)[: shape[0], : shape[1]]

        # spot composition from the label map the image is drawn from
        pts = (spots_um[:, None, :] + offsets[None]) / pixel_size
        ly = np.clip(pts[..., 1].astype(np.int64), 0, shape[0] - 1)
        lx = np.clip(pts[..., 0].astype(np.int64), 0, shape[1] - 1)
        labels = label[ly, lx]
        fractions = np.stack([(labels == k).mean(1) for k in range(len(TISSUES) + 1)], 1)

        image = _render(rng, label, pixel_size)
        centres_px = spots_um / pixel_size
        images[image_key(s)] = parse_rgb_image(image, coordinate_system=s, multiscale=multiscale, chunks=None)
        shapes[spots_key(s)] = parse_circles(centres_px, radius=diameter / 2 / pixel_size, coordinate_system=s)
        if not with_table:
            continue
        mats.append(_counts(rng, fractions, rates))
        spatial.append(centres_px)
        n = len(centres_px)
        obs_frames.append(
            pd.DataFrame(
                {
                    Key.OBS_SAMPLE: s,
                    Key.TABLE_REGION_KEY: spots_key(s),
                    Key.TABLE_INSTANCE_KEY: np.arange(n, dtype=np.int64),
                    Key.OBS_ARRAY_ROW: array_row,
                    Key.OBS_ARRAY_COL: array_col,
                    Key.OBS_TISSUE: np.array([*TISSUES, BACKGROUND])[fractions.argmax(1)],
                },
                index=pd.Index([f"{s}_{j}" for j in range(n)]),
            )
        )

    tables: dict[str, Any] = {}
    if with_table:
        from anndata import AnnData

        obs = pd.concat(obs_frames)
        obs[Key.OBS_SAMPLE] = pd.Categorical(obs[Key.OBS_SAMPLE], categories=samples)
        regions = [spots_key(s) for s in samples]
        obs[Key.TABLE_REGION_KEY] = pd.Categorical(obs[Key.TABLE_REGION_KEY], categories=regions)
        obs[Key.OBS_TISSUE] = pd.Categorical(obs[Key.OBS_TISSUE], categories=[*TISSUES, BACKGROUND])
        adata = AnnData(X=sparse.csr_matrix(sparse.vstack(mats), dtype=np.int32), obs=obs, var=var)
        adata.obsm[Key.OBSM_SPATIAL] = np.concatenate(spatial)
        meta = spot_metadata(spot_diameter=diameter, pitch=pitch, layout=layout, pixel_size=pixel_size)
        adata.uns[Key.UNS] = {Key.UNS_SPOTS: {s: dict(meta) for s in samples}}
        tables[Key.TABLE_NAME] = parse_table(adata, samples)
    logger.info(f"synthetic: {n_samples} {layout} sample(s), {n_rows}×{n_cols} spots, {shape[1]}×{shape[0]} px images")
    return SpatialData(images=images, shapes=shapes, tables=tables)
