"""``hst.tl.predict_cohort``: :func:`hyperst.tl.predict` over many slides, distributed, into a resumable store.

The engine (processes, store layout, resuming) is :func:`hyperst.pp.run_cohort`'s, shared with
:func:`hyperst.pp.image_features_cohort`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hyperst._utils import jsonable
from hyperst.pp._cohort import CohortStore, Slide, as_slides, read_spatialdata, run_cohort

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from hyperst.tl._model import HyperST

__all__ = ["predict_cohort"]


def model_digest(model: HyperST) -> str:
    """SHA-256 (20 hex digits) of the model's genes, configuration and every tensor it predicts with."""
    import torch

    h = hashlib.sha256()
    h.update(repr((list(model.genes), model.config.to_dict(), model.backbone, model.crop_geometry)).encode())
    modules = [*model.members, *([model.image_backbone] if model.image_backbone is not None else [])]
    for k, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(f"{k}.{name}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(str(model.calibration is not None and model.domain is not None).encode())
    return h.hexdigest()[:20]


def predict_cohort(
    model: HyperST | str | os.PathLike[str],
    slides: Sequence[str | os.PathLike[str] | SpatialData] | Mapping[str, str | os.PathLike[str] | SpatialData]
    | CohortStore,
    *,
    out: str | os.PathLike[str],
    layer: Literal["auto"] | bool = "auto",
    table_key: str | None = None,
    shapes_key: str | None = None,
    image_key: str | None = None,
    pixel_size: float | None = None,
    grid: Mapping[str, Any] | None = None,
    spatial_image: int | None = 2000,
    batch_size: int = 1024,
    alpha: float = 0.1,
    device: str = "auto",
    devices: int | str | Sequence[int] = 1,
    strategy: str | Any = "auto",
    num_nodes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> CohortStore:
    """:func:`predict` over many slides, spread over devices and nodes, into a resumable zarr store.

    Each process (one per device, launched by Lightning Fabric) takes its share of the slides not yet in
    ``out`` and writes :func:`predict`'s table of each as one group of ``out`` (atomically: a killed job
    leaves complete slides only). Rerunning the same call computes only the missing slides. With
    ``devices=1`` (the default) everything runs in this process. See :func:`hyperst.pp.image_features_cohort`
    for the store and the launching.

    Parameters
    ----------
    model
        A trained :class:`HyperST`, or the folder it was saved to (each process loads it).
    slides
        SpatialData zarr paths (named after their folder, without ``.zarr``) or a dict ``{name: path}``: image
        features are computed with the model's backbone and crop geometry, spots placed on the tissue for
        slides without spots (``grid``, ``pixel_size``), as :func:`predict` does. Or the
        :class:`~hyperst.pp.CohortStore` of :func:`hyperst.pp.image_features_cohort` (``hst.pp.read_cohort``):
        predictions from its feature tables, no backbone run. In one process also SpatialData objects (in a
        dict, or read from zarr); they are not modified.
    out
        Folder of the zarr store (created; reused when it holds a store of the same model and settings).
    layer, table_key, shapes_key, image_key, pixel_size, grid, spatial_image, batch_size, alpha
        As in :func:`predict` (the same for every slide; ``table_key`` … ``spatial_image`` for SpatialData).
    device, devices, strategy, num_nodes
        The Lightning accelerator (``"auto"``, ``"cpu"``, ``"cuda"``), devices per node, ``"auto"``/``"ddp"``
        or a ``DDPStrategy``, and nodes: see :func:`hyperst.pp.image_features_cohort`. A model on a GPU is
        moved to each process's GPU.
    overwrite
        Delete an existing store at ``out`` first (default: resume it).
    progress
        Progress bars (per slide; inside a slide only with one process).

    Returns
    -------
    The :class:`~hyperst.pp.CohortStore`: ``store[name]`` is the slide's prediction table as :func:`predict`
    returns it; every process returns it.

    Raises
    ------
    ValueError
        Bad arguments; ``out`` holding a store of another model or settings; in-memory slides with several
        processes.
    RuntimeError
        When slides failed (after the others are done; their errors are in ``out/manifest.json``).
    """
    from spatialdata import SpatialData

    from hyperst.tl._model import HyperST
    from hyperst.tl._predict import predict

    if isinstance(model, str | os.PathLike):
        model = HyperST.load(model)
    if not isinstance(model, HyperST):
        raise TypeError(f"`model` must be a HyperST or the folder of a saved one, got {type(model).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1) (0.1 gives 90 % intervals), got {alpha!r}.")
    settings: dict[str, Any] = {"model": model_digest(model), "layer": layer, "batch_size": batch_size,
                                "alpha": float(alpha)}
    if isinstance(slides, CohortStore):
        if slides.kind != "image_features":
            raise ValueError(f"`slides` is a {slides.kind!r} store; predictions need image features "
                             "(`hst.pp.image_features_cohort`).")
        store = slides
        items = [Slide(name, str(store.path / "slides" / name)) for name in store.slides]
        if not items:
            raise ValueError(f"`slides`: the store `{store.path}` has no complete slide.")
        settings["features"] = str(store.path.resolve())

        def load(source: str) -> AnnData:
            return store.read(Path(source).name)
    else:
        items = as_slides(slides, accept=(SpatialData,), what="SpatialData zarr paths")
        spatial = {"table_key": table_key, "shapes_key": shapes_key, "image_key": image_key,
                   "pixel_size": pixel_size, "grid": None if grid is None else dict(grid),
                   "spatial_image": spatial_image}
        settings.update(jsonable(spatial))
        load = read_spatialdata  # type: ignore[assignment]

    def work(data: AnnData | SpatialData, dev: str, inner_progress: bool) -> AnnData:
        if model.device.type != "cpu" and str(model.device) != dev:
            model.to(dev)
        if isinstance(data, SpatialData):
            return predict(model, data, layer=layer, table_key=table_key, shapes_key=shapes_key,
                           image_key=image_key, pixel_size=pixel_size, grid=grid, spatial_image=spatial_image,
                           device=dev, batch_size=batch_size, alpha=alpha, progress=inner_progress)
        return predict(model, data, layer=layer, batch_size=batch_size, alpha=alpha)

    return run_cohort(items, out=Path(out), kind="predict", settings=settings, load=load, work=work,
                      device=device, devices=devices, strategy=strategy, num_nodes=num_nodes, overwrite=overwrite,
                      progress=progress)
