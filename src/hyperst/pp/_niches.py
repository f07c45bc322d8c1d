"""Spot niches (:func:`hyperst.pp.niches`): neighbour graph, then niche expression.

A niche is a spot together with its immediate neighbours (METHOD §1): 6 on the Visium hexagonal
lattice, 8 (the 3×3 block) on the legacy ST square grid. The two steps are separate:

1. **the graph** — built here with :class:`scipy.spatial.cKDTree` from the spot layout, or taken as it
   is from any ``.obsp`` connectivity matrix (``connectivity_key=``, e.g. squidpy's
   ``"spatial_connectivities"``);
2. **the aggregation** — :func:`aggregate_niches`, the one niche-expression rule
   (log2(1 + mean raw counts over the spot and its neighbours)), also used by :func:`niche_targets` for
   the niche targets of :func:`hyperst.tl.fit`.

hyperst builds its own graph rather than calling :func:`squidpy.gr.spatial_neighbors`: squidpy's grid
mode takes the ``n_neighs`` nearest spots and cuts at 1.3 × the *global* median distance, stores ring
numbers instead of distances, and ``spatial_neighbors`` is deprecated since squidpy 1.7 (removed in
1.9) while its replacements do not exist in the older squidpy versions hyperst supports. The result is
stored the squidpy way (``.obsp[f"{Key.OBSP_NICHE_PREFIX}_connectivities"]`` and ``..._distances``), so
squidpy/scanpy tools that take a ``connectivity_key`` can use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst._utils import spot_pitch
from hyperst.pp._utils import check_counts, counts_matrix, layer_name, libraries, uns_block, validate_gene_list

__all__ = ["aggregate_niches", "niche_targets", "niches"]

_LAYOUTS = ("auto", "visium", "st", "radius", "knn")
_INCOMPLETE = ("keep", "drop", "mark")
#: neighbours of a complete niche, per lattice
_EXPECTED = {"visium": 6, "st": 8}
#: graph radius in units of the pitch, midway between the last neighbour ring kept and the next one:
#: hexagon (1 | √3), square (√2 | 2)
_RADIUS_FACTOR = {"visium": (1.0 + np.sqrt(3.0)) / 2.0, "st": (np.sqrt(2.0) + 2.0) / 2.0}
#: neighbours counted "at the pitch" for auto-detection: midway between 1 and √2
_DETECT_FACTOR = (1.0 + np.sqrt(2.0)) / 2.0
_ARRAY_ROW, _ARRAY_COL = "array_row", "array_col"
_GENE_CHUNK = 2048


def niches(
    adata: AnnData,
    *,
    layout: Literal["auto", "visium", "st", "radius", "knn"] = "auto",
    radius: float | None = None,
    n_neighs: int | None = None,
    connectivity_key: str | None = None,
    library_key: str | None = None,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    incomplete: Literal["keep", "drop", "mark"] = "keep",
    scale: Literal["auto", "counts", "log2p1"] = "auto",
    copy: bool = False,
) -> AnnData | None:
    """Build the niche of every spot and its niche expression.

    The niche of a spot is the spot and its immediate neighbours. Neighbours never cross samples: with
    ``library_key`` the graph is built per sample. The niche expression is
    log2(1 + mean raw count over the niche members), computed by :func:`aggregate_niches` as
    ``((A + I) @ X) / size`` with sparse matrices.

    Layouts:

    ``"visium"``
        Hexagonal lattice, 6 neighbours. With integer ``obs["array_row"]``/``obs["array_col"]`` (Visium
        convention: columns doubled, ``row + col`` of one parity) neighbours are exact lattice
        neighbours; otherwise spots within ``(1 + √3)/2`` pitches of ``obsm["spatial"]``, the pitch
        being :func:`hyperst._utils.spot_pitch` of the sample (median over spots of the median distance
        to their 4 nearest spots).
    ``"st"``
        Square grid, 8 neighbours (3×3 block, diagonals included): from the array coordinates, or within
        ``(√2 + 2)/2`` pitches.
    ``"radius"``
        Every spot within ``radius`` (units of ``obsm["spatial"]``); a niche is "complete" when it has
        as many neighbours as the best-connected spot of its sample.
    ``"knn"``
        The ``n_neighs`` nearest spots (row ``i`` of the graph lists the neighbours of spot ``i``; the
        graph is not symmetrised). Every niche is complete.
    ``"auto"`` (default)
        Per sample: the layout recorded by a hyperst reader in ``.uns[Key.UNS][Key.UNS_SPOTS]`` when it
        is ``"visium"``/``"st"``; else the parity of integer array coordinates (one parity → hexagonal);
        else the geometry of ``obsm["spatial"]`` (spots with 5–6 neighbours at the pitch → hexagonal,
        with 4 → square). Raises when none of these decides.

    With ``layout="visium"``/``"st"``, an explicit ``radius`` replaces the lattice rule (radius graph on
    ``obsm["spatial"]``, complete = 6 or 8 neighbours).

    With ``connectivity_key``, no graph is built: the existing matrix ``.obsp[connectivity_key]`` (e.g.
    ``"spatial_connectivities"`` from :func:`squidpy.gr.spatial_neighbors`) is the graph. Every non-zero
    entry off the diagonal is a neighbour, whatever its weight; a niche is "complete" when it has as
    many neighbours as the best-connected spot of its sample (as for ``"radius"``).

    Parameters
    ----------
    adata
        AnnData (e.g. the table of a SpatialData) with spot centres in ``obsm["spatial"]`` (any unit;
        optional with ``connectivity_key``) and raw counts in ``.X`` or ``layer``.
    layout
        Neighbourhood rule, see above.
    radius
        Radius for ``layout="radius"`` (required) or override for ``"visium"``/``"st"``/``"auto"``, in
        the units of ``obsm["spatial"]``.
    n_neighs
        Number of neighbours for ``layout="knn"`` (required there, refused elsewhere).
    connectivity_key
        ``.obsp`` key of an existing ``(n_obs, n_obs)`` neighbour graph to aggregate over instead of
        building one; ``layout`` must then stay ``"auto"`` and ``radius``/``n_neighs`` ``None``.
    library_key
        ``obs`` column naming the sample of each spot; graphs never connect different samples (a given
        graph that does is used as it is, with a warning).
    layer
        Layer holding the raw counts (or, see ``scale``, the log2(1 + counts) values); ``None`` uses ``.X``.
    genes
        Genes of the niche expression, in column order; ``None`` uses all genes.
    scale
        What the values in ``.X``/``layer`` are. ``"counts"``: raw counts. ``"log2p1"``: log2(1 + counts),
        the scale of :func:`hyperst.tl.predict`'s prediction, interval ends and observed layer; they are
        turned back into (expected) counts ``2**x - 1`` before the niche mean, so the niche expression of a
        prediction is on the same scale as that of measured counts. ``"auto"`` (default): ``"log2p1"`` for
        the prediction tables of :func:`hyperst.tl.predict` (``.uns["hyperst"]["predict"]``) when the values
        read are a prediction (``.X`` when the prediction is there; ``"hyperst_pred"``, ``"hyperst_lower"``,
        ``"hyperst_upper"``, ``"hyperst_observed"``), else ``"counts"`` (e.g. the measured counts that a
        prediction table keeps in ``.X``).
    incomplete
        What to do with spots whose niche misses neighbours (at the tissue or array border):
        ``"keep"`` (default) keeps them with the neighbours that exist; ``"mark"`` does the same but
        warns, leaving the choice to later filtering on ``obs[Key.OBS_NICHE_COMPLETE]``; ``"drop"``
        (ref behaviour) removes those spots, subsetting ``adata`` in place like
        :func:`scanpy.pp.filter_cells` (or the returned copy with ``copy=True``). The niche expression
        of the kept spots still averages over all their neighbours, dropped ones included, while
        ``.obsp`` is restricted to the kept spots (edges to removed spots disappear with them).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes:

    - ``.obsp[Key.OBSP_NICHE_CONNECTIVITIES]``: binary adjacency (CSR, float32, no self loops; with
      ``connectivity_key`` the binarised given graph);
    - ``.obsp[Key.OBSP_NICHE_DISTANCES]``: Euclidean neighbour distances in ``obsm["spatial"]`` units
      (not written when ``connectivity_key`` is given and ``obsm["spatial"]`` is absent);
    - ``.obsm[Key.OBSM_NICHE_EXPRESSION]``: dense ``float32`` ``(n_obs, n_genes)``;
    - ``.obs[Key.OBS_NICHE_SIZE]`` (members, self included) and ``.obs[Key.OBS_NICHE_COMPLETE]``;
    - ``.uns[Key.UNS][Key.UNS_NICHES]``: the gene order, the resolved layout/radius per sample, the
      parameters and the number of incomplete niches.

    Raises
    ------
    ValueError
        If ``obsm["spatial"]`` is missing or not finite, spots share a position, the options conflict,
        the layout cannot be detected, ``connectivity_key`` is not a square ``.obsp`` matrix,
        ``library_key``/``layer``/``genes``/``scale`` are invalid, or the values are negative or not finite
        (or are not expression, such as the prediction's standard deviation ``"hyperst_std"``).
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    if layout not in _LAYOUTS:
        raise ValueError(f"`layout` must be one of {_LAYOUTS}, got {layout!r}.")
    if incomplete not in _INCOMPLETE:
        raise ValueError(f"`incomplete` must be one of {_INCOMPLETE}, got {incomplete!r}.")
    if connectivity_key is not None:
        if layout != "auto" or radius is not None or n_neighs is not None:
            raise ValueError(
                "`connectivity_key` gives the graph: leave `layout`='auto', `radius`=None and `n_neighs`=None."
            )
        if connectivity_key not in adata.obsp:
            raise ValueError(
                f"`connectivity_key`={connectivity_key!r} is not in adata.obsp (available: {list(adata.obsp.keys())})."
            )
    if radius is not None and (
        isinstance(radius, bool) or not np.isfinite(radius) or not float(radius) > 0 or layout == "knn"
    ):
        raise ValueError(f"`radius` must be a positive number and is not used with layout='knn', got {radius!r}.")
    if layout == "radius" and radius is None:
        raise ValueError("layout='radius' needs `radius` (in the units of obsm['spatial']).")
    if layout == "knn":
        if isinstance(n_neighs, bool) or not isinstance(n_neighs, int | np.integer) or n_neighs < 1:
            raise ValueError(f"layout='knn' needs `n_neighs`, a positive integer, got {n_neighs!r}.")
    elif n_neighs is not None:
        raise ValueError(f"`n_neighs` is only used with layout='knn' (got layout={layout!r}).")
    if adata.n_obs == 0:
        raise ValueError("`adata` has no observations (spots).")

    libs = libraries(adata, library_key)
    coords = None if connectivity_key is not None and Key.OBSM_SPATIAL not in adata.obsm else _coordinates(adata)
    gene_names = (
        list(adata.var_names) if genes is None else validate_gene_list(genes, adata.var_names, argument="genes")
    )
    counts = counts_matrix(adata, layer, cols=adata.var_names.get_indexer(gene_names))
    value_scale = _value_scale(adata, layer, scale)
    if value_scale == "log2p1":
        counts = _expected_counts(counts, layer_name(layer))
    else:
        check_counts(counts, layer_name(layer))

    # ---------------------------------------------------------------- graph
    if connectivity_key is None:
        rows, cols, expected, resolved = _layout_edges(
            adata, coords, libs, layout=layout, radius=radius, n_neighs=n_neighs, library_key=library_key
        )
    else:
        rows, cols, expected, resolved = _given_edges(adata, connectivity_key, libs, library_key)
    n = adata.n_obs
    conn = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n))
    conn.sum_duplicates()
    conn.data[:] = 1.0
    conn.sort_indices()
    dst = None
    if coords is not None:
        dist = np.linalg.norm(coords[rows] - coords[cols], axis=1)
        dst = sparse.csr_matrix((dist, (rows, cols)), shape=(n, n))
        dst.sum_duplicates()
        dst.sort_indices()

    degree = np.diff(conn.indptr)
    size = degree + 1
    complete = degree >= expected
    n_incomplete = int((~complete).sum())

    # ---------------------------------------------------------------- niche expression (chunks of genes)
    members, member_size = _members(conn)
    expr = np.empty((n, len(gene_names)), dtype=np.float32)
    for start in range(0, len(gene_names), _GENE_CHUNK):
        expr[:, start : start + _GENE_CHUNK] = _aggregate(members, member_size, counts[:, start : start + _GENE_CHUNK])

    # ---------------------------------------------------------------- write
    if copy:
        adata = adata.copy()
    adata.obsp[Key.OBSP_NICHE_CONNECTIVITIES] = conn
    if dst is not None:
        adata.obsp[Key.OBSP_NICHE_DISTANCES] = dst.astype(np.float64)
    elif Key.OBSP_NICHE_DISTANCES in adata.obsp:
        del adata.obsp[Key.OBSP_NICHE_DISTANCES]  # stale: it belonged to an earlier graph
    adata.obsm[Key.OBSM_NICHE_EXPRESSION] = expr
    adata.obs[Key.OBS_NICHE_SIZE] = size.astype(np.int64)
    adata.obs[Key.OBS_NICHE_COMPLETE] = complete

    msg = f"niches: {n_incomplete} of {n} spots have an incomplete niche"
    if incomplete == "mark" and n_incomplete:
        logger.warning(f"{msg}; they are kept and marked in obs[{Key.OBS_NICHE_COMPLETE!r}].")
    elif incomplete == "drop":
        logger.info(f"{msg}; dropping them.")
    else:
        logger.info(f"{msg}; kept with the neighbours that exist.")

    record: dict[str, Any] = {
        "layout": layout,
        "incomplete": incomplete,
        "genes": list(gene_names),
        "n_incomplete": n_incomplete,
        "n_dropped": n_incomplete if incomplete == "drop" else 0,
        "scale": value_scale,
        "libraries": resolved,
        "connectivities_key": Key.OBSP_NICHE_CONNECTIVITIES,
    }
    if dst is not None:
        record["distances_key"] = Key.OBSP_NICHE_DISTANCES
    for name, value in (
        ("radius", radius),
        ("n_neighs", n_neighs),
        ("connectivity_key", connectivity_key),
        ("library_key", library_key),
        ("layer", layer),
    ):
        if value is not None:
            record[name] = value
    uns_block(adata)[Key.UNS_NICHES] = record

    if incomplete == "drop" and n_incomplete:
        adata._inplace_subset_obs(complete)
    return adata if copy else None


