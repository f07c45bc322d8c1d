"""Model folders (issue: safe loading): integrity record, damaged files, atomic fit and predict."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest

import hyperst as hst
from hyperst._constants import Key

GENES = [f"g{i}" for i in range(6)]
FIT = {"config": {"emb_dim": 8}, "max_epochs": 2, "lr": 1e-3, "batch_size": 16, "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def slides(make_feature_slide):
    w = np.random.default_rng(1).normal(scale=0.6, size=(3, len(GENES)))
    return [make_feature_slide(f"s{i}", 5, i, w, genes=GENES, dim=8) for i in range(4)]


@pytest.fixture(scope="module")
def saved(slides, tmp_path_factory, one_thread):
    model = hst.tl.fit(ad.concat(slides[:3], merge="same"), genes=GENES, **FIT)
    return model.save(tmp_path_factory.mktemp("model") / "m")


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "m")


def _edit(folder, change) -> None:
    meta = json.loads((folder / "hyperst.json").read_text())
    change(meta)
    (folder / "hyperst.json").write_text(json.dumps(meta))


def test_intact_folder_loads_and_records_hashes(saved) -> None:
    meta = json.loads((saved / "hyperst.json").read_text())
    assert set(meta["integrity"]["files"]) == {"weights.pt", "members.pt", "calibration.pt"}
    assert hst.tl.HyperST.load(saved).n_members == 3


def test_reordered_genes_are_refused(saved, tmp_path) -> None:
    folder = _copy(saved, tmp_path)
    _edit(folder, lambda m: m.update(genes=m["genes"][::-1]))
    with pytest.raises(ValueError, match="gene list differs"):
        hst.tl.HyperST.load(folder)


def test_edited_config_is_refused(saved, tmp_path) -> None:
    folder = _copy(saved, tmp_path)
    _edit(folder, lambda m: m["config"].update(dropout=0.5))
    with pytest.raises(ValueError, match="configuration differs"):
        hst.tl.HyperST.load(folder)


@pytest.mark.parametrize("name", ["weights.pt", "members.pt", "calibration.pt"])
def test_truncated_or_swapped_files_are_refused(saved, tmp_path, name) -> None:
    folder = _copy(saved, tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{name} does not match the model"):
        hst.tl.HyperST.load(folder)


def test_swapped_member_file_is_refused(saved, tmp_path) -> None:
    folder = _copy(saved, tmp_path)
    shutil.copy(folder / "weights.pt", folder / "members.pt")
    with pytest.raises(ValueError, match=r"members\.pt does not match"):
        hst.tl.HyperST.load(folder)


def test_damaged_folder_without_integrity_record(saved, tmp_path) -> None:
    folder = _copy(saved, tmp_path)
    _edit(folder, lambda m: m.pop("integrity"))  # a format-1 style folder: no hashes to compare
    data = (folder / "weights.pt").read_bytes()
    (folder / "weights.pt").write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"weights\.pt cannot be read as a tensor file"):
        hst.tl.HyperST.load(folder)
    (folder / "hyperst.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hst.tl.HyperST.load(folder)
    (folder / "hyperst.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a hyperst model record"):
        hst.tl.HyperST.load(folder)


def _state(adata: ad.AnnData) -> dict:
    return {"obs": adata.obs.copy(), "obsm": sorted(adata.obsm), "obsp": sorted(adata.obsp),
            "layers": sorted(adata.layers), "uns": sorted(adata.uns), "hyperst": repr(adata.uns.get(Key.UNS))}


def test_failed_fit_leaves_the_tables_unchanged(slides, monkeypatch, one_thread) -> None:
    import hyperst.tl._train as train_module

    tables = [s.copy() for s in slides[:3]]
    before = [_state(t) for t in tables]

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(train_module, "run_training", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        hst.tl.fit(tables, genes=GENES, **FIT)
    for t, b in zip(tables, before, strict=True):
        after = _state(t)
        assert after["obs"].equals(b["obs"])
        assert {k: v for k, v in after.items() if k != "obs"} == {k: v for k, v in b.items() if k != "obs"}


def test_failed_predict_leaves_the_spatialdata_unchanged(monkeypatch) -> None:
    from spatialdata import SpatialData

    import hyperst.pp._features as features_module

    full = hst.datasets.synthetic(n_samples=1, n_rows=5, n_cols=5, n_genes=6, seed=0)
    sdata = SpatialData(images=dict(full.images))  # H&E only: predict places pseudo-spots, then fails
    before = {k: sorted(getattr(sdata, k)) for k in ("images", "shapes", "tables")}
    model = hst.tl.HyperST(hst.nn.HyperSTConfig(n_genes=2, image_dim=8), genes=["a", "b"],
                           backbone={"name": "resnet10t"}, crop_geometry={"spot_size_um": 112.0,
                                                                          "niche_size_um": 500.0, "out_size": 32})

    def boom(*args, **kwargs):
        raise RuntimeError("backbone failed (simulated)")

    monkeypatch.setattr(features_module, "image_features", boom)
    monkeypatch.setattr(hst.pp, "image_features", boom, raising=False)
    with pytest.raises(RuntimeError, match="simulated"):
        hst.tl.predict(model, sdata, pixel_size=1.0, progress=False)
    assert {k: sorted(getattr(sdata, k)) for k in ("images", "shapes", "tables")} == before
    assert before["shapes"] == []  # the pseudo-spot grid it had placed is gone


def test_every_guarantee_on_the_reliability_page_names_an_existing_test() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (root / "docs" / "reliability.md").read_text())
    assert len(refs) >= 10
    for file, name in refs:
        assert re.search(rf"^def {name}\(", (root / file).read_text(), flags=re.M), f"{file}::{name}"


def test_gene_string_and_empty_prediction_are_clear_errors(slides, saved) -> None:
    with pytest.raises(TypeError, match=r"`genes` must be a list of gene names, got the string 'g0'; pass \['g0'\]"):
        hst.tl.fit(ad.concat(slides[:3], merge="same"), genes="g0", **FIT)
    model = hst.tl.HyperST.load(saved)
    with pytest.raises(ValueError, match="has no spots"):
        hst.tl.predict(model, slides[3][:0].copy())


def test_failed_multi_sample_fit_leaves_every_spatialdata_as_a_deep_copy(monkeypatch, one_thread) -> None:
    """Features computed for the first SpatialData, then the second fails: both end as they began."""
    import copy

    real, done = hst.pp.image_features, []

    def spy(sdata, **kwargs):
        out = real(sdata, **kwargs)
        done.append(Key.OBSM_FEATURES_SPOT in out.obsm)
        return out

    monkeypatch.setattr(hst.pp, "image_features", spy)

    first = hst.datasets.synthetic(n_samples=1, n_rows=4, n_cols=4, n_genes=6, seed=0)
    second = hst.datasets.synthetic(n_samples=1, n_rows=4, n_cols=4, n_genes=6, seed=1)
    second.tables["table"].uns["spatialdata_attrs"]["region"] = "spots_typo"  # fails in resolve_spots
    before = [copy.deepcopy(first), copy.deepcopy(second)]
    with pytest.raises(ValueError, match="spots_typo"):
        hst.tl.fit([first, second], backbone="resnet10t", random_init=True, progress=False, max_epochs=1)
    assert done == [True]  # the first SpatialData had its features when the second failed
    for sd, ref in zip((first, second), before, strict=True):
        assert sorted(sd.images) == sorted(ref.images)
        assert sorted(sd.shapes) == sorted(ref.shapes)
        assert sorted(sd.tables) == sorted(ref.tables)
        t, r = sd.tables["table"], ref.tables["table"]
        assert t.obs.equals(r.obs)
        for attr in ("obsm", "obsp", "layers", "varm"):
            assert set(getattr(t, attr).keys()) == set(getattr(r, attr).keys()), attr
        assert set(t.uns) == set(r.uns)
        assert t.uns[Key.UNS] == r.uns[Key.UNS]  # no feature or colour record left behind
        assert Key.OBSM_FEATURES_SPOT not in t.obsm
