"""Plotting (matplotlib; scanpy-style ``show=`` and ``save=``).

- :func:`spatial`: predicted vs observed expression side by side on the H&E;
- :func:`scatter`: predicted vs observed for one gene;
- :func:`poincare`: embeddings on the Poincaré disk, with entailment cones;
- :func:`radius`: hyperbolic radius per stream (the learned hierarchy);
- :func:`history`: training/validation loss components over epochs;
- :func:`gene_scores`: per-gene Pearson r ranked, with PCC@K marked;
- :func:`intervals`: predicted, lower, upper and observed expression side by side on the H&E;
- :func:`reliability`: uncertainty and out-of-distribution scores on the tissue, error vs uncertainty, coverage.
"""

from hyperst.pl._embedding import disk_coordinates, poincare, radius
from hyperst.pl._expression import scatter, spatial
from hyperst.pl._training import gene_scores, history
from hyperst.pl._uncertainty import intervals, reliability

__all__ = [
    "disk_coordinates",
    "gene_scores",
    "history",
    "intervals",
    "poincare",
    "radius",
    "reliability",
    "scatter",
    "spatial",
]
