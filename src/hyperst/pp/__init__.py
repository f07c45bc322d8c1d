"""Preprocessing: from SpatialData to spot/niche crops, niches, gene targets and image features.

The functions arrive with the ``hst.pp`` issue; this namespace exists so that the package layout is
stable (``hst.pp.<function>``).
"""

__all__: list[str] = []
