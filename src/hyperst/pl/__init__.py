"""Plotting: predicted vs observed expression, Poincaré-disk embeddings, radii and training history.

The functions arrive with the ``hst.pl`` issue; this namespace exists so that the package layout is
stable (``hst.pl.<function>``).
"""

__all__: list[str] = []