def aggregate_niches(counts: np.ndarray | sparse.spmatrix, connectivities: sparse.spmatrix | np.ndarray) -> np.ndarray:
    """Niche expression: log2(1 + mean raw counts over each spot and its neighbours).

    The one niche-aggregation rule of hyperst (:func:`niches`, :func:`niche_targets`): with ``A`` the
    binarised graph (without self loops) and ``X`` the counts, ``log2(1 + ((A + I) @ X) / size)``,
    ``size`` being the row sums of ``A + I``, computed in float64 and returned as float32.

    Parameters
    ----------
    counts
        Raw counts ``(n_spots, n_genes)``, dense or sparse.
    connectivities
        Any ``(n_spots, n_spots)`` neighbour graph (e.g. ``.obsp["hyperst_niche_connectivities"]`` from
        :func:`niches`, or squidpy's ``.obsp["spatial_connectivities"]``): every non-zero entry off the
        diagonal makes a neighbour, whatever its weight; the spot itself is always a member, once (a
        stored diagonal is ignored).

    Returns
    -------
    ``(n_spots, n_genes)`` float32.

    Raises
    ------
    ValueError
        If ``connectivities`` is not ``(n_spots, n_spots)``.
    """
    conn = sparse.csr_matrix(connectivities)
    n = counts.shape[0]
    if conn.shape != (n, n):
        raise ValueError(f"`connectivities` has shape {conn.shape}; expected ({n}, {n}) for {n} spots.")
    members, size = _members(conn)
    return _aggregate(members, size, counts)


