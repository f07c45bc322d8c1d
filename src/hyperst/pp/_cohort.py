"""Cohorts: one function over many slides, spread over devices and nodes, results in a resumable zarr store.

:func:`image_features_cohort` runs :func:`hyperst.pp.image_features` on every slide; ``hyperst.tl``'s
``predict_cohort`` runs :func:`hyperst.tl.predict` the same way through :func:`run_cohort`. Processes are
launched and connected by Lightning Fabric (``devices``, ``strategy``, ``num_nodes``: one process per device,
the launcher of ``strategy="ddp"``, SLURM/torchrun detected); each process works on its share of the
slides that are not done yet, one slide at a time, with the one-process function, so the results are the
ones that function gives.

Store layout (``out``, a zarr v2 group)::

    out/
      .zattrs            {"hyperst_cohort": {"kind", "settings", "format"}}
      slides/<name>/     one AnnData group per completed slide (anndata.read_zarr reads it)
      manifest.json      complete, failed and pending slides (rewritten after every slide)
      .staging/          groups being written (renamed into slides/ when complete)
      .failed/<name>.json  the error of a slide that failed (cleared when it succeeds)

A slide group appears under ``slides/`` by one atomic rename once it is completely written, so a killed
job leaves either a complete group or none; rerunning the same call computes only the missing slides.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperst._constants import DEFAULT_BACKBONE
from hyperst._logging import logger
from hyperst._utils import jsonable

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from hyperst.pp._backbone import BackboneSpec
    from hyperst.pp._layout import CropGeometry

__all__ = ["CohortStore", "image_features_cohort", "read_cohort", "run_cohort"]

#: version of the store layout (a store of another version is refused, not mixed)
FORMAT = 1
#: attribute of the root group holding what the store is for
ATTRS_KEY = "hyperst_cohort"
#: attribute of each slide group: its source, rank, time and size
SLIDE_ATTRS_KEY = "hyperst_cohort_slide"
SLIDES, STAGING, FAILED, MANIFEST = "slides", ".staging", ".failed", "manifest.json"
#: gloo/NCCL collective timeout of the ``strategy="ddp"`` this module builds: ranks wait at the end for the
#: slowest one, which may be hours behind on an uneven cohort (pass a DDPStrategy object for another one)
DDP_TIMEOUT = timedelta(hours=48)


# --------------------------------------------------------------------------------------------------- store
class CohortStore:
    """A cohort store written by :func:`image_features_cohort` or ``hst.tl.predict_cohort``.

    Parameters
    ----------
    path
        The store's folder (``out`` of the call that wrote it).

    Attributes
    ----------
    path
        The folder.
    kind
        ``"image_features"`` or ``"predict"``.
    settings
        The call's settings (backbone, geometry, model digest, ...): a rerun must match them.

    Examples
    --------
    >>> store = hst.pp.read_cohort("features.zarr")  # doctest: +SKIP
    >>> store.slides, store["slide_A"]  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        record = _root_record(self.path)
        if record is None:
            raise FileNotFoundError(f"`{self.path}` is not a hyperst cohort store (no `{ATTRS_KEY}` record).")
        self.kind: str = record["kind"]
        self.settings: dict[str, Any] = record["settings"]

    @property
    def slides(self) -> list[str]:
        """Names of the completed slides, sorted."""
        return completed(self.path)

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest: ``{"kind", "settings", "complete": {name: record}, "failed": {...}, "pending": [...]}``."""
        file = self.path / MANIFEST
        return json.loads(file.read_text()) if file.exists() else build_manifest(self.path, [])

    def __len__(self) -> int:
        return len(self.slides)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (self.path / SLIDES / name).is_dir()

    def __iter__(self) -> Iterator[str]:
        return iter(self.slides)

    def __getitem__(self, name: str) -> AnnData:
        return self.read(name)

    def read(self, name: str) -> AnnData:
        """The table of one completed slide (as written: the one-process function's result)."""
        import anndata as ad

        if name not in self:
            raise KeyError(f"slide {name!r} is not complete in `{self.path}`; complete slides: {self.slides}.")
        return ad.read_zarr(self.path / SLIDES / name)

    def items(self) -> Iterator[tuple[str, AnnData]]:
        """``(name, table)`` of every completed slide, read one at a time."""
        for name in self.slides:
            yield name, self.read(name)

    def __repr__(self) -> str:
        return f"CohortStore({str(self.path)!r}, kind={self.kind!r}, slides={len(self)})"


def read_cohort(path: str | os.PathLike[str]) -> CohortStore:
    """Open a cohort store written by :func:`image_features_cohort` or ``hst.tl.predict_cohort``.

    Raises
    ------
    FileNotFoundError
        When ``path`` is not such a store.
    """
    return CohortStore(path)


def _root_record(path: Path) -> dict[str, Any] | None:
    attrs = path / ".zattrs"
    if not attrs.is_file():
        return None
    return json.loads(attrs.read_text()).get(ATTRS_KEY)


def completed(path: Path) -> list[str]:
    """Names of the slide groups under ``slides/`` (each arrived there complete, by one rename)."""
    folder = path / SLIDES
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _slide_record(path: Path, name: str) -> dict[str, Any]:
    file = path / SLIDES / name / ".zattrs"
    try:
        return dict(json.loads(file.read_text()).get(SLIDE_ATTRS_KEY, {}))
    except (OSError, ValueError):
        return {}


def _write_json(file: Path, value: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(jsonable(value), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, file)


def build_manifest(path: Path, names: Sequence[str]) -> dict[str, Any]:
    """The manifest of the store at ``path`` for the slides ``names`` of the current call."""
    record = _root_record(path) or {}
    done = completed(path)
    failed = {}
    if (path / FAILED).is_dir():
        for f in sorted((path / FAILED).glob("*.json")):
            if f.stem not in done:
                try:
                    failed[f.stem] = json.loads(f.read_text())
                except (OSError, ValueError):  # pragma: no cover - being rewritten
                    continue
    return {
        "kind": record.get("kind"),
        "settings": record.get("settings"),
        "format": record.get("format"),
        "complete": {n: _slide_record(path, n) for n in done},
        "failed": failed,
        "pending": [n for n in names if n not in done],
    }


def _write_manifest(path: Path, names: Sequence[str]) -> None:
    _write_json(path / MANIFEST, build_manifest(path, names))


# -------------------------------------------------------------------------------------------------- slides
@dataclass(frozen=True)
class Slide:
    """One input of a cohort: its name in the store and where it comes from."""

    name: str
    source: Any  # a path (str) or an in-memory object

    @property
    def path(self) -> str | None:
        return self.source if isinstance(self.source, str) else None


def _name_of(path: Path) -> str:
    name = path.name
    for suffix in (".zarr", ".h5ad"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(
            f"Slide name {name!r} cannot name a zarr group: use a non-empty string without '/' or '\\' that does "
            "not start with '.' (pass `slides` as a dict {name: path} to choose the names)."
        )
    return name


def as_slides(
    slides: Sequence[Any] | Mapping[str, Any], *, accept: tuple[type, ...], what: str
) -> list[Slide]:
    """Validate ``slides`` (paths or ``accept`` objects, as a list or a ``{name: ...}`` dict) into :class:`Slide`.

    A path's name is its folder name without ``.zarr``; an object in a list is named after the zarr store it
    was read from, else it must come in a dict (a name by position would not survive a reordered rerun).
    """
    if isinstance(slides, str | os.PathLike) or not isinstance(slides, Sequence | Mapping):
        raise TypeError(
            f"`slides` must be a list of {what} (or a dict name → {what}), got {type(slides).__name__}; "
            "for one slide pass a list of one."
        )
    items = list(slides.items()) if isinstance(slides, Mapping) else [(None, s) for s in slides]
    if not items:
        raise ValueError("`slides` is empty: pass at least one slide.")
    out: list[Slide] = []
    for name, source in items:
        if isinstance(source, str | os.PathLike):
            path = Path(source).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"`slides`: {str(path)!r} does not exist.")
            out.append(Slide(_check_name(name if name is not None else _name_of(path)), str(path.resolve())))
        elif isinstance(source, accept):
            if name is None:
                backed = getattr(source, "path", None)
                if backed is None:
                    raise ValueError(
                        f"`slides` holds an in-memory {type(source).__name__} without a name: pass a dict "
                        "{name: object} (names identify slides in the store when a run resumes), or zarr paths."
                    )
                name = _name_of(Path(backed))
            out.append(Slide(_check_name(name), source))
        else:
            raise TypeError(f"`slides` items must be {what}, got {type(source).__name__}.")
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"`slides` has several slides named {dupes}: pass a dict {{name: path}} with unique names."
        )
    return out


def read_spatialdata(source: Any) -> SpatialData:
    """A slide to work on: read from zarr, or a shallow copy of an in-memory object (its tables copied).

    The functions of a cohort write into the tables of what they get; the user's object stays as it was.
    """
    import spatialdata as sd

    if isinstance(source, str):
        return sd.read_zarr(source)
    return sd.SpatialData(images=dict(source.images), labels=dict(source.labels), points=dict(source.points),
                          shapes=dict(source.shapes), tables={k: t.copy() for k, t in source.tables.items()},
                          attrs=dict(source.attrs))


# ------------------------------------------------------------------------------------------------- running
def _fabric(device: str, devices: int | str | Sequence[int], strategy: Any, num_nodes: int) -> Any:
    """The Lightning Fabric that launches and connects the processes (one per device)."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy, SingleDeviceStrategy

    if not isinstance(device, str) or device.split(":")[0] not in ("auto", "cpu", "cuda", "gpu", "mps"):
        raise ValueError(f"`device` must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    accelerator = "cuda" if device.startswith(("cuda", "gpu")) else device.split(":")[0]
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"`num_nodes` must be a positive integer, got {num_nodes!r}.")
    if isinstance(strategy, str):
        if strategy not in ("auto", "ddp"):
            raise ValueError(
                f"`strategy` must be 'auto', 'ddp' or a lightning DDPStrategy object, got {strategy!r} (cohort "
                "processes are launched as scripts; spawn-based strategies cannot carry the slides' work)."
            )
        strategy = DDPStrategy(timeout=DDP_TIMEOUT) if strategy == "ddp" or num_nodes > 1 else "auto"
    elif type(strategy).__name__ == "DDPStrategy" and not isinstance(strategy, DDPStrategy):
        # lightning.pytorch's DDPStrategy (the one hst.tl.fit takes): the same settings for Fabric
        strategy = DDPStrategy(process_group_backend=getattr(strategy, "_process_group_backend", None),
                               timeout=getattr(strategy, "_timeout", DDP_TIMEOUT))
    elif not isinstance(strategy, DDPStrategy | SingleDeviceStrategy):
        raise TypeError(f"`strategy` must be 'auto', 'ddp' or a DDPStrategy, got {type(strategy).__name__}.")
    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"`device={device!r}, devices={devices!r}, num_nodes={num_nodes}`: {err}") from err
    if fabric.world_size > 1 and strategy == "auto":  # e.g. devices=4 on a GPU node: our DDP with its timeout
        fabric = Fabric(accelerator=accelerator, devices=devices, strategy=DDPStrategy(timeout=DDP_TIMEOUT),
                        num_nodes=num_nodes)
    return fabric


def _prepare(path: Path, kind: str, settings: Mapping[str, Any], *, overwrite: bool) -> str | None:
    """Create or check the store (rank 0): ``None`` when usable, else the error message for every rank."""
    settings = jsonable(settings)
    if path.exists() and not path.is_dir():
        return f"`out={str(path)!r}` is a file; pass a folder path (e.g. 'cohort.zarr')."
    if overwrite and path.exists():
        if _root_record(path) is None and any(path.iterdir()):
            return f"`out={str(path)!r}` is a non-empty folder that is not a cohort store: refusing to delete it."
        shutil.rmtree(path)
    record = _root_record(path)
    if record is None:
        if path.exists() and any(path.iterdir()):
            return f"`out={str(path)!r}` is a non-empty folder that is not a cohort store; pass a new path."
        import zarr

        root = zarr.open_group(str(path), mode="w", zarr_format=2)
        root.create_group(SLIDES)
        root.attrs[ATTRS_KEY] = {"kind": kind, "settings": settings, "format": FORMAT}
    else:
        same = json.dumps(record.get("settings"), sort_keys=True) == json.dumps(settings, sort_keys=True)
        if record.get("format") != FORMAT or record.get("kind") != kind or not same:
            return (
                f"`out={str(path)!r}` holds a {record.get('kind')!r} cohort with other settings "
                f"({record.get('settings')}) than this call ({settings}): resuming would mix them. Pass a new "
                "`out`, or `overwrite=True` to start again."
            )
    shutil.rmtree(path / STAGING, ignore_errors=True)  # leftovers of a killed job (the other ranks wait)
    (path / STAGING).mkdir()
    (path / FAILED).mkdir(exist_ok=True)
    return None


def _plan(path: Path, slides: Sequence[Slide]) -> tuple[list[str], str | None]:
    """The slides still to compute, and an error when a complete slide came from another source."""
    done = set(completed(path))
    for s in slides:
        if s.name in done and s.path is not None:
            source = _slide_record(path, s.name).get("source")
            if source is not None and source != s.path:
                return [], (
                    f"slide {s.name!r} in `out` was computed from {source!r}, not {s.path!r}: pass a dict "
                    f"{{name: path}} with another name, delete `{path / SLIDES / s.name}`, or `overwrite=True`."
                )
    return [s.name for s in slides if s.name not in done], None


def _write_slide(path: Path, slide: Slide, table: AnnData, record: Mapping[str, Any]) -> None:
    """Write ``table`` into the staging area, then move it into ``slides/`` with one rename."""
    import anndata as ad
    import zarr

    staging = path / STAGING / f"{slide.name}.{uuid.uuid4().hex}"
    try:
        with ad.settings.override(zarr_write_format=2):  # the store's format, whatever anndata's default
            table.write_zarr(staging)
        group = zarr.open_group(str(staging), mode="r+")
        group.attrs[SLIDE_ATTRS_KEY] = jsonable(record)
        final = path / SLIDES / slide.name
        try:
            os.replace(staging, final)  # fails on an existing (non-empty) group: slides/ is never overwritten
        except OSError:
            if not final.exists():
                raise
            # computed meanwhile by another run over the same store: keep that one
            logger.warning(f"slide {slide.name!r} already complete in `{path}`: keeping the first result")
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_cohort(
    slides: Sequence[Slide],
    *,
    out: str | os.PathLike[str],
    kind: str,
    settings: Mapping[str, Any],
    load: Callable[[Any], Any],
    work: Callable[[Any, str, bool], AnnData],
    device: str = "auto",
    devices: int | str | Sequence[int] = 1,
    strategy: Any = "auto",
    num_nodes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> CohortStore:
    """Run ``work(load(slide.source), device, progress)`` on every pending slide, spread over the processes.

    The engine of :func:`image_features_cohort` and ``hst.tl.predict_cohort``; ``settings`` is what a rerun
    on the same ``out`` must match. Slides are dealt round-robin over the ranks in input order. A slide that
    raises is recorded under ``.failed/`` and the others go on; the call then raises a :class:`RuntimeError`
    naming the failed slides on every rank (a rerun retries them).
    """
    from tqdm.auto import tqdm

    path = Path(out).expanduser().absolute()
    fabric = _fabric(device, devices, strategy, num_nodes)
    world = fabric.world_size
    in_memory = [s.name for s in slides if s.path is None]
    if world > 1 and in_memory:
        raise ValueError(
            f"`slides` {in_memory[:3]} are in-memory objects, but {world} processes each read the slides "
            "themselves: pass zarr paths (sdata.write('slide.zarr')) for a distributed run."
        )
    names = [s.name for s in slides]
    result: dict[str, Any] = {}

    def run(fabric: Any) -> None:
        rank = fabric.global_rank
        error = _prepare(path, kind, settings, overwrite=overwrite) if rank == 0 else None
        pending: list[str] = []
        if error is None and rank == 0:
            pending, error = _plan(path, slides)
            if not error:
                _write_manifest(path, names)
        error, pending = fabric.broadcast((error, pending), src=0)
        if error is not None:
            raise ValueError(error)
        mine = pending[rank::world]
        by_name = {s.name: s for s in slides}
        dev = str(fabric.device)
        skipped = len(names) - len(pending)
        if rank == 0 and skipped:
            logger.info(f"{skipped} of {len(names)} slides already complete in {path}: skipped")
        failures: list[tuple[str, BaseException]] = []
        bar = tqdm(mine, desc=f"{kind} slides (rank {rank}/{world})", disable=not progress, position=rank)
        for name in bar:
            slide = by_name[name]
            start = time.perf_counter()
            try:
                table = work(load(slide.source), dev, progress and world == 1)
                record = {"source": slide.path, "rank": rank, "world_size": world, "device": dev,
                          "n_obs": int(table.n_obs), "seconds": round(time.perf_counter() - start, 3),
                          "finished": datetime.now(UTC).isoformat(timespec="seconds")}
                _write_slide(path, slide, table, record)
                (path / FAILED / f"{name}.json").unlink(missing_ok=True)
                logger.info(f"rank {rank}: {name} done ({table.n_obs} spots, {record['seconds']:.1f} s)")
            except Exception as err:  # recorded; the other slides go on
                failures.append((name, err))
                logger.error(f"rank {rank}: slide {name!r} failed: {type(err).__name__}: {err}")
                _write_json(path / FAILED / f"{name}.json", {
                    "source": slide.path, "rank": rank, "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(limit=20),
                    "finished": datetime.now(UTC).isoformat(timespec="seconds")})
            _write_manifest(path, names)
        bar.close()
        fabric.barrier()
        if rank == 0:
            _write_manifest(path, names)
        fabric.barrier()
        failed = build_manifest(path, names)["failed"]
        failed = {n: f for n, f in failed.items() if n in by_name}
        if failed:
            local = dict(failures)
            first = next(iter(failed))
            raise RuntimeError(
                f"{len(failed)} of {len(names)} slides failed ({', '.join(sorted(failed)[:10])}); the others are "
                f"in `{path}`. First: {first}: {failed[first]['error']}. Errors and tracebacks: "
                f"`{path / MANIFEST}`; rerun the same call to retry only the failed slides."
            ) from local.get(first)
        result["store"] = CohortStore(path)

    fabric.launch(run)
    return result["store"]


# ---------------------------------------------------------------------------------------- image_features
def image_features_cohort(
    slides: Sequence[str | os.PathLike[str] | SpatialData] | Mapping[str, str | os.PathLike[str] | SpatialData],
    *,
    out: str | os.PathLike[str],
    backbone: str | BackboneSpec | Mapping[str, Any] = DEFAULT_BACKBONE,
    weights: str | os.PathLike[str] | None = None,
    allow_download: bool = False,
    random_init: bool = False,
    geometry: CropGeometry | Mapping[str, Any] | None = None,
    image_key: str | Mapping[str, str] | None = None,
    shapes_key: str | Sequence[str] | None = None,
    table_key: str | None = None,
    coordinate_system: str | None = None,
    pixel_size: float | None = None,
    spot_diameter: float | None = None,
    pitch: float | None = None,
    batch_size: int | str = "auto",
    device: str = "auto",
    devices: int | str | Sequence[int] = 1,
    strategy: str | Any = "auto",
    num_nodes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> CohortStore:
    """:func:`image_features` over many slides, spread over devices and nodes, into a resumable zarr store.

    Each process (one per device, launched by Lightning Fabric) takes its share of the slides not yet in
    ``out``, reads each one, runs :func:`image_features` on it with the same settings, and writes the table
    as one group of ``out`` (atomically: a killed job leaves complete slides only). Rerunning the same call
    computes only the missing slides. With ``devices=1`` (the default) everything runs in this process.

    Parameters
    ----------
    slides
        SpatialData zarr paths (each slide named after its folder, without ``.zarr``), or a dict
        ``{name: path}``. In one process also SpatialData objects (in a dict, or read from zarr); they are
        not modified.
    out
        Folder of the zarr store (created; reused when it holds a store of the same settings).
    backbone, weights, allow_download, random_init, geometry, batch_size
        As in :func:`image_features`. ``geometry=None`` resolves per slide (pass one geometry for a cohort of
        mixed layouts). With ``random_init=True`` every slide's random backbone is drawn from seed 0, so all
        slides and processes use the same one (tests and timing only).
    image_key, shapes_key, table_key, coordinate_system, pixel_size, spot_diameter, pitch
        As in :func:`resolve_spots`, the same for every slide.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``: the Lightning accelerator.
    devices
        Number of devices (processes) per node, or a list of device indices, as Lightning's ``devices``.
    strategy
        ``"auto"`` (one process, or DDP for several devices), ``"ddp"``, or a Lightning ``DDPStrategy``
        (e.g. to set ``timeout`` or ``process_group_backend``). Several processes are launched by re-running
        the *script* (Lightning's DDP launcher; under SLURM or torchrun the processes come from there), so a
        distributed run is a script, not a notebook.
    num_nodes
        Number of nodes.
    overwrite
        Delete an existing store at ``out`` first (default: resume it).
    progress
        Progress bars (per slide; inside a slide only with one process).

    Returns
    -------
    The :class:`CohortStore`: ``store[name]`` is the slide's table as :func:`image_features` returns it
    (``.obsm["hyperst_features_spot"]``, ``.obsm["hyperst_features_niche"]``, ...); every process returns it.

    Raises
    ------
    ValueError
        Bad arguments; ``out`` holding a store of other settings; in-memory slides with several processes.
    RuntimeError
        When slides failed (after the others are done; their errors are in ``out/manifest.json``).
    """
    import torch

    from hyperst.pp._backbone import resolve_backbone_spec
    from hyperst.pp._features import image_features
    from hyperst.pp._layout import CropGeometry

    if isinstance(backbone, torch.nn.Module):
        raise TypeError(
            "`backbone` must be a name, a BackboneSpec or its dict for a cohort (each process builds its own); "
            "save a fine-tuned module's weights and pass `weights=` instead."
        )
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive integer or 'auto', got {batch_size!r}.")
    from spatialdata import SpatialData

    items = as_slides(slides, accept=(SpatialData,), what="SpatialData zarr paths")
    spec = resolve_backbone_spec(backbone)
    if weights is not None:
        spec.weights = str(weights)
    geom = geometry if geometry is None or isinstance(geometry, CropGeometry) else CropGeometry.from_dict(geometry)
    options = {"image_key": image_key, "shapes_key": shapes_key, "table_key": table_key,
               "coordinate_system": coordinate_system, "pixel_size": pixel_size, "spot_diameter": spot_diameter,
               "pitch": pitch}
    settings = {"backbone": spec.to_dict(), "random_init": bool(random_init),
                "geometry": None if geom is None else geom.to_dict(), "batch_size": batch_size, **options}

    def work(sdata: SpatialData, dev: str, inner_progress: bool) -> AnnData:
        def call() -> AnnData:
            return image_features(sdata, backbone=spec.to_dict(), allow_download=allow_download,
                                  random_init=random_init, geometry=geom, batch_size=batch_size, device=dev,
                                  progress=inner_progress, **options)
        if not random_init:
            return call()
        with torch.random.fork_rng(devices=[]):  # the same random backbone on every slide and rank
            torch.manual_seed(0)
            return call()

    return run_cohort(items, out=out, kind="image_features", settings=settings, load=read_spatialdata, work=work,
                      device=device, devices=devices, strategy=strategy, num_nodes=num_nodes, overwrite=overwrite,
                      progress=progress)
