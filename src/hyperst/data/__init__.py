"""Torch-side data: datasets over features or crops, augmentation, the crop cache and Lightning data modules.

Imported lazily (spatialdata's ``_LAZY_IMPORTS`` pattern): ``import hyperst.data`` imports neither torch
nor numba; each name loads its module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hyperst._utils import lazy_module

if TYPE_CHECKING:  # pragma: no cover
    from hyperst.data._augment import dihedral, dihedral_inverse
    from hyperst.data._cache import CropCache
    from hyperst.data._crops import SpotCropDataset, StackedCrops
    from hyperst.data._features import FeatureData, FeatureDataset
    from hyperst.data._modules import CropDataModule, DataSplitter, FeatureDataModule

_LAZY_IMPORTS: dict[str, str] = {
    "dihedral": "hyperst.data._augment",
    "dihedral_inverse": "hyperst.data._augment",
    "CropCache": "hyperst.data._cache",
    "SpotCropDataset": "hyperst.data._crops",
    "StackedCrops": "hyperst.data._crops",
    "FeatureData": "hyperst.data._features",
    "FeatureDataset": "hyperst.data._features",
    "CropDataModule": "hyperst.data._modules",
    "DataSplitter": "hyperst.data._modules",
    "FeatureDataModule": "hyperst.data._modules",
}

__all__ = [
    "CropCache",
    "CropDataModule",
    "DataSplitter",
    "FeatureData",
    "FeatureDataModule",
    "FeatureDataset",
    "SpotCropDataset",
    "StackedCrops",
    "dihedral",
    "dihedral_inverse",
]


__getattr__, __dir__ = lazy_module("hyperst.data", _LAZY_IMPORTS, globals(), __all__)