def niche_targets(
    adata: AnnData, genes: Sequence[str], *, layer: str | None = None, library_key: str | None = None
) -> np.ndarray:
    """log2(1 + mean raw counts over each niche) of ``genes``, always from the current counts.

    The niche graph in ``.obsp[Key.OBSP_NICHE_CONNECTIVITIES]`` (from :func:`niches`, with the user's
    layout options or ``connectivity_key``) is used when present; otherwise :func:`niches` builds it (per
    ``library_key``) and writes its documented keys.

    Parameters
    ----------
    adata
        AnnData with spot centres in ``obsm["spatial"]`` and raw counts in ``.X`` or ``layer``.
    genes
        Gene names, in output column order.
    layer
        Layer holding the raw counts; ``None`` uses ``.X``.
    library_key
        ``obs`` column naming the sample of each spot (only used when the graph is built here).

    Returns
    -------
    ``(n_obs, len(genes))`` float32, as :func:`aggregate_niches`.
    """
    if Key.OBSP_NICHE_CONNECTIVITIES not in adata.obsp:
        niches(adata, genes=list(genes), layer=layer, library_key=library_key)
    counts = counts_matrix(adata, layer, pd.Index(genes))
    check_counts(counts, "counts")
    return aggregate_niches(counts, adata.obsp[Key.OBSP_NICHE_CONNECTIVITIES])


