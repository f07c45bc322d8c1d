"""Readers and a deterministic synthetic dataset.

- :func:`her2st`: the five Her2ST sections of ``../shared/data/her2st`` (legacy ST, 200 µm pitch);
- :func:`synthetic`: a small SpatialData whose image regions drive known gene programs.
"""

from hyperst.datasets._her2st import her2st
from hyperst.datasets._synthetic import synthetic

__all__ = ["her2st", "synthetic"]
