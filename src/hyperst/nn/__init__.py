"""The HyperST network (:class:`HyperSTNetwork`), its configuration and its losses.

This is the low-level layer (like an scvi-tools ``module``): tensors in, tensors out. Training
loops, AnnData/SpatialData handling and persistence live in :mod:`hyperst.tl`.
"""

from hyperst.nn._config import CONTRASTIVE_PAIRS, ENTAILMENT_TERMS, PRESETS, HyperSTConfig
from hyperst.nn._losses import (
    contrastive_logits,
    contrastive_loss,
    entailment_loss,
    hierarchical_contrastive_loss,
    hierarchical_entailment_loss,
)
from hyperst.nn._modules import HyperSTNetwork, HyperSTOutput, ImageHyperST, ResMLP

__all__ = [
    "CONTRASTIVE_PAIRS",
    "ENTAILMENT_TERMS",
    "PRESETS",
    "HyperSTConfig",
    "HyperSTNetwork",
    "HyperSTOutput",
    "ImageHyperST",
    "ResMLP",
    "contrastive_logits",
    "contrastive_loss",
    "entailment_loss",
    "hierarchical_contrastive_loss",
    "hierarchical_entailment_loss",
]