# --------------------------------------------------------------------------------------- helpers
#: layers of a prediction table (hst.tl.predict) that hold expression on the log2(1 + counts) scale
_LOG_LAYERS = (Key.LAYER_PRED, Key.LAYER_LOWER, Key.LAYER_UPPER, Key.LAYER_OBSERVED)


def _value_scale(adata: AnnData, layer: str | None, scale: str) -> str:
    """``"counts"`` or ``"log2p1"``: what the values read from ``.X``/``layer`` are (see :func:`niches`)."""
    if scale not in ("auto", "counts", "log2p1"):
        raise ValueError(f"`scale` must be 'auto', 'counts' or 'log2p1', got {scale!r}.")
    block = adata.uns.get(Key.UNS)
    record = block.get(Key.UNS_PREDICT) if isinstance(block, Mapping) else None
    if layer == Key.LAYER_STD and isinstance(record, Mapping):
        raise ValueError(
            f"`layer={layer!r}` holds the prediction's standard deviation, not expression; pass "
            f"layer={Key.LAYER_PRED!r} (or None when the prediction is in .X)."
        )
    if scale != "auto":
        return scale
    if not isinstance(record, Mapping):
        return "counts"
    if layer is None:
        return "log2p1" if record.get("layer") == "X" else "counts"
    return "log2p1" if layer in _LOG_LAYERS else "counts"


