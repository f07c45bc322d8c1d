"""Helpers shared across hyperst's sub-packages (numpy-level; torch is imported only where needed).

What two modules share lives here (or in the ``_utils`` module of their sub-package), so that no module
imports a private name of another one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "BatchSizer",
    "centers_hash",
    "jsonable",
    "lazy_module",
    "pearson_per_gene",
    "release_memory",
    "resolve_device",
    "restore_on_error",
    "spot_pitch",
]


def lazy_module(
    name: str, table: Mapping[str, str], namespace: dict[str, Any], public: list[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` of a package whose members load on first use (spatialdata's pattern).

    Parameters
    ----------
    name
        The package (for the error message).
    table
        Member name → module that defines it.
    namespace
        The package's ``globals()``: a loaded member is cached there.
    public
        The package's ``__all__``.
    """

    def getattr_(attr: str) -> Any:
        if attr in table:
            value = getattr(importlib.import_module(table[attr]), attr)
            namespace[attr] = value
            return value
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    def dir_() -> list[str]:
        return sorted(public)

    return getattr_, dir_


def centers_hash(centers_px: np.ndarray) -> str:
    """Stable hash of spot centres (for cache keys).

    Parameters
    ----------
    centers_px
        ``(n, 2)`` centres.

    Returns
    -------
    A hex digest of the float64 values and the shape.
    """
    arr = np.ascontiguousarray(np.asarray(centers_px, dtype=np.float64))
    m = hashlib.sha256()
    m.update(repr(arr.shape).encode())
    m.update(arr.tobytes())
    return m.hexdigest()[:24]


def jsonable(value: Any, *, drop_none: bool = False) -> Any:
    """Convert numpy/torch scalars and arrays (recursively) to plain Python for JSON.

    Non-finite floats become ``None``. With ``drop_none``, mapping entries whose value is ``None`` are
    left out (h5ad cannot store None).
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, drop_none=drop_none) for k, v in value.items() if not (drop_none and v is None)}
    if isinstance(value, list | tuple):
        return [jsonable(v, drop_none=drop_none) for v in value]
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to :class:`torch.device`.

    Raises
    ------
    ValueError
        For ``"cuda"`` on a machine without CUDA, or a string torch does not know as a device.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device={device!r}` is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device={device!r}` but CUDA is not available on this machine; use 'cpu' or 'auto'.")
    return dev


def spot_pitch(xy: np.ndarray) -> float:
    """Lattice pitch of spot centres: median over spots of the median distance to their 4 nearest spots.

    On hexagonal and square lattices the 4 nearest spots of an interior spot are first-ring neighbours,
    so this is robust to positional jitter (which biases the plain nearest-neighbour distance low) and to
    border spots (3 of their 4 nearest are still first-ring). ``nan`` with fewer than two spots.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        return float("nan")
    k = min(4, len(xy) - 1)
    d, _ = cKDTree(xy).query(xy, k=k + 1)
    return float(np.median(np.median(np.asarray(d).reshape(len(xy), k + 1)[:, 1:], axis=1)))


