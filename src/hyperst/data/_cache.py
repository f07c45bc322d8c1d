"""On-disk cache of uint8 crops (numpy only): one directory of ``.npy`` files per key, memory-mapped on load."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hyperst._utils import centers_hash

__all__ = ["CropCache", "RowWriter"]


class RowWriter:
    """Writes rows of a ``.npy`` array on disk in any order, without mapping the file into memory.

    The file is created at its full size (sparse where the file system allows), then rows are written
    with plain file writes: the written data go to the operating system's page cache, not to this
    process's memory, so a large array is filled with bounded resident memory (a writable
    :class:`numpy.memmap` would keep every touched page resident until it is unmapped).

    Parameters
    ----------
    path
        The ``.npy`` file to create.
    shape
        Array shape; rows are along the first axis.
    dtype
        Array dtype.
    """

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, ...], dtype: Any = np.uint8) -> None:
        self.path = Path(path)
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        header = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)
        self._offset = int(header.offset)
        del header  # nothing was touched: the data part of the file is a hole
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._file: Any = open(self.path, "r+b")  # noqa: SIM115 - closed by close()

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` to row ``rows[i]``.

        Parameters
        ----------
        rows
            ``(b,)`` row indices.
        values
            ``(b, *shape[1:])`` values, cast to the array dtype.

        Raises
        ------
        ValueError
            If shapes disagree or a row is out of range.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.shape != (len(rows), *self.shape[1:]):
            raise ValueError(f"RowWriter: values of shape {values.shape} for {len(rows)} rows of {self.shape}.")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise ValueError(f"RowWriter: rows must lie in [0, {self.shape[0]}).")
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        cut = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(np.arange(len(rows)), cut):
            if len(run):
                self._file.seek(self._offset + int(rows[run[0]]) * self._row_bytes)
                self._file.write(memoryview(values[run[0] : run[-1] + 1]).cast("B"))

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):  # e.g. a CropGeometry
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"CropCache key: cannot serialise {type(o).__name__}; use str/int/float/list/dict.")


class CropCache:
    """On-disk cache of uint8 crops, named by a stable hash of a key.

    The entry is the directory ``<directory>/crops-<hash>`` holding one ``.npy`` per array (e.g.
    ``spot.npy``, ``niche.npy``, ``pad.npy``) and ``key.json``. Entries are written to a staging
    directory and renamed into place, so a half-written entry is never loaded.

    Parameters
    ----------
    directory
        Cache root (created when saving).
    key
        JSON-serialisable mapping identifying the crops, e.g. from :meth:`make_key`.
    """

    def __init__(self, directory: str | os.PathLike[str], key: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.key = dict(key)
        self._key_json = json.dumps(self.key, sort_keys=True, default=_json_default)
        self.hash = hashlib.sha256(self._key_json.encode()).hexdigest()[:20]
        self._staging: Path | None = None
        self._writers: list[RowWriter] = []

    @staticmethod
    def make_key(geometry: Any, image_id: str, centers_px: np.ndarray, **extra: Any) -> dict[str, Any]:
        """Standard key: crop geometry, image identity and a hash of the centres.

        Parameters
        ----------
        geometry
            The crop geometry (a :class:`hyperst.pp.CropGeometry`, or anything with ``to_dict()``).
        image_id
            Identity of the image, e.g. :func:`image_fingerprint` or a path plus element name.
        centers_px
            ``(n, 2)`` level-0 centres.
        **extra
            Further JSON-serialisable entries (pixel size, fill, …).

        Returns
        -------
        The key.
        """
        return {
            "geometry": geometry.to_dict(),
            "image": str(image_id),
            "centers": centers_hash(centers_px),
            "n": len(centers_px),
            **extra,
        }

    @property
    def path(self) -> Path:
        """Directory of this entry."""
        return self.directory / f"crops-{self.hash}"

    def exists(self) -> bool:
        """Whether the entry has been saved.

        Returns
        -------
        ``True`` when the entry's ``key.json`` exists.
        """
        return (self.path / "key.json").is_file()

    def load(self) -> dict[str, np.ndarray] | None:
        """Arrays of the entry, memory-mapped read-only, or ``None`` when absent.

        Returns
        -------
        ``{name: array}`` or ``None``.

        Raises
        ------
        ValueError
            If the stored key differs from this cache's key (hash collision or tampering).
        """
        if not self.exists():
            return None
        stored = (self.path / "key.json").read_text()
        if json.loads(stored) != json.loads(self._key_json):
            raise ValueError(f"CropCache: {self.path} holds a different key; delete it.")
        return {p.stem: np.load(p, mmap_mode="r") for p in sorted(self.path.glob("*.npy"))}

    def _stage(self) -> Path:
        if self._staging is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._staging = self.directory / f".staging-{self.hash}-{uuid.uuid4().hex[:8]}"
            self._staging.mkdir()
        return self._staging

    def allocate(self, name: str, shape: tuple[int, ...], dtype: Any = np.uint8) -> np.memmap:
        """Writable ``.npy`` memmap in the staging directory (fill it, then :meth:`commit`).

        Parameters
        ----------
        name
            Array name (file stem).
        shape
            Array shape.
        dtype
            Array dtype.

        Returns
        -------
        The memmap.
        """
        return np.lib.format.open_memmap(self._stage() / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    def writer(self, name: str, shape: tuple[int, ...], dtype: Any = np.uint8) -> RowWriter:
        """A :class:`RowWriter` of a ``.npy`` array in the staging directory (fill it, then :meth:`commit`).

        Unlike :meth:`allocate`, the array is never mapped into memory while it is written.

        Parameters
        ----------
        name
            Array name (file stem).
        shape
            Array shape.
        dtype
            Array dtype.

        Returns
        -------
        The writer (closed by :meth:`commit`).
        """
        w = RowWriter(self._stage() / f"{name}.npy", shape, dtype)
        self._writers.append(w)
        return w

    def commit(self) -> Path:
        """Move the staged arrays into place (replacing an existing entry).

        Returns
        -------
        The entry directory.

        Raises
        ------
        RuntimeError
            If nothing was staged.
        """
        if self._staging is None:
            raise RuntimeError("CropCache.commit: nothing staged; call allocate(), writer() or save() first.")
        for w in self._writers:
            w.close()
        self._writers = []
        (self._staging / "key.json").write_text(self._key_json)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self._staging, self.path)
        self._staging = None
        return self.path

    def save(self, **arrays: np.ndarray) -> Path:
        """Write arrays (e.g. ``spot=..., niche=..., pad=...``) as an entry.

        Parameters
        ----------
        **arrays
            Arrays to store, by name.

        Returns
        -------
        The entry directory.

        Raises
        ------
        ValueError
            If no arrays are given.
        """
        if not arrays:
            raise ValueError("CropCache.save: pass arrays, e.g. save(spot=..., niche=..., pad=...).")
        stage = self._stage()
        for name, arr in arrays.items():
            np.save(stage / f"{name}.npy", np.asarray(arr))
        return self.commit()

    def clear(self) -> None:
        """Delete the entry (and any staging directory of this object)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.path)
        for w in self._writers:
            w.close()
        self._writers = []
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