def _expected_counts(values: np.ndarray | sparse.spmatrix, where: str) -> np.ndarray | sparse.csr_matrix:
    """``2**x - 1`` of log2(1 + counts) values (float64; sparse stays sparse), checked to be finite and ≥ 0."""
    data = values.data if sparse.issparse(values) else np.asarray(values)
    if data.dtype.kind not in "biuf":
        raise ValueError(f"{where} has dtype {data.dtype}; log2(1 + counts) values must be numeric.")
    if not np.isfinite(data).all() or (data < 0).any():
        raise ValueError(
            f"{where} holds negative or non-finite values, but log2(1 + counts) values are finite and ≥ 0; pass "
            "scale='counts' if it holds raw counts, or the layer that holds log2(1 + counts)."
        )
    if sparse.issparse(values):
        out = sparse.csr_matrix(values, dtype=np.float64, copy=True)
        out.data = np.exp2(out.data) - 1.0
        return out
    return np.exp2(np.asarray(values, dtype=np.float64)) - 1.0



def _members(conn: sparse.csr_matrix) -> tuple[sparse.csr_matrix, np.ndarray]:
    """``A + I`` in float64 (A binarised, diagonal dropped) and its row sums (niche sizes)."""
    n = conn.shape[0]
    off = conn != 0
    if off.diagonal().any():  # self loops (e.g. squidpy's set_diag=True): the spot counts once
        off = off.tolil()
        off.setdiag(False)
        off = off.tocsr()
        off.eliminate_zeros()
        off.sort_indices()
    members = off.astype(np.float64) + sparse.identity(n, format="csr")
    return members, np.asarray(members.sum(axis=1)).ravel()


