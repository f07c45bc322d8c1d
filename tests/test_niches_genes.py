"""Niches (graph + niche expression), gene selection and targets on matrices with hand-known answers."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from hyperst._constants import Key
from hyperst._logging import logger
from hyperst.pp._genes import select_genes, targets
from hyperst.pp._niches import aggregate_niches, niche_targets, niches

HER2ST = Path(__file__).parents[1] / ".." / "shared" / "data" / "her2st"

# degrees of a 5×5 Visium patch (rows 0..4, 5 spots per row, odd rows shifted right by half a pitch)
HEX_DEGREES = np.array(
    [
        [2, 4, 4, 4, 3],
        [5, 6, 6, 6, 3],
        [3, 6, 6, 6, 5],
        [5, 6, 6, 6, 3],
        [2, 4, 4, 4, 3],
    ]
)
ST_DEGREES = np.array([[3, 5, 5, 3], [5, 8, 8, 5], [5, 8, 8, 5], [3, 5, 5, 3]])


def _hex_adata(*, array: bool = True, jitter: float = 0.0, pitch: float = 100.0, seed: int = 0) -> ad.AnnData:
    row, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    row, j = row.ravel(), j.ravel()
    col = 2 * j + row % 2  # Visium: doubled columns, row + col even
    xy = np.column_stack([col * pitch / 2, row * pitch * np.sqrt(3) / 2]) + 1000.0
    xy += np.random.default_rng(seed).uniform(-jitter, jitter, xy.shape)
    a = ad.AnnData(sparse.csr_matrix(np.arange(25 * 3, dtype=np.float32).reshape(25, 3)))
    a.var_names = ["g0", "g1", "g2"]
    a.obs_names = [f"s{i}" for i in range(25)]
    a.obsm["spatial"] = xy
    if array:
        a.obs["array_row"] = row
        a.obs["array_col"] = col
    return a


def _grid_adata(n: int = 4, *, pitch: float = 200.0, array: bool = True, x0: float = 0.0) -> ad.AnnData:
    row, col = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    row, col = row.ravel(), col.ravel()
    x = np.arange(n * n * 2, dtype=np.float32).reshape(n * n, 2) % 7
    a = ad.AnnData(x)
    a.var_names = ["a", "b"]
    a.obs_names = [f"s{i}" for i in range(n * n)]
    a.obsm["spatial"] = np.column_stack([x0 + col * pitch, row * pitch]).astype(np.float64)
    if array:
        a.obs["array_row"] = row + 1
        a.obs["array_col"] = col + 1
    return a


def _degrees(a: ad.AnnData) -> np.ndarray:
    return np.diff(a.obsp[Key.OBSP_NICHE_CONNECTIVITIES].indptr)


def _keys(a: ad.AnnData) -> dict[str, set[str]]:
    return {
        "obs": set(a.obs.columns),
        "var": set(a.var.columns),
        "obsm": set(a.obsm.keys()),
        "obsp": set(a.obsp.keys()),
        "layers": set(a.layers.keys()),
        "uns": set(a.uns.keys()),
    }


# ------------------------------------------------------------------------------------------- niches


@pytest.mark.parametrize(
    ("array", "jitter", "layout"),
    [(True, 0.0, "auto"), (False, 0.0, "auto"), (False, 4.0, "auto"), (True, 4.0, "visium"), (False, 4.0, "visium")],
)
def test_hex_grid_six_neighbours(array: bool, jitter: float, layout: str) -> None:
    a = _hex_adata(array=array, jitter=jitter)
    niches(a, layout=layout)
    np.testing.assert_array_equal(_degrees(a).reshape(5, 5), HEX_DEGREES)
    np.testing.assert_array_equal(a.obs[Key.OBS_NICHE_SIZE].to_numpy(), HEX_DEGREES.ravel() + 1)
    np.testing.assert_array_equal(a.obs[Key.OBS_NICHE_COMPLETE].to_numpy(), HEX_DEGREES.ravel() == 6)
    rec = a.uns[Key.UNS][Key.UNS_NICHES]
    assert rec["libraries"]["all"]["layout"] == "visium"
    assert rec["libraries"]["all"]["source"] == ("array_coordinates" if array else "spatial")
    assert rec["n_incomplete"] == 25 - 9
    conn = a.obsp[Key.OBSP_NICHE_CONNECTIVITIES]
    assert (conn != conn.T).nnz == 0
    assert conn.diagonal().sum() == 0
    # centre spot (row 2, j 2, col 4) neighbours: (2,2),(2,6),(1,3),(1,5),(3,3),(3,5) -> indices
    centre = 2 * 5 + 2
    assert set(conn[centre].indices) == {11, 13, 6, 7, 16, 17}
    # distances are Euclidean in obsm units (pitch 100 without jitter)
    if jitter == 0.0:
        np.testing.assert_allclose(a.obsp[Key.OBSP_NICHE_DISTANCES].data, 100.0)


@pytest.mark.parametrize(("array", "layout"), [(True, "auto"), (False, "auto"), (False, "st"), (True, "st")])
def test_st_grid_eight_neighbours(array: bool, layout: str) -> None:
    a = _grid_adata(array=array)
    niches(a, layout=layout)
    np.testing.assert_array_equal(_degrees(a).reshape(4, 4), ST_DEGREES)
    assert a.uns[Key.UNS][Key.UNS_NICHES]["libraries"]["all"]["layout"] == "st"
    assert a.obs[Key.OBS_NICHE_COMPLETE].sum() == 4
    d = a.obsp[Key.OBSP_NICHE_DISTANCES]
    np.testing.assert_allclose(np.sort(np.unique(np.round(d.data, 6))), [200.0, round(200 * np.sqrt(2), 6)])


def test_layout_from_reader_metadata() -> None:
    # geometry alone would say "square"; the reader's record wins in auto mode
    a = _grid_adata(array=False)
    a.uns[Key.UNS] = {Key.UNS_SPOTS: {"S1": {"layout": "visium", "pitch": 100.0}}}
    niches(a)
    assert a.uns[Key.UNS][Key.UNS_NICHES]["libraries"]["all"]["layout"] == "visium"
    assert a.uns[Key.UNS][Key.UNS_SPOTS]["S1"]["pitch"] == 100.0  # untouched


def test_samples_never_connect() -> None:
    left = _grid_adata(array=False)
    right = _grid_adata(array=False, x0=800.0)  # one pitch to the right of the left block
    both = ad.concat({"A": left, "B": right}, label="sample", index_unique="-")
    niches(both, library_key="sample")
    conn = both.obsp[Key.OBSP_NICHE_CONNECTIVITIES].tocoo()
    lib = both.obs["sample"].to_numpy()
    assert (lib[conn.row] == lib[conn.col]).all()
    np.testing.assert_array_equal(_degrees(both), np.tile(ST_DEGREES.ravel(), 2))
    # without the library key the blocks touch (control: the test would catch cross edges)
    niches(both)
    conn = both.obsp[Key.OBSP_NICHE_CONNECTIVITIES].tocoo()
    assert (lib[conn.row] != lib[conn.col]).any()

    # the same positions in two samples: fine per sample, an error when pooled
    same = ad.concat({"A": left, "B": _grid_adata(array=False)}, label="sample", index_unique="-")
    niches(same, library_key="sample")
    np.testing.assert_array_equal(_degrees(same), np.tile(ST_DEGREES.ravel(), 2))
    with pytest.raises(ValueError, match="share their centre"):
        niches(same)


def test_niche_expression_by_hand() -> None:
    # 3×3 ST grid, gene a = spot index k, gene b = k²
    k = np.arange(9, dtype=np.float64)
    a = _grid_adata(3)
    a.X = np.column_stack([k, k**2]).astype(np.float32)
    a.layers["counts"] = sparse.csr_matrix(a.X)
    a.X = np.zeros_like(a.X) - 1.0  # .X is not counts: the layer is used
    niches(a, layer="counts")
    e = a.obsm[Key.OBSM_NICHE_EXPRESSION]
    assert e.dtype == np.float32
    assert e.shape == (9, 2)
    # centre spot 4: niche = all 9 spots -> mean a = 4, mean b = 204/9
    np.testing.assert_allclose(e[4], [np.log2(5.0), np.log2(1 + 204 / 9)], atol=1e-6)
    # corner spot 0: niche {0, 1, 3, 4} -> mean a = 2, mean b = 26/4
    np.testing.assert_allclose(e[0], [np.log2(3.0), np.log2(1 + 26 / 4)], atol=1e-6)
    # edge spot 1: niche {0, 1, 2, 3, 4, 5} -> mean a = 2.5, mean b = 55/6
    np.testing.assert_allclose(e[1], [np.log2(3.5), np.log2(1 + 55 / 6)], atol=1e-6)
    assert a.uns[Key.UNS][Key.UNS_NICHES]["genes"] == ["a", "b"]

    b = _grid_adata(3)
    b.X = np.column_stack([k, k**2]).astype(np.float32)
    out = niches(b, genes=["b"], copy=True)
    assert out is not None
    assert Key.OBSM_NICHE_EXPRESSION not in b.obsm
    np.testing.assert_allclose(out.obsm[Key.OBSM_NICHE_EXPRESSION][:, 0], e[:, 1], atol=1e-6)


def test_niches_on_prediction_tables_use_the_count_scale() -> None:
    # 3×3 ST grid; hst.tl.predict's table: prediction (log2(1 + counts)) in .X, or counts in .X and the
    # prediction in a layer. The niche mean is taken over 2**x - 1, the counts the prediction stands for.
    k = np.arange(9, dtype=np.float64)
    counts = np.column_stack([k, k**2])
    logs = np.log2(1 + counts).astype(np.float32)
    he_only = _grid_adata(3)
    he_only.X = logs.copy()
    he_only.uns[Key.UNS] = {Key.UNS_PREDICT: {"layer": "X"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-integer values" warning: they are not read as counts
        niches(he_only)
    ref = _grid_adata(3)
    ref.X = counts.astype(np.float32)
    niches(ref)
    np.testing.assert_allclose(he_only.obsm[Key.OBSM_NICHE_EXPRESSION], ref.obsm[Key.OBSM_NICHE_EXPRESSION],
                               rtol=1e-5)
    # centre spot 4: niche = all 9 spots -> mean a = 4, mean b = 204/9 (as for the counts themselves)
    np.testing.assert_allclose(he_only.obsm[Key.OBSM_NICHE_EXPRESSION][4], [np.log2(5.0), np.log2(1 + 204 / 9)],
                               rtol=1e-5)
    assert he_only.uns[Key.UNS][Key.UNS_NICHES]["scale"] == "log2p1"
    # counts in .X, prediction in a layer: .X is read as counts, the layer on the log scale
    both = _grid_adata(3)
    both.X = counts.astype(np.float32)
    both.layers[Key.LAYER_PRED] = sparse.csr_matrix(logs)
    both.layers[Key.LAYER_STD] = np.ones_like(logs)
    both.uns[Key.UNS] = {Key.UNS_PREDICT: {"layer": Key.LAYER_PRED}}
    out = niches(both, copy=True)
    assert out.uns[Key.UNS][Key.UNS_NICHES]["scale"] == "counts"
    np.testing.assert_allclose(out.obsm[Key.OBSM_NICHE_EXPRESSION], ref.obsm[Key.OBSM_NICHE_EXPRESSION], rtol=1e-6)
    out = niches(both, layer=Key.LAYER_PRED, copy=True)
    assert out.uns[Key.UNS][Key.UNS_NICHES]["scale"] == "log2p1"
    np.testing.assert_allclose(out.obsm[Key.OBSM_NICHE_EXPRESSION], ref.obsm[Key.OBSM_NICHE_EXPRESSION], rtol=1e-5)
    # forcing the scale on any table; wrong inputs name the fix
    plain = _grid_adata(3)
    plain.X = logs.copy()
    out = niches(plain, scale="log2p1", copy=True)
    np.testing.assert_allclose(out.obsm[Key.OBSM_NICHE_EXPRESSION], ref.obsm[Key.OBSM_NICHE_EXPRESSION], rtol=1e-5)
    with pytest.raises(ValueError, match="standard deviation"):
        niches(both, layer=Key.LAYER_STD)
    plain.X[0, 0] = -0.5
    with pytest.raises(ValueError, match="log2\\(1 \\+ counts\\) values are finite and ≥ 0"):
        niches(plain, scale="log2p1")
    with pytest.raises(ValueError, match="`scale` must be"):
        niches(plain, scale="log")
    assert Key.OBSM_NICHE_EXPRESSION not in plain.obsm


def test_aggregate_niches_by_hand() -> None:
    # path 0 - 1 - 2, spot 3 alone; weights (as squidpy's) and a stored self loop do not matter
    counts = np.array([[2.0, 0.0], [4.0, 3.0], [9.0, 0.0], [5.0, 1.0]], dtype=np.float32)
    w = sparse.csr_matrix(
        (
            [0.5, 0.5, 2.0, 2.0, 7.0, 0.0],
            ([0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 2, 0]),  # (2, 2) self loop, (3, 0) an explicit zero
        ),
        shape=(4, 4),
    )
    out = aggregate_niches(counts, w)
    assert out.dtype == np.float32
    # niches {0, 1}, {0, 1, 2}, {1, 2}, {3}
    expected = np.log2(1.0 + np.array([[3.0, 1.5], [5.0, 1.0], [6.5, 1.5], [5.0, 1.0]]))
    np.testing.assert_allclose(out, expected, rtol=1e-7)
    np.testing.assert_array_equal(aggregate_niches(sparse.csr_matrix(counts), w), out)
    np.testing.assert_array_equal(aggregate_niches(counts.astype(np.int64), w.toarray()), out)
    with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
        aggregate_niches(counts, sparse.identity(3, format="csr"))


def test_niches_over_a_given_graph() -> None:
    # 3×3 ST grid, gene a = spot index k, gene b = k²; a squidpy-style weighted rook graph (4-neighbours)
    k = np.arange(9, dtype=np.float64)
    a = _grid_adata(3)
    a.X = np.column_stack([k, k**2]).astype(np.float32)
    row, col = np.divmod(np.arange(9), 3)
    rook = (np.abs(row[:, None] - row[None]) + np.abs(col[:, None] - col[None])) == 1
    a.obsp["spatial_connectivities"] = sparse.csr_matrix(rook * 0.25 + np.eye(9))  # weights + set_diag
    niches(a, connectivity_key="spatial_connectivities")
    e = a.obsm[Key.OBSM_NICHE_EXPRESSION]
    # centre 4: {1, 3, 4, 5, 7} -> mean a = 4, mean b = 100/5; corner 0: {0, 1, 3} -> 4/3, 10/3
    np.testing.assert_allclose(e[4], np.log2(1 + np.array([4.0, 20.0])), rtol=1e-6)
    np.testing.assert_allclose(e[0], np.log2(1 + np.array([4 / 3, 10 / 3])), rtol=1e-6)
    # edge 1: {0, 1, 2, 4} -> mean a = 7/4, mean b = 21/4
    np.testing.assert_allclose(e[1], np.log2(1 + np.array([7 / 4, 21 / 4])), rtol=1e-6)
    np.testing.assert_array_equal(_degrees(a), [2, 3, 2, 3, 4, 3, 2, 3, 2])
    np.testing.assert_array_equal(a.obs[Key.OBS_NICHE_SIZE], [3, 4, 3, 4, 5, 4, 3, 4, 3])
    np.testing.assert_array_equal(a.obs[Key.OBS_NICHE_COMPLETE], np.arange(9) == 4)  # 4 = most neighbours
    conn = a.obsp[Key.OBSP_NICHE_CONNECTIVITIES]
    assert conn.dtype == np.float32
    assert set(conn.data) == {1.0}
    assert conn.diagonal().sum() == 0
    np.testing.assert_allclose(a.obsp[Key.OBSP_NICHE_DISTANCES].data, 200.0)
    rec = a.uns[Key.UNS][Key.UNS_NICHES]
    assert rec["connectivity_key"] == "spatial_connectivities"
    assert rec["libraries"]["all"]["layout"] == "precomputed"
    assert rec["libraries"]["all"]["expected_neighbours"] == 4
    # the niche targets of tl use the same graph and the same numbers
    np.testing.assert_array_equal(niche_targets(a, ["b", "a"]), e[:, ::-1])

    # without obsm["spatial"]: same expression, no distances (a stale matrix is removed)
    del a.obsm["spatial"]
    niches(a, connectivity_key="spatial_connectivities", genes=["b"])
    np.testing.assert_array_equal(a.obsm[Key.OBSM_NICHE_EXPRESSION][:, 0], e[:, 1])
    assert Key.OBSP_NICHE_DISTANCES not in a.obsp
    assert "distances_key" not in a.uns[Key.UNS][Key.UNS_NICHES]

    with pytest.raises(ValueError, match=r"not in adata\.obsp"):
        niches(a, connectivity_key="nope")
    for bad in ({"layout": "st"}, {"radius": 1.0}, {"layout": "knn", "n_neighs": 2}):
        with pytest.raises(ValueError, match="`connectivity_key` gives the graph"):
            niches(a, connectivity_key="spatial_connectivities", **bad)


def test_niches_given_graph_crossing_samples_warns() -> None:
    a = _grid_adata(2, array=False)
    a.obs["sample"] = ["A", "A", "B", "B"]
    a.obsp["g"] = sparse.csr_matrix(np.ones((4, 4)) - np.eye(4))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        niches(a, connectivity_key="g", library_key="sample")
    finally:
        logger.removeHandler(handler)
    assert any("8 edges between different samples" in m for m in messages)
    np.testing.assert_array_equal(_degrees(a), 3)


def test_niches_from_squidpy_spatial_neighbors() -> None:
    sq = pytest.importorskip("squidpy")
    a = _hex_adata()
    ref = a.copy()
    niches(ref, layout="visium")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=6)
    niches(a, connectivity_key="spatial_connectivities")
    np.testing.assert_array_equal(_degrees(a).reshape(5, 5), HEX_DEGREES)
    assert (a.obsp[Key.OBSP_NICHE_CONNECTIVITIES] != ref.obsp[Key.OBSP_NICHE_CONNECTIVITIES]).nnz == 0
    np.testing.assert_array_equal(a.obsm[Key.OBSM_NICHE_EXPRESSION], ref.obsm[Key.OBSM_NICHE_EXPRESSION])
    np.testing.assert_array_equal(a.obs[Key.OBS_NICHE_COMPLETE], ref.obs[Key.OBS_NICHE_COMPLETE])
    # the centre spot (index 12): itself and 11, 13, 6, 7, 16, 17; g0 = 3 * index
    members = [12, 11, 13, 6, 7, 16, 17]
    np.testing.assert_allclose(a.obsm[Key.OBSM_NICHE_EXPRESSION][12, 0], np.log2(1 + 3 * np.mean(members)), rtol=1e-6)


def test_incomplete_drop_keep_mark() -> None:
    ref = _grid_adata(4)
    niches(ref)
    full = ref.obsm[Key.OBSM_NICHE_EXPRESSION]
    interior = np.flatnonzero(ST_DEGREES.ravel() == 8)

    keep = _grid_adata(4)
    before = _keys(keep)
    out = niches(keep, incomplete="drop", copy=True)
    assert _keys(keep) == before
    assert keep.n_obs == 16
    assert out is not None
    assert list(out.obs_names) == [f"s{i}" for i in interior]
    assert out.obs[Key.OBS_NICHE_COMPLETE].all()
    assert (out.obs[Key.OBS_NICHE_SIZE] == 9).all()
    # niche means still use the dropped border spots
    np.testing.assert_allclose(out.obsm[Key.OBSM_NICHE_EXPRESSION], full[interior], atol=1e-6)
    assert out.obsp[Key.OBSP_NICHE_CONNECTIVITIES].shape == (4, 4)
    assert out.uns[Key.UNS][Key.UNS_NICHES]["n_dropped"] == 12

    inplace = _grid_adata(4)
    assert niches(inplace, incomplete="drop") is None
    assert inplace.n_obs == 4
    np.testing.assert_allclose(inplace.obsm[Key.OBSM_NICHE_EXPRESSION], full[interior], atol=1e-6)

    mark = _grid_adata(4)
    niches(mark, incomplete="mark")
    assert mark.n_obs == 16
    np.testing.assert_array_equal(mark.obsm[Key.OBSM_NICHE_EXPRESSION], full)
    assert mark.uns[Key.UNS][Key.UNS_NICHES]["n_incomplete"] == 12


def test_radius_and_knn_layouts() -> None:
    x = np.array([0.0, 1.0, 3.0, 7.0, 15.0])
    a = ad.AnnData(np.ones((5, 1), dtype=np.float32))
    a.obsm["spatial"] = np.column_stack([x, np.zeros(5)])
    niches(a, layout="radius", radius=2.5)
    conn = a.obsp[Key.OBSP_NICHE_CONNECTIVITIES]
    assert [set(conn[i].indices) for i in range(5)] == [{1}, {0, 2}, {1}, set(), set()]
    np.testing.assert_array_equal(a.obs[Key.OBS_NICHE_COMPLETE], [False, True, False, False, False])
    niches(a, layout="knn", n_neighs=1)
    conn = a.obsp[Key.OBSP_NICHE_CONNECTIVITIES]
    assert [int(conn[i].indices[0]) for i in range(5)] == [1, 0, 1, 2, 3]
    np.testing.assert_allclose(a.obsp[Key.OBSP_NICHE_DISTANCES].sum(axis=1).A1, [1, 1, 2, 4, 8])
    assert a.obs[Key.OBS_NICHE_COMPLETE].all()
    np.testing.assert_allclose(a.obsm[Key.OBSM_NICHE_EXPRESSION], 1.0)  # log2(1 + 1)


def test_niches_documented_keys_only_and_h5ad(tmp_path: Path) -> None:
    a = _hex_adata()
    a.layers["counts"] = a.X.copy()
    a.uns["other"] = {"x": 1}
    before = _keys(a)
    x_before = a.X.copy()
    niches(a, library_key=None, layer="counts")
    after = _keys(a)
    assert after["obs"] - before["obs"] == {Key.OBS_NICHE_SIZE, Key.OBS_NICHE_COMPLETE}
    assert after["obsm"] - before["obsm"] == {Key.OBSM_NICHE_EXPRESSION}
    assert after["obsp"] - before["obsp"] == {Key.OBSP_NICHE_CONNECTIVITIES, Key.OBSP_NICHE_DISTANCES}
    assert after["uns"] - before["uns"] == {Key.UNS}
    assert after["var"] == before["var"]
    assert after["layers"] == before["layers"]
    assert (x_before != a.X).nnz == 0
    a.write_h5ad(tmp_path / "n.h5ad")
    back = ad.read_h5ad(tmp_path / "n.h5ad")
    assert list(back.uns[Key.UNS][Key.UNS_NICHES]["genes"]) == ["g0", "g1", "g2"]


def test_niches_errors() -> None:
    a = _grid_adata(3)
    a.layers["counts"] = a.X.copy()
    a.layers["counts"][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\].*NaN"):
        niches(a, layer="counts")
    a.layers["neg"] = -a.X
    with pytest.raises(ValueError, match=r"adata.layers\['neg'\].*negative"):
        niches(a, layer="neg")
    with pytest.raises(ValueError, match=r"not in adata\.layers"):
        niches(a, layer="nope")
    with pytest.raises(ValueError, match=r"2 genes not found.*'zz'"):
        niches(a, genes=["a", "zz", "yy"])
    with pytest.raises(ValueError, match="n_neighs"):
        niches(a, layout="knn")
    with pytest.raises(ValueError, match="only used with layout='knn'"):
        niches(a, layout="st", n_neighs=8)
    with pytest.raises(ValueError, match="needs `radius`"):
        niches(a, layout="radius")
    with pytest.raises(ValueError, match="library_key"):
        niches(a, library_key="sample")
    del a.obsm["spatial"]
    with pytest.raises(ValueError, match="obsm"):
        niches(a)
    line = ad.AnnData(np.ones((3, 1), dtype=np.float32))
    line.obsm["spatial"] = np.column_stack([np.arange(3.0), np.zeros(3)])
    with pytest.raises(ValueError, match="cannot detect the spot layout"):
        niches(line)
    assert Key.UNS not in line.uns  # nothing written on failure


# ----------------------------------------------------------------------------------- gene selection

# pooled values alternate low/high over 12 spots (6 per sample); (low, high) per gene
_DESIGN = {
    "MT-CO1": (900, 1100),  # highest mean, excluded (mitochondrial)
    "RPL3": (500, 700),  # excluded (ribosomal)
    "A": (99, 101),  # mean 100, std ~1.04  -> high mean, low std
    "B": (40, 120),  # mean 80, std ~41.8   -> high mean, high std
    "MTOR": (35, 105),  # mean 70, std ~36.6   -> kept by "^MT-", dropped by Stem's "^MT"
    "E": (30, 90),  # mean 60, std ~31.3
    "C": (1, 19),  # mean 10, std ~9.4
    "D": (3, 7),  # mean 5, std ~2.1
}


def _design_pair() -> tuple[ad.AnnData, ad.AnnData]:
    genes = list(_DESIGN)
    low = np.array([v[0] for v in _DESIGN.values()], dtype=np.float32)
    high = np.array([v[1] for v in _DESIGN.values()], dtype=np.float32)
    x = np.stack([low if i % 2 == 0 else high for i in range(12)])
    # small spot-specific wiggle on C/D keeps every gene variable inside each sample after normalisation
    x[:, genes.index("D")] += np.array([0, 0, 1, -1, 0, 0, 0, 0, -1, 1, 0, 0], dtype=np.float32)
    a1 = ad.AnnData(sparse.csr_matrix(np.column_stack([x[:6], np.full(6, 5.0, np.float32)])))
    a1.var_names = [*genes, "ONLY1"]
    a2 = ad.AnnData(np.column_stack([np.full(6, 3.0, np.float32), x[6:][:, ::-1]]))
    a2.var_names = ["ONLY2", *genes[::-1]]  # another gene order, another extra gene
    return a1, a2


def test_select_genes_flavors_by_hand() -> None:
    a1, a2 = _design_pair()
    # "mean": top-3 by pooled raw mean among non-MT/RP genes
    assert select_genes([a1, a2], flavor="mean", n_top=3, inplace=False) == ["A", "B", "MTOR"]
    # "hmhvg": n_hvg above the gene count keeps every gene in the HVG union;
    # top-3 mean {A, B, MTOR} ∩ top-3 std {B, MTOR, E} = [B, MTOR] (ordered by mean)
    assert select_genes([a1, a2], n_top=3, n_hvg=100, inplace=False) == ["B", "MTOR"]
    assert select_genes([a1, a2], flavor="hvg", n_top=3, n_hvg=100, inplace=False) == ["A", "B", "MTOR"]
    # Stem's broad "MT" prefix also drops MTOR
    stem = ("^MT", "^RP[SL]")
    assert select_genes([a1, a2], flavor="mean", n_top=3, exclude_patterns=stem, inplace=False) == ["A", "B", "E"]
    assert select_genes([a1, a2], n_top=3, n_hvg=100, exclude_patterns=stem, inplace=False) == ["B", "E"]
    # nothing excluded: the mitochondrial and ribosomal genes lead
    assert select_genes([a1, a2], flavor="mean", n_top=2, exclude_patterns=(), inplace=False) == ["MT-CO1", "RPL3"]
    # list: order kept, validated against the shared genes
    assert select_genes([a1, a2], flavor="list", genes=["D", "A"], inplace=False) == ["D", "A"]


def test_select_genes_hvg_step_matches_scanpy() -> None:
    import scanpy as sc

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(40)]
    slides = []
    for s in range(2):
        mu = rng.gamma(2.0, 5.0, size=40) * (1 + s)
        x = rng.poisson(mu * rng.gamma(1.0, 1.0, size=(30, 40))).astype(np.float32)
        a = ad.AnnData(x)
        a.var_names = genes
        slides.append(a)
    union: set[str] = set()
    for a in slides:
        b = a.copy()
        sc.pp.normalize_total(b)
        sc.pp.log1p(b)
        sc.pp.highly_variable_genes(b, n_top_genes=8)
        union |= set(b.var_names[b.var["highly_variable"]])
    pooled = pd.DataFrame(np.vstack([a.X for a in slides]), columns=genes)[sorted(union)]
    mean, std = pooled.mean(), pooled.std()
    top_mean = mean.sort_values(ascending=False).index[:5]
    top_std = std.sort_values(ascending=False).index[:5]
    expected_hvg = list(top_mean)
    expected_hm = [g for g in top_mean if g in set(top_std)]
    assert select_genes(slides, flavor="hvg", n_top=5, n_hvg=8, inplace=False) == expected_hvg
    assert select_genes(slides, flavor="hmhvg", n_top=5, n_hvg=8, inplace=False) == expected_hm
    # one table holding both slides: library_key splits it for the per-slide HVG step
    table = ad.concat({"s0": slides[0], "s1": slides[1]}, label="sample", index_unique="-")
    assert select_genes(table, flavor="hmhvg", n_top=5, n_hvg=8, library_key="sample") == expected_hm
    assert table.uns[Key.UNS][Key.UNS_GENES]["n_samples"] == 2
    with pytest.raises(ValueError, match="library_key"):
        select_genes(table, library_key="nope")
    assert len(expected_hm) >= 1


def test_select_genes_log2_scale() -> None:
    # P: raw mean 15.75 but log2 mean 1.5; Q: raw mean 7, log2 mean 3
    a = ad.AnnData(np.array([[0, 7], [0, 7], [0, 7], [63, 7]], dtype=np.float32))
    a.var_names = ["P", "Q"]
    assert select_genes(a, flavor="mean", n_top=1, inplace=False) == ["P"]
    assert select_genes(a, flavor="mean", n_top=1, scale="log2", inplace=False) == ["Q"]


def test_select_genes_marks_var_and_uns(tmp_path: Path) -> None:
    a1, a2 = _design_pair()
    before = [_keys(a1), _keys(a2)]
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        got = select_genes([a1, a2], flavor="mean", n_top=3)
    finally:
        logger.removeHandler(handler)
    assert any("2 of 10 genes are missing" in m for m in messages)
    for a, b in zip((a1, a2), before, strict=True):
        after = _keys(a)
        assert after["var"] - b["var"] == {Key.VAR_SELECTED, Key.VAR_RANK}
        assert after["uns"] - b["uns"] == {Key.UNS}
        assert after["obs"] == b["obs"]
        assert after["obsm"] == b["obsm"]
        assert after["layers"] == b["layers"]
        sel = a.var[Key.VAR_SELECTED]
        assert sel.dtype == bool
        assert list(a.var_names[sel]) == sorted(got, key=list(a.var_names).index)
        rank = a.var[Key.VAR_RANK]
        assert [rank[g] for g in got] == [0, 1, 2]
        assert (rank[~sel] == -1).all()
        rec = a.uns[Key.UNS][Key.UNS_GENES]
        assert rec["genes"] == got
        assert rec["flavor"] == "mean"
        assert rec["n_common_genes"] == 8
    assert a1.var.loc["ONLY1", Key.VAR_RANK] == -1
    assert not a2.var.loc["ONLY2", Key.VAR_SELECTED]
    a1.write_h5ad(tmp_path / "g.h5ad")
    assert list(ad.read_h5ad(tmp_path / "g.h5ad").uns[Key.UNS][Key.UNS_GENES]["genes"]) == got


def test_select_genes_errors() -> None:
    a1, a2 = _design_pair()
    with pytest.raises(ValueError, match=r"not found.*'ONLY1'"):
        select_genes([a1, a2], flavor="list", genes=["A", "ONLY1"])
    with pytest.raises(ValueError, match="empty"):
        select_genes([a1, a2], flavor="list", genes=[])
    with pytest.raises(ValueError, match="duplicated"):
        select_genes([a1, a2], flavor="list", genes=["A", "A"])
    with pytest.raises(ValueError, match="required"):
        select_genes(a1, flavor="list")
    with pytest.raises(ValueError, match="only used with flavor='list'"):
        select_genes(a1, flavor="mean", genes=["A"])
    with pytest.raises(ValueError, match="flavor"):
        select_genes(a1, flavor="top")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_top"):
        select_genes(a1, n_top=0)
    with pytest.raises(ValueError, match="empty"):
        select_genes([])
    with pytest.raises(TypeError, match="AnnData"):
        select_genes([a1, "x"])  # type: ignore[list-item]
    bad = a2.copy()
    bad.X[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"adata.X of adatas\[1\] holds NaN"):
        select_genes([a1, bad])
    other = ad.AnnData(np.ones((2, 1), dtype=np.float32))
    other.var_names = ["ZZZ"]
    with pytest.raises(ValueError, match="share no gene"):
        select_genes([a1, other])
    assert Key.VAR_SELECTED not in a1.var  # failures write nothing


# ------------------------------------------------------------------------------------------ targets


def test_targets() -> None:
    x = np.array([[1, 3, 0], [0, 0, 0], [7, 1, 8]], dtype=np.float32)
    a = ad.AnnData(sparse.csr_matrix(x))
    a.var_names = ["a", "b", "c"]
    y = targets(a, ["c", "a"])
    assert y.dtype == np.float32
    assert y.shape == (3, 2)
    np.testing.assert_allclose(y, np.log2(1 + x[:, [2, 0]]), atol=1e-6)
    # normalise to 4 counts per spot: spot 0 (1, 3, 0) stays, spot 2 (7, 1, 8) -> (1.75, 0.25, 2)
    yn = targets(a, ["a", "b"], normalize=True, target_sum=4)
    np.testing.assert_allclose(yn, np.log2(1 + np.array([[1, 3], [0, 0], [1.75, 0.25]])), atol=1e-6)
    a.layers["counts"] = x.copy()
    a.X = np.zeros_like(x)
    np.testing.assert_allclose(targets(a, ["b"], layer="counts")[:, 0], np.log2(1 + x[:, 1]), atol=1e-6)


def test_targets_errors() -> None:
    a = ad.AnnData(np.array([[1, np.nan], [0, 2]], dtype=np.float32))
    a.var_names = ["a", "b"]
    with pytest.raises(ValueError, match="NaN"):
        targets(a, ["b"])
    np.testing.assert_allclose(targets(a, ["a"])[:, 0], [1.0, 0.0])  # only the chosen genes are read
    with pytest.raises(ValueError, match="NaN"):
        targets(a, ["a"], normalize=True)  # library sizes read every gene
    with pytest.raises(ValueError, match=r"1 genes not found.*'zz'"):
        targets(a, ["a", "zz"])
    with pytest.raises(ValueError, match="empty"):
        targets(a, [])
    with pytest.raises(TypeError, match="single string"):
        targets(a, "a")
    with pytest.raises(ValueError, match="target_sum"):
        targets(a, ["a"], normalize=True, target_sum=0)
    a.X = -np.abs(np.nan_to_num(a.X)) - 1
    with pytest.raises(ValueError, match="negative"):
        targets(a, ["a"])


# -------------------------------------------------------------------------------------- real data


def _her2st(section: str) -> ad.AnnData:
    folder = HER2ST / section
    if not (folder / "counts.tsv.gz").exists():
        pytest.skip("Her2ST data not available")
    counts = pd.read_csv(folder / "counts.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    counts = counts.loc[counts.index.isin(spots.index)]
    spots = spots.loc[counts.index]
    a = ad.AnnData(sparse.csr_matrix(counts.to_numpy(dtype=np.float32)))
    a.obs_names = counts.index.astype(str)
    a.var_names = counts.columns.astype(str)
    a.var_names_make_unique()
    a.obsm["spatial"] = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    a.obs["array_row"] = spots["y"].to_numpy()
    a.obs["array_col"] = spots["x"].to_numpy()
    return a


@pytest.mark.her2st
def test_her2st_niches_and_genes() -> None:
    c2, c3 = _her2st("C2"), _her2st("C3")
    both = ad.concat({"C2": c2, "C3": c3}, label="sample", index_unique="-", join="inner")
    niches(both, library_key="sample")
    rec = both.uns[Key.UNS][Key.UNS_NICHES]["libraries"]
    assert rec["C2"]["layout"] == rec["C3"]["layout"] == "st"
    deg = _degrees(both)
    assert deg.max() == 8
    assert (deg == 8).sum() > 100
    # the pixel geometry gives the same graph as the array coordinates
    geo = both.copy()
    del geo.obs["array_row"], geo.obs["array_col"]
    niches(geo, library_key="sample")
    assert geo.uns[Key.UNS][Key.UNS_NICHES]["libraries"]["C2"]["layout"] == "st"
    diff = geo.obsp[Key.OBSP_NICHE_CONNECTIVITIES] != both.obsp[Key.OBSP_NICHE_CONNECTIVITIES]
    assert diff.nnz == 0
    genes = select_genes([c2, c3], n_top=100)
    assert 10 <= len(genes) <= 100
    assert not any(g.upper().startswith(("MT-", "RPS", "RPL")) for g in genes)
    y = targets(c2, genes)
    assert y.shape == (c2.n_obs, len(genes))
    assert np.isfinite(y).all()
    means = np.vstack([targets(c, genes) for c in (c2, c3)])
    assert means.std(axis=0).min() > 0
