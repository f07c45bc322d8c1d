"""hst.pp.image_features_cohort / hst.tl.predict_cohort: many slides, one or two processes, resumable stores.

Three synthetic slides (4 × 4 Visium spots) in their own zarr stores; a random resnet10t saved to a weights
file (so every process loads the same backbone) at 64-pixel crops; a small model fitted on the slides'
features with held-out slides (so predictions carry calibrated intervals and domain checks). The one-process
functions (``image_features``, ``predict``) give the reference every cohort result must equal exactly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import hyperst as hst
from hyperst._constants import Key

SCRIPT = Path(__file__).parents[1] / "docs" / "examples" / "cohort_predict.py"
TIMEOUT_S = 240
GEOMETRY = {"spot_size_um": 112.0, "niche_size_um": 255.0, "out_size": 64}
NAMES = ["slide0", "slide1", "slide2"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """Slides on disk, the backbone spec, per-slide one-process features and a fitted, saved model."""
    import spatialdata as sd

    root = tmp_path_factory.mktemp("cohort")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = hst.pp.load_backbone("resnet10t", random_init=True)
    torch.save(net.state_dict(), root / "resnet10t.pt")
    backbone = {"name": "resnet10t", "weights": str(root / "resnet10t.pt"), "input_size": 64}
    paths = []
    for i, name in enumerate(NAMES):
        s = hst.datasets.synthetic(n_samples=1, n_rows=4, n_cols=4, n_genes=12, seed=i)
        s.write(root / f"{name}.zarr")
        paths.append(root / f"{name}.zarr")
    features = {}  # the one-process reference: image_features on each slide read from its store
    for name, path in zip(NAMES, paths, strict=True):
        features[name] = hst.pp.image_features(sd.read_zarr(path), backbone=backbone, geometry=GEOMETRY,
                                               device="cpu", progress=False)
    train = []
    for name in NAMES:
        t = features[name].copy()
        t.obs[Key.OBS_SAMPLE] = name  # three samples (each synthetic slide calls its sample "sample0")
        t.obs_names = [f"{name}_{o}" for o in t.obs_names]
        train.append(t)
    model = hst.tl.fit(train, genes=list(train[0].var_names), config={"emb_dim": 16}, max_epochs=2, batch_size=16,
                       lr=3e-3, n_members=2, seed=0, device="cpu", devices=1, progress=False)
    model.save(root / "model")
    return {"root": root, "paths": paths, "backbone": backbone, "features": features, "model": model}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))


def _dense(x: Any) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def assert_same_table(got: Any, want: Any) -> None:
    """Equal tables: names, every matrix exactly, ``.obs`` values and ``.uns`` (as JSON)."""
    assert list(got.obs_names) == list(want.obs_names)
    assert list(got.var_names) == list(want.var_names)
    np.testing.assert_array_equal(_dense(got.X), _dense(want.X))
    for attr in ("layers", "obsm"):
        assert sorted(getattr(got, attr).keys()) == sorted(getattr(want, attr).keys()), attr
        for k in getattr(want, attr):
            np.testing.assert_array_equal(_dense(getattr(got, attr)[k]), _dense(getattr(want, attr)[k]), err_msg=k)
    pd.testing.assert_frame_equal(got.obs, want.obs, check_dtype=False, check_categorical=False)
    assert _plain(dict(got.uns)) == _plain(dict(want.uns))


def test_one_process_equals_image_features_and_predict(cohort, tmp_path) -> None:
    import spatialdata as sd

    model, paths = cohort["model"], cohort["paths"]
    store = hst.pp.image_features_cohort(paths, out=tmp_path / "features.zarr", backbone=cohort["backbone"],
                                         geometry=GEOMETRY, device="cpu", progress=False)
    assert store.kind == "image_features"
    assert store.slides == NAMES
    assert len(store) == 3
    for name in NAMES:
        assert_same_table(store[name], cohort["features"][name])
        assert store[name].obsm[Key.OBSM_FEATURES_SPOT].shape == (16, 512)
    manifest = json.loads((tmp_path / "features.zarr" / "manifest.json").read_text())
    assert sorted(manifest["complete"]) == NAMES
    assert manifest["pending"] == []
    assert manifest["failed"] == {}
    assert manifest["complete"]["slide1"]["source"] == str(paths[1].resolve())
    assert manifest["complete"]["slide1"]["n_obs"] == 16
    assert list((tmp_path / "features.zarr" / ".staging").iterdir()) == []
    assert hst.pp.read_cohort(tmp_path / "features.zarr").slides == NAMES

    # predictions from the feature store = predict on each feature table
    preds = hst.tl.predict_cohort(model, store, out=tmp_path / "pred.zarr", device="cpu", progress=False)
    for name in NAMES:
        want = hst.tl.predict(model, cohort["features"][name])
        assert_same_table(preds[name], want)
        assert Key.LAYER_LOWER in want.layers  # calibrated: intervals and domain checks are compared too
        assert Key.OBS_OOD_SCORE in want.obs
    # predictions from the slides (features computed inside predict) = predict on each slide; the model given
    # as its folder; in-memory slides (one process) in a dict are left as they were
    mem = {"a": sd.read_zarr(paths[0])}
    tables_before = set(mem["a"].tables)
    obsm_before = set(mem["a"].tables["table"].obsm)
    direct = hst.tl.predict_cohort(cohort["root"] / "model", mem, out=tmp_path / "p2.zarr", device="cpu",
                                   spatial_image=64, progress=False)
    assert set(mem["a"].tables) == tables_before
    assert set(mem["a"].tables["table"].obsm) == obsm_before
    want = hst.tl.predict(model, sd.read_zarr(paths[0]), device="cpu", spatial_image=64, progress=False)
    assert_same_table(direct["a"], want)
    hires = direct["a"].uns[Key.UNS_SPATIAL]["sample0"][Key.SPATIAL_IMAGES][Key.SPATIAL_HIRES]
    assert max(hires.shape[:2]) <= 64


def test_resume_after_a_crash_computes_only_the_rest(cohort, tmp_path, monkeypatch) -> None:
    import hyperst.pp._features as features_module

    paths, out = cohort["paths"], tmp_path / "features.zarr"
    real = features_module.image_features
    calls: list[str] = []

    def counted(sdata, **kwargs):
        calls.append(Path(sdata.path).name)
        if crash and len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed while it computes the second slide
        return real(sdata, **kwargs)

    kwargs = {"out": out, "backbone": cohort["backbone"], "geometry": GEOMETRY, "device": "cpu", "progress": False}
    monkeypatch.setattr(features_module, "image_features", counted)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        hst.pp.image_features_cohort(paths, **kwargs)
    store = hst.pp.read_cohort(out)
    assert store.slides == ["slide0"]  # the interrupted slide left nothing under slides/
    manifest = store.manifest
    assert sorted(manifest["complete"]) == ["slide0"]
    assert manifest["pending"] == ["slide1", "slide2"]

    crash, calls[:] = False, []
    store = hst.pp.image_features_cohort(paths, **kwargs)
    assert calls == ["slide1.zarr", "slide2.zarr"]  # slide0 was skipped
    assert store.slides == NAMES
    assert store.manifest["pending"] == []
    for name in NAMES:  # the same result as one uninterrupted process
        assert_same_table(store[name], cohort["features"][name])
    calls.clear()
    hst.pp.image_features_cohort(paths, **kwargs)  # complete: nothing to do
    assert calls == []


def _fake_features(sdata, **kwargs):
    """A stand-in for image_features: a small table (the engine's bookkeeping is tested, not the features)."""
    import anndata as ad

    if Path(sdata.path).name == "slide1.zarr" and os.environ.get("_COHORT_FAIL") == "1":
        raise ValueError("unreadable slide")
    return ad.AnnData(np.full((2, 3), float(Path(sdata.path).stem[-1]), dtype=np.float32))


def test_failed_slide_is_recorded_and_the_others_finish(cohort, tmp_path, monkeypatch) -> None:
    import hyperst.pp._features as features_module

    paths, out = cohort["paths"], tmp_path / "features.zarr"
    monkeypatch.setattr(features_module, "image_features", _fake_features)
    monkeypatch.setenv("_COHORT_FAIL", "1")
    kwargs = {"out": out, "backbone": cohort["backbone"], "geometry": GEOMETRY, "device": "cpu", "progress": False}
    with pytest.raises(RuntimeError, match=r"1 of 3 slides failed \(slide1\).*unreadable slide") as info:
        hst.pp.image_features_cohort(paths, **kwargs)
    assert isinstance(info.value.__cause__, ValueError)
    manifest = hst.pp.read_cohort(out).manifest
    assert sorted(manifest["complete"]) == ["slide0", "slide2"]
    assert manifest["failed"]["slide1"]["error"] == "ValueError: unreadable slide"
    assert "Traceback" in manifest["failed"]["slide1"]["traceback"]
    monkeypatch.setenv("_COHORT_FAIL", "0")
    store = hst.pp.image_features_cohort(paths, **kwargs)  # the retry computes slide1 only
    assert store.slides == NAMES
    assert store.manifest["failed"] == {}
    np.testing.assert_array_equal(store["slide1"].X, np.ones((2, 3)))
    hst.pp.image_features_cohort(paths[2:], **kwargs, overwrite=True)  # start again
    assert hst.pp.read_cohort(out).slides == ["slide2"]


def test_bad_arguments_are_clear_errors(cohort, tmp_path, monkeypatch) -> None:
    import hyperst.pp._features as features_module

    paths, backbone = cohort["paths"], cohort["backbone"]
    kwargs = {"backbone": backbone, "geometry": GEOMETRY, "device": "cpu", "progress": False}
    with pytest.raises(TypeError, match="list of"):
        hst.pp.image_features_cohort(paths[0], out=tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="empty"):
        hst.pp.image_features_cohort([], out=tmp_path / "a", **kwargs)
    with pytest.raises(FileNotFoundError, match=r"missing\.zarr"):
        hst.pp.image_features_cohort([tmp_path / "missing.zarr"], out=tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="several slides named"):
        hst.pp.image_features_cohort([paths[0], paths[0]], out=tmp_path / "a", **kwargs)
    unnamed = hst.datasets.synthetic(n_samples=1, n_rows=4, n_cols=4, n_genes=12)
    with pytest.raises(ValueError, match="without a name: pass a dict"):
        hst.pp.image_features_cohort([unnamed], out=tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="strategy"):
        hst.pp.image_features_cohort(paths, out=tmp_path / "a", strategy="ddp_spawn", **kwargs)
    with pytest.raises(TypeError, match="backbone"):
        hst.pp.image_features_cohort(paths, out=tmp_path / "a", **{**kwargs, "backbone": torch.nn.Identity()})
    with pytest.raises(ValueError, match="in-memory"):
        hst.pp.image_features_cohort({"a": unnamed}, out=tmp_path / "a", devices=2, strategy="ddp", **kwargs)
    with pytest.raises(TypeError, match="`model` must be a HyperST"):
        hst.tl.predict_cohort(object(), paths, out=tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # nothing was written by a refused call

    monkeypatch.setattr(features_module, "image_features", _fake_features)
    out = tmp_path / "features.zarr"
    hst.pp.image_features_cohort(paths[:1], out=out, **kwargs)
    with pytest.raises(ValueError, match=r"other settings.*overwrite=True"):
        hst.pp.image_features_cohort(paths[:1], out=out, **{**kwargs, "geometry": {**GEOMETRY, "out_size": 48}})
    with pytest.raises(ValueError, match="computed from"):
        hst.pp.image_features_cohort({"slide0": paths[1]}, out=out, **kwargs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        hst.pp.image_features_cohort(paths[:1], out=tmp_path / "file", **kwargs)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="not a cohort store"):
        hst.pp.image_features_cohort(paths[:1], out=tmp_path / "other", overwrite=True, **kwargs)
    assert (tmp_path / "other" / "data.txt").exists()  # never deleted
    with pytest.raises(FileNotFoundError, match="not a hyperst cohort store"):
        hst.pp.read_cohort(tmp_path)
    with pytest.raises(KeyError, match="slide2"):
        hst.pp.read_cohort(out)["slide2"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(cohort, tmp_path, ddp_ranks) -> None:
    pytest.importorskip("lightning")
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), str(cohort["root"] / "model"), *map(str, cohort["paths"]),
           "--out", str(out), "--device", "cpu", "--devices", "2"]
    with ddp_ranks(cmd, timeout=TIMEOUT_S, what="cohort DDP run") as (proc, _):
        pass

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["local_rank_env"] for r in ranks] == ["0", "1"]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["pid"] == proc.pid != ranks[1]["pid"]
    # slides dealt round-robin: each process computed its share, and only that
    assert [r["features"] for r in ranks] == [["slide0", "slide2"], ["slide1"]]
    assert [r["predictions"] for r in ranks] == [["slide0", "slide2"], ["slide1"]]

    model = cohort["model"]
    features, preds = hst.pp.read_cohort(out / "features.zarr"), hst.pp.read_cohort(out / "predictions.zarr")
    assert features.slides == preds.slides == NAMES
    for name in NAMES:  # exactly the one-process results
        assert_same_table(features[name], cohort["features"][name])
        assert_same_table(preds[name], hst.tl.predict(model, cohort["features"][name]))