def _aggregate(members: sparse.csr_matrix, size: np.ndarray, counts: np.ndarray | sparse.spmatrix) -> np.ndarray:
    total = members @ counts
    total = total.toarray() if sparse.issparse(total) else np.asarray(total)
    return np.log2(1.0 + total / size[:, None]).astype(np.float32)


def _layout_edges(
    adata: AnnData,
    coords: np.ndarray,
    libs: list[tuple[Any, np.ndarray]],
    *,
    layout: str,
    radius: float | None,
    n_neighs: int | None,
    library_key: str | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, dict[str, Any]]]:
    """Global (row, col) edges built from the layout, one block per library, with per-spot expected degree."""
    expected = np.zeros(adata.n_obs, dtype=np.int64)
    resolved: dict[str, dict[str, Any]] = {}
    rows_all, cols_all = [], []
    for lib, idx in libs:
        lib_coords = coords[idx]
        _check_unique_positions(lib_coords, lib)
        lib_layout = layout
        if layout == "auto":
            lib_layout = _detect_layout(adata, idx, lib_coords, lib, library_key)
        r_i, c_i, info = _graph(adata, idx, lib_coords, lib_layout, radius=radius, n_neighs=n_neighs)
        rows_all.append(idx[r_i])
        cols_all.append(idx[c_i])
        degree = np.bincount(r_i, minlength=len(idx))
        if lib_layout in _EXPECTED:
            exp = _EXPECTED[lib_layout]
        elif lib_layout == "knn":
            exp = int(min(n_neighs, len(idx) - 1))  # type: ignore[arg-type]
        else:  # radius
            exp = int(degree.max()) if len(idx) else 0
        expected[idx] = exp
        info.update(layout=lib_layout, expected_neighbours=int(exp), n_spots=len(idx))
        resolved["all" if lib is None else str(lib)] = info
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols_all) if cols_all else np.zeros(0, dtype=np.int64)
    return rows, cols, expected, resolved


