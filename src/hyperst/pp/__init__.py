"""Preprocessing: from SpatialData to spot/niche crops, niches, gene targets and image features.

- :func:`resolve_spots` / :func:`spot_table`: find each sample's image, spots and table, in pixels;
- :func:`niches` / :func:`aggregate_niches`: neighbour graph and niche expression (over any graph);
- :func:`select_genes` / :func:`targets`: genes to predict and their log2(1 + counts) targets;
- :func:`crops` / :class:`SpotCropDataset`: physical spot and niche crops, streamed from the pyramid;
- :func:`image_features`: frozen backbone features of every spot and niche crop (and of augmented views,
  :data:`DEFAULT_VIEWS`);
- :func:`image_features_cohort` / :func:`read_cohort`: the same over many slides and devices, into a resumable store;
- :func:`tissue_mask` / :func:`tissue_threshold` / :func:`tissue_fraction` / :func:`grid_spots`: tissue
  detection (one per-slide Otsu threshold) and pseudo-spots for H&E-only slides;
- :func:`load_backbone` / :func:`extract_features`: frozen image backbones from local weights.

Imported lazily (spatialdata's ``_LAZY_IMPORTS`` pattern): ``import hyperst.pp`` imports neither torch nor
numba; each name loads its module on first use (``hst.pp.niches`` needs neither).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hyperst._utils import lazy_module

if TYPE_CHECKING:  # pragma: no cover
    from hyperst.data._augment import dihedral
    from hyperst.data._cache import CropCache
    from hyperst.data._crops import SpotCropDataset
    from hyperst.pp._backbone import (
        DEFAULT_BACKBONE,
        KNOWN_BACKBONES,
        BackboneSpec,
        extract_features,
        load_backbone,
        resolve_backbone_spec,
    )
    from hyperst.pp._cohort import CohortStore, image_features_cohort, read_cohort
    from hyperst.pp._crops import extract_crops, iter_crops
    from hyperst.pp._features import SampleCrops, crop_geometry, crop_optical_density, crops, image_features
    from hyperst.pp._genes import select_genes, targets
    from hyperst.pp._layout import LAYOUTS, CropGeometry
    from hyperst.pp._niches import aggregate_niches, niches
    from hyperst.pp._pyramid import ImagePyramid
    from hyperst.pp._spots import SampleSpots, resolve_spots, spot_table
    from hyperst.pp._tissue import TissueThreshold, grid_spots, tissue_fraction, tissue_mask, tissue_threshold
    from hyperst.pp._views import DEFAULT_VIEWS

_LAZY_IMPORTS: dict[str, str] = {
    "DEFAULT_BACKBONE": "hyperst.pp._backbone",
    "KNOWN_BACKBONES": "hyperst.pp._backbone",
    "BackboneSpec": "hyperst.pp._backbone",
    "extract_features": "hyperst.pp._backbone",
    "load_backbone": "hyperst.pp._backbone",
    "resolve_backbone_spec": "hyperst.pp._backbone",
    "CropCache": "hyperst.data._cache",
    "SpotCropDataset": "hyperst.data._crops",
    "dihedral": "hyperst.data._augment",
    "CohortStore": "hyperst.pp._cohort",
    "image_features_cohort": "hyperst.pp._cohort",
    "read_cohort": "hyperst.pp._cohort",
    "extract_crops": "hyperst.pp._crops",
    "iter_crops": "hyperst.pp._crops",
    "LAYOUTS": "hyperst.pp._layout",
    "CropGeometry": "hyperst.pp._layout",
    "ImagePyramid": "hyperst.pp._pyramid",
    "SampleCrops": "hyperst.pp._features",
    "crop_geometry": "hyperst.pp._features",
    "crop_optical_density": "hyperst.pp._features",
    "crops": "hyperst.pp._features",
    "image_features": "hyperst.pp._features",
    "select_genes": "hyperst.pp._genes",
    "targets": "hyperst.pp._genes",
    "aggregate_niches": "hyperst.pp._niches",
    "niches": "hyperst.pp._niches",
    "SampleSpots": "hyperst.pp._spots",
    "resolve_spots": "hyperst.pp._spots",
    "spot_table": "hyperst.pp._spots",
    "TissueThreshold": "hyperst.pp._tissue",
    "grid_spots": "hyperst.pp._tissue",
    "tissue_fraction": "hyperst.pp._tissue",
    "tissue_mask": "hyperst.pp._tissue",
    "tissue_threshold": "hyperst.pp._tissue",
    "DEFAULT_VIEWS": "hyperst.pp._views",
}

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_VIEWS",
    "KNOWN_BACKBONES",
    "LAYOUTS",
    "BackboneSpec",
    "CohortStore",
    "CropCache",
    "CropGeometry",
    "ImagePyramid",
    "SampleCrops",
    "SampleSpots",
    "SpotCropDataset",
    "TissueThreshold",
    "aggregate_niches",
    "crop_geometry",
    "crop_optical_density",
    "crops",
    "dihedral",
    "extract_crops",
    "extract_features",
    "grid_spots",
    "image_features",
    "image_features_cohort",
    "iter_crops",
    "load_backbone",
    "niches",
    "read_cohort",
    "resolve_backbone_spec",
    "resolve_spots",
    "select_genes",
    "spot_table",
    "targets",
    "tissue_fraction",
    "tissue_mask",
    "tissue_threshold",
]


__getattr__, __dir__ = lazy_module("hyperst.pp", _LAZY_IMPORTS, globals(), __all__)
