"""Every key hyperst reads from or writes to AnnData / SpatialData objects, in one place."""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_BACKBONE", "IMAGENET_MEAN", "IMAGENET_STD", "Key"]

#: The backbone of ``image_features``, ``fit``, the CLI and the demo when none is given: EfficientNet-Lite0 with
#: multi-stage features (``KNOWN_BACKBONES["efficientnet_lite0_stages"]``), chosen by the Her2ST shift benchmark
#: (docs/benchmarks.md, "Domain shift").
DEFAULT_BACKBONE: Final[str] = "efficientnet_lite0_stages"
#: ImageNet channel mean (RGB, 0–1 scale): the input normalisation of ImageNet-trained backbones.
IMAGENET_MEAN: Final[tuple[float, float, float]] = (0.485, 0.456, 0.406)
#: ImageNet channel standard deviation (RGB, 0–1 scale).
IMAGENET_STD: Final[tuple[float, float, float]] = (0.229, 0.224, 0.225)


class Key:
    """Names of the slots hyperst uses.

    Keeping them here (as squidpy's ``_constants`` does) means a key is spelled once and documented once.
    """

    #: ``.uns`` entry holding hyperst's parameters, history and provenance.
    UNS: Final[str] = "hyperst"
    #: ``.obsm`` key of the image spot embedding (Lorentz space coordinates).
    OBSM_IMAGE_SPOT: Final[str] = "X_hyperst"
    #: ``.obsm`` key of the image niche embedding.
    OBSM_IMAGE_NICHE: Final[str] = "X_hyperst_niche"
    #: ``.obsm`` key of the gene (expression) spot embedding.
    OBSM_GENE_SPOT: Final[str] = "X_hyperst_gene"
    #: ``.obsm`` key of the gene (expression) niche embedding.
    OBSM_GENE_NICHE: Final[str] = "X_hyperst_gene_niche"
    #: ``.layers`` key of predicted expression when ``.X`` already holds measured counts.
    LAYER_PRED: Final[str] = "hyperst_pred"
    #: ``.layers`` key of the measured counts as log2(1 + counts), next to the prediction (hst.tl.predict on a
    #: table with the model's genes), for side-by-side tools such as ``squidpy.gr.spatial_autocorr(layer=...)``.
    LAYER_OBSERVED: Final[str] = "hyperst_observed"

    # ------------------------------------------------------------------ preprocessing (hst.pp)
    #: ``.obsm`` key of spot centres (the squidpy convention).
    OBSM_SPATIAL: Final[str] = "spatial"
    #: ``.obsm`` key of frozen backbone features of the spot crops.
    OBSM_FEATURES_SPOT: Final[str] = "hyperst_features_spot"
    #: ``.obsm`` key of frozen backbone features of the niche crops.
    OBSM_FEATURES_NICHE: Final[str] = "hyperst_features_niche"
    #: ``.obsm`` key of the spot-crop features of augmented views (``(n, n_views, D)``, ``image_features(views=)``).
    OBSM_VIEWS_SPOT: Final[str] = "hyperst_features_spot_views"
    #: ``.obsm`` key of the niche-crop features of augmented views.
    OBSM_VIEWS_NICHE: Final[str] = "hyperst_features_niche_views"
    #: ``.obsp`` key prefix of the niche graph (squidpy writes ``{prefix}_connectivities``/``_distances``).
    OBSP_NICHE_PREFIX: Final[str] = "hyperst_niche"
    #: ``.obsp`` key of the niche adjacency (binary, without self loops).
    OBSP_NICHE_CONNECTIVITIES: Final[str] = "hyperst_niche_connectivities"
    #: ``.obsp`` key of the niche neighbour distances.
    OBSP_NICHE_DISTANCES: Final[str] = "hyperst_niche_distances"
    #: ``.obs`` column: number of niche members (self included).
    OBS_NICHE_SIZE: Final[str] = "hyperst_niche_size"
    #: ``.obs`` column: whether the niche has every neighbour the layout allows.
    OBS_NICHE_COMPLETE: Final[str] = "hyperst_niche_complete"
    #: ``.obs`` column: fraction of the spot crop that is tissue.
    OBS_TISSUE_FRACTION: Final[str] = "hyperst_tissue_fraction"
    #: ``.obs`` column: fraction of the spot crop outside the image (padded).
    OBS_PAD_FRACTION: Final[str] = "hyperst_pad_fraction"
    #: ``.obsm`` key of niche expression log2(1 + mean raw counts over the niche).
    OBSM_NICHE_EXPRESSION: Final[str] = "hyperst_niche_expression"
    #: ``.var`` column marking the selected genes.
    VAR_SELECTED: Final[str] = "hyperst_selected"
    #: ``.var`` column with the rank of a selected gene (0 = first).
    VAR_RANK: Final[str] = "hyperst_rank"
    #: ``.layers`` key of raw counts kept by hyperst when ``.X`` is transformed.
    LAYER_COUNTS: Final[str] = "counts"

    # ------------------------------------------------------------------ readers and tables
    #: ``.obs`` column naming the sample (slide) of each spot.
    OBS_SAMPLE: Final[str] = "sample"
    #: ``.obs`` columns with array (grid) coordinates.
    OBS_ARRAY_ROW: Final[str] = "array_row"
    OBS_ARRAY_COL: Final[str] = "array_col"
    #: spatialdata table attributes used by hyperst's readers.
    TABLE_REGION_KEY: Final[str] = "region"
    TABLE_INSTANCE_KEY: Final[str] = "instance_id"
    #: name of the table hyperst's readers create.
    TABLE_NAME: Final[str] = "table"
    #: ``.obs`` column with the spot barcode (HEST and Visium readers).
    OBS_BARCODE: Final[str] = "barcode"
    #: ``.obs`` column of :func:`hyperst.datasets.synthetic` with the true tissue type of each spot.
    OBS_TISSUE: Final[str] = "tissue"
    #: ``.var`` column of :func:`hyperst.datasets.synthetic` with the tissue type a gene marks.
    VAR_PROGRAM: Final[str] = "program"

    # ------------------------------------------------------------------ tools (hst.tl)
    #: ``.layers`` key of the lower end of the prediction interval (coverage 1 - alpha).
    LAYER_LOWER: Final[str] = "hyperst_lower"
    #: ``.layers`` key of the upper end of the prediction interval.
    LAYER_UPPER: Final[str] = "hyperst_upper"
    #: ``.layers`` key of the predictive standard deviation (ensemble spread and held-out residuals).
    LAYER_STD: Final[str] = "hyperst_std"
    #: ``.obs`` column: per-spot uncertainty, the mean predictive standard deviation over genes.
    OBS_UNCERTAINTY: Final[str] = "hyperst_uncertainty"
    #: ``.obs`` column: out-of-distribution score of the spot's image features against the training spots.
    OBS_OOD_SCORE: Final[str] = "hyperst_ood_score"
    #: ``.obs`` column: whether the spot's OOD score exceeds the calibrated threshold.
    OBS_OOD: Final[str] = "hyperst_ood"
    #: ``.obs`` column: hyperbolic radius d(O, x) of the image spot embedding (a diagnostic, not a confidence).
    OBS_RADIUS: Final[str] = "hyperst_radius"
    #: ``.obs`` column: predicted log2(1 + total counts) of the spot (models trained with ``normalize=True``).
    OBS_LOG2_DEPTH: Final[str] = "hyperst_log2_depth"
    #: name of the table :func:`hyperst.tl.predict` adds to a SpatialData.
    TABLE_PREDICTION: Final[str] = "hyperst_prediction"

    # ------------------------------------------------------------------ scanpy/squidpy legacy ``.uns["spatial"]``
    #: ``.uns`` key of the legacy spatial block: ``.uns["spatial"][library_id]`` (scanpy.read_visium's layout).
    UNS_SPATIAL: Final[str] = "spatial"
    #: sub-keys of ``.uns["spatial"][library_id]``: the images and their scale factors.
    SPATIAL_IMAGES: Final[str] = "images"
    SPATIAL_SCALEFACTORS: Final[str] = "scalefactors"
    SPATIAL_METADATA: Final[str] = "metadata"
    #: image keys of ``.uns["spatial"][library_id]["images"]`` (Space Ranger: at most 2000 and 600 pixels a side).
    SPATIAL_HIRES: Final[str] = "hires"
    SPATIAL_LOWRES: Final[str] = "lowres"
    #: scale factors: image pixels per ``.obsm["spatial"]`` unit, and the spot diameter in those units.
    SCALEF_HIRES: Final[str] = "tissue_hires_scalef"
    SCALEF_LOWRES: Final[str] = "tissue_lowres_scalef"
    SPOT_DIAMETER_FULLRES: Final[str] = "spot_diameter_fullres"

    # sub-keys of ``.uns["hyperst"]``
    UNS_SPOTS: Final[str] = "spots"  # resolved geometry: pixel size, spot diameter, keys used
    UNS_NICHES: Final[str] = "niches"
    UNS_GENES: Final[str] = "genes"
    UNS_FEATURES: Final[str] = "features"
    UNS_COLOUR: Final[str] = "colour"  # per sample: mean/std over spots of the crops' optical density (RGB)
    UNS_FIT: Final[str] = "fit"  # training parameters and history written by hst.tl.fit
    UNS_PREDICT: Final[str] = "predict"  # provenance written by hst.tl.predict
    UNS_DOMAIN: Final[str] = "domain"  # .uns["hyperst"]["predict"]["domain"]: domain-shift checks of hst.tl.predict
    ATTRS_DEGRADE: Final[str] = "degrade"  # images' attrs["hyperst"]["degrade"]: what hst.datasets.degrade did
    ATTRS_GRID: Final[str] = "grid"  # shapes.attrs["hyperst"]["grid"]: parameters of hst.pp.grid_spots
    ATTRS_SLIDE: Final[str] = "slide"  # sdata.attrs["hyperst"]["slide"][sample]: what hst.datasets.read_slide read
