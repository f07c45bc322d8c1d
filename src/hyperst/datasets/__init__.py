"""Readers (Her2ST, HEST-1k, Visium) and a deterministic synthetic dataset.

The functions arrive with the ``hst.pp`` and ``hst.pl`` issues; this namespace exists so that the
package layout is stable (``hst.datasets.<function>``).
"""

__all__: list[str] = []
