"""Preprocessing: from SpatialData to spot/niche crops, niches, gene targets and image features.

- :func:`resolve_spots` / :func:`spot_table`: find each sample's image, spots and table, in pixels;
- :func:`niches`: neighbour graph and niche expression;
- :func:`select_genes` / :func:`targets`: genes to predict and their log2(1 + counts) targets;
- :func:`crops` / :class:`SpotCropDataset`: physical spot and niche crops, streamed from the pyramid;
- :func:`image_features`: frozen backbone features of every spot and niche crop;
- :func:`tissue_mask` / :func:`grid_spots`: tissue detection and pseudo-spots for H&E-only slides;
- :func:`load_backbone` / :func:`extract_features`: frozen image backbones from local weights.
"""

from hyperst.pp._backbone import (
    KNOWN_BACKBONES,
    BackboneSpec,
    extract_features,
    load_backbone,
    resolve_backbone_spec,
)
from hyperst.pp._crops import (
    CropCache,
    CropGeometry,
    ImagePyramid,
    SpotCropDataset,
    dihedral,
    extract_crops,
    iter_crops,
    tissue_fraction,
)
from hyperst.pp._features import SampleCrops, crop_geometry, crops, image_features
from hyperst.pp._genes import select_genes, targets
from hyperst.pp._niches import niches
from hyperst.pp._spots import LAYOUTS, SampleSpots, resolve_spots, spot_table
from hyperst.pp._tissue import grid_spots, tissue_mask

__all__ = [
    "KNOWN_BACKBONES",
    "LAYOUTS",
    "BackboneSpec",
    "CropCache",
    "CropGeometry",
    "ImagePyramid",
    "SampleCrops",
    "SampleSpots",
    "SpotCropDataset",
    "crop_geometry",
    "crops",
    "dihedral",
    "extract_crops",
    "extract_features",
    "grid_spots",
    "image_features",
    "iter_crops",
    "load_backbone",
    "niches",
    "resolve_backbone_spec",
    "resolve_spots",
    "select_genes",
    "spot_table",
    "targets",
    "tissue_fraction",
    "tissue_mask",
]
