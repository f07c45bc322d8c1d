"""hyperst: predict spatial gene expression from H&E histology with hierarchical hyperbolic learning.

Use it as ``import hyperst as hst``. Sub-packages follow the scverse layout:

- :mod:`hyperst.pp`: preprocessing (crops, niches, genes, image features),
- :mod:`hyperst.tl`: training, prediction and evaluation,
- :mod:`hyperst.pl`: plotting,
- :mod:`hyperst.datasets`: readers and synthetic data,
- :mod:`hyperst.geometry`: Lorentz-model hyperbolic geometry,
- :mod:`hyperst.nn`: the HyperST network, its configuration and losses,
- :mod:`hyperst.data`: the torch side of the data path (datasets, crop cache, splitter, data modules).

Heavy dependencies (torch, spatialdata, squidpy, timm) are imported lazily, on first use of the
sub-package that needs them, so ``import hyperst`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hyperst._logging import settings
from hyperst._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from hyperst import data, datasets, geometry, nn, pl, pp, tl

_SUBMODULES = ("data", "datasets", "geometry", "nn", "pl", "pp", "tl")

__all__ = ["__version__", "data", "datasets", "geometry", "nn", "pl", "pp", "settings", "tl"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"hyperst.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'hyperst' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