def _given_edges(
    adata: AnnData, key: str, libs: list[tuple[Any, np.ndarray]], library_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, dict[str, Any]]]:
    """Global (row, col) edges of ``.obsp[key]`` (non-zero, off-diagonal), with per-spot expected degree."""
    n = adata.n_obs
    graph = adata.obsp[key]
    if graph.shape != (n, n):
        raise ValueError(f"adata.obsp[{key!r}] has shape {graph.shape}; expected ({n}, {n}).")
    coo = sparse.coo_matrix(graph)
    keep = (coo.data != 0) & (coo.row != coo.col)
    rows, cols = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64)
    lib_of = np.zeros(n, dtype=np.int64)
    for k, (_, idx) in enumerate(libs):
        lib_of[idx] = k
    n_cross = int((lib_of[rows] != lib_of[cols]).sum())
    if n_cross:
        logger.warning(
            f"niches: adata.obsp[{key!r}] has {n_cross} edges between different samples of "
            f"obs[{library_key!r}]; they are used as given."
        )
    degree = np.bincount(rows[np.unique(rows * n + cols, return_index=True)[1]], minlength=n)
    expected = np.zeros(n, dtype=np.int64)
    resolved: dict[str, dict[str, Any]] = {}
    for lib, idx in libs:
        exp = int(degree[idx].max()) if len(idx) else 0
        expected[idx] = exp
        resolved["all" if lib is None else str(lib)] = {
            "source": f"obsp[{key!r}]",
            "layout": "precomputed",
            "expected_neighbours": exp,
            "n_spots": len(idx),
        }
    return rows, cols, expected, resolved


