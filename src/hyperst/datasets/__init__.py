"""Readers and a deterministic synthetic dataset.

- :func:`her2st`: the five Her2ST sections of ``../shared/data/her2st`` (legacy ST, 200 µm pitch);
- :func:`hest`: samples of a HEST-1k download (pyramidal TIFF WSI, ``st/<id>.h5ad``, metadata);
- :func:`read_slide` / :func:`read_wsi`: a scanner slide (``.svs``, pyramidal/OME TIFF; OpenSlide formats with
  the ``slides`` extra) with its pixel size;
- :func:`visium`: a Space Ranger output folder, through spatialdata-io;
- :func:`legacy`: an AnnData with scanpy's ``.uns["spatial"]``, through spatialdata-io's converter;
- :func:`synthetic`: a small SpatialData whose image regions drive known gene programs;
- :func:`degrade`: a domain-shifted copy of a slide (coarser scan, stain shift, painted background, JPEG).
"""

from hyperst.datasets._her2st import her2st
from hyperst.datasets._hest import hest
from hyperst.datasets._slide import read_slide, read_wsi
from hyperst.datasets._synthetic import synthetic
from hyperst.datasets._visium import legacy, visium, visium_pixel_size
from hyperst.pp._degrade import degrade

__all__ = ["degrade", "her2st", "hest", "legacy", "read_slide", "read_wsi", "synthetic", "visium", "visium_pixel_size"]