def pearson_per_gene(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``truth`` with the same column of ``prediction``.

    Genes with zero variance on either side get ``r = 0`` (the reference replaces NaN by 0); "zero"
    allows for rounding, since a tiled mean is not bit-exactly constant.

    Parameters
    ----------
    truth, prediction
        ``(n_spots, n_genes)`` arrays.

    Returns
    -------
    ``(n_genes,)`` float64 array in [-1, 1].
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(prediction, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 2:
        raise ValueError(f"`truth` and `prediction` must be 2-d of the same shape, got {t.shape} and {p.shape}.")
    tm, pm = t.mean(axis=0), p.mean(axis=0)
    tc, pc = t - tm, p - pm
    num = (tc * pc).sum(axis=0)
    tss, pss = (tc * tc).sum(axis=0), (pc * pc).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / np.sqrt(tss * pss)
    n = max(len(t), 1)
    constant = (tss <= n * (1e-12 * (1 + np.abs(tm))) ** 2) | (pss <= n * (1e-12 * (1 + np.abs(pm))) ** 2)
    r[constant | ~np.isfinite(r)] = 0.0
    return np.clip(r, -1.0, 1.0)


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL("libc.so.6")


def release_memory(*, collect: bool = True) -> None:
    """Hand freed heap pages back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold to the size of the largest buffer freed so far, after which
    crop-sized buffers (megabytes each) come from the heap and fragment it: a stream of batches then
    grows the resident set although nothing stays alive (measured in ``benchmarks/memory.py``). Long
    loops call this every few batches; the benchmark after every job (each builds and drops about ten
    networks and Trainers: without it a long benchmark grew by ≈ 0.2 GB per job).

    Parameters
    ----------
    collect
        Run the garbage collector first (for freed cycles, e.g. networks and Trainers).
    """
    if collect:
        import gc

        gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl)
            _libc().malloc_trim(0)


@contextmanager
def restore_on_error(objects: Iterable[Any]) -> Iterator[None]:
    """Leave the user's AnnData / SpatialData objects as they were when the body raises.

    A call that fails half way (e.g. ``fit`` after it built the niche graph, or ``predict`` after it placed
    pseudo-spots) must not leave half its results behind. Snapshots are shallow where hyperst only adds or
    replaces entries (``.obsm``, ``.obsp``, ``.layers``, elements of a SpatialData) and copies ``.obs``,
    ``.var`` and ``.uns["hyperst"]``.
    """
    objects = list(objects)
    snapshots = [_snapshot(o) for o in objects]
    try:
        yield
    except BaseException:
        for obj, snap in zip(objects, snapshots, strict=True):
            _restore(obj, snap)
        raise


def _snapshot(obj: Any) -> dict[str, Any]:
    import copy

    if hasattr(obj, "obsm"):  # AnnData
        uns = dict(obj.uns)
        if "hyperst" in uns:
            uns["hyperst"] = copy.deepcopy(uns["hyperst"])
        return {"obs": obj.obs.copy(), "var": obj.var.copy(), "obsm": dict(obj.obsm), "obsp": dict(obj.obsp),
                "layers": dict(obj.layers), "uns": uns}
    if hasattr(obj, "tables"):  # SpatialData
        return {"elements": {kind: dict(getattr(obj, kind)) for kind in ("images", "labels", "points", "shapes")},
                "tables": dict(obj.tables), "table_state": {k: _snapshot(t) for k, t in obj.tables.items()}}
    return {}


def _restore(obj: Any, snap: dict[str, Any]) -> None:
    if not snap:
        return
    if "obsm" in snap:
        obj.obs = snap["obs"]
        obj.var = snap["var"]
        for name in ("obsm", "obsp", "layers"):
            store = getattr(obj, name)
            for key in [k for k in store if k not in snap[name]]:
                del store[key]
            for key, value in snap[name].items():
                if key not in store or store[key] is not value:
                    store[key] = value
        for key in [k for k in obj.uns if k not in snap["uns"]]:
            del obj.uns[key]
        obj.uns.update(snap["uns"])
        return
    for kind, before in snap["elements"].items():
        store = getattr(obj, kind)
        for key in [k for k in store if k not in before]:
            del store[key]
    for key in [k for k in obj.tables if k not in snap["tables"]]:
        del obj.tables[key]
    for key, table in snap["tables"].items():
        if key not in obj.tables or obj.tables[key] is not table:
            obj.tables[key] = table
        _restore(table, snap["table_state"][key])


class BatchSizer:
    """Forward passes in batches that back off on CUDA out-of-memory instead of crashing.

    :meth:`run` calls ``fn(start, stop)`` over ``[0, n)`` in batches of :attr:`size`; when a batch raises
    ``torch.cuda.OutOfMemoryError`` the CUDA cache is emptied, the size halves (kept for later calls, so one
    slide's back-off serves the next) and the same rows are tried again. A batch of one that does not fit
    raises a ``MemoryError`` saying what to do.

    Parameters
    ----------
    size
        Rows per forward pass to start with.
    what
        What the rows are, for the messages (``"crops"``, ``"spots"``).
    """

    def __init__(self, size: int, *, what: str = "rows") -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {size!r}.")
        self.size = size
        self.what = what
        self.backoffs = 0

    def run(self, fn: Callable[[int, int], Any], n: int) -> Iterator[Any]:
        """Yield ``fn(start, stop)`` for consecutive batches covering ``[0, n)``."""
        import torch

        from hyperst._logging import logger

        start = 0
        while start < n:
            stop = min(start + self.size, n)
            try:
                out = fn(start, stop)
            except torch.cuda.OutOfMemoryError:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if stop - start == 1:
                    raise MemoryError(
                        f"One batch of 1 {self.what[:-1] if self.what.endswith('s') else self.what} does not fit "
                        "in GPU memory; free the GPU (other processes), use a smaller backbone or run on CPU "
                        "(`device='cpu'`)."
                    ) from None
                self.size = max(1, (stop - start) // 2)
                self.backoffs += 1
                logger.warning(f"CUDA out of memory with {stop - start} {self.what} per batch: continuing with "
                               f"{self.size}")
                continue
            yield out
            start = stop