def _coordinates(adata: AnnData) -> np.ndarray:
    if Key.OBSM_SPATIAL not in adata.obsm:
        raise ValueError(
            f"adata.obsm[{Key.OBSM_SPATIAL!r}] is missing: store the spot centres there (n_obs × 2, x then y)."
        )
    xy = np.asarray(adata.obsm[Key.OBSM_SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"adata.obsm[{Key.OBSM_SPATIAL!r}] must have shape (n_obs, 2), got {xy.shape}.")
    xy = xy[:, :2]
    if not np.isfinite(xy).all():
        raise ValueError(f"adata.obsm[{Key.OBSM_SPATIAL!r}] holds NaN or infinite spot centres.")
    return xy


def _check_unique_positions(xy: np.ndarray, lib: Any) -> None:
    if len(xy) < 2:
        return
    d, _ = cKDTree(xy).query(xy, k=2)
    if (d[:, 1] == 0).any():
        where = "" if lib is None else f" of sample {lib!r}"
        raise ValueError(
            f"{int((d[:, 1] == 0).sum())} spots{where} share their centre with another spot in "
            f"obsm[{Key.OBSM_SPATIAL!r}]; remove duplicates (or pass `library_key` if they belong to "
            "different samples)."
        )


def _array_coords(adata: AnnData, idx: np.ndarray) -> np.ndarray | None:
    """Integer (row, col) array coordinates of the spots, or ``None`` when absent/not integer."""
    if _ARRAY_ROW not in adata.obs or _ARRAY_COL not in adata.obs:
        return None
    rc = np.column_stack(
        [
            pd.to_numeric(adata.obs[k].iloc[idx], errors="coerce").to_numpy(dtype=np.float64)
            for k in (_ARRAY_ROW, _ARRAY_COL)
        ]
    )
    if not np.isfinite(rc).all() or (rc != np.round(rc)).any():
        return None
    return rc.astype(np.int64)


def _is_hex_parity(rc: np.ndarray) -> bool:
    return len(rc) > 1 and len(np.unique((rc[:, 0] + rc[:, 1]) % 2)) == 1


def _reader_layout(adata: AnnData, lib: Any, library_key: str | None) -> str | None:
    block = adata.uns.get(Key.UNS)
    spots = block.get(Key.UNS_SPOTS) if isinstance(block, dict) else None
    if not isinstance(spots, dict) or not spots:
        return None
    if library_key is not None:
        entry = spots.get(str(lib))
    elif len(spots) == 1:
        entry = next(iter(spots.values()))
    else:
        return None
    value = entry.get("layout") if isinstance(entry, dict) else None
    return value if value in _EXPECTED else None


def _detect_layout(adata: AnnData, idx: np.ndarray, xy: np.ndarray, lib: Any, library_key: str | None) -> str:
    where = "" if lib is None else f" for sample {lib!r}"
    found = _reader_layout(adata, lib, library_key)
    if found is not None:
        logger.debug(f"niches: layout {found!r}{where} from .uns[{Key.UNS!r}][{Key.UNS_SPOTS!r}].")
        return found
    rc = _array_coords(adata, idx)
    if rc is not None and len(rc) > 1:
        found = "visium" if _is_hex_parity(rc) else "st"
        logger.debug(f"niches: layout {found!r}{where} from the parity of the array coordinates.")
        return found
    if len(xy) > 1:
        pitch = spot_pitch(xy)
        tree = cKDTree(xy)
        counts = np.asarray([len(v) for v in tree.query_ball_point(xy, r=pitch * _DETECT_FACTOR)]) - 1
        n_hex, n_square = int((counts >= 5).sum()), int((counts == 4).sum())
        if n_hex or n_square:
            found = "visium" if n_hex > n_square else "st"
            logger.debug(f"niches: layout {found!r}{where} from the spot geometry ({n_hex} vs {n_square}).")
            return found
    raise ValueError(
        f"niches: cannot detect the spot layout{where} (no reader metadata, no integer obs "
        f"'{_ARRAY_ROW}'/'{_ARRAY_COL}', no spot with 4+ neighbours at the pitch); pass layout='visium', "
        "'st', 'radius' (with radius=) or 'knn' (with n_neighs=)."
    )


def _radius_pairs(xy: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Directed pairs (both directions) of points closer than ``r``, without self pairs."""
    if len(xy) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    pairs = cKDTree(xy).query_pairs(r=r, output_type="ndarray").astype(np.int64)
    return np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])


def _graph(
    adata: AnnData,
    idx: np.ndarray,
    xy: np.ndarray,
    layout: str,
    *,
    radius: float | None,
    n_neighs: int | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Local (row, col) edge lists of one library and what was used to build them."""
    if layout == "knn":
        k = int(min(n_neighs, len(xy) - 1))  # type: ignore[arg-type]
        if k < 1:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, {"n_neighs": 0}
        _, nn = cKDTree(xy).query(xy, k=k + 1)
        nn = np.asarray(nn).reshape(len(xy), k + 1)
        not_self = nn != np.arange(len(xy))[:, None]
        # first k entries that are not the spot itself (positions are unique, so self is the nearest)
        pick = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
        cols = np.take_along_axis(nn, pick, axis=1).ravel()
        rows = np.repeat(np.arange(len(xy)), k)
        return rows, cols, {"n_neighs": k}
    if layout == "radius" or radius is not None:
        rows, cols = _radius_pairs(xy, float(radius))  # type: ignore[arg-type]
        return rows, cols, {"source": "spatial", "radius": float(radius)}  # type: ignore[arg-type]
    rc = _array_coords(adata, idx)
    if rc is not None and (layout == "st" or _is_hex_parity(rc)):
        if layout == "visium":  # doubled columns: lattice neighbours all at distance 2
            lattice = np.column_stack([rc[:, 1], rc[:, 0] * np.sqrt(3.0)])
            r = 2.0 * 1.01
        else:
            lattice = np.column_stack([rc[:, 1], rc[:, 0]]).astype(np.float64)
            r = np.sqrt(2.0) * 1.01
        rows, cols = _radius_pairs(lattice, r)
        return rows, cols, {"source": "array_coordinates"}
    if rc is not None:
        logger.warning(
            "niches: obs array coordinates do not follow the Visium convention (one parity of row + col); "
            "using obsm['spatial'] geometry instead."
        )
    pitch = spot_pitch(xy)
    if not np.isfinite(pitch):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, {"source": "spatial"}
    r = pitch * _RADIUS_FACTOR[layout]
    rows, cols = _radius_pairs(xy, r)
    return rows, cols, {"source": "spatial", "pitch": pitch, "radius": float(r)}
