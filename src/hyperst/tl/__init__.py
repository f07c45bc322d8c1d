"""Tools: train (``fit``), predict, evaluate and persist HyperST models.

The functions arrive with the ``hst.tl`` issue; this namespace exists so that the package layout is
stable (``hst.tl.<function>``).
"""

__all__: list[str] = []
